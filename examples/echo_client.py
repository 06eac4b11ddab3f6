"""Echo client: sends ``ping`` messages to the echo server and prints each round-trip time.

Shows a blocking (non-threaded) HiSockClient: ``connect``, ``send`` and
``recv("pong", timeout=...)``.  Pings alternate between a string and a dict, so both
HiSock's plain type casting and nested containers are exercised; every ``pong`` is checked
to equal what was sent.

Run the server first (see ``echo_server.py``), then, from the project root::

    python examples/echo_client.py                       # 10 pings to 127.0.0.1:6969
    python examples/echo_client.py --count 3 --text hi   # 3 pings with your own text
    python examples/echo_client.py --port 7000 --count 100 --quiet

Exit status: 0 when every pong matched its ping, 1 when one did not (or none came back
within ``--timeout`` seconds), 2 when the server cannot be reached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, List, Optional

import gevent

import hisock_gevent


def payload_for(index: int, text: str) -> Any:
    """The content of ping number ``index``: a str on even pings, a dict on odd ones."""
    if index % 2 == 0:
        return f"{text} #{index}"
    return {"seq": index, "text": text, "tags": ["echo", "demo"], "ratio": index / 3}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="hisock_gevent echo client: ping the echo server")
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=6969, help="server port (default 6969)")
    parser.add_argument("--count", type=int, default=10, help="how many pings to send (default 10)")
    parser.add_argument("--text", default="hello", help="text carried by the pings (default 'hello')")
    parser.add_argument("--name", default="echo-client", help="the name to connect with")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each pong (default 5)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)

    try:
        client = hisock_gevent.connect((args.host, args.port), name=args.name)
    except (hisock_gevent.ServerNotRunning, hisock_gevent.ConnectionRejected) as exc:
        print(f"cannot connect: {exc}", file=sys.stderr)
        return 2
    print(f"connected to {args.host}:{args.port} as {args.name}", flush=True)

    round_trips: List[float] = []
    status = 0
    try:
        for index in range(args.count):
            sent = payload_for(index, args.text)
            started = time.perf_counter()
            client.send("ping", sent)
            try:
                received = client.recv("pong", timeout=args.timeout)
            except (TimeoutError, gevent.Timeout, hisock_gevent.ClientDisconnected) as exc:
                print(f"ping {index + 1}: no pong ({exc})", file=sys.stderr)
                status = 1
                break
            elapsed_ms = (time.perf_counter() - started) * 1000
            round_trips.append(elapsed_ms)
            if received != sent:
                print(f"ping {index + 1}: MISMATCH sent {sent!r}, got {received!r}", file=sys.stderr)
                status = 1
            elif not args.quiet:
                print(f"pong {index + 1}/{args.count}: {received!r} in {elapsed_ms:.3f} ms", flush=True)
    finally:
        client.close()

    if round_trips:
        print(
            f"{len(round_trips)} pongs: min {min(round_trips):.3f} ms, "
            f"mean {statistics.mean(round_trips):.3f} ms, max {max(round_trips):.3f} ms",
            flush=True,
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
