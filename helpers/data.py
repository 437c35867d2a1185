"""Load, check and format the SFT and preference datasets, from the hub or from local files.

One loader serves both: a hub id (`mlabonne/FineTome-100k`) or a local JSON lines, JSON, Parquet or CSV file in
the same schema (read by `helpers.data_files`). Every row is checked (`helpers.data_rows`); a bad row is dropped and
counted with its 1-based line number and the reason, never silently. When no row is usable, loading stops with a
`DataError` that says why.

    python -m helpers.data check --kind sft|preference PATH_OR_HUB_ID

prints that report for any file, with exit status 0 when at least one row is usable.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from helpers.data_files import DataError, read_records
from helpers.data_rows import SPECIAL_TOKEN_TEXT, preference_example, reason_of, sft_example

TOXIC_SOURCES = ("toxic-dpo-v0.2",)  # orpo-dpo-mix-40k's card asks to drop these rows
MAX_PROBLEMS_SHOWN = 20
REASON_NOTES = {SPECIAL_TOKEN_TEXT: "rows holding special-token text are dropped, not escaped: fix them in the file"}


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
