"""A :class:`~hisock_gevent.cluster.Bus` over Redis: two connections, two loops, one inbox.

* The **publisher** loop owns one connection.  The hub queues what to write (publishes,
  and our clients' entries with their announcements); the loop writes it in order, in
  MULTI batches, and beats this worker's heartbeat, reaping the workers whose heartbeat
  stopped.  One connection keeps every message of this worker in the order it was sent.
* The **subscriber** loop owns the other connection, subscribed to the channel every
  worker hears and to this worker's own; after each (re)subscription it reads the shared
  table, and hands that and every message to the hub.
* The **inbox** carries them to the hub: a greenlet there hands each to the cluster logic
  (:class:`~hisock_gevent.cluster.ClusterDelivery`), so a ``leave`` handler it runs is
  never inside a hub callback.

In a plain (not monkey-patched) program both loops are real threads, so Redis never
blocks the hub and the worker keeps serving its own clients whatever Redis does; in a
monkey-patched one they are greenlets.  When Redis is unreachable, what is queued for the
others is dropped (and counted), local delivery goes on, and both loops reconnect with
backoff; the publisher then beats and writes this worker's clients back in one MULTI
(:meth:`~hisock_gevent.redis_store.RedisStore.rejoin`), so no other worker's snapshot
reads it, after Redis restarted empty, as alive with no clients.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Tuple

import gevent
import gevent.event
import gevent.monkey
import gevent.queue

from .cluster import Bus
from .cluster_messages import (
    MEMBERSHIP,
    Bye,
    ClientEntry,
    ClusterMessage,
    MalformedClusterMessage,
    Mark,
    decode,
    to_wire,
)
from .home import Home, _allocate_lock, _RealThread
from .redis_store import Beat, Outgoing, RedisStore

if TYPE_CHECKING:
    from .cluster import ClusterDelivery

__all__ = ["RedisBus", "HubInbox", "BACKOFF_MAX"]

logger = logging.getLogger("hisock_gevent")

# Reconnect backoff, seconds: first wait and (public) most.
_BACKOFF_FIRST = 0.1
#: The longest wait between two attempts to reach Redis.
BACKOFF_MAX = 2.0
# Most queued items written in one MULTI.
_BATCH = 512
# Most inbox items handled before the pump lets other greenlets run.
_INBOX_SLICE = 256
# Seconds the subscriber waits for a message before looking at its stop flag again.
_SUBSCRIBER_POLL = 1.0
# Seconds of silence (pings unanswered) after which the subscriber reconnects, at least.
_MIN_SILENCE = 2.0
# Seconds stop() waits for both loops.
_STOP_TIMEOUT = 3.0

# The real thread-safe queue, whether or not the program monkey-patched ``queue``.
_SimpleQueue: Any = gevent.monkey.get_original("queue", "SimpleQueue")
_RealEmpty: Any = gevent.monkey.get_original("queue", "Empty")


class HubInbox:
    """Items from other threads (or greenlets), handed one by one to ``handle`` in a
    greenlet on the hub that made the inbox."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._items: Deque[Any] = collections.deque()
        self._lock = _allocate_lock()
        self._scheduled = False
        self._closed = False
        self._hub = gevent.get_hub()
        self._wake = gevent.event.Event()
        self._greenlet = gevent.spawn(self._pump)

    def put(self, item: Any) -> None:
        """Any thread: queue ``item`` for the hub."""
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._hub.loop.run_callback_threadsafe(self._wake.set)
        except Exception:  # the hub is gone: the server closed
            logger.debug("backplane: hub gone, dropping a message")

    def close(self) -> None:
        """On the hub: stop handing items over."""
        self._closed = True
        self._greenlet.kill(block=False)

    def _pump(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        while not self._closed:
            with self._lock:
                if not self._items:
                    self._scheduled = False
                    return
                batch = [self._items.popleft() for _ in range(min(_INBOX_SLICE, len(self._items)))]
            for item in batch:
                self._handle(item)
            gevent.sleep(0)  # a long backlog must not starve the clients


class _Outage:
    """Logs an outage once when it starts and once when it ends, and counts what it lost."""

    def __init__(self, url: str):
        self.url = url
        self.logged = False
        self.lost = 0

    def begin(self, exc: BaseException, lost: int) -> None:
        self.lost += lost
        if not self.logged:
            logger.error("backplane: Redis at %s unreachable (%s); sends to other workers fail until it is back", self.url, exc)
            self.logged = True

    def end(self) -> None:
        if self.logged:
            logger.warning("backplane: Redis is back; %d message(s) to other workers were lost while it was away", self.lost)
        else:
            logger.info("backplane: connected to %s", self.url)
        self.logged = False
        self.lost = 0


class RedisBus(Bus):
    """The Redis transport of one worker (see the module docstring).

    :param redis_module: the imported ``redis`` package.
    """

    def __init__(
        self, redis_module: Any, url: str, address: str, namespace: str, worker_id: str, heartbeat_interval: float, worker_ttl: float
    ):
        self._redis_module = redis_module
        self.url = url
        #: Where the URL points, for messages (no password).
        self.address = address
        self.worker_id = worker_id
        self.heartbeat_interval = heartbeat_interval
        self.store = RedisStore(namespace, worker_id, worker_ttl, self._note_malformed)
        self._node: Optional[ClusterDelivery] = None
        self._inbox: Optional[HubInbox] = None
        # hub -> publisher: Outgoing items.  A real queue between threads, or gevent's.
        self._outbox: Any = None
        self._empty: Any = _RealEmpty
        self._stopping = False
        self._loops: List[Any] = []
        # Counters for stats(); each written by one thread only.
        self.published = 0
        self.received = 0
        self.dropped = 0
        self.malformed = 0
        self.redis_up = False
        # time.monotonic() since when this worker has been without Redis; None while up.
        self.down_since: Optional[float] = time.monotonic()

    def _redis(self) -> Any:
        timeout = max(self.heartbeat_interval, 1.0)
        return self._redis_module.Redis.from_url(
            self.url, socket_timeout=timeout * 2, socket_connect_timeout=timeout, health_check_interval=0
        )

    # ------------------------------------------------------------------ Bus

    def open(self, node: ClusterDelivery) -> None:
        self._node = node
        self._inbox = HubInbox(self._handle)
        loops = ((self._publisher_main, "publisher"), (self._subscriber_main, "subscriber"))
        if Home.program_is_patched():
            # Sockets, sleeps and threads are gevent's: Redis I/O in greenlets never blocks
            # the hub, and a "real" thread would be a greenlet anyway.
            self._outbox, self._empty = gevent.queue.Queue(), gevent.queue.Empty
            self._loops = [gevent.spawn(target) for target, _ in loops]
        else:
            self._outbox, self._empty = _SimpleQueue(), _RealEmpty
            for target, name in loops:
                thread = _RealThread(target=target, name=f"hisock-backplane-{name}", daemon=True)
                thread.start()
                self._loops.append(thread)
        logger.info("backplane: worker %s starting in namespace %r, Redis at %s", self.worker_id, self.store.namespace, self.address)

    def close(self) -> None:
        """Say goodbye in Redis (our entries and heartbeat go), then end both loops."""
        if self._stopping or self._outbox is None:
            return
        self._stopping = True
        # The publisher says goodbye, then wakes the subscriber with a message on our own
        # channel, so neither waits out a timeout.
        self._outbox.put(Outgoing("stop"))
        deadline = time.monotonic() + _STOP_TIMEOUT
        for loop in self._loops:
            loop.join(max(0.0, deadline - time.monotonic()))
        if self._inbox is not None:
            self._inbox.close()

    def publish(self, worker: Optional[str], message: ClusterMessage) -> None:
        self._outbox.put(Outgoing("publish", self.store.channel_of(worker), to_wire(message)))

    def register(self, entry: ClientEntry, message: ClusterMessage) -> None:
        self._outbox.put(Outgoing("register", self.store.all_channel, to_wire(message), entry))

    def unregister(self, entry: ClientEntry, message: ClusterMessage) -> None:
        self._outbox.put(Outgoing("unregister", self.store.all_channel, to_wire(message), entry))

    def stats(self) -> Dict[str, Any]:
        down_since = self.down_since
        return {
            "redis": "up" if self.redis_up else "down",
            # How long this worker has been serving without its backplane (0 while up).
            "down_s": 0.0 if down_since is None else round(time.monotonic() - down_since, 1),
            "published": self.published,
            "received": self.received,
            "dropped": self.dropped,
            "malformed": self.malformed,
        }

    # ------------------------------------------------------------------ hub side

    def _handle(self, item: Tuple[str, Any]) -> None:
        """On the hub: hand one inbox item to the cluster logic."""
        node = self._node
        assert node is not None
        kind, payload = item
        try:
            if kind == "snapshot":
                node.load_snapshot(payload.workers, payload.entries)
            elif kind == "tick":
                node.tick()
            else:
                node.receive(payload)
        except Exception as exc:  # a message of the right shape that cannot be applied
            self._note_malformed(f"inapplicable {kind} ({type(exc).__name__}: {exc})")
            logger.debug("backplane: could not apply %r", payload, exc_info=True)

    def _note_malformed(self, what: str) -> None:
        """Count a message or entry that is not ours; log the first few, then every 1000th."""
        self.malformed += 1
        if self.malformed <= 10 or self.malformed % 1000 == 0:
            logger.warning("backplane: ignoring an %s in namespace %r (%d so far)", what, self.store.namespace, self.malformed)

    # ------------------------------------------------------------------ publisher loop

    def _publisher_main(self) -> None:
        """Write what the hub queued, in order, and keep this worker's heartbeat."""
        _Publisher(self).run()

    def _goodbye(self, client: Any) -> None:
        try:
            self.store.goodbye(client, to_wire(Bye(self.worker_id)))
        except self._redis_module.RedisError as exc:
            logger.warning("backplane: could not remove worker %s from Redis: %s", self.worker_id, exc)
        finally:
            client.close()

    def _take_batch(self, timeout: float, limit: Optional[int]) -> List[Outgoing]:
        """What the hub queued: waits up to ``timeout`` for the first item, then takes up
        to ``limit`` (None: all) without waiting."""
        try:
            batch = [self._outbox.get(timeout=timeout)] if timeout > 0 else [self._outbox.get_nowait()]
        except self._empty:
            return []
        while limit is None or len(batch) < limit:
            try:
                batch.append(self._outbox.get_nowait())
            except self._empty:
                break
        return batch

    # ------------------------------------------------------------------ subscriber loop

    def _subscriber_main(self) -> None:
        """Receive both channels and hand each message to the hub, reconnecting as needed."""
        backoff = _BACKOFF_FIRST
        for attempt in itertools.count():
            if self._stopping:
                return
            client = pubsub = None
            try:
                client = self._redis()
                pubsub = client.pubsub()
                self._subscribe(pubsub)
                # Subscribed first, then read the table with a mark in our stream: what
                # arrives before the mark is already in the snapshot.
                token = uuid.uuid4().hex
                snapshot = self.store.snapshot(client, to_wire(Mark(self.worker_id, token)))
                assert self._inbox is not None
                self._inbox.put(("snapshot", snapshot))
                if backoff != _BACKOFF_FIRST or attempt:
                    logger.info("backplane: subscribed to %s again", self.address)
                backoff = _BACKOFF_FIRST
                self._listen(pubsub, token)
            except Exception as exc:
                if self._stopping:
                    return
                if not isinstance(exc, (self._redis_module.RedisError, OSError)):
                    logger.exception("backplane: unexpected error in the subscriber; reconnecting")
                elif backoff == _BACKOFF_FIRST:
                    logger.warning("backplane: subscription to %s lost (%s); reconnecting", self.address, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                _close_quietly(pubsub, client)

    def _subscribe(self, pubsub: Any) -> None:
        """Subscribe to both channels and wait until Redis confirms both, so that a mark
        published next is sure to reach us.

        :raises ConnectionError: no confirmation in time.
        """
        channels = {self.store.all_channel.encode(), self.store.my_channel.encode()}
        pubsub.subscribe(*channels)
        deadline = time.monotonic() + max(3 * self.heartbeat_interval, _MIN_SILENCE)
        while channels:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionError("Redis did not confirm the subscription")
            raw = pubsub.get_message(timeout=min(remaining, _SUBSCRIBER_POLL))
            if raw is not None and raw.get("type") == "subscribe":
                channels.discard(raw["channel"])

    def _listen(self, pubsub: Any, token: str) -> None:
        """Hand what arrives to the hub until we stop; membership news older than our
        snapshot's mark is skipped (the snapshot has it already).

        A quiet channel is pinged every heartbeat interval: a connection that stays silent
        (a network partition, a Redis gone without closing it) is dropped and made again,
        with a fresh snapshot, instead of leaving this worker deaf.

        :raises ConnectionError: no answer for too long, or our mark never came.
        """
        inbox = self._inbox
        assert inbox is not None
        synced = False
        silence_limit = max(3 * self.heartbeat_interval, _MIN_SILENCE)
        last_heard = last_ping = started = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            if now - last_heard > silence_limit:
                raise ConnectionError(f"no answer from Redis for {now - last_heard:.1f} s")
            if not synced and now - started > silence_limit:
                raise ConnectionError("our snapshot's mark never came back")
            if now - last_ping >= self.heartbeat_interval:
                pubsub.ping()
                last_ping = now
            raw = pubsub.get_message(timeout=min(_SUBSCRIBER_POLL, self.heartbeat_interval))
            if raw is None:
                continue
            last_heard = time.monotonic()
            if raw.get("type") != "message":
                continue
            self.received += 1
            try:
                message = decode(raw["data"])
            except MalformedClusterMessage as exc:
                self._note_malformed(f"unreadable message ({exc})")
                continue
            if isinstance(message, Mark):
                synced = synced or (message.origin == self.worker_id and message.token == token)
            elif message.origin != self.worker_id and (synced or not isinstance(message, MEMBERSHIP)):
                inbox.put(("message", message))


class _Publisher:
    """The publisher loop's state: its connection, our entries and the heartbeat's clock."""

    def __init__(self, bus: RedisBus):
        self.bus = bus
        self.store = bus.store
        self.client: Any = None
        self.mine: Dict[str, ClientEntry] = {}  # our entries, to write back when needed
        self.backoff = _BACKOFF_FIRST
        self.next_beat = 0.0
        self.outage = _Outage(bus.address)

    def run(self) -> None:
        bus = self.bus
        for _ in itertools.count():
            connected = self.client is not None and bus.redis_up
            # While Redis is away, take everything queued each time round: what cannot be
            # sent is dropped rather than piling up.
            batch = bus._take_batch(max(0.0, self.next_beat - time.monotonic()), _BATCH if connected else None)
            stop = any(item.kind == "stop" for item in batch)
            _note_mine(self.mine, batch)
            try:
                if not connected:
                    self._connect()
                elif time.monotonic() >= self.next_beat:
                    # Before the batch: after a long pause, we learn first whether the
                    # others reaped us.
                    self._beat(self.store.heartbeat(self.client))
                bus.published += self.store.write(self.client, batch)
            except Exception as exc:
                self._fail(exc, batch)
                if stop:
                    _close_quietly(self.client)
                    return
                time.sleep(self.backoff)
                self.backoff = min(self.backoff * 2, BACKOFF_MAX)
                continue
            if stop:
                bus._goodbye(self.client)
                return

    def _connect(self) -> None:
        """(Re)connected: beat, and write our clients back (Redis may have restarted empty,
        or the others may have reaped us while we could not reach it)."""
        self.client = self.client or self.bus._redis()
        beat, published = self.store.rejoin(self.client, self.mine)
        if beat.reaped:
            logger.warning(
                "backplane: the other workers counted worker %s dead while it could not reach Redis; wrote its %d client(s) back",
                self.store.worker_id, len(self.mine),
            )
        self.bus.published += published
        self.bus.redis_up = True
        self.bus.down_since = None
        self.backoff = _BACKOFF_FIRST
        self.outage.end()
        self._beat(beat, rewritten=True)

    def _beat(self, beat: Beat, rewritten: bool = False) -> None:
        """Act on a heartbeat: write our clients back if the others had dropped us, reap
        the dead, and let the hub's cluster logic look at its clock."""
        self.next_beat = time.monotonic() + self.bus.heartbeat_interval
        if (beat.added or beat.reaped) and not rewritten:
            logger.warning(
                "backplane: the other workers had counted worker %s dead (paused or cut off for longer than its TTL); "
                "writing its %d client(s) back", self.store.worker_id, len(self.mine),
            )
            self.bus.published += self.store.rewrite(self.client, self.mine)
        inbox = self.bus._inbox
        assert inbox is not None
        for worker in beat.dead:
            for message in self.store.reap(self.client, worker):
                self.bus.published += 1
                inbox.put(("message", message))
        inbox.put(("tick", None))

    def _fail(self, exc: Exception, batch: List[Outgoing]) -> None:
        lost = sum(1 for item in batch if item.kind != "stop")
        self.bus.dropped += lost
        if self.bus.redis_up:
            self.bus.down_since = time.monotonic()
        self.bus.redis_up = False
        self.next_beat = 0.0
        if isinstance(exc, (self.bus._redis_module.RedisError, OSError)):
            self.outage.begin(exc, lost)
        else:  # a bug must not end the loop: the worker would go deaf
            logger.exception("backplane: unexpected error in the publisher; %d queued item(s) dropped", lost)


def _note_mine(mine: Dict[str, ClientEntry], batch: List[Outgoing]) -> None:
    """Keep our entries up to date with what the batch registers and unregisters."""
    for item in batch:
        if item.entry is None:
            continue
        if item.kind == "register":
            mine[item.entry.client_id] = item.entry
        elif item.kind == "unregister":
            mine.pop(item.entry.client_id, None)


def _close_quietly(*closables: Any) -> None:
    for closable in closables:
        if closable is None:
            continue
        try:
            closable.close()
        except Exception:
            pass
