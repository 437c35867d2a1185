"""Load, check and format the SFT and preference datasets, from the hub or from local files.

One loader serves both: a hub id (`mlabonne/FineTome-100k`) or a local JSON lines, JSON, Parquet or CSV file in
the same schema. Every row is checked; a bad row is dropped and counted with its 1-based line number and the
reason, never silently. When no row is usable, loading stops with a `DataError` that says why.

Two checks guard the chat format. A message holding the literal text of a Llama 3 special token (`<|eot_id|>`,
`<|start_header_id|>`, ...) drops its row: the tokenizer would turn that text into the control token itself.
Such rows are dropped, not escaped, so the text the model learns is never altered behind the user's back. An
empty system turn is removed and the row kept (counted as a change); other empty turns drop the row.

    python -m helpers.data check --kind sft|preference PATH_OR_HUB_ID

prints that report for any file, with exit status 0 when at least one row is usable.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.chat import END_HEADER, END_OF_TEXT, EOM, EOT, START_HEADER, find_special_token

ROLE_MAP = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
TOXIC_SOURCES = ("toxic-dpo-v0.2",)  # orpo-dpo-mix-40k's card asks to drop these rows
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_PROBLEMS_SHOWN = 20
SPECIAL_TOKEN_TEXT = "literal special-token text"
EMPTY_SYSTEM_TURN = "empty system turn removed"
REASON_NOTES = {SPECIAL_TOKEN_TEXT: "rows holding special-token text are dropped, not escaped: fix them in the file"}


class DataError(ValueError):
    """A dataset that cannot be used, with a message saying where and what to do."""


@dataclass
class LoadReport:
    """What loading a dataset kept, changed and dropped, and why.

    `dropped` and `problems` are about rows left out; `modified` and `changes` about rows kept with a change
    (an empty system turn removed, say).
    """

    source: str
    kind: str
    rows_read: int = 0
    rows_usable: int = 0
    dropped: Counter = field(default_factory=Counter)
    problems: list[tuple[int, str]] = field(default_factory=list)
    modified: Counter = field(default_factory=Counter)
    changes: list[tuple[int, str]] = field(default_factory=list)

    def drop(self, line: int, reason: str, detail: str | None = None) -> None:
        """Count a dropped row under `reason`; keep `detail` (with the line number) as a problem to show."""
        self.dropped[reason] += 1
        if detail is not None:
            self.problems.append((line, detail))

    def modify(self, line: int, reason: str, detail: str) -> None:
        """Count a row kept with a change under `reason`; keep `detail` (with the line number) to show."""
        self.modified[reason] += 1
        self.changes.append((line, detail))

    def summary(self, max_problems: int | None = MAX_PROBLEMS_SHOWN) -> str:
        """A readable report: counts, reasons, and the first problems and changes with their line numbers.

        Args:
            max_problems: how many problems (and, apart, how many changes) to show; None shows all.
        """
        lines = [f"{self.source} ({self.kind}): {self.rows_read} rows read, {self.rows_usable} usable"]
        lines += [f"  dropped {n} × {reason}" for reason, n in self.dropped.most_common()]
        lines += [f"  modified {n} × {reason} (rows kept)" for reason, n in self.modified.most_common()]
        lines += [f"  note: {note}" for reason, note in REASON_NOTES.items() if reason in self.dropped]
        for entries, what in ((self.problems, "problems"), (self.changes, "changes")):
            shown = entries if max_problems is None else entries[:max_problems]
            lines += [f"  line {line}: {text}" for line, text in shown]
            if len(entries) > len(shown):
                lines.append(f"  … and {len(entries) - len(shown)} more {what}")
        return "\n".join(lines)


# --- reading ---------------------------------------------------------------------------------------------


def is_local(source: str) -> bool:
    """True for a path to a local file, False for a hub id."""
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or Path(source).exists()


def read_records(source: str) -> list[tuple[int, Any]]:
    """Rows of a dataset as `(line, record)`; `line` is the 1-based line (JSON lines) or row number.

    Raises:
        DataError: the file is missing or does not parse (naming the line), or its format is unknown.
    """
    if not is_local(source):
        return read_hub(source)
    path = Path(source)
    if path.is_dir():
        raise DataError(f"{source}: is a folder. Give one .jsonl, .json, .parquet or .csv file, or a hub id.")
    if not path.is_file():
        raise DataError(f"{source}: no such file. Give a .jsonl, .json, .parquet or .csv file, or a hub id.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix == ".csv":
        return read_csv(path)
    raise DataError(f"{source}: unknown file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}.")


def parse_problem(error: json.JSONDecodeError | UnicodeDecodeError) -> str:
    """What is wrong at the place a JSON parse failed, in words."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text: byte {error.object[error.start]:#04x} at offset {error.start}"
    return f"{error.msg} at column {error.colno}"


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    records = []
    with path.open("rb") as f:  # bytes, so that a line that is not UTF-8 is named too
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((line_no, json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(
                    f"{path}:{line_no}: not valid JSON ({parse_problem(e)}). Fix or delete that line."
                ) from None
    return records


def read_json(path: Path) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({parse_problem(e)}).") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({parse_problem(e)}).") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of rows (or JSON lines, one row a line), got a JSON {type(data).__name__}."
        )
    return list(enumerate(data, start=1))


def read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from None
    return list(enumerate(table.to_pylist(), start=1))


def read_csv(path: Path) -> list[tuple[int, Any]]:
    """CSV rows, each with the line it starts on; cells holding JSON (the message lists) are decoded.

    Line 1 is the header.
    """
    with path.open("rb") as f:
        reader = csv.DictReader(utf8_lines(path, f))
        records, start = [], 1
        try:
            if reader.fieldnames is None:  # reads the header: the first row starts on the line after it
                return []
            start = reader.line_num + 1
            for row in reader:
                records.append((start, {k: decode_json_cell(v) for k, v in row.items()}))
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}:{start}: not valid CSV ({e}). Fix or delete that row.") from None
    return records


def utf8_lines(path: Path, lines: Iterable[bytes]) -> Iterator[str]:
    """Decoded lines (line endings kept, as the csv module wants), naming the first that is not UTF-8."""
    for line_no, line in enumerate(lines, start=1):
        try:
            yield line.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no}: {parse_problem(e)}. Save the file as UTF-8.") from None


def decode_json_cell(value: Any) -> Any:
    # A row with more cells than the header has a list of the extra cells under the key None.
    if isinstance(value, str) and value.lstrip()[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_hub(source: str) -> list[tuple[int, Any]]:
    """The train split of a hub dataset (needs network access, and a token for gated sets)."""
    from datasets import load_dataset

    return list(enumerate(load_dataset(source, split="train"), start=1))


# --- checking one row ------------------------------------------------------------------------------------


def to_messages(turns: Any, column: str, changes: list[tuple[str, str]] | None = None) -> list[dict[str, str]]:
    """Messages `{role, content}` from ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) turns.

    An empty (or blank) system turn is left out, and `(EMPTY_SYSTEM_TURN, "'column' message i")` appended to
    `changes` when given.

    Raises:
        ValueError: the turns are not a non-empty list of known roles with non-empty text, or a text holds the
            literal text of a special token.
    """
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{column}' must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"'{column}' message {i} is not an object with a role and a text")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in ROLE_MAP:
            raise ValueError(f"'{column}' message {i} has unknown role {role!r} (known: {', '.join(ROLE_MAP)})")
        role = ROLE_MAP[role]
        if role == "system" and (content is None or (isinstance(content, str) and not content.strip())):
            if changes is not None:
                changes.append((EMPTY_SYSTEM_TURN, f"'{column}' message {i}"))
            continue
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"'{column}' message {i} ({role}) is empty")
        token = find_special_token(content)
        if token is not None:
            raise ValueError(
                f"'{column}' message {i} ({role}) contains the literal special token {token!r}: it would become a "
                f"control token ({special_token_effect(token, role)}); remove or escape it"
            )
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError(f"'{column}' is empty apart from empty system turns")
    return messages


def special_token_effect(token: str, role: str) -> str:
    """What a special token written inside a message would do to training, in words."""
    if role == "assistant" and token in (EOT, EOM, END_OF_TEXT):
        return "the model would learn to stop mid-answer"
    if token in (START_HEADER, END_HEADER, EOT, EOM):
        return "it would fake a turn boundary inside the message"
    return "the model would read a control token where the text has characters"


def check_conversation(messages: list[dict[str, str]], column: str) -> None:
    """Raise ValueError unless the conversation has a user turn and ends with an assistant turn."""
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"'{column}' does not end with an assistant turn (last role: {messages[-1]['role']})")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"'{column}' has no user turn")


def sft_example(record: dict, changes: list[tuple[str, str]] | None = None) -> dict:
    """A TRL conversational SFT example `{"messages": [...]}` from a FineTome-style row.

    Changes made to keep the row (an empty system turn removed) are appended to `changes` when given.
    """
    column = "conversations" if "conversations" in record else "messages"
    if column not in record:
        raise KeyError("missing column 'conversations' (ShareGPT from/value turns) or 'messages'")
    messages = to_messages(record[column], column, changes)
    check_conversation(messages, column)
    return {"messages": messages}


def preference_example(record: dict, changes: list[tuple[str, str]] | None = None) -> dict:
    """A TRL conversational preference example `{"prompt", "chosen", "rejected"}` (all message lists).

    orpo-dpo-mix-40k stores whole conversations in `chosen`/`rejected`; the shared turns before the final
    assistant turn become the prompt. Its string `prompt` column is not passed on: TRL decides whether a dataset
    is conversational from one arbitrary column, and a string beside message lists makes that a coin toss.
    Empty system turns leave `chosen` and `rejected` alike before the prompts are compared, and are appended to
    `changes` when given.
    """
    for column in ("chosen", "rejected"):
        if column not in record:
            raise KeyError(f"missing column '{column}'")
    chosen = to_messages(record["chosen"], "chosen", changes)
    rejected = to_messages(record["rejected"], "rejected", changes)
    if isinstance(record.get("prompt"), list):  # explicit-prompt format: prompt messages + one answer each
        prompt = to_messages(record["prompt"], "prompt", changes)
        chosen, rejected = prompt + chosen, prompt + rejected
    check_conversation(chosen, "chosen")
    check_conversation(rejected, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("'chosen' and 'rejected' do not share the same conversation before the last answer")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise ValueError("chosen is identical to rejected: the pair teaches nothing")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


# --- loading a whole dataset ------------------------------------------------------------------------------


def check_records(records: list[tuple[int, Any]], kind: str, report: LoadReport) -> list[dict]:
    """Turn raw records into examples of `kind` ('sft' or 'preference'), recording every drop in `report`."""
    build = sft_example if kind == "sft" else preference_example
    examples = []
    for line, record in records:
        report.rows_read += 1
        if not isinstance(record, dict):
            report.drop(line, "not an object", "the row is not a JSON object")
            continue
        if kind == "preference" and record.get("source") in TOXIC_SOURCES:
            report.drop(line, f"source {record['source']} (dropped as the dataset card asks)")
            continue
        changes: list[tuple[str, str]] = []
        try:
            examples.append(build(record, changes))
        except KeyError as e:
            report.drop(line, "missing column", e.args[0])
            continue
        except ValueError as e:
            report.drop(line, reason_of(str(e)), str(e))
            continue
        for reason in dict.fromkeys(reason for reason, _ in changes):  # a row counts once per kind of change
            places = ", ".join(place for r, place in changes if r == reason)
            report.modify(line, reason, f"{reason}: {places}; the row is kept")
    report.rows_usable = len(examples)
    return examples


def reason_of(message: str) -> str:
    """A short reason to count drops under, from a row's problem message."""
    for key in (
        "unknown role",  # first: its message quotes the role it found, which could be any text
        "literal special token",
        "is empty",
        "identical",
        "does not end with an assistant",
        "no user turn",
        "do not share",
        "non-empty list",
        "not an object",
    ):
        if key in message:
            return {
                "literal special token": SPECIAL_TOKEN_TEXT,
                "non-empty list": "not a list of messages",
                "not an object": "malformed message",
                "does not end with an assistant": "does not end with an assistant turn",
            }.get(key, key)
    return "invalid row"


def expected_schema(kind: str) -> str:
    if kind == "sft":
        return (
            "an SFT row needs 'conversations' (a list of {from, value} with from in human/gpt/system), "
            "as in mlabonne/FineTome-100k, or 'messages' (a list of {role, content})"
        )
    return (
        "a preference row needs 'chosen' and 'rejected', each a list of {role, content} ending with the "
        "assistant's answer, as in mlabonne/orpo-dpo-mix-40k"
    )


def load_examples(source: str, kind: str, max_rows: int | None = None) -> tuple[list[dict], LoadReport]:
    """Read and check a dataset; return the usable examples and the report.

    Args:
        source: hub id or local file.
        kind: 'sft' or 'preference'.
        max_rows: keep at most this many raw rows (the first ones), or all when None.

    Raises:
        DataError: the source cannot be read, or no row is usable.
    """
    if kind not in ("sft", "preference"):
        raise DataError(f"kind must be 'sft' or 'preference', not {kind!r}")
    records = read_records(source)
    if not records:
        raise DataError(f"{source}: no rows (the file is empty). {expected_schema(kind).capitalize()}.")
    if max_rows is not None:
        records = records[:max_rows]
    report = LoadReport(source=source, kind=kind)
    examples = check_records(records, kind, report)
    if not examples:
        raise DataError(f"No usable rows: {expected_schema(kind)}.\n{report.summary()}")
    return examples, report


def to_dataset(examples: list[dict]):
    """A `datasets.Dataset` from examples."""
    from datasets import Dataset

    return Dataset.from_list(examples)


def load_sft_dataset(source: str, max_rows: int | None = None):
    """The SFT dataset as a `datasets.Dataset` of `{"messages"}` rows, and its `LoadReport`."""
    examples, report = load_examples(source, "sft", max_rows)
    return to_dataset(examples), report


def load_preference_dataset(source: str, max_rows: int | None = None):
    """The preference dataset as a `datasets.Dataset` of `{"prompt", "chosen", "rejected"}`, and its report."""
    examples, report = load_examples(source, "preference", max_rows)
    return to_dataset(examples), report


def count_tokens(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> int:
    """Tokens in `messages` rendered with the chat template."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def example_length(example: dict, tokenizer) -> int:
    """Tokens in the longest rendering of an example (the whole conversation, or prompt + the longer answer)."""
    if "messages" in example:
        return count_tokens(example["messages"], tokenizer)
    return max(count_tokens(example["prompt"] + example[k], tokenizer) for k in ("chosen", "rejected"))


def prompt_length(example: dict, tokenizer) -> int:
    """Tokens in a preference example's prompt, with the assistant header that follows it."""
    return count_tokens(example["prompt"], tokenizer, add_generation_prompt=True)


def filter_by_length(dataset, tokenizer, max_length: int, label: str = "dataset"):
    """Drop examples longer than `max_length` tokens and say how many went.

    Returns:
        The kept dataset and a one-line report.

    Raises:
        DataError: nothing is left, or every preference prompt alone is longer than `max_length`.
    """
    lengths = [example_length(ex, tokenizer) for ex in dataset]
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    if not keep:
        too_long = (
            "prompts alone"
            if "prompt" in dataset.column_names and all(prompt_length(ex, tokenizer) > max_length for ex in dataset)
            else "examples"
        )
        raise DataError(
            f"{label}: all {len(dataset)} {too_long} are longer than max_length={max_length} tokens "
            f"(shortest example: {min(lengths)}). Raise max_length or use shorter data."
        )
    removed = len(dataset) - len(keep)
    message = (
        f"{label}: kept {len(keep)} of {len(dataset)} examples; removed {removed} longer than "
        f"{max_length} tokens (longest was {max(lengths)})"
    )
    return dataset.select(keep), message


# --- command line -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers.data check --kind sft|preference SOURCE`: print the load report."""
    parser = argparse.ArgumentParser(prog="python -m helpers.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check a dataset and report every problem with its line number")
    check.add_argument("--kind", choices=("sft", "preference"), required=True)
    check.add_argument("source", help="a .jsonl/.json/.parquet/.csv file or a hub dataset id")
    args = parser.parse_args(argv)
    try:
        _, report = load_examples(args.source, args.kind)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a hub or file-system failure still gets a sentence, not a traceback
        print(f"error: could not read {args.source}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(report.summary(max_problems=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
