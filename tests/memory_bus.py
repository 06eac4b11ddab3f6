"""The cluster logic without sockets, Redis or gevent: an in-memory bus and stand-in servers.

:class:`MemoryNetwork` is what Redis is to the real workers: a shared table of every
worker's clients, and channels.  Messages go through ``to_wire``/``decode`` as they would
through Redis, wait in one queue, and are delivered when the test calls :meth:`pump`, so a
test decides exactly what has arrived where.  :class:`FakeServer` is a server as
:class:`~hisock_gevent.cluster.ClusterDelivery` sees it: a registry of :class:`FakePeer`,
a header width, ``run_leave`` and ``kick``; each peer keeps the frames it was sent.
"""

from __future__ import annotations

import collections
from typing import Any, Counter, Deque, Dict, List, Optional, Set, Tuple

from hisock_gevent.cluster import Bus, ClusterDelivery
from hisock_gevent.cluster_messages import (
    ClientEntry,
    ClusterMessage,
    Here,
    Reaped,
    decode,
    tag_of,
    to_wire,
)
from hisock_gevent.frames import frame
from hisock_gevent.messages import Command, PeerJoined, PeerLeft, parse_server_body
from hisock_gevent.outgoing import OutgoingCommand
from hisock_gevent.registry import ClientRegistry, ServerLink, client_refs
from hisock_gevent.typecast import decode as decode_content
from hisock_gevent.utils import ClientInfo

HEADER_LEN = 16
#: Most deliveries one pump() makes: a loop between workers fails the test instead of hanging.
PUMP_LIMIT = 100_000


class MemoryNetwork:
    """Channels and a shared table for the workers of one test."""

    def __init__(self) -> None:
        self.buses: Dict[str, MemoryBus] = {}
        #: worker -> client id -> entry: the shared table.
        self.table: Dict[str, Dict[str, ClientEntry]] = {}
        self._queue: Deque[Tuple[Optional[str], bytes]] = collections.deque()
        #: Workers whose messages are neither sent nor received (cut off).
        self.cut: Set[str] = set()
        #: (receiving worker, tag) -> messages delivered.
        self.delivered: Counter[Tuple[str, str]] = collections.Counter()

    def send(self, sender: str, worker: Optional[str], message: ClusterMessage) -> None:
        if sender not in self.cut:
            self._queue.append((worker, to_wire(message)))

    def pump(self) -> int:
        """Deliver everything queued (and what that queues), in order; returns how many."""
        count = 0
        while self._queue:
            assert count < PUMP_LIMIT, "the workers keep messaging each other"
            worker, data = self._queue.popleft()
            message = decode(data)
            for bus in list(self.buses.values()):
                if worker not in (None, bus.worker_id) or bus.worker_id == message.origin or bus.worker_id in self.cut:
                    continue
                self.delivered[bus.worker_id, tag_of(message)] += 1
                bus.node.receive(message)
                count += 1
        return count

    def snapshot(self) -> Tuple[List[str], List[ClientEntry]]:
        """The live workers and every one's clients, as a bus reads them after subscribing."""
        return list(self.table), [entry for entries in self.table.values() for entry in entries.values()]

    def reap(self, dead: str, by: str) -> None:
        """``by`` finds ``dead`` gone: its entries leave the table and everyone is told."""
        entries = tuple(self.table.pop(dead, {}).values())
        message = Reaped(by, dead, entries)
        self.send(by, None, message)
        self.buses[by].node.receive(message)

    def come_back(self, worker: str) -> None:
        """``worker`` finds it was dropped (reaped, or Redis lost the table): it writes its
        clients back and tells everyone its complete list."""
        bus = self.buses[worker]
        self.table[worker] = dict(bus.mine)
        self.send(worker, None, Here(worker, tuple(bus.mine.values()), complete=True))

    def resubscribe(self, worker: str) -> None:
        """``worker``'s subscription was down and is back: it reads the table afresh."""
        self.buses[worker].node.load_snapshot(*self.snapshot())


class MemoryBus(Bus):
    """One worker's end of a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, worker_id: str):
        self.network = network
        self.worker_id = worker_id
        self.node: Any = None
        #: Our entries, as the transport keeps them to write them back.
        self.mine: Dict[str, ClientEntry] = {}
        #: Every message :meth:`publish` was given, in order.
        self.sent: List[ClusterMessage] = []

    def open(self, node: ClusterDelivery) -> None:
        self.node = node
        self.network.buses[self.worker_id] = self
        self.network.table.setdefault(self.worker_id, {})
        node.load_snapshot(*self.network.snapshot())

    def close(self) -> None:
        self.network.buses.pop(self.worker_id, None)

    def publish(self, worker: Optional[str], message: ClusterMessage) -> None:
        self.sent.append(message)
        self.network.send(self.worker_id, worker, message)

    def register(self, entry: ClientEntry, message: ClusterMessage) -> None:
        self.mine[entry.client_id] = entry
        if self.worker_id not in self.network.cut:
            self.network.table.setdefault(self.worker_id, {})[entry.client_id] = entry
        self.network.send(self.worker_id, None, message)

    def unregister(self, entry: ClientEntry, message: ClusterMessage) -> None:
        self.mine.pop(entry.client_id, None)
        if self.worker_id not in self.network.cut:
            self.network.table.get(self.worker_id, {}).pop(entry.client_id, None)
        self.network.send(self.worker_id, None, message)


class FakePeer:
    """A joined client: what the registry needs, and the frames it was sent."""

    def __init__(self, address: Tuple[str, int], name: Optional[str], group: Optional[str], msgpack_ok: bool = True):
        self.info = ClientInfo(address, name, group)
        self.sock = object()
        self.msgpack_ok = msgpack_ok
        self.frames: List[bytes] = []

    def __repr__(self) -> str:
        return f"<FakePeer {self.info}>"

    def send(self, body_frame: bytes) -> None:
        self.frames.append(body_frame)

    def received(self) -> List[Tuple[str, Any]]:
        """Everything it was sent: ``(command, content)``, ``("joined", name)`` or ``("left", name)``."""
        events: List[Tuple[str, Any]] = []
        for data in self.frames:
            message = parse_server_body(data[HEADER_LEN:])
            if isinstance(message, Command):
                events.append((message.command, decode_content(message.fmt, message.payload)))
            elif isinstance(message, (PeerJoined, PeerLeft)):
                events.append(("joined" if isinstance(message, PeerJoined) else "left", message.info["name"]))
        return events

    def got(self, command: str) -> List[Any]:
        return [content for kind, content in self.received() if kind == command]


class FakeServer:
    """One worker's server as the cluster logic sees it."""

    def __init__(self, network: MemoryNetwork, worker_id: str, delivery: Optional[ClusterDelivery] = None, announce: str = "all"):
        self.registry: ClientRegistry[FakePeer] = ClientRegistry()
        self.delivery = delivery or ClusterDelivery(MemoryBus(network, worker_id))
        self.leaves: List[ClientInfo] = []
        self.kicks: List[Tuple[Tuple[str, int], bool, bool]] = []
        self.delivery.start(ServerLink(self.registry, HEADER_LEN, self.leaves.append, self._kick, announce))

    def _kick(self, address: Tuple[str, int], force: bool, call_func: bool) -> None:
        self.kicks.append((address, force, call_func))
        peer = self.registry.at(address)
        if peer is not None:
            self.leave(peer)

    def join(self, address: Tuple[str, int], name: Optional[str] = None, group: Optional[str] = None, msgpack_ok: bool = True) -> FakePeer:
        peer = FakePeer(address, name, group, msgpack_ok)
        self.registry.add(peer)
        self.delivery.joined(peer, frame(PeerJoined(peer.info.as_dict()).to_body(), HEADER_LEN))
        return peer

    def leave(self, peer: FakePeer) -> None:
        if self.registry.remove(peer):
            self.delivery.left(peer, frame(PeerLeft(peer.info.as_dict()).to_body(), HEADER_LEN))

    def change(self, peer: FakePeer, name: Optional[str], group: Optional[str]) -> None:
        old = self.registry.update(peer, ClientInfo(peer.info.ip, name, group))
        self.delivery.changed(peer, old)

    def send_client(self, client: Any, command: str, content: Any = None) -> None:
        self.delivery.to_client(client, OutgoingCommand(command, content, HEADER_LEN))

    def send_group(self, group: Any, command: str, content: Any = None, exclude: Any = None) -> None:
        self.delivery.to_group(group, OutgoingCommand(command, content, HEADER_LEN), client_refs(exclude))

    def send_all(self, command: str, content: Any = None, exclude: Any = None) -> None:
        self.delivery.to_all(OutgoingCommand(command, content, HEADER_LEN), client_refs(exclude))
