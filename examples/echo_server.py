"""Echo server: answers every ``ping`` with a ``pong`` carrying exactly the same content,
and every ``call("echo", content)`` with the content itself.

Shows the smallest useful hisock_gevent server: ``start_server``, one ``@server.on``
handler that replies with ``send_client``, one that answers a ``call("echo", content)``
by returning the content, the ``join``/``leave`` events, and a clean shutdown on Ctrl-C
or SIGTERM.

Run it (from the project root, with the package installed: ``pip install -e .``)::

    python examples/echo_server.py                  # serves on 127.0.0.1:6969
    python examples/echo_server.py --port 0         # any free port; the log line says which

Once it is listening it logs ``serving on HOST:PORT``.  Then, in a second terminal::

    python examples/echo_client.py --count 5

Stop it with Ctrl-C (or ``kill <pid>``): every client is told ``$DISCONN$`` and the
listening socket is closed before the program exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any, List, Optional

import gevent

import hisock_gevent

log = logging.getLogger("echo_server")


def build_server(host: str, port: int) -> hisock_gevent.HiSockServer:
    """A HiSockServer at ``(host, port)`` with the echo handlers registered (not started)."""
    server = hisock_gevent.start_server((host, port))

    @server.on("join")
    def on_join(client: hisock_gevent.ClientInfo) -> None:
        log.info("%s joined", client.ipstr if client.name is None else f"{client.name} ({client.ipstr})")

    @server.on("leave")
    def on_leave(client: hisock_gevent.ClientInfo) -> None:
        log.info("%s left", client.ipstr if client.name is None else f"{client.name} ({client.ipstr})")

    @server.on("ping")
    def on_ping(client: hisock_gevent.ClientInfo, content: Any) -> None:
        # Whatever came in goes straight back: str, bytes, numbers, lists, dicts...
        try:
            server.send_client(client, "pong", content)
        except hisock_gevent.ClientNotFound:
            pass  # it left before we could answer

    @server.on("echo")
    def on_echo(client: hisock_gevent.ClientInfo, content: Any) -> Any:
        # For call(): what a handler returns is the caller's answer.  (Sent with send(),
        # the same handler runs and its return value goes nowhere.)
        return content

    return server


def install_shutdown(server: hisock_gevent.HiSockServer) -> None:
    """Close the server on SIGINT (Ctrl-C) and SIGTERM.

    gevent's signal handlers run in a fresh greenlet on the server's hub, so ``close()``
    may block there while it drains the clients.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, server.close)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="hisock_gevent echo server: answers ping with pong")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve at (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=6969, help="port to serve at; 0 picks a free one (default 6969)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log the library's debug messages too")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        server = build_server(args.host, args.port)
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        return 1
    install_shutdown(server)
    host, port = server.get_addr()
    log.info("serving on %s:%s", host, port)
    try:
        server.start()
    except KeyboardInterrupt:
        server.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
