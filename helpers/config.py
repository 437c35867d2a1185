"""All settings in one place: profiles of one recipe, as dataclasses whose fields carry TRL's names.

- `smoke`: a tiny Llama built locally, synthetic data in the real schemas, a CPU, minutes.
- `quick`: Llama-3.1-8B in 4-bit on a GPU with seeded subsets of the real datasets: the whole series in under
  an hour on one A100 40 GB (the default on a GPU; benchmarks/README.md derives the time).
- `full`: the same as `quick`, on the complete datasets (hours).

`helpers.environment.load_profile()` picks one from the `TUTORIAL_*` variables. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from helpers.chat import CHAT_TOKENS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("smoke", "quick", "full")
BACKENDS = ("auto", "unsloth", "hf")
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODELS = ("base", "sft", "dpo", "rl")  # the models the series compares, in the order it trains them


@dataclass(frozen=True)
class DataSettings:
    """Where the data comes from and how it is split (one rule for every stage; see `helpers.splits`)."""

    sft_dataset: str
    preference_dataset: str
    # Keep a seeded random subset of this many rows (None: all). `quick` uses it; the rule is in helpers.data.
    max_sft_rows: int | None = None
    max_preference_rows: int | None = None
    # Share of problems held out for evaluation, and (smoke) for the toy reward model's own training pairs.
    eval_fraction: float = 0.01
    reward_fraction: float = 0.0
    # What makes two prompts "the same problem": "text" (whitespace-normalised, case-folded user text) or
    # "sum" (the smoke task's numbers, in any wording or order).
    heldout_key: str = "text"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape (REFERENCE §5: r16/α16/dropout 0/rsLoRA on all seven projections)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    use_rslora: bool = True
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    # Full copies of these modules are trained next to the adapters (none: 2 GB for an 8B model's embeddings).
    modules_to_save: tuple[str, ...] = ()
    # Rows of `embed_tokens` and `lm_head` trained (and saved with the adapter) for these tokens: the chat tokens a
    # base model never saw in pretraining. peft's `trainable_token_indices`.
    trainable_tokens: tuple[str, ...] = ()


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
    # DPO's sigmoid loss plus the NLL of the chosen answer (RPO, Pang et al. 2024): the NLL term keeps the chosen
    # answers likely while the margin grows; plain ("sigmoid",) lets both fall and, on the smoke model, collapses.
    loss_type: tuple[str, ...] = ("sigmoid", "sft")
    loss_weights: tuple[float, ...] | None = None
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
    # Score the reference once before training (in batches sorted by length, with `group_by_length`) instead of in
    # every step. On the H200 an epoch then runs 1.33x faster, but on 221 pairs the pass (compilation included) costs
    # what about five epochs save (benchmarks/README.md); on a CPU it paid over 3 epochs. Off for the GPU profiles.
    precompute_ref_log_probs: bool = False


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

    # The model RL trains and its KL reference: "sft" (RLHF as InstructGPT runs it: SFT, reward model, RL; 06 compares
    # it with DPO from the same start) or "dpo" (RL after DPO).
    start_from: str = "sft"
    beta: float = 0.05  # weight of the KL to the reference (the model RL starts from)
    learning_rate: float = 5e-6
    num_train_epochs: float = 1.0  # max_steps decides; train.common_args reads it
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
    # Held-out prompts answered and judged every this many steps (the curves of notebook 06).
    eval_steps: int = 25


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation of the models."""

    num_prompts: int = 64
    samples_per_prompt: int = 1
    max_new_tokens: int = 256
    # Sampled, not greedy: greedy decoding shows one answer per prompt and hides a policy that mixes styles.
    temperature: float = 0.7
    num_side_by_side: int = 5
    bootstrap_samples: int = 1000  # resamples for the confidence intervals of rates


@dataclass(frozen=True)
class Expectations:
    """What a run of this profile must show: checked by the notebooks, the tests and benchmarks/smoke_seeds.py.

    Only a profile with a code judge (smoke) can promise these; the GPU profiles check invariants only.
    """

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
    # The smoke task has a code judge (`helpers.smoke.is_better_answer`): the true score that every other
    # measurement (reward models, implicit rewards) only approximates. Real chat data has none.
    code_judge: bool = False
    # The 16-bit checkpoint the 4-bit base was made from (notebook 07 merges into it to compare); None: the model
    # id without Unsloth's "-bnb-4bit" suffix.
    original_model_id: str | None = None
    # Random weights (the benchmarks' 8B-shaped stand-ins): what training teaches is printed, not asserted.
    random_weights: bool = False
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

    @property
    def rl_adapter_dir(self) -> Path:
        return self.output_dir / "rl-adapter"

    def to_dict(self) -> dict:
        """Plain dict of every setting (for W&B config and reports; holds no secrets)."""
        return asdict(self)

    def describe(self) -> str:
        """One line saying what this run will use."""
        return (
            f"profile={self.name} backend={self.backend} seed={self.seed} model={self.model_id} "
            f"sft_data={self.data.sft_dataset} preference_data={self.data.preference_dataset}"
        )


def shown(path: str | Path) -> str:
    """`path` as a reader should see it: relative to the project when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """Where built artefacts (the smoke world) are kept: `TUTORIAL_CACHE` in `env` (default: this process's
    environment), else `.cache/`."""
    import os

    env = os.environ if env is None else env
    return Path(env.get("TUTORIAL_CACHE", "").strip() or PROJECT_ROOT / ".cache")


def smoke_world_dir(seed: int, cache: Path | None = None) -> Path:
    """Where the smoke world (tokenizer, tiny base model, synthetic datasets) for `seed` is cached (under `cache`,
    default `cache_root()`): under a hash of its generator's source, so a changed generator never reuses a world
    built by an older one."""
    import hashlib

    generator = hashlib.sha256((PROJECT_ROOT / "helpers" / "smoke.py").read_bytes()).hexdigest()[:12]
    return (cache or cache_root()) / "smoke-world" / generator / f"seed-{seed}"


def smoke_profile(seed: int = 42, backend: str = "hf", cache: Path | None = None) -> Profile:
    """Tiny locally built Llama, synthetic data in the real schemas, CPU, minutes; its world under `cache`."""
    world = smoke_world_dir(seed, cache)
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
        lora=LoraSettings(trainable_tokens=CHAT_TOKENS),
        sft=SFTSettings(
            learning_rate=1e-3,
            # 4 passes: with 2, seeds whose base model starts further from the chat format (first loss 0.76
            # instead of 0.51) stopped at a third of the loss and answered sums wrongly (seed 201: SFT better-answer
            # rate 0.06, DPO 0.27; with 4 epochs 0.35 and 0.90). benchmarks/results/smoke-seeds.json.
            num_train_epochs=4,
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
            # β 0.5: at this learning rate DPO drifts from the SFT model, and on held-out sums that costs
            # correct answers (concise answers right 0.96 → 0.86 on seed 507 at β 0.3). β 0.1 failed 3 of 10 fresh
            # seeds, 0.3 failed 2 of 11, 0.5 passes 10 of 10 (benchmarks/results/smoke-seeds.json; notebook 04's β
            # sweep shows the trade).
            beta=0.5,
            learning_rate=3e-4,
            num_train_epochs=3,
            # Three epochs: the reference is scored once, not three times (DPO 22 s instead of 25 s on 2 cores).
            precompute_ref_log_probs=True,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            max_length=128,
            optim="adamw_torch",
            warmup_steps=0.0,
            logging_steps=5,
            save_steps=50,
        ),
        rl=RLSettings(
            # The toy reward model scores answers unlike any it was trained on (": 12.") above correct ones. At TRL's
            # β = 0.05 the policy found them with seed 202 (better-answer rate 0.26 → 0.00 in 60 steps); 0.2 holds.
            beta=0.2,
            learning_rate=1e-4,
            max_steps=60,
            num_generations=4,
            per_device_train_batch_size=16,
            max_completion_length=40,
            optim="adamw_torch",
            logging_steps=5,
            save_steps=20,
            eval_steps=10,
        ),
        eval=EvalSettings(num_prompts=48, samples_per_prompt=4, max_new_tokens=40, temperature=0.7, num_side_by_side=4),
        expect=Expectations(),
        code_judge=True,
    )


def full_profile(seed: int = 42, backend: str = "unsloth") -> Profile:
    """Llama-3.1-8B in 4-bit, one epoch of FineTome-100k then of orpo-dpo-mix-40k, then RL: hours on one GPU.

    The batch settings are the fastest measured in `benchmarks/` (random weights of the same shapes), and fit a
    24 GB GPU as well as an 80 GB one: SFT packs 8 × 2048 tokens a step (8.7 GiB); DPO takes 16 length-grouped
    pairs a batch (14 GiB).
    """
    return Profile(
        name="full",
        backend=backend,
        seed=seed,
        model_id="unsloth/Meta-Llama-3.1-8B-bnb-4bit",
        reward_model_id="Ray2333/GRM_Llama3.1_8B_rewardmodel-ft",
        data=DataSettings(sft_dataset="mlabonne/FineTome-100k", preference_dataset="mlabonne/orpo-dpo-mix-40k"),
    )


def quick_profile(seed: int = 42, backend: str = "unsloth") -> Profile:
    """`full` on seeded subsets of the real data: the whole series in under an hour on an A100 40 GB."""
    from dataclasses import replace

    full = full_profile(seed, backend)
    return replace(
        full,
        name="quick",
        data=replace(full.data, max_sft_rows=2000, max_preference_rows=1500, eval_fraction=0.06),
        rl=replace(full.rl, max_steps=20, eval_steps=10),
    )


PROFILE_BUILDERS = {"smoke": smoke_profile, "quick": quick_profile, "full": full_profile}
