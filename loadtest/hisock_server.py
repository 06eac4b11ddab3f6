"""The server under test: the benchmark's commands on hisock_gevent's public API only.

``ping`` -> ``send_client(client, "pong", content)``; ``broadcast`` ->
``send_all_clients("broadcast", content)``; ``bulk`` -> ``send_client(client, "ack",
len(content))``.  Everything else (handshake, ``$CLTCONN$`` announcements, framing,
type casting) is the library's.  The baseline in ``baselines/gevent_server.py`` does the
same work by hand.

Run: ``python loadtest/hisock_server.py --port 0`` prints ``PORT <n>`` once listening
(``--websocket`` adds a WebSocket listener and a ``WSPORT <n>`` line, for ``bench.py --websocket``);
SIGTERM or SIGINT closes it.  ``--profile FILE`` runs the server under cProfile and
writes the stats (``pstats`` format) to FILE when it stops.

Several workers (``bench.py --workers N``): ``--reuse-port`` sets SO_REUSEPORT, so the
first process can take ``--port 0`` and the others the port it printed; ``--redis URL``
joins them into one HiSock server through the Redis backplane.  ``--control`` reads
commands on stdin: ``clients SEQ`` is answered on stdout with one JSON line,
``{"ev": "clients", "seq": SEQ, "local": <clients of this process>, "total": <clients
this process knows of, its own and the other workers'>}``.  (Off by default: a server
started in the background from a shell must not read the terminal.)

``--announce all|group|none`` sets the server's announcement scope (``bench.py
--join-storm`` runs the join storm once with each; S6 holds its clients with ``none``).
It needs a hisock_gevent whose ServerConfig has ``announce``; with an older one,
anything but ``all`` (HiSock's behaviour, which such a server always has) is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from typing import Any, Dict, Optional

import gevent

import hisock_gevent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire


def announce_supported() -> bool:
    """True when this hisock_gevent's servers take ``announce`` (who hears of joins)."""
    try:
        from hisock_gevent.config import ServerConfig
    except ImportError:  # a hisock_gevent from before ServerConfig (a before/after bench)
        return False
    return "announce" in {field.name for field in dataclasses.fields(ServerConfig)}


def build(
    port: int, reuse_port: bool = False, redis_url: Optional[str] = None, announce: str = "all", websocket: bool = False
) -> hisock_gevent.HiSockServer:
    options: Dict[str, Any] = {"reuse_port": reuse_port, "backplane": redis_url}
    if announce_supported():
        options["announce"] = announce
    elif announce != "all":
        raise ValueError(f"announce={announce!r}: this hisock_gevent announces every join to all")
    if websocket:
        # A WebSocket listener on a free port too, without ping rounds (a bench window is
        # shorter than their interval, and the generators answer none).
        options.update(websocket=("127.0.0.1", 0), websocket_ping_interval=None)
    server = hisock_gevent.HiSockServer(("127.0.0.1", port), **options)

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


def serve_control(server: hisock_gevent.HiSockServer) -> None:
    """Answer ``clients SEQ`` lines on stdin until it ends (a greenlet on the server's hub)."""
    from gevent.fileobject import FileObjectPosix

    stdin = FileObjectPosix(sys.stdin.fileno(), "rb", closefd=False)
    for line in stdin:
        words = line.decode(errors="replace").split()
        if len(words) == 2 and words[0] == "clients":
            answer = {"ev": "clients", "seq": int(words[1]), "local": len(server.clients), "total": len(server.get_all_clients())}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--profile", metavar="FILE", help="run under cProfile, dump stats to FILE on exit")
    parser.add_argument("--reuse-port", action="store_true", help="set SO_REUSEPORT: several processes serve one port")
    parser.add_argument("--redis", metavar="URL", help="join the other workers through the Redis backplane at URL")
    parser.add_argument("--control", action="store_true", help="answer 'clients SEQ' lines on stdin (for bench.py)")
    parser.add_argument(
        "--announce", choices=("all", "group", "none"), default="all",
        help="who hears of joins and leaves (HiSockServer's announce; default all, as HiSock)",
    )
    parser.add_argument("--websocket", action="store_true", help="also serve WebSocket clients; a 'WSPORT <n>' line follows the PORT line")
    args = parser.parse_args(argv)
    if args.announce != "all" and not announce_supported():
        parser.error(f"--announce {args.announce}: this hisock_gevent's ServerConfig has no 'announce' (every join is announced to all)")
    wire.raise_nofile()
    server = build(args.port, args.reuse_port, args.redis, args.announce, args.websocket)
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, server.close)
    print(f"PORT {server.get_addr()[1]}", flush=True)
    if getattr(server, "websocket_addr", None) is not None:  # (None before WebSocket support)
        print(f"WSPORT {server.websocket_addr[1]}", flush=True)
    if args.control:
        gevent.spawn(serve_control, server)
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
