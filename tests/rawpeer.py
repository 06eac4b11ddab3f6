"""A raw HiSock 3.x peer for wire-level tests: a blocking stdlib socket and hand-built frames.

Shared by the test files that talk to the server byte by byte (auth, limits, TLS), so
none of them depends on the library's own framing to check the library.
"""

from __future__ import annotations

import json
import math
import re
import socket
import struct
import time
from typing import Any, Callable, List, Optional, Tuple

HEADER_LEN = 16


def wire_frame(body: bytes, header_len: int = HEADER_LEN) -> bytes:
    """``body`` behind its header, built by hand (not with hisock_gevent.frames)."""
    header = str(len(body)).encode("ascii")
    return header + b" " * (header_len - len(header)) + body


def hello_body(name: Optional[str] = "raw", group: Optional[str] = None, **extra: Any) -> bytes:
    return b"$CLTHELLO$" + json.dumps({"name": name, "group": group, **extra}).encode()


def cmd_body(command: str, fmt: bytes, payload: bytes) -> bytes:
    fmt_len = str(len(fmt)).encode("ascii")
    return b"$CMD$" + command.encode() + b"$MSG$" + fmt_len + b" " * (8 - len(fmt_len)) + fmt + payload


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


class RawPeer:
    """A HiSock 3.x peer made of a blocking stdlib socket.

    :param rcvbuf: a small receive buffer (set before connecting, so the advertised
        window stays small): a peer that reads slowly.
    :param wrap: called with the connected socket, returns the one to use (e.g. TLS).
    """

    def __init__(
        self,
        addr: Tuple[str, int],
        rcvbuf: Optional[int] = None,
        timeout: float = 5.0,
        wrap: Optional[Callable[[socket.socket], socket.socket]] = None,
    ):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = wrap(sock) if wrap is not None else sock
        self.addr = self.sock.getsockname()[:2]

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, body: bytes) -> None:
        self.sock.sendall(wire_frame(body))

    def hello(self, name: str, **extra: Any) -> bytes:
        """Say hello and return the server's answer (our own $CLTCONN$)."""
        self.send_frame(hello_body(name, **extra))
        body = self.read_frame()
        assert body.startswith(b"$CLTCONN$"), body
        return body

    def _read_exact(self, count: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"only {len(data)} of {count} bytes arrived")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError(f"EOF after {len(data)} of {count} bytes")
            data += chunk
        return bytes(data)

    def read_frame(self, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        length = int(self._read_exact(HEADER_LEN, deadline))
        return self._read_exact(length, deadline)

    def read_until_eof(self, timeout: float = 5.0) -> bytes:
        """Read (and return) whatever comes until the server closes the connection."""
        deadline = time.monotonic() + timeout
        data = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the server did not close within {timeout} s; got {bytes(data)[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError):
                return bytes(data)
            if not chunk:
                return bytes(data)
            data += chunk

    wait_closed = read_until_eof

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
