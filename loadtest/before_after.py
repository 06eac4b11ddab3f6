"""Did a change make the library cheaper or dearer per message?  CPU time, two trees, alternated.

``bench.py`` answers "how do we compare with a hand-written server", in round trips per
second over several processes, and on a shared machine one run differs from the next by
10-20 %.  A before/after question about our own code needs a steadier figure: here one
process holds a hisock_gevent server and raw clients (``wire.py``, the same code for both
trees), drives a fixed amount of traffic, and reports the process's CPU time per unit.  The
clients' share is the same code on both sides, so the difference is the library's.  Runs
of the two trees alternate, and the medians are compared.

    python loadtest/before_after.py OLD_TREE NEW_TREE [--pairs 5] [--mode ping|broadcast]

A tree is a directory holding a ``hisock_gevent`` package (a git worktree of an older
commit, say); each run imports it through ``PYTHONPATH``.  ``ping``: ``--clients`` clients,
``--window`` requests in flight each (default 1), ``--rounds`` round trips each, the server answering with
``send_client``.  ``broadcast``: client 0 asks for a ``send_all_clients`` and every
client waits for it, ``--rounds`` times.  Loopback only; every run is bounded by
``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(mode: str, clients: int, rounds: int, window: int = 1) -> Dict[str, Any]:
    """One run in this process: start a server, connect the clients, time the traffic."""
    import resource

    import gevent
    import wire
    from gevent import socket

    import hisock_gevent

    server = hisock_gevent.HiSockServer(("127.0.0.1", 0))

    @server.on(wire.PING)
    def on_ping(client: Any, content: Any) -> None:
        server.send_client(client, wire.PONG, content)

    @server.on(wire.BROADCAST)
    def on_broadcast(client: Any, content: Any) -> None:
        server.send_all_clients(wire.BROADCAST, content)

    gevent.spawn(server.start)
    gevent.sleep(0.05)
    addr = server.get_addr()
    socks = []
    for _ in range(clients):
        sock = socket.create_connection(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(wire.hello_frame())
        socks.append(sock)
    buffers = [bytearray() for _ in socks]

    def wait_for(index: int, prefix: bytes, containing: bytes = b"") -> None:
        """Read client ``index``'s frames until one starts with ``prefix`` (and holds ``containing``)."""
        sock, buffer = socks[index], buffers[index]
        while True:
            for body in wire.split_frames(buffer):
                if body.startswith(prefix) and containing in body:
                    return
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed a connection")
            buffer += data

    # Everyone joined (each saw its own $CLTCONN$); the announcements are then drained.
    for index in range(clients):
        wait_for(index, b"$CLTCONN$", wire.own_conn_marker(socks[index].getsockname()[1]))
    gevent.sleep(0.5)
    for index, sock in enumerate(socks):
        sock.setblocking(False)
        try:
            while sock.recv(1 << 20):
                pass
        except OSError:
            pass
        sock.setblocking(True)
        buffers[index].clear()

    ping = wire.command_frame(wire.PING, "x" * 16)
    pong = wire.command_prefix(wire.PONG)
    request = wire.command_frame(wire.BROADCAST, "x" * 16)
    broadcast = wire.command_prefix(wire.BROADCAST)

    def pinger(index: int) -> None:
        """``rounds`` round trips with ``window`` requests in flight."""
        sock, buffer = socks[index], buffers[index]
        sent = min(window, rounds)
        sock.sendall(ping * sent)
        answered = 0
        while answered < rounds:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed a connection")
            buffer += data
            arrived = sum(1 for body in wire.split_frames(buffer) if body.startswith(pong))
            answered += arrived
            more = min(arrived, rounds - sent)
            if more:
                sock.sendall(ping * more)
                sent += more

    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    if mode == "ping":
        gevent.joinall([gevent.spawn(pinger, index) for index in range(clients)], raise_error=True)
        units = clients * rounds
    else:
        for _ in range(rounds):
            socks[0].sendall(request)
            gevent.joinall([gevent.spawn(wait_for, index, broadcast) for index in range(clients)], raise_error=True)
        units = rounds
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for sock in socks:
        sock.close()
    server.close()
    return {"cpu_us_per_unit": cpu / units * 1e6, "wall_s": wall, "units": units}


def run_tree(tree: str, mode: str, clients: int, rounds: int, window: int, timeout: float) -> float:
    """CPU µs per unit of one run against the hisock_gevent in ``tree``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(tree), HERE]))
    command = [sys.executable, os.path.abspath(__file__), "--run", mode, "--clients", str(clients), "--rounds", str(rounds), "--window", str(window)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"a run against {tree} failed:\n{done.stderr.strip()}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["cpu_us_per_unit"])


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", nargs="?", help="tree with the hisock_gevent before the change")
    parser.add_argument("new", nargs="?", help="tree with the hisock_gevent after it")
    parser.add_argument("--mode", choices=("ping", "broadcast"), default="ping")
    parser.add_argument("--pairs", type=int, default=5, help="alternated runs of each tree (default 5)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1000, help="round trips per client (ping) or broadcasts")
    parser.add_argument("--window", type=int, default=1, help="requests each client keeps in flight (ping)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one run may take")
    parser.add_argument("--run", choices=("ping", "broadcast"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(measure(args.run, args.clients, args.rounds, args.window)), flush=True)
        return 0
    if not (args.old and args.new):
        parser.error("name two trees: OLD NEW")
    old: List[float] = []
    new: List[float] = []
    for pair in range(args.pairs):
        old.append(run_tree(args.old, args.mode, args.clients, args.rounds, args.window, args.timeout))
        new.append(run_tree(args.new, args.mode, args.clients, args.rounds, args.window, args.timeout))
        print(f"pair {pair + 1}: old {old[-1]:.1f} us, new {new[-1]:.1f} us per unit", flush=True)
    ratio = statistics.median(new) / statistics.median(old)
    print(
        f"{args.mode}, {args.clients} clients{f', window {args.window}' if args.window > 1 else ''}: median CPU per unit old {statistics.median(old):.1f} us, "
        f"new {statistics.median(new):.1f} us; new/old {ratio:.3f} (lower is cheaper)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
