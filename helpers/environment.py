"""The `TUTORIAL_*` environment variables: the one table of them, and the profile they select.

    TUTORIAL_PROFILE=smoke TUTORIAL_SEED=7 make run

`load_profile()` reads them, rejects a malformed value with a message that names it, and returns the profile.
The README's table of variables is checked against `VARIABLES` by a test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from helpers.config import BACKENDS, PROFILE_BUILDERS, PROFILES, Profile, cache_root, smoke_profile


@dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    default: str


VARIABLES = (
    Variable(
        "TUTORIAL_PROFILE",
        "`smoke` (tiny local model, synthetic data, CPU, minutes), `quick` (Llama-3.1-8B on seeded subsets of the "
        "real data, under an hour on an A100) or `full` (the complete datasets, hours)",
        "`quick` on a CUDA GPU, else `smoke`",
    ),
    Variable(
        "TUTORIAL_BACKEND",
        "`unsloth`, `hf` (transformers + peft + bitsandbytes) or `auto`",
        "`auto`: Unsloth on a GPU when it imports, `hf` on a CPU",
    ),
    Variable("TUTORIAL_SEED", "one seed for data, initialisation, shuffling and sampling", "`42`"),
    Variable("TUTORIAL_OUTPUTS", "where runs write (adapters, plots, metrics, executed notebooks)", "`outputs/`"),
    Variable("TUTORIAL_CACHE", "where the smoke world is built and kept", "`.cache/`"),
    Variable(
        "TUTORIAL_SETTINGS",
        "a JSON file of settings that replace the profile's, by field name, e.g. "
        '`{"sft": {"max_steps": 10}, "data": {"max_sft_rows": 500}}`',
        "none",
    ),
)
KNOWN = {v.name for v in VARIABLES}


class SettingsError(ValueError):
    """A `TUTORIAL_*` variable or settings file that cannot be used; the message says which and why."""


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def load_profile(env: Mapping[str, str] | None = None) -> Profile:
    """The profile the environment selects (see `VARIABLES`); imports Unsloth when it is the backend.

    Raises:
        SettingsError: an unknown `TUTORIAL_*` variable, or a value (or settings file) that does not parse.
    """
    from helpers.backend import import_unsloth, resolve_backend

    env = dict(os.environ if env is None else env)
    unknown = sorted(k for k in env if k.startswith("TUTORIAL_") and k not in KNOWN)
    if unknown:
        raise SettingsError(f"Unknown variable {', '.join(unknown)}; the known ones are {', '.join(sorted(KNOWN))}.")
    on_gpu = cuda_available()
    name = env.get("TUTORIAL_PROFILE", "quick" if on_gpu else "smoke").strip().lower()
    if name not in PROFILES:
        raise SettingsError(f"TUTORIAL_PROFILE={name!r} is not one of {', '.join(PROFILES)}.")
    seed_text = env.get("TUTORIAL_SEED", "42").strip()
    if not seed_text.isdigit():
        raise SettingsError(f"TUTORIAL_SEED={seed_text!r} must be a non-negative whole number.")
    requested = env.get("TUTORIAL_BACKEND", "auto").strip().lower()
    if requested not in BACKENDS:
        raise SettingsError(f"TUTORIAL_BACKEND={requested!r} is not one of {', '.join(BACKENDS)}.")
    backend = resolve_backend(requested, on_gpu)
    outputs = folder_variable(env, "TUTORIAL_OUTPUTS")
    folder_variable(env, "TUTORIAL_CACHE")
    if backend == "unsloth":
        import_unsloth()
    builders = PROFILE_BUILDERS | {"smoke": partial(smoke_profile, cache=cache_root(env))}
    profile = builders[name](int(seed_text), backend)
    if outputs:
        profile = replace(profile, outputs_root=str(outputs.resolve()))
    if env.get("TUTORIAL_SETTINGS", "").strip():
        profile = apply_settings_file(profile, Path(env["TUTORIAL_SETTINGS"].strip()))
    return profile


def folder_variable(env: Mapping[str, str], name: str) -> Path | None:
    """The folder a path variable names (None when unset); a path that is an existing file is refused."""
    text = env.get(name, "").strip()
    if not text:
        return None
    if Path(text).exists() and not Path(text).is_dir():
        raise SettingsError(f"{name}={text!r} is a file; it must name a folder (created when missing).")
    return Path(text)


def apply_settings_file(profile: Profile, path: Path) -> Profile:
    """`profile` with the fields a JSON settings file names replaced (nested objects for nested settings)."""
    try:
        overrides = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"TUTORIAL_SETTINGS={path}: no such file.") from None
    except json.JSONDecodeError as e:
        raise SettingsError(f"TUTORIAL_SETTINGS={path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    if not isinstance(overrides, dict):
        raise SettingsError(f"TUTORIAL_SETTINGS={path}: expected a JSON object of settings, got {type(overrides)}.")
    return override(profile, overrides, f"TUTORIAL_SETTINGS={path}")


def override(settings: Any, changes: dict, where: str) -> Any:
    """A copy of the dataclass `settings` with `changes` applied, field by field, each checked against its type."""
    hints = typing.get_type_hints(type(settings))
    updates = {}
    for key, value in changes.items():
        if key not in hints:
            raise SettingsError(f"{where}: unknown setting {key!r}; known: {', '.join(hints)}.")
        current = getattr(settings, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SettingsError(f"{where}: {key!r} holds settings; give an object, not {value!r}.")
            updates[key] = override(current, value, f"{where}, {key}")
        else:
            updates[key] = checked_value(hints[key], value, f"{where}: {key}")
    return replace(settings, **updates)


def checked_value(hint: Any, value: Any, where: str) -> Any:
    """`value` as the annotated type `hint` wants it (a list becomes a tuple, an int a float), or a SettingsError."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return None
        if origin is tuple and isinstance(value, list | tuple):
            item = typing.get_args(kind)[0]  # tuple[X, ...]: every item an X
            return tuple(checked_value(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin in (int, str, bool) and type(value) is origin:
            return value
    names = " or ".join(
        "null" if k is type(None) else getattr(typing.get_origin(k) or k, "__name__", str(k)) for k in allowed
    )
    raise SettingsError(f"{where} must be {names}, got {value!r}.")
