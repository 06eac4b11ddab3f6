"""HiSockServer.stats() and the HTTP monitor (hisock_gevent.stats, hisock_gevent.monitor).

Counters are checked as exact numbers over real loopback sockets.  Most tests take a
snapshot, do one thing, and compare every counter that changed (:func:`delta`), so a
test also fails when something *else* moved.  Bytes are counted at the socket, so exact
byte counts are only asserted against raw peers, whose every byte the test wrote or read
itself; for hisock_gevent clients (msgpack dialect) bytes are checked as lower bounds.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Tuple

import gevent
import gevent.event
import pytest
from conftest import LOOPBACK, wait_until
from gevent.pywsgi import WSGIServer
from prometheus_client.parser import text_string_to_metric_families
from rawpeer import HEADER_LEN, RawPeer, cmd_body, hello_body, wire_frame

from hisock_gevent import (
    AuthenticationFailed,
    ClientNotFound,
    ConnectionRejected,
    HiSockServer,
    ThreadedHiSockServer,
)
from hisock_gevent import stats as reasons
from hisock_gevent.errors import (
    HandshakeError,
    InvalidHeader,
    MalformedPayload,
    MessageTooLarge,
    TLSError,
)
from hisock_gevent.history import StatsHistory
from hisock_gevent.monitor import serve_stats, stats_app
from hisock_gevent.stats import rejection_reason

pytestmark = pytest.mark.timeout(30)


# ------------------------------------------------------------------ helpers

# The keys whose values are open-ended (reason -> count, group -> count).
_OPEN_ENDED = ("refused", "dropped", "groups", "rejected")

EXPECTED_SHAPE = {
    "address": "str",
    "uptime_s": "float",
    "connections": {"now": "int", "peak": "int", "accepted": "int", "refused": "dict"},
    "clients": {
        "joined": "int",
        "joins": "int",
        "groups": "dict",
        "ungrouped": "int",
        "left": "int",
        "dropped": "dict",
    },
    "messages": {"in": "int", "out": "int"},
    "bytes": {"in": "int", "out": "int"},
    "rejected": "dict",
}


def shape(snapshot: Dict[str, Any]) -> Dict[str, Any]:
    """The keys of a stats dict and the type of each leaf (open-ended dicts as ``"dict"``)."""
    out: Dict[str, Any] = {}
    for key, value in snapshot.items():
        if isinstance(value, dict) and key not in _OPEN_ENDED:
            out[key] = shape(value)
        else:
            out[key] = type(value).__name__
    return out


def flat(snapshot: Dict[str, Any], prefix: str = "") -> Dict[str, int]:
    """Every counter of a stats dict by dotted path (``"clients.dropped.kicked"``); no uptime."""
    out: Dict[str, int] = {}
    for key, value in snapshot.items():
        if key in ("uptime_s", "address"):
            continue
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def delta(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, int]:
    """The counters that changed between two snapshots, and by how much."""
    old, new = flat(before), flat(after)
    changed = {key: new.get(key, 0) - old.get(key, 0) for key in old.keys() | new.keys()}
    return {key: diff for key, diff in changed.items() if diff}


def frame_len(body: bytes) -> int:
    return HEADER_LEN + len(body)


def joined_raw(raw: Callable[..., RawPeer], srv: Any, name: str, **kwargs: Any) -> Tuple[RawPeer, int]:
    """A raw peer that said hello; also the bytes of the $CLTCONN$ it read back."""
    peer = raw(srv, **kwargs)
    answer = peer.hello(name)
    return peer, frame_len(answer)


def started(make_server: Callable[..., Any], recorder: Any, **kwargs: Any) -> Any:
    """A started server whose ``heard`` recorder gets ``(name, content)`` of every ``x``."""
    srv = make_server(**kwargs)
    srv.heard = recorder()
    srv.on("x")(lambda client, content: srv.heard((client.name, content)))
    srv.start()
    return srv


def clients_now(srv: Any, count: int) -> None:
    """Wait until exactly ``count`` connections are open (joined or handshaking)."""
    wait_until(lambda: srv.stats()["connections"]["now"] == count)


# ------------------------------------------------------------------ rejection_reason (pure)


@pytest.mark.parametrize(
    "exc, name",
    [
        (MessageTooLarge("x"), "message_too_large"),
        (TLSError("x"), "tls_error"),
        (InvalidHeader("x"), "invalid_header"),
        (MalformedPayload("x"), "malformed_payload"),
        (HandshakeError("x"), "handshake_error"),
    ],
)
def test_rejection_reason_is_the_error_class_name_in_snake_case(exc, name):
    assert rejection_reason(exc) == name


def test_reason_constants_are_the_documented_names():
    assert (reasons.LEFT, reasons.CONNECTION_LOST, reasons.PROTOCOL_ERROR, reasons.SLOW_READER) == (
        "left", "connection_lost", "protocol_error", "slow_reader",
    )
    assert (reasons.IDLE_TIMEOUT, reasons.KEEPALIVE_TIMEOUT, reasons.KICKED, reasons.SERVER_CLOSED) == (
        "idle_timeout", "keepalive_timeout", "kicked", "server_closed",
    )
    assert (reasons.SERVER_FULL, reasons.AUTH_FAILED, reasons.NO_HELLO) == ("server_full", "auth_failed", "no_hello")


# ------------------------------------------------------------------ shape


def test_stats_of_a_server_never_started_are_all_zero(make_server):
    srv = make_server()
    snap = srv.stats()
    assert shape(snap) == EXPECTED_SHAPE
    assert snap["address"] == f"{LOOPBACK}:{srv.get_addr()[1]}"
    assert snap["uptime_s"] >= 0
    assert flat(snap) == {
        "connections.now": 0, "connections.peak": 0, "connections.accepted": 0,
        "clients.joined": 0, "clients.joins": 0, "clients.ungrouped": 0, "clients.left": 0,
        "messages.in": 0, "messages.out": 0, "bytes.in": 0, "bytes.out": 0,
    }


def test_stats_is_json_ready(server, make_client):
    make_client(server, "alice", "red")
    snap = server.stats()
    assert json.loads(json.dumps(snap)) == snap


# ------------------------------------------------------------------ connections and clients


def test_connections_now_peak_and_accepted_follow_clients_coming_and_going(server, make_client):
    a = make_client(server, "a")
    b = make_client(server, "b")
    conns = server.stats()["connections"]
    assert (conns["now"], conns["peak"], conns["accepted"]) == (2, 2, 2)

    a.close()
    clients_now(server, 1)
    conns = server.stats()["connections"]
    assert (conns["now"], conns["peak"], conns["accepted"]) == (1, 2, 2)

    make_client(server, "c")
    conns = server.stats()["connections"]
    assert (conns["now"], conns["peak"], conns["accepted"]) == (2, 2, 3)

    make_client(server, "d")
    b.close()
    clients_now(server, 2)
    snap = server.stats()
    assert (snap["connections"]["now"], snap["connections"]["peak"], snap["connections"]["accepted"]) == (2, 3, 4)
    assert (snap["clients"]["joined"], snap["clients"]["joins"], snap["clients"]["left"]) == (2, 4, 2)
    assert snap["clients"]["dropped"] == {}
    assert snap["connections"]["refused"] == {}


def test_a_connection_still_in_its_handshake_is_open_but_not_joined(server, raw):
    peer = raw(server)  # connected, no hello yet
    clients_now(server, 1)
    snap = server.stats()
    assert (snap["connections"]["now"], snap["clients"]["joined"], snap["clients"]["joins"]) == (1, 0, 0)
    peer.hello("late")
    clients = server.stats()["clients"]
    assert (clients["joined"], clients["joins"]) == (1, 1)


def test_groups_count_clients_largest_first_and_ungrouped_the_rest(server, make_client):
    make_client(server, "b1", "blue")
    make_client(server, "r1", "red")
    make_client(server, "r2", "red")
    make_client(server, "g1", "green")
    make_client(server, "loner")
    clients = server.stats()["clients"]
    # Largest first; a tie is broken by the group's name.
    assert list(clients["groups"].items()) == [("red", 2), ("blue", 1), ("green", 1)]
    assert (clients["joined"], clients["ungrouped"]) == (5, 1)


def test_group_change_moves_the_client_between_groups_and_empty_groups_vanish(server, make_client, recorder):
    changes = recorder()
    server.on("group_change")(lambda client, old, new: changes((old, new)))
    make_client(server, "r1", "red")
    mover = make_client(server, "b1", "blue")
    loner = make_client(server, "loner")

    mover.change_group("red")
    changes.wait_for(1)
    clients = server.stats()["clients"]
    assert clients["groups"] == {"red": 2}
    assert clients["ungrouped"] == 1

    loner.change_group("green")
    changes.wait_for(2)
    clients = server.stats()["clients"]
    assert list(clients["groups"].items()) == [("red", 2), ("green", 1)]
    assert (clients["joined"], clients["ungrouped"]) == (3, 0)

    loner.change_group(None)  # back to the group it connected with: none
    changes.wait_for(3)
    clients = server.stats()["clients"]
    assert clients["groups"] == {"red": 2}
    assert clients["ungrouped"] == 1


def test_name_change_leaves_groups_and_counts_alone(server, make_client, recorder):
    changes = recorder()
    server.on("name_change")(lambda client, old, new: changes((old, new)))
    renamed = make_client(server, "before", "red")
    make_client(server, "other", "red")
    before = server.stats()
    renamed.change_name("after")
    assert changes.wait_for(1) == [("before", "after")]
    after = server.stats()
    assert after["clients"]["groups"] == {"red": 2}
    # $CHNAME$ is one message in, and nothing else changed.
    assert delta(before, after) == {"messages.in": 1, "bytes.in": frame_len(b"$CHNAME$after")}


# ------------------------------------------------------------------ messages and bytes


def test_a_raw_peer_joining_counts_its_hello_in_and_its_answer_out_to_the_byte(server, raw):
    peer = raw(server)
    hello = hello_body("raw1")
    peer.send_frame(hello)
    answer = peer.read_frame()
    assert answer.startswith(b"$CLTCONN$")
    expected = {"messages.in": 1, "bytes.in": frame_len(hello), "messages.out": 1, "bytes.out": frame_len(answer)}
    # The answer's bytes are counted just after the kernel took them: wait for that.
    wait_until(lambda: {key: flat(server.stats())[key] for key in expected} == expected)


def test_a_client_send_adds_one_message_in(make_server, make_client, recorder):
    srv = started(make_server, recorder)
    client = make_client(srv, "alice")
    before = srv.stats()
    client.send("x", "hello")
    assert srv.heard.wait_for(1) == [("alice", "hello")]
    changed = delta(before, srv.stats())
    assert changed.pop("messages.in") == 1
    assert changed.pop("bytes.in") >= frame_len(b"$CMD$x$MSG$") + len("hello")
    assert changed == {}


def test_raw_frames_in_are_counted_to_the_byte(make_server, recorder, raw):
    srv = started(make_server, recorder)
    peer, _ = joined_raw(raw, srv, "raw1")
    before = srv.stats()
    bodies = [cmd_body("x", b"3s", b"one"), cmd_body("x", b"300s", b"two" * 100)]
    peer.send_raw(b"".join(wire_frame(body) for body in bodies))  # two frames in one write
    assert srv.heard.wait_for(2) == [("raw1", "one"), ("raw1", "two" * 100)]
    assert delta(before, srv.stats()) == {"messages.in": 2, "bytes.in": sum(frame_len(body) for body in bodies)}


def test_send_all_clients_to_n_clients_adds_n_messages_out_and_their_exact_bytes(server, raw):
    peers = [joined_raw(raw, server, f"raw{i}")[0] for i in range(3)]
    # Each later join was announced to the earlier peers: read those announcements away.
    for index, peer in enumerate(peers):
        for _ in range(len(peers) - 1 - index):
            assert peer.read_frame().startswith(b"$CLTCONN$")
    # Every frame so far was read, so its bytes are counted too: the byte counter is bumped
    # in the hub callback that wrote them, before any later stats() call can run there.
    before = server.stats()
    assert before["messages"]["out"] == 3 + 3  # 3 answers + 3 announcements

    server.send_all_clients("news", "extra")
    # messages.out is counted as each frame is queued, so it is exact at once.
    assert server.stats()["messages"]["out"] - before["messages"]["out"] == 3
    read = [peer.read_frame() for peer in peers]
    assert all(b"news" in body and b"extra" in body for body in read)
    expected = {"messages.out": 3, "bytes.out": sum(frame_len(body) for body in read)}
    wait_until(lambda: delta(before, server.stats()) == expected)


def test_send_group_and_send_client_add_one_message_per_receiver(server, make_client):
    make_client(server, "r1", "red")
    make_client(server, "r2", "red")
    blue = make_client(server, "b1", "blue")
    out = lambda: server.stats()["messages"]["out"]  # noqa: E731
    before = out()
    server.send_group("red", "hi", "red team")
    assert out() - before == 2
    server.send_client("b1", "hi", "just you")
    assert out() - before == 3
    assert blue.recv("hi", timeout=5) == "just you"


def test_broadcast_bytes_out_grow_by_at_least_the_frames(server, make_client):
    clients = [make_client(server, f"c{i}") for i in range(4)]
    before = server.stats()
    server.send_all_clients("news", "x" * 1000)
    for client in clients:
        assert client.recv("news", timeout=5) == "x" * 1000
    after = server.stats()
    assert after["messages"]["out"] - before["messages"]["out"] == 4
    # Every byte of each frame was read by its client, so it was counted before that.
    assert after["bytes"]["out"] - before["bytes"]["out"] >= 4 * frame_len(b"$CMD$news$MSG$" + b"x" * 1000)
    assert after["messages"]["in"] == before["messages"]["in"]


# ------------------------------------------------------------------ why clients go


def test_clean_close_counts_as_left_not_dropped(server, make_client, raw):
    # One at a time: a peer closing with frames unread (say, the other's $CLTDISCONN$)
    # makes its kernel send a RST, which is a connection lost, not a clean close.
    peer, _ = joined_raw(raw, server, "quiet")
    peer.close()  # just closes its end, between frames, with nothing unread
    clients_now(server, 0)
    make_client(server, "polite").close()  # says $USRCLOSE$
    clients_now(server, 0)
    wait_until(lambda: server.stats()["clients"]["joins"] == 2)
    clients = server.stats()["clients"]
    assert (clients["joined"], clients["left"], clients["dropped"]) == (0, 2, {})


def test_closing_in_the_middle_of_a_frame_is_connection_lost(server, raw):
    peer, _ = joined_raw(raw, server, "cut")
    peer.send_raw(wire_frame(b"x" * 100)[: HEADER_LEN + 10])
    peer.close()
    clients_now(server, 0)
    clients = server.stats()["clients"]
    assert (clients["left"], clients["dropped"]) == (0, {"connection_lost": 1})


def test_a_reset_connection_is_connection_lost(server, raw):
    peer, _ = joined_raw(raw, server, "reset")
    # SO_LINGER 0: close() sends a RST instead of a FIN.
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    clients_now(server, 0)
    clients = server.stats()["clients"]
    assert (clients["left"], clients["dropped"]) == (0, {"connection_lost": 1})


def test_disconnect_client_counts_kicked_once(server, make_client):
    make_client(server, "stays")
    make_client(server, "kicked")
    make_client(server, "forced")
    server.disconnect_client("kicked")
    server.disconnect_client("forced", force=True)
    clients_now(server, 1)
    clients = server.stats()["clients"]
    assert (clients["joined"], clients["left"], clients["dropped"]) == (1, 0, {"kicked": 2})


def test_bad_header_after_joining_is_a_protocol_error_and_rejected_invalid_header(server, make_client, raw):
    make_client(server, "bystander")
    peer, _ = joined_raw(raw, server, "garbage")
    peer.send_raw(b"not a number!!!!" + b"body")
    peer.wait_closed()
    clients_now(server, 1)
    snap = server.stats()
    assert snap["rejected"] == {"invalid_header": 1}
    assert (snap["clients"]["joined"], snap["clients"]["left"], snap["clients"]["dropped"]) == (1, 0, {"protocol_error": 1})


def test_malformed_payload_after_joining_is_rejected_by_its_error_name(server, raw):
    peer, _ = joined_raw(raw, server, "bad-int")
    peer.send_frame(cmd_body("x", b"i", b"not an int"))
    peer.wait_closed()
    clients_now(server, 0)
    snap = server.stats()
    assert snap["rejected"] == {"malformed_payload": 1}
    assert snap["clients"]["dropped"] == {"protocol_error": 1}


def test_oversized_frame_is_rejected_message_too_large(make_server, raw):
    srv = make_server(max_message_size=1000)
    srv.start()
    peer, _ = joined_raw(raw, srv, "big")
    peer.send_raw(wire_frame(b"y" * 5000))
    peer.wait_closed()
    clients_now(srv, 0)
    snap = srv.stats()
    assert snap["rejected"] == {"message_too_large": 1}
    assert snap["clients"]["dropped"] == {"protocol_error": 1}


def test_bad_first_frame_is_rejected_but_neither_refused_nor_dropped(server, raw):
    peer = raw(server)
    peer.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    peer.wait_closed()
    clients_now(server, 0)
    snap = server.stats()
    assert snap["rejected"] == {"invalid_header": 1}
    assert snap["connections"]["refused"] == {}
    assert (snap["connections"]["accepted"], snap["clients"]["joins"], snap["clients"]["dropped"]) == (1, 0, {})


def test_client_that_never_reads_is_dropped_slow_reader(make_server, raw):
    srv = make_server(max_queue_bytes=64 * 1024)
    srv.start()
    joined_raw(raw, srv, "stalled", rcvbuf=4096)  # reads its $CLTCONN$, then nothing
    chunk = b"\xab" * 64 * 1024
    for _ in range(200):  # bounded: the kernel's buffers take a few MiB at most
        try:
            srv.send_client("stalled", "flood", chunk)
        except ClientNotFound:
            break
    else:
        raise AssertionError("the client that never reads was never dropped")
    clients = srv.stats()["clients"]
    assert (clients["joined"], clients["left"], clients["dropped"]) == (0, 0, {"slow_reader": 1})


def test_client_that_sends_nothing_is_dropped_idle_timeout(make_server, make_client, raw):
    srv = make_server(idle_timeout=0.3)
    srv.start()
    joined_raw(raw, srv, "idle")
    wait_until(lambda: srv.stats()["clients"]["joined"] == 0)
    clients = srv.stats()["clients"]
    assert (clients["left"], clients["dropped"]) == (0, {"idle_timeout": 1})


def test_client_that_ignores_keepalives_is_dropped_keepalive_timeout(make_server, raw):
    srv = make_server(keepalive=True, keepalive_interval=0.2, keepalive_timeout=0.2)
    srv.start()
    joined_raw(raw, srv, "deaf")  # never answers $KEEPALIVE$
    wait_until(lambda: srv.stats()["clients"]["joined"] == 0)
    snap = srv.stats()
    assert (snap["clients"]["left"], snap["clients"]["dropped"]) == (0, {"keepalive_timeout": 1})
    # Its $CLTCONN$ answer and at least one $KEEPALIVE$ went out.
    assert snap["messages"]["out"] >= 2


def test_server_close_counts_every_joined_client_as_server_closed(make_server, make_client):
    srv = make_server()
    srv.start()
    make_client(srv, "a", "red")
    make_client(srv, "b")
    make_client(srv, "c").close()
    wait_until(lambda: srv.stats()["clients"]["joined"] == 2)
    srv.close()
    snap = srv.stats()  # still answers once the server is closed
    assert (snap["connections"]["now"], snap["clients"]["joined"], snap["clients"]["groups"]) == (0, 0, {})
    assert (snap["clients"]["left"], snap["clients"]["dropped"]) == (1, {"server_closed": 2})


def test_disconnect_all_clients_counts_server_closed(server, make_client):
    for name in ("a", "b", "c"):
        make_client(server, name)
    server.disconnect_all_clients()
    clients_now(server, 0)
    assert server.stats()["clients"]["dropped"] == {"server_closed": 3}


# ------------------------------------------------------------------ refused before joining


def test_client_over_max_connections_is_refused_server_full(make_server, make_client):
    srv = make_server(max_connections=1)
    srv.start()
    make_client(srv, "first")
    with pytest.raises(ConnectionRejected):
        make_client(srv, "second")
    snap = srv.stats()
    assert snap["connections"]["refused"] == {"server_full": 1}
    # Accepted counts every connection taken in, refused ones too; it was never open
    # (now/peak count the connections being served).
    assert (snap["connections"]["now"], snap["connections"]["peak"], snap["connections"]["accepted"]) == (1, 1, 2)
    assert (snap["clients"]["joins"], snap["clients"]["dropped"]) == (1, {})


def test_client_failing_authentication_is_refused_auth_failed(make_server, make_client):
    srv = make_server(authenticate=lambda info, credentials: False)
    srv.start()
    for name in ("mallory", "eve"):
        with pytest.raises(AuthenticationFailed):
            make_client(srv, name)
    clients_now(srv, 0)
    snap = srv.stats()
    assert snap["connections"]["refused"] == {"auth_failed": 2}
    assert (snap["connections"]["accepted"], snap["clients"]["joins"], snap["clients"]["dropped"]) == (2, 0, {})


def test_connection_without_hello_is_refused_no_hello(make_server, raw):
    srv = make_server(handshake_timeout=0.3)
    srv.start()
    peer = raw(srv)  # says nothing
    peer.wait_closed()
    clients_now(srv, 0)
    snap = srv.stats()
    assert snap["connections"]["refused"] == {"no_hello": 1}
    assert (snap["connections"]["accepted"], snap["clients"]["joins"], snap["rejected"]) == (1, 0, {})


def test_connection_closed_before_hello_is_not_refused(server, raw):
    raw(server).close()  # a port probe
    wait_until(lambda: server.stats()["connections"]["accepted"] == 1)
    clients_now(server, 0)
    snap = server.stats()
    assert (snap["connections"]["refused"], snap["rejected"], snap["clients"]["left"]) == ({}, {}, 0)


# ------------------------------------------------------------------ threads


def test_stats_from_other_threads_while_clients_come_and_go(server, make_client):
    results: List[Dict[str, Any]] = []
    errors: List[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                results.append(server.stats())
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for index in range(10):
            make_client(server, f"c{index}", "even" if index % 2 == 0 else None).close()
        wait_until(lambda: len(results) >= 40)
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    for snap in results:
        assert shape(snap) == EXPECTED_SHAPE
        clients, conns = snap["clients"], snap["connections"]
        assert clients["joined"] == sum(clients["groups"].values()) + clients["ungrouped"]
        assert conns["now"] <= conns["peak"] <= conns["accepted"] <= 10
    clients_now(server, 0)
    final = server.stats()
    assert (final["connections"]["accepted"], final["clients"]["joins"], final["clients"]["left"]) == (10, 10, 10)


def test_plain_server_stats_from_another_thread_after_start_returned():
    """A plain HiSockServer served from a user thread: once close() made start() return
    and that thread ended, stats() from any other thread must still answer."""
    srv = HiSockServer((LOOPBACK, 0))
    thread = threading.Thread(target=srv.start, daemon=True)
    thread.start()
    wait_until(lambda: srv._home.alive)
    answers: List[Dict[str, Any]] = []
    go = threading.Event()

    def ask() -> None:
        go.wait(10)
        answers.append(srv.stats())

    # Started while the serving thread lives, so the OS cannot give it that thread's
    # (reusable) ident, which would make the call look like one from the home thread.
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    srv.close()
    thread.join(5)
    assert not thread.is_alive()
    go.set()
    asker.join(1)
    try:
        assert answers, "stats() from another thread hangs once the serving thread has ended"
    finally:
        asker.join(2)


# ------------------------------------------------------------------ WSGI app (pure)

FAKE_STATS: Dict[str, Any] = {
    "address": "127.0.0.1:1",
    "uptime_s": 12.5,
    "connections": {"now": 3, "peak": 7, "accepted": 11, "refused": {"server_full": 2, "no_hello": 1}},
    "clients": {
        "joined": 3,
        "joins": 8,
        "groups": {"red": 2},
        "ungrouped": 1,
        "left": 4,
        "dropped": {"kicked": 1},
    },
    "messages": {"in": 100, "out": 250},
    "bytes": {"in": 4000, "out": 9000},
    "rejected": {"invalid_header": 1},
}


def call_app(
    path: str,
    method: str = "GET",
    stats: Callable[[], Dict[str, Any]] = lambda: FAKE_STATS,
    history: Any = None,
    query: str = "",
) -> Tuple[str, Dict[str, str], bytes]:
    """Run stats_app for one request; (status, headers, body)."""
    started: List[Tuple[str, List[Tuple[str, str]]]] = []

    def start_response(status: str, headers: List[Tuple[str, str]]) -> None:
        started.append((status, headers))

    environ = {"PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": query}
    body = b"".join(stats_app(stats, history)(environ, start_response))
    assert len(started) == 1
    status, headers = started[0]
    return status, dict(headers), body


_INITIAL_DATA = re.compile(rb'<script id="initial-data" type="application/json">(.*?)</script>', re.S)


def initial_data(page: bytes) -> Any:
    """The figures a stats page was served with (its initial-data script element)."""
    found = _INITIAL_DATA.search(page)
    assert found, "the page has no initial-data element"
    return json.loads(found.group(1))


def fed_history(seconds: int, points: int = 300) -> StatsHistory:
    """A history fed ``seconds`` + 1 snapshots, one a second, 5 messages in each second."""
    history = StatsHistory(points)
    for second in range(seconds + 1):
        history.record(dict(FAKE_STATS, messages={"in": 5 * second, "out": 0}), float(second), 1_800_000_000.0 + second)
    return history


def metric_samples(text: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_app_stats_page_is_the_stats_dict_as_json():
    status, headers, body = call_app("/stats")
    assert status == "200 OK"
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == FAKE_STATS


def test_app_metrics_page_has_every_counter_with_its_value():
    status, headers, body = call_app("/metrics")
    assert status == "200 OK"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = metric_samples(body.decode())
    reason = lambda value: (("reason", value),)  # noqa: E731
    assert samples == {
        ("hisock_connections", ()): 3,
        ("hisock_connections_peak", ()): 7,
        ("hisock_connections_accepted_total", ()): 11,
        ("hisock_connections_refused_total", reason("server_full")): 2,
        ("hisock_connections_refused_total", reason("no_hello")): 1,
        ("hisock_clients", ()): 3,
        ("hisock_group_clients", (("group", "red"),)): 2,
        ("hisock_clients_left_total", ()): 4,
        ("hisock_clients_dropped_total", reason("kicked")): 1,
        ("hisock_messages_received_total", ()): 100,
        ("hisock_messages_sent_total", ()): 250,
        ("hisock_bytes_received_total", ()): 4000,
        ("hisock_bytes_sent_total", ()): 9000,
        ("hisock_frames_rejected_total", reason("invalid_header")): 1,
        ("hisock_uptime_seconds", ()): 12.5,
    }


def test_app_metrics_reads_stats_once_per_scrape():
    calls: List[int] = []

    def counting() -> Dict[str, Any]:
        calls.append(1)
        return FAKE_STATS

    call_app("/metrics", stats=counting)
    assert len(calls) == 1


def test_app_root_is_an_html_page():
    for path in ("/", "/index.html"):
        status, headers, body = call_app(path)
        assert status == "200 OK"
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert body.lstrip().lower().startswith(b"<!doctype html")
        assert b"/stats" in body


@pytest.mark.parametrize("path", ["/nope", "/stats/", "/metrics.txt", "/favicon.ico"])
def test_app_other_paths_are_404(path):
    status, _, _ = call_app(path)
    assert status == "404 Not Found"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_app_methods_other_than_get_are_405_and_say_what_is_allowed(method):
    for path in ("/stats", "/metrics", "/history", "/", "/nope"):
        status, headers, _ = call_app(path, method, history=StatsHistory())
        assert status == "405 Method Not Allowed"
        assert headers["Content-Type"] == "text/plain"
        assert headers["Allow"] == "GET, HEAD"


def test_app_does_not_read_stats_for_a_refused_request():
    def never() -> Dict[str, Any]:
        raise AssertionError("stats() read for a request that does not need it")

    assert call_app("/stats", "POST", never)[0].startswith("405")
    assert call_app("/", "POST", never)[0].startswith("405")
    assert call_app("/nope", "GET", never)[0].startswith("404")
    assert call_app("/history", "GET", never, history=StatsHistory())[0].startswith("200")


def test_app_root_comes_with_the_figures_of_the_moment_read_once():
    calls: List[int] = []

    def counting() -> Dict[str, Any]:
        calls.append(1)
        return FAKE_STATS

    status, _, body = call_app("/", stats=counting, history=fed_history(3))
    assert status == "200 OK"
    assert len(calls) == 1
    data = initial_data(body)
    assert data["stats"] == FAKE_STATS
    assert data["history"]["latest"] == 3
    assert [sample["messages_in_per_s"] for sample in data["history"]["samples"]] == [5.0, 5.0, 5.0]
    assert isinstance(data["served_at"], float)


def test_app_root_without_a_history_says_so_in_its_figures():
    assert initial_data(call_app("/")[2])["history"] is None


HOSTILE_NAMES = ["<img src=x onerror=alert(1)>", "</script><script>window.pwned=1</script>", "<!--", "a&amp;b", "\u2028\\"]


def test_app_root_escapes_client_chosen_names_inside_its_script():
    groups = {name: n for n, name in enumerate(HOSTILE_NAMES, 1)}
    hostile = dict(FAKE_STATS, clients=dict(FAKE_STATS["clients"], groups=groups), address="</script>")
    status, _, body = call_app("/", stats=lambda: hostile)
    assert status == "200 OK"
    script = _INITIAL_DATA.search(body)
    assert script is not None
    # Nothing a client chose can end the element or open a tag or a comment in it.
    assert not re.search(rb"[<>&]", script.group(1))
    assert initial_data(body)["stats"]["clients"]["groups"] == groups
    assert initial_data(body)["stats"]["address"] == "</script>"
    # The page around the data is the page: the same number of script elements as always.
    assert body.count(b"</script>") == call_app("/")[2].count(b"</script>") == 2


def test_app_root_is_served_without_figures_when_stats_fails(caplog):
    def broken() -> Dict[str, Any]:
        raise RuntimeError("no stats today")

    with caplog.at_level(logging.ERROR, logger="hisock_gevent"):
        status, _, body = call_app("/", stats=broken)
    assert status == "200 OK"
    assert initial_data(body)["stats"] is None
    assert "no stats today" in caplog.text


def test_app_history_page_is_the_history_as_json():
    status, headers, body = call_app("/history", history=fed_history(400))
    assert status == "200 OK"
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    answer = json.loads(body)
    assert (answer["interval_s"], answer["points"], answer["latest"]) == (1.0, 300, 400)
    assert [sample["seq"] for sample in answer["samples"]] == list(range(101, 401))


def test_app_history_since_gives_only_the_newer_samples():
    answer = json.loads(call_app("/history", history=fed_history(10), query="since=7")[2])
    assert [sample["seq"] for sample in answer["samples"]] == [8, 9, 10]
    assert answer["latest"] == 10


@pytest.mark.parametrize("query", ["since=x", "since=1.5", "since="])
def test_app_history_with_a_bad_since_is_400(query):
    assert call_app("/history", history=fed_history(2), query=query)[0] == "400 Bad Request"


def test_app_history_without_a_history_is_404():
    assert call_app("/history")[0] == "404 Not Found"


# ------------------------------------------------------------------ serve_stats over HTTP


@pytest.fixture
def monitored() -> Iterator[Callable[..., Tuple[HiSockServer, str]]]:
    """Factory: a plain HiSockServer and serve_stats, both served by one helper thread.

    This is the documented way to use serve_stats: call it in the hub that will run the
    server, then start() the server there; the WSGI server and the HiSock server share
    that hub and no extra thread.  The test thread is a client of both; close() (safe from
    any thread) ends start(), and the helper then stops the HTTP server.
    Returns ``(server, "http://127.0.0.1:PORT")``.
    """
    running: List[Tuple[HiSockServer, threading.Thread]] = []

    def factory(**kwargs: Any) -> Tuple[HiSockServer, str]:
        srv = HiSockServer((LOOPBACK, 0), **kwargs)
        ready = threading.Event()
        box: Dict[str, Any] = {}

        def run() -> None:
            http = serve_stats(srv.stats, LOOPBACK, 0)
            box["address"] = http.address
            # Runs once start() has begun serving and waits in the hub.
            gevent.spawn(ready.set)
            try:
                srv.start()
            finally:
                http.stop(timeout=1)
                gevent.get_hub().destroy(destroy_loop=True)

        thread = threading.Thread(target=run, name="stats-monitor", daemon=True)
        thread.start()
        assert ready.wait(5), "the monitored server did not start"
        running.append((srv, thread))
        host, port = box["address"][:2]
        return srv, f"http://{host}:{port}"

    yield factory
    for srv, thread in running:
        srv.close()
        thread.join(10)
        assert not thread.is_alive()


def fetch(url: str) -> Tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_serve_stats_serves_live_stats_and_metrics_over_http(monitored, make_client, raw):
    srv, base = monitored()
    make_client(srv, "r1", "red")
    make_client(srv, "r2", "red")
    make_client(srv, "loner")
    srv.disconnect_client("loner")
    bad, _ = joined_raw(raw, srv, "bad")
    bad.send_raw(b"definitely not a header")
    bad.wait_closed()
    clients_now(srv, 2)
    srv.send_all_clients("news", "x")  # no counter changes after this: the server is quiet

    status, content_type, body = fetch(base + "/stats")
    assert (status, content_type) == (200, "application/json")
    served = json.loads(body)
    direct = srv.stats()
    assert shape(served) == EXPECTED_SHAPE
    assert served["address"] == direct["address"]
    assert flat(served) == flat(direct)
    assert served["clients"]["dropped"] == {"kicked": 1, "protocol_error": 1}
    assert served["clients"]["groups"] == {"red": 2}

    status, content_type, body = fetch(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = metric_samples(body.decode())
    direct = srv.stats()
    assert samples[("hisock_connections", ())] == 2
    assert samples[("hisock_clients", ())] == 2
    assert samples[("hisock_connections_accepted_total", ())] == 4
    assert samples[("hisock_group_clients", (("group", "red"),))] == 2
    assert samples[("hisock_clients_dropped_total", (("reason", "kicked"),))] == 1
    assert samples[("hisock_clients_dropped_total", (("reason", "protocol_error"),))] == 1
    assert samples[("hisock_frames_rejected_total", (("reason", "invalid_header"),))] == 1
    assert samples[("hisock_messages_sent_total", ())] == direct["messages"]["out"]
    assert samples[("hisock_bytes_received_total", ())] == direct["bytes"]["in"]

    status, content_type, body = fetch(base + "/")
    assert (status, content_type) == (200, "text/html; charset=utf-8")
    with pytest.raises(urllib.error.HTTPError) as missing:
        fetch(base + "/missing")
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(urllib.request.Request(base + "/stats", data=b"{}", method="POST"), timeout=5)
    assert posted.value.code == 405


@pytest.mark.parametrize("when", ["before start", "after start"])
def test_server_serve_stats_runs_on_the_servers_own_hub_and_stops_with_close(make_client, when):
    srv = ThreadedHiSockServer((LOOPBACK, 0))
    try:
        if when == "before start":
            host, port = srv.serve_stats()
            srv.start()
        else:
            srv.start()
            host, port = srv.serve_stats()
        base = f"http://{host}:{port}"
        make_client(srv, "seen", "red")
        clients_now(srv, 1)
        status, _, body = fetch(base + "/stats")
        assert status == 200
        served = json.loads(body)
        assert served["clients"]["groups"] == {"red": 1}
        assert served["connections"]["now"] == 1
    finally:
        srv.close()
    # close() stopped the pages too: the port refuses.
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()


def in_own_hub(body: Callable[[], Any]) -> Any:
    """Run ``body`` on a fresh thread (so a fresh hub) and return what it returned."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = body()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc
        finally:
            gevent.get_hub().destroy(destroy_loop=True)

    thread = threading.Thread(target=run, name="own-hub", daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the hub's work did not end"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_serve_stats_samples_into_a_bounded_history_until_it_stops():
    def body() -> Dict[str, Any]:
        calls: List[int] = []
        enough = gevent.event.Event()

        def source() -> Dict[str, Any]:
            calls.append(1)
            if len(calls) >= 12:
                enough.set()
            return dict(FAKE_STATS, messages={"in": 10 * len(calls), "out": 0})

        http = serve_stats(source, LOOPBACK, 0, history_points=4, history_interval=0.01)
        sampler = http.sampler
        assert enough.wait(10), "the sampler did not sample"
        kept = http.history.as_dict()
        http.stop(timeout=1)
        return {
            "kept": kept,
            "sampler_dead": sampler is not None and sampler.dead,
            "sampler_after": http.sampler,
            # Nothing of the pages or the sampler is left to keep this hub's loop going.
            "loop_finished": gevent.wait(timeout=2),
        }

    outcome = in_own_hub(body)
    kept = outcome["kept"]
    assert len(kept["samples"]) == 4 and kept["points"] == 4 and kept["interval_s"] == 0.01
    assert kept["latest"] >= 11
    assert [sample["seq"] for sample in kept["samples"]] == list(range(kept["latest"] - 3, kept["latest"] + 1))
    assert all(sample["messages_in_per_s"] > 0 for sample in kept["samples"])
    assert outcome["sampler_dead"] and outcome["sampler_after"] is None
    assert outcome["loop_finished"] is True


def test_the_sampler_alone_does_not_keep_a_hub_running():
    def body() -> Tuple[bool, bool]:
        http = serve_stats(lambda: FAKE_STATS, LOOPBACK, 0, history_interval=0.05)
        sampler = http.sampler
        assert sampler is not None
        # Close only the pages (pywsgi's own close), leaving the sampler asleep.
        WSGIServer.close(http)
        finished = gevent.wait(timeout=3)
        alive = not sampler.dead
        sampler.kill()
        return finished, alive

    finished, sampler_was_alive = in_own_hub(body)
    assert sampler_was_alive and finished is True


def test_a_failing_stats_is_logged_once_and_sampling_goes_on(caplog):
    def body() -> int:
        calls: List[int] = []
        recovered = gevent.event.Event()

        def flaky() -> Dict[str, Any]:
            calls.append(1)
            if len(calls) <= 5:
                raise RuntimeError("stats broke")
            if len(calls) >= 8:
                recovered.set()
            return FAKE_STATS

        http = serve_stats(flaky, LOOPBACK, 0, history_interval=0.01)
        try:
            assert recovered.wait(10), "sampling stopped after stats() failed"
            return len(http.history)
        finally:
            http.stop(timeout=1)

    with caplog.at_level(logging.ERROR, logger="hisock_gevent"):
        kept = in_own_hub(body)
    assert kept >= 1
    failures = [record for record in caplog.records if "stats() failed" in record.getMessage()]
    assert len(failures) == 1 and "stats broke" in caplog.text


@pytest.mark.slow
def test_server_serve_stats_keeps_a_history_of_the_traffic(make_client):
    srv = ThreadedHiSockServer((LOOPBACK, 0))
    try:
        srv.start()
        host, port = srv.serve_stats()
        base = f"http://{host}:{port}"
        talker = make_client(srv, "talker", "red")
        clients_now(srv, 1)

        def busy_samples() -> List[Dict[str, Any]]:
            talker.send("x", "hi")
            answer = json.loads(fetch(base + "/history")[2])
            return [s for s in answer["samples"] if s["messages_in_per_s"] > 0 and s["connections"] == 1]

        wait_until(busy_samples, timeout=10, interval=0.05)
        answer = json.loads(fetch(base + "/history")[2])
        assert (answer["points"], answer["interval_s"]) == (300, 1.0)
        page = initial_data(fetch(base + "/")[2])
        assert page["stats"]["clients"]["groups"] == {"red": 1}
        assert page["history"]["latest"] >= answer["latest"] >= 1
    finally:
        srv.close()


def test_app_metrics_page_has_the_backplane_counters_of_a_cluster_worker():
    cluster = {
        "worker": "host:1:abc", "redis": "down", "down_s": 12.5, "remote_clients": 5, "published": 7, "received": 9,
        "dropped": 2, "malformed": 1,
    }
    status, _, body = call_app("/metrics", stats=lambda: dict(FAKE_STATS, cluster=cluster))
    assert status == "200 OK"
    samples = metric_samples(body.decode())
    assert {name: value for (name, labels), value in samples.items() if name.startswith("hisock_backplane")} == {
        "hisock_backplane_up": 0,
        "hisock_backplane_down_seconds": 12.5,
        "hisock_backplane_remote_clients": 5,
        "hisock_backplane_published_total": 7,
        "hisock_backplane_received_total": 9,
        "hisock_backplane_dropped_total": 2,
        "hisock_backplane_malformed_total": 1,
    }


def test_app_metrics_page_counts_the_backplane_messages_acted_on_by_kind():
    cluster = {
        "worker": "w", "redis": "up", "remote_clients": 0, "published": 0, "received": 0, "dropped": 0, "malformed": 0,
        "received_by_kind": {"group": 3, "join": 2},
    }
    status, _, body = call_app("/metrics", stats=lambda: dict(FAKE_STATS, cluster=cluster))
    assert status == "200 OK"
    samples = metric_samples(body.decode())
    assert samples[("hisock_backplane_applied_total", (("kind", "group"),))] == 3
    assert samples[("hisock_backplane_applied_total", (("kind", "join"),))] == 2
