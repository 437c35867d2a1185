"""helpers.evaluation: reward-model scores are batch-independent and read as TRL reads them, win rates count ties half
(also within the length rule), the reward-model judgement lands in metrics.json, rank correlations and the judges'
agreement, the tables, the benchmark run's batching and records, and (slow) the toy reward model learns the toy
preference and notebook 04's experiments run the settings they name without touching the series' checkpoints."""

import json
import math
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from helpers import data, evaluation, model, plots, rl, training
from helpers.evaluation import BenchmarkPrompt, BenchmarkUnavailable
from helpers.theory import toy_token_logps, trl_batch_loss

# --- win rates ------------------------------------------------------------------------------------------------------


def test_wins_count_wins_and_half_ties():
    assert evaluation.wins([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == [1.0, 0.5, 0.0, 1.0]
    assert evaluation.wins([1.0], [1.0]) == [0.5]


def test_wins_need_paired_scores():
    with pytest.raises(ValueError, match="argument 2 is shorter"):
        evaluation.wins([1.0, 2.0], [1.0])


def test_length_controlled_win_rate_keeps_pairs_of_similar_length_and_counts_ties_half():
    # Similar: the longer at most 1.25 × the shorter (40 vs 50, not 51), or within 4 tokens (4 vs 8, not 9 vs 4).
    # Kept: a win and a tie.
    a, b = [1.0, 1.0, 0.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0, 2.0]
    assert evaluation.length_controlled_win_rate(a, b, [40, 40, 4, 4, 9], [50, 51, 8, 9, 4]) == pytest.approx(0.75)
    assert evaluation.length_controlled_win_rate(a, b, [50, 51, 8, 9, 4], [40, 40, 4, 4, 9]) == pytest.approx(0.75)
    assert evaluation.length_controlled_win_rate([1.0], [0.0], [4], [9]) is None


# --- reward-model scores --------------------------------------------------------------------------------------------


@pytest.fixture
def untrained_reward_model(tmp_profile):
    """The smoke base weights with a fresh scalar head: enough to check how scoring reads a conversation."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = model.apply_chat_template(AutoTokenizer.from_pretrained(tmp_profile.model_id))
    torch.manual_seed(0)
    scorer = LlamaForSequenceClassification.from_pretrained(tmp_profile.model_id, num_labels=1, dtype=torch.float32)
    model.use_neutral_padding(scorer, tokenizer)
    return scorer.eval(), tokenizer


def test_score_does_not_depend_on_batching(untrained_reward_model):
    scorer, tokenizer = untrained_reward_model
    prompts = [[{"role": "user", "content": f"What is {a} + 2?"}] for a in range(5)]
    responses = ["1 + 2 = 3.", "Let me think about this step by step. So the answer is 3.", "", "9.", "3 + 2 = 5."]
    batched = evaluation.score(scorer, tokenizer, prompts, responses, batch_size=16)
    one_by_one = evaluation.score(scorer, tokenizer, prompts, responses, batch_size=1)
    assert len(batched) == 5 and len(set(batched)) > 1
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_score_reads_logits_0_0_of_the_templated_conversation(untrained_reward_model):
    scorer, tokenizer = untrained_reward_model
    messages = [{"role": "user", "content": "Add 4 and 1."}, {"role": "assistant", "content": "4 + 1 = 5."}]
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        expected = scorer(**enc).logits[0][0].item()
    assert evaluation.score(scorer, tokenizer, [messages[:1]], ["4 + 1 = 5."]) == pytest.approx([expected], abs=1e-6)
    assert evaluation.score(scorer, tokenizer, ["Add 4 and 1."], ["4 + 1 = 5."]) == pytest.approx([expected], abs=1e-6)


def test_score_needs_one_response_per_prompt(untrained_reward_model):
    with pytest.raises(ValueError, match="argument 2 is shorter"):
        evaluation.score(*untrained_reward_model, ["a", "b"], ["only one"])


def test_judge_report_gives_accuracy_by_kind_of_rejected_answer(untrained_reward_model):
    scorer, tokenizer = untrained_reward_model
    user = [{"role": "user", "content": "What is 3 + 4?"}]
    answers = ["Answer: 7.", "Answer: 8.", "Let me think about this step by step. So the answer is 7."]
    pairs = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": answers[0]}], "rejected": [rejected]}
        for rejected in ({"role": "assistant", "content": answers[1]}, {"role": "assistant", "content": answers[2]})
    ]
    chosen, rejected = (evaluation.score(scorer, tokenizer, [user, user], a) for a in ([answers[0]] * 2, answers[1:]))
    right = [c > r for c, r in zip(chosen, rejected, strict=True)]
    assert evaluation.judge_report(scorer, tokenizer, pairs, by_style=True) == {
        "accuracy": sum(right) / 2,
        "pairs": 2,
        "accuracy_by_rejected_style": {"concise": float(right[0]), "verbose": float(right[1])},
    }
    assert evaluation.judge_report(scorer, tokenizer, pairs, by_style=False) == {"accuracy": sum(right) / 2, "pairs": 2}


VERBOSE = "Let me think about this step by step. So the answer is 3."
VALUES = {"Answer: 3.": 0.0, VERBOSE: 1.0, "Answer: 4.": 2.0, "Answer: 5.": 3.0, "4": -1.0}  # the fake judge's scores


def test_judge_with_reward_model_records_means_and_win_rates_against_sft(tmp_profile, monkeypatch):
    profile = replace(tmp_profile, eval=replace(tmp_profile.eval, samples_per_prompt=2))
    prompts = [[{"role": "user", "content": f"What is {a} + 2?"}] for a in (1, 2)] * 2  # 2 prompts, asked in turn
    answers = {
        "base": (["4"] * 4, [5] * 4),
        "sft": (["Answer: 3.", VERBOSE] * 2, [5] * 4),  # scores 0, 1, 0, 1
        "dpo": (["Answer: 4.", VERBOSE, "Answer: 3.", "Answer: 5."], [5, 6, 5, 50]),  # 2, 1, 0, 3: the last is long
    }
    responses = {
        n: {"responses": r, "lengths": n_tokens, "stopped": [True] * 4} for n, (r, n_tokens) in answers.items()
    }
    training.write_json_atomically(profile.output_dir / "responses.json", {"prompts": prompts} | responses)
    training.update_metrics(profile, eval={"dpo": {"better_answer_rate": 0.7}, "dpo_vs_sft_reward_accuracy": 0.9})
    monkeypatch.setattr(data, "read_split", lambda profile, name: [])
    monkeypatch.setattr(evaluation, "judge_report", lambda *args: {"accuracy": 0.75, "pairs": 4})
    monkeypatch.setattr(evaluation, "score", lambda rm, tok, p, texts: [VALUES[t] for t in texts])

    judged = evaluation.judge_with_reward_model(profile, None, None)
    assert judged == training.read_metrics(profile)["eval"]
    assert judged["reward_model"] == {"accuracy": 0.75, "pairs": 4} and judged["dpo_vs_sft_reward_accuracy"] == 0.9
    # DPO wins 1, ties 2, wins 1: 0.75; each prompt's two answers average 0.75, so resampling prompts never moves it.
    assert judged["dpo"] == {
        "better_answer_rate": 0.7,
        "reward_model_score_mean": 1.5,
        "win_rate_vs_sft": 0.75,
        "win_rate_vs_sft_ci": [0.75, 0.75],
        "win_rate_vs_sft_length_controlled": pytest.approx(2 / 3),  # the 50-token answer's win is left out
    }
    assert judged["sft"]["win_rate_vs_sft"] == 0.5 and judged["sft"]["reward_model_score_mean"] == 0.5  # all ties
    assert judged["base"]["win_rate_vs_sft"] == 0.0 and judged["base"]["reward_model_score_mean"] == -1.0
    assert evaluation.scores_by_style(profile) == {
        "base": {"other": -1.0},
        "sft": {"concise": 0.0, "verbose": 1.0},
        "dpo": {"concise": pytest.approx(5 / 3), "verbose": 1.0},
    }


def test_loading_the_toy_reward_model_trains_it_first_and_a_published_one_never(tmp_profile, monkeypatch):
    trained = []
    monkeypatch.setattr(training, "ensure", lambda profile, name: trained.append(name))
    monkeypatch.setattr(model, "load_reward_model", lambda profile: ("judge", "its tokenizer"))
    assert rl.load_reward_model(tmp_profile) == ("judge", "its tokenizer") and trained == ["reward"]
    rl.load_reward_model(replace(tmp_profile, reward_model_id="acme/reward-3b"))
    assert trained == ["reward"]


@pytest.mark.slow
def test_toy_reward_model_ranks_held_out_pairs(tmp_profile, capsys):
    profile = replace(tmp_profile, reward=replace(tmp_profile.reward, num_train_epochs=1))
    stage = training.build_reward(profile)
    training.train_and_save(stage)
    result = training.record_reward(stage)
    assert result["loss_last"] < result["loss_first"]
    held_out = data.read_split(profile, "eval")
    report = evaluation.judge_report(stage.model.eval(), stage.tokenizer, held_out, by_style=True)
    # Most rejected answers are verbose (easy); the others are concise but wrong, hard for so small a model.
    assert report["accuracy"] >= profile.expect.reward_model_accuracy_min, report
    capsys.readouterr()
    loaded, loaded_tokenizer = rl.load_reward_model(profile)  # the saved copy, current: not retrained
    assert "training it first" not in capsys.readouterr().out
    some = held_out[:8]
    prompts, answers = [p["prompt"] for p in some], [p["chosen"][-1]["content"] for p in some]
    assert evaluation.score(loaded, loaded_tokenizer, prompts, answers) == pytest.approx(
        evaluation.score(stage.model, stage.tokenizer, prompts, answers), abs=1e-5
    )


# --- do the judges agree? -------------------------------------------------------------------------------------------


def test_spearman_ranks_with_mean_ranks_for_ties():
    assert evaluation.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # any increasing relation
    assert evaluation.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks 0, 1.5, 1.5, 3 against 0, 1, 2, 3: covariance 4.5, variances 4.5 and 5
    assert evaluation.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert math.isnan(evaluation.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(evaluation.spearman([1, 2], [0, 0]))


def test_agreement_orders_the_models_and_correlates_the_judges_over_models_and_answers():
    per_model = {
        "code": {"base": 0.1, "sft": 0.4, "dpo": 0.9},
        "reward model": {"base": -1.0, "sft": 2.0, "dpo": 1.0, "rl": 3.0},
    }
    per_answer = {"code vs reward model": {"code": [0, 1, 1, 0], "reward model": [0.1, 0.5, 0.7, 0.2]}}
    assert evaluation.agreement(per_model, per_answer) == {
        "orders": {"code": ["dpo", "sft", "base"], "reward model": ["rl", "sft", "dpo", "base"]},
        # over base, sft, dpo (rl is judged by one only): ranks 0 1 2 against 0 2 1
        "rank_correlation_over_models": {"code vs reward model": pytest.approx(0.5)},
        # ranks 0.5 2.5 2.5 0.5 against 0 2 3 1
        "rank_correlation_over_answers": {"code vs reward model": pytest.approx(2 / math.sqrt(5))},
    }


# --- tables ---------------------------------------------------------------------------------------------------------


def test_eval_table_has_a_row_a_model_and_a_column_a_number_with_its_interval():
    table = evaluation.eval_table(
        {
            "dpo": {"better_answer_rate": 0.9, "better_answer_rate_ci": [0.8, 0.95], "stopped_share": 1.0},
            "base": {"better_answer_rate": 0.0001, "style_shares": {"concise": 0.5}, "stopped_share": None},
            "dpo_vs_sft_reward_accuracy": 0.9,
        }
    ).splitlines()
    assert table[0] == "| model | better_answer_rate | stopped_share |"
    assert table[2:] == ["| base | 0.0001 | – |", "| dpo | 0.900 [0.800, 0.950] | 1.000 |"]


def test_side_by_side_keeps_each_answer_in_its_cell(tmp_profile):
    samples = {"prompts": [[{"role": "user", "content": "What is 1 + 2?"}]], "sft": ["a | b\nc"], "base": [""]}
    training.write_json_atomically(tmp_profile.output_dir / "samples.json", samples)
    assert evaluation.side_by_side(tmp_profile).splitlines()[::2] == [
        "| prompt | base | sft |",
        "| What is 1 + 2? | *(empty)* | a \\| b<br>c |",
    ]


def test_eval_failures_name_each_promise_not_kept(tmp_profile):
    rates = {"base": 0.1, "sft": 0.4, "dpo": 0.9}
    good = {m: {"better_answer_rate": r} for m, r in rates.items()} | {"reward_model": {"accuracy": 0.9}}
    assert evaluation.eval_failures(tmp_profile, good) == []
    bad = good | {"base": {"better_answer_rate": 0.5}, "reward_model": {"accuracy": 0.6}}
    failures = evaluation.eval_failures(tmp_profile, bad)
    assert [f.split(" ")[0] for f in failures] == ["better-answer", "reward-model"] and "base 0.500" in failures[0]


# --- the benchmark run ------------------------------------------------------------------------------------------------


def test_token_batches_are_consecutive_full_and_within_the_budget():
    assert evaluation.token_batches([1, 2, 2, 3, 5, 9, 20], 10) == [slice(0, 3), slice(3, 5), slice(5, 6), slice(6, 7)]
    assert evaluation.token_batches([], 10) == []
    sizes = sorted(random.Random(0).randint(1, 60) for _ in range(200))
    batches = evaluation.token_batches(sizes, 100)
    assert [b.start for b in batches] == [0] + [b.stop for b in batches[:-1]] and batches[-1].stop == len(sizes)
    for b in batches:
        rows = b.stop - b.start
        assert rows * sizes[b.stop - 1] <= 100 or rows == 1  # a row over the budget goes alone
        assert b.stop == len(sizes) or (rows + 1) * sizes[b.stop] > 100  # the next row would not have fit


NO_SPACE = (("format:no_whitespace",), ({},))
FOLLOWS_ONE, FOLLOWS_NONE = "Yes.Everysetisaclass.", "Yes, every set is a class."


@pytest.fixture
def benchmark_prompts() -> list[BenchmarkPrompt]:
    """Three prompts whose length (in words, the fake tokenizer's tokens) is 20, 3 and 21: the last is too long for a
    context of 60 with 40 new tokens. The answer in FOLLOWS_ONE has no whitespace and far fewer than 71 words."""
    prompts = [
        BenchmarkPrompt(
            "a", " ".join(["Are all sets classes?"] + ["Answer"] * 14 + ["without whitespace."]), *NO_SPACE
        ),
        BenchmarkPrompt(
            "b", "Summarise Seneca briefly.", ("count:word_count_range",), ({"min_words": 71, "max_words": 73},)
        ),
        BenchmarkPrompt("c", "word " * 21, *NO_SPACE),
    ]
    try:
        evaluation.check_instructions(prompts[0], FOLLOWS_ONE)
    except BenchmarkUnavailable as err:
        pytest.skip(str(err))
    return prompts


def test_run_benchmark_answers_the_prompts_that_fit_shortest_first_and_records_them(
    tmp_profile, benchmark_prompts, monkeypatch, capsys
):
    profile = replace(tmp_profile, eval=replace(tmp_profile.eval, benchmark="ifeval", bootstrap_samples=50))
    loaded, calls = [], []

    def load_benchmark(name, limit, seed):
        loaded.append((name, limit, seed))
        if name == "ifeval":
            raise BenchmarkUnavailable("no hub here")
        return benchmark_prompts

    def generate(policy, tokenizer, prompts, max_new_tokens, *args, adapter=None, **kwargs):
        calls.append(([p[-1]["content"].split()[0] for p in prompts], max_new_tokens, adapter))
        return SimpleNamespace(texts=[FOLLOWS_ONE if adapter == "sft" else FOLLOWS_NONE] * len(prompts))

    monkeypatch.setattr(evaluation, "load_benchmark", load_benchmark)
    monkeypatch.setattr(evaluation.generation, "generate", generate)
    monkeypatch.setattr(evaluation, "BENCHMARK_BATCH_TOKENS", 50)  # 3 + 40 and 20 + 40 tokens: one prompt a batch
    policy = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=60))  # room for 20 prompt tokens
    words = SimpleNamespace(apply_chat_template=lambda chat, **kwargs: {"input_ids": chat[-1]["content"].split()})

    result = evaluation.run_benchmark(profile, policy, words, ["base", "sft"])
    assert "scoring IFBench's bundled prompts instead" in capsys.readouterr().out
    assert loaded == [("ifeval", 60, profile.seed), ("ifbench", 60, profile.seed)]
    assert calls == [(["Summarise"], 40, None), (["Are"], 40, None), (["Summarise"], 40, "sft"), (["Are"], 40, "sft")]
    assert result == training.read_metrics(profile)["benchmark"]
    assert {k: result[k] for k in ("name", "prompts", "too_long", "skipped")} == {
        "name": "ifbench",
        "prompts": 2,
        "too_long": 1,
        "skipped": {},
    }
    base, sft = result["models"]["base"], result["models"]["sft"]
    assert (base["prompt_strict"], base["prompt_loose"], sft["prompt_strict"], sft["prompt_loose"]) == (0, 0, 0.5, 0.5)
    assert sft["instruction_strict"] == 0.5 and len(sft["ci"]) == len(sft["ci_loose"]) == 2
    assert sft["ci"][0] <= 0.5 <= sft["ci"][1] and base["ci"] == [0.0, 0.0]
    answers = json.loads((profile.output_dir / "benchmark-answers.json").read_text())
    assert answers["prompts"] == [evaluation.benchmark_chat(p) for p in benchmark_prompts[1::-1]]
    assert answers["instructions"] == [["count:word_count_range"], ["format:no_whitespace"]]
    assert answers["sft"] == {"responses": [FOLLOWS_ONE] * 2, "followed": [False, True]}
    assert answers["base"] == {"responses": [FOLLOWS_NONE] * 2, "followed": [False, False]}


# --- notebook 04's experiments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", evaluation.LOSS_TYPES.values(), ids=evaluation.LOSS_TYPES)
def test_every_compared_loss_type_runs_in_trl(loss_type):
    chosen, chosen_mask = toy_token_logps(4, seed=0)
    rejected, rejected_mask = toy_token_logps(4, seed=1)
    loss, _ = trl_batch_loss(
        chosen, chosen_mask, rejected, rejected_mask, torch.zeros(4), torch.zeros(4), 0.1, loss_type
    )
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_run_variant_trains_the_settings_it_names_and_measures_them(tmp_profile, sft_like_policy, monkeypatch):
    profile = replace(tmp_profile, eval=replace(tmp_profile.eval, num_prompts=4, samples_per_prompt=2))
    policy, tokenizer = sft_like_policy(profile)
    training.save_result(policy, tokenizer, profile.adapter_dir("sft"), training.stage_key(profile, "sft"))
    pairs = data.preference_data(profile, tokenizer)
    pairs = data.Splits({"dpo-train": pairs.train, "eval": pairs.eval.select(range(16))}, pairs.report, [])
    built = []

    class Recording(training.ProjectDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.args)

    monkeypatch.setattr(training, "ProjectDPOTrainer", Recording)
    rows = [evaluation.run_variant(profile, pairs, f"β={b:g}", 2, beta=b, loss_type=("sigmoid",)) for b in (0.1, 2.0)]

    assert [(a.beta, tuple(a.loss_type), a.max_steps) for a in built] == [
        (0.1, ("sigmoid",), 2),
        (2.0, ("sigmoid",), 2),
    ]
    assert all(not a.output_dir.startswith(str(profile.output_dir)) and a.report_to == [] for a in built)
    assert not profile.checkpoint_dir("dpo").exists() and not profile.adapter_dir("dpo").exists()
    assert [r["label"] for r in rows] == ["β=0.1", "β=2"]
    for row in rows:
        assert 0 <= row["reward_accuracy"] <= 1 and 0 <= row["better_answer_rate"] <= 1
        assert 0 < row["mean_answer_tokens"] <= profile.eval.max_new_tokens and 0 <= row["stopped_share"] <= 1
        assert math.isfinite(row["kl_nats"]) and math.isfinite(row["train_loss_last"])
    plotted = plots.plot_experiment(rows, "β sweep")
    assert [ax.get_xlabel()[:2] for ax in plotted.axes[:2]] == ["KL", "me"]
    table = evaluation.format_rows(rows).splitlines()
    assert "accuracy" in table[0] and [line.split()[0] for line in table[1:]] == ["β=0.1", "β=2"]
