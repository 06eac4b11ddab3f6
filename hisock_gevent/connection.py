"""One peer's socket: frames in through a parser, frames out through a bounded, coalescing queue.

The reading side is a generator, :meth:`Connection.bodies`, run by whichever greenlet owns
the peer (the server's per-client greenlet, the client's reader).  The writing side never
blocks its caller: :meth:`Connection.send` appends to the peer's queue, and once per pass
of the event loop one callback per hub (:class:`_WriteBatch`) hands each dirty queue to
the kernel with a single non-blocking ``send``.  Only when the kernel's buffer is full
does a writer greenlet take over that peer and wait for room.  A peer that stops reading
therefore holds up nobody but itself, and when more than ``max_queue_bytes`` wait for it
the owner is told through ``on_overflow``.
"""

from __future__ import annotations

import logging
import socket as _stdlib_socket
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

import gevent
import gevent.monkey
from gevent import socket as gsocket

from .frames import DEFAULT_HEADER_LEN, DEFAULT_MAX_MESSAGE_SIZE, FrameParser
from .stats import Traffic
from .tls import TLSLayer

__all__ = ["Connection", "DEFAULT_MAX_QUEUE_BYTES", "RECV_CHUNK", "set_nodelay"]

logger = logging.getLogger("hisock_gevent")

#: Outbound bytes a peer may have waiting before it counts as not reading (64 MiB).
DEFAULT_MAX_QUEUE_BYTES = 64 * 1024 * 1024
#: Bytes asked of the kernel per read.
RECV_CHUNK = 256 * 1024


class _WriteBatch:
    """The connections of one hub that have frames queued in this pass of its loop.

    One callback per loop pass flushes them all, instead of one callback per connection:
    with hundreds of clients answering at once, that is most of the scheduling cost.
    """

    __slots__ = ("_loop", "_dirty", "_scheduled")

    def __init__(self, loop: Any):
        self._loop = loop
        self._dirty: List[Connection] = []
        self._scheduled = False

    def add(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn._flush_queued()


# One batch per OS thread (i.e. per hub), whether or not threading is monkey-patched.
_batches = gevent.monkey.get_original("threading", "local")()


def _write_batch() -> _WriteBatch:
    batch = getattr(_batches, "batch", None)
    hub = gevent.get_hub()
    if batch is None or batch._loop is not hub.loop:
        batch = _batches.batch = _WriteBatch(hub.loop)
    return batch


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
        "_flush_pending",
        "_batch",
        "_raw",
        "closed",
        "_overflowed",
        "tls",
        "last_received",
        "error",
        "traffic",
    )

    def __init__(
        self,
        sock: Any,
        peer: Tuple[str, int],
        header_len: int = DEFAULT_HEADER_LEN,
        max_body_len: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        on_overflow: Optional[Callable[[Connection], Any]] = None,
        parser: Optional[FrameParser] = None,
        tls: Optional[TLSLayer] = None,
        traffic: Optional[Traffic] = None,
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
        self._flush_pending = False
        # The write batch of the thread (hub) that owns this connection: it is made there.
        self._batch = _write_batch()
        # gevent sockets keep a non-blocking stdlib socket in ``_sock``: the no-wait path.
        self._raw = getattr(sock, "_sock", sock)
        self.closed = False
        self._overflowed = False
        self.tls = tls
        #: time.monotonic() of the last bytes received (for idle checks).
        self.last_received = time.monotonic()
        #: Why the connection failed, when it did not end cleanly (a reset, a failed write).
        self.error: Optional[str] = None
        #: Counts frames queued and bytes moved; a server shares one among its connections.
        self.traffic = traffic if traffic is not None else Traffic()

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
        traffic = self.traffic
        monotonic = time.monotonic
        # Bytes that arrived before we took the socket over may already hold whole frames.
        data = b""
        while True:
            if tls is not None:
                data, reply = tls.receive(data)
                if reply:
                    self._queue(reply)
            yield from feed(data)
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
            traffic.bytes_in += len(data)
            self.last_received = monotonic()

    # ------------------------------------------------------------------ writing

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted by :meth:`send` that the kernel has not taken yet."""
        return self._out_bytes

    def send(self, data: bytes) -> None:
        """Queue one or more whole frames; never blocks.  Ignored once closed.

        Everything queued during one pass of the event loop leaves in one ``send`` at the
        end of that pass (see :meth:`_flush_queued`); what the kernel does not take then
        is written by a writer greenlet that waits for the socket.
        """
        if self.closed or self.error is not None:
            return
        self.traffic.messages_out += 1
        if self.tls is not None:
            data = self.tls.encrypt(data)
        # _queue(), inlined for the common case: a broadcast calls this once per client.
        self._out.append(data)
        self._out_bytes += len(data)
        if self._writer is not None:
            self._check_backlog()
        elif not self._flush_pending:
            self._flush_pending = True
            self._batch.add(self)

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if self._writer is not None:
            # The peer is already behind: this is where an unread backlog grows.
            self._check_backlog()
        elif not self._flush_pending:
            self._flush_pending = True
            self._batch.add(self)

    def _flush_queued(self) -> None:
        """Write what is queued with one non-blocking send (runs in the hub, so never waits)."""
        self._flush_pending = False
        chunks = self._out
        if self._writer is not None or not chunks or self.closed or self.error is not None:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._out = []
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._abort(f"write failed: {exc}")
            return
        self._out_bytes -= sent
        self.traffic.bytes_out += sent
        if sent < len(data):
            # The kernel's buffer is full: a greenlet waits for room and writes the rest.
            self._out.insert(0, data[sent:])
            self._writer = gevent.spawn(self._drain)
            self._check_backlog()

    def _check_backlog(self) -> None:
        """Tell the owner, once, that more than ``max_queue_bytes`` wait unread by the peer."""
        if self._out_bytes > self.max_queue_bytes and not self._overflowed:
            self._overflowed = True
            if self.on_overflow is not None:
                self.on_overflow(self)

    def _drain(self) -> None:
        sendall = self.sock.sendall
        try:
            while self._out and not self.closed and self.error is None:
                chunks, self._out = self._out, []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                sendall(data)
                self._out_bytes -= len(data)
                self.traffic.bytes_out += len(data)
        except OSError as exc:
            self._abort(f"write failed: {exc}")
        finally:
            self._writer = None

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Write what is queued now and wait until the kernel took it all; False on timeout."""
        if self._writer is None and self._out:
            self._flush_queued()
        writer = self._writer
        if writer is None or writer is gevent.getcurrent():
            return not self._out
        writer.join(timeout)
        return not self._out

    def send_now(self, data: bytes) -> None:
        """Best-effort immediate write for a connection we are about to drop (never blocks)."""
        try:
            self._raw.send(self.tls.encrypt(data) if self.tls is not None else data)
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
