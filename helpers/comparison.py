"""The models side by side on held-out prompts: sampled answers, the code judge, DPO's implicit rewards and a
reward model's verdict, each rate with a bootstrap confidence interval. Notebooks 05 and 06 call these.

Models are adapters on one 4-bit base (`None` = adapters off = the base model), so comparing four models costs
the memory of one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from helpers import evaluate, pipeline, reward
from helpers.checkpoints import is_current
from helpers.config import MODELS, Profile
from helpers.metrics import merge_model_metrics, update_metrics, write_json_atomically
from helpers.model import load_adapter, load_base
from helpers.splits import read_split

ADAPTERS = {"base": None, "sft": "sft", "dpo": "dpo", "rl": "rl"}


def trained_models(profile: Profile) -> list[str]:
    """The models to compare: base, SFT, DPO, and the RL model once notebook 06 has trained it."""
    return [m for m in MODELS if m != "rl" or is_current(profile.rl_adapter_dir, profile, "rl")]


def load_for_evaluation(profile: Profile, names: Sequence[str]) -> tuple[Any, Any]:
    """One 4-bit base with the adapters of `names` loaded under those names (adapters off = base)."""
    model, tokenizer = load_base(profile, max(profile.sft.max_length, profile.dpo.max_length))
    for name in names:
        if ADAPTERS[name] is not None:
            model = load_adapter(model, profile.output_dir / f"{name}-adapter", trainable=False, adapter_name=name)
    model.eval()
    return model, tokenizer


def sampler(model: Any, tokenizer: Any):
    """How the models answer: on a GPU `helpers.sampling.Sampler` (a merged bf16 copy, static cache, CUDA graph:
    4,636 new tokens/s at batch 64 on an H200 against 378 for `generate`, benchmarks/results/h200-sampling.json);
    on a CPU `evaluate.generate`. Returns `sample(prompts, max_new_tokens, sample, temperature, seed, adapter, desc)`.
    """
    if evaluate.model_device(model).type != "cuda":
        return lambda prompts, n, do_sample, t, seed, adapter, desc: evaluate.generate(
            model, tokenizer, prompts, n, do_sample, t, seed, 16, adapter, desc
        )
    from helpers.sampling import Sampler

    fast = Sampler(model, tokenizer, mode="auto")
    return lambda prompts, n, do_sample, t, seed, adapter, desc: fast.generate(
        prompts, n, do_sample, temperature=t, seed=seed, batch_size=64, adapter=adapter
    )


def per_prompt_means(values: Sequence[float], n_prompts: int) -> list[float]:
    """The mean of each prompt's answers (the unit a confidence interval resamples)."""
    groups: dict[int, list[float]] = {}
    for i, v in enumerate(values):
        groups.setdefault(i % n_prompts, []).append(float(v))
    return [sum(g) / len(g) for g in groups.values()]


def rate_with_interval(profile: Profile, values: Sequence[float], n_prompts: int) -> dict[str, float]:
    """The mean of `values` and its 95% bootstrap interval, resampling prompts (answers to one prompt go
    together, since they are not independent)."""
    low, high = evaluate.bootstrap_interval(
        per_prompt_means(values, n_prompts), profile.eval.bootstrap_samples, profile.seed
    )
    return {"mean": sum(values) / len(values), "low": low, "high": high}


def describe_answers(profile: Profile, prompts: list, gens: evaluate.Generations, n_prompts: int) -> dict:
    """Per model: length, the share that ended by itself, and with a code judge the better-answer rate (with its
    interval), the share of each answer style and the correct share among concise answers."""
    result = {
        "mean_response_tokens": sum(gens.num_tokens) / len(gens.num_tokens),
        "stopped_share": gens.stopped_share(),
    }
    if not profile.code_judge:
        return result
    from helpers.smoke import answer_style, is_better_answer

    better = [is_better_answer(p[-1]["content"], r) for p, r in zip(prompts, gens.texts, strict=True)]
    rate = rate_with_interval(profile, better, n_prompts)
    styles = Counter(answer_style(r) for r in gens.texts)
    concise = [b for b, r in zip(better, gens.texts, strict=True) if answer_style(r) == "concise"]
    return result | {
        "better_answer_rate": rate["mean"],
        "better_answer_rate_ci": [rate["low"], rate["high"]],
        "style_shares": {s: styles[s] / len(gens.texts) for s in ("concise", "verbose", "other")},
        "correct_among_concise": sum(concise) / len(concise) if concise else None,
    }


def sample_and_judge(profile: Profile) -> dict:
    """Sample answers of every trained model to the same held-out prompts and judge them; record under `eval`.

    Writes `responses.json` (every answer) and `samples.json` (the first few, side by side). Also records DPO's
    implicit-reward accuracy on the held-out pairs with the SFT model as reference.
    """
    pipeline.ensure_adapter(profile, "dpo")
    names = trained_models(profile)
    model, tokenizer = load_for_evaluation(profile, names)
    pairs = pipeline.preference_data(profile, tokenizer).eval
    prompts = list(pairs["prompt"])[: profile.eval.num_prompts]
    s = profile.eval
    sampled = prompts * s.samples_per_prompt
    results, everything = {}, {"prompts": sampled}
    sample = sampler(model, tokenizer)
    for name in names:
        gens = sample(sampled, s.max_new_tokens, True, s.temperature, profile.seed, ADAPTERS[name], name)
        results[name] = describe_answers(profile, sampled, gens, len(prompts))
        everything[name] = {"responses": gens.texts, "lengths": gens.num_tokens, "stopped": gens.stopped}
    chosen, rejected = evaluate.implicit_rewards(model, tokenizer, pairs, profile.dpo.beta, "dpo", "sft")
    results["dpo_vs_sft_reward_accuracy"] = evaluate.reward_accuracy(chosen, rejected)
    write_json_atomically(responses_path(profile), everything)
    side = {name: everything[name]["responses"][: s.num_side_by_side] for name in names}
    write_json_atomically(profile.output_dir / "samples.json", {"prompts": sampled[: s.num_side_by_side]} | side)
    update_metrics(profile, eval=results)
    return results


def responses_path(profile: Profile) -> Path:
    return profile.output_dir / "responses.json"


def base_answer_path(profile: Profile) -> Path:
    """Where notebook 02 keeps the base model's greedy answer, which 05 reproduces."""
    return profile.output_dir / "base-answer.json"


def scores_by_style(profile: Profile) -> dict[str, dict[str, float]]:
    """Per model, the mean reward-model score of its answers of each style (smoke task: concise/verbose/other)."""
    from helpers.smoke import answer_style

    scores = json.loads((profile.output_dir / "reward-scores.json").read_text())
    responses = read_responses(profile)
    result = {}
    for name, values in scores.items():
        groups: dict[str, list[float]] = {}
        for text, value in zip(responses[name]["responses"], values, strict=True):
            groups.setdefault(answer_style(text), []).append(value)
        result[name] = {style: sum(v) / len(v) for style, v in sorted(groups.items())}
    return result


def read_responses(profile: Profile) -> dict:
    """Every answer `sample_and_judge` sampled: `{"prompts": [...], name: {"responses", "lengths", "stopped"}}`.

    Raises:
        FileNotFoundError: `sample_and_judge` has not run for this profile.
    """
    path = responses_path(profile)
    if not path.exists():
        raise FileNotFoundError(f"No {path.name} in {path.parent}: run comparison.sample_and_judge first.")
    return json.loads(path.read_text())


def judge_with_reward_model(profile: Profile) -> dict:
    """Score every sampled answer with the reward model; record its held-out accuracy, each model's mean score
    and win rate against SFT (with intervals) under `eval`, and return that section.

    The smoke profile's toy reward model trains on the `reward-train` pairs, which DPO never sees; the held-out
    pairs are the ones every model is judged on.
    """
    rm, rm_tokenizer = reward.ensure_reward_model(profile, reward_pairs(profile))
    held_out = read_split(profile, "eval")[: profile.eval.num_prompts]
    judged = {"reward_model": reward.judge_report(rm, rm_tokenizer, held_out, profile.code_judge)}
    responses = read_responses(profile)
    names = [n for n in MODELS if n in responses]
    n_prompts = len(responses["prompts"]) // profile.eval.samples_per_prompt
    scores = {n: reward.score(rm, rm_tokenizer, responses["prompts"], responses[n]["responses"]) for n in names}
    judged |= reward.summarize(scores, baseline="sft")
    for name, values in scores.items():
        interval = rate_with_interval(profile, reward.wins(values, scores["sft"]), n_prompts)
        judged[name]["win_rate_vs_sft_ci"] = [interval["low"], interval["high"]]
    write_json_atomically(profile.output_dir / "reward-scores.json", scores)
    return merge_model_metrics(profile, "eval", judged)


def reward_pairs(profile: Profile) -> Any:
    """The toy reward model's own training pairs (None for a published reward model)."""
    if profile.reward_model_id is not None:
        return None
    from helpers.data import to_dataset

    return to_dataset(read_split(profile, "reward-train"))


def side_by_side(profile: Profile) -> str:
    """A markdown table of the first held-out prompts with each model's sampled answer (from samples.json)."""
    samples = json.loads((profile.output_dir / "samples.json").read_text())
    names = [n for n in MODELS if n in samples]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"

    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, prompt in enumerate(samples["prompts"]):
        lines.append(f"| {cell(prompt[-1]['content'])} | " + " | ".join(cell(samples[n][i]) for n in names) + " |")
    return "\n".join(lines)


def run_eval(profile: Profile) -> dict:
    """The whole comparison: `sample_and_judge`, then `judge_with_reward_model`; returns the `eval` section."""
    sample_and_judge(profile)
    return judge_with_reward_model(profile)
