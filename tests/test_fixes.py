"""Each fix in `helpers.fixes` does its job, and each bug it works around is still in the pinned library: when an
upgrade fixes one, its test here fails with "fix X can go" (delete both then)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from datasets import Dataset

from helpers import fixes, generation, training
from helpers.data import load_dataset
from helpers.fixes import TorchLogProbs, complete_reference_adapter
from helpers.model import load_for_training
from helpers.settings import dpo_config

AUTOGRAD_WARNING = "an autograd kernel was not registered"


# --- bitsandbytes: 4-bit layers lose their backward on CPUs with AVX512-BF16 --------------------------------


def has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def trained_looking_model(profile, max_length: int):
    """The smoke model with fresh adapters nudged away from their initial values (LoRA's B starts at 0, which
    leaves A without a gradient; the chat-token rows start as the base's), as after some training."""
    model, tokenizer = load_for_training(profile, max_length)  # applies the bitsandbytes fix
    generator = torch.Generator().manual_seed(profile.seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.01 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model, tokenizer


def sft_batch(profile, tokenizer, rows: int = 4) -> dict:
    """A few SFT conversations of the smoke data as one padded batch with labels."""
    conversations = load_dataset(profile.data.sft_dataset, "sft")[0]["messages"][:rows]
    enc = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, padding=True, return_tensors="pt"
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def trainable_gradients(model, batch: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The gradients of every trainable weight for `batch` in training mode, and the warnings backward raised."""
    model.train()
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, [str(w.message) for w in caught if AUTOGRAD_WARNING in str(w.message)]


def evaluate_without_grad(model, tokenizer) -> None:
    """What an evaluation does before training (step-0 rewards, `trainer.evaluate()`): an eval-mode forward
    that needs no gradient."""
    model.eval()
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    generation.score_answers(model, tokenizer, [prompt], ["Answer: 5."], "default")


def test_lora_gradients_are_the_same_after_a_no_grad_evaluation(tmp_profile):
    model, tokenizer = trained_looking_model(tmp_profile, tmp_profile.sft.max_length)
    batch = sft_batch(tmp_profile, tokenizer)
    before, _ = trainable_gradients(model, batch)
    evaluate_without_grad(model, tokenizer)
    after, warned = trainable_gradients(model, batch)
    assert any("lora_A" in n for n in before) and all(g.abs().sum() > 0 for g in before.values())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"{len(changed)} of {len(before)} gradients changed after an evaluation, e.g. {changed[0]}"
    assert not warned


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_bitsandbytes_still_drops_the_gradient_after_repacking(tmp_profile):
    import bitsandbytes as bnb

    model, tokenizer = trained_looking_model(tmp_profile, tmp_profile.sft.max_length)
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it: the fix undone
    batch = sft_batch(tmp_profile, tokenizer)
    before, _ = trainable_gradients(model, batch)
    evaluate_without_grad(model, tokenizer)
    after, warned = trainable_gradients(model, batch)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and warned, (
        "fix keep_4bit_layers_trainable_on_cpu can go: bitsandbytes keeps the gradient after an evaluation"
    )


# --- TRL 1.15: per-token log-probs only through a Triton kernel ---------------------------------------------


def tiny_causal_lm(outputs: tuple[str, ...], temperature: float):
    """A tiny random Llama with TRL's fused LM head (how TRL's trainers compute per-token log-probs)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config).eval()
    add_fused_lm_head(model, temperature=temperature, outputs=outputs)
    return model


def trl_kernel():
    """TRL's own log-prob kernel (None without Triton), whether or not `TorchLogProbs` replaced it."""
    import trl.trainer.utils as trl_utils

    current = trl_utils._ChunkedLogProbFunction
    return TorchLogProbs.kernel if current is TorchLogProbs else current


@pytest.mark.skipif(trl_kernel() is not None, reason="TRL's Triton kernel is installed here")
def test_trl_still_has_no_cpu_log_probs(monkeypatch):
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_kernel())
    model, ids = tiny_causal_lm(("log_probs",), 1.0), torch.randint(40, (2, 6))
    try:
        model(input_ids=ids, labels=ids, fused_lm_head=True)
    except AttributeError as error:
        assert "'NoneType' object has no attribute 'apply'" in str(error)
    else:
        pytest.fail("fix TorchLogProbs can go: TRL computes per-token log-probs on a CPU itself")


def test_torch_log_probs_give_what_trl_computes_from_the_logits(monkeypatch):
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", TorchLogProbs)
    outputs, temperature = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), 0.7
    model, ids = tiny_causal_lm(outputs, temperature), torch.randint(40, (2, 6))
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    logits = model(input_ids=ids).logits[:, :-1].float() / temperature
    log_p, targets = torch.log_softmax(logits, -1), ids[:, 1:]
    torch.testing.assert_close(fused.log_probs, log_p.gather(-1, targets[..., None]).squeeze(-1))
    torch.testing.assert_close(fused.entropy, -(log_p.exp() * log_p).sum(-1))
    torch.testing.assert_close(fused.log_sum_sq_probs, torch.log((log_p.exp() ** 2).sum(-1)))
    torch.testing.assert_close(fused.mean_logits, logits.mean(-1))
    assert torch.equal(fused.is_top1, logits.argmax(-1) == targets)


# --- TRL 1.15: the "ref" adapter is not an exact copy of the policy -----------------------------------------


def reference_mismatches(model) -> list[str]:
    """Weights of the `"ref"` adapter that differ from the policy's (`"default"`) in value or dtype."""
    params = dict(model.named_parameters())
    mismatches = []
    for name, param in params.items():
        if ".default" not in name:
            continue
        ref = params[
            name.replace(".default.", ".ref.") if ".default." in name else name.removesuffix("default") + "ref"
        ]
        if ref.dtype != param.dtype or not torch.equal(ref, param):
            mismatches.append(f"{name} ({param.dtype} vs ref {ref.dtype})")
    return mismatches


def test_the_cpu_log_prob_fallback_is_installed_once():
    import trl.trainer.utils as trl_utils

    fixes.install_cpu_logprob_fallback()
    kernel = TorchLogProbs.kernel
    fixes.install_cpu_logprob_fallback()  # a second call must not make the fallback its own kernel
    assert trl_utils._ChunkedLogProbFunction is TorchLogProbs and TorchLogProbs.kernel is kernel is not TorchLogProbs


@pytest.fixture
def dpo_trainer(tmp_profile, monkeypatch):
    """`training.ProjectDPOTrainer` (TRL's DPOTrainer) over the smoke model with a trained-looking adapter (as after
    SFT), built without the project's model fixes (a `Stage` adds the resume ones)."""
    # No reference pass while building: it switches adapters, which hides the peft bug tested below.
    tmp_profile = replace(tmp_profile, dpo=replace(tmp_profile.dpo, precompute_ref_log_probs=False))
    model, tokenizer = trained_looking_model(tmp_profile, tmp_profile.dpo.max_length)
    monkeypatch.setattr(fixes, "complete_reference_adapter", lambda model: 0)
    user = [{"role": "user", "content": "What is 1 + 2?"}]
    pair = {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "Answer: 3."}],
        "rejected": [{"role": "assistant", "content": "Answer: 4."}],
    }
    return training.ProjectDPOTrainer(
        model=model,
        ref_model=None,
        args=dpo_config(tmp_profile),
        train_dataset=Dataset.from_list([pair, pair]),
        processing_class=tokenizer,
    )


def test_trl_reference_adapter_still_differs_and_the_fix_completes_it(dpo_trainer):
    model = dpo_trainer.model
    mismatches = reference_mismatches(model)
    assert mismatches, "fix complete_reference_adapter can go: TRL's 'ref' adapter is an exact copy"
    assert any("trainable_tokens_delta" in m for m in mismatches)  # the SFT-trained chat-token rows
    assert complete_reference_adapter(model) > 0  # the fix itself (the fixture turned it off in the trainer)
    assert reference_mismatches(model) == []


def test_peft_still_leaves_the_reference_token_rows_trainable_and_the_fix_freezes_them(dpo_trainer):
    def trainable_ref(model) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad and (".ref." in n or n.endswith(".ref"))]

    model = dpo_trainer.model  # TRL adds its "ref" adapter with `add_adapter`, for DPO as for RL
    left = trainable_ref(model)
    assert left, "fix freeze_reference_adapter can go: peft freezes the new adapter's token rows"
    assert all("trainable_tokens" in n for n in left)
    assert fixes.freeze_reference_adapter(model) == len(left)
    assert trainable_ref(model) == []


# --- transformers 5.17 + peft 0.21: resuming a LoRA run ------------------------------------------------------

LORA_WEIGHT = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"


def test_trainer_resume_still_casts_the_adapter_to_fp32(dpo_trainer, tmp_path):
    model = dpo_trainer.model
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trained} == {torch.bfloat16}  # as TRL makes them for a 4-bit model
    model.save_pretrained(str(tmp_path), selected_adapters=["default"])  # a checkpoint with one adapter
    dpo_trainer._load_from_checkpoint(str(tmp_path))
    assert model.get_parameter(LORA_WEIGHT).dtype == torch.float32, (
        "fix keep_adapter_dtypes_on_resume can go: the Trainer resumes adapters in their saved dtype"
    )
    for param in (p for p in model.parameters() if p.requires_grad):
        param.data = param.data.to(torch.bfloat16)
    fixes.keep_adapter_dtypes_on_resume(model)
    dpo_trainer._load_from_checkpoint(str(tmp_path))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_trainer_resume_still_skips_the_top_level_adapter(dpo_trainer, tmp_path):
    model = dpo_trainer.model
    model.save_pretrained(str(tmp_path))  # the policy at the top, the frozen "ref" in ref/: a DPO checkpoint
    assert (tmp_path / "ref" / "adapter_model.safetensors").exists()
    saved = model.get_parameter(LORA_WEIGHT).detach().clone()
    with torch.no_grad():
        model.get_parameter(LORA_WEIGHT).add_(1.0)  # what a restarted run holds: not the checkpoint's weights
    dpo_trainer._load_from_checkpoint(str(tmp_path))
    assert not torch.equal(model.get_parameter(LORA_WEIGHT), saved), (
        "fix restore_trained_adapter can go: the Trainer loads the top-level adapter of a checkpoint"
    )
    fixes.restore_trained_adapter(model, tmp_path)
    assert torch.equal(model.get_parameter(LORA_WEIGHT), saved)
