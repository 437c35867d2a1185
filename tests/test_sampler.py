"""llama_sampler on the smoke model (CPU): lean and merged greedy answers are transformers' own `generate`'s, seeded
draws repeat, adapters switch, `refresh()` follows the adapter, the stop/length bookkeeping is right, and an RLOO step
samples through it."""

from types import SimpleNamespace

import pytest
import torch

from helpers import fixes, generation, training
from helpers.model import add_lora, load_base
from helpers.settings import END_OF_TEXT, smoke_profile
from llama_sampler import Generations, Sampler, decode, render_prompt, stop_token_ids

from trl.trainer.utils import use_adapter  # isort: skip  (after helpers)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(1, 2), (3, 4), (5, 5), (9, 8), (0, 7)]]
PROMPTS.append([SYSTEM, {"role": "user", "content": "Add 6 and 2."}])


def nudge_lora(model, adapter: str, seed: int, std: float = 0.03) -> None:
    """Give an adapter's B matrices seeded noise (fresh LoRA has B = 0: the adapter would change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * std)


def smoke_policy(seed: int, adapters=("default", "other")):
    """The smoke base in 4-bit with LoRA adapters (each nudged differently) and its tokenizer."""
    profile = smoke_profile(seed, "hf")
    model, tokenizer = load_base(profile, profile.sft.max_length)
    model = add_lora(model, profile, tokenizer)
    for nudge, name in enumerate(adapters):
        if name != "default":
            model.add_adapter(name, model.peft_config["default"])
        nudge_lora(model, name, nudge)
    return model, tokenizer


@pytest.fixture(scope="module")
def policy(smoke_world, smoke_seed):
    return smoke_policy(smoke_seed)


def plain_generate(model, tokenizer, prompts, max_new_tokens: int, adapter: str | None) -> Generations:
    """transformers' own greedy `generate`, all prompts in one left-padded batch, ending at either stop token."""
    rows = [render_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad(), use_adapter(model, adapter):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    return decode(tokenizer, out[:, width:].tolist())


def teacher_forced_agreement(model, tokenizer, prompts, samples, adapter) -> float:
    """Share of the generated tokens (stop tokens aside) that the model's own forward ranks first after them."""
    rows = [render_prompt(tokenizer, p) + t for p, t in zip(prompts, samples.token_ids, strict=True)]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad(), use_adapter(model, adapter):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    logits[..., stop_token_ids(tokenizer)] = float("-inf")  # they may have been forbidden (`min_new_tokens`)
    hits = total = 0
    for i, tokens in enumerate(samples.token_ids):
        predicted = logits[i, width - len(tokens) - 1 : width - 1].argmax(-1).tolist()
        hits += sum(a == b for a, b in zip(predicted, tokens, strict=True))
        total += len(tokens)
    return hits / total


def same(a: Generations, b: Generations) -> bool:
    return (a.texts, a.num_tokens, a.stopped, a.token_ids) == (b.texts, b.num_tokens, b.stopped, b.token_ids)


@pytest.mark.parametrize("adapter", ["default", "other", None])
@pytest.mark.parametrize("mode", ["lean", "merged"])
def test_greedy_answers_are_transformers_own(policy, mode, adapter):
    """On the smoke model every mode gives exactly `model.generate`'s greedy answers, and so does
    `generation.generate` (transformers' `generate` on a CPU, the sampler on a GPU)."""
    model, tokenizer = policy
    expected = plain_generate(model, tokenizer, PROMPTS, 24, adapter)
    got = Sampler(model, tokenizer, mode=mode).generate(PROMPTS, 24, sample=False, adapter=adapter)
    assert same(got, expected)
    assert same(generation.generate(model, tokenizer, PROMPTS, 24, adapter=adapter), expected)
    assert same(generation.generate(model, tokenizer, PROMPTS, 24, adapter=adapter, batch_size=4), expected)


def test_auto_takes_lean_on_a_cpu_and_unknown_modes_are_refused(policy):
    model, tokenizer = policy
    assert Sampler(model, tokenizer).mode == "lean"  # the merged copy pays only on a GPU
    with pytest.raises(ValueError, match="mode='generate' is not one of auto, merged, lean"):
        Sampler(model, tokenizer, mode="generate")


def test_merged_forced_answers_are_the_models_own(policy):
    """Forced past their end (`min_new_tokens`), the answers run into text the model was never trained on, where
    the merged copy's one rounding of W + s·B·A to bf16 may flip a near-tie: check the tokens, not the texts."""
    model, tokenizer = policy
    got = Sampler(model, tokenizer, mode="merged").generate(PROMPTS, 24, sample=False, min_new_tokens=24)
    assert teacher_forced_agreement(model, tokenizer, PROMPTS, got, "default") > 0.9


@pytest.mark.parametrize("mode", ["lean", "merged"])
def test_seeded_sampling_repeats_and_seeds_differ(policy, mode):
    model, tokenizer = policy
    sampler = Sampler(model, tokenizer, mode=mode)
    draw = [sampler.generate(PROMPTS, 16, sample=True, temperature=1.5, seed=s).token_ids for s in (7, 7, 8)]
    assert draw[0] == draw[1]
    assert draw[0] != draw[2]


def test_seeded_sampling_through_generation_repeats(policy):
    model, tokenizer = policy
    draw = [generation.generate(model, tokenizer, PROMPTS, 16, True, 1.5, seed=s).token_ids for s in (3, 3, 4)]
    assert draw[0] == draw[1] and draw[0] != draw[2]


@pytest.mark.parametrize("mode", ["lean", "merged"])
def test_adapters_switch_on_one_base(policy, mode):
    model, tokenizer = policy
    sampler = Sampler(model, tokenizer, mode=mode)
    outputs = {}
    for adapter in ("default", None, "other", "default"):
        out = sampler.generate(PROMPTS, 16, sample=False, adapter=adapter, min_new_tokens=16)
        assert teacher_forced_agreement(model, tokenizer, PROMPTS, out, adapter) > 0.9
        outputs.setdefault(adapter, []).append(out.token_ids)
    assert outputs["default"][0] == outputs["default"][1]  # back to an adapter: the same answers
    assert len({str(v[0]) for v in outputs.values()}) == 3  # and the three models answer differently
    with pytest.raises(ValueError, match="No adapter 'missing'"):
        sampler.generate(PROMPTS, 4, sample=False, adapter="missing")


def test_refresh_follows_the_adapter(smoke_world, smoke_seed):
    model, tokenizer = smoke_policy(smoke_seed, ("default",))
    merged, lean = Sampler(model, tokenizer, mode="merged"), Sampler(model, tokenizer, mode="lean")
    before = merged.generate(PROMPTS, 16, sample=False, min_new_tokens=16)
    nudge_lora(model, "default", seed=11, std=0.05)  # in place, as an optimizer step
    stale = merged.generate(PROMPTS, 16, sample=False, min_new_tokens=16)
    assert stale.token_ids == before.token_ids  # the copy does not see the change…
    merged.refresh()
    after = merged.generate(PROMPTS, 16, sample=False, min_new_tokens=16)
    assert after.token_ids != before.token_ids  # …until refresh()
    assert teacher_forced_agreement(model, tokenizer, PROMPTS, after, "default") > 0.9
    lean_after = lean.generate(PROMPTS, 16, sample=False, min_new_tokens=16)  # lean reads the adapter itself
    assert teacher_forced_agreement(model, tokenizer, PROMPTS, lean_after, "default") == 1.0


def sampler_or_generate(model, tokenizer, mode: str):
    """`generate(prompts, max_new_tokens, **options)` of a sampler mode, or of `generation.generate` ("generation")."""
    if mode == "generation":
        return lambda prompts, n, **options: generation.generate(model, tokenizer, prompts, n, **options)
    return Sampler(model, tokenizer, mode=mode).generate


@pytest.mark.parametrize("mode", ["generation", "lean", "merged"])
def test_stop_and_length_bookkeeping(policy, mode):
    """The smoke base model (adapters off) ends its sentence with <|end_of_text|> after a few tokens."""
    model, tokenizer = policy
    generate = sampler_or_generate(model, tokenizer, mode)
    end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    free = generate(PROMPTS, 40, sample=False, adapter=None)
    assert all(free.stopped) and free.stopped_share() == 1.0
    for ids, n, text in zip(free.token_ids, free.num_tokens, free.texts, strict=True):
        assert ids[-1] == end and len(ids) == n + 1 and end not in ids[:-1]  # cut right after the first stop
        assert text == tokenizer.decode(ids[:-1], skip_special_tokens=True).strip()
    short = max(free.num_tokens)  # the longest answers are cut just before their stop token, the others are not
    assert min(free.num_tokens) < short
    cut = generate(PROMPTS, short, sample=False, adapter=None)
    assert cut.token_ids == [ids[:short] for ids in free.token_ids]  # the same answers, cut at max_new_tokens…
    assert [not s for s in cut.stopped] == [n >= short for n in free.num_tokens]  # …unless they stopped before
    assert not all(cut.stopped) and any(cut.stopped)
    if mode != "generation":
        forced = generate(PROMPTS, 12, sample=False, adapter=None, min_new_tokens=12)
        assert all(len(ids) == 12 and end not in ids for ids in forced.token_ids) and not any(forced.stopped)


class ReportingCuda:
    """A CPU sampler that says it is on a GPU, so that `FastRLOOTrainer` takes its sampling path (which on a real
    GPU it takes by itself); everything else is the sampler's."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.device, self.stops = sampler, SimpleNamespace(type="cuda"), sampler.stops

    def refresh(self):
        self.sampler.refresh()

    def generate_ids(self, *args, **kwargs):
        return self.sampler.generate_ids(*args, **kwargs)


def rloo_trainer(seed: int, tmp_path):
    from datasets import Dataset
    from trl import RLOOConfig

    fixes.install_cpu_logprob_fallback()
    model, tokenizer = smoke_policy(seed, ("default",))
    args = RLOOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=12,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    rows = Dataset.from_list([{"prompt": p} for p in PROMPTS * 2])
    return training.FastRLOOTrainer(
        model=model,
        reward_funcs=lambda completions, **kwargs: [float(len(c[0]["content"])) for c in completions],
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
    )


def test_an_rloo_step_samples_through_the_sampler(smoke_world, smoke_seed, tmp_path, monkeypatch):
    trainer = rloo_trainer(smoke_seed, tmp_path)
    assert trainer.sampler.mode == "lean"  # its own sampler, over the trained model
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    trainer.sampler = ReportingCuda(Sampler(trainer.model, trainer.processing_class, mode="merged"))
    calls, refreshes = [], []
    sample, refresh = trainer.sampler.generate_ids, trainer.sampler.refresh
    trainer.sampler.generate_ids = lambda ids, *a, **k: calls.append(len(ids)) or sample(ids, *a, **k)
    trainer.sampler.refresh = lambda: refreshes.append(trainer.state.global_step) or refresh()
    trainer.train()
    assert calls == [4, 4]  # each rollout: 2 prompts × 2 generations, through the sampler
    assert refreshes == [0, 1]  # re-merged after the optimizer step between them
    assert trainer.state.log_history[1]["kl"] > 0  # the second rollout's policy had moved from the reference
    eot = trainer.processing_class.convert_tokens_to_ids("<|eot_id|>")
    assert eot in trainer.eos_token_ids  # TRL counts a completion ending on <|eot_id|> as terminated


def test_on_a_cpu_an_rloo_step_samples_through_trls_generate(smoke_world, smoke_seed, tmp_path):
    trainer = rloo_trainer(smoke_seed, tmp_path)
    calls = []
    sample = trainer.sampler.generate_ids
    trainer.sampler.generate_ids = lambda ids, *a, **k: calls.append(len(ids)) or sample(ids, *a, **k)
    trainer.train()
    assert calls == [] and trainer.state.global_step == 2
    assert not [n for n, p in trainer.model.named_parameters() if p.requires_grad and ".ref" in n]  # frozen
