r"""Sampling speed and peak GPU memory: every way to generate from the 4-bit + LoRA policy, at fixed lengths.

The policy is the full profile's (4-bit NF4 base, LoRA r16 on all seven projections) on random weights with
Llama-3.1-8B's exact shapes (`benchmarks/shapes.py`); prompts are the shapes world's DPO prompts (lognormal, median
about 120 tokens, at most `--max-prompt-tokens`), rendered with the chat template, the same ones for every path.

| path | what it is |
|---|---|
| `greedy_answers` | `helpers.generation.generate`, greedy: what every answer a user watches comes from (`use` record) |
| `chat` | `helpers.generation.stream`, one answer at batch 1: the streaming chat of notebook 07 (`use` record) |
| `evaluate_generate` | transformers + peft + bitsandbytes, plain `generate` (the old evaluation path) |
| `unsloth_generate` | the same on the Unsloth model after `for_inference` (576 new tokens/s at batch 64 on an H200) |
| `unsloth_generate_graphs` | the same, `UNSLOTH_DECODE_CUDA_GRAPHS=1`: Unsloth's graphed decode (default in its RL) |
| `merged_dynamic` | a bf16 copy of the model (the merged copy's cost: merged or not, same shapes), plain `generate` |
| `merged_static_compiled` | the bf16 copy, `cache_implementation="static"` (transformers compiles the decode step) |
| `continuous_batching` | the bf16 copy, `generate_batch`, its paged KV cache limited to what the batch needs |
| `sampler_merged` | `llama_sampler.Sampler(mode="merged")`: merged bf16 copy, static cache, CUDA graph |
| `sampler_lean` | `Sampler(mode="lean")`: the 4-bit policy itself (no copy), static cache, CUDA graph |
| `sampler_merged_eager` | `sampler_merged` without the CUDA graph: what the graph buys |
| `sampler_lean_hf` | `sampler_lean` on the transformers + peft + bitsandbytes model (no Unsloth) |
| `refresh` | `Sampler.refresh()` on 8B shapes: the cost per RL step of re-merging the adapter |

Random weights never emit `<|eot_id|>` reliably, so every path generates exactly `--new-tokens` tokens a row:
the stop tokens are forbidden until then (`min_new_tokens`; `eos_token_id=-1` for `generate_batch`), and each
record counts the tokens it really got. Each path runs in its own process (`--in-process` on a CPU), one batch
size after the other: first one untimed call on exactly the timed shapes (prompts, batch, new tokens: what
compiles, captures or autotunes does it there; the slow plain-`generate` paths warm up on 16 new tokens), then
one timed call between `torch.cuda.synchronize()`. Peak memory (`max_memory_allocated`, reserved) is reset before
each warm-up, so it covers the model, the copy, the cache and the call. `vllm` mode is not measured (no vLLM).

On the H200 (the bundle of `../shared/gpu/make-bundle.sh` in `.gpu/`; the world is built first, about a minute):

    mkdir -p /tmp/site && tar xzf .gpu/gpu-site.tgz -C /tmp/site \
      && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 \
      && python3 benchmarks/bench_sampling.py --world /tmp/shapes-world --out benchmarks/results/h200-sampling.json

On a CPU (tiny shapes, all paths but Unsloth's, under a minute; checks the script, measures nothing useful):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py --shape tiny --device cpu --out /tmp/sampling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench_training import GIB, cuda_sync, environment, peak_gib, reset_peak  # this script's folder is on sys.path

PATHS: dict[str, dict] = {  # most telling first: the JSON is written after every path, so a cut run keeps them
    "greedy_answers": {"kind": "use", "use": "greedy_answers", "batches": [32, 64]},
    "chat": {"kind": "use", "use": "chat", "batches": [1]},
    "sampler_merged": {"kind": "sampler", "mode": "merged"},
    "sampler_lean": {"kind": "sampler", "mode": "lean"},
    "unsloth_generate_graphs": {"kind": "evaluate", "backend": "unsloth", "unsloth_graphs": True},
    "evaluate_generate": {"kind": "evaluate", "backend": "hf", "batches": [64], "warmup_new_tokens": 16},
    "unsloth_generate": {"kind": "evaluate", "backend": "unsloth", "batches": [64], "warmup_new_tokens": 16},
    "merged_dynamic": {"kind": "bf16", "backend": "hf", "batches": [64], "warmup_new_tokens": 16},
    "continuous_batching": {"kind": "continuous_batching", "backend": "hf", "batches": [64]},
    "sampler_merged_eager": {"kind": "sampler", "mode": "merged", "cuda_graph": False, "batches": [64]},
    "sampler_lean_hf": {"kind": "sampler", "mode": "lean", "backend": "hf", "batches": [64]},
    "refresh": {"kind": "refresh"},
    "merged_static_compiled": {"kind": "bf16", "backend": "hf", "cache": "static", "batches": [64]},
}
CB_BLOCK = 256  # tokens per block of the continuous-batching cache


# --- the world, the prompts, the models -------------------------------------------------------------------


def ensure_world(world: Path, shape: str) -> None:
    """Build the shapes world (tokenizer, data, model) unless it is there."""
    from shapes import MODEL_DIR, build_world

    if not (world / MODEL_DIR / "config.json").exists():
        start = time.perf_counter()
        build_world(world, sft_rows_n=50, preference_rows_n=400, shape=shape)
        print(f"world built in {time.perf_counter() - start:.0f} s", flush=True)


def prompts_for(world: Path, tokenizer, count: int, max_tokens: int) -> list[list[dict]]:
    """The first `count` DPO prompts of the world (as user turns) of at most `max_tokens` rendered tokens."""
    from shapes import PREFERENCE_FILE

    from llama_sampler import render_prompt

    rows = [json.loads(line) for line in (world / PREFERENCE_FILE).read_text().splitlines()]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    prompts = [p for p in prompts if len(render_prompt(tokenizer, p)) <= max_tokens]
    return [prompts[i % len(prompts)] for i in range(count)]


def load_policy(world: Path, backend: str):
    """The full profile's policy on the world's model: 4-bit base plus fresh LoRA adapters (`default`)."""
    from dataclasses import replace

    from shapes import MODEL_DIR

    from helpers.model import add_lora, load_base
    from helpers.settings import full_profile

    profile = replace(full_profile(42, backend), model_id=str(world / MODEL_DIR))
    model, tokenizer = load_base(profile, max_length=4096)
    return add_lora(model, profile, tokenizer), tokenizer


def load_bf16(world: Path):
    """The world's model in bf16, dequantized from its 4-bit checkpoint (16 GB at 8B shapes)."""
    import torch
    from shapes import MODEL_DIR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.model import apply_chat_template, device_map

    model = AutoModelForCausalLM.from_pretrained(world / MODEL_DIR, dtype=torch.bfloat16, device_map=device_map())
    if getattr(model, "hf_quantizer", None) is not None:
        model.dequantize()
    return model.eval(), apply_chat_template(AutoTokenizer.from_pretrained(world / MODEL_DIR))


def left_padded(tokenizer, prompts, device):
    import torch

    from llama_sampler import render_prompt

    ids = [render_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    tensor = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
    return tensor, (tensor != pad).long(), ids


# --- the paths: each returns run(prompts, new_tokens) -> tokens generated, and facts about itself ---------


def path_use(world: Path, spec: dict):
    """What a user of the notebooks gets: `generation.generate` (greedy, the batch at once) or `generation.stream`
    (one answer, each token shown as it comes). Random weights may stop early: the record counts what came."""
    from helpers import generation
    from llama_sampler import stop_token_ids

    model, tokenizer = load_policy(world, spec["backend"])
    info, stops = {}, set(stop_token_ids(tokenizer))

    def run(prompts, new_tokens):
        if spec["use"] == "chat":  # count the sampled ids: the reply's text drops special tokens, which greedy
            sampler, rows = generation.sampler_for(model, tokenizer), []  # random weights may repeat
            generate_ids = sampler.generate_ids
            sampler.generate_ids = lambda *a, **k: rows.extend(generate_ids(*a, **k)) or rows
            try:
                generation.stream(model, tokenizer, prompts[0], lambda piece: None, new_tokens)
            finally:
                del sampler.generate_ids
            return next((i + 1 for i, t in enumerate(rows[0]) if t in stops), len(rows[0]))  # up to its stop
        out = generation.generate(model, tokenizer, prompts, new_tokens, batch_size=len(prompts))
        info["sampler_mode"] = generation.sampler_for(model, tokenizer).mode
        return sum(n + s for n, s in zip(out.num_tokens, out.stopped, strict=True))

    return run, info


def path_evaluate(world: Path, spec: dict):
    from llama_sampler import decode, stop_token_ids

    if spec.get("unsloth_graphs"):
        os.environ["UNSLOTH_DECODE_CUDA_GRAPHS"] = "1"  # read at each generate() call
    model, tokenizer = load_policy(world, spec["backend"])
    if spec["backend"] == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)  # else each generate() call frees the graphs it captured

    def run(prompts, new_tokens):
        ids, mask, _ = left_padded(tokenizer, prompts, model.device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
            temperature=1.0, top_p=None, top_k=None, eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return sum(decode(tokenizer, out[:, ids.shape[1] :].tolist()).num_tokens)

    return run, {}


def path_sampler(world: Path, spec: dict):
    from llama_sampler import Sampler

    model, tokenizer = load_policy(world, spec["backend"])
    sampler = Sampler(model, tokenizer, mode=spec["mode"], cuda_graph=spec.get("cuda_graph", True))
    info = {"mode": sampler.mode, "merged_copy_gib": round(sampler.merged_bytes() / GIB, 2)}
    try:  # a check of correctness, not a speed: it must not cost the timing
        info["greedy_agreement"] = greedy_agreement(model, tokenizer, sampler, prompts_for(world, tokenizer, 8, 256))
    except Exception as e:
        traceback.print_exc()
        info["greedy_agreement_error"] = f"{type(e).__name__}: {e}"[:1000]

    def run(prompts, new_tokens):
        out = sampler.generate(prompts, new_tokens, sample=True, batch_size=len(prompts), min_new_tokens=new_tokens)
        info["cuda_graph_error"] = sampler.graph_error
        return sum(out.num_tokens)

    return run, info


def greedy_agreement(model, tokenizer, sampler, prompts, new_tokens: int = 32) -> float:
    """Share of the sampler's greedy tokens that the policy's own forward ranks first (stop tokens aside).

    1.0 when the sampler computes what the model computes (`lean`); a little less for `merged`, whose bf16 merge
    rounds differently and so flips near-ties (random weights have many). A broken cache or graph gives ~0.
    """
    import torch
    from trl.trainer.utils import use_adapter

    from llama_sampler import render_prompt

    out = sampler.generate(prompts, new_tokens, sample=False, batch_size=len(prompts), min_new_tokens=new_tokens)
    rows = [render_prompt(tokenizer, p) + t for p, t in zip(prompts, out.token_ids, strict=True)]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=sampler.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=sampler.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded rows
    with torch.no_grad(), use_adapter(model, "default"):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -new_tokens - 1 : -1]
    logits[..., sampler.stops] = float("-inf")  # forbidden while sampling (`min_new_tokens`)
    predicted = logits.argmax(-1)
    return round((predicted == ids[:, -new_tokens:]).float().mean().item(), 4)


def path_bf16(world: Path, spec: dict):
    from llama_sampler import stop_token_ids

    model, tokenizer = load_bf16(world)

    def run(prompts, new_tokens):
        ids, mask, _ = left_padded(tokenizer, prompts, model.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=None,
            top_k=None,
            cache_implementation=spec.get("cache"),
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        return (out.shape[1] - ids.shape[1]) * len(prompts)

    return run, {}


def path_continuous_batching(world: Path, spec: dict):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model, tokenizer = load_bf16(world)

    def run(prompts, new_tokens):
        _, _, ids = left_padded(tokenizer, prompts, "cpu")
        blocks = sum(math.ceil((len(i) + new_tokens) / CB_BLOCK) for i in ids)  # the KV cache the batch needs
        generation = GenerationConfig(
            max_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=None,
            top_k=None,
            eos_token_id=-1,  # no stop token: fixed lengths
            pad_token_id=tokenizer.pad_token_id,
        )
        # Limits: a cache of the blocks the batch needs (plus one a row), and one forward of all the prompts at
        # most (unset, both are sized from free memory: 122 GiB in REFERENCE §3, and minutes on a CPU).
        limits = ContinuousBatchingConfig(
            block_size=CB_BLOCK, num_blocks=blocks + len(ids), max_batch_tokens=sum(map(len, ids))
        )
        out = model.generate_batch(ids, generation_config=generation, continuous_batching_config=limits)
        return sum(len(o.generated_tokens) for o in out.values())

    return run, {"block_size": CB_BLOCK}


def path_refresh(world: Path, spec: dict) -> dict:
    """Time the first merge and `refresh()` (the cost per RL step), with the LoRA weights changed in between."""
    import torch

    from llama_sampler import Sampler

    model, tokenizer = load_policy(world, spec["backend"])
    sampler = Sampler(model, tokenizer, mode="merged")
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    reset_peak()
    start = time.perf_counter()
    sampler._merge("default")
    cuda_sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(spec.get("repeats", 5)):
        with torch.no_grad():
            for p in lora:
                p.add_(1e-3)  # as an optimizer step would: in place
        start = time.perf_counter()
        sampler.refresh()
        cuda_sync()
        times.append(time.perf_counter() - start)
    return {
        "path": "refresh",
        "batch": None,
        "new_tokens": None,
        "new_tokens_per_s": None,
        "first_merge_s": round(first, 3),
        "refresh_ms": [round(1000 * t, 1) for t in times],
        "refresh_ms_median": round(1000 * sorted(times)[len(times) // 2], 1),
        "merged_copy_gib": round(sampler.merged_bytes() / GIB, 2),
        **peak_or_none(),
    }


KINDS = {
    "use": path_use,
    "evaluate": path_evaluate,
    "sampler": path_sampler,
    "bf16": path_bf16,
    "continuous_batching": path_continuous_batching,
}


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def peak_or_none() -> dict:
    return peak_gib() or {"peak_allocated_gib": None, "peak_reserved_gib": None}


# --- measuring --------------------------------------------------------------------------------------------


def measure(name: str, spec: dict, world: Path) -> dict:
    """Every batch size of one path: warm-up on the exact shapes, then one timed call. Returns the path's result."""
    if spec["kind"] == "refresh":
        return {"status": "ok", "records": [path_refresh(world, spec)]}
    run, info = KINDS[spec["kind"]](world, spec)
    from shapes import MODEL_DIR
    from transformers import AutoTokenizer

    from helpers.model import apply_chat_template

    tokenizer = apply_chat_template(AutoTokenizer.from_pretrained(world / MODEL_DIR))  # to pick the prompts
    records = []
    for batch in spec["batches"]:
        prompts = prompts_for(world, tokenizer, batch, spec["max_prompt_tokens"])
        new_tokens = spec["new_tokens"]
        record = {"path": name, "batch": batch, "new_tokens": new_tokens} | (
            {"use": spec["use"]} if "use" in spec else {}
        )
        try:
            gc.collect()
            reset_peak()
            start = time.perf_counter()
            run(prompts, min(new_tokens, spec.get("warmup_new_tokens", new_tokens)))
            cuda_sync()
            record["warmup_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            generated = run(prompts, new_tokens)
            cuda_sync()
            seconds = time.perf_counter() - start
            record.update(
                seconds=round(seconds, 3),
                new_tokens_generated=generated,
                new_tokens_per_s=round(generated / seconds, 1),
                status="ok" if generated == batch * new_tokens or "use" in spec else "wrong token count",
                gpu=torch_device_name(),
            )
        except Exception as e:  # record it and try the next batch size (an out-of-memory at 256 is a result)
            traceback.print_exc()
            record.update(status="error", error=f"{type(e).__name__}: {e}"[:1000])
        record.update(peak_or_none())
        records.append(record)
        print(json.dumps(record), flush=True)
    return {"status": "ok", "info": info, "records": records}


def worker(name: str, spec: dict, world: Path, result_file: Path) -> int:
    """Run one path in this process and write its result as JSON."""
    if spec["backend"] == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers, peft and trl)
    started = time.perf_counter()
    try:
        result = measure(name, spec, world)
    except Exception as e:
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], "records": []}
    result["spec"], result["process_s"] = spec, round(time.perf_counter() - started, 1)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def run_path(name: str, spec: dict, world: Path, in_process: bool, timeout_s: int) -> dict:
    if spec["backend"] == "unsloth" and spec["device"] != "cuda":
        return {"status": "skipped: Unsloth's paths need a CUDA GPU", "spec": spec, "records": []}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    try:
        if in_process:
            worker(name, spec, world, result_file)
        else:
            command = [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec), "--world", str(world)]
            command += ["--result", str(result_file)]
            env = {**os.environ, "TUTORIAL_BACKEND": spec["backend"]}
            subprocess.run(command, timeout=spec.get("timeout_s", timeout_s), check=False, env=env)
        return json.loads(result_file.read_text()) if result_file.stat().st_size else {"status": "no result"}
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": spec.get("timeout_s", timeout_s), "spec": spec, "records": []}
    finally:
        result_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, help="shapes world (built there if missing; default: a temporary one)")
    parser.add_argument("--shape", default="llama-3.1-8b", help="model shape when the world is built")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is one")
    parser.add_argument("--out", type=Path, help="JSON file to write (after every path)")
    parser.add_argument("--paths", nargs="*", default=list(PATHS), help=f"default: all of {', '.join(PATHS)}")
    parser.add_argument("--batches", nargs="*", type=int, help="default 16 64 256 where a path sets none (CPU: 8)")
    parser.add_argument("--new-tokens", type=int, help="default 256 (CPU: 16)")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=420, help="seconds per path (own process)")
    parser.add_argument("--in-process", action="store_true", help="all paths in this process (default on a CPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: helpers.model.device_map() says cpu, in workers too
    if args.worker:
        return worker(args.worker, json.loads(args.spec), args.world, args.result)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cpu = device == "cpu"  # a check of the script: small batches, few tokens, every path
    new_tokens = args.new_tokens or (16 if on_cpu else 256)
    batches = args.batches or ([8] if on_cpu else [16, 64, 256])
    unknown = [n for n in args.paths if n not in PATHS]
    if unknown or args.out is None:
        parser.error(f"--out is required; unknown paths {unknown}; known: {', '.join(PATHS)}")
    world = (args.world or Path(tempfile.mkdtemp(prefix="sampling-world-"))).resolve()
    ensure_world(world, args.shape)
    report = {**environment(), "world": json.loads((world / "stats.json").read_text()), "device": device}
    report["settings"] = {
        "new_tokens": new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "fixed_length": "stop tokens forbidden until new_tokens (random weights); sampled, temperature 1.0",
    }
    report.update(paths={}, records=[])
    for name in args.paths:
        print(f"\n=== {name} ===", flush=True)
        spec = {"backend": "hf" if on_cpu else "unsloth", "batches": batches, **PATHS[name]}
        spec.update(device=device, new_tokens=new_tokens, max_prompt_tokens=args.max_prompt_tokens)
        if on_cpu and not args.batches and PATHS[name].get("use") != "chat":
            spec["batches"] = batches
        result = run_path(name, spec, world, args.in_process or on_cpu, args.timeout)
        report["records"] += result.pop("records", [])
        report["paths"][name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{name}: {result.get('status')} {result.get('error', '')}", flush=True)
    print(f"\n{'path':<26} {'batch':>5} {'new tok/s':>10} {'peak GiB':>9}  status")
    for r in report["records"]:
        rate = "–" if r.get("new_tokens_per_s") is None else f"{r['new_tokens_per_s']:,.0f}"
        print(f"{r['path']:<26} {r['batch'] or '–':>5} {rate:>10} {r.get('peak_allocated_gib') or '–':>9}  ", end="")
        print(r.get("status", f"refresh {r.get('refresh_ms_median')} ms"))
    failed = [n for n, r in report["paths"].items() if not str(r.get("status")).startswith(("ok", "skipped"))]
    print(f"\nwrote {args.out}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
