"""Tokens come only from the environment: never printed, never written to notebooks, logs, W&B or outputs.

The end-to-end test runs the whole smoke series (`python -m helpers.run`, every notebook in `notebooks/`) with
fake tokens set, then looks for them in every byte it wrote: executed notebooks, HTML, metrics, adapters,
W&B offline runs (binary `.wandb` files included), the home folder, and what it printed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from helpers import training
from helpers.run import series
from helpers.settings import PROJECT_ROOT, cache_root
from helpers.training import KEY_FILE

# Fresh per session, so nothing written by an earlier run (or another test) can match by accident.
FAKE_HF_TOKEN = "hf_FAKE" + "".join(secrets.choice(string.ascii_letters) for _ in range(30))
FAKE_WANDB_KEY = secrets.token_hex(20)  # 40 hex characters, the shape of a W&B API key
TOKENS = (FAKE_HF_TOKEN, FAKE_WANDB_KEY)
SERIES_TIMEOUT_S = 1800
# What a real token looks like, to catch one pasted into a committed file.
REAL_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{34,}\b")


def leaks(text: str | bytes) -> list[str]:
    """The fake tokens found in `text` (as UTF-8 bytes, so binary files are searched too)."""
    data = text.encode() if isinstance(text, str) else text
    return [token for token in TOKENS if token.encode() in data]


def test_tracking_puts_no_token_into_wandb(tmp_profile, monkeypatch):
    import wandb

    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or SimpleNamespace())
    training.start_run(tmp_profile, "sft")
    assert calls, "start_run did not start a W&B run"
    assert calls[0]["config"] == asdict(tmp_profile)
    assert not leaks(json.dumps(calls, default=str))


def test_no_real_token_is_committed():
    files = [
        *(PROJECT_ROOT / "notebooks").glob("*.ipynb"),
        *(PROJECT_ROOT / "helpers").glob("*.py"),
        *(PROJECT_ROOT / "benchmarks").rglob("*.py"),
        *(PROJECT_ROOT / "deploy").rglob("*"),
        *(PROJECT_ROOT / "docs").glob("*"),
        *PROJECT_ROOT.glob("*.md"),
        *PROJECT_ROOT.glob("*.y*ml"),
    ]
    found = [f.name for f in files if f.is_file() and REAL_HF_TOKEN.search(f.read_text(errors="replace"))]
    assert not found, f"something shaped like a Hugging Face token in {found}"


def reuse_session_checkpoints(session_outputs, outputs) -> None:
    """Start from the notebooks' run of this session (nbval runs first), when it finished training.

    Training then resumes from its final checkpoints and takes no step, so the series costs minutes instead of
    a second full training; every notebook still runs, loads, evaluates and writes with the tokens set.
    """
    finished = session_outputs / "smoke"
    if (finished / "dpo-adapter" / KEY_FILE).exists():  # stage keys do not depend on the folder: reused as is
        shutil.copytree(finished, outputs / "smoke", ignore=shutil.ignore_patterns("notebooks", "wandb"))


@pytest.mark.slow
def test_smoke_series_never_prints_or_writes_a_token(smoke_world, session_outputs, tmp_path):
    outputs, home = tmp_path / "outputs", tmp_path / "home"
    env = os.environ | {
        "HF_TOKEN": FAKE_HF_TOKEN,
        "WANDB_API_KEY": FAKE_WANDB_KEY,
        "WANDB_MODE": "offline",  # a run with a key would go online; offline writes everything locally
        "HF_HUB_OFFLINE": "1",  # the smoke profile needs no hub; a fake token must not be sent anywhere
        "TUTORIAL_PROFILE": "smoke",
        "TUTORIAL_OUTPUTS": str(outputs),
        "TUTORIAL_CACHE": str(cache_root()),
        "HOME": str(home),  # so whatever a library keeps in the home folder is searched too
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }
    reuse_session_checkpoints(session_outputs, outputs)
    notebooks = series()
    done = subprocess.run(
        [sys.executable, "-m", "helpers.run"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=SERIES_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    assert not leaks(done.stdout + done.stderr), "a token was printed"
    assert b"without encryption" not in done.stdout + done.stderr  # the kernels talk over local sockets, not TCP

    executed = outputs / "smoke" / "notebooks"
    for notebook in notebooks:
        assert (executed / notebook.name).exists() and (executed / notebook.name).with_suffix(".html").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    committed = [p for p in (PROJECT_ROOT / "notebooks").rglob("*") if p.is_file()]
    leaked = {str(p): found for p in written + committed if (found := leaks(p.read_bytes()))}
    assert not leaked, f"tokens written to {leaked}"

    metrics_file = outputs / "smoke" / "metrics.json"
    if metrics_file.exists() and "sft" in json.loads(metrics_file.read_text()):  # a notebook trained
        assert any(p.suffix == ".wandb" for p in written), "training ran, but no W&B offline run was searched"
