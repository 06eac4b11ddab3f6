"""Request/response (issue 14 part 1): ``call()`` both ways, over real loopback sockets."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any, List

import pytest
from conftest import LOOPBACK, wait_until
from rawpeer import RawPeer, wire_frame

import hisock_gevent
from hisock_gevent import CallError, CallNotSupported, CallTimeout, ClientDisconnected, ClientInfo
from hisock_gevent.messages import Call, Command, parse_server_body

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def calls_server(make_server):
    srv = make_server()

    @srv.on("add")
    def add(client: ClientInfo, content: List[int]) -> int:
        return content[0] + content[1]

    @srv.on("boom")
    def boom(client: ClientInfo, content: Any) -> None:
        raise ValueError("nope")

    @srv.on("nap", threaded=True)
    def nap(client: ClientInfo, content: float) -> float:
        time.sleep(content)
        return content

    @srv.on("back")
    def back(client: ClientInfo, content: Any) -> Any:
        # An ordinary, inline handler calling back the very client whose message it handles.
        return srv.call(client, "twice", content)

    @srv.on("back_then_send")
    def back_then_send(client: ClientInfo, content: Any) -> None:
        srv.send_client(client, "result", srv.call(client, "twice", content))

    srv.start()
    return srv


@pytest.fixture
def caller(calls_server, make_client):
    client = make_client(calls_server, "caller", threaded=True)

    @client.on("twice")
    def twice(content: Any) -> Any:
        return content * 2

    @client.on("fail")
    def fail(content: Any) -> None:
        raise KeyError("k")

    client.start()
    return client


def test_a_call_returns_what_the_servers_handler_returns(caller):
    assert caller.call("add", [2, 3]) == 5


def test_a_handler_that_raises_makes_the_call_raise_with_its_type_and_message(caller):
    with pytest.raises(CallError) as raised:
        caller.call("boom")
    assert (raised.value.remote_type, raised.value.remote_message) == ("ValueError", "nope")
    with pytest.raises(CallError) as missing:
        caller.call("no-such-handler")
    assert missing.value.remote_type == "FunctionNotFoundException"


def test_a_call_that_is_not_answered_in_time_raises_a_timeout_error(caller):
    began = time.monotonic()
    with pytest.raises(CallTimeout) as raised:
        caller.call("nap", 2.0, timeout=0.3)
    assert isinstance(raised.value, TimeoutError)
    assert time.monotonic() - began < 1.5
    assert caller.call("add", [1, 1]) == 2  # the late answer does not confuse the next call


def test_many_calls_in_flight_from_many_threads_are_matched_by_id(caller):
    results: List[Any] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        value = caller.call("nap", 0.05 * (n % 5))  # answers come back out of order
        with lock:
            results.append(value)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == sorted(0.05 * (n % 5) for n in range(20))
    assert time.monotonic() - began < 2.0  # in flight together, not one after another


def test_a_server_handler_may_call_back_the_client_whose_message_it_handles(caller):
    assert caller.call("back", 21) == 42
    caller.send("back_then_send", "ab")
    assert caller.recv("result", timeout=5) == "abab"


def test_the_server_calls_a_client_and_gets_its_answer_or_its_error(calls_server, caller):
    assert calls_server.call("caller", "twice", [1]) == [1, 1]
    with pytest.raises(CallError) as raised:
        calls_server.call("caller", "fail")
    assert raised.value.remote_type == "KeyError"


def test_recv_keeps_working_beside_calls(calls_server, caller):
    calls_server.send_client("caller", "news", 1)
    assert caller.call("add", [3, 4]) == 7
    assert caller.recv("news", timeout=5) == 1


def test_a_call_pending_when_the_connection_ends_fails_at_once(calls_server, caller):
    outcome: List[Any] = []

    def call() -> None:
        try:
            caller.call("nap", 5.0, timeout=30)
        except BaseException as exc:  # recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: len(caller._link.calls))
    began = time.monotonic()
    calls_server.disconnect_client("caller")
    thread.join(10)
    assert outcome and isinstance(outcome[0], ClientDisconnected)
    assert time.monotonic() - began < 2.0
    assert len(caller._link.calls) == 0  # nothing left behind


def test_nothing_is_left_behind_after_many_timed_out_calls(calls_server, caller):
    for _ in range(50):
        with pytest.raises(CallTimeout):
            caller.call("nap", 0.2, timeout=0.01)
    assert len(caller._link.calls) == 0
    peer = calls_server._registry.find("caller")
    assert not peer.calls or set(peer.calls) == {0}
    gc.collect()


def test_a_client_leaving_fails_the_servers_pending_call_at_once(calls_server, make_client):
    client = make_client(calls_server, "sleeper", threaded=True)
    started = threading.Event()

    @client.on("hang", threaded=True)  # on a worker thread: the client's hub stays free
    def hang(content: Any) -> None:
        started.set()
        time.sleep(3)

    client.start()
    outcome: List[Any] = []

    def call() -> None:
        try:
            calls_server.call("sleeper", "hang", timeout=30)
        except BaseException as exc:  # recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert started.wait(5)
    began = time.monotonic()
    client.close()
    thread.join(10)
    assert outcome and isinstance(outcome[0], ClientDisconnected)
    assert time.monotonic() - began < 2.0


def test_calling_a_plain_hisock_peer_raises_at_once(calls_server, make_client):
    plain = RawPeer(calls_server.get_addr())
    try:
        plain.hello("plain")
        began = time.monotonic()
        with pytest.raises(CallNotSupported):
            calls_server.call("plain", "anything")
        assert time.monotonic() - began < 0.5
    finally:
        plain.close()
    oldstyle = make_client(calls_server, "oldstyle", use_msgpack=False)
    with pytest.raises(CallNotSupported):
        oldstyle.call("add", [1, 2])


def test_a_plain_hisock_server_is_not_called(make_client):
    """Our client against a server that answers the hello without capabilities."""
    import socket

    listener = socket.create_server((LOOPBACK, 0))

    def plain_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(wire_frame(b'$CLTCONN${"ip": ["127.0.0.1", 1], "name": "c", "group": null}'))
            conn.recv(65536)

    threading.Thread(target=plain_server, daemon=True).start()
    client = hisock_gevent.HiSockClient(listener.getsockname(), "c")
    try:
        with pytest.raises(CallNotSupported):
            client.call("x")
    finally:
        client.close()
        listener.close()


def test_the_call_wire_form_is_as_the_protocol_says(calls_server):
    """A hand-built $CALL$ from a raw peer that offered the extension gets a $REPLY$."""
    peer = RawPeer(calls_server.get_addr())
    try:
        answer = peer.hello("raw", caps=["msgpack", "call"])
        assert b'"caps":["msgpack","call"]' in answer
        peer.send_frame(Call(7, Command("add", b"l1i1i", b"23")).to_body())
        reply = parse_server_body(peer.read_frame())
        assert reply.call_id == 7 and reply.fmt == b"1i" and reply.payload == b"5"
    finally:
        peer.close()


# ------------------------------------------------------------------ PendingCalls, without sockets


def test_pending_calls_give_fresh_ids_settle_once_and_fail_all_at_the_end():
    from hisock_gevent.calls import PendingCalls

    pending = PendingCalls()
    (first, first_result), (second, second_result) = pending.open(), pending.open()
    assert (first, second) == (1, 2) and len(pending) == 2
    taken = pending.take(first)
    assert taken is first_result
    assert pending.take(first) is None  # a late or repeated answer finds nobody
    assert pending.take(99) is None  # nor does one we never asked
    pending.fail_all(ConnectionError("gone"))
    assert len(pending) == 0
    with pytest.raises(ConnectionError):
        second_result.get(timeout=0)
    assert pending.open()[0] == 3  # ids are never reused
