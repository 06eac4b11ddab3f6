"""Two sets of ``bench.py`` runs, before and after a change: did a ratio to the baseline move?

One ``bench.py --quick`` run's ratio to the hand-written baseline differs from the next
run's by 10-20 % on a shared machine (more for S2's fan-out times), so a before/after
question within 5 % needs many runs of each tree, alternated, and a statement of how sure
the answer is.  This script reads the JSON files of the two sets and prints, for every S1
and S2 case:

* before, after: the median over the set's runs of hisock's ratio to the baseline (S1 round
  trips per second, higher is better; S2 fan-out time, lower is better);
* after/before, and the verdict against ``--limit`` (default 5 %) in the case's better
  direction: "within" when the ratio did not get worse by more than the limit;
* a bootstrap interval of after/before (runs resampled within each set, fixed seed): how
  far the figure could move with other runs of the same code;
* the baseline's own drift: its median in the after set over its median in the before set.
  The baseline is the same code in both sets, so this is what noise alone does to a median;
* hisock's own figure, after/before (medians): how the library moved, without the
  baseline's noise (and without its correction for a machine that got faster or slower).

    python loadtest/bench_sets.py 'results/old*.json' 'results/new*.json' [--limit 0.05] [--measure rate|cpu]

Each argument is a glob pattern (quote it) or a file; a set may list several patterns
separated by commas.  The runs of one set must come from the same tree, with
``--servers hisock,baseline`` and the same mode.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import statistics
import sys
from typing import Dict, List, NamedTuple, Sequence, Tuple

#: (scenario, figure, True when higher is better) for the ratios the before/after check is
#: about: the rates the scenarios are judged by ("rate"), or the server's CPU time per
#: round trip and per broadcast ("cpu": steadier, and the library's own cost).
MEASURES = {
    "rate": (("S1", "rt_per_s", True), ("S2", "median_ms", False)),
    "cpu": (("S1", "server_cpu_us_per_rt", False), ("S2", "server_cpu_ms_per_broadcast", False)),
}
FIGURES = MEASURES["rate"]


class Sample(NamedTuple):
    """One case of one run: hisock's figure and the baseline's."""

    hisock: float
    baseline: float


class Row(NamedTuple):
    """One case compared across the two sets."""

    case: str
    higher_is_better: bool
    before: float
    after: float
    change: float
    low: float
    high: float
    baseline_drift: float
    hisock_change: float
    runs: Tuple[int, int]

    def within(self, limit: float) -> bool:
        """True when the ratio got worse by no more than ``limit`` (or got better)."""
        return self.change >= 1 - limit if self.higher_is_better else self.change <= 1 + limit


def expand(patterns: str) -> List[str]:
    """The files a comma-separated list of glob patterns names, sorted, each once."""
    files: List[str] = []
    for pattern in patterns.split(","):
        matched = sorted(glob.glob(pattern)) or ([pattern] if not glob.has_magic(pattern) else [])
        files.extend(f for f in matched if f not in files)
    return files


def load_samples(paths: Sequence[str], figures: Sequence[Tuple[str, str, bool]] = FIGURES) -> Dict[str, List[Sample]]:
    """Every S1/S2 case in the runs, keyed ``"S1 C=50 W=4"`` / ``"S2 N=1000"``."""
    cases: Dict[str, List[Sample]] = {}
    for path in paths:
        with open(path) as f:
            results = json.load(f)["results"]
        for scenario, figure, _ in figures:
            for row in results.get(scenario, []):
                hisock, baseline = row.get("hisock"), row.get("baseline")
                if not hisock or not baseline or figure not in hisock or figure not in baseline:
                    continue  # a failed case, or a run without the baseline
                key = f"S1 C={row['clients']} W={row['window']}" if scenario == "S1" else f"S2 N={row['clients']}"
                cases.setdefault(key, []).append(Sample(hisock[figure], baseline[figure]))
    return cases


def median_ratio(samples: Sequence[Sample]) -> float:
    return statistics.median(s.hisock / s.baseline for s in samples)


def bootstrap(before: Sequence[Sample], after: Sequence[Sample], rounds: int, rng: random.Random) -> Tuple[float, float]:
    """The 5th and 95th percentiles of after/before over resampled sets."""
    changes = sorted(
        median_ratio(rng.choices(after, k=len(after))) / median_ratio(rng.choices(before, k=len(before)))
        for _ in range(rounds)
    )
    return changes[int(0.05 * (rounds - 1))], changes[int(0.95 * (rounds - 1))]


def compare(
    before: Dict[str, List[Sample]], after: Dict[str, List[Sample]], rounds: int = 2000, seed: int = 1,
    figures: Sequence[Tuple[str, str, bool]] = FIGURES,
) -> List[Row]:
    """A :class:`Row` for every case both sets measured, in the order the before set has them."""
    rng = random.Random(seed)
    rows = []
    for case, old in before.items():
        new = after.get(case)
        if not new:
            continue
        low, high = bootstrap(old, new, rounds, rng)
        drift = statistics.median(s.baseline for s in new) / statistics.median(s.baseline for s in old)
        own = statistics.median(s.hisock for s in new) / statistics.median(s.hisock for s in old)
        b, a = median_ratio(old), median_ratio(new)
        higher = next(h for scenario, _, h in figures if case.startswith(scenario))
        rows.append(Row(case, higher, b, a, a / b, low, high, drift, own, (len(old), len(new))))
    return rows


def render(rows: Sequence[Row], limit: float) -> List[str]:
    lines = [
        f"{'case':<16}{'better':>8}{'runs':>8}{'before':>8}{'after':>8}{'after/before':>14}"
        f"{'90 % interval':>16}{'baseline drift':>16}{'hisock itself':>15}  verdict (limit {limit:.0%})"
    ]
    for r in rows:
        verdict = "within" if r.within(limit) else "WORSE"
        lines.append(
            f"{r.case:<16}{'higher' if r.higher_is_better else 'lower':>8}{f'{r.runs[0]}/{r.runs[1]}':>8}"
            f"{r.before:>8.3f}{r.after:>8.3f}{r.change:>14.3f}{f'{r.low:.3f}-{r.high:.3f}':>16}"
            f"{r.baseline_drift:>16.3f}{r.hisock_change:>15.3f}  {verdict}"
        )
    return lines


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="the runs before the change: glob pattern(s), comma-separated")
    parser.add_argument("after", help="the runs after the change: glob pattern(s), comma-separated")
    parser.add_argument("--limit", type=float, default=0.05, help="how much worse a ratio may get (default 0.05)")
    parser.add_argument("--rounds", type=int, default=2000, help="bootstrap resamplings (default 2000)")
    parser.add_argument(
        "--measure", choices=sorted(MEASURES), default="rate",
        help="rate: S1 round trips/s and S2 fan-out time (default); cpu: the server's CPU per round trip and per broadcast",
    )
    args = parser.parse_args(list(argv) or None)
    old_files, new_files = expand(args.before), expand(args.after)
    if not old_files or not new_files:
        parser.error(f"no files: before {len(old_files)}, after {len(new_files)}")
    figures = MEASURES[args.measure]
    rows = compare(load_samples(old_files, figures), load_samples(new_files, figures), args.rounds, figures=figures)
    if not rows:
        parser.error("no S1 or S2 case with both hisock and baseline figures in both sets")
    print("\n".join(render(rows, args.limit)))
    worse = [r.case for r in rows if not r.within(args.limit)]
    print(f"{len(rows) - len(worse)} of {len(rows)} cases within {args.limit:.0%}" + (f"; worse: {', '.join(worse)}" if worse else ""))
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
