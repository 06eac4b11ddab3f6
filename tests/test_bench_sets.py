"""loadtest/bench_sets.py: two sets of bench.py results compared case by case (no sockets).

The sets are written here as bench.py's JSON with known ratios, so each verdict is known:
a ratio that got worse by more than the limit in the case's better direction is reported
and makes the exit status 1; one that moved less, or got better, is "within".
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_sets", ROOT / "loadtest" / "bench_sets.py")
assert _spec is not None and _spec.loader is not None
bench_sets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sets)

pytestmark = pytest.mark.timeout(30)


def _run(rt: Dict[int, float], fanout_ms: Dict[int, float], baseline_rt: float = 1000.0, baseline_ms: float = 10.0) -> dict:
    """A bench.py result document: S1 (C=rt's keys, W=1) and S2 (N=fanout_ms's keys)."""
    s1 = [{"clients": c, "window": 1, "hisock": {"rt_per_s": v}, "baseline": {"rt_per_s": baseline_rt}} for c, v in rt.items()]
    s2 = [{"clients": n, "hisock": {"median_ms": v}, "baseline": {"median_ms": baseline_ms}} for n, v in fanout_ms.items()]
    return {"results": {"S1": s1, "S2": s2}}


def _write_set(tmp_path: Path, name: str, runs: List[dict]) -> str:
    for i, run in enumerate(runs):
        (tmp_path / f"{name}{i}.json").write_text(json.dumps(run))
    return str(tmp_path / f"{name}*.json")


def test_a_ratio_worse_by_more_than_the_limit_is_reported_in_its_better_direction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: S1 C=50 at 0.80 of the baseline, S1 C=500 at 0.70, S2 N=100 at 1.00.
    # After: C=50 0.74 (7.5 % worse), C=500 0.69 (1.4 % worse), N=100 0.90 (10 % better:
    # a fan-out time, lower is better).  Small run-to-run spread around each.
    before = _write_set(tmp_path, "old", [_run({50: 800 + d, 500: 700 - d}, {100: 10.0 + d / 100}) for d in (-4, 0, 4, 1, -1)])
    after = _write_set(tmp_path, "new", [_run({50: 740 + d, 500: 690 - d}, {100: 9.0 + d / 100}) for d in (-4, 0, 4, 1, -1)])

    status = bench_sets.main([before, after, "--rounds", "200"])

    out = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.startswith(("S1", "S2"))}
    assert status == 1
    assert lines["S1 C=50 W=1"].endswith("WORSE"), out
    assert " 0.925 " in lines["S1 C=50 W=1"], out
    assert lines["S1 C=500 W=1"].endswith("within"), out
    assert lines["S2 N=100"].endswith("within") and " 0.900 " in lines["S2 N=100"], out
    assert "2 of 3 cases within 5%; worse: S1 C=50 W=1" in out


def test_a_slower_fan_out_is_worse_and_the_baseline_drift_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The baseline itself is 10 % faster in the after set, hisock unchanged: hisock's
    # ratio to it is 10 % worse, and the drift column says the baseline moved.
    before = _write_set(tmp_path, "old", [_run({}, {1000: 12.0}, baseline_ms=10.0)] * 3)
    after = _write_set(tmp_path, "new", [_run({}, {1000: 12.0}, baseline_ms=9.0)] * 3)

    rows = bench_sets.compare(bench_sets.load_samples(bench_sets.expand(before)), bench_sets.load_samples(bench_sets.expand(after)), rounds=50)

    (row,) = rows
    assert row.case == "S2 N=1000" and not row.higher_is_better
    assert row.change == pytest.approx(10 / 9)
    assert row.baseline_drift == pytest.approx(0.9)
    assert row.hisock_change == pytest.approx(1.0)  # the library itself did not move
    assert not row.within(0.05) and row.within(0.12)
    assert row.low == pytest.approx(row.high) == pytest.approx(10 / 9)  # identical runs: no spread


def test_failed_cases_and_runs_without_the_baseline_are_skipped(tmp_path: Path) -> None:
    broken = {"results": {"S1": [{"clients": 1, "window": 1, "hisock": {"rt_per_s": 5.0}, "baseline": None}], "S2": []}}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))

    assert bench_sets.load_samples([str(path)]) == {}
    with pytest.raises(SystemExit):
        bench_sets.main([str(path), str(path)])


def test_the_cpu_measure_compares_the_servers_cpu_per_unit_lower_is_better(tmp_path: Path) -> None:
    def run(cpu_us: float) -> dict:
        row = {"clients": 50, "window": 4, "hisock": {"server_cpu_us_per_rt": cpu_us}, "baseline": {"server_cpu_us_per_rt": 10.0}}
        return {"results": {"S1": [row], "S2": []}}

    before = _write_set(tmp_path, "old", [run(15.0)] * 3)
    cheaper = _write_set(tmp_path, "cheap", [run(12.0)] * 3)
    dearer = _write_set(tmp_path, "dear", [run(16.5)] * 3)
    figures = bench_sets.MEASURES["cpu"]

    def load(pattern: str) -> dict:
        return bench_sets.load_samples(bench_sets.expand(pattern), figures)

    (better,) = bench_sets.compare(load(before), load(cheaper), rounds=20, figures=figures)
    (worse,) = bench_sets.compare(load(before), load(dearer), rounds=20, figures=figures)

    assert not better.higher_is_better and better.change == pytest.approx(0.8) and better.within(0.05)
    assert worse.change == pytest.approx(1.1) and not worse.within(0.05)
    assert bench_sets.main([before, dearer, "--measure", "cpu", "--rounds", "20"]) == 1
