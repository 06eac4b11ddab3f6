"""The WebSocket way into a server: the HTTP upgrade (a WSGI app, and the server's own
WebSocket listener serving it), the browser client's files, and the ping rounds.

:class:`WebSocketGate` belongs to one :class:`~hisock_gevent.server.HiSockServer`.  Its
:meth:`~WebSocketGate.app` is a WSGI application for gevent's pywsgi: a request to its
WebSocket path that :func:`~hisock_gevent.websocket.upgrade_verdict` accepts is answered
``101``, and the socket pywsgi read it from is handed to a
:class:`~hisock_gevent.ws_session.WebSocketSession` on the server's hub, where the client
joins the same registry, groups and handlers as the TCP clients.  The app also serves
``/hisock.js`` and the vendored ``/msgpack/...`` modules, and any page the server was
given (``websocket_pages``).  The server's ``websocket=(host, port)`` listener is a pywsgi
server running this very app, with a ``handshake_timeout`` on each HTTP request.

Where pywsgi keeps the socket: for a request that asks for an upgrade, pywsgi hands the
application its raw buffered reader as ``wsgi.input`` (it does not read a body from an
upgrade), a ``BufferedReader`` over a ``SocketIO`` whose ``_sock`` is the gevent socket;
whatever the reader buffered past the request is handed on too.  Gunicorn's gevent
worker puts the socket in ``gunicorn.socket``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import gevent
from gevent import socket as gsocket
from gevent.pool import Group
from gevent.pywsgi import WSGIHandler, WSGIServer

from .home import Home
from .session import SessionContext
from .websocket import (
    CLOSE_GOING_AWAY,
    STATIC_CONTENT_TYPE,
    WEBSOCKET_PATH,
    Rejection,
    static_file,
    upgrade_verdict,
)
from .ws_connection import WebSocketConnection
from .ws_session import WebSocketSession

__all__ = ["WebSocketGate", "WSGIApp"]

logger = logging.getLogger("hisock_gevent")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]

#: pywsgi's answer to a request it cannot read.
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 12\r\n\r\nbad request\n"
#: The environ key under which the listener's handler leaves the request's timer.
_TIMER_KEY = "hisock_gevent.handshake_timer"


def _headers(environ: Mapping[str, Any]) -> Dict[str, str]:
    """The request's headers from a WSGI environ, names in lower case with dashes."""
    headers = {key[5:].replace("_", "-").lower(): str(value) for key, value in environ.items() if key.startswith("HTTP_")}
    if "CONTENT_TYPE" in environ:
        headers["content-type"] = str(environ["CONTENT_TYPE"])
    return headers


def _reply(start_response: StartResponse, status: str, content_type: str, body: bytes, *extra: Tuple[str, str]) -> List[bytes]:
    start_response(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close"), *extra],
    )
    return [body]


def _take_socket(environ: Mapping[str, Any]) -> Tuple[Any, bytes]:
    """The client's socket under a WSGI request, and the bytes already read past the
    request (None when the server gives no socket: not pywsgi, nor gunicorn's worker)."""
    stream: Any = environ.get("wsgi.input")
    sock = getattr(getattr(stream, "raw", None), "_sock", None)
    if sock is None:
        return environ.get("gunicorn.socket"), b""
    received = b""
    peek = getattr(stream, "peek", None)
    if peek is not None:
        # What the reader buffered, without waiting for more: with the socket in
        # non-blocking mode an empty buffer reads nothing.
        previous = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            received = bytes(peek())
        except OSError:
            received = b""
        finally:
            sock.settimeout(previous)
        if received:
            stream.read(len(received))
    return sock, received


class _UpgradeHandler(WSGIHandler):
    """pywsgi's handler with a deadline on each request: a connection that has not sent
    a whole HTTP request within the server's ``handshake_timeout`` is closed.  The app
    stops the clock once it upgrades."""

    _hisock_timer: Any = None

    def handle_one_request(self) -> Any:
        timeout = self.server.handshake_timeout
        timer = gevent.Timeout(timeout)
        timer.start()
        self._hisock_timer = timer
        try:
            return super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            address = self.client_address if isinstance(self.client_address, tuple) else ("?", 0)
            logger.warning(
                "closing %s:%s: no WebSocket upgrade (or page request) within %.1f s", address[0], address[1], timeout
            )
            return None
        finally:
            timer.close()

    def _handle_client_error(self, ex: BaseException) -> Any:
        # Not HTTP (or not HTTP we take): one warning line like every refusal, then 400.
        address = self.client_address if isinstance(self.client_address, tuple) else ("?", 0)
        text = getattr(ex, "formatted_message", None) or str(ex) or type(ex).__name__
        logger.warning("refusing %s:%s on the WebSocket port: not an HTTP request we take: %s", address[0], address[1], text[:200])
        return ("400", _BAD_REQUEST)

    def get_environ(self) -> Any:
        environ = super().get_environ()
        environ[_TIMER_KEY] = self._hisock_timer
        return environ


class _Listener(WSGIServer):
    """The server's own WebSocket port: pywsgi running the gate's app, requests not logged."""

    handler_class = _UpgradeHandler

    def __init__(self, listener: Any, app: WSGIApp, handshake_timeout: float, spawn: Callable[..., Any]):
        super().__init__(listener, app, log=None, error_log=logger, spawn=spawn)
        self.handshake_timeout = handshake_timeout


class WebSocketGate:
    """The WebSocket entrance of one server.

    :param context: what the server's sessions share.
    :param serving: the server's greenlets of open connections (killed when it closes).
    :param connections: the server's open connections, joined or not.
    :param home: the server's home (sessions run on its hub).
    :param pages: path -> (content type, bytes) served besides the client's files.
    """

    def __init__(
        self,
        context: SessionContext,
        serving: Group,
        connections: Set[Any],
        home: Home,
        pages: Optional[Mapping[str, Tuple[str, bytes]]] = None,
    ):
        self._context = context
        self._serving = serving
        self._connections = connections
        self._home = home
        self._pages = dict(pages or {})
        self._waiting: List[Any] = []  # listening sockets given before the server serves
        self._listeners: List[_Listener] = []
        self._timers = Group()
        self.serving = False
        self.closed = False

    # ------------------------------------------------------------------ lifecycle

    def add_listener(self, listener: Any) -> None:
        """Serve the app on this bound, listening socket (once the server serves)."""
        if self.serving:
            self._home.call(self._listen, listener)
        else:
            self._waiting.append(listener)

    def start(self) -> None:
        """The server serves (called on its hub): listen, and start the ping rounds."""
        if self.serving or self.closed:
            return
        self.serving = True
        waiting, self._waiting = self._waiting, []
        for listener in waiting:
            self._listen(listener)
        config = self._context.config
        if config.websocket_ping_interval:
            self._timers.spawn(self._ping_loop, config.websocket_ping_interval, config.websocket_ping_timeout)

    def _listen(self, listener: Any) -> None:
        http = _Listener(listener, self.app(), self._context.config.handshake_timeout, self._serving.spawn)
        http.start()
        self._listeners.append(http)

    def closing(self) -> None:
        """The server is closing: accept no more, and close every WebSocket with 1001."""
        self.closed = True
        for http in self._listeners:
            http.close()
        for conn in list(self._connections):
            if isinstance(conn, WebSocketConnection):
                conn.close_code = CLOSE_GOING_AWAY
                conn.close_reason = "server closing"

    def stop(self) -> None:
        """The server closed: end the ping rounds, close sockets never served."""
        self.closed = True
        self._timers.kill(block=False)
        for listener in self._waiting:
            listener.close()
        self._waiting.clear()

    # ------------------------------------------------------------------ ping rounds

    def _ping_loop(self, interval: float, timeout: float) -> None:
        while not self.closed:
            gevent.sleep(interval)
            sent_at = time.monotonic()
            pinged = [conn for conn in list(self._connections) if isinstance(conn, WebSocketConnection) and not conn.closed]
            for conn in pinged:
                conn.ping()
            expiry = gevent.Greenlet(self._expire_silent, pinged, sent_at, timeout)
            self._timers.add(expiry)
            expiry.start_later(timeout)

    @staticmethod
    def _expire_silent(pinged: List[WebSocketConnection], sent_at: float, timeout: float) -> None:
        for conn in pinged:
            if not conn.closed and conn.last_received < sent_at:
                conn.expire(f"no answer to a WebSocket ping within {timeout:g} s")

    # ------------------------------------------------------------------ the WSGI app

    def app(self, path: str = WEBSOCKET_PATH) -> WSGIApp:
        """A WSGI application that upgrades requests to ``path`` and serves the client's
        files (see the module's docstring)."""

        def websocket_app(environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            request_path = environ.get("PATH_INFO") or "/"
            method = environ.get("REQUEST_METHOD", "GET")
            if request_path == path:
                return self._upgrade(environ, start_response, method)
            page = self._pages.get(request_path)
            content = static_file(request_path) if page is None else page[1]
            if content is None:
                return _reply(start_response, "404 Not Found", "text/plain", b"not found\n")
            if method not in ("GET", "HEAD"):
                return _reply(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n", ("Allow", "GET, HEAD"))
            content_type = STATIC_CONTENT_TYPE if page is None else page[0]
            body = b"" if method == "HEAD" else content
            headers = [("Content-Type", content_type), ("Content-Length", str(len(content))), ("Cache-Control", "no-cache"), ("Connection", "close")]
            if page is None:
                # The client's modules are public code: pages of other origins may import
                # them (module scripts are fetched with CORS); connecting is what the
                # Origin check guards.
                headers.append(("Access-Control-Allow-Origin", "*"))
            start_response("200 OK", headers)
            return [body]

        return websocket_app

    def _upgrade(self, environ: Dict[str, Any], start_response: StartResponse, method: str) -> Iterable[bytes]:
        address = (str(environ.get("REMOTE_ADDR", "?")), int(environ.get("REMOTE_PORT") or 0))
        verdict = upgrade_verdict(method, _headers(environ), self._context.config.websocket_origins)
        if isinstance(verdict, Rejection):
            logger.warning("refusing a WebSocket upgrade from %s:%s: %s (%s)", address[0], address[1], verdict.reason, verdict.status)
            return _reply(start_response, verdict.status, "text/plain", verdict.reason.encode() + b"\n", *verdict.headers)
        if not self.serving or self.closed:
            return _reply(start_response, "503 Service Unavailable", "text/plain", b"the HiSock server is not serving\n")
        sock, received = _take_socket(environ)
        if sock is None:
            logger.error("a WebSocket upgrade needs gevent.pywsgi (or gunicorn's gevent worker): the request has no socket")
            return _reply(start_response, "501 Not Implemented", "text/plain", b"this WSGI server gives no socket to upgrade\n")
        write = start_response("101 Switching Protocols", list(verdict.headers))
        write(b"")  # the 101 goes out now: pywsgi sends the headers with the first write
        timer = environ.get(_TIMER_KEY)
        if timer is not None:
            timer.close()
        try:
            self._run_session(sock, address, received)
        finally:
            # The connection is over: pywsgi must not read another request from it (for
            # an upgrade its wsgi.input is the connection's reader).
            stream = environ.get("wsgi.input")
            if stream is not None and getattr(stream, "raw", None) is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        return []

    def _run_session(self, sock: Any, address: Tuple[str, int], received: bytes) -> None:
        """Serve the upgraded socket on the server's hub until the connection ends."""
        if self._home.is_here():
            self._serving.spawn(self._serve_socket, sock, address, received).join()
            return
        # Another thread's hub (pywsgi in a thread of its own): the server's hub takes
        # the file descriptor over, since a gevent socket belongs to the hub that made it.
        fd = sock.detach()

        def serve_at_home() -> None:
            self._serving.spawn(self._serve_socket, gsocket.socket(fileno=fd), address, received).join()

        self._home.call(serve_at_home)

    def _serve_socket(self, sock: Any, address: Tuple[str, int], received: bytes) -> None:
        WebSocketSession(self._context, sock, address, received).run(self._connections)
