"""Read the logged series back out of W&B offline runs (`offline-run-*/run-*.wandb`), with no account or network.

An offline run is a LevelDB-style log of protobuf `Record`s (wandb's own format: a 7-byte header, then 32 KiB
blocks of checksummed chunks). This reads its `history` records, so a run can be checked for what it holds:

    python benchmarks/wandb_series.py outputs/full/wandb --keys train/memory/ train/loss --out series.json
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # b":W&B" + 2-byte magic + 1-byte version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """The payloads of every complete record in a `.wandb` file."""
    data = path.read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path}: not a W&B run file")
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too small for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at a file's end
            break
    return out


def history(path: Path) -> list[dict]:
    """Every `wandb.log` row of the run, as {key: value}."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def series(folder: Path, prefixes: list[str]) -> dict[str, dict]:
    """For each offline run under `folder`: its rows restricted to keys starting with one of `prefixes`."""
    runs = {}
    for path in sorted(Path(folder).glob("**/offline-run-*/run-*.wandb")):
        rows = [
            {k: v for k, v in row.items() if k in ("_step", "train/global_step") or k.startswith(tuple(prefixes))}
            for row in history(path)
        ]
        rows = [row for row in rows if any(k.startswith(tuple(prefixes)) for k in row)]
        runs[path.parent.name] = {"file": str(path), "rows": len(rows), "history": rows}
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder holding offline-run-* folders (searched recursively)")
    parser.add_argument("--keys", nargs="*", default=["train/memory/", "train/loss"], help="key prefixes to keep")
    parser.add_argument("--out", type=Path, help="write the series as JSON here")
    args = parser.parse_args(argv)
    runs = series(args.folder, args.keys)
    for name, run in runs.items():
        keys = sorted({k for row in run["history"] for k in row})
        print(f"{name}: {run['rows']} rows with {', '.join(keys)}")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1) + "\n")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
