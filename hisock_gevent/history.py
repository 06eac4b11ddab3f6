"""The last few minutes of a server's stats, one sample a second, for the stats page's charts.

:class:`StatsHistory` is a ring of at most ``points`` samples.  Each sample is what changed
between two ``stats()`` snapshots: connections and clients at the time, messages and bytes
per second in and out, and clients dropped in between.  The ring is fed by whoever holds a
clock (:func:`hisock_gevent.monitor.serve_stats` runs a sampler greenlet); nothing here
touches a socket, a greenlet or the clock, so it is tested with plain dicts and numbers.
Its memory is bounded by ``points`` whatever the uptime.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Tuple

__all__ = ["StatsHistory", "Sample", "DEFAULT_HISTORY_POINTS", "DEFAULT_HISTORY_INTERVAL"]

#: Samples kept: five minutes at one a second.
DEFAULT_HISTORY_POINTS = 300
#: Seconds between two samples.
DEFAULT_HISTORY_INTERVAL = 1.0
#: Decimals kept of a per-second rate (the page shows one).
_RATE_DIGITS = 2


class Sample(NamedTuple):
    """One point of the history; a NamedTuple to keep each of the ``points`` small."""

    #: 1 for the first sample of this history, then one more each time.
    seq: int
    #: Wall-clock time of the sample (Unix seconds), for the page's time axis.
    at: float
    connections: int
    clients: int
    messages_in_per_s: float
    messages_out_per_s: float
    bytes_in_per_s: float
    bytes_out_per_s: float
    #: Joined clients dropped (for any reason but a clean goodbye) since the sample before.
    dropped: int


# The counters a sample takes the difference of, read from one stats() snapshot.
_Totals = Tuple[int, int, int, int, int]


def _totals(snapshot: Dict[str, Any]) -> _Totals:
    return (
        snapshot["messages"]["in"],
        snapshot["messages"]["out"],
        snapshot["bytes"]["in"],
        snapshot["bytes"]["out"],
        sum(snapshot["clients"]["dropped"].values()),
    )


class StatsHistory:
    """A bounded ring of :class:`Sample`, fed one ``stats()`` snapshot at a time.

    :param points: samples kept (the oldest goes when a new one comes).
    :param interval: seconds between samples, as the sampler intends (reported with the
        samples so the page can label its time axis; the rates use the real time between
        two snapshots).
    :raises ValueError: ``points`` below 1 or ``interval`` not above 0.
    """

    def __init__(self, points: int = DEFAULT_HISTORY_POINTS, interval: float = DEFAULT_HISTORY_INTERVAL):
        if points < 1:
            raise ValueError(f"a history keeps at least 1 point, not {points}")
        if not interval > 0:
            raise ValueError(f"the interval between samples must be above 0 s, not {interval}")
        self.points = points
        self.interval = interval
        self._samples: Deque[Sample] = deque(maxlen=points)
        self._previous: Optional[Tuple[float, _Totals]] = None
        self._seq = 0

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, snapshot: Dict[str, Any], now: float, wall: float) -> Optional[Sample]:
        """Add the sample that ``snapshot`` (a ``stats()`` dict) makes with the one before.

        :param now: a monotonic clock reading taken with the snapshot (for the rates).
        :param wall: the wall-clock time of the snapshot (shown on the page).
        :returns: the new sample, or None for the first snapshot (there is nothing to take
            a rate against yet) and for one no later than the one before.
        """
        totals = _totals(snapshot)
        previous, self._previous = self._previous, (now, totals)
        if previous is None:
            return None
        seconds = now - previous[0]
        if seconds <= 0:
            self._previous = previous  # keep the older baseline for the next one
            return None
        # Counters only grow; a smaller one means a different source: count it as no change.
        deltas = [max(0, new - old) for new, old in zip(totals, previous[1])]
        messages_in, messages_out, bytes_in, bytes_out = (round(d / seconds, _RATE_DIGITS) for d in deltas[:4])
        self._seq += 1
        sample = Sample(
            seq=self._seq,
            at=round(wall, 3),
            connections=snapshot["connections"]["now"],
            clients=snapshot["clients"]["joined"],
            messages_in_per_s=messages_in,
            messages_out_per_s=messages_out,
            bytes_in_per_s=bytes_in,
            bytes_out_per_s=bytes_out,
            dropped=deltas[4],
        )
        self._samples.append(sample)
        return sample

    def samples(self, since: int = 0) -> List[Sample]:
        """The samples kept whose ``seq`` is above ``since``, oldest first."""
        if since <= 0:
            return list(self._samples)
        return [sample for sample in self._samples if sample.seq > since]

    def as_dict(self, since: int = 0) -> Dict[str, Any]:
        """The JSON form served at ``/history``: ``interval_s``, ``points`` (the ring's
        size), ``latest`` (the newest ``seq``, 0 before the first sample) and ``samples``
        (each a dict of :class:`Sample`'s fields) newer than ``since``."""
        return {
            "interval_s": self.interval,
            "points": self.points,
            "latest": self._seq,
            "samples": [sample._asdict() for sample in self.samples(since)],
        }
