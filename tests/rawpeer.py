"""A raw HiSock 3.x peer for wire-level tests: a blocking stdlib socket and hand-built frames.

The one raw-socket peer of the suite (the ``raw`` fixture in conftest.py makes them):
frames are built and split by hand here, so the tests that talk to the server byte by
byte do not depend on the library's own framing to check the library.  Where only the
content matters, :meth:`RawPeer.read_message` and :meth:`RawPeer.read_command` hand a
frame's body to the library's message parser and decoder.
"""

from __future__ import annotations

import json
import math
import re
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from hisock_gevent.messages import Command, parse_server_body
from hisock_gevent.typecast import decode

HEADER_LEN = 16


def wire_frame(body: bytes, header_len: int = HEADER_LEN) -> bytes:
    """``body`` behind its header, built by hand (not with hisock_gevent.frames): ASCII
    decimal length, left-aligned, space-padded."""
    header = str(len(body)).encode("ascii")
    assert len(header) <= header_len
    return header + b" " * (header_len - len(header)) + body


def hello_body(name: Optional[str] = "raw", group: Optional[str] = None, **extra: Any) -> bytes:
    return b"$CLTHELLO$" + json.dumps({"name": name, "group": group, **extra}).encode()


def cmd_body(command: str, fmt: bytes, payload: bytes) -> bytes:
    """A command message body built by hand: fmt length padded with spaces to 8 bytes."""
    fmt_len = str(len(fmt)).encode("ascii")
    assert len(fmt_len) <= 8
    return b"$CMD$" + command.encode() + b"$MSG$" + fmt_len + b" " * (8 - len(fmt_len)) + fmt + payload


def split_cmd(body: bytes) -> Tuple[str, bytes, bytes]:
    """(command, fmt, payload) of a command body, checking the fmt length field is canonical."""
    assert body.startswith(b"$CMD$"), body
    split = body.index(b"$MSG$", 5)
    command = body[5:split].decode("utf-8")
    field = body[split + 5 : split + 13]
    assert len(field) == 8, body
    digits = field.rstrip(b" ")
    assert digits.isdigit() and not field.startswith(b" "), f"fmt length field {field!r} is not canonical"
    fmt_end = split + 13 + int(digits)
    return command, body[split + 13 : fmt_end], body[fmt_end:]


def body_length(header: bytes) -> int:
    """The length a header announces; it must be canonical (digits, then spaces)."""
    digits = header.rstrip(b" ")
    assert digits.isdigit() and header[:1] != b" ", f"server sent a non-canonical header {header!r}"
    return int(digits)


def split_frames(data: bytes, header_len: int = HEADER_LEN) -> List[bytes]:
    """The bodies of whole frames laid end to end in ``data`` (a partial tail is an error)."""
    bodies: List[bytes] = []
    while data:
        length = int(data[:header_len])
        assert len(data) >= header_len + length, f"truncated frame in {data!r}"
        bodies.append(data[header_len : header_len + length])
        data = data[header_len + length :]
    return bodies


#: One (LEN, mark) token of a native fmt, after its top-level letter.
_FMT_TOKEN = re.compile(rb"(\d*)([sibf\[\](){}])")


def hisock_floats(fmt: bytes, payload: bytes) -> List[float]:
    """Every float of a native ``(fmt, payload)``, in order, read by HiSock 3.x's own rule:
    ``struct.unpack("!f", <the float's bytes>)``, which raises ``struct.error`` unless the
    float is exactly 4 bytes (HiSock's receive loop dies on anything else)."""
    found: List[float] = []
    if fmt[:1] not in (b"l", b"t", b"d"):
        if fmt.endswith(b"f"):
            (value,) = struct.unpack("!f", payload)
            found.append(value)
        return found
    pos = 0
    for digits, mark in _FMT_TOKEN.findall(fmt[1:]):
        if mark in b"sibf":
            size = int(digits)
            if mark == b"f":
                (value,) = struct.unpack("!f", payload[pos : pos + size])
                found.append(value)
            pos += size
    assert pos == len(payload), f"fmt {fmt!r} does not cover the payload"
    return found


def as_single(value: Any) -> Any:
    """``value`` as a plain HiSock peer gets it: every float rounded to a 4-byte single
    (infinity of its sign past the single range), all else unchanged."""
    kind = type(value)
    if kind is float:
        try:
            return struct.unpack(">f", struct.pack(">f", value))[0]
        except OverflowError:
            return math.copysign(math.inf, value)
    if kind is list:
        return [as_single(item) for item in value]
    if kind is tuple:
        return tuple(as_single(item) for item in value)
    if kind is dict:
        return {as_single(key): as_single(item) for key, item in value.items()}
    return value


def floats_in(value: Any) -> List[float]:
    """The floats of a value in the order the native grammar lays them out (dict keys
    before their values, depth first)."""
    if type(value) is float:
        return [value]
    if type(value) in (list, tuple):
        return [found for item in value for found in floats_in(item)]
    if type(value) is dict:
        return [found for pair in value.items() for item in pair for found in floats_in(item)]
    return []


def install_echo(server: Any) -> None:
    """Register ``echo``: the server sends the content straight back."""

    @server.on("echo")
    def echo(client: Any, content: Any) -> None:
        server.send_client(client, "echo", content)


def sync(client: Any, token: Any = "sync") -> None:
    """A round trip: everything the client sent before has been handled by the server."""
    client.send("echo", token)
    assert client.recv("echo", timeout=5) == token


class PeerClosed(EOFError):
    """The server closed the connection (EOF, or a reset) before a whole frame arrived."""

    def __init__(self, message: str, received: int = 0, reset: bool = False):
        super().__init__(message)
        #: Bytes of the frame (or header) that did arrive.
        self.received = received
        #: A reset rather than an orderly EOF.
        self.reset = reset
        #: An orderly EOF where the next frame would have begun (set by read_frame).
        self.between_frames = False


#: ``RawPeer(name=...)`` left out: connect without saying hello.
NO_HELLO: Any = object()


class RawPeer:
    """A HiSock 3.x peer made of a blocking stdlib socket.

    :param name: when given (None included), say hello under this name (and ``group``)
        right after connecting, without waiting for the answer.
    :param rcvbuf: a small receive buffer (set before connecting, so the advertised
        window stays small): a peer that reads slowly.
    :param timeout: the default for every read (and the connect).
    :param wrap: called with the connected socket, returns the one to use (e.g. TLS).
    :param header_len: the frame header width, both ways.
    :param source: bind to this local ``(ip, port)`` first, with SO_REUSEADDR and
        SO_REUSEPORT, so that two peers can share one source address.

    Reads take exactly the bytes a frame needs from the socket, so what a test leaves
    unread stays in the kernel's buffers; bytes handed to :meth:`feed` (by a test that
    reads many peers through a selector) are read first.
    """

    def __init__(
        self,
        addr: Tuple[str, int],
        name: Any = NO_HELLO,
        group: Optional[str] = None,
        *,
        rcvbuf: Optional[int] = None,
        timeout: float = 5.0,
        wrap: Optional[Callable[[socket.socket], socket.socket]] = None,
        header_len: int = HEADER_LEN,
        source: Optional[Tuple[str, int]] = None,
    ):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(source)
        sock.settimeout(timeout)
        sock.connect(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = wrap(sock) if wrap is not None else sock
        self.timeout = timeout
        self.header_len = header_len
        self.addr: Tuple[str, int] = self.sock.getsockname()[:2]
        self.port: int = self.addr[1]
        self.ipstr = f"{self.addr[0]}:{self.addr[1]}"
        self._inbox = bytearray()
        self._aborted = False
        if name is not NO_HELLO:
            self.send_frame(hello_body(name, group))

    def fileno(self) -> int:
        """The socket's, so a peer can be registered with ``selectors`` as it is."""
        return self.sock.fileno()

    # -- writing

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, body: bytes) -> None:
        self.sock.sendall(wire_frame(body, self.header_len))

    def try_send(self, data: bytes) -> bool:
        """Send raw bytes; False when the server has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def hello(self, name: Optional[str] = "raw", group: Optional[str] = None, **extra: Any) -> bytes:
        """Say hello and return the server's answer (our own $CLTCONN$: the join happened)."""
        self.send_frame(hello_body(name, group, **extra))
        body = self.read_frame()
        assert body.startswith(b"$CLTCONN$"), body
        assert json.loads(body[len(b"$CLTCONN$") :])["ip"][1] == self.port, f"not the answer to our hello: {body!r}"
        return body

    def hello_info(self, name: Optional[str] = "raw", group: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
        """Say hello and return the JSON of the server's answer (our own $CLTCONN$)."""
        return json.loads(self.hello(name, group, **extra)[len(b"$CLTCONN$") :])

    def getclt(self, query: str) -> Tuple[bytes, Any]:
        """Ask $GETCLT$ and return (fmt, decoded content) of the framed command answer."""
        self.send_frame(b"$GETCLT$" + query.encode())
        body = self.read_frame_skipping(b"$CLTCONN$", b"$CLTDISCONN$")
        command, fmt, payload = split_cmd(body)
        assert command == "$GETCLT$"
        return fmt, decode(fmt, payload)

    def shutdown_write(self) -> None:
        """Send FIN: the server sees the end of the stream (mid-frame, if we were mid-frame)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def abort(self) -> None:
        """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self._aborted = True

    # -- reading

    def feed(self, data: bytes) -> None:
        """Bytes read from this peer's socket elsewhere (a selector loop): read them first."""
        self._inbox += data

    def take_frame(self) -> Optional[bytes]:
        """The next whole frame's body among the bytes fed, or None (the socket is not read)."""
        if len(self._inbox) < self.header_len:
            return None
        end = self.header_len + body_length(bytes(self._inbox[: self.header_len]))
        if len(self._inbox) < end:
            return None
        body = bytes(self._inbox[self.header_len : end])
        del self._inbox[:end]
        return body

    def _read_exact(self, count: int, deadline: float) -> bytes:
        data = bytearray(self._inbox[:count])
        del self._inbox[:count]
        while len(data) < count:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise socket.timeout
                self.sock.settimeout(remaining)
                chunk = self.sock.recv(count - len(data))
            except socket.timeout:
                self._inbox[:0] = data  # a later read carries on where this one stopped
                raise socket.timeout(f"only {len(data)} of {count} bytes arrived") from None
            except (ConnectionResetError, ConnectionAbortedError):
                raise PeerClosed(f"connection reset after {len(data)} of {count} bytes", len(data), reset=True) from None
            if not chunk:
                raise PeerClosed(f"EOF after {len(data)} of {count} bytes", len(data))
            data += chunk
        return bytes(data)

    def read_frame(self, timeout: Optional[float] = None) -> bytes:
        """One whole frame's body; the header must be canonical (digits, then spaces).

        :raises PeerClosed: the server closed the connection first (an EOFError).
        :raises socket.timeout: nothing whole within ``timeout`` (a TimeoutError).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            header = self._read_exact(self.header_len, deadline)
        except PeerClosed as closed:
            closed.between_frames = closed.received == 0 and not closed.reset
            raise
        try:
            return self._read_exact(body_length(header), deadline)
        except socket.timeout:
            self._inbox[:0] = header
            raise

    def read_frame_skipping(self, *prefixes: bytes, timeout: Optional[float] = None) -> bytes:
        """The next frame whose body starts with none of ``prefixes``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            body = self.read_frame(max(deadline - time.monotonic(), 0.001))
            if not body.startswith(prefixes):
                return body

    def read_message(self, timeout: Optional[float] = None) -> Any:
        """The next frame, parsed by the library (a Command, PeerJoined, Disconnect, ...)."""
        return parse_server_body(self.read_frame(timeout))

    def read_command(self, timeout: Optional[float] = None) -> Tuple[str, Any]:
        """Skip reserved messages; return the next (command, decoded content)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            message = self.read_message(max(0.001, deadline - time.monotonic()))
            if isinstance(message, Command):
                return message.command, decode(message.fmt, message.payload)

    def frames_until_eof(self, timeout: Optional[float] = None) -> List[bytes]:
        """Every frame's body until the server closes the connection between two frames
        (``timeout`` is for each frame; a reset or a cut frame raises PeerClosed)."""
        bodies: List[bytes] = []
        while True:
            try:
                bodies.append(self.read_frame(timeout))
            except PeerClosed as closed:
                if closed.between_frames:
                    return bodies
                raise

    def read_until_eof(self, timeout: Optional[float] = None) -> bytes:
        """Read (and return) whatever comes until the server closes the connection (EOF or reset)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        data = bytearray(self._inbox)
        self._inbox.clear()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"the server did not close within {timeout} s; got {bytes(data)[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
                return bytes(data)
            if not chunk:
                return bytes(data)
            data += chunk

    wait_closed = read_until_eof

    def wait_closed_how(self, timeout: Optional[float] = None) -> str:
        """Read (and drop) whatever comes until the server closes us: "eof" or "reset"
        ("aborted" when we reset the connection ourselves)."""
        if self._aborted:
            return "aborted"
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._inbox.clear()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"the server did not close the connection from port {self.port} within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return "reset"
            except socket.timeout:
                continue
            if not data:
                return "eof"

    def is_closed_by_server(self) -> bool:
        """Non-blocking peek: has the server closed (EOF/reset)?  Pending data counts as
        open (and is dropped)."""
        try:
            data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True
        self.sock.recv(len(data), socket.MSG_DONTWAIT)
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
