"""The cluster's keys and channels in Redis, and the commands that read and write them.

:class:`RedisStore` knows the layout and nothing of threads: every method takes a
connected redis-py client, runs its commands (one pipeline or MULTI where it matters) and
returns what it read.  :class:`~hisock_gevent.redis_bus.RedisBus` calls it from its
publisher and subscriber loops.

Layout, for namespace ``ns``:

* ``{ns}:clients``: hash, client id -> :class:`~hisock_gevent.cluster_messages.ClientEntry`
  (msgpack), the clients of every worker.
* ``{ns}:workers``: set of the workers' names; ``{ns}:alive:{worker}``: a key with a TTL,
  refreshed by each worker's heartbeat.
* ``{ns}:all``: the channel every worker hears; ``{ns}:to:{worker}``: one worker's own.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set

from .cluster_messages import (
    MAX_ENTRIES_PER_MESSAGE,
    ClientEntry,
    Here,
    MalformedClusterMessage,
    Reaped,
    to_wire,
)

__all__ = ["RedisStore", "Outgoing"]


class Outgoing(NamedTuple):
    """One thing the publisher writes: a publish, or an entry written or removed with its
    announcement (both in the same MULTI)."""

    kind: str  # "publish", "register", "unregister" or "stop"
    channel: str = ""
    data: bytes = b""
    entry: Optional[ClientEntry] = None


class RedisStore:
    """The keys and channels of one namespace, seen from one worker.

    :param on_malformed: called with a description of each entry in Redis that is not ours.
    """

    def __init__(self, namespace: str, worker_id: str, worker_ttl: float, on_malformed: Callable[[str], None]):
        self.namespace = namespace
        self.worker_id = worker_id
        self.worker_ttl = worker_ttl
        self._on_malformed = on_malformed
        self.all_channel = f"{namespace}:all"
        self.my_channel = self.channel_of(worker_id)
        self.clients_key = f"{namespace}:clients"
        self.workers_key = f"{namespace}:workers"

    def channel_of(self, worker: Optional[str]) -> str:
        """The channel of one worker, or (None) the one every worker hears."""
        return self.all_channel if worker is None else f"{self.namespace}:to:{worker}"

    def _alive_key(self, worker: str) -> str:
        return f"{self.namespace}:alive:{worker}"

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
                pipe.hset(self.clients_key, item.entry.client_id, item.entry.to_wire())
            elif item.kind == "unregister":
                assert item.entry is not None
                pipe.hdel(self.clients_key, item.entry.client_id)
            pipe.publish(item.channel, item.data)
            published += 1
        if published:
            pipe.execute()
        return published

    def rejoin(self, client: Any, mine: Dict[str, ClientEntry]) -> None:
        """(Re)connected: mark us alive and write our entries back, telling the others
        without announcing anyone (Redis may have restarted empty)."""
        pipe = client.pipeline(transaction=True)
        pipe.set(self._alive_key(self.worker_id), b"1", px=int(self.worker_ttl * 1000))
        pipe.sadd(self.workers_key, self.worker_id)
        entries = list(mine.values())
        for entry in entries:
            pipe.hset(self.clients_key, entry.client_id, entry.to_wire())
        for start in range(0, len(entries), MAX_ENTRIES_PER_MESSAGE):
            chunk = tuple(entries[start : start + MAX_ENTRIES_PER_MESSAGE])
            last = start + MAX_ENTRIES_PER_MESSAGE >= len(entries)
            pipe.publish(self.all_channel, to_wire(Here(self.worker_id, chunk, complete=last)))
        pipe.execute()

    def goodbye(self, client: Any, mine: Dict[str, ClientEntry], bye: bytes) -> None:
        """Remove our entries and our heartbeat, and publish ``bye`` on our own channel."""
        pipe = client.pipeline(transaction=True)
        if mine:
            pipe.hdel(self.clients_key, *mine)
        pipe.delete(self._alive_key(self.worker_id))
        pipe.srem(self.workers_key, self.worker_id)
        pipe.publish(self.my_channel, bye)
        pipe.execute()

    # ------------------------------------------------------------------ heartbeat and reaping

    def heartbeat(self, client: Any) -> List[str]:
        """Refresh our alive key; returns the workers whose key expired."""
        pipe = client.pipeline(transaction=False)
        pipe.set(self._alive_key(self.worker_id), b"1", px=int(self.worker_ttl * 1000))
        pipe.sadd(self.workers_key, self.worker_id)
        pipe.smembers(self.workers_key)
        _, _, workers = pipe.execute()
        others = [w.decode() for w in workers if w.decode() != self.worker_id]
        if not others:
            return []
        pipe = client.pipeline(transaction=False)
        for worker in others:
            pipe.exists(self._alive_key(worker))
        return [worker for worker, alive in zip(others, pipe.execute()) if not alive]

    def reap(self, client: Any, dead: Set[str]) -> List[Reaped]:
        """Claim the dead workers' clients one by one (HDEL: whoever removes an entry owns
        its leave) and tell everyone; returns what this worker claimed, per dead worker."""
        claimed: Dict[str, List[ClientEntry]] = {}
        for entry in self.snapshot(client):
            if entry.worker in dead and client.hdel(self.clients_key, entry.client_id):
                claimed.setdefault(entry.worker, []).append(entry)
        reaped = []
        for worker, entries in claimed.items():
            for start in range(0, len(entries), MAX_ENTRIES_PER_MESSAGE):
                message = Reaped(self.worker_id, worker, tuple(entries[start : start + MAX_ENTRIES_PER_MESSAGE]))
                client.publish(self.all_channel, to_wire(message))
                reaped.append(message)
        for worker in dead:
            client.srem(self.workers_key, worker)
        return reaped

    # ------------------------------------------------------------------ reading

    def snapshot(self, client: Any) -> List[ClientEntry]:
        """Every worker's clients, skipping (and reporting) entries that are not ours."""
        entries = []
        for key, value in client.hgetall(self.clients_key).items():
            try:
                entry = ClientEntry.from_wire(value)
                if entry.client_id != key.decode():
                    raise MalformedClusterMessage("its key is not its id")
            except (MalformedClusterMessage, UnicodeDecodeError) as exc:
                self._on_malformed(f"unreadable entry {key[:60]!r} in {self.clients_key} ({exc})")
                continue
            entries.append(entry)
        return entries
