"""One peer over WebSocket: a :class:`~hisock_gevent.connection.Connection` whose frames
travel as binary messages.

A session cannot tell it from a TCP connection: :meth:`WebSocketConnection.bodies` yields
the body of each binary message (with the same fairness turns and frame timeout), and
:meth:`WebSocketConnection.send` takes whole frames, header and all, as the server builds
them (several may be joined), and queues each body as one binary message.  Everything
else is inherited: the bounded queue, the per-loop write batch, the server's budget, the
overflow of a slow reader.

Encode once, write many holds here too: a broadcast hands every connection the same
frame object, and the pieces made from it (a WebSocket header and a view of the body,
never a copy) are made once and queued by all of them, so the budget counts them once.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, List, Optional, Tuple

import gevent

from .connection import FRAMES_PER_TURN, RECV_CHUNK, Connection, Interrupted, end_turn, loop_pass
from .websocket import CLOSE_NORMAL, CLOSE_POLICY, WebSocketFrames, binary_header

__all__ = ["WebSocketConnection", "message_pieces"]


class _LastPieces:
    """The pieces of the last frame object cut into messages: a broadcast cuts it once.

    One entry, read and written as one tuple (so threads serving other servers never see
    half of it); it holds the frame itself, so the identity test cannot be fooled by a
    reused id.
    """

    entry: Optional[Tuple[Any, List[Any]]] = None


#: Bodies up to this size are copied behind their message header (one queue entry, one
#: small copy); longer ones are queued as a view of the sender's frame, never copied.
_JOIN_BODY = 4096


def message_pieces(data: bytes, header_len: int) -> List[Any]:
    """What goes on a WebSocket for ``data``, whole frames of ``header_len``-wide headers:
    for each frame, a binary message header and its body (joined when small, else a view).

    :raises ValueError: ``data`` is not whole frames (a bug of the caller's).
    """
    entry = _LastPieces.entry
    if entry is not None and entry[0] is data:
        return entry[1]
    pieces: List[Any] = []
    pos, end = 0, len(data)
    while pos < end:
        start = pos + header_len
        length = int(data[pos:start])
        stop = start + length
        if stop > end:
            raise ValueError(f"not whole frames: a body of {length} bytes at {start} runs past {end}")
        if length <= _JOIN_BODY:
            pieces.append(binary_header(length) + data[start:stop])
        else:
            pieces.append(binary_header(length))
            pieces.append(memoryview(data)[start:stop])
        pos = stop
    _LastPieces.entry = (data, pieces)
    return pieces


class WebSocketConnection(Connection):
    """A :class:`Connection` over an upgraded WebSocket.

    :param max_message_size: the largest message body accepted.
    :param first_message_limit: the largest first body (the hello).
    :param received: bytes read from the socket after the HTTP request, before we took it.
    :param options: the rest of :class:`Connection`'s keywords.

    :ivar close_code: the code the close frame will carry (:data:`CLOSE_NORMAL` unless
        whoever ends the connection says otherwise).
    """

    __slots__ = ("frames", "close_code", "close_reason", "_received", "pinged_at")

    def __init__(
        self,
        sock: Any,
        peer: Tuple[str, int],
        header_len: int,
        max_message_size: int,
        first_message_limit: Optional[int] = None,
        received: bytes = b"",
        **options: Any,
    ):
        self.frames = WebSocketFrames(max_message_size, first_message_limit)
        super().__init__(sock, peer, header_len, parser=self.frames, **options)  # type: ignore[arg-type]
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""
        self._received = received
        #: time.monotonic() of the last ping the server sent, if any.
        self.pinged_at: Optional[float] = None

    # ------------------------------------------------------------------ reading

    def bodies(self) -> Iterator[bytes]:
        """Yield each binary message's body, in order, until the peer closes.

        Like :meth:`Connection.bodies`, it lets the hub run others every
        :data:`FRAMES_PER_TURN` bodies and gives a started message :attr:`frame_timeout`
        seconds to finish; pings are answered and the peer's close frame is answered and
        ends the iteration.

        :raises TextMessageRefused: a text message.  :raises MessageTooLarge: a message
            over the limit.  :raises WebSocketProtocolError: a broken WebSocket frame.
        :raises FrameTimeout: a message took longer than :attr:`frame_timeout`.
        """
        recv = self.sock.recv
        frames = self.frames
        receive = frames.receive
        traffic = self.traffic
        monotonic = time.monotonic
        turn = FRAMES_PER_TURN
        loop = gevent.get_hub().loop
        turn_began = loop_pass(loop)
        frame_deadline: Optional[float] = None
        data, self._received = self._received, b""
        while True:
            bodies = receive(data)
            reply = frames.data_to_send()
            if reply:
                self._queue(reply)
            if bodies:
                frame_deadline = None
                for body in bodies:
                    yield body
                    turn -= 1
                    if turn <= 0:
                        turn = FRAMES_PER_TURN
                        turn_began = end_turn(loop, turn_began)
            if frames.failed:
                receive(b"")  # raises the error found behind those bodies
            if frames.closed_by_peer:
                return
            if frames.mid_frame and self.frame_timeout is not None:
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

    # ------------------------------------------------------------------ writing

    def send(self, data: bytes) -> None:
        """Queue whole frames, each body as one binary message; never blocks."""
        if self.closed or self.error is not None:
            return
        self.traffic.messages_out += 1
        queue = self._queue
        for piece in message_pieces(data, self.header_len):
            queue(piece)

    def send_now(self, data: bytes) -> None:
        """Best-effort immediate write of whole frames as messages (never blocks)."""
        try:
            self._raw.send(b"".join(message_pieces(data, self.header_len)))
        except (OSError, ValueError):
            pass

    def ping(self) -> None:
        """Send a ping (the peer's pong, like anything it sends, updates :attr:`last_received`)."""
        self.pinged_at = time.monotonic()
        data = self.frames.ping()
        if data and not (self.closed or self.error is not None):
            self._queue(data)

    # ------------------------------------------------------------------ closing

    def overflow(self, why: str) -> None:
        if self.overflowed is None and not self.closed:
            self.close_code = CLOSE_POLICY
            self.close_reason = "too much left unread"
        super().overflow(why)

    def expire(self, reason: str) -> None:
        """Give up on a peer that did not answer a ping: the reader ends, logging ``reason``."""
        if self.error is None:
            self.error = reason
        self.close_code = CLOSE_POLICY
        self.close_reason = "no pong"
        self.close()

    def close(self, flush_timeout: float = 0.0) -> None:
        """Send the close frame (:attr:`close_code`) after what is queued, then close
        like :meth:`Connection.close`.  A peer that stopped reading gets it only if the
        kernel takes it at once."""
        if self.closed:
            return
        data = self.frames.close(self.close_code, self.close_reason)
        if self._backlogged or self.overflowed is not None or self.error is not None:
            if data:
                self._send_now_raw(data)
        else:
            # After the queued messages (and a pong or close answer still queued), written
            # now as far as the kernel takes them.
            if data:
                self._enqueue(data)
            if flush_timeout <= 0 and self._out:
                self._flush_queued()
        super().close(flush_timeout)

    def _send_now_raw(self, data: bytes) -> None:
        try:
            self._raw.send(data)
        except OSError:
            pass
