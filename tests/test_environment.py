"""The `TUTORIAL_*` variables: each has a default, a malformed value is refused naming it, the settings file is
typed, and the README documents exactly the variables `load_profile` accepts."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import backend
from helpers.config import PROJECT_ROOT, cache_root, full_profile, smoke_profile
from helpers.environment import KNOWN, VARIABLES, SettingsError, load_profile


def settings_file(tmp_path: Path, content: object) -> str:
    path = tmp_path / "settings.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# What each variable does when unset, checked on a CPU machine.
DEFAULTS = {
    "TUTORIAL_PROFILE": lambda p: p.name == "smoke",
    "TUTORIAL_BACKEND": lambda p: p.backend == "hf",
    "TUTORIAL_SEED": lambda p: p.seed == 42,
    "TUTORIAL_OUTPUTS": lambda p: Path(p.outputs_root) == PROJECT_ROOT / "outputs",
    "TUTORIAL_CACHE": lambda p: Path(p.model_id).is_relative_to(PROJECT_ROOT / ".cache"),
    "TUTORIAL_SETTINGS": lambda p: p == smoke_profile(42, "hf"),
}
# A malformed value of each (a function of a temporary folder), refused with a message starting `NAME=`.
MALFORMED = {
    "TUTORIAL_PROFILE": lambda tmp: "tiny",
    "TUTORIAL_BACKEND": lambda tmp: "vllm",
    "TUTORIAL_SEED": lambda tmp: "-1",
    "TUTORIAL_OUTPUTS": lambda tmp: settings_file(tmp, "a file, not a folder"),
    "TUTORIAL_CACHE": lambda tmp: settings_file(tmp, "a file, not a folder"),
    "TUTORIAL_SETTINGS": lambda tmp: str(tmp / "missing.json"),
}


def test_every_variable_has_a_default_and_a_malformed_case():
    assert set(DEFAULTS) == set(MALFORMED) == KNOWN


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_default(name, monkeypatch):
    monkeypatch.delenv("TUTORIAL_CACHE", raising=False)  # the default: `.cache/`, not the test run's folder
    assert DEFAULTS[name](load_profile({}))


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_malformed_value_is_refused_naming_the_variable(name, tmp_path):
    value = MALFORMED[name](tmp_path)
    with pytest.raises(SettingsError, match=f"^{name}='?{re.escape(value)}"):
        load_profile({name: value})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TUTORIAL_PROFILE": "tiny"}, "TUTORIAL_PROFILE='tiny' is not one of smoke, quick, full"),
        ({"TUTORIAL_BACKEND": "vllm"}, "TUTORIAL_BACKEND='vllm' is not one of auto, unsloth, hf"),
        ({"TUTORIAL_SEED": "seven"}, "TUTORIAL_SEED='seven' must be a non-negative whole number"),
        ({"TUTORIAL_SEED": ""}, "TUTORIAL_SEED='' must be a non-negative whole number"),
    ],
)
def test_messages_say_what_is_allowed(env, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_profile(env)


def test_an_unknown_variable_is_refused_naming_it_and_the_known_ones():
    unknown = "TUTORIAL_" + "MAX_STEPS"  # a variable of older versions
    with pytest.raises(SettingsError, match=f"Unknown variable {unknown}; the known ones are TUTORIAL_BACKEND"):
        load_profile({unknown: "10"})


def test_environment_selects_profile_backend_seed_and_outputs(tmp_path):
    env = {"TUTORIAL_PROFILE": " FULL ", "TUTORIAL_BACKEND": "hf", "TUTORIAL_SEED": "7", "TUTORIAL_OUTPUTS": "out"}
    profile = load_profile(env)
    assert profile == replace(full_profile(7, "hf"), outputs_root=str(Path("out").resolve()))
    assert "seed-3" in load_profile({"TUTORIAL_SEED": "3"}).model_id  # the smoke world of that seed


def test_a_gpu_defaults_to_the_quick_profile(monkeypatch):
    monkeypatch.setattr("helpers.environment.cuda_available", lambda: True)
    assert load_profile({"TUTORIAL_BACKEND": "hf"}).name == "quick"


def test_auto_backend_takes_hf_on_a_cpu_and_unsloth_on_a_gpu_when_it_imports(monkeypatch):
    assert backend.resolve_backend("auto", on_gpu=False) == "hf"
    assert backend.resolve_backend("auto", on_gpu=True) == "unsloth"  # unsloth is installed by `make setup`
    assert backend.resolve_backend("hf", on_gpu=True) == "hf"
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    assert backend.resolve_backend("auto", on_gpu=True) == "hf"


def test_cache_variable_moves_the_smoke_world(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert Path(smoke_profile(5).model_id).is_relative_to(tmp_path)


def test_cache_variable_is_read_from_the_environment_given(tmp_path, monkeypatch):
    monkeypatch.delenv("TUTORIAL_CACHE", raising=False)
    profile = load_profile({"TUTORIAL_PROFILE": "smoke", "TUTORIAL_CACHE": str(tmp_path)})
    assert Path(profile.model_id).is_relative_to(tmp_path)


# --- the settings file ------------------------------------------------------------------------------------


def test_settings_file_replaces_fields_with_their_types(tmp_path):
    overrides = {
        "sft": {"max_steps": 10, "learning_rate": 1},
        "dpo": {"loss_weights": [1, 0.5]},
        "data": {"max_sft_rows": 500, "max_preference_rows": None},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
    }
    profile = load_profile({"TUTORIAL_SETTINGS": settings_file(tmp_path, overrides)})
    smoke = smoke_profile(42, "hf")
    assert profile == replace(
        smoke,
        sft=replace(smoke.sft, max_steps=10, learning_rate=1.0),
        dpo=replace(smoke.dpo, loss_weights=(1.0, 0.5)),
        data=replace(smoke.data, max_sft_rows=500, max_preference_rows=None),
        lora=replace(smoke.lora, target_modules=("q_proj", "v_proj")),
    )
    assert type(profile.sft.learning_rate) is float and type(profile.sft.max_steps) is int
    assert [type(w) for w in profile.dpo.loss_weights] == [float, float]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sft": {"max_steps": "10"}}, "sft: max_steps must be int, got '10'"),
        ({"sft": {"max_steps": True}}, "sft: max_steps must be int, got True"),
        ({"sft": {"max_steps": 1.5}}, "sft: max_steps must be int, got 1.5"),
        ({"sft": {"packing": 1}}, "sft: packing must be bool, got 1"),
        ({"data": {"max_sft_rows": "all"}}, "data: max_sft_rows must be int or null, got 'all'"),
        ({"lora": {"target_modules": ["q_proj", 7]}}, "lora: target_modules[1] must be str, got 7"),
        ({"lora": {"target_modules": "q_proj"}}, "lora: target_modules must be tuple, got 'q_proj'"),
        ({"seed": "7"}, "seed must be int, got '7'"),
        ({"sft": 3}, "'sft' holds settings; give an object, not 3"),
        ({"sft": {"lr": 1e-3}}, "unknown setting 'lr'; known: learning_rate"),
        ({"optimizer": "adamw"}, "unknown setting 'optimizer'"),
    ],
)
def test_settings_of_the_wrong_type_are_refused_naming_the_field(tmp_path, overrides, message):
    path = settings_file(tmp_path, overrides)
    with pytest.raises(SettingsError, match=f"^TUTORIAL_SETTINGS={re.escape(path)}.*{re.escape(message)}"):
        load_profile({"TUTORIAL_SETTINGS": path})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"sft": {"max_steps": 10,}}', ":1: not valid JSON"),
        ("[1, 2]", "expected a JSON object of settings"),
    ],
)
def test_a_settings_file_that_does_not_parse_is_refused(tmp_path, content, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_profile({"TUTORIAL_SETTINGS": settings_file(tmp_path, content)})


# --- documentation ----------------------------------------------------------------------------------------


def test_readme_table_lists_every_variable_as_environment_py_does():
    readme = (PROJECT_ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if re.match(r"\| `TUTORIAL_", line)]
    assert rows == [f"| `{v.name}` | {v.meaning} | {v.default} |" for v in VARIABLES]


def test_no_file_names_a_variable_load_profile_would_refuse():
    pattern = re.compile(r"\bTUTORIAL_[A-Z][A-Z_]*\b")
    folders = ("helpers", "notebooks", "tests", "benchmarks", "deploy", "docs", ".github")
    files = [PROJECT_ROOT / name for name in ("Makefile", "README.md", "environment.yml", "launchable.yaml")]
    files += [p for folder in folders for p in (PROJECT_ROOT / folder).rglob("*") if p.is_file()]
    named = {
        (p.relative_to(PROJECT_ROOT).as_posix(), name)
        for p in files
        if p.suffix in {"", ".py", ".ipynb", ".md", ".sh", ".yml", ".yaml", ".toml"}
        for name in pattern.findall(p.read_text(errors="replace"))
    }
    unknown = sorted((path, name) for path, name in named if name not in KNOWN)
    assert not unknown, f"variables load_profile refuses: {unknown}"
