"""StatsHistory (hisock_gevent.history): the ring of samples behind /history and the charts.

Pure tests: stats() dicts built by hand, clock readings passed in; no sockets, no hub.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from hisock_gevent.history import DEFAULT_HISTORY_POINTS, Sample, StatsHistory

pytestmark = pytest.mark.timeout(20)

WALL = 1_800_000_000.0


def snapshot(
    now: int = 0, joined: int = 0, msg_in: int = 0, msg_out: int = 0, bytes_in: int = 0, bytes_out: int = 0,
    dropped: Dict[str, int] | None = None, left: int = 0,
) -> Dict[str, Any]:
    """The parts of a stats() dict the history reads."""
    return {
        "connections": {"now": now, "peak": now, "accepted": now, "refused": {}},
        "clients": {"joined": joined, "joins": joined, "groups": {}, "ungrouped": joined, "left": left, "dropped": dropped or {}},
        "messages": {"in": msg_in, "out": msg_out},
        "bytes": {"in": bytes_in, "out": bytes_out},
        "rejected": {},
    }


def test_the_first_snapshot_is_only_a_baseline():
    history = StatsHistory()
    assert history.record(snapshot(now=3), 100.0, WALL) is None
    assert len(history) == 0
    assert history.as_dict() == {"interval_s": 1.0, "points": DEFAULT_HISTORY_POINTS, "latest": 0, "samples": []}


def test_a_sample_has_the_gauges_now_and_the_rates_since_the_snapshot_before():
    history = StatsHistory()
    history.record(snapshot(now=1, joined=1, msg_in=10, msg_out=20, bytes_in=1000, bytes_out=3000), 100.0, WALL)
    sample = history.record(
        snapshot(now=4, joined=3, msg_in=30, msg_out=21, bytes_in=1500, bytes_out=9000, left=2), 102.0, WALL + 2
    )
    assert sample == Sample(
        seq=1, at=WALL + 2, connections=4, clients=3,
        messages_in_per_s=10.0, messages_out_per_s=0.5, bytes_in_per_s=250.0, bytes_out_per_s=3000.0,
        dropped=0,
    )


def test_dropped_counts_clients_dropped_since_the_sample_before_by_any_reason_but_leaving():
    history = StatsHistory()
    history.record(snapshot(dropped={"kicked": 1}), 0.0, WALL)
    history.record(snapshot(dropped={"kicked": 2, "slow_reader": 3}, left=7), 1.0, WALL + 1)
    last = history.record(snapshot(dropped={"kicked": 2, "slow_reader": 3}, left=9), 2.0, WALL + 2)
    assert [sample.dropped for sample in history.samples()] == [4, 0]
    assert last is not None and last.seq == 2


def test_a_clock_that_did_not_move_adds_nothing_and_keeps_the_older_baseline():
    history = StatsHistory()
    history.record(snapshot(msg_in=0), 10.0, WALL)
    assert history.record(snapshot(msg_in=5), 10.0, WALL) is None
    sample = history.record(snapshot(msg_in=10), 12.0, WALL + 2)
    assert sample is not None and sample.messages_in_per_s == 5.0


def test_a_counter_that_went_back_counts_as_no_change():
    history = StatsHistory()
    history.record(snapshot(msg_in=100, dropped={"kicked": 5}), 0.0, WALL)
    sample = history.record(snapshot(msg_in=40, dropped={}), 1.0, WALL + 1)
    assert sample is not None and sample.messages_in_per_s == 0 and sample.dropped == 0


def test_the_ring_keeps_only_the_newest_points_however_long_it_runs():
    history = StatsHistory(points=300)
    for second in range(20_001):
        history.record(snapshot(now=second % 7, msg_in=second * 3), float(second), WALL + second)
    samples = history.samples()
    assert len(history) == len(samples) == 300
    assert [sample.seq for sample in samples] == list(range(19_701, 20_001))
    assert all(sample.messages_in_per_s == 3.0 for sample in samples)


def test_samples_since_a_seq_are_only_the_newer_ones_and_latest_is_the_newest_seq():
    history = StatsHistory(points=5, interval=0.5)
    for second in range(9):
        history.record(snapshot(msg_in=second), second / 2, WALL + second / 2)
    answer = history.as_dict(since=6)
    assert answer["interval_s"] == 0.5 and answer["points"] == 5 and answer["latest"] == 8
    assert [sample["seq"] for sample in answer["samples"]] == [7, 8]
    assert [sample["seq"] for sample in history.as_dict(since=0)["samples"]] == [4, 5, 6, 7, 8]
    assert history.as_dict(since=8)["samples"] == []
    assert json.loads(json.dumps(answer)) == answer


def test_a_sample_as_json_names_every_field():
    history = StatsHistory()
    history.record(snapshot(), 0.0, WALL)
    history.record(snapshot(now=2, joined=1), 1.0, WALL + 1)
    assert list(history.as_dict()["samples"][0]) == [
        "seq", "at", "connections", "clients",
        "messages_in_per_s", "messages_out_per_s", "bytes_in_per_s", "bytes_out_per_s", "dropped",
    ]


@pytest.mark.parametrize(("points", "interval"), [(0, 1.0), (-1, 1.0), (10, 0.0), (10, -2.0)])
def test_a_history_needs_at_least_one_point_and_a_positive_interval(points, interval):
    with pytest.raises(ValueError):
        StatsHistory(points, interval)
