"""One WebSocket connection's life on a server: a :class:`~hisock_gevent.session.ServerSession`
over a :class:`~hisock_gevent.ws_connection.WebSocketConnection`.

Everything a TCP client goes through (the door, the hello and its limits, admission,
joining, handlers, dropping) is the inherited session's; what is added is how the
connection is made and which close code ends it (PROTOCOL.md section 10): 1000 after a
goodbye or ``$DISCONN$``, 1003 for a text message, 1009 for a message over the limit,
1002 for broken WebSocket frames, 1008 for every other rule (a bad hello, a refusal,
silence, a malformed body), 1011 for a bug of ours.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

from . import stats
from .connection import Connection, set_nodelay
from .errors import RemoteProtocolError
from .frames import frame
from .messages import Disconnect, Hello
from .protocol import Refusal
from .session import ServerSession, SessionContext
from .websocket import CLOSE_INTERNAL_ERROR, CLOSE_NORMAL, CLOSE_POLICY, close_code_for
from .ws_connection import WebSocketConnection

__all__ = ["WebSocketSession"]

logger = logging.getLogger("hisock_gevent")


class WebSocketSession(ServerSession):
    """A session whose client came in through a WebSocket upgrade.

    :param received: bytes the HTTP server read past the upgrade request (the start of
        the first messages), handed to the connection.
    """

    __slots__ = ("received",)

    serves_tls = False

    def __init__(self, context: SessionContext, sock: Any, address: Tuple[str, int], received: bytes = b""):
        super().__init__(context, sock, address)
        self.received = received

    def _connection(self, **options: Any) -> WebSocketConnection:
        config = self.context.config
        return WebSocketConnection(
            self.sock, self.address, config.header_len, config.max_message_size, config.max_hello_size, self.received,
            **options,
        )

    def _open(self) -> Connection:
        config = self.context.config
        set_nodelay(self.sock)
        return self._connection(
            max_queue_bytes=config.max_queue_bytes,
            on_overflow=Connection.close,  # before it joins; Membership.join replaces it
            traffic=self.context.stats.traffic,
            budget=self.context.budget,
            frame_timeout=config.frame_timeout,
            spawn=self.context.runner.greenlets.spawn,
        )

    def _serve(self, conn: Connection) -> str:
        assert isinstance(conn, WebSocketConnection)
        try:
            return super()._serve(conn)
        except RemoteProtocolError as exc:
            conn.close_code = close_code_for(exc)
            conn.close_reason = type(exc).__name__
            raise
        except Exception:
            conn.close_code = CLOSE_INTERNAL_ERROR
            raise

    def _read_hello(self, bodies: Any) -> Optional[Hello]:
        hello = super()._read_hello(bodies)
        conn = self.conn
        if hello is None and isinstance(conn, WebSocketConnection) and not conn.frames.closed_by_peer:
            conn.close_code = CLOSE_POLICY  # no hello in time
            conn.close_reason = "no hello in time"
        return hello

    def _admit(self, hello: Hello) -> bool:
        conn = self.conn
        assert isinstance(conn, WebSocketConnection)
        conn.close_code = CLOSE_POLICY  # a refusal closes with it, after $DISCONN$
        conn.close_reason = "refused"
        admitted = super()._admit(hello)
        if admitted:
            conn.close_code = CLOSE_NORMAL
            conn.close_reason = ""
        return admitted

    def _turn_away(self, refusal: Refusal) -> None:
        """``$DISCONN$`` in a binary message and a 1008 close, before reading anything."""
        if refusal.reason == stats.SERVER_CLOSED:
            self.sock.close()
            return
        counters = self.context.stats
        counters.accepted += 1
        counters.refused[refusal.reason] += 1
        logger.warning("refusing %s:%s (WebSocket): %s", self.address[0], self.address[1], refusal.text)
        conn = self._connection()
        conn.close_code = CLOSE_POLICY
        conn.close_reason = "refused"
        conn.send_now(frame(Disconnect().to_body(), self.context.config.header_len))
        conn.close()
