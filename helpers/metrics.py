"""`outputs/<profile>/metrics.json`: every stage adds its numbers under its own section, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.config import Profile
from helpers.distributed import is_main_process


def metrics_path(profile: Profile) -> Path:
    return profile.output_dir / "metrics.json"


def read_metrics(profile: Profile) -> dict:
    """The run's metrics so far (empty before the first stage)."""
    path = metrics_path(profile)
    return json.loads(path.read_text()) if path.exists() else {}


def update_metrics(profile: Profile, **sections: Any) -> dict:
    """Merge `sections` into metrics.json and return the whole.

    A section that is a dict is merged one level deep: `update_metrics(p, eval={"dpo": {...}})` replaces the
    `dpo` entry of `eval` and keeps the others; use `merge_model_metrics` to add keys inside one model's entry.
    """
    metrics = read_metrics(profile) | {"profile": profile.name, "backend": profile.backend, "seed": profile.seed}
    for key, value in sections.items():
        metrics[key] = metrics.get(key, {}) | value if isinstance(value, dict) else value
    if is_main_process():  # under `accelerate launch` one process writes (two would share the temporary file)
        write_json_atomically(metrics_path(profile), metrics)
    return metrics


def merge_model_metrics(profile: Profile, section: str, results: dict) -> dict:
    """Add `results` to `section`, merging each model's dict into the one it has there; return the section."""
    current = read_metrics(profile).get(section, {})
    merged = {k: current.get(k, {}) | v if isinstance(v, dict) else v for k, v in results.items()}
    return update_metrics(profile, **{section: merged})[section]


def write_json_atomically(path: Path, value: Any) -> Path:
    """Write `value` as indented JSON to `path` via a temporary file, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)
    return path
