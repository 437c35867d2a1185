"""The committed series estimate is current (same profiles, same rates, same README tables) and `quick` fits an
hour on the launchable's A100 40 GB."""

from __future__ import annotations

import json

import estimate_series


def test_committed_estimate_is_current_and_quick_fits_an_hour():
    committed = json.loads(estimate_series.OUT.read_text())
    fresh = json.loads(json.dumps(estimate_series.estimate(), ensure_ascii=False))
    for key in ("estimated_for", "rates", "profiles", "quick_minutes_by_gpu"):
        assert committed[key] == fresh[key], f"run `python benchmarks/estimate_series.py` ({key} changed)"
    section = estimate_series.README.read_text().split(estimate_series.START)[1].split(estimate_series.END)[0]
    assert section.strip() == estimate_series.render(fresh).strip()
    assert fresh["estimated_for"]["name"] == "A100 40 GB"
    assert fresh["profiles"]["quick"]["total_minutes"] <= 60
