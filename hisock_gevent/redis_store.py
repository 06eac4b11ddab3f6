"""The cluster's keys and channels in Redis, and the commands that read and write them.

:class:`RedisStore` knows the layout and nothing of threads: every method takes a
connected redis-py client, runs its commands (one pipeline, MULTI or script where it
matters) and returns what it read.  :class:`~hisock_gevent.redis_bus.RedisBus` calls it
from its publisher and subscriber loops.

Layout, for namespace ``ns``:

* ``{ns}:workers``: sorted set, worker -> when it last beat (milliseconds, Redis' own
  clock, so the hosts' clocks need not agree).  One heartbeat is one script call: it
  updates our score and returns the workers whose score is older than ``worker_ttl``, so
  a heartbeat costs O(1) commands per worker and O(W) for the cluster, whatever W is.
* ``{ns}:clients:{worker}``: hash, client id -> its
  :class:`~hisock_gevent.cluster_messages.ClientEntry` (msgpack): one worker's clients.
  Reaping a dead worker reads only its own hash.
* ``{ns}:reaped``: sorted set, worker -> when the others reaped it.  A worker that finds
  itself there (it was paused, or cut off from Redis, for longer than ``worker_ttl``)
  knows the others said its clients left.  Entries older than a day are trimmed.
* ``{ns}:all``: the channel every worker hears (membership, broadcasts);
  ``{ns}:to:{worker}``: one worker's own (sends to its clients and groups, kicks).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from .cluster_messages import (
    MAX_ENTRIES_PER_MESSAGE,
    ClientEntry,
    Here,
    MalformedClusterMessage,
    Reaped,
    to_wire,
)

__all__ = ["RedisStore", "Outgoing", "Beat", "Snapshot"]

#: Most dead workers one heartbeat reaps (the next heartbeat takes the rest).
MAX_REAPED_PER_BEAT = 16
#: Milliseconds a tombstone of a reaped worker is kept.
TOMBSTONE_MS = 24 * 3600 * 1000

# Our heartbeat: KEYS workers, tombstones; ARGV me, ttl_ms, max_dead.
# Returns {1 if we were not in the set (new or dropped), 1 if we have a tombstone, dead...}.
# The tombstone stays until we write our clients back (rewrite): a stale heartbeat that a
# healed network delivers late cannot swallow the news.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now, ARGV[1])
local reaped = redis.call('ZSCORE', KEYS[2], ARGV[1]) and 1 or 0
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])),
                        'LIMIT', 0, tonumber(ARGV[3]))
return {added, reaped, dead}
"""

# Reap one worker, if it is still dead and its hash is what we read: KEYS workers,
# tombstones, its clients hash; ARGV worker, ttl_ms, fields read, tombstone_ms, channel,
# messages to publish...  Returns 1 (reaped), 0 (alive again or reaped by another), -1
# (its clients changed since we read them: read again).
_REAP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) >= now - tonumber(ARGV[2]) then return 0 end
if redis.call('HLEN', KEYS[3]) ~= tonumber(ARGV[3]) then return -1 end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
for i = 6, #ARGV do redis.call('PUBLISH', ARGV[5], ARGV[i]) end
return 1
"""


# Read the table and publish a mark, atomically: KEYS workers; ARGV clients-key prefix,
# our channel, the mark.  Returns {workers, {flat hash of each}}.  (It builds key names, so
# it runs on one Redis server, not a Redis Cluster.)
_SNAPSHOT = """
local workers = redis.call('ZRANGE', KEYS[1], 0, -1)
local hashes = {}
for i, worker in ipairs(workers) do hashes[i] = redis.call('HGETALL', ARGV[1] .. worker) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {workers, hashes}
"""


class Outgoing(NamedTuple):
    """One thing the publisher writes: a publish, or an entry written or removed with its
    announcement (both in the same MULTI)."""

    kind: str  # "publish", "register", "unregister" or "stop"
    channel: str = ""
    data: bytes = b""
    entry: Optional[ClientEntry] = None


class Beat(NamedTuple):
    """What one heartbeat found."""

    #: We were not in the workers' set: first beat, or the others dropped us.
    added: bool
    #: The others reaped us (told our clients' leaves) and we have not written them back yet.
    reaped: bool
    #: Workers whose last beat is older than the TTL.
    dead: List[str]


class Snapshot(NamedTuple):
    """The shared table as read at one moment."""

    #: Every worker in the workers' set.
    workers: List[str]
    entries: List[ClientEntry]


class RedisStore:
    """The keys and channels of one namespace, seen from one worker.

    :param on_malformed: called with a description of each entry in Redis that is not ours.
    """

    def __init__(self, namespace: str, worker_id: str, worker_ttl: float, on_malformed: Callable[[str], None]):
        self.namespace = namespace
        self.worker_id = worker_id
        self.ttl_ms = int(worker_ttl * 1000)
        self._on_malformed = on_malformed
        self.all_channel = f"{namespace}:all"
        self.my_channel = self.channel_of(worker_id)
        self.workers_key = f"{namespace}:workers"
        self.tombstones_key = f"{namespace}:reaped"
        self.my_clients_key = self.clients_key(worker_id)
        self._scripts: Dict[Tuple[int, str], Any] = {}

    def channel_of(self, worker: Optional[str]) -> str:
        """The channel of one worker, or (None) the one every worker hears."""
        return self.all_channel if worker is None else f"{self.namespace}:to:{worker}"

    def clients_key(self, worker: str) -> str:
        return f"{self.namespace}:clients:{worker}"

    def _script(self, client: Any, text: str) -> Any:
        key = (id(client), text)
        script = self._scripts.get(key)
        if script is None:
            script = self._scripts[key] = client.register_script(text)
        return script

    # ------------------------------------------------------------------ writing

    def write(self, client: Any, batch: Iterable[Outgoing]) -> int:
        """Run a batch in one MULTI; returns how many messages it published."""
        pipe = client.pipeline(transaction=True)
        published = 0
        for item in batch:
            if item.kind == "stop":
                continue
            if item.kind == "register":
                assert item.entry is not None
                pipe.hset(self.my_clients_key, item.entry.client_id, item.entry.to_wire())
            elif item.kind == "unregister":
                assert item.entry is not None
                pipe.hdel(self.my_clients_key, item.entry.client_id)
            pipe.publish(item.channel, item.data)
            published += 1
        if published:
            pipe.execute()
        return published

    def rewrite(self, client: Any, mine: Dict[str, ClientEntry]) -> int:
        """Make our hash exactly ``mine`` and tell everyone, in one MULTI (after the others
        reaped us); returns how many messages it published."""
        pipe = client.pipeline(transaction=True)
        published = self._queue_rewrite(pipe, mine)
        pipe.execute()
        return published

    def rejoin(self, client: Any, mine: Dict[str, ClientEntry]) -> Tuple[Beat, int]:
        """Beat and write our clients back in one MULTI, after a (re)connect: what the
        heartbeat found (from before the write), and how many messages were published.

        One step, because Redis may have restarted empty: a worker that beat first and
        wrote its clients a moment later would be read, in between, by another worker's
        snapshot as alive with no clients, and everyone would hear its clients leave and
        join again.
        """
        pipe = client.pipeline(transaction=True)
        self._script(client, _HEARTBEAT)(
            keys=[self.workers_key, self.tombstones_key], args=[self.worker_id, self.ttl_ms, MAX_REAPED_PER_BEAT], client=pipe
        )
        published = self._queue_rewrite(pipe, mine)
        added, reaped, dead = pipe.execute()[0]
        return Beat(bool(added), bool(reaped), [worker.decode() for worker in dead]), published

    def _queue_rewrite(self, pipe: Any, mine: Dict[str, ClientEntry]) -> int:
        pipe.delete(self.my_clients_key)
        pipe.zrem(self.tombstones_key, self.worker_id)
        entries = list(mine.values())
        if entries:
            pipe.hset(self.my_clients_key, mapping={entry.client_id: entry.to_wire() for entry in entries})
        chunks = [tuple(entries[start : start + MAX_ENTRIES_PER_MESSAGE]) for start in range(0, len(entries), MAX_ENTRIES_PER_MESSAGE)] or [()]
        for number, chunk in enumerate(chunks, 1):
            pipe.publish(self.all_channel, to_wire(Here(self.worker_id, chunk, complete=number == len(chunks))))
        return len(chunks)

    def goodbye(self, client: Any, bye: bytes) -> None:
        """Remove our entries and our heartbeat, and publish ``bye`` on our own channel."""
        pipe = client.pipeline(transaction=True)
        pipe.delete(self.my_clients_key)
        pipe.zrem(self.workers_key, self.worker_id)
        pipe.publish(self.my_channel, bye)
        pipe.execute()

    # ------------------------------------------------------------------ heartbeat and reaping

    def heartbeat(self, client: Any) -> Beat:
        """Say we are alive; learn whether we had been dropped, and who is dead."""
        added, reaped, dead = self._script(client, _HEARTBEAT)(
            keys=[self.workers_key, self.tombstones_key], args=[self.worker_id, self.ttl_ms, MAX_REAPED_PER_BEAT], client=client
        )
        return Beat(bool(added), bool(reaped), [worker.decode() for worker in dead])

    def reap(self, client: Any, worker: str) -> List[Reaped]:
        """Remove a dead worker and its clients, telling everyone (atomically, so exactly
        one worker reaps it); returns the messages sent, or [] when it was not ours to reap."""
        for _attempt in range(3):
            raw = client.hgetall(self.clients_key(worker))
            entries = self._entries(worker, raw)
            messages = [
                Reaped(self.worker_id, worker, tuple(entries[start : start + MAX_ENTRIES_PER_MESSAGE]))
                for start in range(0, len(entries), MAX_ENTRIES_PER_MESSAGE)
            ]
            done = self._script(client, _REAP)(
                keys=[self.workers_key, self.tombstones_key, self.clients_key(worker)],
                args=[worker, self.ttl_ms, len(raw), TOMBSTONE_MS, self.all_channel, *(to_wire(m) for m in messages)],
                client=client,
            )
            if done >= 0:
                return messages if done else []
        return []

    # ------------------------------------------------------------------ reading

    def snapshot(self, client: Any, mark: bytes) -> Snapshot:
        """Every live worker's clients (skipping, and reporting, entries that are not ours),
        read in one atomic step with publishing ``mark`` on our own channel: a subscriber
        knows which of the messages it received are already in the snapshot."""
        workers, hashes = self._script(client, _SNAPSHOT)(
            keys=[self.workers_key], args=[f"{self.namespace}:clients:", self.my_channel, mark], client=client
        )
        names = [worker.decode() for worker in workers]
        entries: List[ClientEntry] = []
        for worker, flat in zip(names, hashes):
            entries.extend(self._entries(worker, dict(zip(flat[::2], flat[1::2]))))
        return Snapshot(names, entries)

    def _entries(self, worker: str, raw: Dict[bytes, bytes]) -> List[ClientEntry]:
        entries = []
        for key, value in raw.items():
            try:
                entry = ClientEntry.from_wire(value)
                if entry.client_id != key.decode() or entry.worker != worker:
                    raise MalformedClusterMessage("its key or worker is not its own")
            except (MalformedClusterMessage, UnicodeDecodeError) as exc:
                self._on_malformed(f"unreadable entry {key[:60]!r} in {self.clients_key(worker)} ({exc})")
                continue
            entries.append(entry)
        return entries
