"""All settings in one place: two profiles (smoke, full) of the same recipe.

`load_profile()` reads three environment variables:

- `TUTORIAL_PROFILE`: `smoke` (tiny local model, synthetic data, CPU) or `full` (Llama-3.1-8B, the real
  datasets, a CUDA GPU). Default: `full` when a CUDA GPU is present, else `smoke`.
- `TUTORIAL_BACKEND`: `auto`, `unsloth` or `hf` (transformers + peft + bitsandbytes). `auto` takes Unsloth when
  a CUDA GPU is present and `unsloth` imports; on a CPU Unsloth only falls back to the same torch code, so `auto`
  takes `hf` there.
- `TUTORIAL_SEED`: one seed for data, model initialisation, shuffling and sampling (default 42).

Two more, for tests and shared machines: `TUTORIAL_OUTPUTS` (default `outputs/`) is where runs write, and
`TUTORIAL_CACHE` (default `.cache/`) where the smoke world is kept.

To run a profile's code path on other weights and data (the GPU proof on random 8B-shaped weights, see
`helpers.shapes`): `TUTORIAL_MODEL_ID`, `TUTORIAL_SFT_DATASET`, `TUTORIAL_PREFERENCE_DATASET` (hub ids or local
paths), `TUTORIAL_REWARD_MODEL_ID` (empty: none), `TUTORIAL_MAX_SFT_ROWS`, `TUTORIAL_MAX_PREFERENCE_ROWS`, and
`TUTORIAL_MAX_STEPS` (a cap on the optimizer steps of both SFT and DPO, for a run of minutes).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("smoke", "full")
BACKENDS = ("auto", "unsloth", "hf")
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape (REFERENCE §5: r16/α16/dropout 0/rsLoRA on all seven projections)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    use_rslora: bool = True
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    # Full copies of these modules are trained next to the adapters. The smoke model is a random base, and
    # low-rank updates on frozen random weights barely learn; its embeddings and head must train too.
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class SFTSettings:
    """Supervised fine-tuning (TRL `SFTConfig` fields of the same names)."""

    learning_rate: float = 3e-4
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
    save_steps: int = 200


@dataclass(frozen=True)
class DPOSettings:
    """Direct Preference Optimization (TRL `DPOConfig` fields of the same names)."""

    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid",)
    learning_rate: float = 5e-6
    num_train_epochs: float = 1.0
    max_steps: int = -1
    # 16 pairs a batch, length-grouped: 1.7 to 1.9 times the pairs/s of batch 2, 14 GiB at most on an 8B model,
    # so it fits a 24 GB GPU (benchmarks/README.md); 32 pairs an optimizer step.
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 2
    max_length: int = 1024
    optim: str = "adamw_8bit"
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.1
    logging_steps: int = 10
    save_steps: int = 200
    # Sort pairs by length into batches, then shuffle the batches: far less padding, same expected gradient.
    group_by_length: bool = True


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation of base, SFT and DPO models."""

    num_prompts: int = 64
    samples_per_prompt: int = 1
    max_new_tokens: int = 256
    # Sampled, not greedy: greedy decoding shows one answer per prompt and hides a policy that mixes styles.
    temperature: float = 0.7
    num_side_by_side: int = 5


@dataclass(frozen=True)
class Profile:
    """Everything one run needs. Build with `smoke_profile()`, `full_profile()` or `load_profile()`."""

    name: str
    backend: str
    seed: int
    model_id: str
    sft_dataset: str
    preference_dataset: str
    reward_model_id: str | None
    max_sft_rows: int | None
    max_preference_rows: int | None
    eval_fraction: float
    lora: LoraSettings = field(default_factory=LoraSettings)
    sft: SFTSettings = field(default_factory=SFTSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    report_to_wandb: bool = True
    wandb_project: str = "align-llama"
    outputs_root: str = str(PROJECT_ROOT / "outputs")

    @property
    def output_dir(self) -> Path:
        return Path(self.outputs_root) / self.name

    @property
    def sft_adapter_dir(self) -> Path:
        return self.output_dir / "sft-adapter"

    @property
    def dpo_adapter_dir(self) -> Path:
        return self.output_dir / "dpo-adapter"

    def to_dict(self) -> dict:
        """Plain dict of every setting (for W&B config and reports; holds no secrets)."""
        return asdict(self)

    def describe(self) -> str:
        """One line saying what this run will use."""
        return (
            f"profile={self.name} backend={self.backend} seed={self.seed} model={self.model_id} "
            f"sft_data={self.sft_dataset} preference_data={self.preference_dataset}"
        )


def smoke_world_dir(seed: int) -> Path:
    """Where the smoke world (tokenizer, tiny base model, synthetic datasets) for `seed` is cached."""
    root = Path(os.environ.get("TUTORIAL_CACHE", PROJECT_ROOT / ".cache"))
    return root / "smoke-world" / f"seed-{seed}"


def smoke_profile(seed: int = 42, backend: str = "hf") -> Profile:
    """Tiny locally built Llama, synthetic data in the real schemas, CPU, minutes."""
    world = smoke_world_dir(seed)
    return Profile(
        name="smoke",
        backend=backend,
        seed=seed,
        model_id=str(world / "base-model"),
        sft_dataset=str(world / "finetome-smoke.jsonl"),
        preference_dataset=str(world / "orpo-dpo-mix-smoke.jsonl"),
        reward_model_id=None,
        max_sft_rows=None,
        max_preference_rows=None,
        eval_fraction=0.15,
        lora=LoraSettings(modules_to_save=("embed_tokens", "lm_head")),
        sft=SFTSettings(
            learning_rate=3e-3,
            num_train_epochs=6,
            per_device_train_batch_size=16,
            max_length=128,
            packing=False,
            optim="adamw_torch",
            warmup_steps=0.0,
            weight_decay=0.0,
            logging_steps=5,
            save_steps=50,
        ),
        dpo=DPOSettings(
            beta=0.1,
            loss_type=("sigmoid", "sft"),
            learning_rate=3e-4,
            num_train_epochs=5,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            max_length=128,
            optim="adamw_torch",
            warmup_steps=0.0,
            logging_steps=5,
            save_steps=50,
        ),
        eval=EvalSettings(num_prompts=48, samples_per_prompt=4, max_new_tokens=40, temperature=0.5, num_side_by_side=4),
    )


def full_profile(seed: int = 42, backend: str = "unsloth") -> Profile:
    """Llama-3.1-8B in 4-bit, FineTome-100k then orpo-dpo-mix-40k, on one GPU of 24 GB or more.

    The batch settings are the fastest measured in `benchmarks/` (random weights of the same shapes), and fit a
    24 GB GPU as well as an 80 GB one: SFT packs 8 × 2048 tokens a step (8.7 GiB); DPO takes 16 length-grouped
    pairs a batch (14 GiB).
    """
    return Profile(
        name="full",
        backend=backend,
        seed=seed,
        model_id="unsloth/Meta-Llama-3.1-8B-bnb-4bit",
        sft_dataset="mlabonne/FineTome-100k",
        preference_dataset="mlabonne/orpo-dpo-mix-40k",
        reward_model_id="Ray2333/GRM_Llama3.1_8B_rewardmodel-ft",
        max_sft_rows=None,
        max_preference_rows=None,
        eval_fraction=0.01,
        sft=SFTSettings(),
        dpo=DPOSettings(),
        eval=EvalSettings(),
    )


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def resolve_backend(requested: str, on_gpu: bool) -> str:
    """Turn `auto` into `unsloth` or `hf`; check an explicit choice is one we know."""
    if requested not in BACKENDS:
        raise ValueError(f"TUTORIAL_BACKEND={requested!r} is not one of {', '.join(BACKENDS)}.")
    if requested != "auto":
        return requested
    return "unsloth" if on_gpu and importlib.util.find_spec("unsloth") is not None else "hf"


def import_selected_backend(env: dict[str, str] | None = None) -> None:
    """Import Unsloth now if the environment selects it, so its patches come before transformers/peft/trl."""
    env = os.environ if env is None else env
    requested = env.get("TUTORIAL_BACKEND", "auto").strip().lower()
    if requested == "unsloth" or (requested == "auto" and importlib.util.find_spec("unsloth") and cuda_available()):
        import unsloth  # noqa: F401


def load_profile(env: dict[str, str] | None = None) -> Profile:
    """Build the profile the environment asks for (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    on_gpu = cuda_available()
    name = env.get("TUTORIAL_PROFILE", "full" if on_gpu else "smoke").strip().lower()
    if name not in PROFILES:
        raise ValueError(f"TUTORIAL_PROFILE={name!r} is not one of {', '.join(PROFILES)}.")
    seed_text = env.get("TUTORIAL_SEED", "42").strip()
    if not seed_text.isdigit():
        raise ValueError(f"TUTORIAL_SEED={seed_text!r} must be a non-negative whole number.")
    backend = resolve_backend(env.get("TUTORIAL_BACKEND", "auto").strip().lower(), on_gpu)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (patches transformers, peft and trl: must come before their use)
    build = smoke_profile if name == "smoke" else full_profile
    profile = build(int(seed_text), backend)
    overrides = {
        k: int(env[v])
        for k, v in (("max_sft_rows", "TUTORIAL_MAX_SFT_ROWS"), ("max_preference_rows", "TUTORIAL_MAX_PREFERENCE_ROWS"))
        if v in env
    }
    if "TUTORIAL_OUTPUTS" in env:
        overrides["outputs_root"] = str(Path(env["TUTORIAL_OUTPUTS"]).resolve())
    for key, variable in (
        ("model_id", "TUTORIAL_MODEL_ID"),
        ("sft_dataset", "TUTORIAL_SFT_DATASET"),
        ("preference_dataset", "TUTORIAL_PREFERENCE_DATASET"),
    ):
        if env.get(variable, "").strip():
            overrides[key] = env[variable].strip()
    if "TUTORIAL_REWARD_MODEL_ID" in env:
        overrides["reward_model_id"] = env["TUTORIAL_REWARD_MODEL_ID"].strip() or None
    if "TUTORIAL_MAX_STEPS" in env:
        steps_text = env["TUTORIAL_MAX_STEPS"].strip()
        if not steps_text.isdigit() or int(steps_text) == 0:
            raise ValueError(f"TUTORIAL_MAX_STEPS={steps_text!r} must be a positive whole number.")
        steps = int(steps_text)
        # A capped run logs about ten times (memory and loss series in W&B), however few its steps.
        for stage in ("sft", "dpo"):
            settings = getattr(profile, stage)
            logging_steps = min(settings.logging_steps, max(1, steps // 10))
            overrides[stage] = replace(settings, max_steps=steps, logging_steps=logging_steps)
    return replace(profile, **overrides)
