"""What the workers of a cluster tell each other: small frozen classes <-> msgpack bytes.

No sockets, no Redis, no gevent: each message is a frozen dataclass with ``to_wire()``;
:func:`decode` turns bytes back into one through a tag -> parser table, and raises only
:class:`MalformedClusterMessage` for bytes that are not one of ours (so junk published on
a channel is counted and skipped, never acted on).

On the wire a message is a msgpack array ``[tag, origin, field, ...]``: ``origin`` is the
worker that published it.  A client of the cluster travels as a :class:`ClientEntry`
(an array of its own), which is also the value the transport keeps in its shared table.

Which messages exist, and where a transport sends them:

=============  ==========================================  ===============================
message        meaning                                      sent to
=============  ==========================================  ===============================
``Joined``     a client joined ``origin``                   every worker
``Changed``    it changed its name or group                 every worker
``Left``       it left ``origin``                           every worker
``Here``       ``origin``'s complete list of clients        every worker
               (after a reconnect, or coming back)
``Reaped``     ``origin`` removed dead ``worker``'s         every worker
               clients from the shared table
``ToAll``      a broadcast: frames for both dialects,       every worker
               and the clients it skips (``exclude``)
``ToGroup``    a group send (and the clients it skips)      workers holding members
``ToClient``   one frame for one client                     the worker holding it
``Kick``       ``disconnect_client`` for one client         the worker holding it
``Bye``        the worker is stopping (wakes its reader)    the worker itself
``Mark``       where a snapshot of the shared table was     the worker itself
               taken, in the worker's stream of messages
=============  ==========================================  ===============================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import msgpack

from .errors import MalformedClusterMessage
from .utils import ClientInfo

__all__ = [
    "ClientEntry",
    "Joined",
    "Changed",
    "Left",
    "Here",
    "Reaped",
    "ToAll",
    "ToGroup",
    "ToClient",
    "Kick",
    "Bye",
    "Mark",
    "MEMBERSHIP",
    "ClusterMessage",
    "MalformedClusterMessage",
    "decode",
]

#: Most clients one ``Here`` or ``Reaped`` message carries; a transport splits longer lists.
MAX_ENTRIES_PER_MESSAGE = 1000


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise MalformedClusterMessage(what)


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


@dataclass(frozen=True)
class ClientEntry:
    """One client of the cluster as every worker knows it.

    :ivar client_id: its identity in the cluster, unique among every worker's clients;
        routing, mirroring, reaping and kicking use it, never the address.
    :ivar worker: the worker holding its connection.
    :ivar address: ``(ip, port)`` as that worker sees it (what HiSock's API shows).
    :ivar joined_at: ``time.time()`` on its worker when it joined: orders clients that
        share a name or an address.
    """

    client_id: str
    worker: str
    address: Tuple[str, int]
    name: Optional[str]
    group: Optional[str]
    msgpack_ok: bool
    joined_at: float

    @property
    def info(self) -> ClientInfo:
        return ClientInfo(self.address, self.name, self.group)

    def to_list(self) -> List[Any]:
        return [self.client_id, self.worker, self.address[0], self.address[1], self.name, self.group, self.msgpack_ok, self.joined_at]

    @classmethod
    def from_list(cls, fields: Any) -> ClientEntry:
        """:raises MalformedClusterMessage: not a list of the right fields."""
        _check(isinstance(fields, (list, tuple)) and len(fields) == 8, f"a client entry is 8 fields, not {str(fields)[:80]!r}")
        client_id, worker, host, port, name, group, msgpack_ok, joined_at = fields
        _check(isinstance(client_id, str) and isinstance(worker, str), "a client entry's id and worker are str")
        _check(isinstance(host, str) and type(port) is int and 0 <= port <= 65535, "a client entry's address is (str, port)")
        _check(_optional_str(name) and _optional_str(group), "a client entry's name and group are str or None")
        _check(isinstance(msgpack_ok, bool), "a client entry's dialect is a bool")
        _check(isinstance(joined_at, (int, float)) and not isinstance(joined_at, bool), "a client entry's join time is a number")
        return cls(client_id, worker, (host, port), name, group, msgpack_ok, float(joined_at))

    def to_wire(self) -> bytes:
        return _pack(self.to_list())

    @classmethod
    def from_wire(cls, data: bytes) -> ClientEntry:
        """:raises MalformedClusterMessage: the bytes are not an entry."""
        return cls.from_list(_unpack(data))


class _Message:
    """What every cluster message has: bytes out (:meth:`to_wire`) and back (:meth:`from_wire`)."""

    __slots__ = ()

    def to_wire(self) -> bytes:
        """The message as msgpack bytes: ``[tag, origin, field, ...]``."""
        return to_wire(self)  # type: ignore[arg-type]

    @classmethod
    def from_wire(cls, data: bytes) -> Any:
        """The message of this class these bytes carry.

        :raises MalformedClusterMessage: they are not one, or a message of another class.
        """
        message = decode(data)
        _check(isinstance(message, cls), f"expected {cls.__name__}, got {type(message).__name__}")
        return message


def _entries(value: Any) -> Tuple[ClientEntry, ...]:
    _check(isinstance(value, list), "a list of client entries")
    return tuple(ClientEntry.from_list(item) for item in value)


# ---------------------------------------------------------------- membership: to every worker


@dataclass(frozen=True)
class Joined(_Message):
    """A client joined ``origin``."""

    origin: str
    entry: ClientEntry

    def fields(self) -> List[Any]:
        return [self.entry.to_list()]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> Joined:
        _check(len(fields) == 1, "Joined has one field")
        return cls(origin, ClientEntry.from_list(fields[0]))


@dataclass(frozen=True)
class Changed(_Message):
    """A client of ``origin`` changed its name or group (``entry`` is the new one)."""

    origin: str
    entry: ClientEntry

    def fields(self) -> List[Any]:
        return [self.entry.to_list()]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> Changed:
        _check(len(fields) == 1, "Changed has one field")
        return cls(origin, ClientEntry.from_list(fields[0]))


@dataclass(frozen=True)
class Left(_Message):
    """A client left ``origin`` (``entry`` as it was)."""

    origin: str
    entry: ClientEntry

    def fields(self) -> List[Any]:
        return [self.entry.to_list()]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> Left:
        _check(len(fields) == 1, "Left has one field")
        return cls(origin, ClientEntry.from_list(fields[0]))


@dataclass(frozen=True)
class Here(_Message):
    """``origin`` wrote its clients back to the shared table (after a reconnect, or after
    finding that the others had reaped it).

    :ivar entries: its clients; ``complete`` says whether they are all of them (then a
        client of ``origin`` missing here is gone) or one part of a longer list.
    """

    origin: str
    entries: Tuple[ClientEntry, ...]
    complete: bool = True

    def fields(self) -> List[Any]:
        return [[entry.to_list() for entry in self.entries], self.complete]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> Here:
        _check(len(fields) == 2 and isinstance(fields[1], bool), "Here has entries and a flag")
        return cls(origin, _entries(fields[0]), fields[1])


@dataclass(frozen=True)
class Reaped(_Message):
    """``origin`` found ``worker`` dead and removed its clients (``entries``) from the shared
    table; ``origin`` runs their ``leave``, everyone forgets them."""

    origin: str
    worker: str
    entries: Tuple[ClientEntry, ...]

    def fields(self) -> List[Any]:
        return [self.worker, [entry.to_list() for entry in self.entries]]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> Reaped:
        _check(len(fields) == 2 and isinstance(fields[0], str), "Reaped has a worker and entries")
        return cls(origin, fields[0], _entries(fields[1]))


# ---------------------------------------------------------------- sends


def _frame(value: Any) -> bytes:
    _check(isinstance(value, bytes), "a frame is bytes")
    return value


def _client_ids(value: Any) -> Tuple[str, ...]:
    _check(isinstance(value, list) and all(isinstance(item, str) for item in value), "excluded clients are a list of ids")
    return tuple(value)


@dataclass(frozen=True)
class ToAll(_Message):
    """A broadcast: every client gets the frame of its dialect (b"" where nobody needs it),
    except the clients whose cluster identity is in ``exclude``.

    ``exclude`` is sent only when it is not empty, so a broadcast that skips nobody is the
    same bytes as before exclusions existed (workers of both versions understand it).
    """

    origin: str
    plain: bytes
    extended: bytes
    exclude: Tuple[str, ...] = ()

    def fields(self) -> List[Any]:
        return [self.plain, self.extended, list(self.exclude)] if self.exclude else [self.plain, self.extended]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> ToAll:
        _check(len(fields) in (2, 3), "ToAll has two frames and maybe excluded clients")
        exclude = _client_ids(fields[2]) if len(fields) == 3 else ()
        return cls(origin, _frame(fields[0]), _frame(fields[1]), exclude)


@dataclass(frozen=True)
class ToGroup(_Message):
    """A send to every client in ``group``, except the clients whose cluster identity is
    in ``exclude`` (sent only when not empty, as for :class:`ToAll`)."""

    origin: str
    group: str
    plain: bytes
    extended: bytes
    exclude: Tuple[str, ...] = ()

    def fields(self) -> List[Any]:
        fields: List[Any] = [self.group, self.plain, self.extended]
        return fields + [list(self.exclude)] if self.exclude else fields

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> ToGroup:
        _check(len(fields) in (3, 4) and isinstance(fields[0], str), "ToGroup has a group, two frames and maybe excluded clients")
        exclude = _client_ids(fields[3]) if len(fields) == 4 else ()
        return cls(origin, fields[0], _frame(fields[1]), _frame(fields[2]), exclude)


@dataclass(frozen=True)
class ToClient(_Message):
    """One frame, already in the client's dialect, for one client."""

    origin: str
    client_id: str
    frame: bytes

    def fields(self) -> List[Any]:
        return [self.client_id, self.frame]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> ToClient:
        _check(len(fields) == 2 and isinstance(fields[0], str), "ToClient has a client id and a frame")
        return cls(origin, fields[0], _frame(fields[1]))


@dataclass(frozen=True)
class Kick(_Message):
    """``disconnect_client`` for a client of the receiving worker."""

    origin: str
    client_id: str
    force: bool
    call_func: bool

    def fields(self) -> List[Any]:
        return [self.client_id, self.force, self.call_func]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> Kick:
        _check(
            len(fields) == 3 and isinstance(fields[0], str) and isinstance(fields[1], bool) and isinstance(fields[2], bool),
            "Kick has a client id and two flags",
        )
        return cls(origin, fields[0], fields[1], fields[2])


@dataclass(frozen=True)
class Bye(_Message):
    """The worker is stopping: published on its own channel to wake its reader."""

    origin: str

    def fields(self) -> List[Any]:
        return []

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> Bye:
        _check(not fields, "Bye has no fields")
        return cls(origin)


@dataclass(frozen=True)
class Mark(_Message):
    """Published on the worker's own channel in the same atomic step as it reads the
    shared table: membership messages it receives before its mark are already in what it
    read (and are skipped), those after are news."""

    origin: str
    token: str

    def fields(self) -> List[Any]:
        return [self.token]

    @classmethod
    def parse(cls, origin: str, fields: List[Any]) -> Mark:
        _check(len(fields) == 1 and isinstance(fields[0], str), "Mark has a token")
        return cls(origin, fields[0])


ClusterMessage = Union[Joined, Changed, Left, Here, Reaped, ToAll, ToGroup, ToClient, Kick, Bye, Mark]
#: The messages that change who is where (and so the shared table); the others are sends.
MEMBERSHIP = (Joined, Changed, Left, Here, Reaped)

_TAGS: Dict[type, str] = {
    Joined: "join",
    Changed: "change",
    Left: "leave",
    Here: "here",
    Reaped: "reaped",
    ToAll: "all",
    ToGroup: "group",
    ToClient: "to",
    Kick: "kick",
    Bye: "bye",
    Mark: "mark",
}
_PARSERS: Dict[str, Callable[[str, List[Any]], ClusterMessage]] = {tag: cls.parse for cls, tag in _TAGS.items()}  # type: ignore[attr-defined]


def tag_of(message: ClusterMessage) -> str:
    """The message's tag on the wire (``"join"``, ``"group"``, ...): also its name in counters."""
    return _TAGS[type(message)]


def to_wire(message: ClusterMessage) -> bytes:
    """``message.to_wire()``: msgpack bytes ``[tag, origin, field, ...]``."""
    return _pack([_TAGS[type(message)], message.origin, *message.fields()])


def decode(data: bytes) -> ClusterMessage:
    """The message these bytes carry.

    :raises MalformedClusterMessage: they are not msgpack, or not one of our messages.
    """
    message = _unpack(data)
    _check(isinstance(message, list) and len(message) >= 2, f"a message is [tag, origin, ...], not {str(message)[:80]!r}")
    tag, origin = message[0], message[1]
    parser = _PARSERS.get(tag) if isinstance(tag, str) else None
    _check(parser is not None, f"unknown message tag {str(tag)[:40]!r}")
    _check(isinstance(origin, str), "a message's origin is a str")
    assert parser is not None
    return parser(origin, message[2:])


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several kinds for garbage
        raise MalformedClusterMessage(f"undecodable ({type(exc).__name__})") from exc
