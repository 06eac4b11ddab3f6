"""WSGI app + HiSock server in one process: send to HiSock clients from plain HTTP.

Shows how a monkey-patched gevent program serves a HiSock server and a web app side by
side on one hub: ``ThreadedHiSockServer.start()`` returns at once (in a patched program
it serves in a greenlet) and ``gevent.pywsgi.WSGIServer`` runs a tiny hand-routed WSGI
callable whose requests call ``get_all_clients``, ``send_client``, ``send_group`` and
``send_all_clients`` directly: no threads, no locks, no extra dependency.

HTTP endpoints (errors are JSON ``{"error": str}`` with a 4xx status, never a traceback):

* ``GET /``: this help, as plain text;
* ``GET /clients``: ``[{"name": str | null, "group": str | null, "address": "ip:port"}, ...]``;
* ``POST /send`` with ``{"command": str, "content": any JSON, "to": name or "ip:port"}``
  (one client), ``"group": str`` instead of ``"to"`` (that group) or neither (everyone):
  ``{"sent": true, "command": str, "recipients": ["ip:port", ...]}``;
* ``/hisock`` (WebSocket), ``/hisock.js`` and ``/msgpack/...``: the HiSock server's own
  WebSocket entrance, ``hisock.websocket_app()``, mounted in this app: browsers with
  ``hisock.js`` join the same server as the TCP clients (``ws://127.0.0.1:8000/hisock``;
  needs ``pip install -e '.[websocket]'``, without it those paths are 404).

On the HiSock side, ``hello`` is answered with ``hello`` carrying the asker's entry as
``/clients`` shows it; joins and leaves are logged.

Run it (from the project root, with the package installed: ``pip install -e .``)::

    python examples/wsgi_app.py                          # HiSock on 6969, HTTP on 8000
    python examples/wsgi_app.py --port 0 --http-port 0   # free ports; the log lines say which

Once both listen it logs ``hisock serving on HOST:PORT`` and ``http serving on HOST:PORT``.
Then connect a client (``python examples/chat_client.py --name alice``) and::

    curl http://127.0.0.1:8000/clients
    curl -X POST http://127.0.0.1:8000/send -d '{"command": "said", "content": {"from": "web", "text": "hi"}, "to": "alice"}'

Stop it with Ctrl-C (or ``kill <pid>``): both servers close and the program exits 0.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patch_all, on purpose)
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable, Dict, Iterable, List, Optional  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

import hisock_gevent  # noqa: E402
from hisock_gevent import ClientInfo  # noqa: E402

log = logging.getLogger("wsgi_app")

#: Largest request body accepted, in bytes.
MAX_BODY = 64 * 1024
#: Seconds the HTTP requests and HiSock clients get to finish when the program stops.
STOP_TIMEOUT = 2.0


class HTTPError(Exception):
    """Ends a request with ``status`` and a JSON ``{"error": message}`` body."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def entry(client: ClientInfo) -> Dict[str, Any]:
    return {"name": client.name, "group": client.group, "address": client.ipstr}


def build_hisock(host: str, port: int) -> hisock_gevent.ThreadedHiSockServer:
    """The HiSock server with its handlers registered (not started)."""
    server = hisock_gevent.start_threaded_server((host, port))

    @server.on("join")
    def on_join(client: ClientInfo) -> None:
        log.info("%s (%s) joined group %r", client.name, client.ipstr, client.group)

    @server.on("leave")
    def on_leave(client: ClientInfo) -> None:
        log.info("%s (%s) left", client.name, client.ipstr)

    @server.on("hello")
    def on_hello(client: ClientInfo) -> None:
        try:
            server.send_client(client, "hello", entry(client))
        except hisock_gevent.ClientNotFound:
            pass  # it left before we could answer

    return server


def send(hisock: hisock_gevent.HiSockServer, request: Any) -> Dict[str, Any]:
    """Carry out a ``POST /send`` body; its answer, or HTTPError."""
    if not isinstance(request, dict) or not isinstance(request.get("command"), str) or not request["command"]:
        raise HTTPError("400 Bad Request", 'the body must be a JSON object like {"command": "news", "content": ...}')
    command, content, to, group = request["command"], request.get("content"), request.get("to"), request.get("group")
    for field, value in (("to", to), ("group", group)):
        if value is not None and not (isinstance(value, str) and value):
            raise HTTPError("400 Bad Request", f"{field!r} must be a non-empty string")
    if to is not None and group is not None:
        raise HTTPError("400 Bad Request", "give 'to' or 'group', not both")
    try:
        if to is not None:
            recipients = [hisock.get_client(to)]
            hisock.send_client(recipients[0], command, content)
        elif group is not None:
            recipients = hisock.get_group(group)
            hisock.send_group(group, command, content)
        else:
            recipients = hisock.get_all_clients()
            hisock.send_all_clients(command, content)
    except hisock_gevent.ClientNotFound:
        raise HTTPError("404 Not Found", f"no client is called {to!r}") from None
    except hisock_gevent.GroupNotFound:
        raise HTTPError("404 Not Found", f"no client is in group {group!r}") from None
    except (ValueError, TypeError) as exc:  # a reserved command, content a peer cannot take
        raise HTTPError("400 Bad Request", str(exc)) from None
    return {"sent": True, "command": command, "recipients": [client.ipstr for client in recipients]}


#: Paths handed to the HiSock server's WebSocket app: the upgrade and the browser client.
WEBSOCKET_PATHS = ("/hisock", "/hisock.js", "/msgpack/")


def make_app(hisock: hisock_gevent.HiSockServer) -> Callable[..., Iterable[bytes]]:
    """The WSGI callable: routes by method and path, answers JSON (``/`` answers text);
    the WebSocket paths go to ``hisock.websocket_app()``."""
    try:
        websocket = hisock.websocket_app()  # upgrades /hisock; serves /hisock.js and /msgpack/
    except ImportError as exc:
        log.info("no WebSocket entrance: %s", exc)
        websocket = None

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = (environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/")
        if websocket is not None and route[1].startswith(WEBSOCKET_PATHS):
            return websocket(environ, start_response)  # a WebSocket lasts as long as its client
        status, content_type, body = "200 OK", "application/json", b""
        try:
            if route == ("GET", "/"):
                content_type, body = "text/plain; charset=utf-8", (__doc__ or "").encode()
            elif route == ("GET", "/clients"):
                body = json.dumps([entry(client) for client in hisock.get_all_clients()]).encode()
            elif route == ("POST", "/send"):
                data = environ["wsgi.input"].read(MAX_BODY + 1)
                if len(data) > MAX_BODY:
                    raise HTTPError("413 Payload Too Large", f"the body may have at most {MAX_BODY} bytes")
                try:
                    request = json.loads(data)
                except ValueError as exc:
                    raise HTTPError("400 Bad Request", f"the body is not JSON: {exc}") from None
                body = json.dumps(send(hisock, request)).encode()
            elif route[1] in ("/", "/clients", "/send"):
                raise HTTPError("405 Method Not Allowed", f"{route[0]} is not allowed on {route[1]}")
            else:
                raise HTTPError("404 Not Found", f"no such path {route[1]!r}; GET / for help")
        except HTTPError as exc:
            status, body = exc.status, json.dumps({"error": exc.message}).encode()
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    return app


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="a WSGI app that sends to the clients of a HiSock server")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve both at (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=6969, help="HiSock port; 0 picks a free one (default 6969)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port; 0 picks a free one (default 8000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    try:
        hisock = build_hisock(args.host, args.port)
    except OSError as exc:
        log.error("cannot serve HiSock on %s:%s: %s", args.host, args.port, exc)
        return 1
    http_log = logging.getLogger("wsgi_app.http")  # access lines at INFO, errors at ERROR
    http = WSGIServer((args.host, args.http_port), make_app(hisock), log=http_log, error_log=http_log)
    try:
        http.start()
    except OSError as exc:
        log.error("cannot serve HTTP on %s:%s: %s", args.host, args.http_port, exc)
        hisock.close()
        return 1
    hisock.start()  # returns at once: it serves in a greenlet on this hub
    log.info("hisock serving on %s:%s", *hisock.get_addr())
    log.info("http serving on %s:%s", http.server_host, http.server_port)

    stop = Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stop.set)
    stop.wait()
    http.close()  # no new requests
    hisock.close(timeout=STOP_TIMEOUT)  # its WebSocket clients' requests end with it
    http.stop(timeout=STOP_TIMEOUT)  # the other running requests may finish
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
