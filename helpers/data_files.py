"""Read a dataset's raw rows, each with its 1-based line (JSON lines, CSV) or row number: from a local JSON lines,
JSON, Parquet or CSV file, or the train split of a hub dataset. A file that is missing or does not parse raises a
`DataError` that names the line and says what to do.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A dataset that cannot be used, with a message saying where and what to do."""


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
