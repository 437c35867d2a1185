"""The README's facts are the code's: its table of `TUTORIAL_*` variables is `helpers.settings.VARIABLES`, its
times are those of `benchmarks/results/quick-profile-estimate.json` for the launchable's A100 40 GB, its `quick`
sizes are `quick_profile()`'s, and it lists every notebook."""

from __future__ import annotations

import json
import re

import pytest

from helpers.settings import PROJECT_ROOT, VARIABLES, quick_profile

README = (PROJECT_ROOT / "README.md").read_text()
PROSE = " ".join(README.split())  # line breaks as spaces
ESTIMATE = json.loads((PROJECT_ROOT / "benchmarks/results/quick-profile-estimate.json").read_text())


def variables_table() -> str:
    lines = ["| variable | meaning | default |", "|---|---|---|"]
    return "\n".join(lines + [f"| `{name}` | {meaning} | {default} |" for name, meaning, default in VARIABLES])


def duration(minutes: float) -> str:
    """How the README writes an estimated time."""
    return "under a minute" if minutes < 1 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def test_variables_table_is_the_code_s():
    assert README.count("| variable | meaning | default |") == 1
    assert variables_table() in README, f"paste into README.md:\n{variables_table()}"
    assert set(re.findall(r"\bTUTORIAL_[A-Z_]+", README)) == {name for name, _, _ in VARIABLES}


def notebook_rows() -> dict[str, list[str]]:
    rows = re.findall(r"^\| `(\d\d)_\w+` \|(.*)\|$", README, re.M)
    return {number: [cell.strip() for cell in cells.split("|")] for number, cells in rows}


def test_every_notebook_has_a_row():
    notebooks = {path.name[:2] for path in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert notebooks <= set(notebook_rows())


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_times_are_the_estimate_for_the_launchable_gpu(profile):
    assert ESTIMATE["estimated_for"]["name"] == "A100 40 GB"
    estimate = ESTIMATE["profiles"][profile]
    column = {"quick": -2, "full": -1}[profile]
    for number, cells in notebook_rows().items():
        assert cells[column] == duration(estimate["minutes_by_notebook"][number]), f"notebook {number}, {profile}"
    total = f"`{profile}`: about {duration(estimate['total_minutes'])}"
    assert PROSE.count(total) == 2, f"README should say {total!r} in the quick start and under Brev"


def test_the_launchable_gpu_is_the_40_gb_a100():
    launchable = (PROJECT_ROOT / "launchable.yaml").read_text()
    assert "instance_type: a2-highgpu-1g:nvidia-tesla-a100:1" in launchable  # a2-highgpu: A100 40 GB
    assert "80 GB" not in README.split("## Run on Brev")[1].split("**How long.**")[1].split("**Publishing")[0]
    peaks = ESTIMATE["profiles"]["quick"]["peak_gib"]
    assert f"{peaks['rl']} GiB measured on the H200" in PROSE


def test_quick_sizes_are_the_profile_s():
    data, rl = quick_profile().data, quick_profile().rl
    sizes = f"({data.max_sft_rows:,} SFT rows, {data.max_preference_rows:,} preference pairs, {rl.max_steps} RL steps)"
    assert sizes in PROSE


def test_quick_start_is_two_commands():
    block = README.split("## Quick start")[1].split("```bash\n")[1].split("```")[0]
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["make run", "make test"]


@pytest.mark.parametrize("number", ["02", "03", "04", "05", "06", "07"])
def test_each_gpu_notebook_states_its_estimate(number):
    notebook = json.loads(next((PROJECT_ROOT / "notebooks").glob(f"{number}_*.ipynb")).read_text())
    intro = " ".join("".join(notebook["cells"][0]["source"]).split())
    quick, full = (duration(ESTIMATE["profiles"][p]["minutes_by_notebook"][number]) for p in ("quick", "full"))
    assert f"`quick` (the default on a GPU) about {quick}, `full` about {full}." in intro


SEEDS = json.loads((PROJECT_ROOT / "benchmarks/results/smoke-seeds.json").read_text())


def spread(values: list[float]) -> str:
    """Min / median / max as the README writes them (the median of an even count: the upper one, as the script's)."""
    ordered = sorted(values)
    return f"{ordered[0]:.2f} / {ordered[len(ordered) // 2]:.2f} / {ordered[-1]:.2f}"


def test_the_seeds_paragraph_is_the_committed_seeds_run():
    records = SEEDS["records"]
    assert f"--seeds {records[0]['seed']} … {records[-1]['seed']}" in PROSE
    row = " | ".join(spread([r["better_answer_rate"][m] for r in records]) for m in ("base", "sft", "dpo"))
    assert f"| better-answer rate on held-out problems | {row} |" in README
    assert f"implicit-reward accuracy: {spread([r['dpo_reward_accuracy'] for r in records])}" in PROSE
    step0_zero = all(r["reward_accuracy_before"] == 0 and r["step0_reward_abs_max"] == 0 for r in records)
    claim = "step-0 evaluation of DPO gives implicit rewards of exactly 0 and a reward accuracy of 0 on every seed"
    assert step0_zero and claim in PROSE
    ratios = [r["sft_loss_last"] / r["sft_loss_first"] for r in records]
    assert f"the last SFT loss is {min(ratios):.2f} to {max(ratios):.2f} of the first" in PROSE
    assert f"{sum(not r['failures'] for r in records)} of {len(records)} seeds meet every criterion" in PROSE
