"""Several server processes acting as one HiSock server, joined by Redis (redis-py).

:class:`RedisBackplane` is a :class:`~hisock_gevent.registry.Delivery`: the server hands it
every send and every join, leave and change of its own clients, and never learns that some
receivers are held by other processes ("workers").

How it works:

* Every worker keeps a mirror of the other workers' clients (a second
  :class:`~hisock_gevent.registry.ClientRegistry` of :class:`_RemotePeer`), so the getters
  and the "who is bob?" of ``send_client("bob")`` are answered from memory, on the hub,
  without waiting for Redis.
* The shared truth is a Redis hash ``{ns}:clients`` (``ip:port`` -> worker, name, group,
  dialect).  A worker changes it and publishes the change on ``{ns}:all`` in one MULTI, so
  a mirror that loaded the hash after subscribing misses nothing.
* A send to a client of another worker is published on that worker's channel
  ``{ns}:to:{worker}`` with the frame already built; a send to a group or to everyone is
  published once on ``{ns}:all`` with both dialects' frames, and each worker fans it out
  to its own clients.  One publishing connection and one subscribing connection per
  worker keep every sender-receiver pair in order.
* Each worker refreshes ``{ns}:alive:{worker}`` (a key with a TTL).  Every worker checks
  the others' keys; the entries of a worker whose key expired are claimed one by one with
  HDEL, and the worker whose HDEL removed an entry announces the leave and runs ``leave``
  for it: once per client, on a surviving worker.
* Redis I/O runs on two real threads (publisher and subscriber), never on the hub: a plain
  (not monkey-patched) program keeps serving its own clients whatever Redis does.  When
  Redis is unreachable, sends to other workers are dropped with a logged error, local
  delivery goes on, and both threads reconnect with backoff; on reconnecting a worker
  writes its clients back (Redis may have restarted empty) and reloads its mirror.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import time
import uuid
import warnings
from typing import Any, Deque, Dict, List, Optional, Tuple

import gevent
import gevent.monkey
import gevent.queue
import msgpack

from .errors import ClientNotFound, GroupNotFound
from .frames import frame
from .home import Home, _allocate_lock, _RealThread
from .messages import PeerLeft
from .outgoing import OutgoingCommand
from .registry import (
    ClientRef,
    ClientRegistry,
    Delivery,
    GroupRef,
    LocalDelivery,
    Peer,
    ServerLink,
    _address_of,
    fan_out,
    frames_for,
)
from .utils import ClientInfo

__all__ = ["RedisBackplane", "DEFAULT_HEARTBEAT_INTERVAL", "DEFAULT_WORKER_TTL"]

logger = logging.getLogger("hisock_gevent")

#: Seconds between two refreshes of a worker's alive key (and checks of the others').
DEFAULT_HEARTBEAT_INTERVAL = 1.0
#: Seconds a worker's alive key lives without a refresh: how soon a dead worker's clients go.
DEFAULT_WORKER_TTL = 5.0
# Reconnect backoff, seconds: first wait and most.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 2.0
# Most queued items written in one MULTI.
_BATCH = 512

# The real thread-safe queue, whether or not the program monkey-patched ``queue``.
_SimpleQueue: Any = gevent.monkey.get_original("queue", "SimpleQueue")
_RealEmpty: Any = gevent.monkey.get_original("queue", "Empty")

# Message kinds on the channels; each message is a msgpack array [kind, origin, ...].
_JOIN = "join"  # addr, name, group, msgpack_ok, announce_frame, joined_at
_LEAVE = "leave"  # addr, announce_frame or None
_CHANGE = "change"  # addr, name, group
_HERE = "here"  # addr, name, group, msgpack_ok, joined_at: re-registration, nobody is told
_TO = "to"  # addr, frame
_GROUP = "group"  # group, plain_frame, extended_frame
_ALL = "all"  # plain_frame, extended_frame
_BYE = "bye"  # (to ourselves) the worker is stopping: wakes its subscriber
_KICK = "kick"  # addr, force, call_func: disconnect_client for another worker's client
_KINDS = frozenset({_JOIN, _LEAVE, _CHANGE, _HERE, _TO, _GROUP, _ALL, _BYE, _KICK})


def _addr_key(address: Tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _key_addr(key: str) -> Tuple[str, int]:
    host, _, port = key.rpartition(":")
    return host, int(port)


class _RemotePeer:
    """A client held by another worker, as this worker's mirror knows it."""

    __slots__ = ("info", "sock", "msgpack_ok", "worker", "joined_at", "backplane")

    def __init__(self, info: ClientInfo, msgpack_ok: bool, worker: str, joined_at: float, backplane: RedisBackplane):
        self.info = info
        # The mirror's ClientRegistry keys HiSock's ``clients`` dict by socket: a remote
        # client's stand-in is its address.
        self.sock = info.ip
        self.msgpack_ok = msgpack_ok
        self.worker = worker
        #: time.time() on its worker when it joined: orders clients that share a name.
        self.joined_at = joined_at
        self.backplane = backplane

    def send(self, body_frame: bytes) -> None:
        self.backplane._publish(self.backplane._channel_of(self.worker), [_TO, self.backplane.worker_id, _addr_key(self.info.ip), body_frame])


class RedisBackplane(Delivery):
    """Deliver to the clients of every worker sharing one Redis.

    :param url: ``redis://host:port/db`` (anything ``redis.Redis.from_url`` takes).
    :param namespace: prefix of every key and channel; workers with the same namespace
        and Redis form one server.
    :param heartbeat_interval: seconds between refreshes of this worker's alive key.
    :param worker_ttl: seconds after its last refresh that a silent worker counts as dead
        and its clients leave.
    :param worker_id: this worker's name in Redis (default ``host:pid:random``).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "hisock",
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        worker_ttl: float = DEFAULT_WORKER_TTL,
        worker_id: Optional[str] = None,
    ):
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("the Redis backplane needs redis-py: pip install 'hisock_gevent[redis]'") from exc
        if worker_ttl <= heartbeat_interval:
            raise ValueError("worker_ttl must be longer than heartbeat_interval")
        self._redis_module = redis
        self.url = url
        self.namespace = namespace
        self.heartbeat_interval = heartbeat_interval
        self.worker_ttl = worker_ttl
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._all_channel = f"{namespace}:all"
        self._my_channel = self._channel_of(self.worker_id)
        self._clients_key = f"{namespace}:clients"
        self._workers_key = f"{namespace}:workers"

        self._link: Optional[ServerLink] = None
        self._local: Optional[LocalDelivery] = None
        self._remote: ClientRegistry[_RemotePeer] = ClientRegistry()
        # time.time() when each of our clients joined (for clients that share a name).
        self._joined_at: Dict[Tuple[str, int], float] = {}
        self._hub: Any = None
        # hub -> publisher thread: (kind, payload) items; see _publisher_main.  Made by
        # start(): a real queue between threads, or gevent's between greenlets.
        self._outbox: Any = None
        self._empty: Any = _RealEmpty
        # subscriber thread -> hub: decoded messages, drained by one callback at a time.
        self._inbox: Deque[Any] = collections.deque()
        self._inbox_lock = _allocate_lock()
        self._inbox_scheduled = False
        self._stopping = False
        self._threads: List[Any] = []
        # Counters for stats(); written by their own threads only.
        self.published = 0
        self.received = 0
        self.dropped = 0
        self.malformed = 0
        self.redis_up = False

    def __repr__(self) -> str:
        return f"<RedisBackplane {self.url} ns={self.namespace} worker={self.worker_id}>"

    def _channel_of(self, worker: str) -> str:
        return f"{self.namespace}:to:{worker}"

    def _redis(self) -> Any:
        timeout = max(self.heartbeat_interval, 1.0)
        return self._redis_module.Redis.from_url(
            self.url, socket_timeout=timeout * 2, socket_connect_timeout=timeout, health_check_interval=0
        )

    # ------------------------------------------------------------------ life

    def start(self, link: ServerLink) -> None:
        self._link = link
        self._local = LocalDelivery(link.registry)
        self._hub = gevent.get_hub()
        loops = ((self._publisher_main, "publisher"), (self._subscriber_main, "subscriber"))
        if Home.program_is_patched():
            # Sockets, sleeps and threads are gevent's: Redis I/O in greenlets never blocks
            # the hub, and a "real" thread would be a greenlet anyway.
            self._outbox, self._empty = gevent.queue.Queue(), gevent.queue.Empty
            self._threads = [gevent.spawn(target) for target, _ in loops]
        else:
            self._outbox, self._empty = _SimpleQueue(), _RealEmpty
            for target, name in loops:
                thread = _RealThread(target=target, name=f"hisock-backplane-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        logger.info("backplane %s: worker %s joined namespace %r", self.url, self.worker_id, self.namespace)

    def stop(self) -> None:
        """Say goodbye in Redis (our entries and alive key go), then end both threads."""
        if self._stopping or self._outbox is None:
            return
        self._stopping = True
        # The publisher says goodbye in Redis, then wakes the subscriber with a message on
        # our own channel, so neither waits out a timeout.
        self._outbox.put(("stop", None))
        deadline = time.monotonic() + 3.0
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ lookups

    def find_client(self, client: ClientRef) -> ClientInfo:
        return self._find_peer(client).info

    def _find_peer(self, client: ClientRef) -> Peer:
        """Ours or another worker's; a name several clients share means the one that joined
        first anywhere in the cluster, as on one server.

        :raises ValueError: wrong format.  :raises ClientNotFound: nobody matches.
        """
        registry = self._require_link().registry
        if isinstance(client, str) and _address_of(client) is None:
            named: List[Peer] = [*registry._by_name.get(client, ()), *self._remote._by_name.get(client, ())]
            if len(named) > 1:
                warnings.warn(
                    f"{len(named)} clients are named {client!r}; using the one that joined first",
                    UserWarning,
                    stacklevel=5,
                )
                return min(named, key=self._join_order)
            if named:
                return named[0]
        try:
            return registry.find(client)
        except ClientNotFound:
            return self._remote.find(client)

    def _join_order(self, peer: Peer) -> Tuple[float, str]:
        joined_at = peer.joined_at if isinstance(peer, _RemotePeer) else self._joined_at.get(peer.info.ip, 0.0)
        return joined_at, _addr_key(peer.info.ip)

    def group_members(self, group: GroupRef) -> List[ClientInfo]:
        local, remote = self._group_peers(group)
        return [peer.info for peer in local + remote]

    def _group_peers(self, group: GroupRef) -> Tuple[List[Peer], List[Peer]]:
        """The group's members here and on the other workers.

        :raises GroupNotFound: nobody anywhere is in it (worded by the local registry,
            which checks the group's type too).
        """
        registry = self._require_link().registry
        found: Tuple[List[Peer], List[Peer]] = ([], [])
        for members, source in zip(found, (registry, self._remote)):
            try:
                members.extend(source.group(group))
            except GroupNotFound:
                pass
        if not found[0] and not found[1]:
            registry.group(group)
        return found

    def all_clients(self) -> List[ClientInfo]:
        return [peer.info for peer in self._require_link().registry] + [peer.info for peer in self._remote]

    def _require_link(self) -> ServerLink:
        if self._link is None:
            raise RuntimeError("the backplane is used before its server started")
        return self._link

    # ------------------------------------------------------------------ sends

    def to_client(self, client: ClientRef, message: OutgoingCommand) -> None:
        peer = self._find_peer(client)
        peer.send(message.frame_for(peer.msgpack_ok))

    def to_group(self, group: GroupRef, message: OutgoingCommand) -> None:
        local, remote = self._group_peers(group)
        plain, extended = frames_for(local + remote, message)
        self._send_built(local, plain, extended)
        if remote:
            name = group.group if isinstance(group, ClientInfo) else group
            self._publish(self._all_channel, [_GROUP, self.worker_id, name, plain, extended])

    def to_all(self, message: OutgoingCommand) -> None:
        local = list(self._require_link().registry)
        remote = list(self._remote)
        if not remote:
            fan_out(local, message)
            return
        plain, extended = frames_for(local + remote, message)
        self._send_built(local, plain, extended)
        self._publish(self._all_channel, [_ALL, self.worker_id, plain, extended])

    @staticmethod
    def _send_built(peers: List[Peer], plain: bytes, extended: bytes) -> None:
        for peer in peers:
            peer.send(extended if peer.msgpack_ok else plain)

    def announce(self, body_frame: bytes, exclude: Optional[Peer] = None) -> None:
        assert self._local is not None
        self._local.announce(body_frame, exclude)

    # ------------------------------------------------------------------ our clients

    def joined(self, peer: Peer, announce_frame: bytes) -> None:
        self.announce(announce_frame, exclude=peer)
        info = peer.info
        joined_at = self._joined_at[info.ip] = time.time()
        event = [_JOIN, self.worker_id, _addr_key(info.ip), info.name, info.group, peer.msgpack_ok, announce_frame, joined_at]
        self._outbox.put(("register", (info, self._entry(info, peer.msgpack_ok), event)))

    def left(self, peer: Peer, announce_frame: Optional[bytes]) -> None:
        if announce_frame is not None:
            self.announce(announce_frame, exclude=peer)
        else:
            # The server is disconnecting everyone of ours: the other workers' clients
            # still hear that ours left.
            announce_frame = self._left_frame(peer.info)
        self._joined_at.pop(peer.info.ip, None)
        self._outbox.put(("unregister", (peer.info, [_LEAVE, self.worker_id, _addr_key(peer.info.ip), announce_frame])))

    def changed(self, peer: Peer, old: ClientInfo) -> None:
        info = peer.info
        event = [_CHANGE, self.worker_id, _addr_key(info.ip), info.name, info.group]
        self._outbox.put(("register", (info, self._entry(info, peer.msgpack_ok), event)))

    def _entry(self, info: ClientInfo, msgpack_ok: bool) -> bytes:
        """Our client's value in the clients hash: worker, name, group, dialect, join time."""
        return msgpack.packb([self.worker_id, info.name, info.group, msgpack_ok, self._joined_at.get(info.ip, 0.0)])

    def _left_frame(self, info: ClientInfo) -> Optional[bytes]:
        link = self._require_link()
        try:
            return frame(PeerLeft(info.as_dict()).to_body(), link.header_len)
        except ValueError:
            return None

    def disconnect_elsewhere(self, client: ClientRef, force: bool, call_func: bool) -> bool:
        try:
            peer = self._remote.find(client)
        except ClientNotFound:
            return False
        self._forget_remote(peer.info.ip)
        self._publish(self._channel_of(peer.worker), [_KICK, self.worker_id, _addr_key(peer.info.ip), force, call_func])
        return True

    def stats(self) -> Dict[str, Any]:
        return {
            "worker": self.worker_id,
            "redis": "up" if self.redis_up else "down",
            "remote_clients": len(self._remote),
            "published": self.published,
            "received": self.received,
            "dropped": self.dropped,
            "malformed": self.malformed,
        }

    # ------------------------------------------------------------------ hub side of the inbox

    def _publish(self, channel: str, message: List[Any]) -> None:
        self._outbox.put(("publish", (channel, msgpack.packb(message, use_bin_type=True))))

    def _to_hub(self, item: Any) -> None:
        """Called on the subscriber or publisher thread: hand ``item`` to the hub."""
        with self._inbox_lock:
            self._inbox.append(item)
            if self._inbox_scheduled:
                return
            self._inbox_scheduled = True
        hub = self._hub
        try:
            hub.loop.run_callback_threadsafe(self._drain_inbox)
        except Exception:  # the hub is gone: the server closed
            logger.debug("backplane: hub gone, dropping a message")

    def _drain_inbox(self) -> None:
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    self._inbox_scheduled = False
                    return
                batch = list(self._inbox)
                self._inbox.clear()
            for item in batch:
                try:
                    self._apply(item)
                except Exception as exc:  # a message of the right kind with the wrong fields
                    self._note_malformed(f"inapplicable {item[0]!r} message ({type(exc).__name__}: {exc})")

    def _apply(self, item: Any) -> None:
        """Act on one message from Redis (or one event from our own threads), on the hub."""
        kind = item[0]
        if kind == "snapshot":
            self._load_snapshot(item[1])
            return
        if kind == "reaped":
            # A dead worker's client, whose leave this worker won the right to run.
            info = item[1]
            self._forget_remote(info.ip)
            self._announce_left(item[2])
            self._require_link().run_leave(info)
            return
        origin = item[1]
        if origin == self.worker_id:
            return
        registry = self._require_link().registry
        if kind == _TO:
            peer = registry._by_address.get(_key_addr(item[2]))
            if peer is not None:
                peer.send(item[3])
        elif kind == _ALL:
            self._send_built(list(registry), item[2], item[3])
        elif kind == _GROUP:
            try:
                members = registry.group(item[2])
            except GroupNotFound:
                return
            self._send_built(members, item[3], item[4])
        elif kind in (_JOIN, _HERE):
            address = _key_addr(item[2])
            joined_at = item[7] if kind == _JOIN else item[6]
            self._remember_remote(ClientInfo(address, item[3], item[4]), bool(item[5]), origin, joined_at)
            if kind == _JOIN and item[6]:
                self.announce(item[6])
        elif kind == _CHANGE:
            peer = self._remote._by_address.get(_key_addr(item[2]))
            if peer is not None:
                self._remote.update(peer, ClientInfo(peer.info.ip, item[3], item[4]))
        elif kind == _KICK:
            self._require_link().kick(_key_addr(item[2]), bool(item[3]), bool(item[4]))
        elif kind == _LEAVE:
            self._forget_remote(_key_addr(item[2]))
            self._announce_left(item[3])

    def _announce_left(self, announce_frame: Optional[bytes]) -> None:
        if announce_frame:
            self.announce(announce_frame)

    def _remember_remote(self, info: ClientInfo, msgpack_ok: bool, worker: str, joined_at: float) -> None:
        if info.ip in self._require_link().registry._by_address:
            return  # ours (an old entry of a client whose address came back to us)
        existing = self._remote._by_address.get(info.ip)
        if existing is not None:
            existing.worker = worker
            existing.msgpack_ok = msgpack_ok
            if existing.info != info:
                self._remote.update(existing, info)
            return
        self._remote.add(_RemotePeer(info, msgpack_ok, worker, joined_at, self))

    def _forget_remote(self, address: Tuple[str, int]) -> None:
        peer = self._remote._by_address.get(address)
        if peer is not None:
            self._remote.remove(peer)

    def _load_snapshot(self, entries: Dict[str, Tuple[str, Optional[str], Optional[str], bool, float]]) -> None:
        seen = set()
        for key, (worker, name, group, msgpack_ok, joined_at) in entries.items():
            if worker == self.worker_id:
                continue
            address = _key_addr(key)
            seen.add(address)
            self._remember_remote(ClientInfo(address, name, group), msgpack_ok, worker, joined_at)
        for peer in list(self._remote):
            if peer.info.ip not in seen:
                self._remote.remove(peer)

    # ------------------------------------------------------------------ publisher thread

    def _publisher_main(self) -> None:
        """Write what the hub queued, in order, and keep this worker's heartbeat."""
        mine: Dict[str, bytes] = {}  # our entries in the clients hash, to write back after an outage
        client = self._redis()
        connected = False
        backoff = _BACKOFF_FIRST
        next_beat = 0.0
        lost_while_down = 0
        outage_logged = False
        while True:
            timeout = max(0.0, next_beat - time.monotonic())
            # While Redis is away, take everything queued each time round: what cannot be
            # sent is dropped rather than piling up.
            batch = self._take_batch(timeout, _BATCH if connected else None)
            stop = any(kind == "stop" for kind, _ in batch)
            for kind, payload in batch:
                if kind == "register":
                    info, entry, _ = payload
                    mine[_addr_key(info.ip)] = entry
                elif kind == "unregister":
                    mine.pop(_addr_key(payload[0].ip), None)
            try:
                if not connected:
                    self._rejoin(client, mine)
                    connected = True
                    self.redis_up = True
                    backoff = _BACKOFF_FIRST
                    if outage_logged:
                        logger.warning("backplane: Redis is back; %d message(s) to other workers were lost while it was away", lost_while_down)
                    else:
                        logger.info("backplane: connected to %s", self.url)
                    lost_while_down = 0
                    outage_logged = False
                self._write(client, batch)
                if time.monotonic() >= next_beat:
                    self._heartbeat(client)
                    next_beat = time.monotonic() + self.heartbeat_interval
            except self._redis_module.RedisError as exc:
                lost = sum(1 for kind, _ in batch if kind != "stop")
                self.dropped += lost
                if not outage_logged:
                    logger.error("backplane: Redis at %s unreachable (%s); sends to other workers fail until it is back", self.url, exc)
                    outage_logged = True
                lost_while_down += lost
                connected = False
                self.redis_up = False
                if stop:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                next_beat = 0.0
                continue
            except Exception:  # a bug must not end the thread: the worker would go deaf
                logger.exception("backplane: unexpected error in the publisher; %d queued item(s) dropped", len(batch))
                self.dropped += len(batch)
                if stop:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if stop:
                self._goodbye(client, mine)
                return

    def _take_batch(self, timeout: float, limit: Optional[int]) -> List[Tuple[str, Any]]:
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

    def _write(self, client: Any, batch: List[Tuple[str, Any]]) -> None:
        if not batch:
            return
        pipe = client.pipeline(transaction=True)
        published = 0
        for kind, payload in batch:
            if kind == "publish":
                pipe.publish(*payload)
                published += 1
            elif kind == "register":
                info, entry, event = payload
                pipe.hset(self._clients_key, _addr_key(info.ip), entry)
                pipe.publish(self._all_channel, msgpack.packb(event, use_bin_type=True))
                published += 1
            elif kind == "unregister":
                info, event = payload
                pipe.hdel(self._clients_key, _addr_key(info.ip))
                pipe.publish(self._all_channel, msgpack.packb(event, use_bin_type=True))
                published += 1
        pipe.execute()
        self.published += published

    def _heartbeat(self, client: Any) -> None:
        """Refresh our alive key; claim the clients of workers whose key expired."""
        ttl_ms = int(self.worker_ttl * 1000)
        pipe = client.pipeline(transaction=False)
        pipe.set(self._alive_key(self.worker_id), b"1", px=ttl_ms)
        pipe.sadd(self._workers_key, self.worker_id)
        pipe.smembers(self._workers_key)
        _, _, workers = pipe.execute()
        others = [w.decode() for w in workers if w.decode() != self.worker_id]
        if not others:
            return
        pipe = client.pipeline(transaction=False)
        for worker in others:
            pipe.exists(self._alive_key(worker))
        dead = [worker for worker, alive in zip(others, pipe.execute()) if not alive]
        if dead:
            self._reap(client, set(dead))

    def _reap(self, client: Any, dead: set) -> None:
        for address_key, (worker, name, group, _msgpack_ok, _joined_at) in self._read_snapshot(client).items():
            if worker not in dead:
                continue
            if not client.hdel(self._clients_key, address_key):
                continue  # another worker claimed it first
            info = ClientInfo(_key_addr(address_key), name, group)
            announce_frame = self._left_frame(info)
            client.publish(self._all_channel, msgpack.packb([_LEAVE, self.worker_id, address_key, announce_frame], use_bin_type=True))
            logger.warning("backplane: worker %s is gone; %s leaves with it", worker, info)
            self._to_hub(["reaped", info, announce_frame])
        for worker in dead:
            client.srem(self._workers_key, worker)

    def _rejoin(self, client: Any, mine: Dict[str, bytes]) -> None:
        """(Re)connected: write our entries back and say so, without announcing anyone."""
        pipe = client.pipeline(transaction=True)
        pipe.set(self._alive_key(self.worker_id), b"1", px=int(self.worker_ttl * 1000))
        pipe.sadd(self._workers_key, self.worker_id)
        for key, value in mine.items():
            pipe.hset(self._clients_key, key, value)
            _worker, name, group, msgpack_ok, joined_at = msgpack.unpackb(value, raw=False)
            pipe.publish(self._all_channel, msgpack.packb([_HERE, self.worker_id, key, name, group, msgpack_ok, joined_at], use_bin_type=True))
        pipe.execute()

    def _goodbye(self, client: Any, mine: Dict[str, bytes]) -> None:
        try:
            pipe = client.pipeline(transaction=True)
            if mine:
                pipe.hdel(self._clients_key, *mine)
            pipe.delete(self._alive_key(self.worker_id))
            pipe.srem(self._workers_key, self.worker_id)
            pipe.publish(self._my_channel, msgpack.packb([_BYE, self.worker_id], use_bin_type=True))
            pipe.execute()
        except self._redis_module.RedisError as exc:
            logger.warning("backplane: could not remove worker %s from Redis: %s", self.worker_id, exc)
        finally:
            client.close()

    def _alive_key(self, worker: str) -> str:
        return f"{self.namespace}:alive:{worker}"

    # ------------------------------------------------------------------ subscriber thread

    def _decode(self, data: bytes) -> Optional[List[Any]]:
        """A message from a channel, or None (logged) when it is not one of ours."""
        try:
            message = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # msgpack raises several kinds for garbage
            self._note_malformed(f"undecodable message ({type(exc).__name__})")
            return None
        if not (isinstance(message, list) and len(message) >= 2 and message[0] in _KINDS and isinstance(message[1], str)):
            self._note_malformed(f"unknown message {str(message)[:80]!r}")
            return None
        return message

    def _read_snapshot(self, client: Any) -> Dict[str, Tuple[Any, ...]]:
        """The clients hash, skipping (and logging) entries that are not ours."""
        snapshot = {}
        for key, value in client.hgetall(self._clients_key).items():
            try:
                entry = tuple(msgpack.unpackb(value, raw=False))
                _key_addr(key.decode())
            except Exception as exc:
                self._note_malformed(f"unreadable entry {key[:60]!r} in {self._clients_key} ({type(exc).__name__})")
                continue
            if len(entry) != 5 or not isinstance(entry[0], str):
                self._note_malformed(f"unreadable entry {key[:60]!r} in {self._clients_key}")
                continue
            snapshot[key.decode()] = entry
        return snapshot

    def _note_malformed(self, what: str) -> None:
        """Count a message or entry that is not ours; log the first few, then every 1000th."""
        self.malformed += 1
        if self.malformed <= 10 or self.malformed % 1000 == 0:
            logger.warning("backplane: ignoring an %s in namespace %r (%d so far)", what, self.namespace, self.malformed)

    def _subscriber_main(self) -> None:
        """Receive both channels and hand each message to the hub, reconnecting as needed."""
        backoff = _BACKOFF_FIRST
        for attempt in itertools.count():
            if self._stopping:
                return
            client = self._redis()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._all_channel, self._my_channel)
                # Subscribed first, then read the hash: a change made in between shows in
                # both, and applying it twice is harmless.
                self._to_hub(["snapshot", self._read_snapshot(client)])
                if backoff != _BACKOFF_FIRST or attempt:
                    logger.info("backplane: subscribed to %s again", self.url)
                backoff = _BACKOFF_FIRST
                while not self._stopping:
                    message = pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    self.received += 1
                    decoded = self._decode(message["data"])
                    if decoded is not None:
                        self._to_hub(decoded)
            except Exception as exc:
                if self._stopping:
                    return
                if not isinstance(exc, (self._redis_module.RedisError, OSError)):
                    logger.exception("backplane: unexpected error in the subscriber; reconnecting")
                elif backoff == _BACKOFF_FIRST:
                    logger.warning("backplane: subscription to %s lost (%s); reconnecting", self.url, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except Exception:
                    pass
