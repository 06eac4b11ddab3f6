"""One worker of a Redis-joined cluster, for the fault tests (tests/test_cluster_faults.py).

    python tests/programs/cluster_worker.py --redis redis://127.0.0.1:6379/0 [--port 0]

Serves a plain (not monkey-patched) HiSockServer with a RedisBackplane whose heartbeat is
fast, so a killed worker is noticed within a couple of seconds.  Prints one line per event
on stdout (flushed) for the test to read: ``WORKER id``, ``serving on HOST:PORT``, ``JOIN name``,
``LEAVE name``.  Handlers: ``relay {"to": name, "text": ...}`` sends ``msg`` to that
client (an error is answered with ``error``), ``shout text`` sends ``shout`` to everyone, ``tell {"group": g, "text": ...}`` sends
``told`` to a group, ``who`` answers ``who`` with every client's ``name@group``, ``kick name`` disconnects that client
(running ``leave``).
SIGTERM closes the server.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import gevent

import hisock_gevent
from hisock_gevent.backplane import RedisBackplane


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--namespace", default="faults")
    parser.add_argument("--heartbeat", type=float, default=0.2)
    parser.add_argument("--ttl", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    backplane = RedisBackplane(args.redis, namespace=args.namespace, heartbeat_interval=args.heartbeat, worker_ttl=args.ttl)
    server = hisock_gevent.HiSockServer(("127.0.0.1", args.port), backplane=backplane)

    def say(line: str) -> None:
        print(line, flush=True)

    @server.on("join")
    def on_join(client):
        say(f"JOIN {client.name}")

    @server.on("leave")
    def on_leave(client):
        say(f"LEAVE {client.name}")

    @server.on("name_change")
    def on_name_change(client, old, new):
        say(f"RENAME {old} {new}")

    @server.on("relay")
    def on_relay(client, content):
        try:
            server.send_client(content["to"], "msg", content["text"])
        except Exception as exc:  # told back to the sender, so the test can wait on it
            server.send_client(client, "error", f"{type(exc).__name__}: {exc}")

    @server.on("kick")
    def on_kick(client, content):
        try:
            server.disconnect_client(content, call_func=True)
        except Exception as exc:
            server.send_client(client, "error", f"{type(exc).__name__}: {exc}")

    @server.on("tell")
    def on_tell(client, content):
        server.send_group(content["group"], "told", content["text"])

    @server.on("who")
    def on_who(client, content):
        server.send_client(client, "who", sorted(f"{c.name}@{c.group}" for c in server.get_all_clients()))

    @server.on("shout")
    def on_shout(client, content):
        server.send_all_clients("shout", content)

    gevent.signal_handler(signal.SIGTERM, server.close)
    say(f"WORKER {backplane.worker_id}")
    say("serving on {}:{}".format(*server.get_addr()))
    server.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
