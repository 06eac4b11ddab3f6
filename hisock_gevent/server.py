"""HiSockServer: HiSock 3.0's documented server API on a gevent StreamServer.

The server owns the lifecycle (bind, start, close), the public API (``on``, the sends,
the lookups, the disconnects), the timers (keepalive, idle) and the statistics.  The rest
is in the pieces it wires together: each accepted connection is a
:class:`~hisock_gevent.session.ServerSession` in a greenlet of its own; who may come in is
:class:`~hisock_gevent.admission.Admission`'s business; joins and goes are
:class:`~hisock_gevent.membership.Membership`'s; who receives what goes through the
:class:`~hisock_gevent.registry.Delivery` seam; handlers are registered and called through
:mod:`hisock_gevent.handlers`; every option is in a
:class:`~hisock_gevent.config.ServerConfig`.  Every public method may be called from any
thread: calls from outside the server's home thread are run there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket as _stdlib_socket
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, TypeVar, Union

import gevent
from gevent.event import Event
from gevent.pool import Group
from gevent.server import StreamServer

from . import stats
from .admission import Admission
from .budget import SendBudget, default_total_queue_bytes
from .config import (
    DEFAULT_BACKLOG,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_HELLO_SIZE,
    DEFAULT_MAX_NAME_LENGTH,
    DEFAULT_MAX_PENDING,
    ServerConfig,
)
from .connection import Connection
from .errors import (
    CallNotSupported,
    CallTimeout,
    ClientException,
    GroupNotFound,
    ServerClosed,
    ServerException,
)
from .frames import DEFAULT_HEADER_LEN, frame
from .handlers import SERVER_RESERVED, SERVER_UNRESERVED_ARGS, HandlerRunner, HandlerTable
from .home import Home, _get_ident, at_home
from .membership import DEFAULT_CLOSE_TIMEOUT, Membership, ServerPeer
from .messages import KeepAlive, call_body
from .outgoing import OutgoingCommand
from .registry import (
    ClientRef,
    ClientRegistry,
    Delivery,
    Exclude,
    GroupRef,
    LocalDelivery,
    ServerLink,
    client_refs,
)
from .session import ServerSession, SessionContext
from .stats import ServerStats
from .tls import server_context
from .utils import RECV_BUFFERSIZE, ClientInfo, MessageCacheMember, Sendable

__all__ = [
    "HiSockServer",
    "ThreadedHiSockServer",
    "ServerConfig",
    "start_server",
    "start_threaded_server",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_HELLO_SIZE",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_NAME_LENGTH",
    "DEFAULT_BACKLOG",
    "DEFAULT_CLOSE_TIMEOUT",
    # HiSock's server module exported these too; ported programs import them from here.
    "ClientException",
    "ServerException",
    "GroupNotFound",
]

logger = logging.getLogger("hisock_gevent")

_F = TypeVar("_F", bound=Callable[..., Any])
_OPTIONS = frozenset(field.name for field in dataclasses.fields(ServerConfig))

#: Seconds a :meth:`HiSockServer.call` waits for its answer unless told otherwise.
DEFAULT_CALL_TIMEOUT = 10.0

#: Set to "1" by ``serve --workers`` in its workers' environment: every server a worker
#: makes (one made at import included) binds with SO_REUSEPORT, so all can share the port.
REUSE_PORT_ENV = "HISOCK_GEVENT_REUSE_PORT"

# Inside deferred_servers(): servers made do not bind, and their start() returns at once.
_deferring = [False]


@contextlib.contextmanager
def deferred_servers() -> Iterator[None]:
    """Servers made inside neither bind nor serve: their ``start()`` returns at once.

    ``hisock-gevent serve MODULE:ATTR`` imports the program inside it, so that a server the
    program makes (and starts) at import, on the address written in it, is only a
    description: serve then runs it itself, rebuilt on the address the command names.
    """
    before = _deferring[0]
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = before


def _acts(method: _F) -> _F:
    """A method that sends or disconnects, run on the server's home thread whichever
    thread calls it (as :func:`~hisock_gevent.home.at_home`, in the same wrapper: this
    is every send's path).  On a closed server it raises ServerClosed, so a handler still
    running on a worker thread after close gets a clear error."""

    @functools.wraps(method)
    def wrapper(self: HiSockServer, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise ServerClosed(f"the server at {self.addr[0]}:{self.addr[1]} is closed")
        home = self._home
        ident = home.ident
        if ident is None or ident == _get_ident() or not home.alive:
            return method(self, *args, **kwargs)
        if kwargs:
            return home.call(functools.partial(method, self, *args, **kwargs))
        return home.call(method, self, *args)

    return wrapper  # type: ignore[return-value]


def _bind_listener(addr: Tuple[str, int], backlog: int, reuse_port: bool) -> _stdlib_socket.socket:
    """A plain listening socket: bound now (so errors and the real port show at once),
    served later by whichever thread runs start()."""
    if ":" in str(addr[0]):
        raise ValueError(f"IPv6 addresses are not supported (HiSock serves IPv4 only): {addr[0]!r}")
    reuse_port = reuse_port or os.environ.get(REUSE_PORT_ENV) == "1"
    if reuse_port and not hasattr(_stdlib_socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port=True needs SO_REUSEPORT, which this system does not have")
    listener = _stdlib_socket.socket(_stdlib_socket.AF_INET, _stdlib_socket.SOCK_STREAM)
    try:
        listener.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEPORT, 1)
        try:
            listener.bind(addr)
        except OSError as exc:
            # Name the address: "Address already in use" alone does not say which.
            raise OSError(exc.errno, f"cannot bind {addr[0]}:{addr[1]}: {exc.strerror}") from exc
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


class HiSockServer:
    """The server class for HiSock.

    :param addr: ``(ip, port)`` to serve at; port 0 picks a free port (see :meth:`get_addr`).
    :param max_connections: joined clients at once; 0 for no limit.
    :param header_len: width of every frame header; clients must use the same.
    :param cache_size: -1 or below for no message cache, 0 for an unlimited one, N for the
        last N messages.
    :param keepalive: send ``$KEEPALIVE$`` regularly and drop clients that do not answer.
    :param options: every other option, by keyword: see :class:`ServerConfig` (below) for
        the list, the defaults and what each does.

    :ivar addr: the address actually served at.
    :ivar header_len: the header width.
    :ivar clients: socket -> ClientInfo of every joined client.
    :ivar clients_rev: ClientInfo -> socket, always in step with ``clients``.
    :ivar funcs: the handlers registered with :meth:`on`.
    :ivar cache: the message cache (MessageCacheMember items), when ``cache_size`` >= 0.
    :ivar config: the :class:`ServerConfig` the server was made with; every option can
        also be read as an attribute (``server.max_queue_bytes``).
    :raises TypeError: if the address is not a tuple.
    :raises ValueError: an option is out of range.
    """

    #: HiSock's read size; informational here (connections read up to 256 KiB at a time).
    RECV_BUFFERSIZE = RECV_BUFFERSIZE

    def __init__(
        self,
        addr: Tuple[str, int],
        max_connections: int = 0,
        header_len: int = DEFAULT_HEADER_LEN,
        cache_size: int = -1,
        keepalive: bool = False,
        **options: Any,
    ):
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise TypeError(f"HiSockServer got unexpected keyword argument(s): {', '.join(unknown)}")
        config = ServerConfig(
            max_connections=max_connections, header_len=header_len, cache_size=cache_size, keepalive=keepalive, **options
        )
        self._setup(addr, config)

    @classmethod
    def from_config(cls, addr: Tuple[str, int], config: ServerConfig) -> HiSockServer:
        """A server at ``addr`` with these options (``dataclasses.replace(server.config,
        ...)`` makes a changed copy of another server's)."""
        server = cls.__new__(cls)
        server._setup(addr, config)
        return server

    def _setup(self, addr: Tuple[str, int], config: ServerConfig) -> None:
        if not isinstance(addr, tuple):
            raise TypeError(f"addr must be a tuple (ip, port), not {type(addr).__name__}")
        if len(addr) != 2:
            raise TypeError(f"addr must be a two-element tuple (ip, port), not {addr!r}")
        if config.ssl_context is None and config.certfile is not None:
            config = dataclasses.replace(config, ssl_context=server_context(config.certfile, config.keyfile))
        self.config = config
        self.header_len = config.header_len
        self.cache: List[MessageCacheMember] = []

        #: True for a server made inside :func:`deferred_servers`: not bound, never served.
        self.deferred = _deferring[0] and config.listener is None
        listener = config.listener
        if self.deferred:
            self.addr: Tuple[str, int] = (addr[0], addr[1])
        else:
            if listener is None:
                listener = _bind_listener(addr, config.backlog, config.reuse_port)
            else:
                listener.setblocking(False)
            self.addr = listener.getsockname()[:2]
        self._listener = listener

        self._registry: ClientRegistry[ServerPeer] = ClientRegistry()
        self._delivery = self._make_delivery(config.delivery, config.backplane)
        #: The backplane joining this server to others (a Delivery), or None.
        self.backplane: Optional[Delivery] = self._delivery if config.backplane is not None else None
        self._handlers = HandlerTable(SERVER_RESERVED, SERVER_UNRESERVED_ARGS)
        self.funcs = self._handlers.funcs
        self._home = Home()
        self._runner = HandlerRunner(self._home, "server")
        self._stats = ServerStats()
        total = config.max_total_queue_bytes or default_total_queue_bytes()
        self._budget = SendBudget(total, self._budget_exceeded)
        self._membership = Membership(
            self._registry, self._delivery, config.header_len, self._stats, self._call_reserved,
            self._runner.greenlets.spawn, config.max_message_size,
        )
        self._admission = Admission(config, lambda: len(self._registry))
        self._context = SessionContext(
            config, self._registry, self._delivery, self._membership, self._admission,
            self._handlers, self._runner, self._stats, self._budget, self.cache,
        )
        self._stream_server: Optional[StreamServer] = None
        # The greenlet of every open connection, and the connections, joined or not.
        self._serving = Group()
        self._connections: Set[Connection] = set()
        self._pages: Optional[Any] = None  # serve_stats(): a monitor.StatsPages
        # The keepalive loop and its pending expiry checks, the idle sweep.
        self._timers = Group()
        self._stopped: Optional[Event] = None
        self._closed = False
        self._setup_websocket(config)

    def _setup_websocket(self, config: ServerConfig) -> None:
        """The WebSocket entrance (ws_gate.WebSocketGate), made when first needed; the
        ``websocket`` listener is bound now, like the TCP one, and served from start()."""
        self._ws_gate: Optional[Any] = None
        #: The ``(ip, port)`` of the WebSocket listener (``websocket=``), or None.
        self.websocket_addr: Optional[Tuple[str, int]] = None
        if config.websocket is None or self.deferred:
            return
        listener = _bind_listener(config.websocket, config.backlog, config.reuse_port)
        host, port = listener.getsockname()[:2]
        self.websocket_addr = (host, port)
        try:
            self._websocket_gate().add_listener(listener)
        except BaseException:
            listener.close()
            raise
        logger.info("WebSocket at ws://%s:%s/hisock (the browser client at http://%s:%s/hisock.js)", host, port, host, port)

    def _make_delivery(self, delivery: Optional[Delivery], backplane: Union[str, Delivery, None]) -> Delivery:
        if backplane is None:
            return delivery if delivery is not None else LocalDelivery(self._registry)
        if isinstance(backplane, str):
            from .backplane import RedisBackplane

            return RedisBackplane(backplane)
        if not isinstance(backplane, Delivery):
            raise TypeError(f"backplane must be a redis:// URL or a Delivery, not {type(backplane).__name__}")
        return backplane

    def __getattr__(self, name: str) -> Any:
        # Every option reads as an attribute too (server.max_queue_bytes), as it always has.
        if name in _OPTIONS and "config" in self.__dict__:
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
    def max_total_queue_bytes(self) -> int:
        """The limit in force on bytes held for all slow clients (the default resolved)."""
        return self._budget.limit

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
        if self.deferred:
            logger.debug("start() of %r made under serve: serve runs it itself", self)
            return
        self._begin_serving(callback, error_handler)
        assert self._stopped is not None
        self._stopped.wait()

    def _begin_serving(self, callback: Optional[Callable[[], Any]], error_handler: Optional[Callable[[BaseException], Any]]) -> None:
        self._context.callback = {"func": callback, "num_args": 0, "threaded": False} if callback else None
        self._runner.error_handler = error_handler
        if self._stream_server is not None:
            return
        self._home.adopt_current_thread()
        self._stopped = Event()
        membership = self._membership
        self._delivery.start(
            ServerLink(self._registry, self.header_len, membership.remote_leave, membership.kick_at, self.config.announce)
        )
        self._stream_server = StreamServer(self._listener, self._serve_connection, spawn=self._serving.spawn)
        if self._pages is not None:
            self._pages.start()
        if self._ws_gate is not None:
            self._ws_gate.start()
        self._stream_server.start()
        if self.config.keepalive:
            self._timers.spawn(self._keepalive_loop)
        if self.config.idle_timeout:
            self._timers.spawn(self._idle_sweep)
        # DEBUG: the program (or hisock-gevent serve, which says "serving on") tells its user.
        logger.debug("serving at %s:%s", *self.addr)

    def _serve_connection(self, sock: Any, address: Tuple[str, int]) -> None:
        """Greenlet per accepted connection (the StreamServer's handler)."""
        ServerSession(self._context, sock, address).run(self._connections)

    @at_home
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
        self._admission.closed = True
        deadline = time.monotonic() + timeout
        if self._stream_server is not None:
            self._stream_server.close()
        if self._ws_gate is not None:
            self._ws_gate.closing()
        self._timers.kill(block=False)
        membership = self._membership
        membership.everyone_out(force=False, drain_timeout=timeout)
        # Let each client's queue drain and its $DISCONN$ go out.
        membership.closers.join(timeout=max(0.0, deadline - time.monotonic()))
        membership.closers.kill(block=True, timeout=0.2)
        for conn in list(self._connections):
            conn.close()  # whatever is left: connections still in their handshake
        # close() may run inside a handler, i.e. in one of these greenlets: spare it.
        me = gevent.getcurrent()
        for group in (self._serving, self._runner.greenlets):
            others = [greenlet for greenlet in list(group) if greenlet is not me]
            gevent.killall(others, block=True, timeout=0.5)
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        self._delivery.stop()
        if self._pages is not None:
            self._pages.stop()
        if self._ws_gate is not None:
            self._ws_gate.stop()
        self._home.close()
        if self.deferred:
            # Made while ``serve`` imported its program: it never bound, and ``serve`` is
            # about to serve a server of its own, maybe on another port. Saying at INFO
            # that a server at this address closed would only mislead.
            logger.debug("deferred server for %s:%s dropped (it never bound)", *self.addr)
        else:
            logger.info("server at %s:%s closed", *self.addr)
        if self._stopped is not None:
            self._stopped.set()

    # ------------------------------------------------------------------ timers

    def _keepalive_loop(self) -> None:
        ping = frame(KeepAlive().to_body(), self.header_len)
        config = self.config
        while not self._closed:
            gevent.sleep(config.keepalive_interval)
            sent_at = time.monotonic()
            peers = list(self._registry)
            for peer in peers:
                peer.send(ping)
            expiry = gevent.Greenlet(self._expire_silent, peers, sent_at)
            self._timers.add(expiry)
            expiry.start_later(config.keepalive_timeout)

    def _expire_silent(self, peers: List[ServerPeer], sent_at: float) -> None:
        for peer in peers:
            if not peer.gone and peer.last_ack < sent_at:
                logger.warning("dropping %s: no keepalive answer within %.1f s", peer.info, self.config.keepalive_timeout)
                self._membership.expel(peer, stats.KEEPALIVE_TIMEOUT)

    def _idle_sweep(self) -> None:
        """Drop joined clients that have sent nothing for ``idle_timeout`` seconds."""
        idle_timeout = self.config.idle_timeout
        assert idle_timeout
        interval = min(max(idle_timeout / 4, 0.05), 5.0)
        while not self._closed:
            gevent.sleep(interval)
            deadline = time.monotonic() - idle_timeout
            for peer in list(self._registry):
                if not peer.gone and peer.conn.last_received < deadline:
                    logger.warning("dropping %s: nothing received for %.1f s (idle_timeout)", peer.info, idle_timeout)
                    self._membership.expel(peer, stats.IDLE_TIMEOUT)

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

    # ------------------------------------------------------------------ lookups

    def get_addr(self) -> Tuple[str, int]:
        """The ``(ip, port)`` the server is serving at."""
        return self.addr

    @at_home
    def stats(self) -> Dict[str, Any]:
        """Live counters of this server, as a JSON-ready dict (not part of HiSock's API).

        ``connections``: ``now`` open (joined or still in their handshake), ``peak``,
        ``accepted`` in all (refused ones too), and ``refused`` before joining by reason
        (``server_full``, ``auth_failed``, ``no_hello``, ``too_many_pending``,
        ``too_many_from_ip``, ``invalid_name``).  ``clients``: ``joined`` now, ``joins`` in
        all, ``groups`` (group -> clients, largest first), ``ungrouped``, ``left`` (clean
        goodbyes) and ``dropped`` by reason (``connection_lost``, ``protocol_error``,
        ``slow_reader``, ``memory_limit``, ``idle_timeout``, ``keepalive_timeout``,
        ``kicked``, ``server_closed``).  ``messages`` and ``bytes``: ``in`` and ``out``
        since the server was made (a broadcast to N clients is N messages out).
        ``rejected``: connections closed for breaking the protocol, by error
        (``invalid_header``, ``message_too_large``, ``malformed_payload``, ...).  Also
        ``address`` and ``uptime_s``.  Reading it costs one pass over the groups, not over
        the clients.
        """
        snapshot = self._stats.snapshot(len(self._connections), len(self._registry), self._registry.group_sizes())
        cluster = self._delivery.stats()
        if cluster is not None:
            snapshot["cluster"] = cluster
        return {"address": f"{self.addr[0]}:{self.addr[1]}", **snapshot}

    def serve_stats(self, host: str = "127.0.0.1", port: int = 0) -> Tuple[str, int]:
        """Serve :meth:`stats` over HTTP from this server's own hub until :meth:`close`
        (not part of HiSock's API): a live page at ``/``, JSON at ``/stats``, the last
        minutes at ``/history``, Prometheus text at ``/metrics`` (needs
        prometheus_client).  Callable from any thread, before or after :meth:`start`: the
        port is bound at once (port 0 picks a free one, and the address is returned), and
        served once the server serves.

        The pages have no authentication: keep ``host`` on a private interface.
        """
        if self._closed:
            raise RuntimeError("the server is closed")
        if self._pages is None:
            from .monitor import StatsPages

            self._pages = StatsPages(self.stats)
            if self._stream_server is not None:
                self._home.call(self._pages.start)  # already serving
        listener = _bind_listener((host, port), 128, reuse_port=False)
        address = listener.getsockname()[:2]
        logger.info("stats at http://%s:%s/", address[0], address[1])
        self._pages.add(listener, self._home.call)
        return address[0], address[1]

    def websocket_app(self, path: str = "/hisock") -> Callable[[Dict[str, Any], Any], Any]:
        """This server's WebSocket entrance as a WSGI application, for a monkey-patched
        program serving its own site with gevent's pywsgi (not part of HiSock's API).

        A request to ``path`` (``PATH_INFO``) that is a WebSocket upgrade allowed by
        ``websocket_origins`` is answered ``101`` and the client joins this server like
        any other, until it leaves; ``/hisock.js`` and ``/msgpack/...`` serve the browser
        client; anything else is 404 (route it to your own app first).  It needs the
        socket under the request, which gevent.pywsgi and gunicorn's gevent worker give.
        The server must be serving (503 before start() and after close()).

        :raises ImportError: wsproto is not installed.
        """
        return self._websocket_gate().app(path)

    def _websocket_gate(self) -> Any:
        if self._ws_gate is None:
            try:
                import wsproto  # noqa: F401
            except ImportError as exc:
                raise ImportError("the WebSocket transport needs wsproto: pip install 'hisock_gevent[websocket]'") from exc
            from .ws_gate import WebSocketGate

            gate = WebSocketGate(self._context, self._serving, self._connections, self._home, self.config.websocket_pages)
            self._ws_gate = gate
            if self._stream_server is not None and not self._closed:
                self._home.call(gate.start)
        return self._ws_gate

    @at_home
    def get_all_clients(self, key: Union[Callable[[ClientInfo], Any], str, None] = None) -> List[Any]:
        """Every connected client, as ClientInfo; with a str ``key`` that field of each
        (``"name"``, ``"group"``, ``"ip"``, ``"ipstr"``); with a callable, the clients it accepts."""
        clients = self._delivery.all_clients()
        if key is None:
            return clients
        if callable(key):
            return [client for client in clients if key(client)]
        return [client[key] for client in clients]

    @at_home
    def get_client(self, client: ClientRef) -> ClientInfo:
        """The ClientInfo of a client named by ``(ip, port)``, ``"ip:port"``, its name or a ClientInfo.

        :raises ValueError: wrong format.  :raises ClientNotFound: no such client.
        :raises UserWarning: (a warning) several clients have that name.
        """
        return self._delivery.find_client(client)

    @at_home
    def get_group(self, group: GroupRef) -> List[ClientInfo]:
        """Every client in a group, named directly or by a ClientInfo in it.

        :raises GroupNotFound: nobody is in that group.
        """
        return self._delivery.group_members(group)

    # ------------------------------------------------------------------ sending

    def _outgoing(self, command: str, content: Sendable) -> OutgoingCommand:
        return OutgoingCommand(command, content, self.header_len, max_body=self.config.peer_max_message_size)

    @_acts
    def send_client(self, client: ClientRef, command: str, content: Sendable = None) -> None:
        """Send ``command`` and ``content`` to one client.

        :raises ValueError: wrong client format, or a reserved command.
        :raises ClientNotFound: no such client.
        :raises InvalidTypeCast: the content cannot be sent to that client.
        :raises ContentTooLarge: the message would be longer than ``peer_max_message_size``
            (what the server assumes its clients accept).
        :raises ServerClosed: the server is closed.
        :raises UserWarning: (a warning) several clients have that name.
        """
        self._delivery.to_client(client, OutgoingCommand(command, content, self.header_len, False, self.config.peer_max_message_size))

    @_acts
    def send_group(self, group: GroupRef, command: str, content: Sendable = None, *, exclude: Exclude = None) -> None:
        """Send ``command`` and ``content`` to every client of a group; the frame is built once.

        :param exclude: a client not to send it to (a ClientInfo, ``(ip, port)``,
            ``"ip:port"`` or a name, resolved as :meth:`send_client` resolves one: a name
            several clients share means the one that joined first, with a UserWarning), or
            a list, tuple or set of them; ``send_group(client, "said", text,
            exclude=client)`` is "everyone in my group but me".  A client that is not
            connected (it may have just left) is ignored.  With a backplane, a client held
            by another worker is skipped there.
        :raises GroupNotFound: (a TypeError too) nobody is in the group (excluding everyone
            who is, instead, sends nothing and raises nothing).
        :raises ValueError: a reference in ``exclude`` has a wrong form.
        :raises ContentTooLarge: the message would be longer than ``peer_max_message_size``.
        """
        self._delivery.to_group(group, self._outgoing(command, content), client_refs(exclude))

    @_acts
    def send_all_clients(self, command: str, content: Sendable = None, *, exclude: Exclude = None) -> None:
        """Send ``command`` and ``content`` to every connected client; the frame is built once.

        :param exclude: a client not to send it to, or a list, tuple or set of them, as for
            :meth:`send_group`: ``send_all_clients("said", text, exclude=client)`` is
            "everyone but the sender".  A client that is not connected is ignored.
        :raises ValueError: a reference in ``exclude`` has a wrong form.
        :raises ContentTooLarge: the message would be longer than ``peer_max_message_size``.
        """
        self._delivery.to_all(self._outgoing(command, content), client_refs(exclude))

    # ------------------------------------------------------------------ calls

    @_acts
    def call(self, client: ClientRef, command: str, content: Sendable = None, timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """Run the client's handler for ``command`` with ``content`` and return what it
        returns (not part of HiSock's API: the ``call`` extension, which hisock_gevent
        clients offer; PROTOCOL.md section 7).

        Callable from any handler, the one handling this very client's message included,
        and from any thread; many calls may be in flight at once.

        :raises CallError: the client's handler raised (``remote_type`` and
            ``remote_message`` say what), or it has none for ``command``.
        :raises CallNotSupported: (a CallError) the client did not negotiate calls (a
            plain HiSock client), or another worker holds it (calls reach only this
            worker's clients).
        :raises CallTimeout: (a TimeoutError) no answer within ``timeout`` seconds.
        :raises ClientDisconnected: the client left before answering.
        :raises ClientNotFound: no such client.
        """
        info = self._delivery.find_client(client)
        peer = self._registry.holding(info)
        if peer is None:
            raise CallNotSupported(f"{info} is held by another worker: call() reaches only this worker's clients")
        if not peer.call_ok:
            raise CallNotSupported(f"{info} did not offer the call extension (a plain HiSock client cannot answer calls)")
        outgoing = self._outgoing(command, content)
        body = outgoing.frame_for(peer.msgpack_ok)[self.header_len :]
        pending = peer.pending_calls()
        call_id, result = pending.open()
        try:
            peer.send(frame(call_body(call_id, body), self.header_len))
            session = peer.session
            if session is not None and session.greenlet is gevent.getcurrent():
                # Called from a handler running in this client's own reader: only that
                # reader can bring the answer in, so it reads on while we wait.
                return session.wait_reply(result, timeout)
            try:
                return result.get(timeout=timeout)
            except gevent.Timeout:
                raise CallTimeout(f"{info} did not answer {command!r} within {timeout} s") from None
        finally:
            pending.take(call_id)

    # ------------------------------------------------------------------ disconnecting

    @_acts
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
        peer = self._registry.holding(info)
        if peer is None:  # it changed its name or group meanwhile: find it again
            peer = self._registry.find(info)
        self._membership.kick(peer, force, call_func)

    @_acts
    def disconnect_all_clients(self, force: bool = False) -> None:
        """Disconnect every client (``leave`` does not run)."""
        self._membership.everyone_out(force)


# help(HiSockServer) lists every option where it is documented: on ServerConfig.
HiSockServer.__doc__ = f"{HiSockServer.__doc__}\n    ServerConfig:\n\n    {ServerConfig.__doc__}"


class ThreadedHiSockServer(HiSockServer):
    """HiSockServer running on its own so it does not block the caller.

    In a plain program (threading not monkey-patched) the server gets its own OS thread
    with its own gevent hub, so a Tkinter/pygame/threading program keeps running; in a
    monkey-patched program it runs in a greenlet.  Handlers run on the server's thread (or
    greenlet); use ``threaded=True`` for blocking ones.  Every method is safe to call from
    any thread.
    """

    _greenlet: Optional[gevent.Greenlet] = None

    def start(self, callback: Optional[Callable[[], Any]] = None, error_handler: Optional[Callable[[BaseException], Any]] = None) -> None:
        """Start serving in the background and return at once."""
        if self._closed or self._greenlet is not None or self._home.alive or self.deferred:
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
