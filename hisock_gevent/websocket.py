"""The WebSocket mapping of the protocol (PROTOCOL.md section 10), without sockets.

Over WebSocket every binary message carries exactly one frame *body* (PROTOCOL.md section
2); WebSocket already frames, so the ``header_len`` header of section 1 is not sent.
Everything else, the hello, the messages, the limits, is the same as over TCP.  This
module holds the pieces of that mapping that need no socket, each testable with bytes and
dicts alone:

* :func:`upgrade_verdict`: an HTTP request's method and headers in, an :class:`Upgrade`
  (the 101 answer's headers) or a :class:`Rejection` (status, reason) out, the ``Origin``
  check (:func:`origin_problem`) included;
* :func:`static_file`: what the server answers to ``GET /hisock.js`` and the vendored
  ``/msgpack/...`` modules (the browser client, from the package's ``static/``);
* :class:`WebSocketFrames`: received bytes in, whole bodies out (messages reassembled
  from fragments, pings answered, the peer's close noticed, limits enforced), on top of
  wsproto's RFC 6455 frame parser; and :func:`binary_header` / :meth:`WebSocketFrames.close`,
  the bytes that go back;
* :func:`close_code_for`: which close code ends a connection that broke which rule.

wsproto is the optional dependency ``hisock_gevent[websocket]``; it is imported only
when a :class:`WebSocketFrames` is made, so the rest of the package works without it.
"""

from __future__ import annotations

import base64
import functools
import re
import struct
from dataclasses import dataclass
from importlib import resources
from typing import Any, Collection, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from .errors import MessageTooLarge, RemoteProtocolError, TextMessageRefused, WebSocketProtocolError
from .frames import DEFAULT_MAX_MESSAGE_SIZE

__all__ = [
    "WEBSOCKET_PATH",
    "WEBSOCKET_VERSION",
    "CLOSE_NORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "CLOSE_INTERNAL_ERROR",
    "ANY_ORIGIN",
    "Upgrade",
    "Rejection",
    "upgrade_verdict",
    "origin_problem",
    "accept_token",
    "static_file",
    "STATIC_CONTENT_TYPE",
    "binary_header",
    "close_code_for",
    "WebSocketFrames",
]

#: The URL path at which a server's WebSocket listener accepts the upgrade.
WEBSOCKET_PATH = "/hisock"
#: The only WebSocket version there is (RFC 6455).
WEBSOCKET_VERSION = "13"
#: ``websocket_origins`` entry that lets every page in.
ANY_ORIGIN = "*"

# Close codes (RFC 6455 section 7.4.1) and what the server uses each for.
#: The client left, or the server disconnected it after ``$DISCONN$``.
CLOSE_NORMAL = 1000
#: The server is shutting down (after ``$DISCONN$`` with the reason "server closing").
CLOSE_GOING_AWAY = 1001
#: The peer broke RFC 6455 itself (an unmasked frame, a bad opcode...).
CLOSE_PROTOCOL_ERROR = 1002
#: A text message: HiSock bodies are binary.
CLOSE_UNSUPPORTED_DATA = 1003
#: Invalid UTF-8 where RFC 6455 wants text (a close reason).
CLOSE_INVALID_TEXT = 1007
#: Any other rule of HiSock's: a malformed body, a bad hello, a refusal, a timeout, a slow reader.
CLOSE_POLICY = 1008
#: A message longer than ``max_message_size`` (or the hello's limit).
CLOSE_TOO_BIG = 1009
#: A bug of ours.
CLOSE_INTERNAL_ERROR = 1011

#: The GUID every Sec-WebSocket-Accept is made with (RFC 6455 section 1.3).
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The longest close reason that fits a control frame (125 bytes minus the code).
_MAX_CLOSE_REASON = 123
#: Content type of the browser client's modules.
STATIC_CONTENT_TYPE = "text/javascript; charset=utf-8"
#: The files of the package's ``static/`` served over HTTP: the client and what it imports.
_STATIC_PATH = re.compile(r"/(hisock\.js|msgpack/(?:utils/)?[A-Za-z][A-Za-z0-9_]*\.mjs)")


# ---------------------------------------------------------------------- the upgrade


@dataclass(frozen=True)
class Upgrade:
    """Accept the upgrade: answer ``101 Switching Protocols`` with these headers."""

    headers: Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class Rejection:
    """Refuse the upgrade with an HTTP error.

    :ivar status: e.g. ``"403 Forbidden"``.
    :ivar reason: what was wrong, for the log and the answer's body.
    :ivar headers: extra headers of the answer (``Sec-WebSocket-Version`` on a 426).
    """

    status: str
    reason: str
    headers: Tuple[Tuple[str, str], ...] = ()


def _tokens(value: Optional[str]) -> List[str]:
    return [token.strip().lower() for token in (value or "").split(",")]


def accept_token(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answering a ``Sec-WebSocket-Key``."""
    import hashlib

    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()).decode("ascii")


def upgrade_verdict(
    method: str, headers: Mapping[str, str], origins: Optional[Collection[str]] = None
) -> Union[Upgrade, Rejection]:
    """Whether to accept a WebSocket upgrade request, from its method and headers.

    :param headers: the request's headers, names in lower case (``"sec-websocket-key"``).
    :param origins: pages allowed to connect (see :func:`origin_problem`).
    :returns: an :class:`Upgrade` with the 101 answer's headers, or a :class:`Rejection`:
        400 for a malformed request, 405 for a method other than GET, 426 when it is not a
        version 13 WebSocket upgrade, 403 for an ``Origin`` that is not allowed.
    """
    if method != "GET":
        return Rejection("405 Method Not Allowed", f"a WebSocket upgrade is a GET, not {method[:20]}", (("Allow", "GET"),))
    version = (("Sec-WebSocket-Version", WEBSOCKET_VERSION),)
    if "websocket" not in _tokens(headers.get("upgrade")):
        return Rejection("426 Upgrade Required", "not a WebSocket upgrade (no Upgrade: websocket)", (("Upgrade", "websocket"), *version))
    if "upgrade" not in _tokens(headers.get("connection")):
        return Rejection("400 Bad Request", "a WebSocket upgrade without Connection: Upgrade")
    if headers.get("sec-websocket-version", "").strip() != WEBSOCKET_VERSION:
        return Rejection(
            "426 Upgrade Required",
            f"WebSocket version {headers.get('sec-websocket-version', '(none)')[:20]!r}, not {WEBSOCKET_VERSION}",
            version,
        )
    key = headers.get("sec-websocket-key", "").strip()
    try:
        valid_key = len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        valid_key = False
    if not valid_key:
        return Rejection("400 Bad Request", "no valid Sec-WebSocket-Key (16 bytes in base64)")
    problem = origin_problem(headers.get("origin"), headers.get("host"), origins)
    if problem is not None:
        return Rejection("403 Forbidden", problem)
    return Upgrade((("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_token(key))))


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _host_port(netloc: str, scheme: str) -> Tuple[str, Optional[int]]:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return netloc.lower(), None
    return (parts.hostname or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_problem(origin: Optional[str], host: Optional[str], allowed: Optional[Collection[str]]) -> Optional[str]:
    """Why a page from ``origin`` may not connect, or None when it may.

    Browsers always send ``Origin`` with a WebSocket upgrade, and a page cannot change it;
    a request without one does not come from a page (a program: allowed).

    :param host: the request's ``Host`` header.
    :param allowed: None (the default): only pages served from the same host and port
        as the WebSocket (``Origin`` matches ``Host``); otherwise the origins allowed,
        such as ``"https://example.com"`` or ``"http://127.0.0.1:8000"`` (scheme, host
        and port, compared without case), or ``"*"`` for any page.
    """
    if origin is None:
        return None
    if allowed is None:
        parts = urlsplit(origin.strip())
        if parts.scheme in ("http", "https") and parts.netloc and host:
            if _host_port(parts.netloc, parts.scheme) == _host_port(host.strip(), parts.scheme):
                return None
        return f"Origin {origin[:200]!r} is not the WebSocket's own ({host!r}) and websocket_origins allows no other"
    if ANY_ORIGIN in allowed or _normal_origin(origin) in {_normal_origin(entry) for entry in allowed}:
        return None
    return f"Origin {origin[:200]!r} is not in websocket_origins"


# ---------------------------------------------------------------------- the browser client


def static_file(path: str) -> Optional[bytes]:
    """The bytes of a static file served at ``path`` (``/hisock.js``, ``/msgpack/...mjs``),
    or None when there is no such file.  Every one is served as :data:`STATIC_CONTENT_TYPE`."""
    match = _STATIC_PATH.fullmatch(path)
    if match is None:
        return None
    return _read_static(match.group(1))


@functools.lru_cache(maxsize=64)
def _read_static(name: str) -> Optional[bytes]:
    target = resources.files("hisock_gevent").joinpath("static", *name.split("/"))
    try:
        return target.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


# ---------------------------------------------------------------------- messages


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455 section 5.3), in C."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def _simple_frames(data: bytes, bodies: List[bytes], frames: WebSocketFrames) -> int:
    """Append the bodies of the whole, final, masked binary frames at the front of
    ``data`` to ``bodies``; return how many bytes they took.  Stops at the first frame
    that is anything else (a fragment, a control frame, a text frame, bad bits) or not
    complete yet: wsproto reads on from there.

    :raises MessageTooLarge: a frame announces more than the message limit.
    """
    pos, end = 0, len(data)
    while end - pos >= 6:
        first, second = data[pos], data[pos + 1]
        if first != 0x82 or not second & 0x80:  # FIN + binary, no RSV bits; masked
            break
        length = second & 0x7F
        start = pos + 2
        if length == 126:
            if end - pos < 8:
                break
            length = int.from_bytes(data[start : start + 2], "big")
            if length < 126:
                break  # not the shortest form: wsproto refuses it
            start += 2
        elif length == 127:
            if end - pos < 14:
                break
            length = int.from_bytes(data[start : start + 8], "big")
            if length < 1 << 16 or length >> 63:
                break
            start += 8
        if length > frames._limit:
            raise frames._too_large(length)
        stop = start + 4 + length
        if stop > end:
            break
        bodies.append(_unmask(data[start + 4 : stop], data[start : start + 4]))
        frames._next_limit()
        pos = stop
    return pos


def binary_header(length: int) -> bytes:
    """The header of an unmasked, final binary frame of ``length`` bytes (what a server
    sends, RFC 6455 section 5.2): the payload follows it unchanged."""
    if length < 126:
        return bytes((0x82, length))
    if length < 1 << 16:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


def close_code_for(exc: BaseException) -> int:
    """The close code for a connection that ends because of ``exc``."""
    if isinstance(exc, TextMessageRefused):
        return CLOSE_UNSUPPORTED_DATA
    if isinstance(exc, MessageTooLarge):
        return CLOSE_TOO_BIG
    if isinstance(exc, WebSocketProtocolError):
        return exc.code
    if isinstance(exc, RemoteProtocolError):
        return CLOSE_POLICY
    return CLOSE_INTERNAL_ERROR


class WebSocketFrames:
    """One server-side WebSocket connection, after the upgrade: bytes in, bodies out.

    :meth:`receive` takes what the socket read and returns the bodies of the binary
    messages completed by it, in order; it answers pings and the peer's close itself
    (:meth:`data_to_send`), and raises when the peer breaks a rule.  As with
    :class:`~hisock_gevent.frames.FrameParser`, bodies completed before the bad bytes are
    returned first, and the error is raised by the next call (:attr:`failed` says one
    waits).

    :param max_message_size: the largest body accepted.
    :param first_message_limit: the largest first body (the hello); defaults to
        ``max_message_size``.
    :raises ImportError: wsproto is not installed (``pip install 'hisock_gevent[websocket]'``).
    """

    __slots__ = (
        "max_message_size", "_limit", "_ws", "_chunks", "_size", "_out", "_error",
        "closed_by_peer", "peer_close_code", "_close_sent", "fast",
    )

    def __init__(
        self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, first_message_limit: Optional[int] = None, fast: bool = True
    ):
        try:
            from wsproto.connection import Connection, ConnectionType
        except ImportError as exc:
            raise ImportError("the WebSocket transport needs wsproto: pip install 'hisock_gevent[websocket]'") from exc
        self.max_message_size = max_message_size
        self._limit = first_message_limit if first_message_limit is not None else max_message_size
        self._ws: Any = Connection(ConnectionType.SERVER)
        # The message being received, in chunks, and its size so far.
        self._chunks: List[bytes] = []
        self._size = 0
        self._out: List[bytes] = []
        self._error: Optional[RemoteProtocolError] = None
        #: The peer sent a close frame (answered in :meth:`data_to_send`); nothing more is read.
        self.closed_by_peer = False
        #: The code of the peer's close frame (1005 when it had none).
        self.peer_close_code: Optional[int] = None
        self._close_sent = False
        #: Read whole, final, masked binary frames by hand (see :func:`_simple_frames`).
        self.fast = fast

    # -------------------------------------------------------------- what the I/O loop reads

    @property
    def failed(self) -> bool:
        """A rule was broken behind the bodies last returned: the next :meth:`receive` raises."""
        return self._error is not None

    @property
    def mid_frame(self) -> bool:
        """Part of a message (or of a frame's header) has arrived and the rest has not."""
        return bool(self._chunks) or self._undecoded() > 0

    @property
    def buffered(self) -> int:
        """Bytes of the unfinished message received so far."""
        return self._size + self._undecoded()

    def _decoder(self) -> Any:
        # wsproto's frame decoder, to read a frame's announced length before its payload
        # arrives (so a huge claim is refused at once); None if wsproto hides it one day.
        return getattr(getattr(self._ws, "_proto", None), "_frame_decoder", None)

    def _between_messages(self) -> bool:
        """Nothing of a frame or a message is pending in wsproto or here."""
        if self._chunks:
            return False
        proto = getattr(self._ws, "_proto", None)
        decoder = getattr(proto, "_frame_decoder", None)
        messages = getattr(proto, "_message_decoder", None)
        if decoder is None or messages is None:
            return False
        return getattr(decoder, "header", True) is None and getattr(messages, "opcode", True) is None and self._undecoded() == 0

    def _undecoded(self) -> int:
        decoder = self._decoder()
        buffer = getattr(decoder, "buffer", None)
        try:
            return len(buffer) if buffer is not None else 0
        except TypeError:
            return 0

    def receive(self, data: bytes) -> List[bytes]:
        """The bodies of the binary messages ``data`` completes.

        :raises TextMessageRefused: a text message.
        :raises MessageTooLarge: a message longer than the limit (refused as soon as a
            frame's header announces it).
        :raises WebSocketProtocolError: the bytes break RFC 6455 (``code`` says how).
        """
        if self._error is not None:
            error, self._error = self._error, None
            self.closed_by_peer = True  # nothing more is read after it
            raise error
        if self.closed_by_peer or not data:
            return []
        bodies: List[bytes] = []
        if self.fast and self._between_messages():
            # Hot path (inlined wsproto, tested against it: test_websocket.py feeds both
            # the same bytes): the frames a client sends almost always are whole binary
            # messages in one masked frame each.  Whatever is not goes to wsproto from its
            # first byte on, at a frame boundary, so wsproto's state stays right.
            try:
                used = _simple_frames(data, bodies, self)
            except RemoteProtocolError as exc:
                if not bodies:
                    self.closed_by_peer = True
                    raise
                self._error = exc
                return bodies
            if used == len(data):
                return bodies
            data = data[used:]
        self._ws.receive_data(data)
        try:
            self._read_events(bodies)
            self._check_announced()
        except RemoteProtocolError as exc:
            if not bodies:
                self.closed_by_peer = True
                raise
            self._error = exc
        return bodies

    def _read_events(self, bodies: List[bytes]) -> None:
        from wsproto.connection import ConnectionState
        from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

        ws = self._ws
        for event in ws.events():
            kind = type(event)
            if kind is BytesMessage:
                self._add(event.data)
                if event.message_finished:
                    bodies.append(self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks))
                    self._chunks = []
                    self._size = 0
                    self._next_limit()
            elif kind is TextMessage:
                raise TextMessageRefused("a text message; HiSock messages travel in binary messages")
            elif kind is Ping:
                self._out.append(bytes(ws.send(Pong(payload=event.payload))))
            elif kind is Pong:
                pass
            elif kind is CloseConnection:
                if ws.state is ConnectionState.OPEN:
                    # wsproto reports a frame it could not parse as a close it did not send.
                    raise WebSocketProtocolError(f"a WebSocket protocol error: {event.reason}", int(event.code))
                self.closed_by_peer = True
                self.peer_close_code = int(event.code)
                if not self._close_sent:
                    self._close_sent = True
                    code = event.code if event.code not in (1005, 1006, 1015) else CLOSE_NORMAL
                    self._out.append(bytes(ws.send(CloseConnection(code=code))))
                return

    def _next_limit(self) -> int:
        """The limit of the message that starts now (and from now on, the message limit)."""
        limit = self._limit
        self._limit = self.max_message_size
        return limit

    def _add(self, data: bytes) -> None:
        size = self._size + len(data)
        if size > self._limit:
            raise self._too_large(size)
        self._chunks.append(bytes(data))
        self._size = size

    def _check_announced(self) -> None:
        header = getattr(self._decoder(), "header", None)
        announced = getattr(header, "payload_len", None)
        if not isinstance(announced, int):
            return
        consumed = getattr(self._decoder(), "payload_consumed", 0)
        total = self._size + announced - (consumed if isinstance(consumed, int) else 0)
        if total > self._limit:
            raise self._too_large(total)

    def _too_large(self, size: int) -> MessageTooLarge:
        what = "first message (the hello)" if self._limit != self.max_message_size else "message"
        return MessageTooLarge(f"a {what} of at least {size} bytes, more than the limit of {self._limit}")

    # -------------------------------------------------------------- what goes back

    def data_to_send(self) -> bytes:
        """Pongs and the answer to the peer's close, to write now (then forgotten)."""
        if not self._out:
            return b""
        out, self._out = self._out, []
        return b"".join(out)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        """The close frame to send (b"" when one was sent already, or answered the peer's)."""
        from wsproto.connection import ConnectionState
        from wsproto.events import CloseConnection

        if self._close_sent or self._ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return b""
        self._close_sent = True
        reason_bytes = reason.encode("utf-8")[:_MAX_CLOSE_REASON]
        text = reason_bytes.decode("utf-8", "ignore")
        return bytes(self._ws.send(CloseConnection(code=code, reason=text or None)))

    def ping(self, payload: bytes = b"") -> bytes:
        """A ping frame (the peer answers with a pong)."""
        from wsproto.connection import ConnectionState
        from wsproto.events import Ping

        if self._ws.state is not ConnectionState.OPEN:
            return b""
        return bytes(self._ws.send(Ping(payload=payload)))
