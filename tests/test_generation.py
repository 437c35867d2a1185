"""helpers.generation on the smoke model: the one scorer gives TRL's own sequence log-probs, the log-ratios and
implicit-reward accuracy read it right, two versions of a model are compared on decisive tokens, and the chat
streams the greedy answer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import data, fixes, generation, training
from helpers.settings import EOT, dpo_config


@pytest.fixture(scope="module")
def reference_pass(smoke_world, smoke_seed, sft_like_policy, tmp_path_factory):
    """`ProjectDPOTrainer` with the reference precomputed over 16 smoke pairs, one pair a batch (its dataset holds
    TRL's own `ref_chosen_logps` and `ref_rejected_logps`), on an SFT-like adapter, and the pairs as text."""
    from helpers.settings import smoke_profile

    profile = smoke_profile(smoke_seed, "hf")
    profile = replace(profile, outputs_root=str(tmp_path_factory.mktemp("outputs")), report_to_wandb=False)
    profile = replace(profile, dpo=replace(profile.dpo, precompute_ref_log_probs=True, per_device_train_batch_size=1))
    fixes.install_cpu_logprob_fallback()
    policy, tokenizer = sft_like_policy(profile)
    pairs = data.preference_data(profile, tokenizer).train.select(range(16))
    trainer = training.ProjectDPOTrainer(
        model=policy, ref_model=None, args=dpo_config(profile), train_dataset=pairs, processing_class=tokenizer
    )
    return trainer, pairs


def texts(pairs, column: str) -> list[str]:
    return [row[-1]["content"] for row in pairs[column]]


def test_scores_are_trls_own_sequence_log_probs(reference_pass):
    """The one scorer and TRL's reference pass read the same answers on the same model and "ref" adapter. The smoke
    model computes in bf16, where a row's numbers on a CPU depend on the rows computed with it (up to 0.019 nats
    measured), so each pair is scored as TRL's pass batches it: its chosen and rejected answers together."""
    trainer, pairs = reference_pass
    rows, policy, tokenizer = trainer.train_dataset, trainer.model, trainer.processing_class
    for column in ("chosen", "rejected"):
        ids = [generation.answer_ids(tokenizer, a) for a in texts(pairs, column)]
        assert ids == rows[f"{column}_ids"]  # the same tokens: the answer's text, then <|eot_id|>
    ours = torch.stack(
        [
            generation.score_answers(policy, tokenizer, [prompt] * 2, [chosen, rejected], "ref", batch_size=2).totals()
            for prompt, chosen, rejected in zip(
                pairs["prompt"], texts(pairs, "chosen"), texts(pairs, "rejected"), strict=True
            )
        ]
    )
    trls = torch.tensor([rows["ref_chosen_logps"], rows["ref_rejected_logps"]]).T
    assert trls.std() > 0.5  # the answers really differ: the agreement is not between constants
    torch.testing.assert_close(ours, trls, atol=1e-5, rtol=0)


def test_scores_read_each_token_and_ending_is_one_choice(reference_pass):
    trainer, pairs = reference_pass
    policy, tokenizer = trainer.model, trainer.processing_class
    prompts, answers = list(pairs["prompt"])[:6], texts(pairs, "rejected")[:6]
    batched = generation.score_answers(policy, tokenizer, prompts, answers)
    torch.testing.assert_close(batched.totals(), torch.stack([logp.sum() for logp in batched.logps]))
    assert [s.shape for s in batched.logps] == [(len(generation.answer_ids(tokenizer, a)),) for a in answers]
    assert all((logp <= 0).all() for logp in batched.logps) and all((m >= 0).all() for m in batched.margins)
    merged = generation.score_answers(policy, tokenizer, prompts, answers, merge_stops=True)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    for plain, both, ids in zip(batched.logps, merged.logps, batched.ids, strict=True):
        assert ids[-1] == eot and both[-1] >= plain[-1]  # ending is one choice: either stop token counts
        torch.testing.assert_close(both[:-1], plain[:-1])


def test_log_ratios_of_a_copy_are_exactly_zero_and_of_the_sft_model_are_not(reference_pass):
    trainer, pairs = reference_pass
    policy, tokenizer = trainer.model, trainer.processing_class
    prompts, answers = list(pairs["prompt"]), texts(pairs, "chosen")
    assert generation.log_ratios(policy, tokenizer, prompts, answers, "default", "ref").tolist() == [0.0] * 16
    assert generation.log_ratios(policy, tokenizer, prompts, answers, "default", None).abs().max() > 0.1
    assert generation.implicit_reward_accuracy(policy, tokenizer, pairs, "default", "ref") == 0.0  # no pair ahead


def test_implicit_reward_accuracy_is_the_share_of_pairs_whose_chosen_answer_gained_more(reference_pass):
    trainer, pairs = reference_pass
    policy, tokenizer = trainer.model, trainer.processing_class
    prompts = list(pairs["prompt"])
    margin = generation.log_ratios(policy, tokenizer, prompts, texts(pairs, "chosen"), "default", None)
    margin -= generation.log_ratios(policy, tokenizer, prompts, texts(pairs, "rejected"), "default", None)
    accuracy = generation.implicit_reward_accuracy(policy, tokenizer, pairs, "default", None)
    assert accuracy == (margin > 0).float().mean().item()
    assert generation.implicit_reward_accuracy(policy, tokenizer, pairs, None, "default") == (margin < 0).float().mean()


def test_a_copy_agrees_where_decisive_and_a_changed_model_shows_its_deltas(reference_pass):
    trainer, pairs = reference_pass
    policy, tokenizer = trainer.model, trainer.processing_class
    prompts = list(pairs["prompt"])[:8]
    answers = generation.generate(policy, tokenizer, prompts, 12).texts
    reference = generation.score_answers(policy, tokenizer, prompts, answers, merge_stops=True)
    itself = generation.compare_models(policy, tokenizer, prompts, answers, reference, 12)
    assert itself["max_abs"] == 0.0 and itself["same_greedy"] == 1.0 and generation.agrees_where_decisive(itself)
    assert itself["tokens"] == sum(len(i) for i in reference.ids) and itself["answers"] == answers
    assert generation.describe("copy", itself).startswith("copy: same greedy answer on 100% of the prompts")
    moved = {n: p for n, p in policy.named_parameters() if "lora_B.default." in n}
    saved = {n: p.detach().clone() for n, p in moved.items()}
    try:
        with torch.no_grad():
            for param in moved.values():
                param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)).to(param.dtype))
        changed = generation.compare_models(policy, tokenizer, prompts, answers, reference, 12)
    finally:
        with torch.no_grad():
            for name, param in moved.items():
                param.copy_(saved[name])
    assert changed["max_abs"] > 0 and changed["mean_abs"] > 0 and changed["tokens"] == itself["tokens"]


def test_chat_streams_the_greedy_answer_and_keeps_the_conversation(reference_pass, capsys):
    trainer, _ = reference_pass
    policy, tokenizer = trainer.model, trainer.processing_class
    policy.set_adapter("default")
    chat = generation.Chat(policy, tokenizer, system="You are a helpful assistant.", max_new_tokens=20)
    reply = chat.say("What is 3 + 4?")
    shown = capsys.readouterr().out
    assert shown == f"user: What is 3 + 4?\nassistant: {reply}\n"
    expected = generation.generate(policy, tokenizer, [chat.messages[:2]], 20).texts[0]
    assert reply == expected  # the sampler's greedy answer is generate's
    second = chat.say("And 1 + 1?", echo=False)
    assert capsys.readouterr().out == ""
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == reply and chat.messages[4]["content"] == second
    assert second == generation.generate(policy, tokenizer, [chat.messages[:4]], 20).texts[0]


def test_stream_calls_back_with_pieces_that_make_the_answer(reference_pass):
    trainer, _ = reference_pass
    policy, tokenizer = trainer.model, trainer.processing_class
    pieces = []
    messages = [{"role": "user", "content": "Add 2 and 5."}]
    answer = generation.stream(policy, tokenizer, messages, pieces.append, max_new_tokens=20)
    assert len(pieces) > 1 and "".join(pieces).strip() == answer
    assert answer == generation.generate(policy, tokenizer, [messages], 20).texts[0]
