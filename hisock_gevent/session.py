"""One connection's life on a server: the door, TLS, the hello, join, its messages, the drop.

:class:`ServerSession` is what the server's StreamServer runs in a greenlet for each
accepted socket.  It is given only what it needs, in a :class:`SessionContext` the server
makes once: the configuration, who is joined (registry, delivery, membership), who may
come in (admission), the handlers and how to call them, and the counters.  Whatever ends
the connection (a goodbye, a reset, bad input, a bug of ours) goes through one logged path
that drops the client once.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent

from . import stats, typecast
from .admission import Admission
from .budget import SendBudget
from .config import ServerConfig
from .connection import Connection, Interrupted, set_nodelay, yield_to_loop
from .errors import (
    CallError,
    CallTimeout,
    ClientDisconnected,
    ClientNotFound,
    ContentTooLarge,
    HandshakeError,
    InvalidName,
    RemoteProtocolError,
    TLSError,
)
from .frames import FrameParser, frame
from .handlers import HandlerRunner, HandlerTable
from .membership import DEFAULT_CLOSE_TIMEOUT, Membership, ServerPeer
from .messages import (
    COMMAND_TAG,
    GETCLT_COMMAND,
    NO_SUCH_CLIENT,
    Call,
    CallFailed,
    ChangeGroup,
    ChangeName,
    ClientMessage,
    Command,
    Disconnect,
    GetClient,
    Hello,
    KeepAck,
    Reply,
    UserClose,
    name_problem,
    parse_client_body,
    parse_command,
)
from .outgoing import OutgoingCommand
from .protocol import Refusal, ServerHandshake
from .registry import ClientRegistry, Delivery
from .stats import ServerStats, rejection_reason
from .tls import TLSLayer, perform_handshake
from .utils import ClientInfo, MessageCacheMember, remember

__all__ = ["ServerSession", "SessionContext"]

logger = logging.getLogger("hisock_gevent")


class SessionContext:
    """What all the sessions of one server share; the server makes one."""

    __slots__ = (
        "config",
        "registry",
        "delivery",
        "membership",
        "admission",
        "handlers",
        "runner",
        "stats",
        "budget",
        "cache",
        "callback",
    )

    def __init__(
        self,
        config: ServerConfig,
        registry: ClientRegistry,
        delivery: Delivery,
        membership: Membership,
        admission: Admission,
        handlers: HandlerTable,
        runner: HandlerRunner,
        stats: ServerStats,
        budget: SendBudget,
        cache: List[MessageCacheMember],
    ):
        self.config = config
        self.registry = registry
        self.delivery = delivery
        self.membership = membership
        self.admission = admission
        self.handlers = handlers
        self.runner = runner
        self.stats = stats
        self.budget = budget
        #: HiSock's ``server.cache`` (kept when ``cache_size`` >= 0).
        self.cache = cache
        #: ``start(callback=...)``, as a handler entry, or None.
        self.callback: Optional[Dict[str, Any]] = None


class ServerSession:
    """One accepted connection, from the door to the drop (call :meth:`run`)."""

    __slots__ = ("context", "sock", "address", "conn", "peer", "greenlet", "_bodies", "_ending", "_failure")

    #: Whether the connection itself speaks TLS when the server has a certificate (a
    #: WebSocket's transport belongs to the HTTP server that upgraded it).
    serves_tls = True

    def __init__(self, context: SessionContext, sock: Any, address: Tuple[str, int]):
        self.context = context
        self.sock = sock
        self.address = (address[0], address[1])
        self.conn: Optional[Connection] = None
        self.peer: Optional[ServerPeer] = None
        #: The greenlet that reads this connection (and runs its inline handlers).
        self.greenlet: Any = None
        self._bodies: Any = None
        # Set when something read by wait_reply() ends the connection: the goodbye, or
        # the protocol error to raise once the handler that waited has returned.
        self._ending = False
        self._failure: Optional[RemoteProtocolError] = None

    # ------------------------------------------------------------------ the life

    def run(self, connections: Any) -> None:
        """Serve the connection until it ends; ``connections`` is the server's set of open ones."""
        context = self.context
        admission = context.admission
        address = self.address
        refusal = admission.refusal_at_door(address[0])
        if refusal is not None:
            self._turn_away(refusal)
            return
        conn = self._open()
        connections.add(conn)
        admission.came_in(conn, address[0])
        context.stats.connection_opened(len(connections))
        end_reason = stats.LEFT
        try:
            end_reason = self._serve(conn)
        except RemoteProtocolError as exc:
            logger.warning("closing %s:%s: %s", address[0], address[1], exc)
            context.stats.rejected[rejection_reason(exc)] += 1
            end_reason = stats.PROTOCOL_ERROR
            peer = self.peer
            if peer is not None and peer.msgpack_ok and not peer.gone:
                # A hisock_gevent client is told why before the connection closes.
                conn.send_now(frame(Disconnect({"reason": str(exc)}).to_body(), context.config.header_len))
        except Exception:
            # A bug of ours (or a failing hook): this connection ends, logged, like a
            # protocol error; the others and the serving loop carry on.
            logger.exception("closing %s:%s: unexpected error while serving it", address[0], address[1])
            context.stats.rejected["internal_error"] += 1
            end_reason = stats.PROTOCOL_ERROR
        finally:
            connections.discard(conn)
            admission.went(conn, address[0])
            if self.peer is not None:
                context.membership.drop(self.peer, call_leave=True, notify=True, reason=end_reason)
            conn.close()

    def _open(self) -> Connection:
        config = self.context.config
        set_nodelay(self.sock)
        return Connection(
            self.sock, self.address, config.header_len,
            max_queue_bytes=config.max_queue_bytes,
            on_overflow=Connection.close,  # before it joins; Membership.join replaces it
            parser=FrameParser(config.header_len, config.max_message_size, first_body_limit=config.max_hello_size),
            traffic=self.context.stats.traffic,
            budget=self.context.budget,
            frame_timeout=config.frame_timeout,
            spawn=self.context.runner.greenlets.spawn,
        )

    def _serve(self, conn: Connection) -> str:
        """Handshake, join and messages; returns why the client went (the stats reason)."""
        self.conn = conn
        self.greenlet = gevent.getcurrent()
        context = self.context
        if self.serves_tls and context.config.ssl_context is not None:
            conn.tls = self._tls_handshake()
            if conn.tls is None:
                return stats.LEFT
        bodies = self._bodies = conn.bodies()
        hello = self._read_hello(bodies)
        context.admission.said_hello(conn)
        if hello is None or not self._admit(hello):
            return stats.LEFT
        peer = self.peer = context.membership.join(conn, hello)
        # What was read is let go before the next message is awaited (the hello, with any
        # credentials, and each message after it): an idle client keeps nothing resident.
        del hello
        peer.session = self
        if self._after_handlers():
            return stats.LEFT
        traffic = context.stats.traffic
        dispatch = _DISPATCH
        on_command = self._on_command
        for body in bodies:
            traffic.messages_in += 1
            if peer.gone:
                break
            message: ClientMessage
            if body.startswith(COMMAND_TAG):
                # parse_client_body() and the dispatch table, short-cut for most messages.
                message = parse_command(body)
                del body
                if on_command(message):
                    break
            else:
                message = parse_client_body(body)
                del body
                if dispatch[type(message)](self, message):
                    break
            del message
        else:
            # (A client dropped meanwhile, as a slow reader say, was logged already.)
            if not peer.gone and _log_unclean_end(conn):
                return stats.CONNECTION_LOST
        return stats.LEFT

    def _turn_away(self, refusal: Refusal) -> None:
        """Send a new connection ``$DISCONN$`` and close it, without reading anything."""
        if refusal.reason == stats.SERVER_CLOSED:
            self.sock.close()
            return
        counters = self.context.stats
        counters.accepted += 1
        counters.refused[refusal.reason] += 1
        logger.warning("refusing %s:%s: %s", self.address[0], self.address[1], refusal.text)
        header_len = self.context.config.header_len
        conn = Connection(self.sock, self.address, header_len)
        conn.send_now(frame(Disconnect().to_body(), header_len))
        conn.close()

    def _tls_handshake(self) -> Optional[TLSLayer]:
        """The TLS session of the connection, or None when the peer went away during it
        (logged in one line: a reset mid-handshake is a client's business, not a traceback)."""
        config = self.context.config
        assert config.ssl_context is not None
        layer = TLSLayer(config.ssl_context, server_side=True)
        sock = self.sock
        try:
            with gevent.Timeout(config.handshake_timeout, TLSError(f"no TLS handshake within {config.handshake_timeout} s")):
                perform_handshake(layer, sock.recv, sock.sendall)
        except OSError as exc:
            logger.warning(
                "closing %s:%s: the connection failed during the TLS handshake: %s", self.address[0], self.address[1], exc
            )
            self.context.stats.rejected["tls_error"] += 1
            return None
        return layer

    def _read_hello(self, bodies: Any) -> Optional[Hello]:
        """The hello, or None when none came in time (logged) or the peer just closed."""
        conn = self.conn
        assert conn is not None
        config = self.context.config
        body = None
        with gevent.Timeout(config.handshake_timeout, False):
            body = next(bodies, None)
            if body is None:
                if not _log_unclean_end(conn):
                    # Opened and closed without a word: a port probe or health check.
                    logger.debug("%s:%s closed before its hello", *conn.peer)
                return None
        if body is None:
            logger.warning("closing %s:%s: no hello within %.1f s", conn.peer[0], conn.peer[1], config.handshake_timeout)
            self.context.stats.refused[stats.NO_HELLO] += 1
            return None
        self.context.stats.traffic.messages_in += 1
        return self.context.admission.handshake.receive_hello(body)

    def _admit(self, hello: Hello) -> bool:
        """Check a hello; a refused client is told ``$DISCONN$``, with the reason when it
        is a hisock_gevent client."""
        conn = self.conn
        assert conn is not None
        refusal = self.context.admission.refusal_of(hello, conn.peer)
        if refusal is None:
            return True
        # The client as it asked to be known, unless its name itself is the problem.
        who: Any = f"{conn.peer[0]}:{conn.peer[1]}"
        if refusal.reason != stats.INVALID_NAME:
            who = ClientInfo(conn.peer, hello.name, hello.group)
        logger.warning("refusing %s: %s", who, refusal.text)
        self.context.stats.refused[refusal.reason] += 1
        details = {"reason": refusal.text} if ServerHandshake.tells_reasons(hello) else None
        conn.send(frame(Disconnect(details).to_body(), self.context.config.header_len))
        conn.close(DEFAULT_CLOSE_TIMEOUT)
        return False

    # ------------------------------------------------------------------ messages

    def _on_command(self, message: Command) -> bool:
        context = self.context
        peer = self.peer
        assert peer is not None
        command = message.command
        info = peer.info
        handlers = context.handlers
        entry = handlers.commands.get(command)
        events = handlers.events
        catch_all = None if entry is not None else events.get("*")
        on_message = events.get("message")
        config = context.config
        # Decoded even when nobody handles it (a malformed payload closes the connection
        # whatever the command); a long payload is decoded in slices with a turn of the
        # loop between them, so it costs its sender time, not everyone else.
        content = typecast.decode_positional(message.fmt, message.payload, config.max_nesting, config.max_items, yield_to_loop)
        runner = context.runner
        if config.cache_size >= 0:
            # Cached before the handlers run, so a reply can never overtake the cache entry.
            called = entry is not None or catch_all is not None
            member = MessageCacheMember(header=len(message.to_body()), content=content, called=called, command=command)
            remember(context.cache, config.cache_size, member)
        if entry is not None:
            if entry["threaded"]:
                runner.call(entry, (info, content), ("", command, info))
            else:
                # HandlerRunner.call, inlined for the common inline handler.
                try:
                    if entry["num_args"] == 2:
                        entry["func"](info, content)  # (client, content): the usual handler
                    else:
                        entry["func"](*(info, content)[: entry["num_args"]])
                except gevent.GreenletExit:
                    raise
                except Exception as exc:  # a user handler failed: report, keep serving
                    runner.report(exc, ("", command, info))
        elif catch_all is not None:
            runner.call(catch_all, (info, command, content), ("*", command, info))
        if on_message is not None:
            args = (info, command, content) if on_message["num_args"] == 3 else (info, content)
            runner.call(on_message, args, ("message", command, info))
        if context.callback is not None:
            runner.call(context.callback, (), ("callback", None, None))
        if self._ending or self._failure is not None:  # _after_handlers(), inlined
            return self._after_handlers()
        return False

    def _after_handlers(self) -> bool:
        """After inline handlers ran: True when one of them, waiting in :meth:`wait_reply`,
        read the end of the connection (or raise the protocol error it read)."""
        if self._failure is not None:
            raise self._failure
        return self._ending

    def wait_reply(self, result: Any, timeout: float) -> Any:
        """Wait for the answer to a call made to this session's own client from a handler
        running in this session's reader: only this reader can bring the answer in, so it
        reads (and handles, in order) what arrives until the answer is there.

        :raises CallTimeout: no answer within ``timeout``.
        :raises ClientDisconnected: the connection ended first.
        """
        deadline = time.monotonic() + timeout
        bodies = self._bodies
        traffic = self.context.stats.traffic
        while not result.ready():
            if self._ending or self._failure is not None:
                raise ClientDisconnected("the connection ended before the call was answered")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeout(f"no answer within {timeout} s")
            try:
                with gevent.Timeout(remaining, Interrupted()):
                    body = next(bodies, _END)
            except RemoteProtocolError as exc:
                self._failure = exc
                continue
            if body is _END:
                # The connection ended; the reader's own loop finds that out next.
                raise ClientDisconnected("the connection ended before the call was answered")
            if not isinstance(body, bytes):
                continue  # None: the wait timed out (checked above)
            traffic.messages_in += 1
            try:
                message = parse_client_body(body)
                if _DISPATCH[type(message)](self, message):
                    self._ending = True
            except RemoteProtocolError as exc:
                self._failure = exc
        return result.get()

    def _on_user_close(self, message: UserClose) -> bool:
        return True

    def _on_change_name(self, message: ChangeName) -> bool:
        peer = self.peer
        assert peer is not None
        self._check_name(message.name, "name")
        new_name = message.name or peer.connect_name
        self._change(ClientInfo(peer.info.ip, new_name, peer.info.group), "name_change", peer.info.name, new_name)
        return self._after_handlers()

    def _on_change_group(self, message: ChangeGroup) -> bool:
        peer = self.peer
        assert peer is not None
        self._check_name(message.group, "group")
        new_group = message.group or peer.connect_group
        self._change(ClientInfo(peer.info.ip, peer.info.name, new_group), "group_change", peer.info.group, new_group)
        return self._after_handlers()

    def _check_name(self, value: Optional[str], what: str) -> None:
        problem = name_problem(value, what, self.context.config.max_name_length)
        if problem is not None:
            raise InvalidName(problem)

    def _change(self, new_info: ClientInfo, event: str, old_value: Optional[str], new_value: Optional[str]) -> None:
        peer = self.peer
        assert peer is not None
        context = self.context
        old = context.registry.update(peer, new_info)
        context.delivery.changed(peer, old)
        entry = context.handlers.reserved_handler(event)
        if entry is not None:
            context.runner.call(entry, (peer.info, old_value, new_value), (event, None, peer.info))

    def _on_keep_ack(self, message: KeepAck) -> bool:
        peer = self.peer
        assert peer is not None
        peer.last_ack = time.monotonic()
        return False

    def _on_get_client(self, message: GetClient) -> bool:
        peer = self.peer
        assert peer is not None
        header_len = self.context.config.header_len
        answer: Dict[str, Any]
        try:
            info = self.context.delivery.find_client(message.query)
        except (ValueError, ClientNotFound):
            answer = {"traceback": NO_SUCH_CLIENT}
        else:
            answer = {"ip": [info.ip[0], info.ip[1]], "name": info.name, "group": info.group}
        if not peer.msgpack_ok:
            # The native letters cannot carry None: a plain peer gets only the keys that are set.
            answer = {key: value for key, value in answer.items() if value is not None}
        try:
            reply = OutgoingCommand(GETCLT_COMMAND, answer, header_len, reserved_ok=True).frame_for(peer.msgpack_ok)
        except ValueError as exc:
            logger.warning("answering $GETCLT$ from %s with $NOEXIST$: %s", peer.info, exc)
            missing = OutgoingCommand(GETCLT_COMMAND, {"traceback": NO_SUCH_CLIENT}, header_len, reserved_ok=True)
            reply = missing.frame_for(peer.msgpack_ok)
        peer.send(reply)
        return False

    def _on_second_hello(self, message: Hello) -> bool:
        raise HandshakeError("a second hello")

    # ------------------------------------------------------------------ the call extension

    def _on_call(self, message: Call) -> bool:
        """The client calls one of our handlers: it runs apart from this reader, and its
        return value (or exception) goes back as ``$REPLY$`` (or ``$CALLERR$``)."""
        peer = self.peer
        assert peer is not None
        context = self.context
        config = context.config
        command = message.command
        content = typecast.decode(
            command.fmt, command.payload, max_depth=config.max_nesting, max_items=config.max_items, pause=yield_to_loop
        )
        entry = context.handlers.command_handler(command.command)
        answer = functools.partial(self._answer_call, message.call_id)
        if entry is None:
            answer(False, CallError("FunctionNotFoundException", f"no handler for {command.command!r}"))
        else:
            context.runner.answer(entry, (peer.info, content), answer)
        return False

    def _answer_call(self, call_id: int, ok: bool, value: Any) -> None:
        peer = self.peer
        assert peer is not None
        if peer.gone:
            return
        config = self.context.config
        body: Optional[bytes] = None
        if ok:
            try:
                fmt, payload = typecast.encode(value, msgpack_ok=peer.msgpack_ok)
                body = Reply(call_id, fmt, payload).to_body()
                if len(body) > config.peer_max_message_size:
                    raise ContentTooLarge(f"the answer is {len(body)} bytes, more than {config.peer_max_message_size}")
            except Exception as exc:  # not Sendable, too large: the caller hears why
                ok, value = False, exc
        if not ok:
            kind = value.remote_type if isinstance(value, CallError) else type(value).__name__
            text = value.remote_message if isinstance(value, CallError) else str(value)
            body = CallFailed(call_id, kind, text[:1000]).to_body()
        assert body is not None
        peer.send(frame(body, config.header_len))

    def _on_reply(self, message: Reply) -> bool:
        peer = self.peer
        assert peer is not None
        result = peer.calls.take(message.call_id) if peer.calls else None
        if result is not None:
            config = self.context.config
            result.set(
                typecast.decode(
                    message.fmt, message.payload, max_depth=config.max_nesting, max_items=config.max_items, pause=yield_to_loop
                )
            )
        return False

    def _on_call_failed(self, message: CallFailed) -> bool:
        peer = self.peer
        assert peer is not None
        result = peer.calls.take(message.call_id) if peer.calls else None
        if result is not None:
            result.set_exception(CallError(message.kind, message.message))
        return False


_END = object()

#: Message type -> what a session does with it; True ends the connection (a goodbye).
_DISPATCH: Dict[type, Callable[[ServerSession, Any], bool]] = {
    Command: ServerSession._on_command,
    UserClose: ServerSession._on_user_close,
    ChangeName: ServerSession._on_change_name,
    ChangeGroup: ServerSession._on_change_group,
    KeepAck: ServerSession._on_keep_ack,
    GetClient: ServerSession._on_get_client,
    Hello: ServerSession._on_second_hello,
    Call: ServerSession._on_call,
    Reply: ServerSession._on_reply,
    CallFailed: ServerSession._on_call_failed,
}


def _log_unclean_end(conn: Connection) -> bool:
    """Log why a connection that just ended did not end cleanly; False if it did."""
    problems = []
    if conn.error is not None:
        problems.append(conn.error)
    if conn.parser.mid_frame:
        problems.append(f"closed in the middle of a frame ({conn.parser.buffered} bytes of it received)")
    if not problems:
        return False
    logger.warning("closing %s:%s: %s", conn.peer[0], conn.peer[1], "; ".join(problems))
    return True

