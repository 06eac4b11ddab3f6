"""HiSockClient: HiSock's client API, speaking to HiSock and hisock_gevent servers alike.

The constructor connects (raising :class:`ServerNotRunning` at once if nothing listens),
sends the hello and returns, as HiSock's does: the server's answer is awaited on first
use, by whatever needs it (``start()``, ``recv()``, ``get_client()``, a send whose bytes
depend on the dialect the server accepted), and a refusal surfaces there.  The opening
handshake itself is :class:`~hisock_gevent.protocol.ClientHandshake`'s business.

The client works from any thread: until a hub owns it, it writes with a plain socket that
never blocks (:class:`~hisock_gevent.plainwriter.PlainWriter`).  The first call that needs
to *receive* binds it to the calling thread's gevent hub: from then on one reader
greenlet answers keepalives and puts what arrives in the inbox
(:class:`~hisock_gevent.inbox.Inbox`), and one dispatcher calls the handlers.  Methods
called from other threads afterwards are run on that hub.
"""

from __future__ import annotations

import collections
import enum
import logging
import socket as _stdlib_socket
import ssl
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import gevent
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event

from . import typecast
from .connection import (
    DEFAULT_MAX_QUEUE_BYTES,
    FRAMES_PER_TURN,
    RECV_CHUNK,
    Connection,
    set_nodelay,
    yield_to_loop,
)
from .errors import (
    ClientDisconnected,
    ClientException,
    ClientNotFound,
    ConnectionRejected,
    RemoteProtocolError,
    ServerNotRunning,
    TLSError,
)
from .frames import DEFAULT_HEADER_LEN, DEFAULT_MAX_MESSAGE_SIZE, frame
from .handlers import CLIENT_RESERVED, CLIENT_UNRESERVED_ARGS, HandlerRunner, HandlerTable
from .home import Home, _allocate_lock
from .inbox import Ended, Inbox, PeerEvent, Received, Record
from .messages import (
    CAPABILITY_MSGPACK,
    GETCLT_COMMAND,
    NO_SUCH_CLIENT,
    ChangeGroup,
    ChangeName,
    Command,
    Disconnect,
    GetClient,
    KeepAck,
    KeepAlive,
    PeerJoined,
    PeerLeft,
    ServerMessage,
    UserClose,
    parse_server_body,
)
from .outgoing import OutgoingCommand
from .plainwriter import PlainWriter
from .protocol import Answer, ClientHandshake
from .tls import TLSLayer, client_context, perform_handshake
from .utils import ClientInfo, MessageCacheMember, Sendable, iptup_to_str, remember

__all__ = ["HiSockClient", "ThreadedHiSockClient", "ClientState", "connect", "threaded_connect"]

logger = logging.getLogger("hisock_gevent")

#: Seconds to wait for the TCP connection.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds to wait for the server's answer to our hello, and for a get_client answer.
DEFAULT_ANSWER_TIMEOUT = 10.0
#: Seconds queued frames get to reach the server on close.
DEFAULT_CLOSE_TIMEOUT = 2.0
#: Content whose bytes are the same in both dialects: sent without waiting for the answer.
_DIALECT_FREE = (str, bytes, int, type(None))


class ClientState(enum.Enum):
    """Where a client is in its life."""

    #: The hello is sent; the server has not answered yet.
    HELLO_SENT = "hello sent"
    #: The server accepted us.
    JOINED = "joined"
    #: The server refused or disconnected us, or the connection broke.
    DISCONNECTED = "disconnected"
    #: :meth:`HiSockClient.close` was called.
    CLOSED = "closed"


class _RecvWaiter:
    __slots__ = ("command", "result")

    def __init__(self, command: Optional[str]):
        self.command = command
        self.result = AsyncResult()


class HiSockClient:
    """The client class for HiSock.

    :param addr: ``(ip, port)`` of the server.
    :param name: the name to go by, or None.
    :param group: the group to join, or None.
    :param header_len: width of every frame header; must match the server's.
    :param cache_size: -1 or below for no message cache, 0 for unlimited, N for the last N.
    :param connect_timeout: seconds to wait for the TCP connection.
    :param answer_timeout: seconds the server has to answer the hello (a deadline from the
        moment it was sent), and to answer a :meth:`get_client`.
    :param max_message_size: the largest frame body accepted from the server.
    :param max_queue_bytes: bytes that may wait unsent (the server not reading) before the
        connection is given up, and the most the inbox holds for handlers that fall behind.
    :param use_msgpack: offer the msgpack extension (needed for bool, None in containers,
        ClientInfo and tuples to round-trip; faster for lists and dicts).
    :param auth: credentials for the server's authentication check (anything JSON can
        carry), sent in the hello.
    :param ssl_context: connect with TLS using this context; or give ``cafile`` (the CA
        that signed the server's certificate) and optionally ``certfile``/``keyfile``.
    :param server_hostname: the name the server's certificate must match (default: the
        address's host).
    :param max_nesting: deepest container nesting accepted in a received payload.
    :param max_items: most elements accepted in one received payload.
    :raises TypeError: the address is not a tuple.
    :raises ServerNotRunning: nothing accepts connections at ``addr``.
    :raises TLSError: the TLS handshake failed (e.g. the server does not speak TLS).

    A refusal by the server (full, or its checks said no) is not raised here but where the
    answer is first needed: :meth:`wait_joined`, :meth:`recv`, :meth:`get_client` and
    sends whose bytes depend on the dialect raise :class:`ConnectionRejected` (or
    :class:`AuthenticationFailed`); :meth:`start` runs ``force_disconnect`` and returns.

    :ivar addr: the server's address.  :ivar name: our name.  :ivar group: our group.
    :ivar header_len: the header width.  :ivar funcs: the handlers registered with :meth:`on`.
    :ivar cache: the message cache (MessageCacheMember items).
    :ivar connect_time: Unix time the connection was made.
    :ivar state: a :class:`ClientState`.
    """

    def __init__(
        self,
        addr: Tuple[str, int],
        name: Optional[str] = None,
        group: Optional[str] = None,
        header_len: int = DEFAULT_HEADER_LEN,
        cache_size: int = -1,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        answer_timeout: float = DEFAULT_ANSWER_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        use_msgpack: bool = True,
        auth: Any = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        cafile: Optional[str] = None,
        certfile: Optional[str] = None,
        keyfile: Optional[str] = None,
        server_hostname: Optional[str] = None,
        max_nesting: int = typecast.DEFAULT_MAX_DEPTH,
        max_items: int = typecast.DEFAULT_MAX_ITEMS,
    ):
        if not isinstance(addr, tuple) or len(addr) != 2:
            raise TypeError(f"addr must be a two-element tuple (ip, port), not {addr!r}")
        for label, value in (("name", name), ("group", group)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{label} must be a str or None, not {type(value).__name__}")
        self.addr = addr
        self.name = name
        self.group = group
        self._connect_name = name
        self._connect_group = group
        self.header_len = header_len
        self.cache_size = cache_size
        self.cache: List[MessageCacheMember] = []
        self.answer_timeout = answer_timeout
        self.max_queue_bytes = max_queue_bytes
        self.max_nesting = max_nesting
        self.max_items = max_items
        self._handlers = HandlerTable(CLIENT_RESERVED, CLIENT_UNRESERVED_ARGS)
        self.funcs = self._handlers.funcs
        self._home = Home()
        self._runner = HandlerRunner(self._home, "client")
        self._callback: Optional[Callable[[], Any]] = None

        self.state = ClientState.HELLO_SENT
        self.msgpack_ok = False
        # Why the server refused us, raised where the answer is needed.
        self._refusal: Optional[ConnectionRejected] = None
        self._handshake = ClientHandshake(
            name, group, (CAPABILITY_MSGPACK,) if use_msgpack else (), auth, header_len, max_message_size
        )
        self._early: List[ServerMessage] = []  # answered before a hub took over
        self._answered: Optional[Event] = None
        self._conn: Optional[Connection] = None
        self._inbox: Optional[Inbox] = None
        self._reader: Optional[gevent.Greenlet] = None
        self._dispatching = False
        self._recv_waiters: Deque[_RecvWaiter] = collections.deque()
        self._getclt_waiters: Deque[AsyncResult] = collections.deque()
        # Guards the hand-over of the plain socket to a hub (and what is done before it).
        self._bind_lock = _allocate_lock()

        sock = self._connect(connect_timeout)
        self._plain_sock: Optional[_stdlib_socket.socket] = sock
        self._client_addr: Tuple[str, int] = sock.getsockname()[:2]
        self.connect_time = time.time()
        if ssl_context is None and (cafile is not None or certfile is not None):
            ssl_context = client_context(cafile, certfile, keyfile)
        self._tls: Optional[TLSLayer] = None
        # Writes before a hub owns the socket: never blocking, bounded by max_queue_bytes.
        self._plain_writer = PlainWriter(sock, max_queue_bytes)
        try:
            if ssl_context is not None:
                self._tls = self._tls_handshake(sock, ssl_context, server_hostname or addr[0])
            self._plain_send(frame(self._handshake.hello_body(), header_len))
        except BaseException:
            sock.close()
            self.state = ClientState.CLOSED
            raise
        self._answer_deadline = time.monotonic() + answer_timeout

    def _connect(self, timeout: float) -> _stdlib_socket.socket:
        addr = self.addr
        try:
            sock = _stdlib_socket.create_connection(addr, timeout=timeout)
        except (ConnectionRefusedError, _stdlib_socket.timeout) as exc:
            raise ServerNotRunning(f"no HiSock server is accepting connections at {iptup_to_str(addr)}: {exc}") from exc
        except OSError as exc:
            raise ServerNotRunning(f"cannot connect to {iptup_to_str(addr)}: {exc}") from exc
        set_nodelay(sock)
        sock.settimeout(None)
        return sock

    def _tls_handshake(self, sock: _stdlib_socket.socket, context: ssl.SSLContext, hostname: str) -> TLSLayer:
        layer = TLSLayer(context, server_side=False, server_hostname=hostname)
        sock.settimeout(self.answer_timeout)
        try:
            perform_handshake(layer, sock.recv, sock.sendall)
        except _stdlib_socket.timeout as exc:
            raise TLSError(f"no TLS handshake answer within {self.answer_timeout} s") from exc
        except OSError as exc:
            raise TLSError(f"the connection failed during the TLS handshake: {exc}") from exc
        finally:
            sock.settimeout(None)
        return layer

    def __repr__(self) -> str:
        return f"<HiSockClient connected to {iptup_to_str(self.addr)}>"

    def __enter__(self) -> HiSockClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once the connection is over (closed by us, or ended by the server)."""
        return self.state is ClientState.CLOSED or self.state is ClientState.DISCONNECTED

    @property
    def connected(self) -> bool:
        """True while the connection is up (the answer may still be on its way)."""
        return not self.closed

    # ------------------------------------------------------------------ the answer to our hello

    def wait_joined(self, timeout: Optional[float] = None) -> None:
        """Block until the server has accepted our hello (not part of HiSock's API).

        :param timeout: seconds to wait at most; by default what is left of ``answer_timeout``.
        :raises ConnectionRejected: the server refused us, broke the protocol, or did not
            answer in time.  :raises AuthenticationFailed: its check refused ``auth``.
        :raises ClientDisconnected: the client is closed.
        """
        if self.state is ClientState.JOINED:
            return
        if self._refusal is not None:
            raise self._refusal
        if self.state is ClientState.CLOSED:
            raise ClientDisconnected("the client is closed")
        if timeout is None:
            timeout = max(0.0, self._answer_deadline - time.monotonic())
        with self._bind_lock:
            unbound = self._conn is None and self._plain_sock is not None
            if unbound:
                self._read_answer_here(timeout)
        if not unbound:
            self._home.call(self._wait_answer_on_hub, timeout)
        if self._refusal is not None:
            raise self._refusal
        if self.state is not ClientState.JOINED:
            raise ClientDisconnected("the connection to the server closed")

    def _read_answer_here(self, timeout: float) -> None:
        """No hub owns the socket yet: read the answer from it directly (the lock is held)."""
        sock = self._plain_sock
        assert sock is not None
        deadline = time.monotonic() + timeout
        try:
            while self.state is ClientState.HELLO_SENT:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectionRejected(f"the server did not answer our hello within {self.answer_timeout} s")
                sock.settimeout(remaining)
                try:
                    data = sock.recv(RECV_CHUNK)
                except _stdlib_socket.timeout:
                    continue
                except OSError as exc:
                    raise ConnectionRejected(f"the connection failed during the handshake: {exc}") from exc
                if not data:
                    hint = "" if self._tls is not None else " (does the server expect TLS?)"
                    raise ConnectionRejected(f"the server closed the connection during the handshake{hint}")
                if self._tls is not None:
                    data, reply = self._tls.receive(data)
                    if reply:
                        self._plain_send(reply)
                answer = self._handshake.receive_data(data)
                if answer is not None:
                    self._accept(answer)
                    self._early = answer.early
        except ConnectionRejected as exc:
            self._refuse(exc)
            sock.close()
            self._plain_sock = None
        finally:
            if self._plain_sock is not None:
                sock.settimeout(None)

    def _wait_answer_on_hub(self, timeout: float) -> None:
        answered = self._answered
        assert answered is not None
        if not answered.wait(timeout) and self.state is ClientState.HELLO_SENT:
            self._refuse(ConnectionRejected(f"the server did not answer our hello within {self.answer_timeout} s"))
            self._finish(forced=True)

    def _accept(self, answer: Answer) -> None:
        self.msgpack_ok = answer.accepts(CAPABILITY_MSGPACK)
        self.state = ClientState.JOINED
        if self._answered is not None:
            self._answered.set()

    def _refuse(self, exc: ConnectionRejected) -> None:
        if self._refusal is None:
            self._refusal = exc
        logger.info("the server at %s refused us: %s", iptup_to_str(self.addr), exc)
        self.state = ClientState.DISCONNECTED
        if self._answered is not None:
            self._answered.set()

    def _answer_overdue(self) -> None:
        if self.state is ClientState.HELLO_SENT:
            self._refuse(ConnectionRejected(f"the server did not answer our hello within {self.answer_timeout} s"))
            self._finish(forced=True)

    # ------------------------------------------------------------------ binding to a hub

    def _bind_here(self) -> None:
        """Adopt the calling thread's hub as home, if no hub owns the client yet."""
        if self._conn is not None:
            return
        with self._bind_lock:
            if self._conn is not None:
                return
            self._home.adopt_current_thread()
            self._inbox = Inbox(self.max_queue_bytes)
            self._answered = Event()
            if self._plain_sock is None:  # over before ever being bound
                self._answered.set()
                self._inbox.put_now(Ended(forced=self._refusal is not None))
                return
            unsent = self._plain_writer.take_over()
            gsock = gsocket.socket(fileno=self._plain_sock.detach())
            self._plain_sock = None
            self._conn = Connection(
                gsock, self.addr, self.header_len, self._handshake.parser.max_body_len, self.max_queue_bytes,
                self._on_overflow, self._handshake.parser, self._tls,
            )
            for chunk in unsent:  # written before the hub took over, not yet on the wire
                self._conn.send_raw(chunk)
            if self.state is ClientState.JOINED:
                self._answered.set()
                early, self._early = self._early, []
                for message in early:
                    self._route(message)
            else:
                watchdog = gevent.spawn_later(max(0.0, self._answer_deadline - time.monotonic()), self._answer_overdue)
                self._answered.rawlink(lambda _: watchdog.kill(block=False))
            self._reader = gevent.spawn(self._read_loop)

    def _at_home(self, func: Callable[..., Any], *args: Any) -> Any:
        """Bind if needed, then run ``func`` on the home hub."""
        if self._conn is None and self._home.ident is None:
            self._bind_here()
        return self._home.call(func, *args)

    def _plain_send(self, data: bytes) -> None:
        """Write on the socket we have before a hub adopts it (through TLS if any), without
        waiting for the server.

        :raises WriterFailed: (an OSError) the connection failed or the server is not reading.
        """
        self._plain_writer.write(self._tls.encrypt(data) if self._tls is not None else data)

    def _write(self, data: bytes) -> None:
        """Send a whole frame, on the hub once bound, with the plain socket before that."""
        if self.closed:
            raise self._refusal or ClientDisconnected("the client is closed")
        if self._conn is None:
            with self._bind_lock:
                if self._conn is None:
                    if self._plain_sock is None:
                        raise self._refusal or ClientDisconnected("the client is closed")
                    try:
                        self._plain_send(data)
                    except OSError as exc:
                        raise ClientDisconnected(str(exc)) from exc
                    return
        self._home.call(self._write_here, data)

    def _write_here(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            raise ClientDisconnected("the connection to the server is closed")
        conn.send(data)
        if conn.queued_bytes and gevent.getcurrent().parent is None and not Home.program_is_patched():
            # The thread's main greenlet of a plain program may not enter gevent again for
            # a while: finish the write now, as a blocking socket would.
            conn.flush()

    # ------------------------------------------------------------------ reading

    def _read_loop(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            bodies = conn.bodies()
            if self.state is ClientState.HELLO_SENT:
                self._read_answer(bodies)
            for body in bodies:
                if not self._route(parse_server_body(body)):
                    return
        except RemoteProtocolError as exc:
            logger.warning("closing the connection to %s: %s", iptup_to_str(self.addr), exc)
        except ConnectionRejected as exc:
            self._refuse(exc)
            self._finish(forced=True)
        finally:
            if not self.closed:
                self._finish(forced=False)

    def _read_answer(self, bodies: Any) -> None:
        """The hub owns the socket before the answer came: take it from the reader's frames."""
        handshake = self._handshake
        for body in bodies:
            answer = handshake.receive_message(parse_server_body(body), len(body))
            if answer is not None:
                self._accept(answer)
                for message in answer.early:
                    if not self._route(message):
                        return
                return
        raise ConnectionRejected("the server closed the connection during the handshake")

    def _route(self, message: ServerMessage) -> bool:
        """Act on one message from the server; False once the server has disconnected us."""
        return _ROUTES[type(message)](self, message)

    def _route_command(self, message: Command) -> bool:
        content = typecast.decode(
            message.fmt, message.payload, max_depth=self.max_nesting, max_items=self.max_items, pause=yield_to_loop
        )
        if message.command == GETCLT_COMMAND and self._getclt_waiters:
            self._getclt_waiters.popleft().set(content)
        else:
            assert self._inbox is not None
            self._inbox.put(Received(message.command, content, message), len(message.payload))
        return True

    def _route_keepalive(self, message: KeepAlive) -> bool:
        conn = self._conn
        if conn is not None:
            conn.send(frame(KeepAck().to_body(), self.header_len))
        return True

    def _route_joined(self, message: PeerJoined) -> bool:
        assert self._inbox is not None
        self._inbox.put(PeerEvent("client_connect", ClientInfo.from_dict(message.info)))
        return True

    def _route_left(self, message: PeerLeft) -> bool:
        assert self._inbox is not None
        self._inbox.put(PeerEvent("client_disconnect", ClientInfo.from_dict(message.info)))
        return True

    def _route_disconnect(self, message: Disconnect) -> bool:
        why = f": {message.reason}" if message.reason else ""
        logger.info("the server at %s disconnected us%s", iptup_to_str(self.addr), why)
        self._finish(forced=True)
        return False

    def _finish(self, forced: bool) -> None:
        """The connection ended: close it, wake every waiter, and tell the dispatcher."""
        if not self.closed:
            self.state = ClientState.DISCONNECTED
        if self._conn is not None:
            self._conn.close()
        if self._answered is not None:
            self._answered.set()
        # recv() waiters are woken by the dispatcher when it reaches the end marker, so
        # everything that arrived before the end (and force_disconnect) is handled first.
        while self._getclt_waiters:
            self._getclt_waiters.popleft().set_exception(ClientDisconnected("the connection to the server closed"))
        if self._inbox is not None:
            self._inbox.put_now(Ended(forced))

    def _on_overflow(self, conn: Connection) -> None:
        logger.warning("the server at %s is not reading; closing", iptup_to_str(self.addr))
        self._finish(forced=False)

    # ------------------------------------------------------------------ dispatching

    def _handle(self, record: Record) -> bool:
        """Dispatch one inbox record; False when the connection has ended."""
        if not _HANDLES[type(record)](self, record):
            return False
        if self._callback is not None:
            try:
                self._callback()
            except Exception as exc:
                self._runner.report(exc, ("callback", None, None))
        return True

    def _handle_received(self, record: Received) -> bool:
        command, content = record.command, record.content
        for waiter in self._recv_waiters:
            if waiter.command is None or waiter.command == command:
                self._recv_waiters.remove(waiter)
                waiter.result.set(content)
                self._remember(record, called=True)
                return True
        entry = self._handlers.command_handler(command)
        called = True
        if entry is not None:
            self._runner.call(entry, (content,), ("", command, None))
        else:
            catch_all = self._handlers.reserved_handler("*")
            if catch_all is not None:
                self._runner.call(catch_all, (command, content), ("*", command, None))
            else:
                called = False
                logger.debug("no handler for command %r", command)
        self._remember(record, called)
        return True

    def _handle_peer_event(self, record: PeerEvent) -> bool:
        entry = self._handlers.reserved_handler(record.event)
        if entry is not None:
            self._runner.call(entry, (record.info,), (record.event, None, None))
        return True

    def _handle_ended(self, record: Ended) -> bool:
        if record.forced:
            entry = self._handlers.reserved_handler("force_disconnect")
            if entry is not None:
                self._runner.call(entry, (), ("force_disconnect", None, None))
        failure = self._refusal or ClientDisconnected("the connection to the server closed")
        while self._recv_waiters:
            self._recv_waiters.popleft().result.set_exception(failure)
        # Leave the marker for any other loop still waiting on the inbox.
        assert self._inbox is not None
        self._inbox.put_now(Ended(forced=False))
        return False

    def _remember(self, record: Received, called: bool) -> None:
        if self.cache_size >= 0:
            member = MessageCacheMember(header=len(record.message.to_body()), content=record.content, called=called, command=record.command)
            remember(self.cache, self.cache_size, member)

    def start(self, callback: Optional[Callable[[], Any]] = None, error_handler: Optional[Callable[[BaseException], Any]] = None) -> None:
        """Receive and dispatch messages until the client is closed or disconnected.

        Blocks the calling greenlet.  The client belongs to the thread that first calls
        this (or :meth:`recv`); use :class:`ThreadedHiSockClient` to run it in the background.

        :param callback: called after every message is handled.
        :param error_handler: called with each exception a handler raises; without one it
            is logged.  Either way the client keeps running.
        """
        self._callback = callback
        self._runner.error_handler = error_handler
        self._bind_here()
        if not self._home.is_here():
            raise ClientException(
                "start() must run on the thread the client is bound to; "
                "use ThreadedHiSockClient to run a client in the background"
            )
        self._dispatch_loop()

    def _dispatch_loop(self) -> None:
        inbox = self._inbox
        assert inbox is not None
        self._dispatching = True
        turn = FRAMES_PER_TURN
        try:
            while self._handle(inbox.get()):
                turn -= 1
                if turn <= 0:
                    # A full inbox never makes get() wait: let the hub's other work run.
                    turn = FRAMES_PER_TURN
                    yield_to_loop()
        finally:
            self._dispatching = False

    # ------------------------------------------------------------------ API

    def on(self, command: str, threaded: bool = False, override: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function for ``command`` or a reserved event.

        Reserved events: ``client_connect(client)``, ``client_disconnect(client)``,
        ``force_disconnect()`` and ``*`` ``(command, content)``.  Other handlers take () or
        (content).

        :raises TypeError: wrong number of arguments.  :raises ValueError: reserved ``$...$`` command.
        """

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            self._handlers.register(command, func, threaded, override)
            return func

        return decorator

    def send(self, command: str, content: Sendable = None) -> None:
        """Send ``command`` and ``content`` to the server.

        Content whose bytes depend on the dialect the server accepted (floats, containers)
        waits for the server's answer to our hello first; a str, bytes, int or None does
        not.

        :raises ValueError: the command is reserved.  :raises InvalidTypeCast: the content
            cannot be sent to this server.  :raises ClientDisconnected: the client is closed.
        :raises ConnectionRejected: the server refused us.
        """
        outgoing = OutgoingCommand(command, content, self.header_len)
        if self.state is not ClientState.JOINED and type(content) not in _DIALECT_FREE:
            self.wait_joined()
        self._write(outgoing.frame_for(self.msgpack_ok))

    def recv(self, recv_on: Optional[str] = None, recv_as: Optional[type] = None, timeout: Optional[float] = None) -> Any:
        """Block until a command message arrives (``recv_on`` or any) and return its content.

        The message is returned instead of being passed to its handler.  While no
        :meth:`start` loop runs, other messages that arrive meanwhile go to their handlers.

        :param recv_as: convert the content to this type (e.g. ``str``, ``int``, ``bytes``).
        :param timeout: seconds to wait; None for no limit.
        :raises ClientDisconnected: the connection closed first.
        :raises ConnectionRejected: the server refused us.
        :raises gevent.Timeout: (a ``TimeoutError`` too) nothing came in time.
        """
        content = self._at_home(self._recv_here, recv_on, timeout)
        if recv_as is not None and not isinstance(content, recv_as):
            if recv_as is bytes and isinstance(content, str):
                return content.encode()
            if recv_as is str and isinstance(content, bytes):
                return content.decode()
            return recv_as(content)
        return content

    def _recv_here(self, recv_on: Optional[str], timeout: Optional[float]) -> Any:
        if self.closed and (self._inbox is None or self._inbox.empty()):
            raise self._refusal or ClientDisconnected("the client is closed")
        waiter = _RecvWaiter(recv_on)
        self._recv_waiters.append(waiter)
        try:
            with gevent.Timeout(timeout, TimeoutError(f"no message within {timeout} s")):
                if not self._dispatching:
                    # Nobody dispatches: we do, until our message is in.  If the connection
                    # ends first, the dispatcher fails every waiter with ClientDisconnected.
                    assert self._inbox is not None
                    while not waiter.result.ready() and self._handle(self._inbox.get()):
                        pass
                return waiter.result.get()
        finally:
            if waiter in self._recv_waiters:
                self._recv_waiters.remove(waiter)

    def change_name(self, new_name: Optional[str]) -> None:
        """Change our name; None (or "") goes back to the name we connected with."""
        self._write(frame(ChangeName(new_name or "").to_body(), self.header_len))
        self.name = new_name or self._connect_name

    def change_group(self, new_group: Optional[str]) -> None:
        """Change our group; None (or "") goes back to the group we connected with."""
        self._write(frame(ChangeGroup(new_group or "").to_body(), self.header_len))
        self.group = new_group or self._connect_group

    def get_client(self, client: Union[str, Tuple[str, int], ClientInfo]) -> ClientInfo:
        """Ask the server about a client, named by name, ``(ip, port)``, ``"ip:port"`` or ClientInfo.

        :raises ClientNotFound: the server knows no such client.
        :raises ValueError: the client is named in a wrong format.
        """
        if isinstance(client, ClientInfo):
            query = client.ipstr
        elif isinstance(client, tuple):
            if len(client) != 2:
                raise ValueError(f"a client address is a tuple (ip, port), not {client!r}")
            query = iptup_to_str(client)
        elif isinstance(client, str):
            query = client
        else:
            raise ValueError(f"a client is named by name, (ip, port) or ClientInfo, not {type(client).__name__}")
        if self._conn is None and self._home.ident is None:
            self._bind_here()
        self.wait_joined()
        answer = self._home.call(self._get_client_here, query)
        if not isinstance(answer, dict) or answer.get("traceback") == NO_SUCH_CLIENT or "ip" not in answer:
            raise ClientNotFound(f"the server knows no client {query!r}")
        try:
            return ClientInfo.from_dict(answer)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise ClientException(f"the server's answer about {query!r} is not a client info: {answer!r}") from exc

    def _get_client_here(self, query: str) -> Any:
        result = AsyncResult()
        self._getclt_waiters.append(result)
        self._write_here(frame(GetClient(query).to_body(), self.header_len))
        try:
            return result.get(timeout=self.answer_timeout)
        except gevent.Timeout as exc:
            raise ClientException(f"the server did not answer get_client within {self.answer_timeout} s") from exc
        finally:
            if result in self._getclt_waiters:
                self._getclt_waiters.remove(result)

    def get_server_addr(self) -> Tuple[str, int]:
        """The ``(ip, port)`` of the server."""
        return self.addr

    def get_client_addr(self) -> Tuple[str, int]:
        """Our own ``(ip, port)`` as the server sees it on this machine."""
        return self._client_addr

    def get_cache(self, idx: Union[int, slice, None] = None) -> Any:
        """The message cache, or one entry (or slice) of it."""
        return self.cache if idx is None else self.cache[idx]

    def close(self, emit_leave: bool = True) -> None:
        """Leave: tell the server (unless ``emit_leave`` is False), then close the connection.

        A running :meth:`start` returns; a blocked :meth:`recv` raises ClientDisconnected.
        Calling it again does nothing.
        """
        if self.closed:
            self.state = ClientState.CLOSED  # the server ended it already; nothing is open
            return
        with self._bind_lock:
            plain = self._plain_sock
            if plain is not None:
                self.state = ClientState.CLOSED
                self._plain_sock = None
        if plain is not None:
            # No lock is held while the goodbye (and what was sent before it) drains.
            if emit_leave and self._refusal is None:
                try:
                    self._plain_send(frame(UserClose().to_body(), self.header_len))
                except OSError:
                    pass
            self._plain_writer.flush(DEFAULT_CLOSE_TIMEOUT)
            self._plain_writer.stop()
            plain.close()
            return
        if self._conn is None:
            self.state = ClientState.CLOSED  # refused before a hub owned it: nothing is open
            return
        self._home.call(self._close_here, emit_leave)

    def _close_here(self, emit_leave: bool) -> None:
        if self.closed:
            self.state = ClientState.CLOSED
            return
        conn = self._conn
        if conn is not None and emit_leave and not conn.closed:
            conn.send(frame(UserClose().to_body(), self.header_len))
            conn.close(DEFAULT_CLOSE_TIMEOUT)
        self._finish(forced=False)
        self.state = ClientState.CLOSED
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)


#: Message from the server -> what the reader does with it; False ends the connection.
_ROUTES: Dict[type, Callable[[HiSockClient, Any], bool]] = {
    Command: HiSockClient._route_command,
    KeepAlive: HiSockClient._route_keepalive,
    PeerJoined: HiSockClient._route_joined,
    PeerLeft: HiSockClient._route_left,
    Disconnect: HiSockClient._route_disconnect,
}
#: Inbox record -> what the dispatcher does with it; False once the connection has ended.
_HANDLES: Dict[type, Callable[[HiSockClient, Any], bool]] = {
    Received: HiSockClient._handle_received,
    PeerEvent: HiSockClient._handle_peer_event,
    Ended: HiSockClient._handle_ended,
}


class ThreadedHiSockClient(HiSockClient):
    """HiSockClient running in the background so it does not block the caller.

    In a plain program the client gets its own OS thread and gevent hub (a Tkinter, pygame
    or threading program keeps running); in a monkey-patched program a greenlet.  Methods
    are safe to call from any thread.
    """

    _greenlet: Optional[gevent.Greenlet] = None

    def start(self, callback: Optional[Callable[[], Any]] = None, error_handler: Optional[Callable[[BaseException], Any]] = None) -> None:
        """Start receiving and dispatching in the background; returns at once."""
        if self._greenlet is not None or self._home.ident is not None:
            return
        self._callback = callback
        self._runner.error_handler = error_handler

        def run() -> None:
            self._bind_here()
            self._dispatch_loop()

        if Home.program_is_patched():
            self._bind_here()
            self._greenlet = gevent.spawn(self._dispatch_loop)
        else:
            self._home.start_thread(run, "hisock-client")

    def close(self, emit_leave: bool = True) -> None:
        """Close the client and block until its background loop has stopped."""
        super().close(emit_leave)
        if self._greenlet is not None:
            self._greenlet.join(DEFAULT_CLOSE_TIMEOUT * 2)
        else:
            self._home.join_thread(DEFAULT_CLOSE_TIMEOUT * 3)

    def join(self, timeout: Optional[float] = None) -> None:
        """Block until the client is closed or disconnected."""
        if self._greenlet is not None:
            self._greenlet.join(timeout)
        else:
            self._home.join_thread(timeout)


def connect(addr: Tuple[str, int], name: Optional[str] = None, group: Optional[str] = None, header_len: int = DEFAULT_HEADER_LEN, cache_size: int = -1, **kwargs: Any) -> HiSockClient:
    """Connect to a HiSock server and return a :class:`HiSockClient`.

    :raises ServerNotRunning: nothing accepts connections at ``addr`` (at once).
    Keyword arguments are :class:`HiSockClient`'s (``connect_timeout``, ``answer_timeout``,
    ``max_message_size``, ``max_queue_bytes``, ``use_msgpack``, ``auth``, ``ssl_context``,
    ``cafile``, ``certfile``, ``keyfile``, ``server_hostname``, ``max_nesting``,
    ``max_items``).
    """
    return HiSockClient(addr, name, group, header_len, cache_size, **kwargs)


def threaded_connect(*args: Any, **kwargs: Any) -> ThreadedHiSockClient:
    """Connect and return a :class:`ThreadedHiSockClient`; arguments as :func:`connect`."""
    return ThreadedHiSockClient(*args, **kwargs)
