"""Where a held connection's memory goes in a hisock_gevent server: tracemalloc and counts.

Runs ``hisock_server.py``'s server in this process under :mod:`tracemalloc`, opens N
clients with ``holdgen.py`` (a subprocess on 127.0.0.x), holds them, and prints per
connection: the server's RSS growth, the traced Python allocations grouped by the line
that made them, the live objects of each type, and the C stack saved by each parked
greenlet (which tracemalloc attributes to whichever line switched).  The figures the
README's S6 section quotes come from it.

    python loadtest/held_memory.py --clients 5000 [--announce none] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import linecache
import os
import sys
import time
import tracemalloc
from typing import Any, Dict

import gevent
import greenlet
from gevent import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hisock_server  # noqa: E402
import wire  # noqa: E402


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def type_counts() -> Dict[str, int]:
    counts: Dict[str, int] = collections.Counter()
    for obj in gc.get_objects():
        counts[type(obj).__qualname__] += 1
    return counts


def saved_stacks() -> int:
    return sum(obj._stack_saved for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--announce", default="none", choices=("all", "group", "none"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--say", type=int, default=0, metavar="BYTES", help="each client sends one message of BYTES after joining")
    parser.add_argument("--frames", type=int, default=1, help="traceback depth to group by (1: the allocating line)")
    args = parser.parse_args()
    wire.raise_nofile()
    announce = args.announce if hisock_server.announce_supported() else "all"
    tracemalloc.start(max(1, args.frames))
    server = hisock_server.build(0, announce=announce)
    gevent.spawn(server.start)
    gevent.sleep(0.5)
    gc.collect()
    rss0, stacks0, types0 = rss_kib(), saved_stacks(), type_counts()
    snap0 = tracemalloc.take_snapshot()
    params = {"clients": args.clients, "sources": ["127.0.0.2", "127.0.0.3"], "per_source": 10_000, "concurrency": 500, "say_bytes": args.say}
    gen = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "holdgen.py"), "--port", str(server.get_addr()[1]), "--params", json.dumps(params)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert gen.stdout is not None and gen.stdin is not None
    ready: Dict[str, Any] = {}
    t0 = time.monotonic()
    for line in gen.stdout:
        event = json.loads(line)
        if event["ev"] == "ready":
            ready = event
            break
    ramp = time.monotonic() - t0
    gevent.sleep(2.0)
    gc.collect()
    held = len(server.clients)
    rss1, stacks1, types1 = rss_kib(), saved_stacks(), type_counts()
    snap1 = tracemalloc.take_snapshot()
    gen.stdin.write(b"quit\n")
    gen.stdin.flush()
    n = max(1, held)
    traced = sum(stat.size_diff for stat in snap1.compare_to(snap0, "filename"))
    print(f"announce={announce}; {ready.get('connected')} joined in {ramp:.1f} s; {held} held; errors {ready.get('errors')}")
    print(f"RSS: {(rss1 - rss0) / n:.2f} KiB per connection ({rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB)")
    print(f"traced by tracemalloc: {traced / n / 1024:.2f} KiB per connection; "
          f"greenlet stacks saved: {(stacks1 - stacks0) / n:.0f} B per connection")
    print(f"\ntop {args.top} allocation sites, bytes per connection (count per connection):")
    for stat in snap1.compare_to(snap0, "traceback" if args.frames > 1 else "lineno")[: args.top]:
        frame = stat.traceback[0]
        code = linecache.getline(frame.filename, frame.lineno).strip()
        where = f"{os.path.relpath(frame.filename, os.path.dirname(os.path.dirname(frame.filename)))}:{frame.lineno}"
        print(f"  {stat.size_diff / n:7.0f} B  ({stat.count_diff / n:5.2f})  {where:<34} {code[:70]}")
    print("\nlive objects per connection by type (GC-tracked only; >= 0.5):")
    for name, count in sorted(((k, types1[k] - types0.get(k, 0)) for k in types1), key=lambda kv: -kv[1]):
        if count / n >= 0.5:
            print(f"  {count / n:5.2f}  {name}")
    server.close()
    gen.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
