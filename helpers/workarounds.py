"""Workarounds for bugs in the pinned libraries, one function each.

Every entry says what breaks, where it is tracked upstream, and when it can go. `tests/test_workarounds.py`
reproduces each bug on the pinned version *without* the workaround: when an upgrade fixes one, its test fails,
and the workaround (and the test) should be deleted.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

# --- bitsandbytes 0.50.2: 4-bit layers lose their backward on CPUs with AVX512-BF16 -------------------------

# The symptom of the bug below, should it ever come back (a new code path, a new layer): torch warns once that a
# backward ran through `gemv_4bit`, which has none, and training goes on with dropped gradients. Stop instead.
warnings.filterwarnings("error", message=".*an autograd kernel was not registered", category=UserWarning)


def keep_4bit_layers_trainable_on_cpu(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; return the layers changed.

    What breaks: on a CPU with AVX512-BF16, `Linear4bit.forward` permanently repacks its weight for a fast
    inference kernel the first time it runs in eval mode on an input that needs no gradient (any no-grad
    evaluation: step-0 rewards, `trainer.evaluate()`, `generate`). From then on `matmul_4bit` calls `gemv_4bit`,
    which has no backward, so the gradient *through* every frozen 4-bit layer is silently dropped and the LoRA
    weights of all earlier layers train on wrong gradients (torch only warns "an autograd kernel was not
    registered"). Measured on the smoke model: LoRA gradients change by up to 100% after one such forward.
    Upstream: the repacking came with the CPU fused kernel, bitsandbytes PR #1804
    (https://github.com/bitsandbytes-foundation/bitsandbytes/pull/1804); the backward gap is not reported as of
    2026-11-30 (the related issue #2078 is about moving packed weights between devices).
    Remove when a bitsandbytes release gives `gemv_4bit` a backward or leaves modules that take part in
    training unpacked. The cost: CPU inference uses the general 4-bit kernel (no difference at the smoke size).
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# --- TRL 1.15: its per-token log-prob kernel exists only as Triton (crashes on a CPU) ---------------------


class TorchLogProbs:
    """Plain-torch stand-in for TRL's Triton `ChunkedLogProbFunction` (same arguments, same five outputs).

    What breaks: TRL 1.15's trainers compute per-token log-probs with a Triton kernel only; without Triton (any
    CPU machine) the import fails and the first training step raises "'NoneType' object has no attribute
    'apply'". Upstream: TRL 1.16 dispatches by device itself (release notes of v1.16.0,
    https://github.com/huggingface/trl/releases/tag/v1.16.0). Remove once Unsloth allows trl>=1.16 (Unsloth
    2026.10.9 pins trl<=1.15.0). On CUDA tensors the Triton kernel is used when it is there.
    """

    kernel: Any = None

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        if hidden.is_cuda and cls.kernel is not None:
            return cls.kernel.apply(
                hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
            )
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
        TorchLogProbs.kernel = current
        trl_utils._ChunkedLogProbFunction = TorchLogProbs


# --- TRL 1.15: the frozen reference adapter gets other dtypes than the policy ------------------------------


def complete_reference_adapter(model: Any) -> int:
    """Make TRL's frozen `"ref"` adapter an exact copy of the policy's `"default"`: every weight, in its dtype.

    What breaks: `DPOTrainer(model=peft_model, ref_model=None)` adds a `"ref"` adapter and copies the weights whose
    names contain `.default.`, then casts only the *trainable* weights of a quantized model to bf16. (1) peft's
    trainable token rows are named `...trainable_tokens_delta.default`, so the reference keeps the base model's
    rows for the chat tokens instead of the SFT-trained ones; (2) the LoRA copy stays fp32 while the policy is
    bf16. Either way policy and reference compute different log-probs at step 0 and the implicit rewards are not
    exactly 0 (measured: max |reward| 0.6 to 1.6 from (1), 0.0058 from (2)). Upstream: the copy loop in
    `DPOTrainer.__init__` (https://github.com/huggingface/trl/blob/v1.15.0/trl/trainer/dpo_trainer.py); not
    reported as of 2026-11-30. Remove when TRL copies every adapter parameter with its dtype. Returns the number
    of reference weights it set.
    """
    params = dict(model.named_parameters())
    copied = 0
    for name, param in params.items():
        if ".default." in name:
            ref = params.get(name.replace(".default.", ".ref."))
        elif name.endswith(".default"):
            ref = params.get(name.removesuffix("default") + "ref")
        else:
            continue
        if ref is not None:
            ref.data = param.data.detach().clone()
            copied += 1
    return copied


# --- peft 0.21: TRL's frozen "ref" adapter keeps trainable token rows ----------------------------------------


def freeze_reference_adapter(model: Any) -> int:
    """Freeze every weight of TRL's frozen "ref" adapter; return how many were still trainable.

    What breaks: TRL adds the "ref" adapter with `add_adapter`, and peft 0.21 leaves the new adapter's trainable
    token rows (`...trainable_tokens_delta.ref`, from `LoraSettings.trainable_tokens`) trainable: its wrapper's
    `set_adapter` "only deals with active_adapters, not with requires_grad" (peft/utils/other.py). They get no
    gradient, so training is unchanged, but the optimizer holds them; on resume the Trainer reloads "ref" frozen,
    the optimizer's parameter groups no longer match the checkpoint's, and resuming fails with "loaded state dict
    contains a parameter group that doesn't match the size of optimizer's group". Switching adapters once (peft's
    `set_adapter`, as `use_adapter` does) freezes them too, which is why DPO, whose "ref" adapter is made the same
    way, resumes: `measure_dpo_start` switches before training. Not reported upstream as of 2026-11-30; remove when
    peft freezes a non-active adapter's rows.
    """
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and (".ref." in n or n.endswith(".ref"))]
    for param in trainable:
        param.requires_grad_(False)
    return len(trainable)


# --- TRL 1.15: the precomputed reference's file is not shared between processes ------------------------------


def share_between_processes(dataset: Any, folder: Path, args: Any) -> Any:
    """`dataset` written to `folder` (emptied first, by the main process) and read back from there by every process.

    What breaks without it: TRL 1.15's `_precompute_ref_logps` writes the reference's scores next to the dataset's
    files, and for a dataset held in memory into a temporary folder of *each process*: under `accelerate launch`
    the main process writes the file and the others look for it in their own folder ("FileNotFoundError: Failed
    to open local file '/tmp/hf_datasets-…/cache-….arrow'"). Not reported upstream as of 2026-11-30 (TRL #6291
    fixed the one-process case); remove when TRL shares the file between processes. Reproducing it takes two
    processes: `tests/test_stages.py` trains the smoke DPO (which precomputes) under `accelerate launch`.
    """
    from accelerate.utils import broadcast_object_list
    from datasets import Dataset

    name = broadcast_object_list([f"pairs-{dataset._fingerprint}.arrow"], from_process=0)[0]  # differs by process
    with args.main_process_first(desc="pairs for the reference pass"):
        if args.process_index == 0:
            shutil.rmtree(folder, ignore_errors=True)  # an earlier run's files
            folder.mkdir(parents=True)
            dataset.flatten_indices(cache_file_name=str(folder / name))
    return Dataset.from_file(str(folder / name))


# --- peft 0.21 + transformers 5.17: resuming a LoRA run changes it ------------------------------------------


def keep_adapter_dtypes_on_resume(model: Any) -> None:
    """Make the Trainer's resume load a checkpoint's adapter weights in the dtypes they were saved in.

    What breaks: resuming, the Trainer calls `model.load_adapter(checkpoint, ...)`, and peft's default
    `autocast_adapter_dtype=True` turns the bf16 LoRA weights TRL made for a 4-bit model into fp32: the resumed
    run trains in another precision and ends with another adapter than an uninterrupted one. Upstream: peft's
    documented default (`PeftModel.load_adapter`, autocast_adapter_dtype), which transformers' Trainer does not
    override (`Trainer._load_from_checkpoint`,
    https://github.com/huggingface/transformers/blob/v5.17.0/src/transformers/trainer.py); not reported as of
    2026-11-30. Remove when the Trainer passes `autocast_adapter_dtype=False`.
    """
    model.load_adapter = functools.partial(model.load_adapter, autocast_adapter_dtype=False)


def restore_trained_adapter(model: Any, checkpoint: Path) -> None:
    """Load the trained ("default") adapter of a checkpoint that also holds other adapters (DPO's frozen "ref").

    What breaks: when a checkpoint has adapter subfolders, transformers' `Trainer._load_from_checkpoint` loads
    those subfolders only, so DPO's policy, saved at the checkpoint's top level, silently restarts from the SFT
    weights on resume. Upstream: transformers 5.17 `Trainer._load_from_checkpoint` ("if multiple adapters exist,
    they get saved in sub directories"), since https://github.com/huggingface/transformers/pull/30505; peft saves
    the `"default"` adapter at the top, not in a subfolder. Not reported as of 2026-11-30. Remove when the Trainer
    also loads the top-level adapter.
    """
    weights = checkpoint / "adapter_model.safetensors"
    if weights.exists() and any((sub / weights.name).exists() for sub in checkpoint.iterdir() if sub.is_dir()):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(weights), adapter_name="default")


# --- Unsloth 2026.10.9 on torch < 2.12: packed attention runs one sequence at a time -----------------------


def enable_packed_flash_attention() -> bool:
    """Run Unsloth's packed (padding-free) attention as one flash-attention call per layer on torch < 2.12.

    What breaks: Unsloth sends packed sequences to torch's varlen flash kernel, but finds it only on torch >= 2.12
    (`varlen_attn(..., enable_gqa=)`). On older torch (the H200 image's 2.11) it runs one SDPA call per packed
    sequence: about 40 small calls per layer at 16k tokens a step (SFT at 7,911 instead of 11,113 tokens/s on an
    H200). The flash kernel itself (`aten._flash_attention_forward` with sequence offsets) is there since torch
    2.5; this points Unsloth's varlen hook at it. Returns True when it changed something; a no-op on a CPU,
    without Unsloth, or on the pinned torch 2.13 (where Unsloth finds the kernel itself). Upstream: Unsloth's
    `_load_torch_varlen_attn` (unsloth/utils/attention_dispatch.py,
    https://github.com/unslothai/unsloth/blob/main/unsloth/utils/attention_dispatch.py) requires `enable_gqa`;
    not reported as of 2026-11-30. Remove when no machine the project runs on has torch < 2.12.
    """
    if not torch.cuda.is_available():
        return False
    try:
        from unsloth.utils import attention_dispatch as dispatch
    except ImportError:
        return False
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", True) is not None or not hasattr(dispatch, "_LeanFlashVarlen"):
        return False

    def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kwargs):
        left, right = window_size
        return dispatch._LeanFlashVarlen.apply(q, k, v, cu_q, max_q, (left, right) == (-1, 0), scale, left, right)

    dispatch._TORCH_VARLEN_ATTN = flash_varlen
    dispatch._LEAN_VARLEN = True
    dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False
    return True
