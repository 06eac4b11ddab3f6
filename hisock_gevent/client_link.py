"""A client's connection to its server, before and after a gevent hub owns it.

:class:`ClientLink` connects (TCP, then TLS when asked), sends the hello and knows where
the handshake stands (:class:`ClientState`).  Until a hub owns the socket it writes with
a :class:`~hisock_gevent.plainwriter.PlainWriter` (never blocking) and, when someone needs
the server's answer, reads it straight from the socket into the Sans-I/O
:class:`~hisock_gevent.protocol.ClientHandshake`.  :meth:`ClientLink.bind` hands the
socket to the calling thread's hub: one reader greenlet then takes the answer (if it has
not come yet) and every later message, answers keepalives and ``$GETCLT$`` questions, and
puts the rest in the :class:`~hisock_gevent.inbox.Inbox` as typed records for the
client's dispatcher.  Handlers are not called here.
"""

from __future__ import annotations

import collections
import enum
import logging
import socket as _stdlib_socket
import ssl
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import gevent
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event

from . import typecast
from .calls import PendingCalls
from .connection import RECV_CHUNK, Connection, yield_to_loop
from .dial import dial, tls_handshake
from .errors import (
    CallError,
    CallTimeout,
    ClientDisconnected,
    ClientException,
    ConnectionRejected,
    RemoteProtocolError,
)
from .frames import frame
from .home import Home, _allocate_lock
from .inbox import CallRequest, Ended, Inbox, PeerEvent, Received
from .messages import (
    CAPABILITY_CALL,
    CAPABILITY_MSGPACK,
    GETCLT_COMMAND,
    Call,
    CallFailed,
    Command,
    Disconnect,
    GetClient,
    KeepAck,
    KeepAlive,
    PeerJoined,
    PeerLeft,
    Reply,
    ServerMessage,
    UserClose,
    call_body,
    parse_server_body,
)
from .plainwriter import PlainWriter
from .protocol import Answer, ClientHandshake
from .tls import TLSLayer
from .utils import ClientInfo, iptup_to_str

__all__ = ["ClientLink", "ClientState", "decoder", "DEFAULT_CLOSE_TIMEOUT"]

logger = logging.getLogger("hisock_gevent")

#: Seconds queued frames get to reach the server on close.
DEFAULT_CLOSE_TIMEOUT = 2.0


class ClientState(enum.Enum):
    """Where a client is in its life."""

    #: The hello is sent; the server has not answered yet.
    HELLO_SENT = "hello sent"
    #: The server accepted us.
    JOINED = "joined"
    #: The server refused or disconnected us, or the connection broke.
    DISCONNECTED = "disconnected"
    #: The client was closed.
    CLOSED = "closed"


class ClientLink:
    """The connection of one client (see the module's docstring).

    :param handshake: the client's side of the opening handshake (it has the hello).
    :param max_queue_bytes: what may wait unsent, and what the inbox may hold.
    :param answer_timeout: seconds from the hello for the server to answer it (and to
        answer a ``$GETCLT$``).
    :param decode: turns a command's fmt and payload into its content.
    :raises ServerNotRunning: nothing accepts connections at ``addr``.
    :raises TLSError: the TLS handshake failed.
    """

    def __init__(
        self,
        addr: Tuple[str, int],
        home: Home,
        handshake: ClientHandshake,
        header_len: int,
        max_queue_bytes: int,
        answer_timeout: float,
        connect_timeout: float,
        decode: Callable[[bytes, bytes], Any],
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        cooperative: bool = False,
    ):
        self.addr = addr
        self.home = home
        self.handshake = handshake
        self.header_len = header_len
        self.max_queue_bytes = max_queue_bytes
        self.answer_timeout = answer_timeout
        self.decode = decode
        self.state = ClientState.HELLO_SENT
        self.msgpack_ok = False
        #: True once the server accepted the ``call`` extension.
        self.call_ok = False
        #: The largest body the server accepts, once it said so (None: not known).
        self.server_max_message_size: Optional[int] = None
        #: Why the server refused us (raised where the answer is needed), or None.
        self.refusal: Optional[ConnectionRejected] = None
        #: The reason that came with the server's ``$DISCONN$``, if any.
        self.disconnect_reason: Optional[str] = None
        #: ``on_lost(forced)`` is asked, on the hub, when the connection ends without our
        #: closing it; True means the owner takes over (it reconnects) and the dispatcher
        #: is not told the end.
        self.on_lost: Optional[Callable[[bool], bool]] = None
        self._closing = False
        #: The inbox, once a hub owns the link.
        self.inbox: Optional[Inbox] = None
        self._early: List[ServerMessage] = []  # answered before a hub took over
        self._answered: Optional[Event] = None
        self._conn: Optional[Connection] = None
        self._reader: Optional[gevent.Greenlet] = None
        self._getclt_waiters: Deque[AsyncResult] = collections.deque()
        #: Our calls waiting for their answer.
        self.calls = PendingCalls()
        # Guards the hand-over of the plain socket to a hub (and what is done before it).
        self._lock = _allocate_lock()

        # A reconnecting client connects from its hub: cooperatively, so that the hub
        # (its dispatcher, a close() from another thread) is not held up meanwhile.
        sock = dial(addr, connect_timeout, cooperative)
        self._plain_sock: Optional[_stdlib_socket.socket] = sock
        #: Our own (ip, port) as seen on this machine.
        self.local_addr: Tuple[str, int] = sock.getsockname()[:2]
        #: Unix time the connection was made.
        self.connect_time = time.time()
        self._tls: Optional[TLSLayer] = None
        # Writes before a hub owns the socket: never blocking, bounded by max_queue_bytes.
        self._plain_writer = PlainWriter(sock, max_queue_bytes)
        try:
            if ssl_context is not None:
                # On a hub (a reconnection), wait for the server cooperatively.
                on_hub = gevent.getcurrent().parent is not None
                self._tls = tls_handshake(sock, ssl_context, server_hostname or addr[0], answer_timeout, on_hub)
            self._plain_send(frame(handshake.hello_body(), header_len))
        except BaseException:
            sock.close()
            self.state = ClientState.CLOSED
            raise
        self._answer_deadline = time.monotonic() + answer_timeout

    @property
    def closed(self) -> bool:
        return self.state is ClientState.CLOSED or self.state is ClientState.DISCONNECTED

    @property
    def bound(self) -> bool:
        """True once a hub owns the link (or it ended before one did)."""
        return self.inbox is not None

    def failure(self) -> BaseException:
        """What an operation on the ended link raises: the refusal, or ClientDisconnected."""
        return self.refusal or ClientDisconnected("the connection to the server is closed")

    # ------------------------------------------------------------------ the answer to our hello

    def wait_joined(self, timeout: Optional[float] = None) -> None:
        """Block until the server has accepted our hello (see HiSockClient.wait_joined)."""
        if self.state is ClientState.JOINED:
            return
        if self.closed:
            raise self.failure()
        if timeout is None:
            timeout = max(0.0, self._answer_deadline - time.monotonic())
        with self._lock:
            unbound = self._conn is None and self._plain_sock is not None
            if unbound:
                self._read_answer_here(timeout)
        if not unbound:
            self.home.call(self._wait_answer_on_hub, timeout)
        if self.state is not ClientState.JOINED:
            raise self.failure()

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
                answer = self.handshake.receive_data(data)
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
        if not answered.wait(timeout):
            self._answer_overdue()

    def _answer_overdue(self) -> None:
        if self.state is ClientState.HELLO_SENT:
            self._refuse(ConnectionRejected(f"the server did not answer our hello within {self.answer_timeout} s"))
            self.finish(forced=True)

    def _accept(self, answer: Answer) -> None:
        self.msgpack_ok = answer.accepts(CAPABILITY_MSGPACK)
        self.call_ok = answer.accepts(CAPABILITY_CALL)
        self.server_max_message_size = answer.max_message_size
        self.state = ClientState.JOINED
        if self._answered is not None:
            self._answered.set()

    def _refuse(self, exc: ConnectionRejected) -> None:
        if self.refusal is None:
            self.refusal = exc
            self.disconnect_reason = self.handshake.refused_reason
        logger.info("the server at %s refused us: %s", iptup_to_str(self.addr), exc)
        self.state = ClientState.DISCONNECTED
        if self._answered is not None:
            self._answered.set()

    # ------------------------------------------------------------------ binding to a hub

    def bind(self, inbox: Optional[Inbox] = None) -> None:
        """Adopt the calling thread's hub as home, if no hub owns the link yet.

        :param inbox: carry on with this inbox (a reconnection: the dispatcher keeps its).
        """
        if self.inbox is not None:
            return
        with self._lock:
            if self.inbox is not None:
                return
            if self.home.ident is None or not self.home.alive:
                self.home.adopt_current_thread()
            if inbox is None:
                inbox = Inbox(self.max_queue_bytes)
            self._answered = Event()
            if self._plain_sock is None:  # over before ever being bound
                self._answered.set()
                inbox.put_now(Ended(forced=self.refusal is not None))
                self.inbox = inbox
                return
            unsent = self._plain_writer.take_over()
            gsock = gsocket.socket(fileno=self._plain_sock.detach())
            self._plain_sock = None
            parser = self.handshake.parser
            self._conn = Connection(
                gsock, self.addr, self.header_len, parser.max_body_len, self.max_queue_bytes,
                self._on_overflow, parser, self._tls,
            )
            self.inbox = inbox
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

    # ------------------------------------------------------------------ writing

    def _plain_send(self, data: bytes) -> None:
        """Write on the socket we have before a hub adopts it (through TLS if any), without
        waiting for the server.

        :raises WriterFailed: (an OSError) the connection failed or the server is not reading.
        """
        self._plain_writer.write(self._tls.encrypt(data) if self._tls is not None else data)

    def write(self, data: bytes) -> None:
        """Send a whole frame: on the hub once bound, with the plain socket before that.

        :raises ClientDisconnected: the link is over (or the refusal, if it was refused).
        """
        if self.closed:
            raise self.failure()
        if self._conn is not None and not self.home.alive:
            raise ClientDisconnected("the client's thread has ended")
        if self._conn is None:
            with self._lock:
                if self._conn is None:
                    if self._plain_sock is None:
                        raise self.failure()
                    try:
                        self._plain_send(data)
                    except OSError as exc:
                        raise ClientDisconnected(str(exc)) from exc
                    return
        self.home.call(self._write_here, data)

    def _write_here(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            raise ClientDisconnected("the connection to the server is closed")
        conn.send(data)
        if conn.queued_bytes and gevent.getcurrent().parent is None and not Home.program_is_patched():
            # The thread's main greenlet of a plain program may not enter gevent again for
            # a while: finish the write now, as a blocking socket would.
            conn.flush()

    def ask_client(self, query: str) -> Any:
        """Ask the server about a client (``$GETCLT$``) and return its answer's content (on the hub)."""
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

    def call_here(self, command: str, command_body: bytes, timeout: float) -> Any:
        """Send a call (on the hub) and wait for its answer; nothing stays behind after.

        :raises CallError: the server's handler raised, or it has none.
        :raises CallTimeout: no answer within ``timeout``.
        :raises ClientDisconnected: the connection ended first.
        """
        if self.closed:
            raise self.failure()
        call_id, result = self.calls.open()
        try:
            self._write_here(frame(call_body(call_id, command_body), self.header_len))
            try:
                return result.get(timeout=timeout)
            except gevent.Timeout:
                raise CallTimeout(f"the server did not answer {command!r} within {timeout} s") from None
        finally:
            self.calls.take(call_id)

    def answer_call(self, body: bytes) -> None:
        """Send the answer to one of the server's calls (a Reply or CallFailed body), on the hub."""
        if self._conn is not None and not self.closed:
            self._conn.send(frame(body, self.header_len))

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
            self.finish(forced=True)
        finally:
            if not self.closed:
                self.finish(forced=False)

    def _read_answer(self, bodies: Any) -> None:
        """The hub owns the socket before the answer came: take it from the reader's frames."""
        handshake = self.handshake
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
        content = self.decode(message.fmt, message.payload)
        if message.command == GETCLT_COMMAND and self._getclt_waiters:
            self._getclt_waiters.popleft().set(content)
        else:
            assert self.inbox is not None
            self.inbox.put(Received(message.command, content, message), len(message.payload))
        return True

    def _route_keepalive(self, message: KeepAlive) -> bool:
        if self._conn is not None:
            self._conn.send(frame(KeepAck().to_body(), self.header_len))
        return True

    def _route_joined(self, message: PeerJoined) -> bool:
        assert self.inbox is not None
        self.inbox.put(PeerEvent("client_connect", ClientInfo.from_dict(message.info)))
        return True

    def _route_left(self, message: PeerLeft) -> bool:
        assert self.inbox is not None
        self.inbox.put(PeerEvent("client_disconnect", ClientInfo.from_dict(message.info)))
        return True

    def _route_call(self, message: Call) -> bool:
        command = message.command
        content = self.decode(command.fmt, command.payload)
        assert self.inbox is not None
        self.inbox.put(CallRequest(message.call_id, command.command, content), len(command.payload))
        return True

    def _route_reply(self, message: Reply) -> bool:
        result = self.calls.take(message.call_id)
        if result is not None:  # else: it timed out, and the late answer is dropped
            result.set(self.decode(message.fmt, message.payload))
        return True

    def _route_call_failed(self, message: CallFailed) -> bool:
        result = self.calls.take(message.call_id)
        if result is not None:
            result.set_exception(CallError(message.kind, message.message))
        return True

    def _route_disconnect(self, message: Disconnect) -> bool:
        self.disconnect_reason = message.reason
        why = f": {message.reason}" if message.reason else ""
        logger.info("the server at %s disconnected us%s", iptup_to_str(self.addr), why)
        self.finish(forced=True)
        return False

    def finish(self, forced: bool) -> None:
        """The connection ended: close it, wake every waiter, and tell the dispatcher."""
        if not self.closed:
            self.state = ClientState.DISCONNECTED
        if self._conn is not None:
            self._conn.close()
        if self._answered is not None:
            self._answered.set()
        while self._getclt_waiters:
            self._getclt_waiters.popleft().set_exception(ClientDisconnected("the connection to the server closed"))
        self.calls.fail_all(ClientDisconnected("the connection to the server closed before the answer"))
        if not self._closing and self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None  # asked once
            if on_lost(forced):
                return
        if self.inbox is not None:
            self.inbox.put_now(Ended(forced))

    def _on_overflow(self, conn: Connection) -> None:
        logger.warning("the server at %s is not reading; closing", iptup_to_str(self.addr))
        self.finish(forced=False)

    # ------------------------------------------------------------------ closing

    def close(self, emit_leave: bool) -> None:
        """Say goodbye (unless ``emit_leave`` is False or we were refused), then close."""
        self._closing = True
        if self.closed:
            self.state = ClientState.CLOSED  # the server ended it already; nothing is open
            return
        with self._lock:
            plain = self._plain_sock
            if plain is not None:
                self.state = ClientState.CLOSED
                self._plain_sock = None
        if plain is not None:
            # No lock is held while the goodbye (and what was sent before it) drains.
            if emit_leave:
                try:
                    self._plain_send(frame(UserClose().to_body(), self.header_len))
                except OSError:
                    pass
            self._plain_writer.flush(DEFAULT_CLOSE_TIMEOUT)
            self._plain_writer.stop()
            plain.close()
            return
        if self._conn is None:
            self.state = ClientState.CLOSED
            return
        if not self.home.alive:
            # The hub that owned the socket is gone (its thread ended): just close it.
            self.state = ClientState.CLOSED
            raw = getattr(self._conn.sock, "_sock", self._conn.sock)
            try:
                raw.close()
            except OSError:
                pass
            return
        self.home.call(self._close_here, emit_leave)

    def _close_here(self, emit_leave: bool) -> None:
        self._closing = True
        if self.closed:
            self.state = ClientState.CLOSED
            return
        conn = self._conn
        if conn is not None and emit_leave and not conn.closed:
            conn.send(frame(UserClose().to_body(), self.header_len))
            conn.close(DEFAULT_CLOSE_TIMEOUT)
        self.finish(forced=False)
        self.state = ClientState.CLOSED
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)


#: Message from the server -> what the reader does with it; False ends the connection.
_ROUTES: Dict[type, Callable[[ClientLink, Any], bool]] = {
    Command: ClientLink._route_command,
    KeepAlive: ClientLink._route_keepalive,
    PeerJoined: ClientLink._route_joined,
    PeerLeft: ClientLink._route_left,
    Disconnect: ClientLink._route_disconnect,
    Call: ClientLink._route_call,
    Reply: ClientLink._route_reply,
    CallFailed: ClientLink._route_call_failed,
}


def decoder(max_depth: int, max_items: int) -> Callable[[bytes, bytes], Any]:
    """A content decoder with these limits that pauses for the hub on long payloads."""

    def decode(fmt: bytes, payload: bytes) -> Any:
        return typecast.decode_positional(fmt, payload, max_depth, max_items, yield_to_loop)

    return decode
