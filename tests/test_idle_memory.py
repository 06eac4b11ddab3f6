"""What a held, idle connection keeps resident on the server (bench.py's S6 holds tens of thousands).

Measured with tracemalloc in this process (the server is a ThreadedHiSockServer on its own
thread): only allocations made after tracing starts are counted, so each test builds what
it sends first.
"""

from __future__ import annotations

import collections
import gc
import sys
import threading
import time
import tracemalloc
from typing import Any, Callable

import gevent
import pytest
from gevent import socket as gsocket
from rawpeer import RawPeer, cmd_body, wire_frame

import hisock_gevent
from hisock_gevent.connection import Connection
from hisock_gevent.frames import frame

pytestmark = pytest.mark.timeout(60)

BIG = 4 * 1024 * 1024


def test_an_idle_client_does_not_keep_its_last_message_resident(
    make_server: Callable[..., hisock_gevent.ThreadedHiSockServer], raw: Callable[..., RawPeer]
) -> None:
    server = make_server()
    handled = threading.Event()

    @server.on("big")
    def on_big(client: Any, content: Any) -> None:
        handled.set()

    server.start()
    peer = raw(server)
    peer.hello("idle")
    message = wire_frame(cmd_body("big", b"%db" % BIG, b"x" * BIG))
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        peer.send_raw(message)
        assert handled.wait(10)
        time.sleep(0.3)  # the server's reader is back waiting for the next bytes
        gc.collect()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before > BIG  # the message was read and decoded (this is what is measured)
    # Before: the last chunk read, the body and the command's payload slice (~2 x 4 MiB)
    # stayed referenced by the idle reader until the client's next message.
    assert kept - before < BIG // 4, f"{(kept - before) / BIG:.2f} x the message is still held"


def test_a_connection_with_nothing_queued_costs_less_than_an_empty_deque() -> None:
    # An empty deque holds a 512-byte block: a queue of its own per idle connection was
    # 760 bytes of the ~13 KiB a held client costs.  A connection takes one only while
    # two or more frames wait for the kernel.
    count = 200
    pairs = [gsocket.socketpair() for _ in range(count)]
    body = frame(b"$CMD$ping$MSG$0       ")
    try:
        gc.collect()
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            conns = [Connection(ours, ("127.0.0.1", i)) for i, (ours, _) in enumerate(pairs)]
            for conn in conns:
                conn.send(body)
            assert all(conn.queued_bytes == len(body) for conn in conns)
            gevent.sleep(0.05)  # one pass of the loop: the kernel takes every queue
            assert all(conn.queued_bytes == 0 for conn in conns)
            gc.collect()
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        for _, theirs in pairs:
            assert theirs.recv(100) == body  # every frame went out
        per_connection = (after - before) / count
        assert per_connection < sys.getsizeof(collections.deque()), f"{per_connection:.0f} bytes per idle connection"
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
