"""Chat server: names, rooms (HiSock groups), broadcasts and whispers.

The chat rules live in the package, in ``hisock_gevent/chat.py`` (read that file for the
server side of a real application: ``join`` / ``leave`` announcements, ``say`` with
``send_group``, ``whisper`` with ``send_client`` and its ``ClientNotFound``, ``who`` with
``get_group``, ``name_change`` / ``group_change``, and type checks on everything a client
sends).  ``hisock-gevent chat`` serves the same rules.  This program shows the other half:
building the server from a factory, serving it, and stopping it cleanly on a signal.

Run it (from the project root, with the package installed: ``pip install -e .``)::

    python examples/chat_server.py                  # serves on 127.0.0.1:6969
    python examples/chat_server.py --port 0         # any free port; the log line says which

Once it is listening it logs ``serving on HOST:PORT``.  Then, in other terminals::

    python examples/chat_client.py --name alice
    python examples/chat_client.py --name bob --room games

Stop it with Ctrl-C (or ``kill <pid>``): the clients are disconnected and the listening
socket is closed before the program exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import List, Optional

import gevent

from hisock_gevent.chat import make_server

log = logging.getLogger("chat_server")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="hisock_gevent chat server with rooms and whispers")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve at (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=6969, help="port to serve at; 0 picks a free one (default 6969)")
    parser.add_argument("--max-connections", type=int, default=0, help="clients accepted at once; 0 = no limit")
    parser.add_argument("--keepalive", action="store_true", help="drop clients that stop answering keepalives")
    parser.add_argument("--verbose", "-v", action="store_true", help="log the library's debug messages too")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        server = make_server(args.host, args.port, max_connections=args.max_connections, keepalive=args.keepalive)
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Runs in a new greenlet on this hub, where close() may block while it drains.
        gevent.signal_handler(signum, server.close)
    log.info("serving on %s:%s", *server.get_addr())
    try:
        server.start()  # returns once the server is closed
    except KeyboardInterrupt:
        server.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
