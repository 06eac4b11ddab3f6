"""Frame bodies <-> message objects: HiSock's reserved ``$WORD$`` messages and command messages
(PROTOCOL.md section 2).

Pure functions and small immutable classes; no sockets.  Parsing a body from the network
raises only :class:`~hisock_gevent.errors.MalformedMessage` (or its sibling
:class:`~hisock_gevent.errors.HandshakeError` for a bad hello); the type-cast payload of a
command message is left undecoded here (see :mod:`hisock_gevent.typecast`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

from .errors import HandshakeError, MalformedMessage

__all__ = [
    "Hello",
    "UserClose",
    "ChangeName",
    "ChangeGroup",
    "KeepAck",
    "GetClient",
    "PeerJoined",
    "PeerLeft",
    "Disconnect",
    "KeepAlive",
    "Command",
    "ClientMessage",
    "ServerMessage",
    "parse_client_body",
    "parse_command",
    "COMMAND_TAG",
    "parse_server_body",
    "command_body",
    "command_prefix",
    "fmt_length_field",
    "is_reserved_command",
    "name_problem",
    "CAPABILITY_MSGPACK",
    "CAPABILITY_CALL",
    "Call",
    "call_body",
    "Reply",
    "CallFailed",
    "GETCLT_COMMAND",
    "NO_SUCH_CLIENT",
]

#: Capability a hisock_gevent peer lists in its hello (and the server in its answer).
CAPABILITY_MSGPACK = "msgpack"
#: Capability of the request/response extension (``$CALL$``, ``$REPLY$``, ``$CALLERR$``).
CAPABILITY_CALL = "call"
#: Command of the server's answer to ``$GETCLT$``.
GETCLT_COMMAND = "$GETCLT$"
#: ``traceback`` value of a ``$GETCLT$`` answer when the client does not exist.
NO_SUCH_CLIENT = "$NOEXIST$"

_RESERVED_COMMAND = re.compile(r"\$.+\$")
_CMD = b"$CMD$"
#: How every command message's body begins (see :func:`parse_command`).
COMMAND_TAG = _CMD
_MSG = b"$MSG$"
_FMT_LEN_WIDTH = 8
# The fmt length fields of short fmts, ready made (most fmts are a few bytes long).
_FMT_LEN_FIELDS = [(b"%d" % n).ljust(_FMT_LEN_WIDTH, b" ") for n in range(256)]
_FMT_LEN_OF = {field: n for n, field in enumerate(_FMT_LEN_FIELDS)}


def is_reserved_command(command: str) -> bool:
    """True when ``command`` has the ``$...$`` form HiSock reserves for itself."""
    return _RESERVED_COMMAND.search(command) is not None


# ---------------------------------------------------------------- client -> server


@dataclass(frozen=True)
class Hello:
    """``$CLTHELLO$``: the first frame of a client; ``extra`` keeps keys we do not know."""

    name: Optional[str]
    group: Optional[str]
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> Tuple[str, ...]:
        caps = self.extra.get("caps")
        if isinstance(caps, list):
            return tuple(c for c in caps if isinstance(c, str))
        return ()

    def to_body(self) -> bytes:
        return b"$CLTHELLO$" + _json({**self.extra, "name": self.name, "group": self.group})


@dataclass(frozen=True)
class UserClose:
    """``$USRCLOSE$``: the client is leaving."""

    def to_body(self) -> bytes:
        return b"$USRCLOSE$"


@dataclass(frozen=True)
class ChangeName:
    """``$CHNAME$``: a new name; the empty string means the name given at connect."""

    name: str

    def to_body(self) -> bytes:
        return b"$CHNAME$" + self.name.encode()


@dataclass(frozen=True)
class ChangeGroup:
    """``$CHGROUP$``: a new group; the empty string means the group given at connect."""

    group: str

    def to_body(self) -> bytes:
        return b"$CHGROUP$" + self.group.encode()


@dataclass(frozen=True)
class KeepAck:
    """``$KEEPACK$``: the answer to a keepalive (upstream appended its address; ignored)."""

    def to_body(self) -> bytes:
        return b"$KEEPACK$"


@dataclass(frozen=True)
class GetClient:
    """``$GETCLT$``: ask for one client's info, by name or ``ip:port``."""

    query: str

    def to_body(self) -> bytes:
        return b"$GETCLT$" + self.query.encode()


# ---------------------------------------------------------------- server -> client


@dataclass(frozen=True)
class PeerJoined:
    """``$CLTCONN$``: a client joined; ``info`` is its JSON object (ip, name, group, ipstr)."""

    info: Dict[str, Any]

    def to_body(self) -> bytes:
        return b"$CLTCONN$" + _json(self.info)


@dataclass(frozen=True)
class PeerLeft:
    """``$CLTDISCONN$``: a client left."""

    info: Dict[str, Any]

    def to_body(self) -> bytes:
        return b"$CLTDISCONN$" + _json(self.info)


@dataclass(frozen=True)
class Disconnect:
    """``$DISCONN$``: the server is disconnecting this client.

    **(ext)** To a hisock_gevent client the server may append a JSON object saying why
    (``{"reason": ...}``); plain HiSock peers only ever get the bare tag.
    """

    details: Optional[Dict[str, Any]] = None

    @property
    def reason(self) -> Optional[str]:
        reason = (self.details or {}).get("reason")
        return reason if isinstance(reason, str) else None

    def to_body(self) -> bytes:
        return b"$DISCONN$" + (_json(self.details) if self.details else b"")


@dataclass(frozen=True)
class KeepAlive:
    """``$KEEPALIVE$``: are you alive?"""

    def to_body(self) -> bytes:
        return b"$KEEPALIVE$"


# ---------------------------------------------------------------- both directions (call extension)


@dataclass(frozen=True)
class Call:
    """``$CALL$<id>:`` + a command message: run that command's handler and answer with
    its return value (:class:`Reply`) or why it failed (:class:`CallFailed`)."""

    call_id: int
    command: Command

    def to_body(self) -> bytes:
        return call_body(self.call_id, self.command.to_body())


def call_body(call_id: int, command_body: bytes) -> bytes:
    """The body of a :class:`Call` around an already-built command message body."""
    return b"$CALL$%d:" % call_id + command_body


@dataclass(frozen=True)
class Reply:
    """``$REPLY$<id>:`` + 8-byte fmt length + fmt + payload: a handler's return value."""

    call_id: int
    fmt: bytes
    payload: bytes

    def to_body(self) -> bytes:
        return b"".join((b"$REPLY$%d:" % self.call_id, fmt_length_field(len(self.fmt)), self.fmt, self.payload))


@dataclass(frozen=True)
class CallFailed:
    """``$CALLERR$<id>:`` + a JSON object ``{"type", "message"}``: the handler raised (or
    there was none)."""

    call_id: int
    kind: str
    message: str

    def to_body(self) -> bytes:
        return b"$CALLERR$%d:" % self.call_id + _json({"type": self.kind, "message": self.message})


# ---------------------------------------------------------------- both directions


class Command(NamedTuple):
    """A command message: ``command`` plus its still-encoded ``fmt`` and ``payload``.

    A NamedTuple rather than a frozen dataclass: one is made per message received, and
    tuple construction is several times cheaper.
    """

    command: str
    fmt: bytes
    payload: bytes

    def to_body(self) -> bytes:
        return command_body(self.command.encode(), self.fmt, self.payload)


ClientMessage = Union[Hello, UserClose, ChangeName, ChangeGroup, KeepAck, GetClient, Command, Call, Reply, CallFailed]
ServerMessage = Union[PeerJoined, PeerLeft, Disconnect, KeepAlive, Command, Call, Reply, CallFailed]


def command_prefix(command: bytes) -> bytes:
    """``$CMD$<command>$MSG$``: the part of a command message that depends on the command only."""
    return _CMD + command + _MSG


def fmt_length_field(fmt_len: int) -> bytes:
    """The 8-byte, space-padded fmt length of a command message.

    :raises ValueError: the fmt is too long for 8 digits.
    """
    if fmt_len < len(_FMT_LEN_FIELDS):
        return _FMT_LEN_FIELDS[fmt_len]
    digits = b"%d" % fmt_len
    if len(digits) > _FMT_LEN_WIDTH:
        raise ValueError(f"a fmt of {fmt_len} bytes does not fit the 8-digit fmt length")
    return digits.ljust(_FMT_LEN_WIDTH, b" ")


def command_body(command: bytes, fmt: bytes, payload: bytes) -> bytes:
    """Build a command message body from an already-encoded command, fmt and payload."""
    return b"".join((_CMD, command, _MSG, fmt_length_field(len(fmt)), fmt, payload))


def _json(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_COMMAND_START = len(_CMD)
_MSG_LEN = len(_MSG)


_new_tuple = tuple.__new__


def parse_command(body: bytes) -> Command:
    """Parse a body that starts with :data:`COMMAND_TAG` (what :func:`parse_client_body`
    and :func:`parse_server_body` do for one; a reader may call it directly).

    :raises MalformedMessage: no ``$MSG$``, a command that is not utf-8, a bad fmt length.
    """
    split = body.find(_MSG, _COMMAND_START)
    if split < 0:
        raise MalformedMessage("command message without $MSG$")
    try:
        command = body[_COMMAND_START:split].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage("command is not utf-8") from exc
    fmt_len_start = split + _MSG_LEN
    fmt_start = fmt_len_start + _FMT_LEN_WIDTH
    field = body[fmt_len_start:fmt_start]
    fmt_len = _FMT_LEN_OF.get(field)
    if fmt_len is None:
        digits = field.strip(b" ")
        if len(body) < fmt_start or not digits.isdigit():
            raise MalformedMessage("command message has no valid fmt length")
        fmt_len = int(digits)
    fmt_end = fmt_start + fmt_len
    if fmt_end > len(body):
        raise MalformedMessage("fmt length runs past the end of the message")
    # Command(...) without NamedTuple's generated __new__, a Python-level call (280 ->
    # 120 ns; one is made per message received).
    return _new_tuple(Command, (command, body[fmt_start:fmt_end], body[fmt_end:]))


def _text(payload: bytes, what: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"{what} is not utf-8") from exc


def name_problem(value: Optional[str], what: str, max_length: int) -> Optional[str]:
    """Why ``value`` cannot be a client's name (or group), or None when it can.

    A name is echoed to every client in ``$CLTCONN$``/``$CLTDISCONN$`` and looked up by
    others, so it must be text that UTF-8 can carry (JSON's ``"\\ud800"`` escape can smuggle
    in a lone surrogate, which cannot be encoded again) and at most ``max_length``
    characters long.
    """
    if value is None:
        return None
    if len(value) > max_length:
        return f"{what} is {len(value)} characters long, more than the {max_length} allowed"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{what} is not valid text (it holds a lone surrogate)"
    return None


def _parse_hello(payload: bytes) -> Hello:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise HandshakeError("hello is not JSON") from exc
    if not isinstance(obj, dict):
        raise HandshakeError("hello is not a JSON object")
    name = obj.pop("name", None)
    group = obj.pop("group", None)
    for label, value in (("name", name), ("group", group)):
        if value is not None and not isinstance(value, str):
            raise HandshakeError(f"hello {label} is not a string")
    return Hello(name, group, obj)


#: The longest call id accepted (ids are positive integers below 2**64).
_MAX_ID_DIGITS = 20


def _call_id(payload: bytes) -> Tuple[int, bytes]:
    """``<decimal id>:<rest>`` -> (id, rest)."""
    head, sep, rest = payload.partition(b":")
    if not sep or not head.isdigit() or len(head) > _MAX_ID_DIGITS:
        raise MalformedMessage("a call message has no valid id")
    return int(head), rest


def _parse_call(payload: bytes) -> Call:
    call_id, rest = _call_id(payload)
    if not rest.startswith(_CMD):
        raise MalformedMessage("a call does not carry a command message")
    return Call(call_id, parse_command(rest))


def _parse_reply(payload: bytes) -> Reply:
    call_id, rest = _call_id(payload)
    field = rest[:_FMT_LEN_WIDTH]
    fmt_len = _FMT_LEN_OF.get(field)
    if fmt_len is None:
        digits = field.strip(b" ")
        if len(field) < _FMT_LEN_WIDTH or not digits.isdigit():
            raise MalformedMessage("a reply has no valid fmt length")
        fmt_len = int(digits)
    fmt_end = _FMT_LEN_WIDTH + fmt_len
    if fmt_end > len(rest):
        raise MalformedMessage("fmt length runs past the end of the reply")
    return Reply(call_id, rest[_FMT_LEN_WIDTH:fmt_end], rest[fmt_end:])


def _parse_call_failed(payload: bytes) -> CallFailed:
    call_id, rest = _call_id(payload)
    try:
        obj = json.loads(rest)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage("a call error is not JSON") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str) or not isinstance(obj.get("message"), str):
        raise MalformedMessage("a call error is not {type, message}")
    return CallFailed(call_id, obj["type"], obj["message"])


def _parse_details(payload: bytes) -> Optional[Dict[str, Any]]:
    """The optional JSON after $DISCONN$; anything unreadable is ignored (it is only advice)."""
    if not payload:
        return None
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _parse_info(payload: bytes) -> Dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage("client info is not JSON") from exc
    if not isinstance(obj, dict):
        raise MalformedMessage("client info is not a JSON object")
    ip = obj.get("ip")
    if not (
        isinstance(ip, list)
        and len(ip) == 2
        and isinstance(ip[0], str)
        and isinstance(ip[1], int)
        and not isinstance(ip[1], bool)
    ):
        raise MalformedMessage("client info has no [host, port] ip")
    for key in ("name", "group"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise MalformedMessage(f"client info {key} is not a string")
    return obj


_ClientParser = Callable[[bytes], ClientMessage]
_ServerParser = Callable[[bytes], ServerMessage]

_CLIENT_TAGS: Dict[bytes, _ClientParser] = {
    b"$CLTHELLO$": _parse_hello,
    b"$USRCLOSE$": lambda _: UserClose(),
    b"$CHNAME$": lambda p: ChangeName(_text(p, "name")),
    b"$CHGROUP$": lambda p: ChangeGroup(_text(p, "group")),
    b"$KEEPACK$": lambda _: KeepAck(),
    b"$GETCLT$": lambda p: GetClient(_text(p, "client query")),
    b"$CALL$": _parse_call,
    b"$REPLY$": _parse_reply,
    b"$CALLERR$": _parse_call_failed,
}

_SERVER_TAGS: Dict[bytes, _ServerParser] = {
    b"$CLTCONN$": lambda p: PeerJoined(_parse_info(p)),
    b"$CLTDISCONN$": lambda p: PeerLeft(_parse_info(p)),
    b"$DISCONN$": lambda p: Disconnect(_parse_details(p)),
    b"$KEEPALIVE$": lambda _: KeepAlive(),
    b"$CALL$": _parse_call,
    b"$REPLY$": _parse_reply,
    b"$CALLERR$": _parse_call_failed,
}


def _split_tag(body: bytes) -> Tuple[bytes, bytes]:
    end = body.find(b"$", 1) if body[:1] == b"$" else -1
    if end < 0:
        raise MalformedMessage(f"body {body[:24]!r} is neither a reserved nor a command message")
    return body[: end + 1], body[end + 1 :]


def parse_client_body(body: bytes) -> ClientMessage:
    """Parse a body a client sent to the server.

    :raises MalformedMessage: unknown reserved tag, no command structure, bad utf-8.
    :raises HandshakeError: a hello that is not a JSON object with string name/group.
    """
    if body.startswith(_CMD):
        return parse_command(body)
    tag, payload = _split_tag(body)
    parser = _CLIENT_TAGS.get(tag)
    if parser is None:
        raise MalformedMessage(f"unknown reserved message {tag[:24]!r}")
    return parser(payload)


def parse_server_body(body: bytes) -> ServerMessage:
    """Parse a body the server sent to a client.

    :raises MalformedMessage: unknown reserved tag, no command structure, bad JSON.
    """
    if body.startswith(_CMD):
        return parse_command(body)
    tag, payload = _split_tag(body)
    parser = _SERVER_TAGS.get(tag)
    if parser is None:
        raise MalformedMessage(f"unknown reserved message {tag[:24]!r}")
    return parser(payload)
