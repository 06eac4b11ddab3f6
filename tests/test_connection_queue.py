"""A Connection's outbound queue: frames leave whole and in order whatever shape it has.

The queue is a list of the connection's own while at most one frame waits (the usual
case), and a deque once two or more do (see the note above ``connection._WriteBatch``).
These tests drive it
through a fake socket that takes a few bytes at a time, so that every change of shape
happens with part of a frame already written.
"""

from __future__ import annotations

import gc
from typing import Any, List

import gevent
import pytest
from gevent.event import Event

from hisock_gevent.budget import SendBudget
from hisock_gevent.connection import Connection
from hisock_gevent.frames import frame

pytestmark = pytest.mark.timeout(30)


class KernelSide:
    """The non-blocking OS socket: takes at most ``room`` bytes a call (then none: full)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.received = bytearray()

    def send(self, data: Any) -> int:
        taken = bytes(data[: self.room])
        if not taken and len(data):
            raise BlockingIOError
        self.received += taken
        self.room -= len(taken)
        return len(taken)

    def sendmsg(self, vector: List[Any]) -> int:
        return self.send(b"".join(bytes(part) for part in vector))


class GatedSocket:
    """A gevent socket over :class:`KernelSide`: ``send`` waits (cooperatively) until
    ``gate`` opens, then the kernel takes ``per_call`` bytes each time."""

    def __init__(self, room: int, per_call: int) -> None:
        self._sock = KernelSide(room)
        self.gate = Event()
        self.per_call = per_call

    def send(self, data: Any) -> int:
        self.gate.wait()
        self._sock.room = self.per_call
        return self._sock.send(data)

    def sendmsg(self, vector: List[Any]) -> int:
        return self.send(b"".join(bytes(part) for part in vector))

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


def frames(count: int) -> List[bytes]:
    return [frame(b"$CMD$n$MSG$0       " + b"%d" % i * (i % 5 + 1)) for i in range(count)]


def drained(conn: Connection) -> None:
    for _ in range(1000):
        if conn.queued_bytes == 0:
            return
        gevent.sleep(0.001)
    raise AssertionError(f"{conn.queued_bytes} bytes still queued")


@pytest.mark.parametrize("count", [1, 2, 3, 300])
@pytest.mark.parametrize("per_call", [1, 7, 1 << 20])
def test_frames_queued_in_one_pass_leave_in_order(count: int, per_call: int) -> None:
    sock = GatedSocket(room=per_call, per_call=per_call)
    sock.gate.set()
    conn = Connection(sock, ("127.0.0.1", 1))
    sent = frames(count)
    for data in sent:
        conn.send(data)
    drained(conn)
    assert bytes(sock._sock.received) == b"".join(sent)


def test_a_frame_half_written_keeps_its_place_when_more_are_queued_behind_it() -> None:
    # The kernel takes 3 bytes of the first frame, then is full: the writer waits, and
    # the frames queued meanwhile turn the one-frame queue into a deque behind it.
    sock = GatedSocket(room=3, per_call=5)
    budget = SendBudget(1 << 30)
    conn = Connection(sock, ("127.0.0.1", 1), budget=budget)
    first, *more = frames(4)
    conn.send(first)
    gevent.sleep(0.01)  # the pass ends: 3 bytes go, the rest waits for room
    assert bytes(sock._sock.received) == first[:3]
    assert conn.queued_bytes == len(first) - 3 and budget.backlogged == 1
    for data in more:
        conn.send(data)
    sock.gate.set()
    drained(conn)
    assert bytes(sock._sock.received) == first + b"".join(more)
    gevent.sleep(0.01)
    assert budget.held == 0 and budget.backlogged == 0


def test_a_second_burst_after_the_queue_emptied_is_written_too() -> None:
    sock = GatedSocket(room=1 << 20, per_call=1 << 20)
    sock.gate.set()
    conn = Connection(sock, ("127.0.0.1", 1))
    sent: List[bytes] = []
    for burst in (1, 3, 1, 2):
        batch = frames(burst)
        for data in batch:
            conn.send(data)
        sent.extend(batch)
        drained(conn)
        sock._sock.room = 1 << 20
    assert bytes(sock._sock.received) == b"".join(sent)


def test_a_frame_to_each_of_many_connections_allocates_nothing_the_collector_counts(figure: Any) -> None:
    # A broadcast queues one frame on every client before the pass's flush.  A container
    # made per frame (the 1-tuple this queue once was) would hold 2,000 collectable
    # objects at once, enough to run the garbage collector during a broadcast.  The
    # kept list takes the frame without an allocation the collector counts.
    conns = []
    for port in range(2000):
        sock = GatedSocket(room=1 << 20, per_call=1 << 20)
        sock.gate.set()
        conns.append(Connection(sock, ("127.0.0.1", port)))
    data = frames(1)[0]
    for conn in conns:  # a first frame each, flushed: every queue has its shape
        conn.send(data)
    for conn in conns:
        drained(conn)
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for conn in conns:
            conn.send(data)
        counted = gc.get_count()[0] - before
    finally:
        gc.enable()
    for conn in conns:
        drained(conn)
    figure("collectable objects allocated to queue one frame on each of 2,000 connections", str(counted))
    assert counted < 20, counted  # a tuple per frame: 2,000
    assert all(bytes(conn.sock._sock.received) == data * 2 for conn in conns)
