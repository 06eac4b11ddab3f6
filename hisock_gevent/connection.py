"""One peer's socket: frames in through a parser, frames out through a bounded, coalescing queue.

The reading side is a generator, :meth:`Connection.bodies`, run by whichever greenlet owns
the peer (the server's per-client greenlet, the client's reader).  It yields to the hub
after every :data:`FRAMES_PER_TURN` frames, so a peer that sends as fast as the network
allows is served in turns like everyone else instead of holding the hub (a reader that
waited for bytes during its turn held nobody up and goes on; see :func:`end_turn`), and it gives a
frame that has started :attr:`Connection.frame_timeout` seconds to finish.

The writing side never blocks its caller: :meth:`Connection.send` appends to the peer's
queue, and once per pass of the event loop one callback per hub (:class:`_WriteBatch`)
hands each dirty queue to the kernel with a single non-blocking write.  Only when the
kernel's buffer is full does a writer greenlet take over that peer and wait for room.
Queued frames are the senders' own ``bytes`` objects, never copies: a broadcast frame
queued to a thousand peers is stored once, a partial write keeps an offset, and several
frames leave in one vectored ``sendmsg`` (or one small join).

A peer that stops reading holds up nobody but itself.  When more than ``max_queue_bytes``
wait for it (checked as each frame is queued, after giving the kernel what it will take),
or when the server's :class:`~hisock_gevent.budget.SendBudget` is over its limit and this
peer has one of the largest backlogs, its queue is freed at once, nothing more is queued,
and the owner is told through ``on_overflow``, in a greenlet of its own: never inside
the ``send`` that found it, so a broadcast reaches everyone else first.
"""

from __future__ import annotations

import logging
import socket as _stdlib_socket
import time
from collections import deque
from itertools import islice
from typing import Any, Callable, Deque, Iterator, List, Optional, Sequence, Tuple, Union

import gevent
import gevent.monkey
from gevent import socket as gsocket

from .budget import SendBudget
from .errors import FrameTimeout
from .frames import DEFAULT_HEADER_LEN, DEFAULT_MAX_MESSAGE_SIZE, FrameParser
from .stats import Traffic
from .tls import TLSLayer

__all__ = [
    "Connection",
    "DEFAULT_MAX_QUEUE_BYTES",
    "DEFAULT_FRAME_TIMEOUT",
    "FRAMES_PER_TURN",
    "RECV_CHUNK",
    "set_nodelay",
    "yield_to_loop",
    "end_turn",
    "loop_pass",
    "Interrupted",
]

logger = logging.getLogger("hisock_gevent")

#: Outbound bytes a peer may leave unread before it is dropped (16 MiB: room for one
#: message of the largest default size; a single frame larger than the limit is still
#: accepted into an empty queue).
DEFAULT_MAX_QUEUE_BYTES = 16 * 1024 * 1024
#: Seconds a frame that has started arriving has to finish.
DEFAULT_FRAME_TIMEOUT = 60.0
#: Bytes asked of the kernel per read.
RECV_CHUNK = 256 * 1024
#: Frames handed on by one reader before it lets the other greenlets run.
FRAMES_PER_TURN = 64
#: Queued bytes up to which several frames are joined into one write (a small copy);
#: above it they go out as a vector of the frames themselves.
_JOIN_LIMIT = 64 * 1024
#: The most frames one ``sendmsg`` call is given (well under the kernel's IOV_MAX).
_MAX_VECTORS = 256
# A connection's queue is a list of its own while at most one frame waits (the usual
# case: one frame per pass of the loop), and a deque of its own once two or more wait at
# once; either is kept, emptied, for the next frames (a deque until a backlog drains).
# Even an empty deque holds a 512-byte block (760 bytes in all: 73 MiB for 100,000 idle
# clients); an empty list is 56 bytes.  A container made per frame and freed at the flush
# (a 1-tuple, as before) cost nothing per client in memory but one allocation per frame,
# and a broadcast or a busy pass holds thousands of them at once: enough to run the
# garbage collector (9 young and 1 middle collections for 10 broadcasts to 3,000 clients,
# 0.7-1.2 ms a broadcast; none with a kept list).  :meth:`Connection.send` and
# :meth:`Connection._enqueue` add to a queue, :meth:`Connection._consume` takes from it.


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


class Interrupted(Exception):
    """Raised (by a gevent.Timeout) into a reader waiting for bytes in
    :meth:`Connection.bodies`: the generator then yields None instead of ending, so whoever
    iterates it can stop waiting and carry on iterating later."""


def yield_to_loop() -> None:
    """Let the event loop go round once (poll sockets, fire timers, run other greenlets),
    then carry on.

    Not ``gevent.sleep(0)``: that only queues us behind the callbacks already waiting,
    and the loop runs up to 50 callbacks before it looks at sockets or timers again, so a
    greenlet that yields with it every few milliseconds can still keep everyone else's
    I/O waiting for a quarter of a second.  A zero-delay timer fires only after the loop
    has polled.
    """
    hub = gevent.get_hub()
    timer = hub.loop.timer(0.0)
    try:
        hub.wait(timer)
    finally:
        timer.close()


def loop_pass(loop: Any) -> Optional[int]:
    """How many passes ``loop`` has made (libev counts them; None where the loop does not)."""
    return getattr(loop, "iteration", None)


def end_turn(loop: Any, began: Optional[int]) -> Optional[int]:
    """A reader handed on :data:`FRAMES_PER_TURN` frames since the loop's pass ``began``:
    let the loop go round, unless it went round meanwhile (the reader waited for bytes
    during its turn, so it held nobody up).  Returns the pass the next turn begins in.

    Without that check a connection that is merely busy, never a flooder, would leave the
    loop every 64 frames anyway: a timer, an extra pass, and its socket taken out of epoll
    and put back (two more system calls).  A reader that never waits still yields at least
    once every two turns.
    """
    passes = loop_pass(loop)
    if passes is None or passes == began:
        yield_to_loop()
    return loop_pass(loop)


def set_nodelay(sock: Any) -> None:
    """Turn off Nagle: HiSock frames are small and must not wait behind delayed ACKs."""
    try:
        sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
    except OSError:
        pass


class Connection:
    """A framed, queued connection to one peer.

    :param sock: a connected gevent socket (owned from now on: :meth:`close` closes it).
    :param on_overflow: called once, with this connection, in a greenlet of its own, when
        the connection is overflowed (see :meth:`overflow`); the owner drops the peer.
    :param parser: continue with this parser (and whatever it has buffered).
    :param tls: a TLS session whose handshake is done: everything read is decrypted and
        everything sent encrypted through it.
    :param budget: the server-wide limit on bytes held for backlogged peers, if any.
    :param frame_timeout: seconds a frame that has started has to finish; None for no limit.
    :param spawn: starts the greenlet that calls ``on_overflow`` (the owner's, so that it
        can end it when it closes); ``gevent.spawn`` by default.
    """

    __slots__ = (
        "sock",
        "peer",
        "header_len",
        "parser",
        "max_queue_bytes",
        "on_overflow",
        "_out",
        "_offset",
        "_out_bytes",
        "_writer",
        "_flush_pending",
        "_backlogged",
        "_batch",
        "_raw",
        "closed",
        "overflowed",
        "tls",
        "last_received",
        "error",
        "traffic",
        "budget",
        "frame_timeout",
        "_spawn",
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
        budget: Optional[SendBudget] = None,
        frame_timeout: Optional[float] = DEFAULT_FRAME_TIMEOUT,
        spawn: Callable[..., Any] = gevent.spawn,
    ):
        self.sock = sock
        self.peer = peer
        self.header_len = header_len
        # A parser may be handed over with bytes already buffered (the client's handshake).
        self.parser = parser if parser is not None else FrameParser(header_len, max_body_len)
        self.max_queue_bytes = max_queue_bytes
        self.on_overflow = on_overflow
        # Frames not yet (wholly) written, the first from _offset on; _out_bytes in all
        # (a list of none or one, or a deque: see the note on queues above _WriteBatch).
        self._out: Union[List[Any], Deque[Any]] = []
        self._offset = 0
        self._out_bytes = 0
        self._writer: Optional[gevent.Greenlet] = None
        self._flush_pending = False
        # True while the kernel's buffer is full and the writer greenlet waits for room;
        # only then do the queued frames count against the budget.
        self._backlogged = False
        # The write batch of the thread (hub) that owns this connection: it is made there.
        self._batch = _write_batch()
        # gevent sockets keep a non-blocking stdlib socket in ``_sock``: the no-wait path.
        self._raw = getattr(sock, "_sock", sock)
        self.closed = False
        #: Why the connection was overflowed ("queue" or "total"), or None.
        self.overflowed: Optional[str] = None
        self.tls = tls
        #: time.monotonic() of the last bytes received (for idle checks).
        self.last_received = time.monotonic()
        #: Why the connection failed, when it did not end cleanly (a reset, a failed write).
        self.error: Optional[str] = None
        #: Counts frames queued and bytes moved; a server shares one among its connections.
        self.traffic = traffic if traffic is not None else Traffic()
        self.budget = budget
        self.frame_timeout = frame_timeout
        self._spawn = spawn

    # ------------------------------------------------------------------ reading

    def bodies(self) -> Iterator[bytes]:
        """Yield each body the peer sends, in order, until it closes the connection.

        Every :data:`FRAMES_PER_TURN` bodies it lets the hub run the other greenlets,
        unless the hub already did meanwhile (see :func:`end_turn`).

        :raises RemoteProtocolError: the peer sent a bad header (the caller closes us).
        :raises FrameTimeout: a frame took longer than :attr:`frame_timeout` to arrive.
        :raises ConnectionTruncated: never; a close in the middle of a frame just ends the
            iteration, and :attr:`FrameParser.mid_frame` tells the caller it happened.
        """
        recv = self.sock.recv
        parser = self.parser
        feed = parser.feed
        tls = self.tls
        traffic = self.traffic
        monotonic = time.monotonic
        turn = FRAMES_PER_TURN
        loop = gevent.get_hub().loop
        turn_began = loop_pass(loop)
        frame_deadline: Optional[float] = None
        # Bytes that arrived before we took the socket over may already hold whole frames.
        data = b""
        while True:
            if tls is not None:
                data, reply = tls.receive(data)
                if reply:
                    self._queue(reply)
            bodies: Sequence[bytes] = feed(data)
            # Nothing read is kept while the next bytes are awaited: an idle peer would
            # otherwise hold its last chunk (up to RECV_CHUNK) and last bodies resident.
            data = b""
            if bodies:
                frame_deadline = None
                count = len(bodies)
                if count < turn:
                    turn -= count
                    yield from bodies
                else:
                    for body in bodies:
                        yield body
                        turn -= 1
                        if turn <= 0:
                            # Everyone else's turn: a peer that floods waits like the rest.
                            turn = FRAMES_PER_TURN
                            turn_began = end_turn(loop, turn_began)
                    body = b""
                bodies = ()  # the last read's bodies are let go at once
                if parser.failed:
                    feed(b"")  # raises the error found behind those bodies (with none, feed raised)
            if tls is not None and tls.closed_by_peer:
                return
            if parser.mid_frame and self.frame_timeout is not None:
                now = monotonic()
                if frame_deadline is None:
                    frame_deadline = now + self.frame_timeout
                elif now >= frame_deadline:
                    raise self._frame_timeout()
            try:
                if frame_deadline is None:
                    data = recv(RECV_CHUNK)
                else:
                    with gevent.Timeout(frame_deadline - monotonic(), self._frame_timeout()):
                        data = recv(RECV_CHUNK)
            except Interrupted:
                yield None  # type: ignore[misc]  # the waiting iterator gave up; nothing is lost
                data = b""
                continue
            except OSError as exc:
                if not self.closed and self.error is None:
                    self.error = f"connection error: {exc}"
                return
            if not data:
                return
            traffic.bytes_in += len(data)
            self.last_received = monotonic()

    def _frame_timeout(self) -> FrameTimeout:
        return FrameTimeout(
            f"a frame took longer than {self.frame_timeout:g} s to arrive "
            f"({self.parser.buffered} bytes of it received)"
        )

    # ------------------------------------------------------------------ writing

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted by :meth:`send` that the kernel has not taken yet."""
        return self._out_bytes

    def send(self, data: bytes) -> None:
        """Queue one or more whole frames; never blocks, never drops anyone synchronously.

        Ignored once closed or overflowed.  Everything queued during one pass of the event
        loop leaves in one write at the end of that pass (see :meth:`_flush_queued`); what
        the kernel does not take then is written by a writer greenlet that waits for room.
        """
        if self.closed or self.error is not None:
            return
        self.traffic.messages_out += 1
        if self.tls is not None:
            data = self.tls.encrypt(data)
        # _queue(), inlined for the common case, a frame to a peer with nothing queued (a
        # broadcast calls this once per client); tests/test_connection_queue.py sends
        # through both.
        if not self._backlogged:
            queued = self._out_bytes + len(data)
            if queued <= self.max_queue_bytes:
                out = self._out
                if not out or type(out) is deque:
                    out.append(data)
                else:
                    self._out = deque((out[0], data))
                self._out_bytes = queued
                if not self._flush_pending:
                    self._flush_pending = True
                    self._batch.add(self)
                return
        self._queue(data)

    def send_raw(self, data: bytes) -> None:
        """Queue bytes that are already what goes on the wire (encrypted, with TLS): what
        was written to the socket before this connection took it over."""
        if not (self.closed or self.error is not None):
            self._queue(data)

    def _enqueue(self, data: bytes) -> int:
        """Put ``data`` at the end of the queue (nothing else); the bytes now queued."""
        out = self._out
        if not out or type(out) is deque:
            out.append(data)
        else:
            self._out = deque((out[0], data))  # a second frame waits: now a real queue
        self._out_bytes += len(data)
        return self._out_bytes

    def _queue(self, data: bytes) -> None:
        queued = self._enqueue(data)
        if self._backlogged:
            # The peer is already behind: this is where an unread backlog grows.
            if self.budget is not None:
                self.budget.hold(data)
            if queued > self.max_queue_bytes:
                self._check_backlog()
        elif queued > self.max_queue_bytes:
            # Give the kernel what it takes now; what it leaves is the unread backlog.
            self._flush_queued()
            self._check_backlog()
        elif not self._flush_pending:
            self._flush_pending = True
            self._batch.add(self)

    def _flush_queued(self) -> None:
        """Write what is queued without waiting; a writer greenlet takes over what is left."""
        self._flush_pending = False
        out = self._out
        if self._backlogged or not out or self.closed or self.error is not None:
            return
        try:
            count = len(out)
            if not self._offset and (count == 1 or self._out_bytes <= _JOIN_LIMIT):
                # Whole frames wait, one (a reply, one client's share of a broadcast) or a
                # few small ones (the replies of one pass): the usual case, written in one
                # piece and forgotten here without _write_some/_consume.
                sent = self._raw.send(out[0] if count == 1 else b"".join(out))
                if sent == self._out_bytes:
                    self.traffic.bytes_out += sent
                    self._out_bytes = 0
                    out.clear()  # kept for the next frames (see _consume)
                    return
                self._consume(sent)
            else:
                self._write_some(self._raw)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._abort(f"write failed: {exc}")
            return
        if self._out:
            # The kernel's buffer is full: a greenlet waits for room and writes the rest.
            self._backlogged = True
            if self.budget is not None:
                self.budget.enter(self, self._out)
            self._writer = gevent.spawn(self._drain)
            self._check_backlog()

    def _write_some(self, sock: Any) -> int:
        """One write of the queue's head to ``sock``; what was written leaves the queue.

        The frames themselves are handed to the kernel (a partial write keeps an offset
        into the first), except that up to :data:`_JOIN_LIMIT` bytes of several frames
        are joined first: one small copy is cheaper than a vector of small buffers.
        """
        out = self._out
        head = out[0]
        if self._offset:
            head = memoryview(head)[self._offset :]
        if len(out) == 1:
            sent = sock.send(head)
        elif self._out_bytes <= _JOIN_LIMIT:
            parts = list(out)
            parts[0] = head
            sent = sock.send(b"".join(parts))
        else:
            vector = [head]
            vector.extend(islice(out, 1, _MAX_VECTORS))
            sent = sock.sendmsg(vector)
        self._consume(sent)
        return sent

    def _consume(self, sent: int) -> None:
        """Forget the first ``sent`` queued bytes (the kernel has them)."""
        self.traffic.bytes_out += sent
        self._out_bytes -= sent
        out = self._out
        if not self._out_bytes and not self._backlogged:
            # The kernel took everything (the usual case): nothing to count frame by frame.
            # The queue is kept for the next frames, a deque too once a burst needed one
            # (making one per burst cost more than it saves); a connection sent one frame
            # at a time never has one.
            out.clear()
            self._offset = 0
            return
        offset = self._offset + sent
        budget = self.budget if self._backlogged else None
        if type(out) is list:
            if out and offset >= len(out[0]):
                offset -= len(out[0])
                done = out.pop()
                if budget is not None:
                    budget.release(done)
            self._offset = offset
            return
        assert isinstance(out, deque)
        while out:
            size = len(out[0])
            if offset < size:
                break
            offset -= size
            done = out.popleft()
            if budget is not None:
                budget.release(done)
        self._offset = offset
        if not out:
            self._out = []  # a drained backlog gives its deque back

    def _check_backlog(self) -> None:
        """Overflow the connection when more than ``max_queue_bytes`` wait unread.

        One frame larger than the limit is accepted into an otherwise empty queue.
        """
        if self._out_bytes > self.max_queue_bytes and len(self._out) > 1:
            self.overflow("queue")

    def overflow(self, why: str) -> None:
        """Give up on this peer: free its queue now, accept nothing more, and have the
        owner drop it (``on_overflow``) in a greenlet of its own, outside the caller's stack.

        :param why: ``"queue"`` (its own limit) or ``"total"`` (the server's budget).
        """
        if self.overflowed is not None or self.closed:
            return
        self.overflowed = why
        held = self._out_bytes
        if self.error is None:
            self.error = (
                f"{held} bytes queued and not read (max_queue_bytes={self.max_queue_bytes})"
                if why == "queue"
                else f"one of the largest backlogs ({held} bytes) while the server's unsent bytes passed its limit"
            )
        self._discard_queue()
        if self.on_overflow is not None:
            self._spawn(self.on_overflow, self)

    def _discard_queue(self) -> None:
        if self._backlogged:
            self._backlogged = False
            if self.budget is not None:
                self.budget.leave(self, self._out)
        self._out = []
        self._offset = 0
        self._out_bytes = 0

    def _drain(self) -> None:
        try:
            while self._out and not self.closed and self.error is None:
                self._write_some(self.sock)  # waits for room cooperatively
        except OSError as exc:
            self._abort(f"write failed: {exc}")
        finally:
            self._writer = None
            if self._backlogged and not self._out:
                self._backlogged = False
                if self.budget is not None:
                    self.budget.leave(self, ())

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
        self._discard_queue()

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
        self._discard_queue()
        try:
            self.sock.shutdown(gsocket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
