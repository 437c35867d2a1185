"""Every Python process started with this folder on PYTHONPATH (notebook kernels inherit it) behaves as on a smaller
GPU, and reports its peak: for the capped runs of `benchmarks/run_capped.py`.

- `BENCH_MEMORY_CAP_GIB`: cap PyTorch's allocator at this many GiB (`torch.cuda.set_per_process_memory_fraction`).
  38.8 stands for an A100 40 GB: 40 GiB in all, of which the CUDA context takes about 0.7 GiB outside the allocator.
  Code that sizes itself from free memory reads the cap (`helpers.machine.gpu_free_bytes`), as on the real card.
- `BENCH_PEAKS`: a folder; at exit, a process that used CUDA writes `peak-<pid>.json` there (its argv, its peak).
"""

import os

if os.environ.get("BENCH_MEMORY_CAP_GIB") or os.environ.get("BENCH_PEAKS"):
    import atexit
    import json
    import sys

    import torch

    if torch.cuda.is_available() and os.environ.get("BENCH_MEMORY_CAP_GIB"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(float(os.environ["BENCH_MEMORY_CAP_GIB"]) * 2**30 / total)

    def _report_peak() -> None:
        if os.environ.get("BENCH_PEAKS") and torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = {"argv": sys.argv, "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
            path = os.path.join(os.environ["BENCH_PEAKS"], f"peak-{os.getpid()}.json")
            with open(path, "w") as f:
                json.dump(peak, f)

    atexit.register(_report_peak)
