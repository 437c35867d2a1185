"""The data: read the SFT and preference datasets (a hub id, or a local JSON lines, JSON, Parquet or CSV file in the
same schema), check every row, turn rows into TRL's conversational format, and split them by *problem*. A bad row is
dropped and counted with its 1-based line and reason, never silently; with no usable row, a `DataError` says why
(`python -m helpers.data check --kind sft|preference SOURCE` prints the same report).

**Held out means unseen.** Each user turn has a problem key (`DataSettings.heldout_key`): its whitespace-normalised,
case-folded text ("text"), or in the smoke world the two numbers of the sum in any wording or order ("sum"). A problem
is held out when its seeded position in [0, 1) falls below `eval_fraction`, so SFT and preference data hold out the
same problems. A "text" key's position is its hash; the smoke world's 55 problems are ranked by hash and spread
evenly, so `eval_fraction` 0.2 holds out exactly 11 for every seed (a plain hash: 3 to 20). `overlap_report` re-reads
the splits each run writes (`outputs/<profile>/splits/`) and counts what evaluation shares with training (all zeros).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from accelerate import PartialState

from helpers.settings import END_HEADER, END_OF_TEXT, EOM, EOT, LLAMA3_SPECIAL_TOKENS, START_HEADER, Profile
from helpers.smoke import TOY_PROBLEMS, problem_key

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
TOXIC_SOURCES = ("toxic-dpo-v0.2",)  # orpo-dpo-mix-40k's card asks to drop these rows
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SPECIAL_TOKEN_TEXT = "literal special token"
EMPTY_SYSTEM_TURN = "empty system turn removed"
# The reason a dropped row is counted under: the first of these its problem names. "unknown role" comes first: that
# message quotes the role it found, which could be any text.
REASONS = ("unknown role", SPECIAL_TOKEN_TEXT, "is empty", "identical", "does not end with an assistant turn")
REASONS += ("no user turn", "do not share", "non-empty list of messages", "not an object")
SCHEMAS = {  # what a row of each kind needs (the message when no row is usable)
    "sft": "an SFT row needs 'conversations' (a list of {from, value} with from in human/gpt/system), as in "
    "mlabonne/FineTome-100k, or 'messages' (a list of {role, content})",
    "preference": "a preference row needs 'chosen' and 'rejected', each a list of {role, content} ending with the "
    "assistant's answer, as in mlabonne/orpo-dpo-mix-40k",
}
TRAIN_SPLITS = ("sft-train", "dpo-train", "reward-train", "rl-train")
_SPECIAL = frozenset(LLAMA3_SPECIAL_TOKENS)
_SPECIAL_SHAPE = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class DataError(ValueError):
    """A dataset that cannot be used, with a message saying where and what to do."""


# By hand, not with `datasets`' loaders: those merge all rows into one schema (a row missing a column gets None, a row
# that is not an object stops the load) and name no line when a row does not parse.
def read_records(source: str) -> list[tuple[int, Any]]:
    """A dataset's rows as `(line, record)`: the 1-based line (JSON lines, CSV) or row number. A DataError names the
    file (and line) when it is missing or does not parse."""
    path, suffix = Path(source), Path(source).suffix.lower()
    if suffix not in LOCAL_SUFFIXES and not path.exists():
        return list(enumerate(datasets.load_dataset(source, split="train"), start=1))  # a hub id: needs the network
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise DataError(f"{source}: {what}. Give one {', '.join(LOCAL_SUFFIXES)} file, or a hub id.")
    if suffix == ".jsonl":  # bytes, so that a line that is not UTF-8 is named too
        lines = enumerate(path.read_bytes().split(b"\n"), start=1)
        return [(n, _parse_json(path, line, n)) for n, line in lines if line.strip()]
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix != ".parquet":
        raise DataError(f"{source}: unknown file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}.")
    try:
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    except Exception as e:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from None


def _not_utf8(error: UnicodeDecodeError) -> tuple[int, str]:
    """The line (from 1, in the bytes decoded) of a decoding error, and the problem."""
    problem = f"not UTF-8 text: byte {error.object[error.start]:#04x} at offset {error.start}"
    return error.object[: error.start].count(b"\n") + 1, problem


def _parse_json(path: Path, text: bytes, first_line: int = 1) -> Any:
    """`text` (from the file's `first_line` on) as JSON; a DataError naming the line where it does not parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line, problem = e.lineno, f"{e.msg} at column {e.colno}"
    except UnicodeDecodeError as e:
        line, problem = _not_utf8(e)
    raise DataError(f"{path}:{first_line + line - 1}: not valid JSON ({problem}). Fix or delete that line.")


def _read_json(path: Path) -> list[tuple[int, Any]]:
    rows = _parse_json(path, path.read_bytes())
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSON lines), got a JSON {type(rows).__name__}.")
    return list(enumerate(rows, start=1))


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    """CSV rows, each with the line it starts on (line 1 is the header); cells holding JSON are decoded."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, problem = _not_utf8(e)
        raise DataError(f"{path}:{line}: {problem}. Save the file as UTF-8.") from None
    reader, records, start = csv.DictReader(io.StringIO(text, newline="")), [], 1
    try:
        start = reader.line_num + 1 if reader.fieldnames else 1  # the header read first (none in an empty file)
        for row in reader:
            records.append((start, {k: _json_cell(v) for k, v in row.items()}))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: not valid CSV ({e}). Fix or delete that row.") from None
    return records


def _json_cell(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip()[:1] in "[{":
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(value)
    return value


def find_special_token(text: str) -> str | None:
    """The first Llama 3 special token written out as literal text in `text`, or None. A Hugging Face tokenizer turns
    such text into the control token (Meta's reference encoder keeps it as text), so a `<|eot_id|>` inside an answer
    would teach the model to end its turn there. Exact and case-sensitive, as the tokenizer is."""
    return next((m.group() for m in _SPECIAL_SHAPE.finditer(text) if m.group() in _SPECIAL), None)


def _effect(token: str, role: str) -> str:
    if role == "assistant" and token in (EOT, EOM, END_OF_TEXT):
        return "the model would learn to stop mid-answer"
    if token in (START_HEADER, END_HEADER, EOT, EOM):
        return "it would fake a turn boundary inside the message"
    return "the model would read a control token where the text has characters"


def to_messages(turns: Any, column: str, changes: list[tuple[str, str]] | None = None) -> list[dict[str, str]]:
    """Messages `{role, content}` from ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) turns; a ValueError
    unless a non-empty list of known roles with text. An empty system turn is left out (noted in `changes`); special-
    token text drops the row rather than being escaped, so the text the model learns is never altered silently."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{column}' must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"'{column}' message {i} is not an object with a role and a text")
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"'{column}' message {i} has unknown role {role!r} (known: {', '.join(ROLES)})")
        role = ROLES[role]
        if role == "system" and (content is None or (isinstance(content, str) and not content.strip())):
            if changes is not None:
                changes.append((EMPTY_SYSTEM_TURN, f"'{column}' message {i}"))
            continue
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"'{column}' message {i} ({role}) is empty")
        if token := find_special_token(content):
            raise ValueError(
                f"'{column}' message {i} ({role}) contains the literal special token {token!r}: it would become a "
                f"control token ({_effect(token, role)}); remove or escape it"
            )
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError(f"'{column}' is empty apart from empty system turns")
    return messages


def _check_conversation(messages: list[dict[str, str]], column: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"'{column}' does not end with an assistant turn (last role: {messages[-1]['role']})")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"'{column}' has no user turn")


def sft_example(record: dict, changes: list[tuple[str, str]] | None = None) -> dict:
    """A TRL conversational SFT example `{"messages": [...]}` from a FineTome-style row."""
    column = "conversations" if "conversations" in record else "messages"
    if column not in record:
        raise KeyError("missing column 'conversations' (ShareGPT from/value turns) or 'messages'")
    messages = to_messages(record[column], column, changes)
    _check_conversation(messages, column)
    return {"messages": messages}


def preference_example(record: dict, changes: list[tuple[str, str]] | None = None) -> dict:
    """A TRL conversational preference example `{"prompt", "chosen", "rejected"}` (all message lists). The turns before
    the final answer become the prompt. orpo-dpo-mix-40k's string `prompt` column is not passed on: TRL decides whether
    a dataset is conversational from one arbitrary column, and a string beside message lists makes that a coin toss."""
    for column in ("chosen", "rejected"):
        if column not in record:
            raise KeyError(f"missing column '{column}'")
    chosen, rejected = (to_messages(record[c], c, changes) for c in ("chosen", "rejected"))
    if isinstance(record.get("prompt"), list):  # explicit-prompt format: prompt messages + one answer each
        prompt = to_messages(record["prompt"], "prompt", changes)
        chosen, rejected = prompt + chosen, prompt + rejected
    _check_conversation(chosen, "chosen")
    _check_conversation(rejected, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("'chosen' and 'rejected' do not share the same conversation before the last answer")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise ValueError("chosen is identical to rejected: the pair teaches nothing")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


@dataclass
class LoadReport:
    """What loading a dataset kept, changed and dropped, and why (with line numbers)."""

    source: str
    kind: str
    rows_read: int = 0
    rows_usable: int = 0
    dropped: Counter = field(default_factory=Counter)
    problems: list[tuple[int, str]] = field(default_factory=list)
    modified: Counter = field(default_factory=Counter)
    changes: list[tuple[int, str]] = field(default_factory=list)

    def summary(self, max_problems: int | None = 20) -> str:
        """Counts, reasons, and the first `max_problems` problems and changes with their lines (None: all)."""
        lines = [f"{self.source} ({self.kind}): {self.rows_read} rows read, {self.rows_usable} usable"]
        lines += [f"  dropped {n} × {reason}" for reason, n in self.dropped.most_common()]
        lines += [f"  modified {n} × {reason} (rows kept)" for reason, n in self.modified.most_common()]
        if SPECIAL_TOKEN_TEXT in self.dropped:
            lines.append("  note: rows holding special-token text are dropped, not escaped: fix them in the file")
        for entries, what in ((self.problems, "problems"), (self.changes, "changes")):
            shown = entries[:max_problems]
            lines += [f"  line {line}: {text}" for line, text in shown]
            if len(entries) > len(shown):
                lines.append(f"  … and {len(entries) - len(shown)} more {what}")
        return "\n".join(lines)


def load_examples(source: str, kind: str) -> tuple[list[dict], LoadReport]:
    """The usable examples of a dataset of `kind` ('sft' or 'preference') and the report; a DataError if none."""
    records = read_records(source)
    if not records:
        raise DataError(f"{source}: no rows (the file is empty). {SCHEMAS[kind].capitalize()}.")
    build, report, examples = (sft_example if kind == "sft" else preference_example), LoadReport(source, kind), []
    report.rows_read = len(records)
    for line, record in records:
        if not isinstance(record, dict):
            report.dropped["not an object"] += 1
            report.problems.append((line, "the row is not a JSON object"))
            continue
        if kind == "preference" and record.get("source") in TOXIC_SOURCES:
            report.dropped[f"source {record['source']} (dropped as the dataset card asks)"] += 1
            continue
        changes: list[tuple[str, str]] = []
        try:
            examples.append(build(record, changes))
        except (KeyError, ValueError) as e:
            problem = e.args[0]
            reason = next((r for r in REASONS if r in problem), "invalid row")
            report.dropped["missing column" if isinstance(e, KeyError) else reason] += 1
            report.problems.append((line, problem))
            continue
        for reason in dict.fromkeys(r for r, _ in changes):  # a row counts once per kind of change
            report.modified[reason] += 1
            report.changes.append((line, f"{reason}: {', '.join(p for r, p in changes if r == reason)}; row kept"))
    report.rows_usable = len(examples)
    if not examples:
        raise DataError(f"No usable rows: {SCHEMAS[kind]}.\n{report.summary()}")
    return examples, report


def load_dataset(source: str, kind: str) -> tuple[Any, LoadReport]:
    """`load_examples` as a `datasets.Dataset`: `{"messages"}` rows (SFT) or `{"prompt", "chosen", "rejected"}`."""
    examples, report = load_examples(source, kind)
    return datasets.Dataset.from_list(examples), report


def count_tokens(messages: list[dict], tokenizer: Any, add_generation_prompt: bool = False) -> int:
    """Tokens in `messages` rendered with the chat template."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=True)
    return len(rendered["input_ids"])


def example_length(example: dict, tokenizer: Any) -> int:
    """Tokens in an example's longest rendering: the conversation, or the prompt with the longer answer."""
    if "messages" in example:
        return count_tokens(example["messages"], tokenizer)
    return max(count_tokens(example["prompt"] + example[k], tokenizer) for k in ("chosen", "rejected"))


def filter_by_length(dataset: Any, tokenizer: Any, max_length: int, label: str) -> tuple[Any, str]:
    """Drop examples longer than `max_length` tokens (a cut answer would teach stopping mid-sentence): the kept
    dataset and a line saying how many went (a DataError when none is left)."""
    lengths = [example_length(ex, tokenizer) for ex in dataset]
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    if not keep:
        raise DataError(
            f"{label}: all {len(dataset)} examples are longer than max_length={max_length} tokens (shortest: "
            f"{min(lengths)}). Raise max_length or use shorter data."
        )
    removed = f"removed {len(dataset) - len(keep)} longer than {max_length} tokens (longest was {max(lengths)})"
    return dataset.select(keep), f"{label}: kept {len(keep)} of {len(dataset)}; {removed}"


def loss_token_spans(example: dict, tokenizer: Any) -> list[str]:
    """The decoded stretches of a tokenized SFT example its loss is computed on (labels not -100): with the loss on
    assistant tokens only, exactly the assistant turns, each with its `<|eot_id|>`."""
    tokens = zip(example["input_ids"], example["labels"], strict=True)
    runs = itertools.groupby(tokens, key=lambda token: token[1] != -100)
    return [tokenizer.decode([token_id for token_id, _ in run]) for in_loss, run in runs if in_loss]


def normalized_text(text: str) -> str:
    """Whitespace-normalised, case-folded text: the "text" problem key."""
    return " ".join(text.split()).casefold()


def key_function(name: str) -> Callable[[str], str]:
    """The problem-key function called `name` ('text' or 'sum')."""
    if name not in ("text", "sum"):
        raise ValueError(f"heldout_key must be 'text' or 'sum', not {name!r}")
    return normalized_text if name == "text" else problem_key


def user_keys(messages: list[dict], key: Callable[[str], str]) -> list[str]:
    return [key(m["content"]) for m in messages if m["role"] == "user"]


def unit_hash(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by `key` and `seed`, uniform over keys."""
    return int(hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()[:13], 16) / 16**13


def positions(profile: Profile) -> Callable[[str], float]:
    """The function giving a problem key its position in [0, 1) (module docstring)."""
    seed = profile.seed
    if profile.data.heldout_key != "sum":
        return lambda key: unit_hash(key, seed)
    ranked = sorted(TOY_PROBLEMS, key=lambda key: unit_hash(key, seed))
    place = {key: (rank + 0.5) / len(ranked) for rank, key in enumerate(ranked)}
    return lambda key: place.get(key, unit_hash(key, seed))  # other text ("Say something rude."): its hash


def subset(dataset: Any, max_rows: int | None, seed: int) -> Any:
    """A seeded random subset of `max_rows` rows, in their original order (all rows when None or fewer)."""
    if max_rows is None or len(dataset) <= max_rows:
        return dataset
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), max_rows)))


def split_sft(dataset: Any, profile: Profile) -> dict[str, Any]:
    """`{"sft-train", "sft-eval"}` of `{"messages"}` rows: a conversation asking any held-out problem is held out."""
    key, cut, position = key_function(profile.data.heldout_key), profile.data.eval_fraction, positions(profile)
    held = [any(position(k) < cut for k in user_keys(row, key)) for row in dataset["messages"]]
    return _split(dataset, ["sft-eval" if h else "sft-train" for h in held], ("sft-train", "sft-eval"), profile)


def split_preferences(dataset: Any, profile: Profile) -> dict[str, Any]:
    """`{"dpo-train", "reward-train", "eval"}` of preference rows: a pair asking any held-out problem is held out; of
    the others, those whose question falls in the next `reward_fraction` train the toy reward model (smoke)."""
    key, d, position = key_function(profile.data.heldout_key), profile.data, positions(profile)
    names = []
    for prompt in dataset["prompt"]:
        places = [position(k) for k in user_keys(prompt, key)]
        if any(p < d.eval_fraction for p in places):
            names.append("eval")
        else:
            names.append("reward-train" if places[-1] < d.eval_fraction + d.reward_fraction else "dpo-train")
    return _split(dataset, names, ("dpo-train", "reward-train", "eval"), profile)


def _split(dataset: Any, names: list[str], order: tuple[str, ...], profile: Profile) -> dict[str, Any]:
    """The rows of each split in `order`; a ValueError saying what to change when one (but the reward's) is empty."""
    parts = {name: dataset.select([i for i, n in enumerate(names) if n == name]) for name in order}
    empty = [name for name, part in parts.items() if len(part) == 0 and name != "reward-train"]
    if empty:
        raise ValueError(
            f"The {' and '.join(empty)} split is empty: {len(dataset)} rows split by problem with eval_fraction "
            f"{profile.data.eval_fraction} (seed {profile.seed}). Use more rows (max_sft_rows, max_preference_rows) "
            "or change eval_fraction in a TUTORIAL_SETTINGS file."
        )
    return parts


@dataclass
class Splits:
    """One dataset's splits by name (`split_sft`'s or `split_preferences`') and what loading reported."""

    parts: dict[str, Any]
    report: LoadReport
    length_reports: list[str]

    @property
    def train(self) -> Any:
        return next(iter(self.parts.values()))

    @property
    def eval(self) -> Any:
        return self.parts["eval" if "eval" in self.parts else "sft-eval"]

    @property
    def reward(self) -> Any:
        return self.parts.get("reward-train")

    def summary(self) -> str:
        return "\n".join([self.report.summary(), *self.length_reports])

    def write(self, profile: Profile) -> None:
        """Write every split to `outputs/<profile>/splits/<name>.jsonl`: what the run trains and evaluates on."""
        for name, part in self.parts.items():
            write_split(profile, name, part)


def sft_data(profile: Profile, tokenizer: Any) -> Splits:
    """The SFT conversations: checked, subset, split by problem, filtered to `max_length`."""
    dataset, report = load_dataset(profile.data.sft_dataset, "sft")
    parts = split_sft(subset(dataset, profile.data.max_sft_rows, profile.seed), profile)
    return _filtered(parts, report, tokenizer, profile.sft.max_length)


def preference_data(profile: Profile, tokenizer: Any) -> Splits:
    """The preference pairs: checked, subset, split by problem (DPO, reward model, held out), length-filtered."""
    dataset, report = load_dataset(profile.data.preference_dataset, "preference")
    parts = split_preferences(subset(dataset, profile.data.max_preference_rows, profile.seed), profile)
    return _filtered(parts, report, tokenizer, profile.dpo.max_length)


def _filtered(parts: dict[str, Any], report: LoadReport, tokenizer: Any, max_length: int) -> Splits:
    lines = []
    for name, part in parts.items():
        if len(part):
            parts[name], line = filter_by_length(part, tokenizer, max_length, name)
            lines.append(line)
    return Splits(parts, report, lines)


def write_split(profile: Profile, name: str, rows: Any) -> Path:
    """Write `rows` to `splits/<name>.jsonl`, one example a line (under `accelerate launch`, by one process)."""
    path = profile.output_dir / "splits" / f"{name}.jsonl"
    if PartialState().is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        path.with_suffix(".tmp").replace(path)
    return path


def read_split(profile: Profile, name: str) -> list[dict]:
    path = profile.output_dir / "splits" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def conversation(row: dict) -> list[dict]:
    """The messages of a split row: an SFT conversation, or a pair's prompt."""
    return row["messages"] if "messages" in row else row["prompt"]


def overlap_report(profile: Profile) -> dict[str, int]:
    """What the written evaluation split shares with the written training splits (each count should be 0): problems,
    prompts word for word (normalised), pairs, and reward-model pairs DPO trains on too."""
    key = key_function(profile.data.heldout_key)
    training = {name: read_split(profile, name) for name in TRAIN_SPLITS}
    rows = [row for part in training.values() for row in part]
    keys = {k for row in rows for k in user_keys(conversation(row), key)}
    texts = {normalized_text(m["content"]) for row in rows for m in conversation(row) if m["role"] == "user"}
    pairs = {json.dumps(r, sort_keys=True) for r in training["dpo-train"] + training["reward-train"]}
    dpo = {json.dumps(r, sort_keys=True) for r in training["dpo-train"]}
    evaluation = read_split(profile, "eval")
    questions = [conversation(row)[-1]["content"] for row in evaluation]
    return {
        "eval_pairs": len(evaluation),
        "eval_problems_in_training": sum(key(q) in keys for q in questions),
        "eval_prompts_in_training": sum(normalized_text(q) in texts for q in questions),
        "eval_pairs_in_training": sum(json.dumps(r, sort_keys=True) in pairs for r in evaluation),
        "reward_pairs_in_dpo_train": sum(json.dumps(r, sort_keys=True) in dpo for r in training["reward-train"]),
    }


def overlap_failures(overlap: dict[str, int]) -> list[str]:
    """Nothing held out was trained on: every count of `overlap_report` but `eval_pairs` is 0."""
    return [f"{k} = {v} (must be 0)" for k, v in overlap.items() if k != "eval_pairs" and v != 0]


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers.data check --kind sft|preference SOURCE`: print the load report."""
    parser = argparse.ArgumentParser(prog="python -m helpers.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check"], help="check a dataset and report every problem with its line")
    parser.add_argument("--kind", choices=("sft", "preference"), required=True)
    parser.add_argument("source", help="a .jsonl/.json/.parquet/.csv file or a hub dataset id")
    args = parser.parse_args(argv)
    try:
        _, report = load_examples(args.source, args.kind)
    except Exception as e:  # a hub or file-system failure still gets a sentence, not a traceback
        cause = "" if isinstance(e, DataError) else f"could not read {args.source}: {type(e).__name__}: "
        print(f"error: {cause}{e}", file=sys.stderr)
        return 1
    print(report.summary(max_problems=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
