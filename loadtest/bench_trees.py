"""``bench.py``'s S1 and S2 cases for two trees and the baseline, interleaved case by case.

Two separate ``bench.py`` runs, one per tree, measure each tree's ratio to the baseline
minutes apart, and on a shared machine the baseline's own figure drifts by 10-25 % in
that time: a before/after question within 5 % then takes dozens of runs and may still not
settle.  Here each case (``S1 C=50 W=4``, ``S2 N=100``, ...) is measured three times in a
row, for the old tree, the new tree and the baseline, before the next case starts, and the
order of the three turns from round to round (each takes each place equally often).  Both
trees' ratios in a round divide by the same baseline measurement, taken next to them.

    python loadtest/bench_trees.py OLD_TREE NEW_TREE [--rounds 6] [--out DIR] [--only S2]

A tree is a directory holding a ``hisock_gevent`` package (a git worktree of another
commit); the hisock server of a run imports it through ``PYTHONPATH``.  Each round writes
``DIR/old-R.json`` and ``DIR/new-R.json`` in ``bench.py``'s format (hisock's figure beside
the shared baseline's), and the end prints ``bench_sets.py``'s comparison of the two sets;
``bench_sets.py 'DIR/old-*.json' 'DIR/new-*.json'`` prints it again, ``--measure cpu``
for the servers' CPU.  Loopback only; every case is bounded by ``bench.py``'s time bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import bench_sets  # noqa: E402

#: The three runs of a case: (label, the tree it imports, or None for the baseline).
Run = Tuple[str, Any]
#: A case: (scenario, its key in bench.py's rows, the function measuring one server).
Case = Tuple[str, Dict[str, Any], Callable[[str], Dict[str, Any]]]


def orders(round_number: int, labels: Sequence[str]) -> List[str]:
    """The order of the runs in one round: rotated by the round, reversed every other
    round, so that over ``2 * len(labels)`` rounds each label takes each place twice."""
    turn = round_number % len(labels)
    rotated = list(labels[turn:]) + list(labels[:turn])
    return rotated[::-1] if (round_number // len(labels)) % 2 else rotated


def quick_cases(cfg: Dict[str, Any], pin: bool, scenarios: Sequence[str]) -> List[Case]:
    """Every S1 and S2 case of ``cfg`` (a ``bench.MODES`` entry), as measuring functions."""
    cases: List[Case] = []
    if "S1" in scenarios:
        for clients, window in cfg["s1_cases"]:
            cases.append(("S1", {"clients": clients, "window": window},
                          lambda kind, c=clients, w=window: bench.run_s1(kind, c, w, cfg, pin)))
    if "S2" in scenarios:
        for clients in cfg["s2_clients"]:
            cases.append(("S2", {"clients": clients}, lambda kind, n=clients: bench.run_s2(kind, n, cfg, pin)))
    return cases


def measure(run: Run, case: Case, failures: List[str]) -> Dict[str, Any]:
    """One server on one case: the hisock server importing the run's tree, or the baseline."""
    label, tree = run
    scenario, key, func = case
    if tree is not None:
        os.environ["PYTHONPATH"] = tree
    try:
        name = f"{scenario} {' '.join(f'{k}={v}' for k, v in key.items())} {label}"
        return bench.attempt(name, lambda: func("hisock" if tree is not None else "baseline"), failures)
    finally:
        os.environ.pop("PYTHONPATH", None)


def one_round(round_number: int, runs: Sequence[Run], cases: Sequence[Case], failures: List[str]) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
    """Every case once for each run, in the round's order; bench.py-shaped results per tree."""
    by_label = dict(runs)
    out: Dict[str, Dict[str, List[Dict[str, Any]]]] = {label: {} for label, tree in runs if tree is not None}
    for case in cases:
        scenario, key, _ = case
        figures = {label: measure((label, by_label[label]), case, failures) for label in orders(round_number, [label for label, _ in runs])}
        for label in out:
            out[label].setdefault(scenario, []).append({**key, "hisock": figures[label], "baseline": figures["baseline"]})
    return out


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the tree before the change (a directory holding hisock_gevent)")
    parser.add_argument("new", help="the tree after the change")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of every case (default 6: every order once, each run in each place twice)")
    parser.add_argument("--only", default="S1,S2", help="comma-separated subset of S1,S2 (default both)")
    parser.add_argument("--mode", choices=("smoke", "quick", "full"), default="quick", help="bench.py's case sizes (default quick)")
    parser.add_argument("--out", default=os.path.join(bench.RESULTS_DIR, f"trees-{time.strftime('%Y%m%d-%H%M%S')}"), help="where the JSON files go")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and the generators to the others")
    args = parser.parse_args(list(argv) or None)
    for tree in (args.old, args.new):
        if not os.path.isdir(os.path.join(tree, "hisock_gevent")):
            parser.error(f"{tree} holds no hisock_gevent package")
    cfg = bench.MODES[args.mode]
    cases = quick_cases(cfg, not args.no_pin, args.only.split(","))
    runs: List[Run] = [("old", os.path.abspath(args.old)), ("new", os.path.abspath(args.new)), ("baseline", None)]
    os.makedirs(args.out, exist_ok=True)
    failures: List[str] = []
    for round_number in range(args.rounds):
        bench.log(f"round {round_number + 1} of {args.rounds}: {' '.join(orders(round_number, [label for label, _ in runs]))}")
        for label, results in one_round(round_number, runs, cases, failures).items():
            with open(os.path.join(args.out, f"{label}-{round_number + 1:02d}.json"), "w") as f:
                json.dump({"meta": {"tree": dict(runs)[label], "mode": args.mode, "round": round_number + 1}, "results": results}, f, indent=1)
    old_files = bench_sets.expand(os.path.join(args.out, "old-*.json"))
    new_files = bench_sets.expand(os.path.join(args.out, "new-*.json"))
    rows = bench_sets.compare(bench_sets.load_samples(old_files), bench_sets.load_samples(new_files))
    print("\n".join(bench_sets.render(rows, 0.05)))
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
