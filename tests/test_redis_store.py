"""The cluster's layout in Redis (hisock_gevent.redis_store) against a real redis-server, no workers.

Each test counts the commands Redis ran (``INFO commandstats``, which counts the commands
a script runs too), so the cost of a heartbeat or of reaping is a number, not a guess.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, Iterator, List

import pytest
from redis_server import redis_server  # noqa: F401  (a fixture)

from hisock_gevent.cluster_messages import ClientEntry, Here, Mark, Reaped, decode
from hisock_gevent.redis_store import RedisStore

pytestmark = pytest.mark.timeout(30)

TTL = 0.3
NAMESPACE = "store-test"


@pytest.fixture
def redis_client(redis_server) -> Iterator:  # noqa: F811
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def store(worker: str, malformed: List[str]) -> RedisStore:
    return RedisStore(NAMESPACE, worker, TTL, malformed.append)


def entries(worker: str, count: int) -> Dict[str, ClientEntry]:
    made = [ClientEntry(f"{worker}#{n}", worker, ("10.0.0.1", 1000 + n), f"{worker}-c{n}", "red", True, 1.0 + n) for n in range(count)]
    return {entry.client_id: entry for entry in made}


def calls(client) -> Dict[str, int]:
    """Commands run since the last call, by name (scripts' own commands included)."""
    counted = {name.replace("cmdstat_", ""): stats["calls"] for name, stats in client.info("commandstats").items()}
    client.config_resetstat()
    counted.pop("info", None)
    counted.pop("config|resetstat", None)
    return counted


def test_a_heartbeat_is_one_script_call_whatever_the_number_of_workers(redis_client) -> None:
    malformed: List[str] = []
    stores = [store(f"w{n}", malformed) for n in range(12)]
    for each in stores:
        each.heartbeat(redis_client)  # loads the script, joins the set
    calls(redis_client)

    beats = [each.heartbeat(redis_client) for each in stores]

    counted = calls(redis_client)
    assert counted.pop("evalsha") == 12
    # Per beat: the clock, our score, our tombstone, the dead: four commands, never one per worker.
    assert counted == {"time": 12, "zadd": 12, "zscore": 12, "zrangebyscore": 12}
    assert all(beat.dead == [] and not beat.added and not beat.reaped for beat in beats)


@pytest.mark.slow
def test_reaping_a_dead_worker_reads_only_its_own_clients_and_happens_once(redis_client) -> None:
    malformed: List[str] = []
    alive, other, dead = store("alive", malformed), store("other", malformed), store("dead", malformed)
    for each, count in ((alive, 500), (other, 500), (dead, 3)):
        each.heartbeat(redis_client)
        each.rewrite(redis_client, entries(each.worker_id, count))
    time.sleep(TTL + 0.1)
    alive.heartbeat(redis_client)
    other.heartbeat(redis_client)
    calls(redis_client)

    assert alive.heartbeat(redis_client).dead == ["dead"]
    messages = alive.reap(redis_client, "dead")

    counted = calls(redis_client)
    assert counted["hgetall"] == 1  # the dead worker's hash, and no other
    assert sum(len(message.entries) for message in messages) == 3
    assert all(isinstance(message, Reaped) and message.worker == "dead" for message in messages)
    assert other.reap(redis_client, "dead") == []  # already done: exactly one reaper
    assert redis_client.exists(dead.my_clients_key) == 0
    assert sorted(worker.decode() for worker in redis_client.zrange(alive.workers_key, 0, -1)) == ["alive", "other"]
    assert malformed == []


@pytest.mark.slow
def test_a_reaped_worker_learns_it_at_its_next_heartbeat(redis_client) -> None:
    malformed: List[str] = []
    survivor, paused = store("survivor", malformed), store("paused", malformed)
    survivor.heartbeat(redis_client)
    first = paused.heartbeat(redis_client)
    assert first.added and not first.reaped
    time.sleep(TTL + 0.1)
    survivor.heartbeat(redis_client)
    survivor.reap(redis_client, "paused")

    beat = paused.heartbeat(redis_client)

    assert beat.added and beat.reaped
    again = paused.heartbeat(redis_client)  # a stale beat delivered late would see this too
    assert again.reaped and not again.added
    paused.rewrite(redis_client, entries("paused", 1))
    assert not paused.heartbeat(redis_client).reaped  # until its clients are written back


@pytest.mark.slow
def test_a_worker_alive_again_is_not_reaped(redis_client) -> None:
    malformed: List[str] = []
    survivor, slow = store("survivor", malformed), store("slow", malformed)
    slow.heartbeat(redis_client)
    slow.rewrite(redis_client, entries("slow", 2))
    time.sleep(TTL + 0.1)
    assert survivor.heartbeat(redis_client).dead == ["slow"]
    slow.heartbeat(redis_client)  # it beats before the survivor acts on what it saw

    assert survivor.reap(redis_client, "slow") == []
    assert redis_client.hlen(slow.my_clients_key) == 2


def test_rewrite_replaces_our_clients_and_tells_everyone_the_complete_list(redis_client) -> None:
    malformed: List[str] = []
    worker = store("w", malformed)
    worker.rewrite(redis_client, entries("w", 3))
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(worker.all_channel)
    pubsub.get_message(timeout=1)

    worker.rewrite(redis_client, entries("w", 1))

    raw = pubsub.get_message(timeout=2)
    pubsub.close()
    assert raw is not None
    assert decode(raw["data"]) == Here("w", tuple(entries("w", 1).values()), complete=True)
    assert list(redis_client.hgetall(worker.my_clients_key)) == [b"w#0"]


def test_a_snapshot_skips_entries_that_are_not_ours_and_says_so(redis_client) -> None:
    malformed: List[str] = []
    worker = store("w", malformed)
    worker.heartbeat(redis_client)
    worker.rewrite(redis_client, entries("w", 2))
    redis_client.hset(worker.my_clients_key, "junk", b"\xc1")
    redis_client.hset(worker.my_clients_key, "w#9", entries("elsewhere", 1)["elsewhere#0"].to_wire())

    snapshot = worker.snapshot(redis_client, Mark("w", "token").to_wire())

    assert snapshot.workers == ["w"]
    assert sorted(entry.client_id for entry in snapshot.entries) == ["w#0", "w#1"]
    assert len(malformed) == 2


def test_a_snapshot_marks_its_place_in_the_readers_stream(redis_client) -> None:
    reader, writer = store("reader", []), store("writer", [])
    writer.heartbeat(redis_client)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(reader.all_channel, reader.my_channel)
    pubsub.get_message(timeout=1)
    writer.rewrite(redis_client, entries("writer", 1))  # before the snapshot: in it

    snapshot = reader.snapshot(redis_client, Mark("reader", "t1").to_wire())
    writer.rewrite(redis_client, entries("writer", 2))  # after: news

    received = []
    deadline = time.monotonic() + 5
    while len(received) < 3 and time.monotonic() < deadline:
        raw = pubsub.get_message(timeout=0.5)  # None for a subscription's confirmation, too
        if raw is not None:
            received.append(decode(raw["data"]))
    pubsub.close()
    assert [type(message).__name__ for message in received] == ["Here", "Mark", "Here"]
    assert [entry.client_id for entry in snapshot.entries] == ["writer#0"]


def test_rejoining_after_redis_restarted_empty_is_never_read_half_done(redis_server, figure) -> None:  # noqa: F811
    """A worker that (re)connects beats and writes its clients back in one step: another
    worker's snapshot, taken at any moment meanwhile, sees it either absent or alive with
    all its clients, never alive with none (its clients would be heard leaving and joining)."""
    import redis

    writer_client, reader_client = redis.Redis.from_url(redis_server.url), redis.Redis.from_url(redis_server.url)
    worker, reader = store("back", []), store("reader", [])
    mine = entries("back", 3)
    rounds, seen, half_done = 300, {"absent": 0, "whole": 0}, 0
    stop = threading.Event()

    def rejoin_again_and_again() -> None:
        for _ in range(rounds):
            writer_client.flushall()  # Redis restarted empty
            worker.rejoin(writer_client, mine)
        stop.set()

    thread = threading.Thread(target=rejoin_again_and_again, daemon=True)
    thread.start()
    try:
        for _ in range(100_000):  # bounded; ends with the writer
            if stop.is_set():
                break
            snapshot = reader.snapshot(reader_client, Mark("reader", "t").to_wire())
            if "back" not in snapshot.workers:
                seen["absent"] += 1
            elif len(snapshot.entries) == len(mine):
                seen["whole"] += 1
            else:
                half_done += 1
    finally:
        thread.join(10)
        writer_client.close()
        reader_client.close()
    figure("snapshots during 300 rejoins: absent / whole / half done", f"{seen['absent']} / {seen['whole']} / {half_done}")
    assert seen["whole"] > 0
    assert half_done == 0


def test_rejoin_reports_what_the_heartbeat_found_before_the_write(redis_client) -> None:
    malformed: List[str] = []
    survivor, paused = store("survivor", malformed), store("paused", malformed)
    survivor.heartbeat(redis_client)
    paused.rejoin(redis_client, entries("paused", 2))
    time.sleep(TTL + 0.1)
    survivor.heartbeat(redis_client)
    survivor.reap(redis_client, "paused")

    beat, published = paused.rejoin(redis_client, entries("paused", 2))

    assert beat.added and beat.reaped and published == 1
    assert redis_client.hlen(paused.my_clients_key) == 2
    assert not paused.heartbeat(redis_client).reaped  # the tombstone went with the write
