"""Limits a server (and a client) enforces against peers, and the graceful close.

max_message_size both ways, handshake_timeout, idle_timeout, max_queue_bytes,
max_nesting / max_items, and ``close(timeout=...)``: whatever one peer does, only its own
connection suffers, ``leave`` runs for it, and everyone else carries on.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, List, Set, Tuple

import gevent
import msgpack
import pytest
from conftest import LOOPBACK, wait_until
from rawpeer import RawPeer, cmd_body, hello_body, install_echo, sync, wire_frame

import hisock_gevent
from hisock_gevent import (
    ClientDisconnected,
    ClientInfo,
    ClientNotFound,
    ConnectionRejected,
    HiSockClient,
    ServerNotRunning,
    ThreadedHiSockServer,
)

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ helpers


def started(make_server: Callable[..., Any], recorder: Any, **kwargs: Any) -> Any:
    """A started server with echo, and ``joined``/``left``/``heard`` recorders."""
    srv = make_server(**kwargs)
    srv.joined = recorder()
    srv.left = recorder()
    srv.heard = recorder()
    srv.on("join")(lambda client: srv.joined(client.name))
    srv.on("leave")(lambda client: srv.left(client.name))
    srv.on("x")(lambda client, content: srv.heard((client.name, content)))
    install_echo(srv)
    srv.start()
    return srv


def payload_len_for(command: str, body_len: int) -> int:
    """The bytes payload length whose command body (native ``b``) is exactly ``body_len`` long."""
    for payload_len in range(body_len, -1, -1):  # bounded by body_len
        if len(cmd_body(command, b"%db" % payload_len, b"")) + payload_len == body_len:
            return payload_len
    raise AssertionError(f"no payload makes a {body_len}-byte body")


def no_recursion_errors(caplog: Any) -> None:
    for record in caplog.records:
        text = record.getMessage() + (repr(record.exc_info[1]) if record.exc_info else "")
        assert "RecursionError" not in text and "maximum recursion" not in text, text


# ------------------------------------------------------------------ max_message_size


def test_client_sending_more_than_max_message_size_is_dropped_and_leave_runs(make_server, make_client, recorder):
    srv = started(make_server, recorder, max_message_size=4096)
    bystander = make_client(srv, "bystander")
    # A plain hello: the client does not learn the server's limit, so the frame goes out.
    big = make_client(srv, "big", use_msgpack=False)
    big.send("x", b"y" * 5000)
    assert srv.left.wait_for(1) == ["big"]
    with pytest.raises(ClientDisconnected):
        big.recv(timeout=5)
    sync(bystander, b"z" * 3000)
    assert srv.get_all_clients("name") == ["bystander"]
    assert srv.heard.items == []


def test_body_of_exactly_max_message_size_is_accepted_and_one_more_is_not(make_server, recorder, raw):
    limit = 4096
    srv = started(make_server, recorder, max_message_size=limit)
    exact = raw(srv)
    exact.hello("exact")
    payload_len = payload_len_for("x", limit)
    body = cmd_body("x", b"%db" % payload_len, b"e" * payload_len)
    assert len(body) == limit
    exact.send_frame(body)
    assert srv.heard.wait_for(1) == [("exact", b"e" * payload_len)]
    over = raw(srv)
    over.hello("over")
    over_body = cmd_body("x", b"%db" % (payload_len + 1), b"o" * (payload_len + 1))
    assert len(over_body) == limit + 1
    over.send_frame(over_body)
    assert srv.left.wait_for(1) == ["over"]
    over.wait_closed()
    assert srv.heard.items == [("exact", b"e" * payload_len)]
    assert "exact" in srv.get_all_clients("name")


def test_oversized_header_alone_drops_the_peer_without_waiting_for_the_body(make_server, recorder, raw):
    srv = started(make_server, recorder, max_message_size=1024)
    peer = raw(srv)
    peer.hello("liar")
    peer.send_raw(b"%-16d" % (10**12))  # announces a terabyte, sends nothing more
    assert srv.left.wait_for(1) == ["liar"]
    peer.wait_closed()


def test_oversized_hello_is_refused_before_join(make_server, recorder, raw):
    srv = started(make_server, recorder, max_message_size=256)
    peer = raw(srv)
    peer.send_frame(hello_body("x" * 400))
    peer.wait_closed()
    assert srv.joined.items == []


def test_client_max_message_size_closes_on_a_bigger_server_message(make_server, make_client, recorder):
    srv = started(make_server, recorder)
    bystander = make_client(srv, "bystander")
    small = make_client(srv, "small", max_message_size=1000)
    srv.send_client("small", "x", b"q" * 900)  # body a little under 1000: fine
    assert small.recv("x", timeout=5) == b"q" * 900
    srv.send_client("small", "x", b"q" * 2000)
    with pytest.raises(ClientDisconnected):
        small.recv(timeout=5)
    assert srv.left.wait_for(1) == ["small"]
    with pytest.raises(ClientDisconnected):
        small.send("echo", "after")
    sync(bystander)


def test_threaded_client_max_message_size_ends_with_a_disconnect(make_server, make_client, recorder):
    srv = started(make_server, recorder)
    got = recorder()
    client = make_client(srv, "small", threaded=True, max_message_size=1000)
    client.on("x")(lambda content: got(content))
    client.start()
    srv.send_client("small", "x", "fits")
    assert got.wait_for(1) == ["fits"]
    srv.send_client("small", "x", b"q" * 5000)
    assert srv.left.wait_for(1) == ["small"]
    client.join(5)
    assert client.closed
    assert got.items == ["fits"]


# ------------------------------------------------------------------ handshake_timeout


def test_connection_without_hello_is_closed_after_handshake_timeout(make_server, make_client, recorder, raw, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    srv = started(make_server, recorder, handshake_timeout=0.4)
    peer = raw(srv)
    begun = time.monotonic()
    assert peer.wait_closed(timeout=5) == b""
    elapsed = time.monotonic() - begun
    assert 0.3 <= elapsed < 3.0
    assert srv.joined.items == []
    assert any("hello" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    sync(make_client(srv, "after"))


@pytest.mark.slow
def test_hello_trickled_slowly_still_hits_the_handshake_timeout(make_server, recorder, raw):
    """The timeout is for the whole hello, not per byte: trickling cannot hold a slot forever."""
    srv = started(make_server, recorder, handshake_timeout=0.5)
    peer = raw(srv)
    data = wire_frame(hello_body("slowpoke"))
    begun = time.monotonic()
    closed = False
    for index in range(len(data) - 1):  # never the last byte; bounded by the hello's size
        try:
            peer.send_raw(data[index : index + 1])
        except OSError:
            closed = True
            break
        peer.sock.settimeout(0.1)  # pacing for the trickle; the close is what we wait for
        try:
            if peer.sock.recv(1) == b"":
                closed = True
                break
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = True
            break
        if time.monotonic() - begun > 5:
            break
    assert closed
    assert time.monotonic() - begun < 3.0
    assert srv.joined.items == []


@pytest.mark.slow
def test_waiting_handshakes_do_not_hold_up_joined_clients(make_server, make_client, recorder, raw):
    srv = started(make_server, recorder, handshake_timeout=1.0)
    idlers = [raw(srv) for _ in range(20)]
    client = make_client(srv, "busy")
    sync(client)
    for idler in idlers:
        idler.wait_closed()
    sync(client)


# ------------------------------------------------------------------ idle_timeout


def echo_and_collect(peer: RawPeer, token: int) -> List[bytes]:
    """Send an echo from a raw peer; return the frames that came before its answer."""
    peer.send_frame(cmd_body("echo", b"1i", b"%d" % (token % 10)))
    before: List[bytes] = []
    for _ in range(20):  # bounded
        body = peer.read_frame()
        if body == cmd_body("echo", b"1i", b"%d" % (token % 10)):
            return before
        before.append(body)
    raise AssertionError(f"no echo answer among {before!r}")


@pytest.mark.slow
def test_silent_joined_client_is_dropped_with_leave_after_idle_timeout(make_server, recorder, raw):
    srv = started(make_server, recorder, idle_timeout=0.5)
    observer = raw(srv)
    observer.hello("observer")
    silent = raw(srv)
    begun = time.monotonic()
    silent.hello("silent")
    heard: List[bytes] = []
    # The observer keeps talking (so it is not idle) until it hears that the silent one left.
    for token in range(100):  # bounded; ~0.1 s per round
        heard += echo_and_collect(observer, token)
        if any(body.startswith(b"$CLTDISCONN$") for body in heard):
            break
        try:
            srv.left.wait_for(1, timeout=0.1)
        except AssertionError:
            pass
    elapsed = time.monotonic() - begun
    assert srv.left.wait_for(1) == ["silent"]
    assert 0.35 <= elapsed < 3.0
    disconns = [json.loads(body[len(b"$CLTDISCONN$"):]) for body in heard if body.startswith(b"$CLTDISCONN$")]
    assert [info["name"] for info in disconns] == ["silent"]
    silent.wait_closed()
    assert srv.get_all_clients("name") == ["observer"]


@pytest.mark.slow
def test_active_client_is_not_dropped_by_idle_timeout(make_server, recorder, raw):
    idle = 0.5
    srv = started(make_server, recorder, idle_timeout=idle)
    active = raw(srv)
    active.hello("active")
    silent = raw(srv)
    silent.hello("silent")
    # The active peer talks in ~0.1 s steps; the silent one's leave is the clock.
    for token in range(100):  # bounded
        echo_and_collect(active, token)
        try:
            srv.left.wait_for(1, timeout=0.1)
            break
        except AssertionError:
            pass
    assert srv.left.wait_for(1) == ["silent"]
    # Keep talking for more than another idle_timeout: still there.
    begun = time.monotonic()
    for token in range(100):  # bounded
        if time.monotonic() - begun > 2 * idle:
            break
        echo_and_collect(active, token)
        try:
            srv.left.wait_for(2, timeout=0.1)
        except AssertionError:
            pass
    assert srv.left.items == ["silent"]
    assert srv.get_all_clients("name") == ["active"]


@pytest.mark.slow
def test_client_that_keeps_sending_but_reads_slowly_is_not_dropped_by_idle_timeout(make_server, recorder, raw):
    """idle_timeout is about a client that *sends* nothing; a slow reader is max_queue_bytes' business.

    The peer talks every ~0.1 s but leaves an 8 MiB message (well under the default
    max_queue_bytes) unread for three idle periods; then it reads it whole.
    """
    idle = 0.5
    srv = started(make_server, recorder, idle_timeout=idle)
    srv.on("tick")(lambda client: None)
    busy = raw(srv, rcvbuf=4096)
    busy.hello("busy")
    big = b"\x42" * (8 * 1024 * 1024)
    srv.send_client("busy", "big", big)
    begun = time.monotonic()
    ticks: List[float] = []  # when each tick was handed to the kernel, for the failure message
    for _ in range(100):  # bounded; ~0.1 s per round
        if time.monotonic() - begun > 3 * idle:
            break
        try:
            busy.send_frame(cmd_body("tick", b"", b""))
        except OSError:
            break  # the server hung up on us: the assertion below says so
        ticks.append(round(time.monotonic() - begun, 3))
        try:
            srv.left.wait_for(1, timeout=0.1)
            break
        except AssertionError:
            pass
    dropped_at = round(time.monotonic() - begun, 3)
    assert srv.left.items == [], f"a client that kept sending was dropped as idle at {dropped_at} s; ticks at {ticks}"
    # Now read it all, still ticking (a slow read through a 4 KiB window takes a while).
    expected = wire_frame(cmd_body("big", b"%db" % len(big), big))
    received = bytearray()
    deadline = time.monotonic() + 20
    while len(received) < len(expected) and time.monotonic() < deadline:  # bounded by the deadline
        busy.send_frame(cmd_body("tick", b"", b""))
        busy.sock.settimeout(0.05)
        read_until = time.monotonic() + 0.1
        while len(received) < len(expected) and time.monotonic() < read_until:
            try:
                chunk = busy.sock.recv(len(expected) - len(received))
            except socket.timeout:
                break
            assert chunk, "the server closed the connection"
            received += chunk
    assert bytes(received) == expected
    assert srv.get_all_clients("name") == ["busy"]


@pytest.mark.slow
def test_keepalive_answers_count_as_traffic_for_idle_timeout(make_server, make_client, recorder, raw):
    srv = started(make_server, recorder, idle_timeout=0.6, keepalive=True, keepalive_interval=0.15, keepalive_timeout=30)
    alive = make_client(srv, "alive", threaded=True)
    alive.start()
    silent = raw(srv)
    silent.hello("silent")
    assert srv.left.wait_for(1) == ["silent"]
    # One more idle period, measured by a second silent peer.
    silent2 = raw(srv)
    silent2.hello("silent2")
    assert srv.left.wait_for(2) == ["silent", "silent2"]
    assert srv.get_all_clients("name") == ["alive"]


def test_idle_timeout_none_keeps_silent_clients(make_server, make_client, recorder, raw):
    srv = started(make_server, recorder, handshake_timeout=0.3)
    silent = raw(srv)
    silent.hello("silent")
    # A late hello on another connection takes longer than handshake_timeout to fail.
    late = raw(srv)
    late.wait_closed()
    assert srv.get_all_clients("name") == ["silent"]


# ------------------------------------------------------------------ max_queue_bytes


def flood(srv: Any, name: str, count: int = 100, size: int = 64 * 1024) -> int:
    """Send ``count`` messages of ``size`` bytes to a client until it is gone; how many were sent."""
    chunk = b"\xab" * size
    for index in range(count):
        try:
            srv.send_client(name, "flood", chunk)
        except ClientNotFound:
            return index
    return count


def test_client_that_stops_reading_is_dropped_when_its_queue_passes_the_limit(make_server, make_client, recorder, raw, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    srv = started(make_server, recorder, max_queue_bytes=512 * 1024)
    bystander = make_client(srv, "bystander")
    stalled = raw(srv, rcvbuf=4096)
    stalled.hello("stalled")
    sent = flood(srv, "stalled")
    assert srv.left.wait_for(1) == ["stalled"]
    assert sent < 100
    assert any("max_queue_bytes" in r.getMessage() for r in caplog.records)
    sync(bystander, b"b" * 100_000)
    assert srv.get_all_clients("name") == ["bystander"]
    with pytest.raises(ClientNotFound):
        srv.send_client("stalled", "flood", b"more")


def test_broadcast_overflowing_one_client_still_reaches_the_others(make_server, make_client, recorder, raw):
    srv = started(make_server, recorder, max_queue_bytes=512 * 1024)
    readers = [make_client(srv, f"reader{i}", threaded=True) for i in range(2)]
    counts = [recorder() for _ in readers]
    for reader, count in zip(readers, counts):
        reader.on("flood")(lambda content, count=count: count(len(content)))
        reader.start()
    stalled = raw(srv, rcvbuf=4096)
    stalled.hello("stalled")
    wait_until(lambda: len(srv.get_all_clients()) == 3)
    for _ in range(100):
        srv.send_all_clients("flood", b"\xcd" * 64 * 1024)
    assert srv.left.wait_for(1) == ["stalled"]
    for count in counts:
        assert count.wait_for(100, timeout=20) == [64 * 1024] * 100
    assert sorted(srv.get_all_clients("name")) == ["reader0", "reader1"]


def test_burst_bigger_than_max_queue_bytes_reaches_a_client_that_reads(make_server, make_client, recorder):
    """max_queue_bytes counts what the peer leaves unread, not what one handler sends at once."""
    srv = started(make_server, recorder, max_queue_bytes=256 * 1024)
    parts = 8

    @srv.on("burst")
    def burst(client: ClientInfo) -> None:
        srv.send_client(client, "part", b"\x11" * 300_000)  # one frame over the limit
        for _ in range(parts):  # and 512 KiB more in the same pass of the loop
            srv.send_client(client, "part", b"\x22" * 64 * 1024)

    got = recorder()
    reader = make_client(srv, "reader", threaded=True)
    reader.on("part")(lambda content: got(len(content)))
    reader.start()
    reader.send("burst")
    assert got.wait_for(parts + 1, timeout=10) == [300_000] + [64 * 1024] * parts
    assert srv.left.items == []


def test_new_clients_are_served_after_an_overflow(make_server, make_client, recorder, raw):
    srv = started(make_server, recorder, max_queue_bytes=256 * 1024)
    for index in range(3):
        stalled = raw(srv, rcvbuf=4096)
        stalled.hello(f"stalled{index}")
        flood(srv, f"stalled{index}")
        assert srv.left.wait_for(index + 1)[-1] == f"stalled{index}"
    sync(make_client(srv, "fresh"), b"f" * 300_000)


# ------------------------------------------------------------------ max_nesting / max_items


def nested_native(depth: int) -> Tuple[bytes, bytes]:
    """fmt and payload of ``[[...[]...]]`` with ``depth`` lists, the outermost top-level."""
    return b"l" + b"0[" * (depth - 1) + b"]" * (depth - 1), b""


def nested_msgpack(depth: int) -> Tuple[bytes, bytes]:
    return b"m", b"\x91" * depth + b"\xc0"


_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def msgpack_ext_header(code: int, length: int) -> bytes:
    """The MessagePack header of an ext of ``length`` bytes (what packb writes before the body)."""
    if length in _FIXEXT:
        return bytes([_FIXEXT[length], code])
    if length < 1 << 8:
        return bytes([0xC7, length, code])
    if length < 1 << 16:
        return b"\xc8" + length.to_bytes(2, "big") + bytes([code])
    return b"\xc9" + length.to_bytes(4, "big") + bytes([code])


def nested_msgpack_tuples(depth: int) -> Tuple[bytes, bytes]:
    """``((...(None,)...),)``: tuple ext (code 1) around a one-element array, ``depth`` times.

    Built from the inside out by headers only: packing the whole document again at each
    level would be quadratic.
    """
    headers: List[bytes] = []
    inner_len = 1  # the innermost None
    for _ in range(depth):
        body_len = 1 + inner_len  # the 0x91 array header + what it holds
        header = msgpack_ext_header(1, body_len)
        headers.append(header + b"\x91")
        inner_len = len(header) + body_len
    return b"m", b"".join(reversed(headers)) + b"\xc0"


def test_nested_msgpack_tuples_builder_matches_msgpack():
    document = msgpack.packb(None)
    for depth in range(1, 300):
        document = msgpack.packb(msgpack.ExtType(1, b"\x91" + document))
        assert nested_msgpack_tuples(depth) == (b"m", document)


NESTINGS = {
    "native": nested_native,
    "msgpack": nested_msgpack,
    "msgpack-tuples": nested_msgpack_tuples,
}


@pytest.mark.parametrize("kind", sorted(NESTINGS))
@pytest.mark.parametrize("depth", [9, 200, 100_000])
def test_payload_nested_deeper_than_max_nesting_drops_only_that_connection(make_server, make_client, recorder, raw, caplog, kind, depth):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    srv = started(make_server, recorder, max_nesting=8)
    bystander = make_client(srv, "bystander")
    peer = raw(srv)
    peer.hello("deep", caps=["msgpack"])
    fmt, payload = NESTINGS[kind](depth)
    peer.send_frame(cmd_body("x", fmt, payload))
    assert srv.left.wait_for(1) == ["deep"]
    peer.wait_closed()
    assert srv.heard.items == []
    sync(bystander)
    no_recursion_errors(caplog)


@pytest.mark.parametrize("kind", sorted(NESTINGS))
def test_payload_nested_exactly_max_nesting_is_accepted(make_server, recorder, raw, kind):
    srv = started(make_server, recorder, max_nesting=8)
    peer = raw(srv)
    peer.hello("ok", caps=["msgpack"])
    # A tuple ext holds an array: each level of the tuple builder is one tuple.
    depth = 8
    fmt, payload = NESTINGS[kind](depth)
    peer.send_frame(cmd_body("x", fmt, payload))
    (name, content), = srv.heard.wait_for(1)
    assert name == "ok"
    levels = 0
    while isinstance(content, (list, tuple)):
        levels += 1
        content = content[0] if content else None
    assert levels == depth


def test_library_client_sending_deeper_than_the_servers_max_nesting_is_dropped(make_server, make_client, recorder, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    srv = started(make_server, recorder, max_nesting=3)
    bystander = make_client(srv, "bystander")
    native = make_client(srv, "native", use_msgpack=False)
    packed = make_client(srv, "packed")
    value: Any = [1]
    for _ in range(5):
        value = [value]
    native.send("x", value)
    packed.send("x", {"a": (1, (2, (3, (4, (5,)))))})
    assert sorted(srv.left.wait_for(2)) == ["native", "packed"]
    sync(bystander, [[1, [2]]])  # depth 3 is fine
    assert srv.heard.items == []
    no_recursion_errors(caplog)


@pytest.mark.parametrize(
    "fmt_payload",
    [
        (b"l" + b"1i" * 5000, b"1" * 5000),
        (b"d" + b"1s1i" * 3000, b"".join(b"%d%d" % (i % 10, i % 10) for i in range(3000))),
        (b"m", msgpack.packb(list(range(5000)))),
        (b"m", msgpack.packb({str(i): i for i in range(3000)})),
        (b"m", msgpack.packb([[i] for i in range(600)])),
    ],
    ids=["native-list", "native-dict", "msgpack-list", "msgpack-map", "msgpack-nested-lists"],
)
def test_payload_with_more_than_max_items_drops_only_that_connection(make_server, make_client, recorder, raw, caplog, fmt_payload):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    srv = started(make_server, recorder, max_items=1000)
    bystander = make_client(srv, "bystander")
    peer = raw(srv)
    peer.hello("many", caps=["msgpack"])
    fmt, payload = fmt_payload
    peer.send_frame(cmd_body("x", fmt, payload))
    assert srv.left.wait_for(1) == ["many"]
    assert srv.heard.items == []
    sync(bystander, list(range(500)))
    no_recursion_errors(caplog)


def test_payload_within_max_items_is_accepted(make_server, recorder, raw):
    srv = started(make_server, recorder, max_items=1000)
    peer = raw(srv)
    peer.hello("fine", caps=["msgpack"])
    peer.send_frame(cmd_body("x", b"m", msgpack.packb(list(range(900)))))
    assert srv.heard.wait_for(1) == [("fine", list(range(900)))]


def test_client_max_nesting_closes_on_a_deep_server_message(make_server, make_client, recorder):
    srv = started(make_server, recorder)
    shallow = make_client(srv, "shallow", max_nesting=2)
    srv.send_client("shallow", "x", [[1]])
    assert shallow.recv("x", timeout=5) == [[1]]
    srv.send_client("shallow", "x", [[[1]]])
    with pytest.raises(ClientDisconnected):
        shallow.recv(timeout=5)


# ------------------------------------------------------------------ close(timeout=...)


def live_greenlets() -> Set[int]:
    gc.collect()
    return {id(g) for g in gc.get_objects() if isinstance(g, gevent.Greenlet) and not g.dead}


def server_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hisock-server" and t.is_alive()]


def test_close_drains_queued_messages_then_disconnects_each_client(make_server, recorder):
    srv = started(make_server, recorder)
    events = recorder()
    client = hisock_gevent.ThreadedHiSockClient(srv.get_addr(), "reader")
    client.on("n")(lambda content: events(content))
    client.on("force_disconnect")(lambda: events("force_disconnect"))
    client.start()
    try:
        wait_until(lambda: srv.get_all_clients("name") == ["reader"])
        count = 300
        for index in range(count):
            srv.send_client("reader", "n", index)
        srv.close(timeout=10)
        assert events.wait_for(count + 1, timeout=15) == list(range(count)) + ["force_disconnect"]
    finally:
        client.close()


def test_close_drains_to_a_client_that_reads_only_after_close_began(make_server, recorder):
    """Queued frames beyond what the kernel buffers still arrive while close() waits."""
    srv = started(make_server, recorder)
    forced = recorder()
    client = HiSockClient(srv.get_addr(), "late-reader")
    client.on("force_disconnect")(lambda: forced("force_disconnect"))
    try:
        wait_until(lambda: srv.get_all_clients("name") == ["late-reader"])
        count = 200
        chunk = b"\x5a" * 32 * 1024  # 6.4 MiB in all: more than loopback buffers hold
        for index in range(count):
            srv.send_client("late-reader", "n", [index, chunk])
        closer = threading.Thread(target=srv.close, kwargs={"timeout": 20})
        closer.start()
        wait_until(lambda: srv.closed)
        received = [client.recv("n", timeout=10) for _ in range(count)]
        assert [index for index, _ in received] == list(range(count))
        assert all(data == chunk for _, data in received)
        with pytest.raises(ClientDisconnected):
            client.recv(timeout=10)
        assert forced.items == ["force_disconnect"]
        closer.join(25)
        assert not closer.is_alive()
    finally:
        client.close()


def test_close_sends_queued_frames_then_a_framed_disconn_then_eof_to_a_plain_peer(make_server, recorder, raw):
    srv = started(make_server, recorder)
    peer = raw(srv)
    peer.hello("plain")
    count = 100
    for index in range(count):
        srv.send_client("plain", "n", index)
    closer = threading.Thread(target=srv.close, kwargs={"timeout": 10})
    closer.start()
    try:
        for index in range(count):
            assert peer.read_frame() == cmd_body("n", b"%di" % len(b"%d" % index), b"%d" % index)
        assert peer.read_frame() == b"$DISCONN$"
        assert peer.wait_closed() == b""
    finally:
        closer.join(15)
    assert not closer.is_alive()
    assert srv.left.items == []  # close() does not run leave (HiSock's disconnect_all_clients)


@pytest.mark.slow
def test_close_timeout_bounds_the_wait_for_a_client_that_never_reads(make_server, make_client, recorder, raw):
    srv = started(make_server, recorder)
    stalled = raw(srv, rcvbuf=4096)
    stalled.hello("stalled")
    flood(srv, "stalled", count=150)  # ~10 MiB that will never be read
    begun = time.monotonic()
    srv.close(timeout=0.5)
    assert time.monotonic() - begun < 4.0
    # Its connection is closed: reading ends (after whatever the kernel already held).
    received = 0
    stalled.sock.settimeout(5)
    for _ in range(10_000):  # bounded; each read takes up to 1 MiB
        try:
            chunk = stalled.sock.recv(1 << 20)
        except ConnectionResetError:
            break
        except socket.timeout:
            pytest.fail("the server left the stalled client's connection open after close()")
        if not chunk:
            break
        received += len(chunk)
    assert received < 150 * 64 * 1024


@pytest.mark.slow
def test_new_connections_are_refused_during_and_after_close(make_server, recorder, raw):
    srv = started(make_server, recorder)
    stalled = raw(srv, rcvbuf=4096)
    stalled.hello("stalled")
    flood(srv, "stalled", count=150)  # ~10 MiB queued and unread: close() will wait on it
    closer = threading.Thread(target=srv.close, kwargs={"timeout": 2})
    closer.start()
    try:
        wait_until(lambda: srv.closed)
        begun = time.monotonic()
        with pytest.raises((ServerNotRunning, ConnectionRejected)):
            HiSockClient(srv.get_addr(), "during", answer_timeout=5)
        assert time.monotonic() - begun < 1.5
        assert closer.is_alive(), "close() should still be draining the stalled client"
    finally:
        closer.join(10)
    with pytest.raises(ServerNotRunning):
        HiSockClient(srv.get_addr(), "after", answer_timeout=5)
    assert srv.joined.items == ["stalled"]


@pytest.mark.slow
def test_close_leaves_no_server_greenlets_threads_or_port(recorder):
    before_greenlets = live_greenlets()
    before_threads = len(server_threads())
    srv = ThreadedHiSockServer((LOOPBACK, 0), keepalive=True, keepalive_interval=0.1, keepalive_timeout=5, handshake_timeout=5)
    install_echo(srv)
    srv.start()
    addr = srv.get_addr()
    peers: List[RawPeer] = []
    client = hisock_gevent.ThreadedHiSockClient(addr, "threaded")
    client.start()
    try:
        for index in range(5):
            peer = RawPeer(addr)
            peer.hello(f"raw{index}")
            peers.append(peer)
        peers.append(RawPeer(addr))  # mid-handshake: no hello
        stalled = RawPeer(addr, rcvbuf=4096)
        stalled.hello("stalled")
        peers.append(stalled)
        flood(srv, "stalled", count=20)
        wait_until(lambda: len(srv.get_all_clients()) == 7)
        assert len(live_greenlets() - before_greenlets) > 0
        srv.close(timeout=1)
    finally:
        client.close()
        for peer in peers:
            peer.close()
    assert srv.closed
    wait_until(lambda: len(server_threads()) == before_threads)
    leaked = live_greenlets() - before_greenlets
    assert not leaked, [repr(g) for g in gc.get_objects() if id(g) in leaked]
    # Nobody listens any more, and the port can be served again at once.
    probe = socket.socket()
    try:
        with pytest.raises(ConnectionRefusedError):
            probe.connect(addr)
    finally:
        probe.close()
    again = ThreadedHiSockServer(addr)
    try:
        again.start()
        assert again.get_addr() == addr
        HiSockClient(addr, "again").close()
    finally:
        again.close()


def test_close_twice_and_close_from_a_handler_are_harmless(make_server, make_client, recorder):
    srv = started(make_server, recorder)
    srv.on("shutdown")(lambda client, content: srv.close(timeout=1))
    client = make_client(srv, "boss")
    client.send("shutdown", None)
    with pytest.raises(ClientDisconnected):
        client.recv(timeout=5)
    wait_until(lambda: srv.closed)
    srv.close()
    with pytest.raises(ServerNotRunning):
        HiSockClient(srv.get_addr(), "late")


# ------------------------------------------------------------------ limits both sides know


def test_a_send_over_the_servers_limit_raises_at_once_with_that_limit(make_server, make_client):
    srv = make_server(max_message_size=100_000)
    install_echo(srv)
    srv.start()
    client = make_client(srv, "big")
    with pytest.raises(hisock_gevent.ContentTooLarge, match="more than the 100000-byte limit"):
        client.send("blob", b"x" * 100_001)
    with pytest.raises(hisock_gevent.ContentTooLarge):
        client.call("blob", b"x" * 200_000)
    client.send("blob", b"x" * 99_000)  # under it: goes
    sync(client)
    assert srv.get_all_clients(key="name") == ["big"]


def test_a_client_dropped_for_a_protocol_error_is_told_why(make_server, make_client):
    srv = make_server()
    srv.start()
    client = make_client(srv, "rude", threaded=True)
    forced = threading.Event()
    client.on("force_disconnect")(forced.set)
    client.start()
    # A name longer than the server accepts, sent around the client's own API.
    client._link.write(wire_frame(b"$CHNAME$" + b"n" * 300))
    assert forced.wait(5)
    assert "more than the 256 allowed" in (client.disconnect_reason or "")
