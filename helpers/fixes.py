"""Fixes for bugs in the pinned libraries, one function each: what breaks, where it is tracked, when it can go.
`tests/test_fixes.py` reproduces each bug without its fix: when an upgrade fixes one, its test fails (delete both)."""

from __future__ import annotations

import functools
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

# The symptom of the bitsandbytes bug below, should it come back (a new code path, a new layer): torch warns once that
# a backward ran through `gemv_4bit`, which has none, and training goes on with dropped gradients. Stop instead.
warnings.filterwarnings("error", message=".*an autograd kernel was not registered", category=UserWarning)


def keep_4bit_layers_trainable_on_cpu(model: Any) -> None:
    """bitsandbytes 0.50.2: stop 4-bit layers from repacking their weights into the CPU inference layout.
    What breaks: on a CPU with AVX512-BF16, `Linear4bit` repacks its weight for good at its first eval-mode forward
    without gradients (step-0 rewards, `evaluate()`, `generate`); `matmul_4bit` then calls `gemv_4bit`, which has no
    backward, so every gradient through a frozen 4-bit layer is silently dropped (LoRA gradients up to 100% off).
    Upstream: the repacking came with https://github.com/bitsandbytes-foundation/bitsandbytes/pull/1804; the backward
    gap is not reported as of 2026-11-30. Remove when `gemv_4bit` gets a backward or training layers stay unpacked."""
    import bitsandbytes as bnb

    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False  # CPU inference then uses the general kernel (same at smoke size)


class TorchLogProbs:
    """TRL 1.15: a plain-torch stand-in for its Triton `ChunkedLogProbFunction` (same arguments, same five outputs).
    What breaks: without Triton (any CPU) the first training step raises "'NoneType' object has no attribute 'apply'".
    TRL 1.16 dispatches by device (https://github.com/huggingface/trl/releases/tag/v1.16.0): remove once Unsloth allows
    trl>=1.16 (2026.10.9 pins trl<=1.15.0). CUDA tensors still go to the Triton kernel when it is there."""

    kernel: Any = None

    @classmethod
    def apply(cls, *args: Any):
        hidden, weight, bias, targets, temperature, _chunk_size, softcap, logit_scale, outputs = args
        if hidden.is_cuda and cls.kernel is not None:
            return cls.kernel.apply(*args)
        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        log_z = torch.logsumexp(logits, dim=-1)
        target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        probs = torch.softmax(logits, dim=-1)
        return (
            target_logits - log_z,
            log_z - (probs * logits).sum(-1) if "entropy" in outputs else None,
            torch.log((probs * probs).sum(-1)) if "log_sum_sq_probs" in outputs else None,
            logits.mean(-1) if "mean_logits" in outputs else None,
            logits.argmax(-1) == targets if "is_top1" in outputs else None,
        )


def install_cpu_logprob_fallback() -> None:
    """Route TRL's fused log-prob computation through `TorchLogProbs` (idempotent)."""
    import trl.trainer.utils as trl_utils

    current = trl_utils._ChunkedLogProbFunction
    if current is not TorchLogProbs:
        TorchLogProbs.kernel, trl_utils._ChunkedLogProbFunction = current, TorchLogProbs


def complete_reference_adapter(model: Any) -> int:
    """TRL 1.15: make its frozen `"ref"` adapter an exact copy of the policy's `"default"`, every weight in its dtype;
    return how many it set. Call it before any reference log-prob (`ProjectDPOTrainer` does, inside `__init__`).
    What breaks: `DPOTrainer`/`RLOOTrainer(ref_model=None)` copy only weights named `.default.`, then cast the trainable
    ones of a quantized model to bf16: the reference keeps the base's chat-token rows (`trainable_tokens_delta.default`)
    and an fp32 LoRA copy, so step-0 implicit rewards are not 0 (max |reward| 0.6 to 1.6, and 0.0058). Upstream: the
    copy loop of https://github.com/huggingface/trl/blob/v1.15.0/trl/trainer/dpo_trainer.py, not reported as of
    2026-12-06. Remove when TRL copies every adapter parameter with its dtype."""
    default = re.compile(r"\.default(?=\.|$)")  # `.default.` inside a name, or `.default` at its end
    params = dict(model.named_parameters())
    refs = [(params.get(default.sub(".ref", n)), p) for n, p in params.items() if default.search(n)]
    for ref, param in refs:
        if ref is not None:
            ref.data = param.data.detach().clone()
    return sum(ref is not None for ref, _ in refs)


def freeze_reference_adapter(model: Any) -> int:
    """peft 0.21: freeze every weight of TRL's frozen "ref" adapter; return how many were still trainable.
    What breaks: peft's `add_adapter` leaves the new adapter's token rows (`trainable_tokens_delta.ref`) trainable
    (`set_adapter` "only deals with active_adapters, not with requires_grad", peft/utils/other.py). The optimizer holds
    them, and resuming, with "ref" reloaded frozen, fails: "loaded state dict contains a parameter group that doesn't
    match the size of optimizer's group" (DPO's step-0 evaluation switches adapters, which freezes them). Not reported
    upstream as of 2026-11-30; remove when peft freezes a non-active adapter's rows."""
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and (".ref." in n or n.endswith(".ref"))]
    for param in trainable:
        param.requires_grad_(False)
    return len(trainable)


def share_between_processes(dataset: Any, folder: Path, args: Any) -> Any:
    """TRL 1.15: `dataset` written to `folder` (emptied first, by the main process) and read back by every process.
    What breaks: `_precompute_ref_logps` writes the reference's scores for an in-memory dataset into a temporary folder
    of each process, so under `accelerate launch` the others miss the main process's file ("FileNotFoundError: Failed to
    open local file '/tmp/hf_datasets-…/cache-….arrow'"). Not reported upstream as of 2026-11-30 (TRL #6291 fixed one
    process); remove when TRL shares the file. `tests/test_training.py` reproduces it under `accelerate launch`."""
    from accelerate.utils import broadcast_object_list
    from datasets import Dataset

    name = broadcast_object_list([f"pairs-{dataset._fingerprint}.arrow"], from_process=0)[0]  # differs by process
    with args.main_process_first(desc="pairs for the reference pass"):
        if args.process_index == 0:
            shutil.rmtree(folder, ignore_errors=True)  # an earlier run's files
            folder.mkdir(parents=True)
            dataset.flatten_indices(cache_file_name=str(folder / name))
    return Dataset.from_file(str(folder / name))


def keep_adapter_dtypes_on_resume(model: Any) -> None:
    """peft 0.21 + transformers 5.17: make the Trainer's resume load adapter weights in the dtypes they were saved in.
    What breaks: resuming calls `model.load_adapter`, whose default `autocast_adapter_dtype=True` turns the bf16 LoRA
    weights of a 4-bit model into fp32: the resumed run ends with another adapter than an uninterrupted one. Upstream:
    `Trainer._load_from_checkpoint` keeps peft's default
    (https://github.com/huggingface/transformers/blob/v5.17.0/src/transformers/trainer.py), not reported as of
    2026-11-30. Remove when the Trainer passes `autocast_adapter_dtype=False`."""
    model.load_adapter = functools.partial(model.load_adapter, autocast_adapter_dtype=False)


def restore_trained_adapter(model: Any, checkpoint: Path) -> None:
    """transformers 5.17: load the trained ("default") adapter of a checkpoint that also holds DPO's frozen "ref".
    What breaks: `Trainer._load_from_checkpoint` loads only a checkpoint's adapter subfolders when it has some (since
    https://github.com/huggingface/transformers/pull/30505), but peft saves "default" at the top: DPO's policy silently
    restarts from the SFT weights. Not reported as of 2026-11-30; remove when the Trainer loads the top-level adapter.
    """
    weights = checkpoint / "adapter_model.safetensors"
    if weights.exists() and any((sub / weights.name).exists() for sub in checkpoint.iterdir() if sub.is_dir()):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(weights), adapter_name="default")
