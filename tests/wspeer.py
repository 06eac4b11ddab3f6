"""A WebSocket peer for tests: a blocking stdlib socket and wsproto's client side.

It speaks HiSock over WebSocket (PROTOCOL.md section 10) with hand-made bodies, so the
tests of the server's WebSocket transport do not depend on the transport itself, and it
can also misbehave on purpose (text messages, huge claims, silence, bad frames).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

WAIT = 10.0


class Rejected(Exception):
    """The server answered the upgrade with an HTTP error."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


def hello_body(name: Optional[str] = "ws", group: Optional[str] = None, **extra: Any) -> bytes:
    return b"$CLTHELLO$" + json.dumps({"name": name, "group": group, **extra}).encode()


def cmd_body(command: str, text: str) -> bytes:
    """A command message carrying a str in the native letters (``<n>s``)."""
    payload = text.encode()
    fmt = b"%ds" % len(payload)
    return b"$CMD$" + command.encode() + b"$MSG$" + b"%-8d" % len(fmt) + fmt + payload


class WsPeer:
    """One WebSocket connection to ``addr`` (upgraded at once).

    :param origin: the ``Origin`` header to send (None: none, as a program sends).
    :raises Rejected: the server refused the upgrade.
    """

    def __init__(
        self,
        addr: Tuple[str, int],
        path: str = "/hisock",
        origin: Optional[str] = None,
        timeout: float = WAIT,
        source: Optional[Tuple[str, int]] = None,
    ):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:  # e.g. the very address a TCP peer already uses
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.sock.bind(source)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.bodies: List[bytes] = []
        self.texts: List[str] = []
        #: The close frame's code from the server, once it came.
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None
        self.eof = False
        self._partial: List[bytes] = []
        headers = [(b"Origin", origin.encode())] if origin is not None else []
        self.sock.sendall(self.ws.send(Request(host=f"{addr[0]}:{addr[1]}", target=path, extra_headers=headers)))
        deadline = time.monotonic() + timeout
        rejected: Optional[RejectConnection] = None
        body = b""
        while True:
            events = self._read(deadline)
            for i, event in enumerate(events):
                if isinstance(event, AcceptConnection):
                    for later in events[i + 1 :]:  # messages that came with the 101
                        self._handle(later)
                    return
                if isinstance(event, RejectConnection):
                    rejected = event
                    if not event.has_body:
                        break
                if isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        break
            else:
                if not self.eof:
                    continue
            if rejected is not None or self.eof:
                self.sock.close()
                raise Rejected(rejected.status_code if rejected is not None else 0, body)

    def _read(self, deadline: float) -> List[Any]:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            if self.ws.state is not ConnectionState.CLOSED:
                try:
                    self.ws.receive_data(None)
                except Exception:
                    pass
            return list(self._events())
        self.ws.receive_data(data)
        return list(self._events())

    def _events(self) -> Any:
        try:
            yield from self.ws.events()
        except Exception:
            return

    # ------------------------------------------------------------------ sending

    def send_body(self, body: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data=body)))

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, name: Optional[str] = "ws", group: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
        """Say hello and return the answer's client info (the first ``$CLTCONN$``)."""
        self.send_body(hello_body(name, group, **extra))
        answer = self.recv_body()
        assert answer.startswith(b"$CLTCONN$"), answer[:80]
        return json.loads(answer[len(b"$CLTCONN$") :])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ receiving

    def _pump(self, deadline: float) -> None:
        for event in self._read(deadline):
            self._handle(event)

    def _handle(self, event: Any) -> None:
        if isinstance(event, BytesMessage):
            self._partial.append(bytes(event.data))
            if event.message_finished:
                self.bodies.append(b"".join(self._partial))
                self._partial = []
        elif isinstance(event, TextMessage):
            self.texts.append(event.data)
        elif isinstance(event, Ping):
            self.sock.sendall(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.close_code is None:
                self.close_code = event.code
                self.close_reason = event.reason
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                try:
                    self.sock.sendall(self.ws.send(event.response()))
                except OSError:
                    pass

    def recv_body(self, timeout: float = WAIT, skip: Tuple[bytes, ...] = ()) -> bytes:
        """The next body (skipping those starting with one of ``skip``).

        :raises ConnectionError: the connection closed first.  :raises TimeoutError: none came.
        """
        deadline = time.monotonic() + timeout
        while True:
            while self.bodies:
                body = self.bodies.pop(0)
                if not body.startswith(skip) or not skip:
                    return body
            if self.eof or self.close_code is not None:
                raise ConnectionError(f"closed (code {self.close_code}) before a body came")
            if time.monotonic() > deadline:
                raise TimeoutError("no body in time")
            try:
                self._pump(deadline)
            except socket.timeout:
                pass

    def wait_closed(self, timeout: float = WAIT) -> Optional[int]:
        """Read until the server closes; return its close code (None: closed without one)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() > deadline:
                raise TimeoutError(f"still open after {timeout} s")
            try:
                self._pump(deadline)
            except socket.timeout:
                pass
            except OSError:
                break
        return self.close_code


def http_get(addr: Tuple[str, int], path: str, headers: Optional[Dict[str, str]] = None, timeout: float = WAIT) -> Tuple[int, Dict[str, str], bytes]:
    """A plain HTTP/1.1 GET; (status, headers with lower-case names, body)."""
    with socket.create_connection(addr, timeout=timeout) as sock:
        lines = [f"GET {path} HTTP/1.1", f"Host: {addr[0]}:{addr[1]}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), found, body
