"""Stage keys, resumable training and atomic adapter saves: nothing is trained twice, nothing is half-written.

A stage's **key** holds exactly what determines its result: the model, the seed, the data (a content hash for a
local file, the id for a hub dataset), the split, and that stage's settings (plus, for DPO and RL, the key of
the stage they start from). Evaluation, output paths and tracking settings are never part of a key. The key
is written next to a saved adapter and next to a stage's checkpoints: an adapter whose key matches is reused,
checkpoints whose key does not match are removed before training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from helpers.config import Profile

CHECKPOINT_DONE = "CHECKPOINT_COMPLETE"
KEY_FILE = "stage-key.json"
STAGES = ("sft", "dpo", "reward", "rl")
# Settings that change how often a run logs or saves, never what it learns.
NOT_IN_KEYS = ("logging_steps", "save_steps", "eval_steps")
HASHED_FILE_LIMIT = 64 * 1024**2  # bigger files in a local model folder are identified by name and size


def source_id(source: str) -> str:
    """What identifies a model or dataset: the hub id, or a hash of the local file or folder's content."""
    path = Path(source)
    if not path.exists():
        return source
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    # Hashed once per version of the files: an edited file (new size or time) is hashed again.
    return content_hash(path, tuple((f, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.cache
def content_hash(path: Path, files: tuple[tuple[Path, int, int], ...]) -> str:
    """sha256 over the names (relative to `path`), sizes and contents of `files` (name and size only when big)."""
    digest = hashlib.sha256()
    for file, size, _ in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(str(size).encode())
        if size <= HASHED_FILE_LIMIT:
            digest.update(file.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def settings_of(settings: Any) -> dict:
    """A settings dataclass as a dict, without the fields that do not change results."""
    return {k: v for k, v in asdict(settings).items() if k not in NOT_IN_KEYS}


def split_key(profile: Profile) -> dict:
    d = profile.data
    return {"seed": profile.seed, "eval_fraction": d.eval_fraction, "heldout_key": d.heldout_key}


def preference_key(profile: Profile) -> dict:
    d = profile.data
    return split_key(profile) | {
        "preference_dataset": source_id(d.preference_dataset),
        "max_preference_rows": d.max_preference_rows,
        "reward_fraction": d.reward_fraction,
    }


def stage_key(profile: Profile, stage: str) -> dict:
    """What determines the result of `stage` ('sft', 'dpo', 'reward' or 'rl'): see the module docstring."""
    if stage == "sft":
        d = profile.data
        data = split_key(profile) | {"sft_dataset": source_id(d.sft_dataset), "max_sft_rows": d.max_sft_rows}
        return {
            "stage": "sft",
            "model": source_id(profile.model_id),
            "data": data,
            "lora": settings_of(profile.lora),
            "sft": settings_of(profile.sft),
        }
    if stage == "dpo":
        return {
            "stage": "dpo",
            "from": stage_key(profile, "sft"),
            "data": preference_key(profile),
            "dpo": settings_of(profile.dpo),
        }
    if stage == "reward":
        return {
            "stage": "reward",
            "model": source_id(profile.model_id),
            "data": preference_key(profile),
            "reward": settings_of(profile.reward),
        }
    if stage == "rl":
        return {
            "stage": "rl",
            "from": stage_key(profile, profile.rl.start_from),
            "data": preference_key(profile),  # the prompts: those of the dpo-train pairs
            "reward_model": profile.reward_model_id or stage_key(profile, "reward"),
            "rl": settings_of(profile.rl),
        }
    raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")


def key_text(profile: Profile, stage: str) -> str:
    """The stage key as canonical JSON (what is written next to adapters and checkpoints)."""
    return json.dumps(stage_key(profile, stage), sort_keys=True, indent=1)


def is_current(folder: Path, profile: Profile, stage: str) -> bool:
    """True when `folder` holds a complete result of `stage` with exactly this key."""
    stamp = Path(folder) / KEY_FILE
    return stamp.exists() and stamp.read_text() == key_text(profile, stage)


# --- checkpoints ------------------------------------------------------------------------------------------


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints the Trainer finished writing, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / CHECKPOINT_DONE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Delete checkpoints a crash left half-written; return what was removed."""
    removed = [p for p in Path(output_dir).glob("checkpoint-*") if not (p / CHECKPOINT_DONE).exists()]
    for p in removed:
        shutil.rmtree(p)
    return removed


def discard_stale_checkpoints(output_dir: Path, profile: Profile, stage: str) -> None:
    """Remove checkpoints written under another key (another seed, say): resuming them would mix two runs."""
    output_dir, key = Path(output_dir), key_text(profile, stage)
    stamp = output_dir / KEY_FILE
    if output_dir.exists() and (not stamp.exists() or stamp.read_text() != key):
        if any(output_dir.glob("checkpoint-*")):
            print(f"{output_dir.name}: checkpoints of other settings removed; training starts afresh.")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)


def resume_point(output_dir: Path, resume: bool = True) -> Path | None:
    """The last complete checkpoint to resume from (None to start afresh); half-written ones are removed."""
    remove_incomplete_checkpoints(output_dir)
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if resume and checkpoints else None


# --- saving -----------------------------------------------------------------------------------------------


def save_atomically(target: Path, write: Any) -> Path:
    """Call `write(folder)` on a temporary folder, then rename it to `target` (replacing what was there).

    A crash mid-save leaves the previous result (or none), never a half-written one that a later step loads.
    """
    target = Path(target)
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write(staging)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target


def save_adapter(model: Any, tokenizer: Any, target: Path, profile: Profile, stage: str) -> Path:
    """Save the trained ("default") adapter, the tokenizer and the stage key to `target`, atomically.

    The adapter also carries the chat-token rows `load_base` fixed in memory (`export.make_adapter_portable`), so
    plain transformers + peft load it on the untouched base anywhere and the model still ends its turns.
    """
    from helpers.export import make_adapter_portable

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder), selected_adapters=["default"])
        tokenizer.save_pretrained(str(folder))
        make_adapter_portable(folder, model, tokenizer)
        (folder / KEY_FILE).write_text(key_text(profile, stage))

    return save_atomically(target, write)
