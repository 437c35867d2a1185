"""Run notebooks on the GPU as the launchable's A100 40 GB would: PyTorch capped at `--cap-gib` in every process (the
notebook kernels included, `benchmarks/cap/sitecustomize.py`), one result record per notebook.

    python benchmarks/run_capped.py --cap-gib 38.8 --out benchmarks/results --notebooks 01 02 03

The profile and its settings come from the environment, as for `python -m helpers.run` (the GPU run script points
them at the 8B-shapes world, `benchmarks/gpu.sh`). Each notebook runs through the main job (`helpers.run`) in its own
process; its record is `{"notebook", "memory_cap_gib", "status", "peak_allocated_gib", "seconds", ...}` in
`<out>/capped-<notebook>.json`, the peak read from the kernel's own `torch.cuda.max_memory_allocated()` at its exit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(number: str, cap_gib: float, out: Path, timeout_s: int) -> dict:
    peaks = Path(tempfile.mkdtemp(prefix="peaks-"))
    env = os.environ | {
        "BENCH_MEMORY_CAP_GIB": str(cap_gib),
        "BENCH_PEAKS": str(peaks),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks" / "cap"), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "helpers.run", number], cwd=ROOT, env=env, timeout=timeout_s,
                              capture_output=True, text=True)  # fmt: skip
        status, log = (
            ("passed" if done.returncode == 0 else f"failed (exit {done.returncode})"),
            done.stdout + done.stderr,
        )
    except subprocess.TimeoutExpired as e:
        status, log = f"cut at {timeout_s} s", (e.stdout or b"").decode(errors="replace")
    kernels = [json.loads(p.read_text()) for p in peaks.glob("peak-*.json")]
    kernels = [k for k in kernels if any("ipykernel" in a for a in k["argv"])]
    import torch

    record = {
        "notebook": next(ROOT.glob(f"notebooks/{number}_*.ipynb")).stem,
        "memory_cap_gib": cap_gib,
        "status": status,
        "peak_allocated_gib": max((k["peak_allocated_gib"] for k in kernels), default=None),
        "seconds": round(time.perf_counter() - start, 1),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f"python benchmarks/run_capped.py --cap-gib {cap_gib} --notebooks {number}",
        "profile": os.environ.get("TUTORIAL_PROFILE"),
        "settings": json.loads(Path(os.environ["TUTORIAL_SETTINGS"]).read_text())
        if os.environ.get("TUTORIAL_SETTINGS")
        else None,
    }
    if status != "passed":
        record["log_tail"] = log[-3000:]
    (out / f"capped-{record['notebook']}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("notebook", "status", "peak_allocated_gib", "seconds")}), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-gib", type=float, default=38.8)
    parser.add_argument("--notebooks", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=int, default=540, help="seconds a notebook")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    records = [run_notebook(n, args.cap_gib, args.out, args.timeout) for n in args.notebooks]
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
