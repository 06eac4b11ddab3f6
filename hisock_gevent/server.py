"""HiSockServer: HiSock 3.0's documented server API on a gevent StreamServer.

Each accepted connection gets a greenlet that reads its frames, turns them into
messages and acts on them; a gevent Pool counts connections against ``max_connections``;
who receives what goes through the :class:`~hisock_gevent.registry.Delivery` seam; handlers
are registered and called through :mod:`hisock_gevent.handlers`.  Every public method may
be called from any thread: calls from outside the server's home thread are run there.
"""

from __future__ import annotations

import functools
import logging
import os
import socket as _stdlib_socket
import ssl
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, TypeVar, Union

import gevent
from gevent.event import Event
from gevent.pool import Group
from gevent.server import StreamServer

from . import stats as reasons
from . import typecast
from .budget import SendBudget, default_total_queue_bytes
from .connection import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_MAX_QUEUE_BYTES,
    Connection,
    set_nodelay,
    yield_to_loop,
)
from .errors import (
    ClientNotFound,
    HandshakeError,
    InvalidName,
    RemoteProtocolError,
    ServerClosed,
    TLSError,
)
from .frames import DEFAULT_HEADER_LEN, DEFAULT_MAX_MESSAGE_SIZE, FrameParser, frame
from .handlers import SERVER_RESERVED, SERVER_UNRESERVED_ARGS, HandlerRunner, HandlerTable
from .home import Home, _get_ident
from .messages import (
    CAPABILITY_MSGPACK,
    GETCLT_COMMAND,
    NO_SUCH_CLIENT,
    ChangeGroup,
    ChangeName,
    Command,
    Disconnect,
    GetClient,
    Hello,
    KeepAck,
    KeepAlive,
    PeerJoined,
    PeerLeft,
    UserClose,
    name_problem,
    parse_client_body,
)
from .outgoing import OutgoingCommand
from .registry import ClientRef, ClientRegistry, Delivery, GroupRef, LocalDelivery, ServerLink
from .stats import ServerStats, rejection_reason
from .tls import TLSLayer, perform_handshake, server_context
from .utils import ClientInfo, MessageCacheMember, Sendable

__all__ = [
    "HiSockServer",
    "ThreadedHiSockServer",
    "start_server",
    "start_threaded_server",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
]

logger = logging.getLogger("hisock_gevent")

#: Seconds between two keepalive rounds (HiSock: every minute).
DEFAULT_KEEPALIVE_INTERVAL = 60.0
#: Seconds a client has to answer a keepalive (HiSock: thirty seconds).
DEFAULT_KEEPALIVE_TIMEOUT = 30.0
#: Seconds a new connection has to send its hello.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds queued frames get to drain when a client is disconnected or the server closes.
DEFAULT_CLOSE_TIMEOUT = 2.0
#: Pending connections the kernel may hold for us.
DEFAULT_BACKLOG = 4096
#: The largest first frame (the hello) accepted from a connection we know nothing about.
DEFAULT_MAX_HELLO_SIZE = 64 * 1024
#: Connections accepted whose hello has not been accepted yet, at most (a limit apart
#: from ``max_connections``, so that silent sockets cannot lock real clients out).
DEFAULT_MAX_PENDING = 4096
#: The longest name or group, in characters.
DEFAULT_MAX_NAME_LENGTH = 256

_DISCONNECT_FRAME_BODY = Disconnect().to_body()
_F = TypeVar("_F", bound=Callable[..., Any])


def _on_home(method: _F) -> _F:
    """Run the method on the server's home thread, whichever thread calls it.

    Once the server is closed, a call from another thread (a handler still running on a
    worker thread) runs where it is made: lookups see an empty server, and the methods
    marked with :func:`_acts` raise :class:`ServerClosed`.
    """

    @functools.wraps(method)
    def wrapper(self: HiSockServer, *args: Any, **kwargs: Any) -> Any:
        home = self._home
        ident = home.ident
        if ident is None or ident == _get_ident() or not home.alive:
            return method(self, *args, **kwargs)
        if kwargs:
            return home.call(functools.partial(method, self, *args, **kwargs))
        return home.call(method, self, *args)

    return wrapper  # type: ignore[return-value]


def _acts(method: _F) -> _F:
    """A method that sends or disconnects: on a closed server it raises ServerClosed."""

    @functools.wraps(method)
    def wrapper(self: HiSockServer, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise ServerClosed(f"the server at {self.addr[0]}:{self.addr[1]} is closed")
        return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


#: Set to "1" by ``serve --workers`` in its workers' environment: every server a worker
#: makes (one made at import included) binds with SO_REUSEPORT, so all can share the port.
REUSE_PORT_ENV = "HISOCK_GEVENT_REUSE_PORT"


def _bind_listener(addr: Tuple[str, int], backlog: int, reuse_port: bool) -> _stdlib_socket.socket:
    """A plain listening socket: bound now (so errors and the real port show at once),
    served later by whichever thread runs start()."""
    reuse_port = reuse_port or os.environ.get(REUSE_PORT_ENV) == "1"
    if reuse_port and not hasattr(_stdlib_socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port=True needs SO_REUSEPORT, which this system does not have")
    listener = _stdlib_socket.socket(_stdlib_socket.AF_INET, _stdlib_socket.SOCK_STREAM)
    try:
        listener.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEPORT, 1)
        listener.bind(addr)
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener




class _ServerPeer:
    """A joined client as the server sees it: its connection, info and dialect."""

    __slots__ = ("conn", "sock", "info", "connect_name", "connect_group", "msgpack_ok", "last_ack", "gone", "send")

    def __init__(self, conn: Connection, info: ClientInfo, msgpack_ok: bool):
        self.conn = conn
        self.sock = conn.sock
        self.info = info
        self.connect_name = info.name
        self.connect_group = info.group
        self.msgpack_ok = msgpack_ok
        self.last_ack = time.monotonic()
        self.gone = False
        #: Queue a frame to this client (the connection's own method: a hot path).
        self.send = conn.send


class HiSockServer:
    """The server class for HiSock.

    :param addr: ``(ip, port)`` to serve at; port 0 picks a free port (see :meth:`get_addr`).
    :param max_connections: joined clients at once; 0 for no limit.  A connection made
        while the limit is reached, or whose hello arrives when it is, is sent
        ``$DISCONN$`` and closed; ``join`` does not run.  Connections still in their
        handshake do not count (see ``max_pending``).
    :param header_len: width of every frame header; clients must use the same.
    :param cache_size: -1 or below for no message cache, 0 for an unlimited one, N for the
        last N messages (:class:`~hisock_gevent.utils.MessageCacheMember` items in ``cache``).
    :param keepalive: send ``$KEEPALIVE$`` every ``keepalive_interval`` seconds and drop
        (running ``leave``) a client that has not answered within ``keepalive_timeout``.
    :param keepalive_interval: seconds between keepalive rounds (default 60).
    :param keepalive_timeout: seconds to answer one (default 30).
    :param handshake_timeout: seconds a new connection has to send its hello (default 10).
    :param max_message_size: the largest frame body accepted from a client; a header
        announcing more closes that connection before anything is read.
    :param max_queue_bytes: outbound bytes a client may leave unread before it is dropped
        (with ``leave``); default 16 MiB.  Checked as each frame is queued, after the
        kernel took what it would; one frame larger than the limit is still accepted into
        an empty queue.
    :param max_total_queue_bytes: outbound bytes held for all slow clients together
        (a broadcast frame that many hold counts once); when passed, the clients with the
        largest backlogs are dropped first.  Default: 1 GiB, or a quarter of the machine's
        memory if that is less.
    :param frame_timeout: seconds a frame that has started arriving has to finish (a
        client trickling or stalling in the middle of a frame is dropped); None for no
        limit.  Default 60.
    :param max_hello_size: the largest first frame (the hello) accepted from a new
        connection; default 64 KiB.
    :param max_pending: connections accepted whose hello is not yet accepted, at most;
        more are refused with ``$DISCONN$``.  Default 4096.
    :param max_connections_per_ip: open connections (joined or not) from one IP address,
        at most; 0 (default) for no limit.
    :param max_name_length: the longest name or group accepted, in characters (default
        256); a longer one, or one that is not valid text, is refused at the hello and at a
        name or group change.
    :param idle_timeout: drop (running ``leave``) a client that sends nothing for this many
        seconds; None (default) for never.  Keepalive answers count as traffic.
    :param max_nesting: deepest container nesting accepted in a received payload.
    :param max_items: most elements accepted in one received payload.
    :param ssl_context: serve TLS with this context (or give ``certfile``/``keyfile``).
    :param authenticate: ``check(client_info, credentials) -> bool`` run on each hello
        before ``join``; ``credentials`` is what the client passed as ``auth``.  A refused
        client is sent ``$DISCONN$`` and closed; nobody else hears of it.  It runs on the
        server's hub: in a program that is not monkey-patched, a check that blocks (a
        database call) stalls the other clients while it runs, so keep it quick.
    :param delivery: who-receives-what backend; defaults to this process's clients.
    :param backlog: pending connections the kernel may hold (``listen()``'s argument).
    :param reuse_port: set SO_REUSEPORT, so several processes serve the same port and the
        kernel spreads new connections among them (Linux, BSD; ValueError elsewhere).
        Also on when the environment has ``HISOCK_GEVENT_REUSE_PORT=1`` (``serve --workers``
        sets it for its workers).
    :param listener: serve on this socket, already bound and listening (one inherited from
        a supervisor that forked the workers); ``addr`` is then only informative.

    :ivar addr: the address actually served at.
    :ivar header_len: the header width.
    :ivar clients: socket -> ClientInfo of every joined client.
    :ivar clients_rev: ClientInfo -> socket, always in step with ``clients``.
    :ivar funcs: the handlers registered with :meth:`on`.
    :raises TypeError: if the address is not a tuple.
    """

    def __init__(
        self,
        addr: Tuple[str, int],
        max_connections: int = 0,
        header_len: int = DEFAULT_HEADER_LEN,
        cache_size: int = -1,
        keepalive: bool = False,
        *,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        idle_timeout: Optional[float] = None,
        max_nesting: int = typecast.DEFAULT_MAX_DEPTH,
        max_items: int = typecast.DEFAULT_MAX_ITEMS,
        ssl_context: Optional[ssl.SSLContext] = None,
        certfile: Optional[str] = None,
        keyfile: Optional[str] = None,
        authenticate: Optional[Callable[[ClientInfo, Any], bool]] = None,
        delivery: Optional[Delivery] = None,
        backlog: int = DEFAULT_BACKLOG,
        max_total_queue_bytes: Optional[int] = None,
        frame_timeout: Optional[float] = DEFAULT_FRAME_TIMEOUT,
        max_hello_size: int = DEFAULT_MAX_HELLO_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_connections_per_ip: int = 0,
        max_name_length: int = DEFAULT_MAX_NAME_LENGTH,
        reuse_port: bool = False,
        listener: Optional[_stdlib_socket.socket] = None,
        backplane: Union[str, Delivery, None] = None,
    ):
        if not isinstance(addr, tuple):
            raise TypeError(f"addr must be a tuple (ip, port), not {type(addr).__name__}")
        if len(addr) != 2:
            raise TypeError(f"addr must be a two-element tuple (ip, port), not {addr!r}")
        if not isinstance(header_len, int) or header_len < 1:
            raise ValueError("header_len must be a positive int")
        if max_connections < 0:
            raise ValueError("max_connections must be 0 (no limit) or positive")
        self.max_connections = max_connections
        self.header_len = header_len
        self.cache_size = cache_size
        self.cache: List[MessageCacheMember] = []
        self.keepalive = keepalive
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.handshake_timeout = handshake_timeout
        self.max_message_size = max_message_size
        self.max_queue_bytes = max_queue_bytes
        self.idle_timeout = idle_timeout
        self.max_nesting = max_nesting
        self.max_items = max_items
        for label, value in (
            ("max_hello_size", max_hello_size),
            ("max_pending", max_pending),
            ("max_name_length", max_name_length),
            ("max_queue_bytes", max_queue_bytes),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int")
        if max_connections_per_ip < 0:
            raise ValueError("max_connections_per_ip must be 0 (no limit) or positive")
        if frame_timeout is not None and frame_timeout <= 0:
            raise ValueError("frame_timeout must be positive, or None for no limit")
        self.frame_timeout = frame_timeout
        self.max_hello_size = max_hello_size
        self.max_pending = max_pending
        self.max_connections_per_ip = max_connections_per_ip
        self.max_name_length = max_name_length
        self.max_total_queue_bytes = max_total_queue_bytes if max_total_queue_bytes is not None else default_total_queue_bytes()
        self._budget = SendBudget(self.max_total_queue_bytes, self._budget_exceeded)
        if ssl_context is None and certfile is not None:
            ssl_context = server_context(certfile, keyfile)
        self.ssl_context = ssl_context
        self.authenticate = authenticate

        if listener is None:
            listener = _bind_listener(addr, backlog, reuse_port)
        else:
            listener.setblocking(False)
        self._listener = listener
        self.addr: Tuple[str, int] = listener.getsockname()[:2]

        self._registry: ClientRegistry[_ServerPeer] = ClientRegistry()
        self._delivery = self._make_delivery(delivery, backplane)
        #: The backplane joining this server to others (a Delivery), or None.
        self.backplane: Optional[Delivery] = self._delivery if backplane is not None else None
        self.reuse_port = reuse_port
        self._handlers = HandlerTable(SERVER_RESERVED, SERVER_UNRESERVED_ARGS)
        self.funcs = self._handlers.funcs
        self._home = Home()
        self._runner = HandlerRunner(self._home, "server")
        # start()'s callback, as a handler entry so it is called and guarded like one.
        self._callback: Optional[Dict[str, Any]] = None

        self._stream_server: Optional[StreamServer] = None
        # The greenlet of every open connection, joined or not.
        self._serving = Group()
        self._connections: Set[Connection] = set()
        # Connections whose hello is not accepted yet, oldest first; open connections per IP.
        self._pending: Dict[Connection, None] = {}
        self._per_ip: Counter[str] = Counter()
        self._stats = ServerStats()
        # serve_stats(): sockets waiting for start(), and the pywsgi servers close() stops.
        self._stats_listeners: List[_stdlib_socket.socket] = []
        self._stats_http: List[Any] = []
        # Greenlets draining a disconnected client's queue before closing it.
        self._closers = Group()
        # The keepalive loop and its pending expiry checks.
        self._timers = Group()
        self._stopped: Optional[Event] = None
        self._closed = False
        self._join_frame_cache: Dict[str, bytes] = {}
        self._dispatch: Dict[type, Callable[[_ServerPeer, Any], bool]] = {
            Command: self._on_command,
            UserClose: self._on_user_close,
            ChangeName: self._on_change_name,
            ChangeGroup: self._on_change_group,
            KeepAck: self._on_keep_ack,
            GetClient: self._on_get_client,
            Hello: self._on_second_hello,
        }

    def _make_delivery(self, delivery: Optional[Delivery], backplane: Union[str, Delivery, None]) -> Delivery:
        if backplane is None:
            return delivery if delivery is not None else LocalDelivery(self._registry)
        if delivery is not None:
            raise ValueError("give delivery or backplane, not both")
        if isinstance(backplane, str):
            from .backplane import RedisBackplane

            return RedisBackplane(backplane)
        if not isinstance(backplane, Delivery):
            raise TypeError(f"backplane must be a redis:// URL or a Delivery, not {type(backplane).__name__}")
        return backplane

    def __repr__(self) -> str:
        return f"<HiSockServer serving at {self.addr[0]}:{self.addr[1]}>"

    def __enter__(self) -> HiSockServer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    @property
    def clients(self) -> Dict[Any, ClientInfo]:
        return self._registry.clients

    @property
    def clients_rev(self) -> Dict[ClientInfo, Any]:
        return self._registry.clients_rev

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ handlers

    def on(self, command: str, threaded: bool = False, override: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function for ``command`` or a reserved event.

        Reserved events: ``join(client)``, ``leave(client)``, ``message(client, command,
        content)`` (or ``(client, content)``), ``name_change(client, old, new)``,
        ``group_change(client, old, new)`` and ``*`` ``(client, command, content)`` for
        commands without a handler.  Other handlers take (), (client) or (client, content).

        :param threaded: run the handler where blocking does not stall other clients: a
            greenlet in a monkey-patched program, a worker thread otherwise.
        :param override: treat a reserved name as an ordinary command.
        :raises TypeError: the function takes a wrong number of arguments.
        :raises ValueError: the command has the reserved ``$...$`` form.
        :returns: the function, unchanged.
        """

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            self._handlers.register(command, func, threaded, override)
            return func

        return decorator

    def _call_reserved(self, event: str, *args: Any) -> None:
        entry = self._handlers.reserved_handler(event)
        if entry is not None:
            self._runner.call(entry, args, (event, None, args[0] if args else None))

    # ------------------------------------------------------------------ running

    def start(self, callback: Optional[Callable[[], Any]] = None, error_handler: Optional[Callable[[BaseException], Any]] = None) -> None:
        """Serve until :meth:`close` is called (blocks the calling greenlet).

        :param callback: called after every message a client sends is handled.
        :param error_handler: called with each exception a handler raises; without one the
            exception is logged.  Either way the server keeps serving.
        """
        if self._closed:
            return
        self._begin_serving(callback, error_handler)
        assert self._stopped is not None
        self._stopped.wait()

    def _begin_serving(self, callback: Optional[Callable[[], Any]], error_handler: Optional[Callable[[BaseException], Any]]) -> None:
        self._callback = {"func": callback, "num_args": 0, "threaded": False} if callback else None
        self._runner.error_handler = error_handler
        if self._stream_server is not None:
            return
        self._home.adopt_current_thread()
        self._stopped = Event()
        self._delivery.start(ServerLink(self._registry, self.header_len, self._run_remote_leave, self._kick_for_delivery))
        self._stream_server = StreamServer(self._listener, self._serve_connection, spawn=self._serving.spawn)
        for listener in self._stats_listeners:
            self._start_stats_http(listener)
        self._stats_listeners.clear()
        self._stream_server.start()
        if self.keepalive:
            self._timers.spawn(self._keepalive_loop)
        if self.idle_timeout:
            self._timers.spawn(self._idle_sweep)
        logger.info("serving at %s:%s", *self.addr)

    @_on_home
    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Close the server gracefully; ALL clients are disconnected, then the socket closes.

        New connections are refused at once; each client's queued frames get up to
        ``timeout`` seconds to drain, followed by ``$DISCONN$``; then every socket is
        closed and every greenlet of the server (handlers started with ``threaded=True``
        in a monkey-patched program included) has ended.  Blocks until that is done,
        ``timeout`` plus about a second at most; calling it again does nothing.
        ``leave`` does not run for the clients it disconnects.

        A ``threaded=True`` handler still running on a worker thread (a program that is
        not monkey-patched) is not waited for: it runs to its end on its own, and a call
        it makes into the server from then on raises :class:`ServerClosed`.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        if self._stream_server is not None:
            self._stream_server.close()
        self._timers.kill(block=False)
        self._disconnect_everyone(force=False, drain_timeout=timeout)
        # Let each client's queue drain and its $DISCONN$ go out.
        self._closers.join(timeout=max(0.0, deadline - time.monotonic()))
        self._closers.kill(block=True, timeout=0.2)
        for conn in list(self._connections):
            conn.close()  # whatever is left: connections still in their handshake
        # close() may run inside a handler, i.e. in one of these greenlets: spare it.
        me = gevent.getcurrent()
        for group in (self._serving, self._runner.greenlets):
            others = [greenlet for greenlet in list(group) if greenlet is not me]
            gevent.killall(others, block=True, timeout=0.5)
        try:
            self._listener.close()
        except OSError:
            pass
        self._delivery.stop()
        for http in self._stats_http:
            http.stop(timeout=0.2)
        for listener in self._stats_listeners:
            listener.close()
        self._home.close()
        logger.info("server at %s:%s closed", *self.addr)
        if self._stopped is not None:
            self._stopped.set()

    # ------------------------------------------------------------------ connections

    def _serve_connection(self, sock: Any, address: Tuple[str, int]) -> None:
        """Greenlet per accepted connection: handshake, then messages until it ends."""
        address = (address[0], address[1])
        refusal = self._refusal_at_accept(address[0])
        if refusal is not None:
            self._refuse_at_once(sock, address, refusal)
            return
        set_nodelay(sock)
        stats = self._stats
        traffic = stats.traffic
        conn = Connection(
            sock, address, self.header_len,
            max_queue_bytes=self.max_queue_bytes,
            on_overflow=self._on_overflow,
            parser=FrameParser(self.header_len, self.max_message_size, first_body_limit=self.max_hello_size),
            traffic=traffic,
            budget=self._budget,
            frame_timeout=self.frame_timeout,
            spawn=self._runner.greenlets.spawn,
        )
        self._connections.add(conn)
        self._pending[conn] = None
        self._per_ip[address[0]] += 1
        stats.connection_opened(len(self._connections))
        peer: Optional[_ServerPeer] = None
        end_reason = reasons.LEFT
        try:
            if self.ssl_context is not None:
                conn.tls = self._tls_handshake(conn)
                if conn.tls is None:
                    return
            bodies = conn.bodies()
            hello = self._read_hello(conn, bodies)
            del self._pending[conn]
            if hello is None or not self._admit(conn, hello):
                return
            peer = self._join(conn, hello)
            for body in bodies:
                traffic.messages_in += 1
                if peer.gone:
                    break
                message = parse_client_body(body)
                if self._dispatch[type(message)](peer, message):
                    break
            else:
                # (A client dropped meanwhile, as a slow reader say, was logged already.)
                if not peer.gone and self._log_unclean_end(conn):
                    end_reason = reasons.CONNECTION_LOST
        except RemoteProtocolError as exc:
            logger.warning("closing %s:%s: %s", address[0], address[1], exc)
            stats.rejected[rejection_reason(exc)] += 1
            end_reason = reasons.PROTOCOL_ERROR
            if peer is not None and peer.msgpack_ok and not peer.gone:
                # A hisock_gevent client is told why before the connection closes.
                conn.send_now(frame(Disconnect({"reason": str(exc)}).to_body(), self.header_len))
        except Exception:
            # A bug of ours (or a failing hook): this connection ends, logged, like a
            # protocol error; the others and the serving loop carry on.
            logger.exception("closing %s:%s: unexpected error while serving it", address[0], address[1])
            stats.rejected["internal_error"] += 1
            end_reason = reasons.PROTOCOL_ERROR
        finally:
            self._connections.discard(conn)
            self._pending.pop(conn, None)
            self._forget_ip(address[0])
            if peer is not None:
                self._drop(peer, call_leave=True, notify=True, reason=end_reason)
            conn.close()

    def _refusal_at_accept(self, ip: str) -> Optional[str]:
        """Why a new connection from ``ip`` is refused before it says anything, or None."""
        if self._closed:
            return reasons.SERVER_CLOSED
        if self.max_connections and len(self._registry) >= self.max_connections:
            return reasons.SERVER_FULL
        if len(self._pending) >= self.max_pending:
            return reasons.TOO_MANY_PENDING
        if self.max_connections_per_ip and self._per_ip[ip] >= self.max_connections_per_ip:
            return reasons.TOO_MANY_FROM_IP
        return None

    def _refuse_at_once(self, sock: Any, address: Tuple[str, int], reason: str) -> None:
        """Send a new connection ``$DISCONN$`` and close it, without reading anything."""
        if reason == reasons.SERVER_CLOSED:
            sock.close()
            return
        self._stats.accepted += 1
        self._stats.refused[reason] += 1
        logger.warning("refusing %s:%s: %s", address[0], address[1], self._refusal_text(reason))
        conn = Connection(sock, address, self.header_len)
        conn.send_now(frame(_DISCONNECT_FRAME_BODY, self.header_len))
        conn.close()

    def _refusal_text(self, reason: str) -> str:
        if reason == reasons.SERVER_FULL:
            return f"max_connections ({self.max_connections}) reached"
        if reason == reasons.TOO_MANY_PENDING:
            return f"max_pending ({self.max_pending}) connections are still in their handshake"
        return f"max_connections_per_ip ({self.max_connections_per_ip}) reached"

    def _forget_ip(self, ip: str) -> None:
        count = self._per_ip[ip] - 1
        if count > 0:
            self._per_ip[ip] = count
        else:
            del self._per_ip[ip]

    @staticmethod
    def _log_unclean_end(conn: Connection) -> bool:
        """Log why a connection that just ended did not end cleanly; False if it did."""
        reasons = []
        if conn.error is not None:
            reasons.append(conn.error)
        if conn.parser.mid_frame:
            reasons.append(f"closed in the middle of a frame ({conn.parser.buffered} bytes of it received)")
        if not reasons:
            return False
        logger.warning("closing %s:%s: %s", conn.peer[0], conn.peer[1], "; ".join(reasons))
        return True

    def _tls_handshake(self, conn: Connection) -> Optional[TLSLayer]:
        """The TLS session of a new connection, or None when the peer went away during it
        (logged in one line: a reset mid-handshake is a client's business, not a traceback)."""
        assert self.ssl_context is not None
        layer = TLSLayer(self.ssl_context, server_side=True)
        sock = conn.sock
        try:
            with gevent.Timeout(self.handshake_timeout, TLSError(f"no TLS handshake within {self.handshake_timeout} s")):
                perform_handshake(layer, sock.recv, sock.sendall)
        except OSError as exc:
            logger.warning("closing %s:%s: the connection failed during the TLS handshake: %s", conn.peer[0], conn.peer[1], exc)
            self._stats.rejected["tls_error"] += 1
            return None
        return layer

    def _admit(self, conn: Connection, hello: Hello) -> bool:
        """Check a hello (names, room, the authentication check); a refused client is told
        ``$DISCONN$``, with the reason when it is a hisock_gevent client."""
        refusal = None
        reason = None
        for what, value in (("name", hello.name), ("group", hello.group)):
            problem = name_problem(value, what, self.max_name_length)
            if problem is not None:
                refusal, reason = problem, reasons.INVALID_NAME
                break
        if refusal is None and self.max_connections and len(self._registry) >= self.max_connections:
            refusal, reason = f"max_connections ({self.max_connections}) reached", reasons.SERVER_FULL
        if refusal is None and self.authenticate is not None and not self._authenticated(conn, hello):
            refusal, reason = "authentication failed", reasons.AUTH_FAILED
        if refusal is None:
            return True
        assert reason is not None
        # The client as it asked to be known, unless its name itself is the problem.
        who = f"{conn.peer[0]}:{conn.peer[1]}" if reason == reasons.INVALID_NAME else ClientInfo(conn.peer, hello.name, hello.group)
        logger.warning("refusing %s: %s", who, refusal)
        self._stats.refused[reason] += 1
        # A hisock_gevent client is told why; a plain HiSock client gets the bare $DISCONN$.
        details = {"reason": refusal} if CAPABILITY_MSGPACK in hello.capabilities else None
        conn.send(frame(Disconnect(details).to_body(), self.header_len))
        conn.close(DEFAULT_CLOSE_TIMEOUT)
        return False

    def _authenticated(self, conn: Connection, hello: Hello) -> bool:
        assert self.authenticate is not None
        candidate = ClientInfo(conn.peer, hello.name, hello.group)
        try:
            return bool(self.authenticate(candidate, hello.extra.get("auth")))
        except Exception:
            logger.exception("authentication check failed for %s; refusing it", candidate)
            return False

    def _read_hello(self, conn: Connection, bodies: Any) -> Optional[Hello]:
        body = None
        with gevent.Timeout(self.handshake_timeout, False):
            body = next(bodies, None)
            if body is None:
                if not self._log_unclean_end(conn):
                    # Opened and closed without a word: a port probe or health check.
                    logger.debug("%s:%s closed before its hello", *conn.peer)
                return None
        if body is None:
            logger.warning("closing %s:%s: no hello within %.1f s", conn.peer[0], conn.peer[1], self.handshake_timeout)
            self._stats.refused[reasons.NO_HELLO] += 1
            return None
        self._stats.traffic.messages_in += 1
        message = parse_client_body(body)
        if not isinstance(message, Hello):
            raise HandshakeError(f"first message was {type(message).__name__}, not a hello")
        return message

    def _join(self, conn: Connection, hello: Hello) -> _ServerPeer:
        info = ClientInfo(conn.peer, hello.name, hello.group)
        peer = _ServerPeer(conn, info, CAPABILITY_MSGPACK in hello.capabilities)
        joined = info.as_dict()
        try:
            everyone_frame = frame(PeerJoined(joined).to_body(), self.header_len)
            # Only a peer that offered capabilities hears ours: a plain HiSock client never does.
            answer_frame = (
                frame(PeerJoined(dict(joined, caps=[CAPABILITY_MSGPACK])).to_body(), self.header_len)
                if peer.msgpack_ok
                else everyone_frame
            )
        except ValueError as exc:
            raise HandshakeError(f"the client's announcement does not fit header_len {self.header_len}: {exc}") from exc
        conn.on_overflow = functools.partial(self._peer_overflowed, peer)
        self._registry.add(peer)
        self._stats.joins += 1
        self._delivery.joined(peer, everyone_frame)
        peer.send(answer_frame)
        logger.debug("%s joined", info)
        self._call_reserved("join", info)
        return peer

    def _drop(self, peer: _ServerPeer, call_leave: bool, notify: bool, reason: str) -> bool:
        """Forget a joined client (once); tell the others and run ``leave`` if asked.

        :param reason: why it goes, one of the names in :mod:`hisock_gevent.stats`.
        """
        if peer.gone:
            return False
        peer.gone = True
        if not self._registry.remove(peer):
            return False
        self._stats.dropped[reason] += 1
        left_frame = None
        if notify:
            try:
                left_frame = frame(PeerLeft(peer.info.as_dict()).to_body(), self.header_len)
            except ValueError as exc:
                logger.warning("not announcing that %s left: %s", peer.info, exc)
        self._delivery.left(peer, left_frame)
        logger.debug("%s left", peer.info)
        if call_leave:
            self._call_reserved("leave", peer.info)
        return True

    def _run_remote_leave(self, info: ClientInfo) -> None:
        """``leave`` for a client another process held, which went without it saying so.

        Run in a greenlet of its own: the delivery may call this from anywhere on the hub,
        and a ``leave`` handler may block cooperatively.
        """
        logger.debug("%s left with its worker", info)
        self._runner.greenlets.spawn(self._call_reserved, "leave", info)

    def _close_peer(self, peer: _ServerPeer, send_disconnect: bool, drain_timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Close a client's connection, after ``$DISCONN$`` and its queue drain when asked."""
        conn = peer.conn
        if not send_disconnect:
            conn.close()
            return
        conn.send(frame(_DISCONNECT_FRAME_BODY, self.header_len))
        self._closers.spawn(conn.close, drain_timeout)

    def _on_overflow(self, conn: Connection) -> None:
        """A connection not (or no longer) joined was overflowed: close it."""
        conn.close()

    def _peer_overflowed(self, peer: _ServerPeer, conn: Connection) -> None:
        """A joined client was overflowed (by its own backlog or the server's budget); this
        runs in a greenlet of its own, after the send that found it has returned."""
        logger.warning("dropping %s: %s", peer.info, conn.error)
        conn.close()
        reason = reasons.SLOW_READER if conn.overflowed == "queue" else reasons.MEMORY_LIMIT
        self._drop(peer, call_leave=True, notify=True, reason=reason)

    def _budget_exceeded(self) -> None:
        # Called from inside a send: the shedding happens afterwards, in a greenlet.
        self._runner.greenlets.spawn(self._shed)

    def _shed(self) -> None:
        held = self._budget.held
        dropped = self._budget.shed()
        if dropped:
            logger.warning(
                "%d bytes held for slow clients, more than max_total_queue_bytes=%d: "
                "dropping the %d with the largest backlogs",
                held, self._budget.limit, len(dropped),
            )

    # ------------------------------------------------------------------ messages

    def _on_command(self, peer: _ServerPeer, message: Command) -> bool:
        command = message.command
        info = peer.info
        entry = self._handlers.command_handler(command)
        catch_all = None if entry is not None else self._handlers.reserved_handler("*")
        on_message = self._handlers.reserved_handler("message")
        # Decoded even when nobody handles it (a malformed payload closes the connection
        # whatever the command); a long payload is decoded in slices with a yield between
        # them, so it costs its sender time, not everyone else.
        content = typecast.decode(
            message.fmt, message.payload, max_depth=self.max_nesting, max_items=self.max_items, pause=yield_to_loop
        )
        if self.cache_size >= 0:
            # Cached before the handlers run, so a reply can never overtake the cache entry.
            called = entry is not None or catch_all is not None
            self._remember(MessageCacheMember(header=len(message.to_body()), content=content, called=called, command=command))
        if entry is not None:
            if entry["threaded"]:
                self._runner.call(entry, (info, content), ("", command, info))
            else:
                # HandlerRunner.call, inlined for the common inline handler.
                try:
                    entry["func"](*(info, content)[: entry["num_args"]])
                except gevent.GreenletExit:
                    raise
                except Exception as exc:  # a user handler failed: report, keep serving
                    self._runner.report(exc, ("", command, info))
        elif catch_all is not None:
            self._runner.call(catch_all, (info, command, content), ("*", command, info))
        if on_message is not None:
            args = (info, command, content) if on_message["num_args"] == 3 else (info, content)
            self._runner.call(on_message, args, ("message", command, info))
        if self._callback is not None:
            self._runner.call(self._callback, (), ("callback", None, None))
        return False

    def _remember(self, member: MessageCacheMember) -> None:
        self.cache.append(member)
        if 0 < self.cache_size < len(self.cache):
            del self.cache[0]

    def _on_user_close(self, peer: _ServerPeer, message: UserClose) -> bool:
        return True

    def _check_name(self, value: Optional[str], what: str) -> None:
        problem = name_problem(value, what, self.max_name_length)
        if problem is not None:
            raise InvalidName(problem)

    def _on_change_name(self, peer: _ServerPeer, message: ChangeName) -> bool:
        self._check_name(message.name, "name")
        new_name = message.name or peer.connect_name
        old = self._registry.update(peer, ClientInfo(peer.info.ip, new_name, peer.info.group))
        self._delivery.changed(peer, old)
        self._call_reserved("name_change", peer.info, old.name, new_name)
        return False

    def _on_change_group(self, peer: _ServerPeer, message: ChangeGroup) -> bool:
        self._check_name(message.group, "group")
        new_group = message.group or peer.connect_group
        old = self._registry.update(peer, ClientInfo(peer.info.ip, peer.info.name, new_group))
        self._delivery.changed(peer, old)
        self._call_reserved("group_change", peer.info, old.group, new_group)
        return False

    def _on_keep_ack(self, peer: _ServerPeer, message: KeepAck) -> bool:
        peer.last_ack = time.monotonic()
        return False

    def _on_get_client(self, peer: _ServerPeer, message: GetClient) -> bool:
        answer: Dict[str, Any]
        try:
            info = self._delivery.find_client(message.query)
        except (ValueError, ClientNotFound):
            answer = {"traceback": NO_SUCH_CLIENT}
        else:
            answer = {"ip": [info.ip[0], info.ip[1]], "name": info.name, "group": info.group}
        if not peer.msgpack_ok:
            # The native letters cannot carry None: a plain peer gets only the keys that are set.
            answer = {key: value for key, value in answer.items() if value is not None}
        try:
            reply = OutgoingCommand(GETCLT_COMMAND, answer, self.header_len, reserved_ok=True).frame_for(peer.msgpack_ok)
        except ValueError as exc:
            logger.warning("answering $GETCLT$ from %s with $NOEXIST$: %s", peer.info, exc)
            reply = OutgoingCommand(GETCLT_COMMAND, {"traceback": NO_SUCH_CLIENT}, self.header_len, reserved_ok=True).frame_for(peer.msgpack_ok)
        peer.send(reply)
        return False

    def _on_second_hello(self, peer: _ServerPeer, message: Hello) -> bool:
        raise HandshakeError("a second hello")

    # ------------------------------------------------------------------ keepalive

    def _keepalive_loop(self) -> None:
        ping = frame(KeepAlive().to_body(), self.header_len)
        while not self._closed:
            gevent.sleep(self.keepalive_interval)
            sent_at = time.monotonic()
            peers = list(self._registry)
            for peer in peers:
                peer.send(ping)
            expiry = gevent.Greenlet(self._expire_silent, peers, sent_at)
            self._timers.add(expiry)
            expiry.start_later(self.keepalive_timeout)

    def _idle_sweep(self) -> None:
        """Drop joined clients that have sent nothing for ``idle_timeout`` seconds."""
        assert self.idle_timeout
        interval = min(max(self.idle_timeout / 4, 0.05), 5.0)
        while not self._closed:
            gevent.sleep(interval)
            deadline = time.monotonic() - self.idle_timeout
            for peer in list(self._registry):
                if not peer.gone and peer.conn.last_received < deadline:
                    logger.warning("dropping %s: nothing received for %.1f s (idle_timeout)", peer.info, self.idle_timeout)
                    if self._drop(peer, call_leave=True, notify=True, reason=reasons.IDLE_TIMEOUT):
                        self._close_peer(peer, send_disconnect=True)

    def _expire_silent(self, peers: List[_ServerPeer], sent_at: float) -> None:
        for peer in peers:
            if not peer.gone and peer.last_ack < sent_at:
                logger.warning("dropping %s: no keepalive answer within %.1f s", peer.info, self.keepalive_timeout)
                if self._drop(peer, call_leave=True, notify=True, reason=reasons.KEEPALIVE_TIMEOUT):
                    self._close_peer(peer, send_disconnect=True)

    # ------------------------------------------------------------------ lookups

    def get_addr(self) -> Tuple[str, int]:
        """The ``(ip, port)`` the server is serving at."""
        return self.addr

    @_on_home
    def stats(self) -> Dict[str, Any]:
        """Live counters of this server, as a JSON-ready dict (not part of HiSock's API).

        ``connections``: ``now`` open (joined or still in their handshake), ``peak``,
        ``accepted`` in all (refused ones too), and ``refused`` before joining by reason (``server_full``,
        ``auth_failed``, ``no_hello``, ``too_many_pending``, ``too_many_from_ip``,
        ``invalid_name``).  ``clients``: ``joined`` now, ``joins`` in all,
        ``groups`` (group -> clients, largest first), ``ungrouped``, ``left`` (clean
        goodbyes) and ``dropped`` by reason (``connection_lost``, ``protocol_error``,
        ``slow_reader``, ``memory_limit``, ``idle_timeout``, ``keepalive_timeout``,
        ``kicked``, ``server_closed``).  ``messages`` and ``bytes``: ``in`` and ``out`` since the
        server was made (a broadcast to N clients is N messages out).  ``rejected``:
        connections closed for breaking the protocol, by error (``invalid_header``,
        ``message_too_large``, ``malformed_payload``, ...).  Also ``address`` and
        ``uptime_s``.  Reading it costs one pass over the groups, not over the clients.
        """
        snapshot = self._stats.snapshot(len(self._connections), len(self._registry), self._registry.group_sizes())
        cluster = self._delivery.stats()
        if cluster is not None:
            snapshot["cluster"] = cluster
        return {"address": f"{self.addr[0]}:{self.addr[1]}", **snapshot}

    def serve_stats(self, host: str = "127.0.0.1", port: int = 0) -> Tuple[str, int]:
        """Serve :meth:`stats` over HTTP from this server's own hub until :meth:`close`
        (not part of HiSock's API): a live page at ``/``, JSON at ``/stats``, Prometheus
        text at ``/metrics`` (needs prometheus_client).  Callable from any thread, before
        or after :meth:`start`: the port is bound at once (port 0 picks a free one, and
        the address is returned), and served once the server serves.

        The pages have no authentication: keep ``host`` on a private interface.
        """
        if self._closed:
            raise RuntimeError("the server is closed")
        listener = _bind_listener((host, port), 128, reuse_port=False)
        address = listener.getsockname()[:2]
        logger.info("stats at http://%s:%s/", address[0], address[1])
        if self._stream_server is None:
            self._stats_listeners.append(listener)  # start() serves it
        else:
            self._home.call(self._start_stats_http, listener)
        return address[0], address[1]

    def _start_stats_http(self, listener: _stdlib_socket.socket) -> None:
        from .monitor import serve_stats

        self._stats_http.append(serve_stats(self.stats, listener=listener))

    @_on_home
    def get_all_clients(self, key: Union[Callable[[ClientInfo], Any], str, None] = None) -> List[Any]:
        """Every connected client, as ClientInfo; with a str ``key`` that field of each
        (``"name"``, ``"group"``, ``"ip"``, ``"ipstr"``); with a callable, the clients it accepts."""
        clients = self._delivery.all_clients()
        if key is None:
            return clients
        if callable(key):
            return [client for client in clients if key(client)]
        return [client[key] for client in clients]

    @_on_home
    def get_client(self, client: ClientRef) -> ClientInfo:
        """The ClientInfo of a client named by ``(ip, port)``, ``"ip:port"``, its name or a ClientInfo.

        :raises ValueError: wrong format.  :raises ClientNotFound: no such client.
        :raises UserWarning: (a warning) several clients have that name.
        """
        return self._delivery.find_client(client)

    @_on_home
    def get_group(self, group: GroupRef) -> List[ClientInfo]:
        """Every client in a group, named directly or by a ClientInfo in it.

        :raises GroupNotFound: nobody is in that group.
        """
        return self._delivery.group_members(group)

    # ------------------------------------------------------------------ sending

    @_acts
    @_on_home
    def send_client(self, client: ClientRef, command: str, content: Sendable = None) -> None:
        """Send ``command`` and ``content`` to one client.

        :raises ValueError: wrong client format, or a reserved command.
        :raises ClientNotFound: no such client.
        :raises InvalidTypeCast: the content cannot be sent to that client.
        :raises ContentTooLarge: the message would be longer than ``max_message_size``
            (what the server assumes its clients accept, as it accepts from them).
        :raises ServerClosed: the server is closed.
        :raises UserWarning: (a warning) several clients have that name.
        """
        self._delivery.to_client(client, OutgoingCommand(command, content, self.header_len, max_body=self.max_message_size))

    @_acts
    @_on_home
    def send_group(self, group: GroupRef, command: str, content: Sendable = None) -> None:
        """Send ``command`` and ``content`` to every client of a group.

        :raises GroupNotFound: (a TypeError too) nobody is in the group.
        :raises ContentTooLarge: the message would be longer than ``max_message_size``.
        """
        self._delivery.to_group(group, OutgoingCommand(command, content, self.header_len, max_body=self.max_message_size))

    @_acts
    @_on_home
    def send_all_clients(self, command: str, content: Sendable = None) -> None:
        """Send ``command`` and ``content`` to every connected client; the frame is built once.

        :raises ContentTooLarge: the message would be longer than ``max_message_size``.
        """
        self._delivery.to_all(OutgoingCommand(command, content, self.header_len, max_body=self.max_message_size))

    # ------------------------------------------------------------------ disconnecting

    @_acts
    @_on_home
    def disconnect_client(self, client: ClientRef, force: bool = False, call_func: bool = False) -> None:
        """Disconnect one client; the others hear ``$CLTDISCONN$``.

        :param force: close at once, without telling the client ``$DISCONN$``.
        :param call_func: run the ``leave`` handler for it.
        With a backplane, a client held by another worker is disconnected by that worker.

        :raises ValueError: wrong format.  :raises ClientNotFound: no such client.
        """
        # The delivery resolves the reference (a shared name or address means the same
        # client on every worker); then it is another worker's to disconnect, or ours.
        info = self._delivery.find_client(client)
        if self._delivery.disconnect_elsewhere(info, force, call_func):
            return
        self._kick(self._registry.find(info.ip), force, call_func)

    def _kick(self, peer: _ServerPeer, force: bool, call_func: bool) -> None:
        self._drop(peer, call_leave=call_func, notify=True, reason=reasons.KICKED)
        self._close_peer(peer, send_disconnect=not force)

    def _kick_for_delivery(self, address: Tuple[str, int], force: bool, call_func: bool) -> None:
        """Another worker asked (through the backplane) to disconnect our client at ``address``."""
        try:
            peer = self._registry.find(address)
        except ClientNotFound:
            return  # it left meanwhile
        self._kick(peer, force, call_func)

    @_acts
    @_on_home
    def disconnect_all_clients(self, force: bool = False) -> None:
        """Disconnect every client (``leave`` does not run)."""
        self._disconnect_everyone(force)

    def _disconnect_everyone(self, force: bool, drain_timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        for peer in list(self._registry):
            assert isinstance(peer, _ServerPeer)
            self._drop(peer, call_leave=False, notify=False, reason=reasons.SERVER_CLOSED)
            self._close_peer(peer, send_disconnect=not force, drain_timeout=drain_timeout)


class ThreadedHiSockServer(HiSockServer):
    """HiSockServer running on its own so it does not block the caller.

    In a plain program (threading not monkey-patched) the server gets its own OS thread
    with its own gevent hub, so a Tkinter/pygame/threading program keeps running; in a
    monkey-patched program it runs in a greenlet.  Handlers run on the server's thread (or
    greenlet); use ``threaded=True`` for blocking ones.  Every method is safe to call from
    any thread.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._greenlet: Optional[gevent.Greenlet] = None

    def start(self, callback: Optional[Callable[[], Any]] = None, error_handler: Optional[Callable[[BaseException], Any]] = None) -> None:
        """Start serving in the background and return at once."""
        if self._closed or self._greenlet is not None or self._home.alive:
            return
        if Home.program_is_patched():
            self._begin_serving(callback, error_handler)
            assert self._stopped is not None
            self._greenlet = gevent.spawn(self._stopped.wait)
        else:
            self._home.start_thread(lambda: HiSockServer.start(self, callback, error_handler), "hisock-server")

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Close the server (see :meth:`HiSockServer.close`) and block until its thread has
        ended: ``timeout`` plus about a second at most."""
        deadline = time.monotonic() + timeout + 1.0
        super().close(timeout)
        if self._greenlet is not None and self._greenlet is not gevent.getcurrent():
            self._greenlet.join(max(0.1, deadline - time.monotonic()))
        else:
            self._home.join_thread(max(0.1, deadline - time.monotonic()))

    def join(self, timeout: Optional[float] = None) -> None:
        """Block until the server has been closed."""
        if self._greenlet is not None:
            self._greenlet.join(timeout)
        else:
            self._home.join_thread(timeout)


def start_server(addr: Tuple[str, int], max_connections: int = 0, header_len: int = DEFAULT_HEADER_LEN, **kwargs: Any) -> HiSockServer:
    """Create a :class:`HiSockServer`; see it for the arguments."""
    return HiSockServer(addr, max_connections, header_len, **kwargs)


def start_threaded_server(*args: Any, **kwargs: Any) -> ThreadedHiSockServer:
    """Create a :class:`ThreadedHiSockServer`; arguments as :func:`start_server`."""
    return ThreadedHiSockServer(*args, **kwargs)
