"""The server under test: the benchmark's commands on hisock_gevent's public API only.

``ping`` -> ``send_client(client, "pong", content)``; ``broadcast`` ->
``send_all_clients("broadcast", content)``; ``bulk`` -> ``send_client(client, "ack",
len(content))``.  Everything else (handshake, ``$CLTCONN$`` announcements, framing,
type casting) is the library's.  The baseline in ``baselines/gevent_server.py`` does the
same work by hand.

Run: ``python loadtest/hisock_server.py --port 0`` prints ``PORT <n>`` once listening;
SIGTERM or SIGINT closes it.  ``--profile FILE`` runs the server under cProfile and
writes the stats (``pstats`` format) to FILE when it stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Optional

import gevent

import hisock_gevent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire


def build(port: int) -> hisock_gevent.HiSockServer:
    server = hisock_gevent.HiSockServer(("127.0.0.1", port))

    @server.on(wire.PING)
    def on_ping(client: hisock_gevent.ClientInfo, content: Any) -> None:
        server.send_client(client, wire.PONG, content)

    @server.on(wire.BROADCAST)
    def on_broadcast(client: hisock_gevent.ClientInfo, content: Any) -> None:
        server.send_all_clients(wire.BROADCAST, content)

    @server.on(wire.BULK)
    def on_bulk(client: hisock_gevent.ClientInfo, content: Any) -> None:
        server.send_client(client, wire.ACK, len(content))

    return server


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--profile", metavar="FILE", help="run under cProfile, dump stats to FILE on exit")
    args = parser.parse_args(argv)
    wire.raise_nofile()
    server = build(args.port)
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, server.close)
    print(f"PORT {server.get_addr()[1]}", flush=True)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            server.start()
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        server.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
