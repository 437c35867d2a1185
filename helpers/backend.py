"""Unsloth first: it patches transformers, peft and trl when imported, so it must come before them.

Every module of `helpers` that imports transformers, peft or trl imports this one before them; importing it
imports Unsloth when the environment selects that backend (`TUTORIAL_BACKEND=unsloth`, or `auto` on a GPU).
"""

from __future__ import annotations

import importlib.util
import os

from helpers.config import BACKENDS


def resolve_backend(requested: str, on_gpu: bool) -> str:
    """Turn `auto` into `unsloth` or `hf`. On a CPU Unsloth only falls back to plain torch, slowly: `hf`."""
    if requested not in BACKENDS:
        raise ValueError(f"TUTORIAL_BACKEND={requested!r} is not one of {', '.join(BACKENDS)}.")
    if requested != "auto":
        return requested
    return "unsloth" if on_gpu and importlib.util.find_spec("unsloth") is not None else "hf"


def import_unsloth() -> None:
    """Import Unsloth (it patches transformers, peft and trl on import)."""
    import unsloth  # noqa: F401


def quiet_known_noise() -> None:
    """Silence two messages that say nothing is wrong, where they arise:

    - bitsandbytes 0.50.2 on a CPU looks for the optional `kernels` package, logs that it is missing and uses its
      own kernel (the result is the same);
    - tqdm in a notebook without ipywidgets warns "IProgress not found" and draws text bars (which is what the
      executed notebooks should hold).
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="IProgress not found")


def import_unsloth_if_selected() -> None:
    """Import Unsloth when `TUTORIAL_BACKEND` selects it (on its own, or through `auto` on a GPU)."""
    requested = os.environ.get("TUTORIAL_BACKEND", "auto").strip().lower()
    if requested == "unsloth":
        import_unsloth()
    elif requested == "auto" and importlib.util.find_spec("unsloth") is not None:
        import torch

        if torch.cuda.is_available():
            import_unsloth()


quiet_known_noise()
import_unsloth_if_selected()
