"""Every option of a server, in one frozen object that lists, documents and checks them.

:class:`ServerConfig` is what :class:`~hisock_gevent.server.HiSockServer` is made from:
its constructor keeps HiSock's signature and builds one, and a server can be made again
with the same options (changed where wanted) by ``dataclasses.replace(server.config,
...)`` and :meth:`HiSockServer.from_config`, which is how ``serve --workers`` rebuilds a
program's server on a shared port.  Adding an option here is all it takes for it to be
carried along.  Nothing here touches a socket.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from . import typecast
from .connection import DEFAULT_FRAME_TIMEOUT, DEFAULT_MAX_QUEUE_BYTES
from .frames import DEFAULT_HEADER_LEN, DEFAULT_MAX_MESSAGE_SIZE
from .registry import ANNOUNCE_ALL, ANNOUNCE_GROUP, ANNOUNCE_NONE, ANNOUNCE_SCOPES

__all__ = [
    "ServerConfig",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_BACKLOG",
    "DEFAULT_MAX_HELLO_SIZE",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_NAME_LENGTH",
    "ANNOUNCE_ALL",
    "ANNOUNCE_GROUP",
    "ANNOUNCE_NONE",
    "ANNOUNCE_SCOPES",
    "DEFAULT_WEBSOCKET_PING_INTERVAL",
    "DEFAULT_WEBSOCKET_PING_TIMEOUT",
]

#: Seconds between two keepalive rounds (HiSock: every minute).
DEFAULT_KEEPALIVE_INTERVAL = 60.0
#: Seconds a client has to answer a keepalive (HiSock: thirty seconds).
DEFAULT_KEEPALIVE_TIMEOUT = 30.0
#: Seconds a new connection has to send its hello.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Pending connections the kernel may hold for us.
DEFAULT_BACKLOG = 4096
#: The largest first frame (the hello) accepted from a connection we know nothing about.
DEFAULT_MAX_HELLO_SIZE = 64 * 1024
#: Connections accepted whose hello has not been accepted yet, at most (a limit apart
#: from ``max_connections``, so that silent sockets cannot lock real clients out).
DEFAULT_MAX_PENDING = 4096
#: The longest name or group, in characters.
DEFAULT_MAX_NAME_LENGTH = 256
#: Seconds between two WebSocket ping rounds (browsers answer pings by themselves).
DEFAULT_WEBSOCKET_PING_INTERVAL = 30.0
#: Seconds a WebSocket client has to answer a ping (or send anything) before it is dropped.
DEFAULT_WEBSOCKET_PING_TIMEOUT = 20.0


@dataclass(frozen=True)
class ServerConfig:
    """The options of a :class:`~hisock_gevent.server.HiSockServer` (all but its address).

    HiSock's own:

    :param max_connections: joined clients at once; 0 for no limit.  A connection made
        while the limit is reached, or whose hello arrives when it is, is sent
        ``$DISCONN$`` and closed; ``join`` does not run.  Connections still in their
        handshake do not count (see ``max_pending``).
    :param header_len: width of every frame header; clients must use the same.
    :param cache_size: -1 or below for no message cache, 0 for an unlimited one, N for the
        last N messages (:class:`~hisock_gevent.utils.MessageCacheMember` items in ``cache``).
    :param keepalive: send ``$KEEPALIVE$`` every ``keepalive_interval`` seconds and drop
        (running ``leave``) a client that has not answered within ``keepalive_timeout``.

    Who hears of whom:

    :param announce: which clients hear ``$CLTCONN$`` when a client joins and
        ``$CLTDISCONN$`` when it leaves (the client's ``client_connect`` and
        ``client_disconnect`` handlers):

        * ``"all"`` (default): every other client, as on HiSock.  A group or name change is
          announced to nobody.  N joins cost about N²/2 frames.
        * ``"group"``: the other members of the client's group only; a client in no group
          is announced to nobody.  A group change is a leave and a join: the members of
          the old group hear ``$CLTDISCONN$`` (with the old ClientInfo), those of the new
          group ``$CLTCONN$`` (with the new one); the client itself hears neither.  A name
          change is announced to nobody.  N joins in groups of G cost about N·G/2 frames.
        * ``"none"``: nobody.

        In every scope the joining client gets its own ``$CLTCONN$`` (the answer to its
        hello) and the server's ``join``, ``leave``, ``name_change`` and ``group_change``
        handlers run.  With a backplane the scope holds across workers: each worker
        applies its own ``announce`` to its own clients, so give every worker the same.

    Timers:

    :param keepalive_interval: seconds between keepalive rounds (default 60).
    :param keepalive_timeout: seconds to answer one (default 30).
    :param handshake_timeout: seconds a new connection has to send its hello (default 10).
    :param idle_timeout: drop (running ``leave``) a client that sends nothing for this many
        seconds; None (default) for never.  Keepalive answers count as traffic.
    :param frame_timeout: seconds a frame that has started arriving has to finish (a
        client trickling or stalling in the middle of a frame is dropped); None for no
        limit.  Default 60.

    What one client may send and leave unread (each drops only that client):

    :param max_message_size: the largest frame body accepted from a client; a header
        announcing more closes that connection before anything is read.
    :param peer_max_message_size: the largest message body the server sends, what its
        clients are assumed to accept (a hisock_gevent client's default
        ``max_message_size``, 16 MiB); a longer send raises ContentTooLarge and reaches
        nobody.  Raise it together with the clients' ``max_message_size``.
    :param max_hello_size: the largest first frame (the hello) of a new connection
        (default 64 KiB).
    :param max_name_length: the longest name or group accepted, in characters (default
        256); a longer one, or one that is not valid text, is refused at the hello and at a
        name or group change.
    :param max_nesting: deepest container nesting accepted in a received payload.
    :param max_items: most elements accepted in one received payload.
    :param max_queue_bytes: outbound bytes a client may leave unread before it is dropped
        (with ``leave``); default 16 MiB.  Checked as each frame is queued, after the
        kernel took what it would; one frame larger than the limit is still accepted into
        an empty queue.

    What all clients together may cost:

    :param max_total_queue_bytes: outbound bytes held for all slow clients together (a
        broadcast frame that many hold counts once); when passed, the clients with the
        largest backlogs are dropped first.  None (default): 1 GiB, or a quarter of the
        machine's memory if that is less.
    :param max_pending: connections accepted whose hello is not yet accepted, at most;
        more are refused with ``$DISCONN$``.  Default 4096.
    :param max_connections_per_ip: open connections (joined or not) from one IP address,
        at most; 0 (default) for no limit.

    Security:

    :param ssl_context: serve TLS with this context (or give ``certfile``/``keyfile``).
    :param certfile: the server's certificate chain (PEM), for TLS without a context.
    :param keyfile: its private key (PEM), when not in ``certfile``.
    :param authenticate: ``check(client_info, credentials) -> bool`` run on each hello
        before ``join``; ``credentials`` is what the client passed as ``auth``.  A refused
        client is sent ``$DISCONN$`` and closed; nobody else hears of it.  It runs on the
        server's hub: in a program that is not monkey-patched, a check that blocks (a
        database call) stalls the other clients while it runs, so keep it quick.

    Where it serves and who else is in it:

    :param backlog: pending connections the kernel may hold (``listen()``'s argument).
    :param reuse_port: set SO_REUSEPORT, so several processes serve the same port and the
        kernel spreads new connections among them (Linux, BSD; ValueError elsewhere).
        Also on when the environment has ``HISOCK_GEVENT_REUSE_PORT=1`` (``serve
        --workers`` sets it for its workers).
    :param listener: serve on this socket, already bound and listening (one inherited from
        a supervisor that forked the workers); the address is then only informative.
    :param delivery: who-receives-what backend; defaults to this process's clients.
    :param backplane: a ``redis://`` URL or a Delivery joining this server to others
        (see :class:`~hisock_gevent.backplane.RedisBackplane`); not with ``delivery``.

    WebSocket (PROTOCOL.md section 10; needs ``pip install 'hisock_gevent[websocket]'``):

    :param websocket: ``(host, port)`` of a second listener, served on the server's hub
        until :meth:`close`: WebSocket clients (browsers with ``hisock.js``) upgrade at
        ``ws://host:port/hisock`` and join the same registry, groups and handlers as the
        TCP clients, under the same limits; ``/hisock.js`` and its ``/msgpack/`` modules
        are served there too.  Port 0 picks a free one (``server.websocket_addr``).  The
        listener speaks plain ``ws://``, whatever ``certfile`` says: put a TLS proxy in
        front for ``wss://``.  :meth:`HiSockServer.websocket_app` is the same entrance as
        a WSGI application, for a gevent/pywsgi program of your own.
    :param websocket_origins: the web pages allowed to connect, as origins
        (``"https://example.com"``, ``"http://127.0.0.1:8000"``), or ``("*",)`` for any.
        None (default): only pages served by the WebSocket's own host and port.  A
        browser's upgrade from another page is refused with 403 and a log line; requests
        without ``Origin`` (programs, not pages) are let in.
    :param websocket_ping_interval: seconds between WebSocket pings to every WebSocket
        client (default 30); None for none.
    :param websocket_ping_timeout: seconds a WebSocket client has to answer (or send
        anything) before it is dropped (default 20).
    :param websocket_pages: ``{path: (content_type, bytes)}`` served with GET on the
        WebSocket port besides the client's files (``hisock-gevent chat`` serves its page
        at ``/`` this way).

    :raises ValueError: an option is out of range, or two exclude each other.
    """

    max_connections: int = 0
    header_len: int = DEFAULT_HEADER_LEN
    cache_size: int = -1
    keepalive: bool = False
    announce: str = ANNOUNCE_ALL
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: Optional[float] = None
    frame_timeout: Optional[float] = DEFAULT_FRAME_TIMEOUT
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    peer_max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_hello_size: int = DEFAULT_MAX_HELLO_SIZE
    max_name_length: int = DEFAULT_MAX_NAME_LENGTH
    max_nesting: int = typecast.DEFAULT_MAX_DEPTH
    max_items: int = typecast.DEFAULT_MAX_ITEMS
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    max_total_queue_bytes: Optional[int] = None
    max_pending: int = DEFAULT_MAX_PENDING
    max_connections_per_ip: int = 0
    ssl_context: Optional[ssl.SSLContext] = None
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    authenticate: Optional[Callable[[Any, Any], bool]] = None
    backlog: int = DEFAULT_BACKLOG
    reuse_port: bool = False
    listener: Any = None
    delivery: Any = None
    backplane: Any = None
    websocket: Optional[Tuple[str, int]] = None
    websocket_origins: Optional[Tuple[str, ...]] = None
    websocket_ping_interval: Optional[float] = DEFAULT_WEBSOCKET_PING_INTERVAL
    websocket_ping_timeout: float = DEFAULT_WEBSOCKET_PING_TIMEOUT
    websocket_pages: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.header_len, int) or self.header_len < 1:
            raise ValueError("header_len must be a positive int")
        for name in ("max_connections", "max_connections_per_ip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no limit) or positive")
        for name in (
            "max_message_size",
            "peer_max_message_size",
            "max_hello_size",
            "max_name_length",
            "max_nesting",
            "max_items",
            "max_queue_bytes",
            "max_pending",
            "backlog",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if self.max_total_queue_bytes is not None and self.max_total_queue_bytes < 1:
            raise ValueError("max_total_queue_bytes must be positive, or None for the default")
        for name in ("keepalive_interval", "keepalive_timeout", "handshake_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("idle_timeout", "frame_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, or None for no limit")
        if self.delivery is not None and self.backplane is not None:
            raise ValueError("give delivery or backplane, not both")
        if self.announce not in ANNOUNCE_SCOPES:
            raise ValueError(f"announce must be one of {', '.join(map(repr, ANNOUNCE_SCOPES))}, not {self.announce!r}")
        self._check_websocket()

    def _check_websocket(self) -> None:
        address = self.websocket
        if address is not None:
            if not (
                isinstance(address, tuple) and len(address) == 2 and isinstance(address[0], str)
                and isinstance(address[1], int) and not isinstance(address[1], bool) and 0 <= address[1] <= 65535
            ):
                raise ValueError(f"websocket must be a (host, port) tuple, not {address!r}")
        origins = self.websocket_origins
        if origins is not None:
            if isinstance(origins, (str, bytes)) or not all(isinstance(origin, str) for origin in origins):
                raise ValueError(f"websocket_origins must be a list of origins (strings), not {origins!r}")
            object.__setattr__(self, "websocket_origins", tuple(origins))
        interval = self.websocket_ping_interval
        if interval is not None and interval <= 0:
            raise ValueError("websocket_ping_interval must be positive, or None for no pings")
        if self.websocket_ping_timeout <= 0:
            raise ValueError("websocket_ping_timeout must be positive")
        pages = self.websocket_pages
        if pages is not None:
            for path, page in dict(pages).items():
                if not (isinstance(path, str) and path.startswith("/") and isinstance(page, tuple) and len(page) == 2
                        and isinstance(page[0], str) and isinstance(page[1], bytes)):
                    raise ValueError(f"websocket_pages maps a path (/...) to (content_type, bytes), not {path!r}: {page!r}")
