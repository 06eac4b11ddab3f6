"""Who is connected, and the one seam through which every "send to whom" goes.

:class:`ClientRegistry` keeps HiSock's ``clients`` (socket -> ClientInfo) and
``clients_rev`` (ClientInfo -> socket) in step with indexes by address, name and group.
:class:`Delivery` is the interface the server's send and lookup methods use;
:class:`LocalDelivery` answers it for the clients of this process.  A backplane that spans
several processes implements :class:`Delivery` too, and the server's handlers never notice.
The delivery also decides who hears of a client joining, leaving or changing group (the
*announcement scope*, :data:`ANNOUNCE_SCOPES`), and which clients a broadcast skips
(``exclude``).  Nothing here touches a socket: a peer is any object with ``info``,
``sock``, ``msgpack_ok`` and ``send(frame)``.
"""

from __future__ import annotations

import logging
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
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
)

from .errors import ClientNotFound, GroupNotFound
from .frames import DEFAULT_HEADER_LEN, frame
from .messages import PeerJoined, PeerLeft
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
    "Exclude",
    "ANNOUNCE_ALL",
    "ANNOUNCE_GROUP",
    "ANNOUNCE_NONE",
    "ANNOUNCE_SCOPES",
    "address_of",
    "client_refs",
    "fan_out",
    "frames_for",
]

logger = logging.getLogger("hisock_gevent")

ClientRef = Union[str, Tuple[str, int], ClientInfo]
GroupRef = Union[str, ClientInfo]
#: What a broadcast's ``exclude`` takes: nobody (None), one client, or several.
Exclude = Union[None, ClientRef, Iterable[ClientRef]]

#: Announcement scopes: who hears ``$CLTCONN$`` / ``$CLTDISCONN$`` about a client.
#: Everyone (HiSock's behaviour, the default).
ANNOUNCE_ALL = "all"
#: Only the members of the client's group; a group change is a leave from the old group
#: and a join to the new one; a client in no group is announced to nobody.
ANNOUNCE_GROUP = "group"
#: Nobody (a joining client still gets its own answer).
ANNOUNCE_NONE = "none"
ANNOUNCE_SCOPES = (ANNOUNCE_ALL, ANNOUNCE_GROUP, ANNOUNCE_NONE)

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


def client_refs(exclude: Exclude) -> Tuple[ClientRef, ...]:
    """The client references an ``exclude`` argument names: None for nobody, one reference
    (a ClientInfo, ``(ip, port)``, ``"ip:port"`` or a name), or a list, tuple, set or
    frozenset of them.  A tuple ``(str, int)`` is one address; any other tuple holds
    several references.

    :raises ValueError: a reference (or the argument itself) has a wrong form.
    """
    if exclude is None:
        return ()
    if isinstance(exclude, (str, ClientInfo)):
        return (exclude,)
    if isinstance(exclude, tuple) and len(exclude) == 2 and isinstance(exclude[0], str) and isinstance(exclude[1], int):
        return (exclude,)
    if not isinstance(exclude, (list, tuple, set, frozenset)):
        raise ValueError(
            "exclude is a client ((ip, port), 'ip:port', a name or a ClientInfo) or a list, "
            f"tuple or set of them, not {type(exclude).__name__}"
        )
    refs = tuple(exclude)
    for ref in refs:
        address_of(ref)  # raises ValueError for a reference of the wrong form
    return refs


class ClientRegistry(Generic[PeerT]):
    """The joined clients of one server process, with lookups by address, name and group.

    Two clients may share an address: a TCP and a WebSocket client whose source ports
    happen to match (the kernel reuses a port towards another destination port), or two
    clients behind one proxy.  Both are registered; a lookup by that address gets the
    one that joined first, with a warning (as for a shared name), a lookup by a client's
    own ClientInfo gets that client, and when the first leaves the next takes its place.
    """

    def __init__(self) -> None:
        #: HiSock's ``clients``: socket -> ClientInfo.
        self.clients: Dict[Any, ClientInfo] = {}
        #: HiSock's ``clients_rev``: ClientInfo -> socket.
        self.clients_rev: Dict[ClientInfo, Any] = {}
        # address -> the first peer that joined at it (every peer is here or in _sharing).
        self._by_address: Dict[Tuple[str, int], PeerT] = {}
        # Peers that joined at an address someone already had, in join order (usually empty).
        self._sharing: Dict[PeerT, None] = {}
        # name/group -> peers in join order (a dict used as an ordered set).
        self._by_name: Dict[str, Dict[PeerT, None]] = {}
        self._by_group: Dict[str, Dict[PeerT, None]] = {}

    def __len__(self) -> int:
        return len(self._by_address) + len(self._sharing)

    def __iter__(self) -> Iterator[PeerT]:
        return iter(self._all())

    def __contains__(self, peer: PeerT) -> bool:
        return self._by_address.get(peer.info.ip) is peer or peer in self._sharing

    def _all(self) -> List[PeerT]:
        peers = list(self._by_address.values())
        if self._sharing:
            peers.extend(self._sharing)
        return peers

    # ------------------------------------------------------------- changes

    def add(self, peer: PeerT) -> None:
        """Register a peer under its current ``info``."""
        info = peer.info
        if info.ip in self._by_address:
            logger.warning(
                "%s shares its address with a client already joined; lookups by that address reach the first",
                info,
            )
            self._sharing[peer] = None
        else:
            self._by_address[info.ip] = peer
        self.clients[peer.sock] = info
        self.clients_rev[info] = peer.sock
        self._index(peer, info)

    def update(self, peer: PeerT, new_info: ClientInfo) -> ClientInfo:
        """Give a registered peer a new name/group; every map changes together.  Returns the old info."""
        old = peer.info
        self.clients_rev.pop(old, None)
        peer.info = new_info
        self.clients[peer.sock] = new_info
        self.clients_rev[new_info] = peer.sock
        # Only the field that changed moves; the other keeps the peer's place, so
        # named() and group() stay in join order.
        if old.name != new_info.name:
            self._move(self._by_name, peer, old.name, new_info.name)
        if old.group != new_info.group:
            self._move(self._by_group, peer, old.group, new_info.group)
        return old

    def remove(self, peer: PeerT) -> bool:
        """Forget a peer; False when it was not registered."""
        info = peer.info
        if self._by_address.get(info.ip) is peer:
            successor = next((other for other in self._sharing if other.info.ip == info.ip), None)
            if successor is None:
                del self._by_address[info.ip]
            else:  # the next to join at this address takes the first's place
                del self._sharing[successor]
                self._by_address[info.ip] = successor
        elif peer in self._sharing:
            del self._sharing[peer]
        else:
            return False
        self.clients.pop(peer.sock, None)
        if self.clients_rev.get(info) is peer.sock:
            del self.clients_rev[info]
        self._unindex(peer, info)
        return True

    def group_sizes(self) -> Dict[str, int]:
        """How many clients each group has, largest first (clients with no group are left out)."""
        sizes = {group: len(peers) for group, peers in self._by_group.items() if peers}
        return dict(sorted(sizes.items(), key=lambda item: (-item[1], item[0])))

    @staticmethod
    def _move(index: Dict[str, Dict[PeerT, None]], peer: PeerT, old_key: Optional[str], new_key: Optional[str]) -> None:
        """Take *peer* out of *index* under *old_key* and append it under *new_key*."""
        if old_key is not None:
            members = index.get(old_key)
            if members is not None:
                members.pop(peer, None)
                if not members:
                    del index[old_key]
        if new_key is not None:
            index.setdefault(new_key, {})[peer] = None

    def _index(self, peer: PeerT, info: ClientInfo) -> None:
        self._move(self._by_name, peer, None, info.name)
        self._move(self._by_group, peer, None, info.group)

    def _unindex(self, peer: PeerT, info: ClientInfo) -> None:
        self._move(self._by_name, peer, info.name, None)
        self._move(self._by_group, peer, info.group, None)

    # ------------------------------------------------------------- lookups

    def find(self, client: ClientRef, stacklevel: int = 5) -> PeerT:
        """The peer a reference names.

        :raises ValueError: the reference has a wrong format.
        :raises ClientNotFound: nobody matches.
        :raises UserWarning: (as a warning) the name matches several clients; the one that
            joined first is used.
        """
        if type(client) is ClientInfo:
            found = self._by_address.get(client.ip)
            if found is not None and (found.info is client or not self._sharing):
                return found
        address = address_of(client)
        if address is not None:
            peer = self._by_address.get(address)
            if peer is None:
                raise ClientNotFound(f"no client at {address[0]}:{address[1]}")
            if self._sharing:
                return self._among_sharing(peer, client, stacklevel + 1)
            return peer
        assert isinstance(client, str)
        named = self._by_name.get(client)
        if not named:
            raise ClientNotFound(f"no client named {client!r}")
        if len(named) > 1:
            warnings.warn(
                f"{len(named)} clients are named {client!r}; using the one that joined first",
                UserWarning,
                stacklevel=stacklevel,
            )
        return next(iter(named))

    def _among_sharing(self, first: PeerT, client: ClientRef, stacklevel: int) -> PeerT:
        """``first`` (the first joiner at an address) or, for a ClientInfo, the peer whose
        info it is; warns when an address alone names several peers."""
        address = first.info.ip
        sharing = [first] + [peer for peer in self._sharing if peer.info.ip == address]
        if len(sharing) == 1:
            return first
        if isinstance(client, ClientInfo):
            for peer in sharing:
                if peer.info is client:
                    return peer
            for peer in sharing:
                if peer.info == client:
                    return peer
        warnings.warn(
            f"{len(sharing)} clients share the address {address[0]}:{address[1]}; using the one that joined first",
            UserWarning,
            stacklevel=stacklevel,
        )
        return first

    def at(self, address: Tuple[str, int]) -> Optional[PeerT]:
        """The peer at ``(ip, port)`` (the first to join there), or None."""
        return self._by_address.get(address)

    def all_at(self, address: Tuple[str, int]) -> List[PeerT]:
        """Every peer at ``(ip, port)``, the first to join there first."""
        first = self._by_address.get(address)
        if first is None:
            return []
        return [first] + [peer for peer in self._sharing if peer.info.ip == address]

    def holding(self, info: ClientInfo) -> Optional[PeerT]:
        """The peer whose current info is this very object (as lookups hand out), or None
        (it left, changed name or group since, or another worker holds it)."""
        for peer in self.all_at(info.ip) if self._sharing else (self._by_address.get(info.ip),):
            if peer is not None and peer.info is info:
                return peer
        return None

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

    def audience(self, scope: str, group: Optional[str]) -> List[PeerT]:
        """The peers that hear of a client of ``group`` joining or leaving under the
        announcement ``scope``: every peer (:data:`ANNOUNCE_ALL`), the members of
        ``group`` (:data:`ANNOUNCE_GROUP`; nobody when ``group`` is None), or nobody
        (:data:`ANNOUNCE_NONE`)."""
        if scope == ANNOUNCE_ALL:
            return self._all()
        if scope == ANNOUNCE_GROUP and group is not None:
            return list(self._by_group.get(group, ()))
        return []


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
    #: Who hears of joins, leaves and group changes: one of :data:`ANNOUNCE_SCOPES`.
    announce: str = ANNOUNCE_ALL


class Delivery(ABC):
    """The seam for "who receives this": lookups and sends by client, group or everyone.

    Every method is called on the server's hub.  Besides the lookups and sends, the server
    tells its delivery when one of its own clients joins, leaves or changes, so a delivery
    that spans processes can keep the others informed; the delivery announces each of
    these to the clients the announcement scope (``ServerLink.announce``) says hear of it.

    ``exclude`` (of :meth:`to_group` and :meth:`to_all`) is a tuple of client references
    (see :func:`client_refs`), resolved as :meth:`find_client` resolves one; a reference
    nobody matches is skipped (that client may have just left).
    """

    def start(self, link: ServerLink) -> None:  # noqa: B027 (optional hook)
        """The server starts serving (called once, on its hub, before any client joins)."""

    def stop(self) -> None:  # noqa: B027 (optional hook)
        """The server has closed; release whatever :meth:`start` took."""

    def joined(self, peer: Peer, announce_frame: bytes) -> None:
        """``peer`` joined (it is in the registry); tell the others who are to hear of it
        with ``announce_frame``."""
        self.announce(announce_frame, peer.info, exclude=peer)

    def left(self, peer: Peer, announce_frame: Optional[bytes]) -> None:
        """``peer`` left (already out of the registry); ``announce_frame`` tells the others,
        None when they are not to be told (the server is disconnecting everyone)."""
        if announce_frame is not None:
            self.announce(announce_frame, peer.info, exclude=peer)

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
    def to_group(self, group: GroupRef, message: OutgoingCommand, exclude: Sequence[ClientRef] = ()) -> None: ...

    @abstractmethod
    def to_all(self, message: OutgoingCommand, exclude: Sequence[ClientRef] = ()) -> None: ...

    @abstractmethod
    def announce(self, body_frame: bytes, about: ClientInfo, exclude: Optional[Peer] = None) -> None:
        """Send a ``$CLTCONN$`` or ``$CLTDISCONN$`` frame about the client ``about`` to the
        clients the announcement scope says hear of it (but ``exclude``)."""


class LocalDelivery(Delivery):
    """Delivery to the clients connected to this process, through a :class:`ClientRegistry`."""

    def __init__(self, registry: ClientRegistry):
        self.registry = registry
        #: The announcement scope and frame header width, from :meth:`start`.
        self.scope = ANNOUNCE_ALL
        self.header_len = DEFAULT_HEADER_LEN

    def start(self, link: ServerLink) -> None:
        self.scope = link.announce
        self.header_len = link.header_len

    def find_client(self, client: ClientRef) -> ClientInfo:
        return self.registry.find(client).info

    def group_members(self, group: GroupRef) -> List[ClientInfo]:
        return [peer.info for peer in self.registry.group(group)]

    def all_clients(self) -> List[ClientInfo]:
        return [peer.info for peer in self.registry]

    def excluded(self, exclude: Sequence[ClientRef]) -> Set[Peer]:
        """The peers ``exclude`` names (an unknown reference is skipped; a shared name means
        the client that joined first, with a UserWarning, as for :meth:`find_client`)."""
        # The warning points at the user's call: find <- excluded <- to_all/to_group <-
        # the server's send method <- its wrapper <- the user.
        stacklevel = 6
        skip: Set[Peer] = set()
        for ref in exclude:
            try:
                skip.add(self.registry.find(ref, stacklevel=stacklevel))
            except ClientNotFound:
                continue
        return skip

    def to_client(self, client: ClientRef, message: OutgoingCommand) -> None:
        # registry.find(), inlined for a handler's own ClientInfo (the common reply).
        peer = self.registry._by_address.get(client.ip) if type(client) is ClientInfo else None
        if peer is None or peer.info is not client:
            peer = self.registry.find(client)
        peer.send(message.frame_for(peer.msgpack_ok))

    def to_group(self, group: GroupRef, message: OutgoingCommand, exclude: Sequence[ClientRef] = ()) -> None:
        members = self.registry.group(group)
        if exclude:
            skip = self.excluded(exclude)
            members = [peer for peer in members if peer not in skip]
        fan_out(members, message)

    def to_all(self, message: OutgoingCommand, exclude: Sequence[ClientRef] = ()) -> None:
        peers = list(self.registry)
        if exclude:
            skip = self.excluded(exclude)
            peers = [peer for peer in peers if peer not in skip]
        fan_out(peers, message)

    def announce(self, body_frame: bytes, about: ClientInfo, exclude: Optional[Peer] = None) -> None:
        for peer in self.registry.audience(self.scope, about.group):
            if peer is not exclude:
                peer.send(body_frame)

    def tell(self, kind: Any, info: ClientInfo, exclude: Optional[Peer] = None) -> None:
        """Announce ``info`` joining (``kind`` :class:`~hisock_gevent.messages.PeerJoined`)
        or leaving (:class:`~hisock_gevent.messages.PeerLeft`) to the clients the scope
        says hear of it; the frame is built only when somebody does."""
        peers = [peer for peer in self.registry.audience(self.scope, info.group) if peer is not exclude]
        if not peers:
            return
        try:
            body_frame = frame(kind(info.as_dict()).to_body(), self.header_len)
        except ValueError as exc:
            logger.warning("not announcing %s: %s", info, exc)
            return
        for peer in peers:
            peer.send(body_frame)

    def changed(self, peer: Peer, old: ClientInfo) -> None:
        self.moved(old, peer.info, exclude=peer)

    def moved(self, old: ClientInfo, new: ClientInfo, exclude: Optional[Peer] = None) -> None:
        """A client changed from ``old`` to ``new``.  Under :data:`ANNOUNCE_GROUP`, a new
        group is a leave from the old one and a join to the new one: the members of the
        old group hear ``$CLTDISCONN$`` (with ``old``), those of the new ``$CLTCONN$``
        (with ``new``).  Otherwise (and for a name change) nobody hears anything, as on
        HiSock."""
        if self.scope != ANNOUNCE_GROUP or old.group == new.group:
            return
        self.tell(PeerLeft, old, exclude)
        self.tell(PeerJoined, new, exclude)


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
