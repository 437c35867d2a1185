"""The main job: run the notebook series in order, keep executed copies (and HTML), then write the report; or train
one stage from the command line, on one GPU or data-parallel over several.

    python -m helpers.run            # or: make run
    python -m helpers.run 06 07      # only these notebooks (what they need is trained first when missing)
    python -m helpers.run --stage sft                                             # one stage, one process
    accelerate launch --multi_gpu --num_processes 2 -m helpers.run --stage sft    # two GPUs (DDP), then dpo, rl

Settings come from the `TUTORIAL_*` variables. Executed notebooks go to `outputs/<profile>/notebooks/`, the numbers to
`metrics.json` and `report.md` beside them. Under `accelerate launch` each process trains on its share of every batch
(the effective batch and stage key stay the profile's); without GPUs the processes talk through gloo."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from helpers.settings import MODELS, PROJECT_ROOT, Profile, SettingsError, cuda_available, load_profile

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
CELL_TIMEOUT_S = 3 * 3600  # a full-profile training cell runs for hours
MAX_NOISE_LINES = 50  # progress bars and warnings an executed notebook may show in all
NOISE = re.compile(r"\d+%\||it/s|s/it|examples/s|Warning|warn\(")


def series(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, in order; with `only`, those whose name starts with one of them (e.g. "06")."""
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    chosen = [p for p in notebooks if not only or any(p.name.startswith(o) for o in only)]
    if only and not chosen:
        raise SettingsError(
            f"No notebook starts with {' or '.join(only)}; they are {', '.join(p.name for p in notebooks)}."
        )
    return chosen


def execute_notebook(path: Path, out_dir: Path) -> Any:
    """Execute `path` in a fresh kernel (working directory `notebooks/`); save the executed copy and its HTML as a
    reader sees them (a text progress bar's updates as its last state), even when a cell fails, and the kernel's log.
    Returns the executed notebook; a failed cell raises `nbclient.exceptions.CellExecutionError`."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor
    from traitlets.config import Config

    notebook, config = nbformat.read(path, as_version=4), Config()
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / path.name
    # Local sockets, not TCP ports: nothing to eavesdrop on, and no "without encryption" warning. jupyter_client names
    # them `kernel-ipc-N` in the kernel's folder (notebooks/) by default: here they go to a folder of this run's,
    # removed at its end, by an absolute path (client and kernel start in different folders).
    sockets = tempfile.TemporaryDirectory(prefix=f"align-llama-kernel-{os.getpid()}-")
    config.KernelManager.transport, config.KernelManager.ip = "ipc", str(Path(sockets.name) / "kernel")
    resources = {"metadata": {"path": str(NOTEBOOK_DIR)}}
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", config=config, resources=resources)
    try:
        with sockets, executed.with_suffix(".log").open("w") as log:  # the kernel's own messages
            client.execute(stdout=log, stderr=log)
    finally:
        notebook, _ = CoalesceStreamsPreprocessor().preprocess(notebook, {})
        nbformat.write(notebook, executed)
        executed.with_suffix(".html").write_text(HTMLExporter().from_notebook_node(notebook)[0])
        # While a kernel runs, nbclient takes Ctrl-C itself (its handler shuts the kernel down, and the cell then fails
        # with DeadKernelError): stop as an interruption, as outside a notebook.
        if getattr(client, "_async_cleanup_kernel_future", None) is not None:
            raise KeyboardInterrupt
    return notebook


def noise_lines(notebook: Any) -> list[str]:
    """The lines of progress bars and warnings an executed notebook shows (stderr, or text that looks so), counted
    as Jupyter shows them: consecutive outputs of one stream run together, text before a `\\r` is overwritten."""
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    shown, _ = CoalesceStreamsPreprocessor().preprocess(nbformat.from_dict(notebook), {})
    lines = []
    for output in (output for cell in shown["cells"] for output in cell.get("outputs", [])):
        noisy = output.get("name") == "stderr"
        lines += [line for line in output.get("text", "").splitlines() if line and (noisy or NOISE.search(line))]
    return lines


def write_report(profile: Profile) -> Path:
    """`outputs/<profile>/report.md`: each stage's numbers, the evaluation table, answers side by side, plots."""
    from helpers.evaluation import eval_table, fmt

    out = profile.output_dir
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    when = f"Written {datetime.now(UTC):%Y-%m-%d %H:%M UTC}. {profile.describe()}"
    lines = [f"# Run report: {profile.name} profile", "", when, ""]
    for stage in ("sft", "dpo", "rlhf", "benchmark"):
        if stage in metrics:
            items = [(k, v) for k, v in metrics[stage].items() if not isinstance(v, dict | list)]
            lines += [f"## {stage}", ""] + [f"- {k}: {fmt(v)}" for k, v in items] + [""]
    if evaluation := metrics.get("eval"):
        lines += ["## Evaluation on held-out prompts", "", eval_table(evaluation), ""]
    if (out / "samples.json").exists():
        samples = json.loads((out / "samples.json").read_text())
        lines += ["## Answers side by side", ""]
        for i, prompt in enumerate(samples["prompts"]):
            lines += [f"**Prompt:** {prompt[-1]['content']}", ""]
            lines += [f"- *{name}*: {samples[name][i]!r}" for name in MODELS if name in samples] + [""]
    lines += ["## Plots", ""] + [f"![{p.name}]({p.name})" for p in sorted(out.glob("*.png"))] + [""]
    (out / "report.md").write_text("\n".join(lines if metrics else lines + ["No stage has recorded results yet.", ""]))
    return out / "report.md"


def run_series(profile: Profile, only: list[str]) -> int:
    """Execute the notebooks; 1 when one fails or shows more than `MAX_NOISE_LINES` lines of noise."""
    from nbclient.exceptions import CellExecutionError
    from tqdm.auto import tqdm

    # Every kernel resolves the same profile, backend, seed and outputs folder as this process.
    os.environ.update(
        TUTORIAL_PROFILE=profile.name,
        TUTORIAL_BACKEND=profile.backend,
        TUTORIAL_SEED=str(profile.seed),
        TUTORIAL_OUTPUTS=profile.outputs_root,
    )
    out_dir = profile.output_dir / "notebooks"
    progress = tqdm(series(only), desc="notebooks", unit="nb")
    for path in progress:
        progress.set_postfix_str(path.name)
        start = time.perf_counter()
        try:
            noise = noise_lines(execute_notebook(path, out_dir))
        except CellExecutionError as e:
            print(f"\n{path.name} failed; the executed copy is in {out_dir / path.name}.\n{e}", file=sys.stderr)
            return 1
        progress.write(f"{path.name}: done in {time.perf_counter() - start:.0f} s, {len(noise)} lines of noise")
        if len(noise) > MAX_NOISE_LINES:
            print(f"{path.name}: more than {MAX_NOISE_LINES} lines of progress bars or warnings:", file=sys.stderr)
            print("\n".join(noise[:20]), file=sys.stderr)
            return 1
    print(f"Executed notebooks: {out_dir}\nReport: {write_report(profile)}\nMetrics: {out_dir.parent / 'metrics.json'}")
    return 0


def run_stage(profile: Profile, stage: str) -> int:
    """Train one stage (and what it starts from, when missing); under `accelerate launch`, one process a GPU."""
    from accelerate import PartialState

    from helpers import machine, rl, training

    # Joins the launcher's process group: NCCL between GPUs; between CPU processes gloo, which needs `cpu=True` (else
    # each process trains alone). The first `PartialState` of a process decides: the Trainer's later ones share it.
    state = PartialState(cpu=not cuda_available())
    print(f"process {state.process_index} of {state.num_processes}: {stage}, backend {profile.backend}", flush=True)
    machine.prepare(profile)
    result = rl.run(profile) if stage == "rl" else training.run(profile, stage)
    if state.is_main_process:
        print(json.dumps(result, indent=1, default=str))
    return 0


def saved(profile: Profile) -> str:
    """What a run has kept in `outputs/<profile>/`: finished stages and the last complete checkpoint of each."""
    from helpers.training import complete_checkpoints

    out = profile.output_dir
    done = [p.name for p in [*sorted(out.glob("*-adapter")), out / "reward-model"] if p.exists()]
    last = [f"{p.name}/{c[-1].name}" for p in sorted(out.glob("*-checkpoints")) if (c := complete_checkpoints(p))]
    return ", ".join(done + last) or "nothing yet"


def main(argv: list[str] | None = None) -> int:
    """The command line. A configuration or preflight problem prints its message alone and exits with 2; Ctrl-C
    stops with one line saying what was saved (a re-run resumes)."""
    parser = argparse.ArgumentParser(prog="python -m helpers.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="run only these notebooks, by number (e.g. 06 07); default: all")
    parser.add_argument("--stage", choices=("sft", "dpo", "rl"), help="train this stage instead of running notebooks")
    args = parser.parse_args(argv)
    from helpers.machine import PreflightError, prepare

    signal.signal(signal.SIGINT, _interrupted)
    profile = None
    try:
        profile = load_profile()
        if args.stage:
            return run_stage(profile, args.stage)
        prepare(profile)  # the checks before any notebook starts, not an hour into one
        return run_series(profile, args.only)
    except (SettingsError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:  # Ctrl-C: the kernel dies with it, and nbclient's cleanup raises in turn
        if not (INTERRUPTED or isinstance(e, KeyboardInterrupt)):
            raise
        saving = f"Saved in {profile.output_dir}: {saved(profile)}"
        print(f"\nStopped. {saving}. Run the same command again to resume.", file=sys.stderr)
        return 130


INTERRUPTED = False


def _interrupted(signum: int, frame: Any) -> None:
    global INTERRUPTED
    INTERRUPTED = True
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
