"""loadtest/bench_trees.py: the order of the interleaved runs, and the baseline both trees share (no sockets)."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtest"))
_spec = importlib.util.spec_from_file_location("bench_trees", ROOT / "loadtest" / "bench_trees.py")
assert _spec is not None and _spec.loader is not None
bench_trees = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_trees)

pytestmark = pytest.mark.timeout(30)


def test_over_six_rounds_each_run_takes_each_place_twice_and_every_order_comes_once() -> None:
    labels = ["old", "new", "baseline"]
    rounds = [bench_trees.orders(r, labels) for r in range(6)]

    assert all(sorted(order) == sorted(labels) for order in rounds)
    assert len({tuple(order) for order in rounds}) == 6
    places = collections.Counter((place, label) for order in rounds for place, label in enumerate(order))
    assert set(places.values()) == {2} and len(places) == 9


def test_both_trees_in_a_round_divide_by_the_same_baseline_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    measured: List[str] = []
    figures = iter([100.0, 200.0, 400.0])

    def fake_attempt(label: str, func: Any, failures: List[str]) -> Dict[str, Any]:
        measured.append(label)
        return func()

    monkeypatch.setattr(bench_trees.bench, "attempt", fake_attempt)
    case = ("S1", {"clients": 50, "window": 4}, lambda kind: {"kind": kind, "rt_per_s": next(figures)})
    runs = [("old", "/tree/old"), ("new", "/tree/new"), ("baseline", None)]

    out = bench_trees.one_round(1, runs, [case], [])  # round 1: new, baseline, old

    assert [label.split()[-1] for label in measured] == ["new", "baseline", "old"]
    old_row, new_row = out["old"]["S1"][0], out["new"]["S1"][0]
    assert new_row["hisock"]["rt_per_s"] == 100.0 and old_row["hisock"]["rt_per_s"] == 400.0
    assert old_row["baseline"] is new_row["baseline"] and old_row["baseline"] == {"kind": "baseline", "rt_per_s": 200.0}
    assert old_row["clients"] == 50 and old_row["window"] == 4
