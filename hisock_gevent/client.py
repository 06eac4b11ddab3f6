"""HiSockClient: HiSock's client API, speaking to HiSock and hisock_gevent servers alike.

The constructor connects (raising :class:`ServerNotRunning` at once if nothing listens),
sends the hello and returns, as HiSock's does: the server's answer is awaited on first
use, by whatever needs it (``start()``, ``recv()``, ``get_client()``, a send whose bytes
depend on the dialect the server accepted), and a refusal surfaces there.

The connection itself (TCP, TLS, the handshake, writes before and after a hub owns the
socket, the reader) is :class:`~hisock_gevent.client_link.ClientLink`'s business; this
module is the API and the dispatcher, which takes the records the link puts in the inbox
and calls the handlers.  The first call that needs to *receive* binds the client to the
calling thread's gevent hub; methods called from other threads afterwards are run there.
"""

from __future__ import annotations

import collections
import functools
import logging
import ssl
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import gevent
from gevent.event import AsyncResult

from . import typecast
from .client_link import DEFAULT_CLOSE_TIMEOUT, ClientLink, ClientState, decoder
from .connection import DEFAULT_MAX_QUEUE_BYTES, FRAMES_PER_TURN, end_turn, loop_pass
from .errors import (
    AuthenticationFailed,
    CallError,
    CallNotSupported,
    ClientDisconnected,
    ClientException,
    ClientNotFound,
    ContentTooLarge,
)
from .frames import DEFAULT_HEADER_LEN, DEFAULT_MAX_MESSAGE_SIZE, frame
from .handlers import CLIENT_RESERVED, CLIENT_UNRESERVED_ARGS, HandlerRunner, HandlerTable
from .home import Home
from .inbox import CallRequest, Ended, PeerEvent, Received, Reconnected, Record
from .messages import (
    CAPABILITY_CALL,
    CAPABILITY_MSGPACK,
    NO_SUCH_CLIENT,
    CallFailed,
    ChangeGroup,
    ChangeName,
    Reply,
)
from .outgoing import OutgoingCommand
from .protocol import CLOSING_REASON, ClientHandshake
from .reconnect import Reconnector
from .tls import client_context
from .utils import RECV_BUFFERSIZE, ClientInfo, MessageCacheMember, Sendable, iptup_to_str, remember

__all__ = ["HiSockClient", "ThreadedHiSockClient", "ClientState", "connect", "threaded_connect"]

logger = logging.getLogger("hisock_gevent")

#: Seconds to wait for the TCP connection.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds to wait for the server's answer to our hello, and for a get_client answer.
DEFAULT_ANSWER_TIMEOUT = 10.0
#: Seconds a :meth:`HiSockClient.call` waits for its answer unless told otherwise.
DEFAULT_CALL_TIMEOUT = 10.0
#: A reconnecting client's first wait (seconds), and the most it waits between attempts.
DEFAULT_RECONNECT_DELAY = 1.0
DEFAULT_RECONNECT_DELAY_MAX = 30.0
#: Content whose bytes are the same in both dialects: sent without waiting for the answer.
_DIALECT_FREE = (str, bytes, int, type(None))
#: Command messages nobody took (no waiter, no handler) are kept this long, this many at
#: most, for a recv() that comes just after them: send() then recv() cannot lose a reply
#: that overtook the recv().
UNCLAIMED_SECONDS = 5.0
UNCLAIMED_MAX = 256


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
    :param use_msgpack: offer hisock_gevent's extensions: msgpack (needed for bool, None
        in containers, ClientInfo and tuples to round-trip; faster for lists and dicts)
        and calls (:meth:`call`).  False makes the hello a plain HiSock one.
    :param auth: credentials for the server's authentication check (anything JSON can
        carry), sent in the hello.
    :param ssl_context: connect with TLS using this context (or give ``cafile``).
    :param cafile: connect with TLS, trusting the CA in this PEM file (the one that signed
        the server's certificate).
    :param certfile: with ``cafile``, a client certificate to present (PEM), for servers
        that check one.
    :param keyfile: the private key of ``certfile``, when it is not in the same file.
    :param server_hostname: the name the server's certificate must match (default: the
        address's host).
    :param max_nesting: deepest container nesting accepted in a received payload.
    :param max_items: most elements accepted in one received payload.
    :param reconnect: when the connection is lost (a reset, the server killed or closing),
        connect again and re-join with the current name and group.  The
        ``reconnect`` event fires after each re-join.  Sends made meanwhile are kept, in
        order, up to ``max_queue_bytes``.  Not after ``disconnect_client`` (the server
        meant it; a plain HiSock server's bare ``$DISCONN$`` counts as one) or a refusal
        by its authentication check; a refusal for being full is retried.
    :param reconnect_delay: the first wait before connecting again, in seconds; each
        attempt waits half to all of it (jitter), and it doubles after each failed attempt.
    :param reconnect_delay_max: the longest the doubled delay grows to.
    :param reconnect_attempts: attempts before giving up (``force_disconnect`` runs);
        0 for no limit.
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
    """

    #: HiSock's read size; informational here (the client reads up to 256 KiB at a time).
    RECV_BUFFERSIZE = RECV_BUFFERSIZE

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
        reconnect: bool = False,
        reconnect_delay: float = DEFAULT_RECONNECT_DELAY,
        reconnect_delay_max: float = DEFAULT_RECONNECT_DELAY_MAX,
        reconnect_attempts: int = 0,
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
        self.max_message_size = max_message_size
        self.max_nesting = max_nesting
        self.max_items = max_items
        self._handlers = HandlerTable(CLIENT_RESERVED, CLIENT_UNRESERVED_ARGS)
        self.funcs = self._handlers.funcs
        self._home = Home()
        self._runner = HandlerRunner(self._home, "client")
        self._callback: Optional[Callable[[], Any]] = None
        self._dispatching = False
        self._recv_waiters: Deque[_RecvWaiter] = collections.deque()
        # (time.monotonic(), record) of command messages nobody took yet (see UNCLAIMED_*).
        self._unclaimed: Deque[Tuple[float, Received]] = collections.deque(maxlen=UNCLAIMED_MAX)
        if ssl_context is None and (cafile is not None or certfile is not None):
            ssl_context = client_context(cafile, certfile, keyfile)
        self._offer = (CAPABILITY_MSGPACK, CAPABILITY_CALL) if use_msgpack else ()
        self._auth = auth
        # What a new link is made of (a reconnection makes one like the first).
        self._link_options = (header_len, max_queue_bytes, answer_timeout, connect_timeout, decoder(max_nesting, max_items), ssl_context, server_hostname)
        self._link = self._new_link(cooperative=False)
        self.connect_time = self._link.connect_time
        self._reconnector: Optional[Reconnector] = None
        if reconnect:
            self._reconnector = Reconnector(
                self._relink, self._rejoined, self._give_up, reconnect_delay, reconnect_delay_max, reconnect_attempts, max_queue_bytes
            )
            self._link.on_lost = self._lost

    def _new_link(self, cooperative: bool) -> ClientLink:
        header_len, max_queue_bytes, answer_timeout, connect_timeout, decode, ssl_context, hostname = self._link_options
        handshake = ClientHandshake(self.name, self.group, self._offer, self._auth, header_len, self.max_message_size)
        return ClientLink(
            self.addr, self._home, handshake, header_len, max_queue_bytes, answer_timeout, connect_timeout,
            decode, ssl_context, hostname, cooperative=cooperative,
        )

    # ------------------------------------------------------------------ reconnecting (on the hub)

    def _lost(self, forced: bool) -> bool:
        """The link ended without our closing it: reconnect (True), or let it end the client."""
        link = self._link
        reconnector = self._reconnector
        if reconnector is None or isinstance(link.refusal, AuthenticationFailed):
            return False  # retrying cannot help
        if link.refusal is None and forced and link.disconnect_reason != CLOSING_REASON:
            return False  # disconnect_client, or a server that does not say it is closing
        # Lost, closing, or refused before joining for a reason that may pass (full).
        logger.info("lost the connection to %s; reconnecting", iptup_to_str(self.addr))
        reconnector.start()
        return True

    def _relink(self) -> ClientLink:
        """A new link on this hub that carries on with the inbox (a reconnection attempt)."""
        link = self._new_link(cooperative=True)
        link.on_lost = lambda forced: True  # a failed attempt is the reconnector's business
        link.bind(self._link.inbox)
        return link

    def _rejoined(self, link: ClientLink) -> None:
        self._link = link
        link.on_lost = self._lost
        inbox = link.inbox
        assert inbox is not None
        inbox.put_now(Reconnected())

    def _give_up(self, failure: BaseException) -> None:
        logger.warning("giving up reconnecting to %s: %s", iptup_to_str(self.addr), failure)
        inbox = self._link.inbox
        assert inbox is not None
        inbox.put_now(Ended(forced=True))

    def _keep_or_write(self, data: bytes) -> None:
        reconnector = self._reconnector
        if reconnector is not None and reconnector.active:
            reconnector.keep(data)
        else:
            self._link.write(data)

    @property
    def reconnecting(self) -> bool:
        """True while a ``reconnect=True`` client is between connections."""
        return self._reconnector is not None and self._reconnector.active

    def __repr__(self) -> str:
        return f"<HiSockClient connected to {iptup_to_str(self.addr)}>"

    def __enter__(self) -> HiSockClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def state(self) -> ClientState:
        """Where the client is in its life (a :class:`ClientState`)."""
        return self._link.state

    @property
    def closed(self) -> bool:
        """True once the connection is over (closed by us, or ended by the server; not
        while a reconnecting client is between connections)."""
        return self._link.closed and not self.reconnecting

    @property
    def connected(self) -> bool:
        """True while the connection is up (the answer may still be on its way)."""
        return not self._link.closed

    @property
    def disconnect_reason(self) -> Optional[str]:
        """Why the server disconnected (or refused) us, when it said (not part of HiSock's API)."""
        return self._link.disconnect_reason

    @property
    def msgpack_ok(self) -> bool:
        """True when the server accepted the msgpack extension (known once it answered)."""
        return self._link.msgpack_ok

    def wait_joined(self, timeout: Optional[float] = None) -> None:
        """Block until the server has accepted our hello (not part of HiSock's API).

        :param timeout: seconds to wait at most; by default what is left of ``answer_timeout``.
        :raises ConnectionRejected: the server refused us, broke the protocol, or did not
            answer in time.  :raises AuthenticationFailed: its check refused ``auth``.
        :raises ClientDisconnected: the client is closed.
        """
        self._link.wait_joined(timeout)

    def _at_home(self, func: Callable[..., Any], *args: Any) -> Any:
        """Bind to the calling thread's hub if no hub owns the client yet, then run ``func`` there."""
        if not self._link.bound and self._home.ident is None:
            self._link.bind()
        return self._home.call(func, *args)

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
                logger.debug("no handler for command %r; kept a while for recv()", command)
                self._unclaimed.append((time.monotonic(), record))
        self._remember(record, called)
        return True

    def _take_unclaimed(self, command: Optional[str]) -> Optional[Received]:
        """The oldest recent unclaimed message for ``command`` (any, for None), removed."""
        unclaimed = self._unclaimed
        too_old = time.monotonic() - UNCLAIMED_SECONDS
        while unclaimed and unclaimed[0][0] < too_old:
            unclaimed.popleft()
        for entry in unclaimed:
            if command is None or entry[1].command == command:
                unclaimed.remove(entry)
                return entry[1]
        return None

    def _handle_call(self, record: CallRequest) -> bool:
        """The server calls one of our handlers: it runs apart from the dispatcher, and
        what it returns (or raises) goes back to the server."""
        entry = self._handlers.command_handler(record.command)
        answer = functools.partial(self._answer_call, record.call_id)
        if entry is None:
            answer(False, CallError("FunctionNotFoundException", f"no handler for {record.command!r}"))
        else:
            self._runner.answer(entry, (record.content,), answer)
        return True

    def _answer_call(self, call_id: int, ok: bool, value: Any) -> None:
        if ok:
            try:
                fmt, payload = typecast.encode(value, msgpack_ok=self._link.msgpack_ok)
                body = Reply(call_id, fmt, payload).to_body()
                if len(body) > self.max_message_size:
                    raise ContentTooLarge(f"the answer is {len(body)} bytes, more than {self.max_message_size}")
            except Exception as exc:  # not Sendable, too large: the server hears why
                ok, value = False, exc
        if not ok:
            kind = value.remote_type if isinstance(value, CallError) else type(value).__name__
            text = value.remote_message if isinstance(value, CallError) else str(value)
            body = CallFailed(call_id, kind, text[:1000]).to_body()
        self._link.answer_call(body)

    def _handle_peer_event(self, record: PeerEvent) -> bool:
        entry = self._handlers.reserved_handler(record.event)
        if entry is not None:
            self._runner.call(entry, (record.info,), (record.event, None, None))
        return True

    def _handle_reconnected(self, record: Reconnected) -> bool:
        entry = self._handlers.reserved_handler("reconnect")
        if entry is not None:
            self._runner.call(entry, (), ("reconnect", None, None))
        return True

    def _handle_ended(self, record: Ended) -> bool:
        if record.forced:
            entry = self._handlers.reserved_handler("force_disconnect")
            if entry is not None:
                self._runner.call(entry, (), ("force_disconnect", None, None))
        while self._recv_waiters:
            self._recv_waiters.popleft().result.set_exception(self._link.failure())
        # Leave the marker for any other loop still waiting on the inbox.
        inbox = self._link.inbox
        assert inbox is not None
        inbox.put_now(Ended(forced=False))
        return False

    def _remember(self, record: Received, called: bool) -> None:
        if self.cache_size >= 0:
            size = len(record.message.to_body())
            remember(self.cache, self.cache_size, MessageCacheMember(header=size, content=record.content, called=called, command=record.command))

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
        self._link.bind()
        if not self._home.is_here():
            raise ClientException(
                "start() must run on the thread the client is bound to; "
                "use ThreadedHiSockClient to run a client in the background"
            )
        self._dispatch_loop()

    def _dispatch_loop(self) -> None:
        inbox = self._link.inbox
        assert inbox is not None
        self._dispatching = True
        turn = FRAMES_PER_TURN
        loop = gevent.get_hub().loop
        turn_began = loop_pass(loop)
        try:
            while self._handle(inbox.get()):
                turn -= 1
                if turn <= 0:
                    # A full inbox never makes get() wait: let the hub's other work run.
                    turn = FRAMES_PER_TURN
                    turn_began = end_turn(loop, turn_began)
        except (SystemExit, KeyboardInterrupt):
            self._leave_before_exiting()
            raise
        finally:
            self._dispatching = False

    def _leave_before_exiting(self) -> None:
        """A handler raised SystemExit or KeyboardInterrupt (a game's "quit"): say goodbye
        and close, so the object stays usable, then the exception ends this thread as it
        would have."""
        self._dispatching = False
        try:
            self._link.close(emit_leave=True)
        except Exception:
            logger.debug("closing before exiting failed", exc_info=True)

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
        if not self.reconnecting:
            try:
                if self._link.state is not ClientState.JOINED and type(content) not in _DIALECT_FREE:
                    self._link.wait_joined()
                # Over the server's limit: refused here, with that limit, not by a dropped connection.
                outgoing.max_body = self._link.server_max_message_size
                self._link.write(outgoing.frame_for(self._link.msgpack_ok))
                return
            except ClientDisconnected:
                if not self.reconnecting:
                    raise
        # Between connections: kept (in order, decided on the hub), sent once joined again.
        self._home.call(self._keep_or_write, outgoing.frame_for(self._link.msgpack_ok))

    def recv(self, recv_on: Optional[str] = None, recv_as: Optional[type] = None, timeout: Optional[float] = None) -> Any:
        """Block until a command message arrives (``recv_on`` or any) and return its content.

        The message is returned instead of being passed to its handler.  While no
        :meth:`start` loop runs, other messages that arrive meanwhile go to their handlers.
        A message that came shortly before (at most 5 s, 256 messages) and that nobody
        took (no handler, no ``*``) is returned first: ``send()`` then ``recv()`` cannot
        lose a reply that overtook the ``recv()``.

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
        inbox = self._link.inbox
        assert inbox is not None
        if self.closed and inbox.empty():
            raise self._link.failure()
        early = self._take_unclaimed(recv_on)
        if early is not None:
            return early.content
        waiter = _RecvWaiter(recv_on)
        self._recv_waiters.append(waiter)
        try:
            with gevent.Timeout(timeout, TimeoutError(f"no message within {timeout} s")):
                if not self._dispatching:
                    # Nobody dispatches: we do, until our message is in.  If the connection
                    # ends first, the dispatcher fails every waiter with ClientDisconnected.
                    while not waiter.result.ready() and self._handle(inbox.get()):
                        pass
                return waiter.result.get()
        except (SystemExit, KeyboardInterrupt):
            self._leave_before_exiting()
            raise
        finally:
            if waiter in self._recv_waiters:
                self._recv_waiters.remove(waiter)

    def call(self, command: str, content: Sendable = None, timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """Run the server's handler for ``command`` with ``content`` and return what it
        returns (not part of HiSock's API: the ``call`` extension, PROTOCOL.md section 7).

        Many calls may be in flight at once, from any threads or greenlets, and from
        inside handlers; answers are matched by id.  :meth:`recv` keeps working beside it.

        :raises CallError: the server's handler raised (``remote_type`` and
            ``remote_message`` say what), or there is none for ``command``.
        :raises CallNotSupported: (a CallError) the server does not answer calls (a plain
            HiSock server, or ``use_msgpack=False``); raised at once.
        :raises CallTimeout: (a TimeoutError) no answer within ``timeout`` seconds.
        :raises ClientDisconnected: the connection ended before the answer (at once).
        """
        outgoing = OutgoingCommand(command, content, self.header_len)
        if not self._link.bound and self._home.ident is None:
            self._link.bind()
        self._link.wait_joined()
        if not self._link.call_ok:
            raise CallNotSupported(f"the server at {iptup_to_str(self.addr)} does not answer calls (a plain HiSock server?)")
        outgoing.max_body = self._link.server_max_message_size
        body = outgoing.frame_for(self._link.msgpack_ok)[self.header_len :]
        return self._home.call(self._link.call_here, command, body, timeout)

    def change_name(self, new_name: Optional[str]) -> None:
        """Change our name; None (or "") goes back to the name we connected with.
        (Between connections of a reconnecting client, the next hello carries it.)"""
        if not self.reconnecting:
            self._link.write(frame(ChangeName(new_name or "").to_body(), self.header_len))
        self.name = new_name or self._connect_name

    def change_group(self, new_group: Optional[str]) -> None:
        """Change our group; None (or "") goes back to the group we connected with."""
        if not self.reconnecting:
            self._link.write(frame(ChangeGroup(new_group or "").to_body(), self.header_len))
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
        if not self._link.bound and self._home.ident is None:
            self._link.bind()
        self._link.wait_joined()
        answer = self._home.call(self._link.ask_client, query)
        if not isinstance(answer, dict) or answer.get("traceback") == NO_SUCH_CLIENT or "ip" not in answer:
            raise ClientNotFound(f"the server knows no client {query!r}")
        try:
            return ClientInfo.from_dict(answer)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise ClientException(f"the server's answer about {query!r} is not a client info: {answer!r}") from exc

    def get_server_addr(self) -> Tuple[str, int]:
        """The ``(ip, port)`` of the server."""
        return self.addr

    def get_client_addr(self) -> Tuple[str, int]:
        """Our own ``(ip, port)`` as the server sees it on this machine."""
        return self._link.local_addr

    def get_cache(self, idx: Union[int, slice, None] = None) -> Any:
        """The message cache, or one entry (or slice) of it."""
        return self.cache if idx is None else self.cache[idx]

    def close(self, emit_leave: bool = True) -> None:
        """Leave: tell the server (unless ``emit_leave`` is False), then close the connection.

        A running :meth:`start` returns; a blocked :meth:`recv` raises ClientDisconnected.
        Calling it again does nothing.  A reconnecting client stops trying at once.
        """
        if self._reconnector is not None and self._home.ident is not None and self._home.alive:
            self._home.call(self._stop_reconnecting)
        self._link.close(emit_leave)

    def _stop_reconnecting(self) -> None:
        reconnector = self._reconnector
        if reconnector is not None and reconnector.active:
            reconnector.stop()
            self._reconnector = None
            inbox = self._link.inbox
            if inbox is not None:
                inbox.put_now(Ended(forced=False))
        self._reconnector = None


#: Inbox record -> what the dispatcher does with it; False once the connection has ended.
_HANDLES: Dict[type, Callable[[HiSockClient, Any], bool]] = {
    Received: HiSockClient._handle_received,
    CallRequest: HiSockClient._handle_call,
    PeerEvent: HiSockClient._handle_peer_event,
    Reconnected: HiSockClient._handle_reconnected,
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
            self._link.bind()
            self._dispatch_loop()

        if Home.program_is_patched():
            self._link.bind()
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
    ``max_items``, ``reconnect``, ``reconnect_delay``, ``reconnect_delay_max``,
    ``reconnect_attempts``); each is documented there.
    """
    return HiSockClient(addr, name, group, header_len, cache_size, **kwargs)


def threaded_connect(*args: Any, **kwargs: Any) -> ThreadedHiSockClient:
    """Connect and return a :class:`ThreadedHiSockClient`; arguments as :func:`connect`."""
    return ThreadedHiSockClient(*args, **kwargs)
