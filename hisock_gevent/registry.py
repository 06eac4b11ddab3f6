"""Who is connected, and the one seam through which every "send to whom" goes.

:class:`ClientRegistry` keeps HiSock's ``clients`` (socket -> ClientInfo) and
``clients_rev`` (ClientInfo -> socket) in step with indexes by address, name and group.
:class:`Delivery` is the interface the server's send and lookup methods use;
:class:`LocalDelivery` answers it for the clients of this process.  A backplane that spans
several processes implements :class:`Delivery` too, and the server's handlers never notice.
Nothing here touches a socket: a peer is any object with ``info``, ``sock``,
``msgpack_ok`` and ``send(frame)``.
"""

from __future__ import annotations

import re
import warnings
from abc import ABC, abstractmethod
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Tuple,
    TypeVar,
    Union,
)

from .errors import ClientNotFound, GroupNotFound
from .outgoing import OutgoingCommand
from .utils import ClientInfo, ipstr_to_tup

__all__ = [
    "Peer",
    "ClientRegistry",
    "Delivery",
    "LocalDelivery",
    "ServerLink",
    "ClientRef",
    "GroupRef",
    "address_of",
    "fan_out",
    "frames_for",
]

ClientRef = Union[str, Tuple[str, int], ClientInfo]
GroupRef = Union[str, ClientInfo]

_ADDRESS = re.compile(r"^\d{1,3}(\.\d{1,3}){3}:\d{1,5}$")


class Peer(Protocol):
    """What the registry needs of a connected client."""

    info: ClientInfo
    sock: Any
    msgpack_ok: bool

    def send(self, frame: bytes) -> None: ...


#: The server's own peer type, so lookups hand back what was added.
PeerT = TypeVar("PeerT", bound=Peer)


def address_of(client: ClientRef) -> Optional[Tuple[str, int]]:
    """The (ip, port) a client reference names, or None when it is a name.

    :raises ValueError: a tuple that is not ``(str ip, int port)``, or another type.
    """
    if isinstance(client, ClientInfo):
        return client.ip
    if isinstance(client, tuple):
        if len(client) == 2 and isinstance(client[0], str) and isinstance(client[1], int):
            return client[0], client[1]
        raise ValueError(f"a client address is a tuple (ip: str, port: int), not {client!r}")
    if isinstance(client, str):
        return ipstr_to_tup(client) if _ADDRESS.match(client) else None
    raise ValueError(
        f"a client is named by (ip, port), 'ip:port', its name or a ClientInfo, not {type(client).__name__}"
    )


class ClientRegistry(Generic[PeerT]):
    """The joined clients of one server process, with lookups by address, name and group."""

    def __init__(self) -> None:
        #: HiSock's ``clients``: socket -> ClientInfo.
        self.clients: Dict[Any, ClientInfo] = {}
        #: HiSock's ``clients_rev``: ClientInfo -> socket.
        self.clients_rev: Dict[ClientInfo, Any] = {}
        self._by_address: Dict[Tuple[str, int], PeerT] = {}
        # name/group -> peers in join order (a dict used as an ordered set).
        self._by_name: Dict[str, Dict[PeerT, None]] = {}
        self._by_group: Dict[str, Dict[PeerT, None]] = {}

    def __len__(self) -> int:
        return len(self._by_address)

    def __iter__(self) -> Iterator[PeerT]:
        return iter(list(self._by_address.values()))

    def __contains__(self, peer: PeerT) -> bool:
        return self._by_address.get(peer.info.ip) is peer

    # ------------------------------------------------------------- changes

    def add(self, peer: PeerT) -> None:
        """Register a peer under its current ``info``."""
        info = peer.info
        self._by_address[info.ip] = peer
        self.clients[peer.sock] = info
        self.clients_rev[info] = peer.sock
        self._index(peer, info)

    def update(self, peer: PeerT, new_info: ClientInfo) -> ClientInfo:
        """Give a registered peer a new name/group; every map changes together.  Returns the old info."""
        old = peer.info
        self._unindex(peer, old)
        self.clients_rev.pop(old, None)
        peer.info = new_info
        self.clients[peer.sock] = new_info
        self.clients_rev[new_info] = peer.sock
        self._index(peer, new_info)
        return old

    def remove(self, peer: PeerT) -> bool:
        """Forget a peer; False when it was not registered."""
        if self._by_address.get(peer.info.ip) is not peer:
            return False
        info = peer.info
        del self._by_address[info.ip]
        self.clients.pop(peer.sock, None)
        self.clients_rev.pop(info, None)
        self._unindex(peer, info)
        return True

    def group_sizes(self) -> Dict[str, int]:
        """How many clients each group has, largest first (clients with no group are left out)."""
        sizes = {group: len(peers) for group, peers in self._by_group.items() if peers}
        return dict(sorted(sizes.items(), key=lambda item: (-item[1], item[0])))

    def _index(self, peer: PeerT, info: ClientInfo) -> None:
        if info.name is not None:
            self._by_name.setdefault(info.name, {})[peer] = None
        if info.group is not None:
            self._by_group.setdefault(info.group, {})[peer] = None

    def _unindex(self, peer: PeerT, info: ClientInfo) -> None:
        for index, key in ((self._by_name, info.name), (self._by_group, info.group)):
            if key is None:
                continue
            members = index.get(key)
            if members is not None:
                members.pop(peer, None)
                if not members:
                    del index[key]

    # ------------------------------------------------------------- lookups

    def find(self, client: ClientRef) -> PeerT:
        """The peer a reference names.

        :raises ValueError: the reference has a wrong format.
        :raises ClientNotFound: nobody matches.
        :raises UserWarning: (as a warning) the name matches several clients; the one that
            joined first is used.
        """
        if type(client) is ClientInfo:
            found = self._by_address.get(client.ip)
            if found is not None:
                return found
        address = address_of(client)
        if address is not None:
            peer = self._by_address.get(address)
            if peer is None:
                raise ClientNotFound(f"no client at {address[0]}:{address[1]}")
            return peer
        assert isinstance(client, str)
        named = self._by_name.get(client)
        if not named:
            raise ClientNotFound(f"no client named {client!r}")
        if len(named) > 1:
            warnings.warn(
                f"{len(named)} clients are named {client!r}; using the one that joined first",
                UserWarning,
                stacklevel=4,
            )
        return next(iter(named))

    def at(self, address: Tuple[str, int]) -> Optional[PeerT]:
        """The peer at ``(ip, port)``, or None."""
        return self._by_address.get(address)

    def named(self, name: str) -> List[PeerT]:
        """Every peer with this name, in join order."""
        return list(self._by_name.get(name, ()))

    def group(self, group: GroupRef) -> List[PeerT]:
        """The peers in a group, in join order.

        :raises GroupNotFound: nobody is in that group, or the ClientInfo has no group.
        """
        name = group.group if isinstance(group, ClientInfo) else group
        if name is None:
            raise GroupNotFound(f"{group} is not in a group")
        if not isinstance(name, str):
            raise GroupNotFound(f"a group is named by a str or a ClientInfo, not {type(name).__name__}")
        members = self._by_group.get(name)
        if not members:
            raise GroupNotFound(f"no client is in group {name!r}")
        return list(members)

    def groups(self) -> Dict[str, int]:
        """Group name -> number of members."""
        return {name: len(members) for name, members in self._by_group.items()}


class ServerLink(NamedTuple):
    """What a :class:`Delivery` may use of the server it serves (given to :meth:`Delivery.start`)."""

    #: The server's own clients.
    registry: ClientRegistry
    #: The frame header width every peer uses.
    header_len: int
    #: Run the ``leave`` handler for a client that went without its server saying so
    #: (one of a dead worker's clients); call it on the server's hub.
    run_leave: Callable[[ClientInfo], None]
    #: Disconnect our client at this address, ``(address, force, call_func)``, as
    #: ``disconnect_client`` does (asked by another worker); call it on the server's hub.
    kick: Callable[[Tuple[str, int], bool, bool], None]


class Delivery(ABC):
    """The seam for "who receives this": lookups and sends by client, group or everyone.

    Every method is called on the server's hub.  Besides the lookups and sends, the server
    tells its delivery when one of its own clients joins, leaves or changes, so a delivery
    that spans processes can keep the others informed.
    """

    def start(self, link: ServerLink) -> None:  # noqa: B027 (optional hook)
        """The server starts serving (called once, on its hub, before any client joins)."""

    def stop(self) -> None:  # noqa: B027 (optional hook)
        """The server has closed; release whatever :meth:`start` took."""

    def joined(self, peer: Peer, announce_frame: bytes) -> None:
        """``peer`` joined (it is in the registry); tell everyone else with ``announce_frame``."""
        self.announce(announce_frame, exclude=peer)

    def left(self, peer: Peer, announce_frame: Optional[bytes]) -> None:
        """``peer`` left (already out of the registry); ``announce_frame`` tells the others,
        None when they are not to be told (the server is disconnecting everyone)."""
        if announce_frame is not None:
            self.announce(announce_frame, exclude=peer)

    def changed(self, peer: Peer, old: ClientInfo) -> None:  # noqa: B027 (optional hook)
        """``peer`` changed its name or group (``peer.info`` is the new one)."""

    def disconnect_elsewhere(self, client: ClientRef, force: bool, call_func: bool) -> bool:
        """Have the process holding ``client`` disconnect it, when that is another process;
        False when the client is ours or nobody holds it (the server then disconnects it
        itself, or raises ClientNotFound).  ``client`` is what :meth:`find_client` returned."""
        return False

    def stats(self) -> Optional[Dict[str, Any]]:
        """Counters of the delivery itself for ``server.stats()``, or None."""
        return None

    @abstractmethod
    def find_client(self, client: ClientRef) -> ClientInfo: ...

    @abstractmethod
    def group_members(self, group: GroupRef) -> List[ClientInfo]: ...

    @abstractmethod
    def all_clients(self) -> List[ClientInfo]: ...

    @abstractmethod
    def to_client(self, client: ClientRef, message: OutgoingCommand) -> None: ...

    @abstractmethod
    def to_group(self, group: GroupRef, message: OutgoingCommand) -> None: ...

    @abstractmethod
    def to_all(self, message: OutgoingCommand) -> None: ...

    @abstractmethod
    def announce(self, body_frame: bytes, exclude: Optional[Peer] = None) -> None:
        """Send a reserved frame ($CLTCONN$, $CLTDISCONN$, ...) to every client."""


class LocalDelivery(Delivery):
    """Delivery to the clients connected to this process, through a :class:`ClientRegistry`."""

    def __init__(self, registry: ClientRegistry):
        self.registry = registry

    def find_client(self, client: ClientRef) -> ClientInfo:
        return self.registry.find(client).info

    def group_members(self, group: GroupRef) -> List[ClientInfo]:
        return [peer.info for peer in self.registry.group(group)]

    def all_clients(self) -> List[ClientInfo]:
        return [peer.info for peer in self.registry]

    def to_client(self, client: ClientRef, message: OutgoingCommand) -> None:
        # registry.find(), inlined for a handler's own ClientInfo (the common reply).
        peer = self.registry._by_address.get(client.ip) if type(client) is ClientInfo else None
        if peer is None or peer.info is not client:
            peer = self.registry.find(client)
        peer.send(message.frame_for(peer.msgpack_ok))

    def to_group(self, group: GroupRef, message: OutgoingCommand) -> None:
        fan_out(self.registry.group(group), message)

    def to_all(self, message: OutgoingCommand) -> None:
        fan_out(list(self.registry), message)

    def announce(self, body_frame: bytes, exclude: Optional[Peer] = None) -> None:
        for peer in self.registry:
            if peer is not exclude:
                peer.send(body_frame)


def frames_for(peers: Iterable[Peer], message: OutgoingCommand) -> Tuple[bytes, bytes]:
    """``(plain, extended)`` frames of ``message`` for these peers; b"" where none needs it.

    The plain frame is built first: if the content cannot be carried to a plain HiSock
    peer, InvalidTypeCast is raised before anyone receives anything (all or nothing).
    """
    plain_needed = extended_needed = False
    for peer in peers:
        if peer.msgpack_ok:
            extended_needed = True
        else:
            plain_needed = True
    plain = message.frame_for(False) if plain_needed else b""
    extended = message.frame_for(True) if extended_needed else b""
    return plain, extended


def fan_out(peers: Iterable[Peer], message: OutgoingCommand) -> None:
    """Send ``message`` to every peer, in its dialect."""
    peers = list(peers)
    plain, extended = frames_for(peers, message)
    for peer in peers:
        peer.send(extended if peer.msgpack_ok else plain)
