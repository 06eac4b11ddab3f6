"""Who is joined to a server, and the two moments that change it.

A client *joins*: it enters the registry, everyone else hears ``$CLTCONN$``, it gets its
own answer and ``join`` runs.  A client *goes*: once, however many ways it went at the
same time (a reset, an overflow, a kick, a keepalive timeout): it leaves the registry,
the others hear ``$CLTDISCONN$`` when they are to, ``leave`` runs when asked, and its
connection closes, after ``$DISCONN$`` and its queue drained when asked.  Both happen in
greenlets where handlers may block cooperatively, never inside a hub callback or inside
the send that found a client over its limit.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Optional, Tuple

from gevent.pool import Group

from . import stats
from .calls import PendingCalls
from .connection import Connection
from .errors import ClientDisconnected, ClientNotFound, HandshakeError
from .frames import frame
from .messages import CAPABILITY_CALL, CAPABILITY_MSGPACK, Disconnect, Hello, PeerJoined, PeerLeft
from .protocol import CLOSING_REASON, KICKED_REASON
from .registry import ClientRegistry, Delivery
from .stats import ServerStats
from .utils import ClientInfo

__all__ = ["ServerPeer", "Membership", "DEFAULT_CLOSE_TIMEOUT"]

logger = logging.getLogger("hisock_gevent")

#: Seconds queued frames get to drain when a client is disconnected or the server closes.
DEFAULT_CLOSE_TIMEOUT = 2.0
#: The extensions a server accepts when a client offers them, in the order it lists them.
SERVER_CAPABILITIES = (CAPABILITY_MSGPACK, CAPABILITY_CALL)


class ServerPeer:
    """A joined client as the server sees it: its connection, info and dialect."""

    __slots__ = (
        "conn", "sock", "info", "connect_name", "connect_group", "msgpack_ok", "call_ok",
        "last_ack", "gone", "send", "calls", "session",
    )

    def __init__(self, conn: Connection, info: ClientInfo, caps: Tuple[str, ...] = ()):
        self.conn = conn
        self.sock = conn.sock
        self.info = info
        self.connect_name = info.name
        self.connect_group = info.group
        #: The extensions this client negotiated.
        self.msgpack_ok = CAPABILITY_MSGPACK in caps
        self.call_ok = CAPABILITY_CALL in caps
        self.last_ack = time.monotonic()
        self.gone = False
        #: Queue a frame to this client (the connection's own method: a hot path).
        self.send = conn.send
        #: Our calls to this client waiting for an answer (made on first use: most
        #: clients are never called, and a held client should cost little).
        self.calls: Optional[PendingCalls] = None
        #: The session serving this client (it reads for a call made from its own reader).
        self.session: Any = None

    def pending_calls(self) -> PendingCalls:
        """Our calls to this client that wait for an answer (made on first use)."""
        if self.calls is None:
            self.calls = PendingCalls()
        return self.calls

    def fail_calls(self, exc: BaseException) -> None:
        """The client went: every call waiting for it fails at once (none is left behind)."""
        if self.calls is not None:
            self.calls.fail_all(exc)


class Membership:
    """Joins and goes of one server's clients.

    :param call_reserved: runs a reserved handler (``join``, ``leave``) by event name.
    :param spawn: starts a greenlet the server ends when it closes.
    """

    def __init__(
        self,
        registry: ClientRegistry,
        delivery: Delivery,
        header_len: int,
        stats: ServerStats,
        call_reserved: Callable[..., None],
        spawn: Callable[..., Any],
        max_message_size: Optional[int] = None,
    ):
        #: The server's own limit, told to hisock_gevent clients in their answer.
        self.max_message_size = max_message_size
        self.registry = registry
        self.delivery = delivery
        self.header_len = header_len
        self.stats = stats
        self.call_reserved = call_reserved
        self.spawn = spawn
        #: Greenlets draining a disconnected client's queue before closing it.
        self.closers = Group()
        self._disconnect_frame = frame(Disconnect().to_body(), header_len)

    # ------------------------------------------------------------------ joining

    def join(self, conn: Connection, hello: Hello) -> ServerPeer:
        """Register the connection's client, announce it, answer it and run ``join``.

        :raises HandshakeError: its announcement does not fit the header width.
        """
        info = ClientInfo(conn.peer, hello.name, hello.group)
        offered = hello.capabilities
        accepted = tuple(cap for cap in SERVER_CAPABILITIES if cap in offered)
        peer = ServerPeer(conn, info, accepted)
        joined = info.as_dict()
        try:
            everyone_frame = frame(PeerJoined(joined).to_body(), self.header_len)
            # Only a peer that offered capabilities hears ours: a plain HiSock client never does.
            answer = dict(joined, caps=list(accepted))
            if self.max_message_size is not None:
                answer["max_message_size"] = self.max_message_size
            answer_frame = frame(PeerJoined(answer).to_body(), self.header_len) if "caps" in hello.extra else everyone_frame
        except ValueError as exc:
            raise HandshakeError(f"the client's announcement does not fit header_len {self.header_len}: {exc}") from exc
        conn.on_overflow = functools.partial(self.overflowed, peer)
        self.registry.add(peer)
        self.stats.joins += 1
        self.delivery.joined(peer, everyone_frame)
        peer.send(answer_frame)
        logger.debug("%s joined", info)
        self.call_reserved("join", info)
        return peer

    # ------------------------------------------------------------------ going

    def drop(self, peer: ServerPeer, call_leave: bool, notify: bool, reason: str) -> bool:
        """Forget a joined client (once); tell the others and run ``leave`` if asked.

        :param reason: why it goes, one of the names in :mod:`hisock_gevent.stats`.
        :returns: False when it was already gone.
        """
        if peer.gone:
            return False
        peer.gone = True
        peer.fail_calls(ClientDisconnected(f"{peer.info} left before answering"))
        if not self.registry.remove(peer):
            return False
        self.stats.dropped[reason] += 1
        left_frame = None
        if notify:
            try:
                left_frame = frame(PeerLeft(peer.info.as_dict()).to_body(), self.header_len)
            except ValueError as exc:
                logger.warning("not announcing that %s left: %s", peer.info, exc)
        self.delivery.left(peer, left_frame)
        logger.debug("%s left", peer.info)
        if call_leave:
            self.call_reserved("leave", peer.info)
        return True

    def close_peer(
        self, peer: ServerPeer, send_disconnect: bool, drain_timeout: float = DEFAULT_CLOSE_TIMEOUT, reason: Optional[str] = None
    ) -> None:
        """Close a client's connection, after ``$DISCONN$`` and its queue drain when asked.

        :param reason: told to a hisock_gevent client with the ``$DISCONN$`` (a plain
            HiSock client gets the bare tag).
        """
        conn = peer.conn
        if not send_disconnect:
            conn.close()
            return
        if reason is not None and peer.msgpack_ok:
            conn.send(frame(Disconnect({"reason": reason}).to_body(), self.header_len))
        else:
            conn.send(self._disconnect_frame)
        self.closers.spawn(conn.close, drain_timeout)

    def expel(self, peer: ServerPeer, reason: str) -> None:
        """Drop a client the server gave up on (with ``leave``), telling it ``$DISCONN$``."""
        if self.drop(peer, call_leave=True, notify=True, reason=reason):
            self.close_peer(peer, send_disconnect=True)

    def kick(self, peer: ServerPeer, force: bool, call_func: bool) -> None:
        """``disconnect_client``: the others hear of it; ``leave`` runs if asked."""
        self.drop(peer, call_leave=call_func, notify=True, reason=stats.KICKED)
        self.close_peer(peer, send_disconnect=not force, reason=KICKED_REASON)

    def kick_at(self, address: Tuple[str, int], force: bool, call_func: bool) -> None:
        """Another worker asked (through the backplane) to disconnect our client at ``address``."""
        try:
            peer = self.registry.find(address)
        except ClientNotFound:
            return  # it left meanwhile
        self.kick(peer, force, call_func)

    def everyone_out(self, force: bool, drain_timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Disconnect every client without announcing it or running ``leave``."""
        for peer in list(self.registry):
            self.drop(peer, call_leave=False, notify=False, reason=stats.SERVER_CLOSED)
            self.close_peer(peer, send_disconnect=not force, drain_timeout=drain_timeout, reason=CLOSING_REASON)

    def overflowed(self, peer: ServerPeer, conn: Connection) -> None:
        """A joined client was overflowed (by its own backlog or the server's budget).

        Runs in a greenlet of its own (the connection starts it), after the send that found
        it has returned.
        """
        logger.warning("dropping %s: %s", peer.info, conn.error)
        conn.close()
        reason = stats.SLOW_READER if conn.overflowed == "queue" else stats.MEMORY_LIMIT
        self.drop(peer, call_leave=True, notify=True, reason=reason)

    def remote_leave(self, info: ClientInfo) -> None:
        """``leave`` for a client another process held, which went without it saying so.

        Run in a greenlet of its own: the delivery may call this from anywhere on the hub,
        and a ``leave`` handler may block cooperatively.
        """
        logger.debug("%s left with its worker", info)
        self.spawn(self.call_reserved, "leave", info)
