"""One peer's socket: frames in through a parser, frames out through a bounded, coalescing queue.

The reading side is a generator, :meth:`Connection.bodies`, run by whichever greenlet owns
the peer (the server's per-client greenlet, the client's reader).  The writing side never
blocks its caller: :meth:`Connection.send` appends to a queue and a writer greenlet, started
only while there is something to write, joins everything queued into one ``sendall``.  A
peer that stops reading therefore holds up nobody but itself, and when its queue passes
``max_queue_bytes`` the owner is told through ``on_overflow``.
"""

from __future__ import annotations

import logging
import socket as _stdlib_socket
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

import gevent
from gevent import socket as gsocket

from .frames import DEFAULT_HEADER_LEN, DEFAULT_MAX_MESSAGE_SIZE, FrameParser
from .tls import TLSLayer

__all__ = ["Connection", "DEFAULT_MAX_QUEUE_BYTES", "RECV_CHUNK", "set_nodelay"]

logger = logging.getLogger("hisock_gevent")

#: Outbound bytes a peer may have waiting before it counts as not reading (64 MiB).
DEFAULT_MAX_QUEUE_BYTES = 64 * 1024 * 1024
#: Bytes asked of the kernel per read.
RECV_CHUNK = 256 * 1024


def set_nodelay(sock: Any) -> None:
    """Turn off Nagle: HiSock frames are small and must not wait behind delayed ACKs."""
    try:
        sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
    except OSError:
        pass


class Connection:
    """A framed, queued connection to one peer.

    :param sock: a connected gevent socket (owned from now on: :meth:`close` closes it).
    :param on_overflow: called once, with this connection, when the outbound queue passes
        ``max_queue_bytes``; the owner normally closes the connection.
    :param parser: continue with this parser (and whatever it has buffered).
    :param tls: a TLS session whose handshake is done: everything read is decrypted and
        everything sent encrypted through it.
    """

    __slots__ = (
        "sock",
        "peer",
        "header_len",
        "parser",
        "max_queue_bytes",
        "on_overflow",
        "_out",
        "_out_bytes",
        "_writer",
        "closed",
        "_overflowed",
        "tls",
        "last_received",
        "error",
    )

    def __init__(
        self,
        sock: Any,
        peer: Tuple[str, int],
        header_len: int = DEFAULT_HEADER_LEN,
        max_body_len: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        on_overflow: Optional[Callable[["Connection"], Any]] = None,
        parser: Optional[FrameParser] = None,
        tls: Optional[TLSLayer] = None,
    ):
        self.sock = sock
        self.peer = peer
        self.header_len = header_len
        # A parser may be handed over with bytes already buffered (the client's handshake).
        self.parser = parser if parser is not None else FrameParser(header_len, max_body_len)
        self.max_queue_bytes = max_queue_bytes
        self.on_overflow = on_overflow
        self._out: List[bytes] = []
        self._out_bytes = 0
        self._writer: Optional[gevent.Greenlet] = None
        self.closed = False
        self._overflowed = False
        self.tls = tls
        #: time.monotonic() of the last bytes received (for idle checks).
        self.last_received = time.monotonic()
        #: Why the connection failed, when it did not end cleanly (a reset, a failed write).
        self.error: Optional[str] = None

    # ------------------------------------------------------------------ reading

    def bodies(self) -> Iterator[bytes]:
        """Yield each body the peer sends, in order, until it closes the connection.

        :raises RemoteProtocolError: the peer sent a bad header (the caller closes us).
        :raises ConnectionTruncated: never; a close in the middle of a frame just ends the
            iteration, and :attr:`FrameParser.mid_frame` tells the caller it happened.
        """
        recv = self.sock.recv
        parser = self.parser
        feed = parser.feed
        tls = self.tls
        monotonic = time.monotonic
        # Bytes that arrived before we took the socket over may already hold whole frames.
        data = b""
        while True:
            if tls is not None:
                data, reply = tls.receive(data)
                if reply:
                    self._send_ciphertext(reply)
            for body in feed(data):
                yield body
            if parser.failed:
                feed(b"")  # raises the error found behind those bodies
            if tls is not None and tls.closed_by_peer:
                return
            try:
                data = recv(RECV_CHUNK)
            except OSError as exc:
                if not self.closed and self.error is None:
                    self.error = f"connection error: {exc}"
                return
            if not data:
                return
            self.last_received = monotonic()

    # ------------------------------------------------------------------ writing

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted by :meth:`send` that the kernel has not taken yet."""
        return self._out_bytes

    def send(self, data: bytes) -> None:
        """Write one or more whole frames without blocking: what the kernel does not take
        at once is queued for the writer greenlet.  Ignored once closed."""
        if self.closed or self.error is not None:
            return
        if self.tls is not None:
            data = self.tls.encrypt(data)
        self._send_ciphertext(data)

    def _send_ciphertext(self, data: bytes) -> None:
        if self._writer is None:
            # Nothing queued: hand it straight to the kernel (no greenlet, no wait).
            try:
                sent = self._raw_send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._abort(f"write failed: {exc}")
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes > self.max_queue_bytes and not self._overflowed:
            self._overflowed = True
            if self.on_overflow is not None:
                self.on_overflow(self)
                return
        if self._writer is None:
            self._writer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        sendall = self.sock.sendall
        try:
            while self._out and not self.closed and self.error is None:
                chunks, self._out = self._out, []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                sendall(data)
                self._out_bytes -= len(data)
        except OSError as exc:
            self._abort(f"write failed: {exc}")
        finally:
            self._writer = None

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything queued was handed to the kernel; False on timeout."""
        writer = self._writer
        if writer is None or writer is gevent.getcurrent():
            return not self._out
        writer.join(timeout)
        return not self._out

    def _raw_send(self, data: bytes) -> int:
        # gevent sockets keep a non-blocking stdlib socket in ``_sock``.
        return getattr(self.sock, "_sock", self.sock).send(data)

    def send_now(self, data: bytes) -> None:
        """Best-effort immediate write for a connection we are about to drop (never blocks)."""
        try:
            self._raw_send(self.tls.encrypt(data) if self.tls is not None else data)
        except OSError:
            pass

    # ------------------------------------------------------------------ closing

    def _abort(self, reason: str) -> None:
        """A write failed: the peer is gone.  Stop writing, but leave the socket to the
        reader, which still handles what the peer sent before it went and then ends."""
        if self.error is None:
            self.error = reason
        self._out = []
        self._out_bytes = 0

    def close(self, flush_timeout: float = 0.0) -> None:
        """Close the socket, first letting queued frames drain for up to ``flush_timeout`` s.

        Idempotent.  A greenlet blocked reading this connection wakes up and ends.
        """
        if self.closed:
            return
        if flush_timeout > 0 and self._out:
            self.flush(flush_timeout)
        self.closed = True
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)
            self._writer = None
        try:
            self.sock.shutdown(gsocket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
