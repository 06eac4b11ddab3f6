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

How the mirror follows the others, and what this worker's clients hear of it (each
join and leave once, whatever the reason), is :mod:`~hisock_gevent.cluster_sync`'s job;
which of this worker's clients hear it (the announcement scope) is the
:class:`~hisock_gevent.registry.LocalDelivery`'s, the same rule for our own clients' news
and the others'.  A broadcast or group send that skips clients (``exclude``) skips ours
here and names the others' by their cluster identity in its message.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Counter, Dict, Iterable, List, Optional, Sequence, Set, Tuple

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
from .cluster_sync import DEFAULT_RESYNC_GRACE, MirrorSync
from .errors import ClientNotFound, GroupNotFound
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
        """:param resync_grace: see :data:`~hisock_gevent.cluster_sync.DEFAULT_RESYNC_GRACE`."""
        self.bus = bus
        self.worker_id = bus.worker_id
        self._link: Optional[ServerLink] = None
        self._local: Optional[LocalDelivery] = None
        self._mirror = Mirror(self._send_remote)
        # Our own clients: peer -> its entry, and id -> peer.
        self._entries: Dict[Peer, ClientEntry] = {}
        self._by_id: Dict[str, Peer] = {}
        self._serial = itertools.count(1)
        self._sync = MirrorSync(self._mirror, self.worker_id, self._announce, resync_grace, on_change=self._remote_changed)
        #: Messages acted on, by tag (``"join"``, ``"group"``, ...).
        self.applied: Counter[str] = collections.Counter()
        self._apply: Dict[type, Callable[[Any], None]] = {
            Joined: self._sync.joined,
            Changed: self._sync.changed,
            Left: self._sync.left,
            Here: self._sync.here,
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
        self._local.start(link)
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

    @property
    def local(self) -> LocalDelivery:
        if self._local is None:
            raise RuntimeError("the cluster is used before its server started")
        return self._local

    def find_client(self, client: ClientRef) -> ClientInfo:
        return self._find_peer(client).info

    def _find_peer(self, client: ClientRef, depth: int = 0) -> Peer:
        """Ours or another worker's.

        A name several clients share means the one that joined first anywhere in the
        cluster, as on one server, with a UserWarning.  So does an address several clients
        share (two workers behind one proxy may each see a client at the same ``ip:port``),
        unless the reference is the very ClientInfo of one of them (as handlers get it).

        :param depth: frames between the server method and this call beyond the usual,
            for the warning to point at the user's call.
        :raises ValueError: wrong format.  :raises ClientNotFound: nobody matches.
        """
        address = address_of(client)
        if address is None:
            assert isinstance(client, str)
            named: List[Peer] = [*self.registry.named(client), *self._mirror.named(client)]
            if not named:
                raise ClientNotFound(f"no client named {client!r}")
            return self._first(named, f"{len(named)} clients are named {client!r}", depth)
        found: List[Peer] = [*self.registry.all_at(address), *self._mirror.at(address)]
        if not found:
            raise ClientNotFound(f"no client at {address[0]}:{address[1]}")
        if len(found) > 1 and isinstance(client, ClientInfo):
            same = [peer for peer in found if peer.info is client] or [peer for peer in found if peer.info == client]
            if len(same) == 1:
                return same[0]
        return self._first(found, f"{len(found)} clients are at {address[0]}:{address[1]}", depth)

    def _first(self, peers: List[Peer], what: str, depth: int = 0) -> Peer:
        if len(peers) == 1:
            return peers[0]
        warnings.warn(f"{what}; using the one that joined first", UserWarning, stacklevel=_WARN_STACKLEVEL + depth)
        return min(peers, key=self._join_order)

    def _excluded(self, exclude: Sequence[ClientRef]) -> Set[Peer]:
        """The clients ``exclude`` names, ours and the others' (RemoteClient), resolved as
        :meth:`find_client` resolves one; a reference nobody matches is skipped."""
        skip: Set[Peer] = set()
        for ref in exclude:
            try:
                # One frame more than a lookup: this one (the send has one wrapper, as lookups do).
                skip.add(self._find_peer(ref, depth=1))
            except ClientNotFound:
                continue
        return skip

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

    def to_group(self, group: GroupRef, message: OutgoingCommand, exclude: Sequence[ClientRef] = ()) -> None:
        """Our members get the frame here; each other worker holding members gets one
        message on its own channel with the frames its members need, and the identities
        of its members to skip.  Workers without members (or whose every member is
        excluded) hear nothing of it.

        :raises GroupNotFound: nobody anywhere is in the group (excluded or not).
        """
        name = group.group if isinstance(group, ClientInfo) else group
        try:
            local = self.registry.group(group)
        except GroupNotFound:
            local = []
        workers = self._mirror.group_workers(name) if isinstance(name, str) else {}
        if not local and not workers:
            self.registry.group(group)  # raises, in the registry's words
        skip = self._excluded(exclude) if exclude else set()
        skipped: Dict[str, List[str]] = {}  # worker -> ids of its members to skip
        if skip:
            local = [peer for peer in local if peer not in skip]
            for client in skip:
                if isinstance(client, RemoteClient) and client.info.group == name:
                    skipped.setdefault(client.worker, []).append(client.client_id)
            if skipped and isinstance(name, str):
                workers = _dialects_by_worker(client for client in self._mirror.group(name) if client not in skip)
        if not workers:
            fan_out(local, message)
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
            self.bus.publish(
                worker,
                ToGroup(self.worker_id, name, plain if has_plain else b"", extended if has_extended else b"", tuple(skipped.get(worker, ()))),
            )

    def to_all(self, message: OutgoingCommand, exclude: Sequence[ClientRef] = ()) -> None:
        local = list(self.registry)
        remote = list(self._mirror)
        skip = self._excluded(exclude) if exclude else set()
        if skip:
            local = [peer for peer in local if peer not in skip]
            remote = [client for client in remote if client not in skip]
        if not remote:
            fan_out(local, message)
            return
        plain, extended = frames_for([*local, *remote], message)
        _send_built(local, plain, extended)
        skipped = tuple(client.client_id for client in skip if isinstance(client, RemoteClient))
        self.bus.publish(None, ToAll(self.worker_id, plain, extended, skipped))

    def announce(self, body_frame: bytes, about: ClientInfo, exclude: Optional[Peer] = None) -> None:
        self.local.announce(body_frame, about, exclude)

    # ------------------------------------------------------------------ our clients

    def joined(self, peer: Peer, announce_frame: bytes) -> None:
        self.announce(announce_frame, peer.info, exclude=peer)
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
            self.announce(announce_frame, peer.info, exclude=peer)
        entry = self._entries.pop(peer, None)
        if entry is None:
            return
        self._by_id.pop(entry.client_id, None)
        self.bus.unregister(entry, Left(self.worker_id, entry))

    def changed(self, peer: Peer, old: ClientInfo) -> None:
        self.local.changed(peer, old)
        entry = self._entries.get(peer)
        if entry is None:
            return
        entry = self._entries[peer] = self._entry_of(peer, entry.client_id, entry.joined_at)
        self.bus.register(entry, Changed(self.worker_id, entry))

    def disconnect_elsewhere(self, client: ClientRef, force: bool, call_func: bool) -> bool:
        try:
            target = self._find_peer(client)
        except ClientNotFound:
            return False
        if not isinstance(target, RemoteClient):
            return False
        self._sync.kicked(target.client_id)
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
        """The shared table as read just after (re)subscribing (see :meth:`MirrorSync.load_snapshot`)."""
        self._sync.load_snapshot(workers, entries)

    def tick(self, now: Optional[float] = None) -> None:
        """Called now and then by the bus (see :meth:`MirrorSync.tick`)."""
        self._sync.tick(now)

    def _on_reaped(self, message: Reaped) -> None:
        """``message.worker`` was found dead: its clients leave, and the worker that reaped
        it (maybe us) runs their ``leave``."""
        self._sync.reaped(message)
        if message.origin != self.worker_id or message.worker == self.worker_id:
            return
        for entry in message.entries:
            logger.warning("backplane: worker %s is gone; %s leaves with it", message.worker, entry.info)
            self.link.run_leave(entry.info)

    def _on_to_all(self, message: ToAll) -> None:
        _send_built(self._without(list(self.registry), message.exclude), message.plain, message.extended)

    def _on_to_group(self, message: ToGroup) -> None:
        try:
            members = self.registry.group(message.group)
        except GroupNotFound:
            return
        _send_built(self._without(members, message.exclude), message.plain, message.extended)

    def _without(self, peers: List[Peer], client_ids: Tuple[str, ...]) -> List[Peer]:
        """``peers`` but our clients with these cluster identities."""
        if not client_ids:
            return peers
        skip = {self._by_id.get(client_id) for client_id in client_ids}
        return [peer for peer in peers if peer not in skip]

    def _on_to_client(self, message: ToClient) -> None:
        peer = self._by_id.get(message.client_id)
        if peer is not None:
            peer.send(message.frame)

    def _on_kick(self, message: Kick) -> None:
        peer = self._by_id.get(message.client_id)
        if peer is not None:
            self.link.kick(peer.info.ip, message.force, message.call_func)

    def _announce(self, kind: Any, info: ClientInfo) -> None:
        """Tell our clients (those the announcement scope says) that another worker's
        client joined or left."""
        self.local.tell(kind, info)

    def _remote_changed(self, old: ClientInfo, new: ClientInfo) -> None:
        """Another worker's client changed its name or group: tell our clients what the
        announcement scope says (a group change under "group")."""
        self.local.moved(old, new)

    # ------------------------------------------------------------------ stats

    def stats(self) -> Dict[str, Any]:
        return {
            "worker": self.worker_id,
            "remote_clients": len(self._mirror),
            **self.bus.stats(),
            "received_by_kind": dict(sorted(self.applied.items())),
        }


def _dialects_by_worker(clients: Iterable[RemoteClient]) -> Dict[str, Tuple[bool, bool]]:
    """worker -> (has plain clients, has extended clients) among ``clients``."""
    found: Dict[str, List[bool]] = {}
    for client in clients:
        flags = found.setdefault(client.worker, [False, False])
        flags[1 if client.msgpack_ok else 0] = True
    return {worker: (flags[0], flags[1]) for worker, flags in found.items()}


def _send_built(peers: List[Peer], plain: bytes, extended: bytes) -> None:
    for peer in peers:
        peer.send(extended if peer.msgpack_ok else plain)
