"""Several server processes acting as one HiSock server: the cluster logic, without a transport.

:class:`ClusterDelivery` is a :class:`~hisock_gevent.registry.Delivery`: the server hands
it every lookup and send and every join, leave and change of its own clients.  It answers
from this worker's registry and from a :class:`~hisock_gevent.cluster_mirror.Mirror` of the
other workers' clients, and it talks to the other workers only through a :class:`Bus`: a
transport that publishes :mod:`~hisock_gevent.cluster_messages` and hands back the ones
meant for this worker.  :class:`~hisock_gevent.backplane.RedisBackplane` is this class on
a Redis bus; the unit tests run several of them on an in-memory bus, without sockets.

Every method here runs on the server's hub.  The bus calls :meth:`ClusterDelivery.receive`,
:meth:`ClusterDelivery.load_snapshot` and :meth:`ClusterDelivery.tick` from a greenlet on
that hub (never from a hub callback: receiving may run a ``leave`` handler).

What this worker's clients hear of the others' clients: ``$CLTCONN$`` when one is added
to the mirror and ``$CLTDISCONN$`` when one is removed, exactly once each, whatever the
reason (a join or leave, a dead worker reaped, a worker coming back after the others
reaped it, a resynchronisation after this worker lost Redis), so they see the same
comings and goings as the mirror.  The first snapshot, taken before anyone of ours
joined, is silent.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Counter, Dict, Iterable, List, Optional, Tuple

from .cluster_messages import (
    Bye,
    Changed,
    ClientEntry,
    ClusterMessage,
    Here,
    Joined,
    Kick,
    Left,
    Mark,
    Reaped,
    ToAll,
    ToClient,
    ToGroup,
    tag_of,
)
from .cluster_mirror import Mirror, RemoteClient
from .errors import ClientNotFound, GroupNotFound
from .frames import frame
from .messages import PeerJoined, PeerLeft
from .outgoing import OutgoingCommand
from .registry import (
    ClientRef,
    ClientRegistry,
    Delivery,
    GroupRef,
    LocalDelivery,
    Peer,
    ServerLink,
    address_of,
    fan_out,
    frames_for,
)
from .utils import ClientInfo

__all__ = ["Bus", "ClusterDelivery"]

logger = logging.getLogger("hisock_gevent")

# Stack depth from the warning up to the user's call of a server method
# (user -> server method -> its _on_home wrapper -> delivery method -> _find_peer -> _first).
_WARN_STACKLEVEL = 6
# How many kicked clients' ids are remembered until their worker says they left.
_KICKED_MAX = 4096
#: Seconds a worker missing from a fresh snapshot keeps its clients in the mirror, waiting
#: for it to write them back (Redis restarted empty); then they leave.
DEFAULT_RESYNC_GRACE = 5.0


class Bus(ABC):
    """What the cluster logic needs of a transport.

    A bus delivers the messages one worker publishes to another in the order they were
    published, and never hands a worker a message that worker published itself, except a
    :class:`~hisock_gevent.cluster_messages.Reaped` it made (which it hands over directly).
    """

    #: This worker's name on the bus; unique in the cluster.
    worker_id: str

    @abstractmethod
    def open(self, node: ClusterDelivery) -> None:
        """Start: from now on, hand ``node`` what arrives (on the calling hub, in a greenlet)."""

    @abstractmethod
    def close(self) -> None:
        """Stop: say goodbye to the others if possible, and release everything."""

    @abstractmethod
    def publish(self, worker: Optional[str], message: ClusterMessage) -> None:
        """Send ``message`` to ``worker`` (None: to every worker) without blocking."""

    @abstractmethod
    def register(self, entry: ClientEntry, message: ClusterMessage) -> None:
        """Write (or rewrite) our client's entry in the shared table and publish
        ``message`` to every worker, both or neither."""

    @abstractmethod
    def unregister(self, entry: ClientEntry, message: ClusterMessage) -> None:
        """Remove our client's entry from the shared table and publish ``message``."""

    def stats(self) -> Dict[str, Any]:
        """The transport's own counters for ``stats()["cluster"]``."""
        return {}


class ClusterDelivery(Delivery):
    """Deliver to the clients of every worker on one :class:`Bus`."""

    def __init__(self, bus: Bus, resync_grace: float = DEFAULT_RESYNC_GRACE):
        self.bus = bus
        self.resync_grace = resync_grace
        self.worker_id = bus.worker_id
        self._link: Optional[ServerLink] = None
        self._local: Optional[LocalDelivery] = None
        self._mirror = Mirror(self._send_remote)
        # Our own clients: peer -> its entry, and id -> peer.
        self._entries: Dict[Peer, ClientEntry] = {}
        self._by_id: Dict[str, Peer] = {}
        self._serial = itertools.count(1)
        # Ids of other workers' clients we forgot when asking their worker to disconnect
        # them: their ``Left`` is still announced here.
        self._kicked: Dict[str, None] = collections.OrderedDict()
        # A worker's complete list arriving in several Here messages: the ids so far.
        self._here_ids: Dict[str, set] = {}
        # Workers missing from the last snapshot: when their clients leave unless they
        # write them back first (time.monotonic()).
        self._unconfirmed: Dict[str, float] = {}
        self._snapshots = 0
        #: Messages acted on, by tag (``"join"``, ``"group"``, ...).
        self.applied: Counter[str] = collections.Counter()
        self._apply: Dict[type, Callable[[Any], None]] = {
            Joined: self._on_joined,
            Changed: self._on_changed,
            Left: self._on_left,
            Here: self._on_here,
            Reaped: self._on_reaped,
            ToAll: self._on_to_all,
            ToGroup: self._on_to_group,
            ToClient: self._on_to_client,
            Kick: self._on_kick,
            Bye: lambda message: None,
            Mark: lambda message: None,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} worker={self.worker_id}>"

    # ------------------------------------------------------------------ life

    def start(self, link: ServerLink) -> None:
        self._link = link
        self._local = LocalDelivery(link.registry)
        self.bus.open(self)

    def stop(self) -> None:
        self.bus.close()

    @property
    def link(self) -> ServerLink:
        if self._link is None:
            raise RuntimeError("the cluster is used before its server started")
        return self._link

    @property
    def registry(self) -> ClientRegistry:
        return self.link.registry

    @property
    def mirror(self) -> Mirror:
        """The other workers' clients, as this worker knows them."""
        return self._mirror

    # ------------------------------------------------------------------ lookups

    def find_client(self, client: ClientRef) -> ClientInfo:
        return self._find_peer(client).info

    def _find_peer(self, client: ClientRef) -> Peer:
        """Ours or another worker's.

        A name several clients share means the one that joined first anywhere in the
        cluster, as on one server, with a UserWarning.  So does an address several clients
        share (two workers behind one proxy may each see a client at the same ``ip:port``),
        unless the reference is the very ClientInfo of one of them (as handlers get it).

        :raises ValueError: wrong format.  :raises ClientNotFound: nobody matches.
        """
        address = address_of(client)
        if address is None:
            assert isinstance(client, str)
            named: List[Peer] = [*self.registry.named(client), *self._mirror.named(client)]
            if not named:
                raise ClientNotFound(f"no client named {client!r}")
            return self._first(named, f"{len(named)} clients are named {client!r}")
        local = self.registry.at(address)
        found: List[Peer] = [local] if local is not None else []
        found.extend(self._mirror.at(address))
        if not found:
            raise ClientNotFound(f"no client at {address[0]}:{address[1]}")
        if len(found) > 1 and isinstance(client, ClientInfo):
            same = [peer for peer in found if peer.info is client] or [peer for peer in found if peer.info == client]
            if len(same) == 1:
                return same[0]
        return self._first(found, f"{len(found)} clients are at {address[0]}:{address[1]}")

    def _first(self, peers: List[Peer], what: str) -> Peer:
        if len(peers) == 1:
            return peers[0]
        warnings.warn(f"{what}; using the one that joined first", UserWarning, stacklevel=_WARN_STACKLEVEL)
        return min(peers, key=self._join_order)

    def _join_order(self, peer: Peer) -> Tuple[float, str]:
        if isinstance(peer, RemoteClient):
            return peer.joined_at, peer.client_id
        entry = self._entries.get(peer)
        return (entry.joined_at, entry.client_id) if entry is not None else (0.0, "")

    def group_members(self, group: GroupRef) -> List[ClientInfo]:
        local, remote = self._group_peers(group)
        return [peer.info for peer in local] + [client.info for client in remote]

    def _group_peers(self, group: GroupRef) -> Tuple[List[Peer], List[RemoteClient]]:
        """The group's members here and on the other workers.

        :raises GroupNotFound: nobody anywhere is in it (worded by the local registry,
            which checks the group's type too).
        """
        try:
            local = self.registry.group(group)
        except GroupNotFound:
            local = []
        name = group.group if isinstance(group, ClientInfo) else group
        remote = self._mirror.group(name) if isinstance(name, str) else []
        if not local and not remote:
            self.registry.group(group)  # raises, in the registry's words
        return local, remote

    def all_clients(self) -> List[ClientInfo]:
        return [peer.info for peer in self.registry] + [client.info for client in self._mirror]

    # ------------------------------------------------------------------ sends

    def to_client(self, client: ClientRef, message: OutgoingCommand) -> None:
        peer = self._find_peer(client)
        peer.send(message.frame_for(peer.msgpack_ok))

    def _send_remote(self, client: RemoteClient, body_frame: bytes) -> None:
        self.bus.publish(client.worker, ToClient(self.worker_id, client.client_id, body_frame))

    def to_group(self, group: GroupRef, message: OutgoingCommand) -> None:
        """Our members get the frame here; each other worker holding members gets one
        message on its own channel with the frames its members need.  Workers without
        members hear nothing of it.

        :raises GroupNotFound: nobody anywhere is in the group.
        """
        name = group.group if isinstance(group, ClientInfo) else group
        try:
            local = self.registry.group(group)
        except GroupNotFound:
            local = []
        workers = self._mirror.group_workers(name) if isinstance(name, str) else {}
        if not workers:
            fan_out(local or self.registry.group(group), message)  # (raises when nobody is in it)
            return
        assert isinstance(name, str)
        plain_needed = any(not peer.msgpack_ok for peer in local) or any(plain for plain, _ in workers.values())
        extended_needed = any(peer.msgpack_ok for peer in local) or any(extended for _, extended in workers.values())
        # The plain frame first, and every frame before anything is sent: if the content
        # cannot reach a plain HiSock peer, nobody receives anything (as in frames_for).
        plain = message.frame_for(False) if plain_needed else b""
        extended = message.frame_for(True) if extended_needed else b""
        _send_built(local, plain, extended)
        for worker, (has_plain, has_extended) in workers.items():
            self.bus.publish(worker, ToGroup(self.worker_id, name, plain if has_plain else b"", extended if has_extended else b""))

    def to_all(self, message: OutgoingCommand) -> None:
        local = list(self.registry)
        remote = list(self._mirror)
        if not remote:
            fan_out(local, message)
            return
        plain, extended = frames_for([*local, *remote], message)
        _send_built(local, plain, extended)
        self.bus.publish(None, ToAll(self.worker_id, plain, extended))

    def announce(self, body_frame: bytes, exclude: Optional[Peer] = None) -> None:
        assert self._local is not None
        self._local.announce(body_frame, exclude)

    # ------------------------------------------------------------------ our clients

    def joined(self, peer: Peer, announce_frame: bytes) -> None:
        self.announce(announce_frame, exclude=peer)
        entry = self._entry_of(peer, self._new_id(peer), time.time())
        self._entries[peer] = entry
        self._by_id[entry.client_id] = peer
        self.bus.register(entry, Joined(self.worker_id, entry))

    def _new_id(self, peer: Peer) -> str:
        """A cluster-unique identity: our worker's name and a serial number."""
        return f"{self.worker_id}#{next(self._serial)}"

    def _entry_of(self, peer: Peer, client_id: str, joined_at: float) -> ClientEntry:
        info = peer.info
        return ClientEntry(client_id, self.worker_id, info.ip, info.name, info.group, peer.msgpack_ok, joined_at)

    def left(self, peer: Peer, announce_frame: Optional[bytes]) -> None:
        # With announce_frame None the server is disconnecting everyone of ours; the other
        # workers' clients still hear that ours left.
        if announce_frame is not None:
            self.announce(announce_frame, exclude=peer)
        entry = self._entries.pop(peer, None)
        if entry is None:
            return
        self._by_id.pop(entry.client_id, None)
        self.bus.unregister(entry, Left(self.worker_id, entry))

    def changed(self, peer: Peer, old: ClientInfo) -> None:
        entry = self._entries.get(peer)
        if entry is None:
            return
        entry = self._entries[peer] = self._entry_of(peer, entry.client_id, entry.joined_at)
        self.bus.register(entry, Changed(self.worker_id, entry))

    def our_entries(self) -> List[ClientEntry]:
        """Every client of ours, as the others should know it."""
        return list(self._entries.values())

    def disconnect_elsewhere(self, client: ClientRef, force: bool, call_func: bool) -> bool:
        try:
            target = self._find_peer(client)
        except ClientNotFound:
            return False
        if not isinstance(target, RemoteClient):
            return False
        self._mirror.remove(target.client_id)
        self._kicked[target.client_id] = None
        while len(self._kicked) > _KICKED_MAX:
            self._kicked.pop(next(iter(self._kicked)))
        self.bus.publish(target.worker, Kick(self.worker_id, target.client_id, force, call_func))
        return True

    # ------------------------------------------------------------------ from the bus

    def receive(self, message: ClusterMessage) -> None:
        """Act on one message from another worker (or a Reaped of our own bus)."""
        if message.origin == self.worker_id and not isinstance(message, Reaped):
            return
        self.applied[tag_of(message)] += 1
        self._apply[type(message)](message)

    def load_snapshot(self, workers: Iterable[str], entries: Iterable[ClientEntry]) -> None:
        """The shared table as read just after (re)subscribing: the live ``workers`` and
        their clients.

        Each listed worker's clients in the mirror become exactly these (our clients hear
        the differences, except on the first snapshot).  A worker the mirror knows but the
        snapshot does not list keeps its clients for :attr:`resync_grace` seconds: if Redis
        restarted empty it writes them back (a ``Here``); if it died meanwhile, they leave.
        """
        first = self._snapshots == 0
        self._snapshots += 1
        listed = {worker for worker in workers if worker != self.worker_id}
        by_worker: Dict[str, List[ClientEntry]] = {worker: [] for worker in listed}
        for entry in entries:
            if entry.worker in listed:
                by_worker[entry.worker].append(entry)
        for worker, found in by_worker.items():
            self._sync_worker(worker, found, announce=not first)
        for worker in self._mirror.workers():
            if worker not in listed and worker != self.worker_id:
                if first:
                    self._drop_worker(worker, announce=False)
                else:
                    self._unconfirmed.setdefault(worker, time.monotonic() + self.resync_grace)

    def tick(self, now: Optional[float] = None) -> None:
        """Called now and then (each heartbeat): workers that never wrote their clients
        back after a snapshot missed them are gone, and so are their clients."""
        now = time.monotonic() if now is None else now
        for worker, deadline in list(self._unconfirmed.items()):
            if deadline <= now:
                logger.warning("backplane: worker %s did not come back; its clients leave", worker)
                self._drop_worker(worker, announce=True)

    def _sync_worker(self, worker: str, entries: Iterable[ClientEntry], announce: bool) -> None:
        """Make the mirror's clients of ``worker`` exactly ``entries``."""
        ids = set()
        for entry in entries:
            ids.add(entry.client_id)
            self._add_remote(entry, announce)
        for client in self._mirror.of_worker(worker):
            if client.client_id not in ids:
                self._remove_remote(client.client_id, announce)
        self._unconfirmed.pop(worker, None)

    def _drop_worker(self, worker: str, announce: bool) -> None:
        for client in self._mirror.of_worker(worker):
            self._remove_remote(client.client_id, announce)
        self._unconfirmed.pop(worker, None)
        self._here_ids.pop(worker, None)

    def _add_remote(self, entry: ClientEntry, announce: bool = True) -> None:
        _client, new = self._mirror.put(entry)
        if new and announce:
            self._announce(PeerJoined, entry.info)

    def _remove_remote(self, client_id: str, announce: bool = True) -> bool:
        client = self._mirror.remove(client_id)
        if client is not None and announce:
            self._announce(PeerLeft, client.info)
        return client is not None

    def _on_joined(self, message: Joined) -> None:
        self._add_remote(message.entry)

    def _on_changed(self, message: Changed) -> None:
        if self._mirror.get(message.entry.client_id) is not None:
            self._mirror.put(message.entry)

    def _on_left(self, message: Left) -> None:
        entry = message.entry
        known = self._remove_remote(entry.client_id, announce=False)
        kicked = self._kicked.pop(entry.client_id, 0) is None
        if known or kicked:
            self._announce(PeerLeft, entry.info)

    def _on_here(self, message: Here) -> None:
        """A worker wrote its clients back: with its last part, the mirror holds exactly
        them (whoever is new is announced, whoever is missing has left)."""
        ids = self._here_ids.setdefault(message.origin, set())
        for entry in message.entries:
            ids.add(entry.client_id)
            self._add_remote(entry)
        if message.complete:
            del self._here_ids[message.origin]
            for client in self._mirror.of_worker(message.origin):
                if client.client_id not in ids:
                    self._remove_remote(client.client_id)
            self._unconfirmed.pop(message.origin, None)

    def _on_reaped(self, message: Reaped) -> None:
        """``message.worker`` was found dead: its clients leave; the reaper runs their
        ``leave``.  About us, it is news to act on for the bus (which writes our clients
        back at its next heartbeat), not for the mirror."""
        if message.worker == self.worker_id:
            return
        for entry in message.entries:
            self._remove_remote(entry.client_id)
            if message.origin == self.worker_id:
                logger.warning("backplane: worker %s is gone; %s leaves with it", message.worker, entry.info)
                self.link.run_leave(entry.info)
        # Whatever else the mirror held of it is gone too (the table is the truth).
        self._drop_worker(message.worker, announce=True)

    def _on_to_all(self, message: ToAll) -> None:
        _send_built(list(self.registry), message.plain, message.extended)

    def _on_to_group(self, message: ToGroup) -> None:
        try:
            members = self.registry.group(message.group)
        except GroupNotFound:
            return
        _send_built(members, message.plain, message.extended)

    def _on_to_client(self, message: ToClient) -> None:
        peer = self._by_id.get(message.client_id)
        if peer is not None:
            peer.send(message.frame)

    def _on_kick(self, message: Kick) -> None:
        peer = self._by_id.get(message.client_id)
        if peer is not None:
            self.link.kick(peer.info.ip, message.force, message.call_func)

    def _announce(self, kind: Any, info: ClientInfo) -> None:
        """Tell our clients that another worker's client joined or left."""
        try:
            body_frame = frame(kind(info.as_dict()).to_body(), self.link.header_len)
        except ValueError as exc:
            logger.warning("backplane: not announcing %s: %s", info, exc)
            return
        self.announce(body_frame)

    # ------------------------------------------------------------------ stats

    def stats(self) -> Dict[str, Any]:
        return {
            "worker": self.worker_id,
            "remote_clients": len(self._mirror),
            **self.bus.stats(),
            "received_by_kind": dict(sorted(self.applied.items())),
        }


def _send_built(peers: List[Peer], plain: bytes, extended: bytes) -> None:
    for peer in peers:
        peer.send(extended if peer.msgpack_ok else plain)
