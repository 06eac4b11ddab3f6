"""HiSockClient and ThreadedHiSockClient, end to end against a hisock_gevent server over loopback.

The test thread is not monkey-patched: a HiSockClient is pumped by ``recv`` (and the other
calls that wait for the server), a ThreadedHiSockClient runs on its own thread after ``start()``.
"""

from __future__ import annotations

import inspect
import logging
import socket
import threading
import time
from typing import Any

import pytest
from conftest import LOOPBACK, wait_until

import hisock_gevent
from hisock_gevent import (
    ClientDisconnected,
    ClientInfo,
    ClientNotFound,
    ConnectionRejected,
    HiSockClient,
    HiSockServer,
    MessageCacheMember,
    ServerNotRunning,
    ThreadedHiSockClient,
)
from hisock_gevent.client import connect, threaded_connect

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------- helpers


def install_echo(server: HiSockServer) -> None:
    @server.on("echo")
    def echo(client: ClientInfo, content: Any) -> None:
        server.send_client(client, "echo", content)


def sync(client: HiSockClient, token: Any = "sync") -> None:
    """A round trip: the server has handled everything the client sent before."""
    client.send("echo", token)
    assert client.recv("echo", timeout=5) == token


def same_value(a: Any, b: Any) -> bool:
    """Equal, and of the same type all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and same_value(list(a.items()), list(b.items()))
    return a == b


def unused_port() -> int:
    """A loopback port nothing listens on (bound briefly, never listened on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


SENDABLES = [
    pytest.param(b"\x00\xffraw", id="bytes"),
    pytest.param("text ✓", id="str"),
    pytest.param(12345, id="int"),
    pytest.param(-2.75, id="float"),
    pytest.param(None, id="None"),
    pytest.param(True, id="True"),
    pytest.param(False, id="False"),
    pytest.param(ClientInfo(("192.168.0.9", 80), "x", "y"), id="ClientInfo"),
    pytest.param([1, "a", b"b", 2.5], id="list"),
    pytest.param((1, (2, "three")), id="tuple"),
    pytest.param({"k": "v", 3: [None]}, id="dict"),
    pytest.param({"nested": [{"a": (True, None)}, ClientInfo(("1.1.1.1", 1))], "b": b""}, id="nested"),
]


# ---------------------------------------------------------------- constructor, connect


def test_constructor_defaults_match_hisock():
    params = inspect.signature(HiSockClient).parameters
    assert list(params)[:5] == ["addr", "name", "group", "header_len", "cache_size"]
    assert params["name"].default is None
    assert params["group"].default is None
    assert params["header_len"].default == 16
    assert params["cache_size"].default == -1


def test_constructor_connects_with_name_group_and_stores_parameters(server, make_client, recorder):
    joins = recorder()
    server.on("join")(joins)
    client = make_client(server, "named", "grouped", header_len=16, cache_size=4)
    (info,) = joins.wait_for(1)
    assert info == ClientInfo(client.get_client_addr(), "named", "grouped")
    assert client.name == "named"
    assert client.group == "grouped"
    assert client.header_len == 16
    assert client.cache_size == 4
    assert client.addr == server.get_addr()


def test_constructor_without_name_and_group_joins_as_none(server, make_client, recorder):
    joins = recorder()
    server.on("join")(joins)
    client = make_client(server)
    assert joins.wait_for(1) == [ClientInfo(client.get_client_addr(), None, None)]


@pytest.mark.parametrize("addr", [[LOOPBACK, 1], "127.0.0.1:1", None], ids=["list", "str", "None"])
def test_constructor_raises_type_error_when_addr_is_not_a_tuple(addr):
    with pytest.raises(TypeError):
        HiSockClient(addr)


def test_header_len_other_than_16_works_when_the_server_matches(make_server, make_client):
    server = make_server(header_len=8)
    install_echo(server)
    server.start()
    client = make_client(server, header_len=8)
    sync(client, "x" * 1000)


def test_server_not_running_is_raised_promptly():
    started = time.monotonic()
    with pytest.raises(ServerNotRunning):
        HiSockClient((LOOPBACK, unused_port()))
    assert time.monotonic() - started < 2


def test_connection_rejected_when_the_server_is_full(make_server, make_client):
    server = make_server(max_connections=1)
    server.start()
    make_client(server, "only")
    started = time.monotonic()
    with pytest.raises(ConnectionRejected):
        make_client(server, "extra")
    assert time.monotonic() - started < 2


def test_connect_returns_a_connected_hisockclient(server, recorder):
    joins = recorder()
    server.on("join")(joins)
    client = connect(server.get_addr(), "via-connect", "grp")
    try:
        assert type(client) is HiSockClient
        assert joins.wait_for(1)[0] == ClientInfo(client.get_client_addr(), "via-connect", "grp")
    finally:
        client.close()
    assert hisock_gevent.connect is connect


def test_threaded_connect_returns_a_threadedhisockclient(server, recorder):
    joins = recorder()
    install_echo(server)
    server.on("join")(joins)
    client = threaded_connect(server.get_addr(), name="via-threaded", group="grp")
    try:
        assert isinstance(client, ThreadedHiSockClient)
        assert joins.wait_for(1)[0].name == "via-threaded"
        echoes = recorder()
        client.on("echo")(echoes)
        client.start()
        client.send("echo", "hi")
        assert echoes.wait_for(1) == ["hi"]
    finally:
        client.close()


# ---------------------------------------------------------------- on(): reserved events


def test_client_connect_fires_for_itself_and_for_later_clients(server, make_client, recorder):
    connects = recorder()
    first = make_client(server, "first")
    first.on("client_connect")(connects)
    second = make_client(server, "second", "g")
    server.send_client("first", "marker", "M")
    assert first.recv(timeout=5) == "M"
    assert connects.items == [
        ClientInfo(first.get_client_addr(), "first"),
        ClientInfo(second.get_client_addr(), "second", "g"),
    ]


def test_client_disconnect_fires_when_another_client_leaves(server, make_client, recorder):
    leaves, gone = recorder(), recorder()
    server.on("leave")(leaves)
    watcher = make_client(server, "watcher")
    watcher.on("client_disconnect")(gone)
    leaver = make_client(server, "leaver", "g")
    leaver_info = ClientInfo(leaver.get_client_addr(), "leaver", "g")
    leaver.close()
    leaves.wait_for(1)
    server.send_client("watcher", "marker", "M")
    assert watcher.recv(timeout=5) == "M"
    assert gone.items == [leaver_info]


def test_force_disconnect_fires_on_a_threaded_client_the_server_disconnects(server, make_client, recorder):
    forced = recorder()
    client = make_client(server, "victim", threaded=True)

    @client.on("force_disconnect")
    def on_forced():
        forced("forced")

    client.start()
    wait_until(lambda: server.get_all_clients())
    server.disconnect_client("victim")
    assert forced.wait_for(1) == ["forced"]
    wait_until(lambda: client.closed)


def test_force_disconnect_runs_when_recv_sees_the_disconnect(server, make_client, recorder):
    forced, byes = recorder(), recorder()

    @server.on("kick_me")
    def kick_me(client):
        # Messages and the $DISCONN$ right behind them: they reach the client together.
        for number in range(20):
            server.send_client(client, "bye", number)
        server.disconnect_client(client)

    victim = make_client(server, "victim")
    victim.on("force_disconnect")(forced)
    victim.on("bye")(byes)
    victim.send("kick_me")
    with pytest.raises(ClientDisconnected):
        victim.recv("never", timeout=5)
    assert byes.items == list(range(20))
    assert len(forced.items) == 1, "force_disconnect did not run although recv reported the disconnect"


def test_catch_all_gets_command_and_content_of_unhandled_commands(server, make_client, recorder):
    caught, known = recorder(), recorder()
    client = make_client(server, "c")

    @client.on("*")
    def catch_all(command, content):
        caught(command, content)

    client.on("known")(known)
    wait_until(lambda: server.get_all_clients())
    server.send_client("c", "known", 1)
    server.send_client("c", "unknown", [2])
    server.send_client("c", "marker", "M")
    assert client.recv("marker", timeout=5) == "M"
    assert known.items == [1]
    assert caught.items == [("unknown", [2])]


def test_unreserved_handlers_with_zero_and_one_param(server, make_client, recorder):
    calls = recorder()
    client = make_client(server, "c")

    @client.on("zero")
    def zero():
        calls("zero")

    @client.on("one")
    def one(content):
        calls(("one", content))

    wait_until(lambda: server.get_all_clients())
    server.send_client("c", "zero", "ignored")
    server.send_client("c", "one", {"x": 1})
    server.send_client("c", "marker", "M")
    assert client.recv("marker", timeout=5) == "M"
    assert calls.items == ["zero", ("one", {"x": 1})]


@pytest.mark.parametrize(
    "command, func",
    [
        ("client_connect", lambda: None),
        ("client_connect", lambda a, b: None),
        ("client_disconnect", lambda: None),
        ("force_disconnect", lambda a: None),
        ("*", lambda a: None),
        ("*", lambda a, b, c: None),
        ("custom", lambda a, b: None),
    ],
    ids=["connect-0", "connect-2", "disconnect-0", "force-1", "star-1", "star-3", "custom-2"],
)
def test_on_raises_type_error_for_a_wrong_number_of_params(server, make_client, command, func):
    client = make_client(server)
    with pytest.raises(TypeError):
        client.on(command)(func)
    assert command not in client.funcs


@pytest.mark.parametrize("command", ["$custom$", "$DISCONN$", "x$y$z"])
def test_on_raises_value_error_for_reserved_dollar_commands(server, make_client, command):
    client = make_client(server)
    with pytest.raises(ValueError):
        client.on(command)(lambda content: None)


def test_on_registers_into_funcs_and_returns_the_function(server, make_client):
    client = make_client(server)

    def handler(content):
        pass

    assert client.on("thing")(handler) is handler
    assert client.funcs["thing"]["func"] is handler


def test_override_turns_a_reserved_name_into_a_command(server, make_client, recorder):
    calls = recorder()
    client = make_client(server, "c")
    client.on("client_connect", override=True)(calls)
    server.send_client("c", "client_connect", "as a command")
    server.send_client("c", "marker", "M")
    assert client.recv("marker", timeout=5) == "M"
    assert calls.items == ["as a command"]


# ---------------------------------------------------------------- send


@pytest.mark.parametrize("value", SENDABLES)
def test_send_round_trips_every_sendable_to_the_server(server, make_client, recorder, value):
    received = recorder()
    server.on("value")(lambda client, content: received(content))
    client = make_client(server)
    client.send("value", value)
    (got,) = received.wait_for(1)
    assert same_value(got, value), f"sent {value!r}, server got {got!r}"


def test_send_without_content_sends_none(server, make_client, recorder):
    received = recorder()
    server.on("bare")(lambda client, content: received(content))
    client = make_client(server)
    client.send("bare")
    assert received.wait_for(1) == [None]


def test_send_refuses_reserved_commands(server, make_client):
    client = make_client(server)
    with pytest.raises(ValueError):
        client.send("$USRCLOSE$")


def test_send_after_recv_reaches_the_server_without_further_calls(server, make_client, recorder):
    """send() hands the frame over before returning, also once recv() has bound the client."""
    received = recorder()
    install_echo(server)
    server.on("later")(lambda client, content: received(content))
    client = make_client(server)
    sync(client)
    client.send("later", "sent after recv")
    assert received.wait_for(1, timeout=3) == ["sent after recv"]


def test_send_on_a_closed_client_raises_client_disconnected(server, make_client):
    client = make_client(server)
    client.close()
    with pytest.raises(ClientDisconnected):
        client.send("anything", 1)


# ---------------------------------------------------------------- recv


def test_recv_any_returns_the_next_content_instead_of_calling_its_handler(server, make_client, recorder):
    handled = recorder()
    client = make_client(server, "c")
    client.on("cmd")(handled)
    wait_until(lambda: server.get_all_clients())
    server.send_client("c", "cmd", "the content")
    assert client.recv(timeout=5) == "the content"
    server.send_client("c", "marker", "M")
    assert client.recv("marker", timeout=5) == "M"
    assert handled.items == []


def test_recv_on_a_command_returns_it_while_other_commands_go_to_their_handlers(server, make_client, recorder):
    others, targets = recorder(), recorder()
    client = make_client(server, "c")
    client.on("other")(others)
    client.on("target")(targets)
    wait_until(lambda: server.get_all_clients())
    server.send_client("c", "other", 1)
    server.send_client("c", "target", 2)
    server.send_client("c", "other", 3)
    assert client.recv("target", timeout=5) == 2
    assert others.items == [1]
    assert targets.items == []
    server.send_client("c", "marker", "M")
    assert client.recv("marker", timeout=5) == "M"
    assert others.items == [1, 3]


def test_recv_as_converts_the_content(server, make_client):
    client = make_client(server, "c")
    wait_until(lambda: server.get_all_clients())
    server.send_client("c", "raw", b"12")
    assert client.recv("raw", recv_as=str, timeout=5) == "12"
    server.send_client("c", "raw", "34")
    assert client.recv("raw", recv_as=int, timeout=5) == 34


def test_recv_times_out_promptly(server, make_client):
    client = make_client(server)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.recv("never", timeout=0.2)
    assert time.monotonic() - started < 1.5


def test_recv_on_a_threaded_client_times_out_with_timeout_error(server, make_client):
    client = make_client(server, threaded=True)
    client.start()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.recv("never", timeout=0.2)
    assert time.monotonic() - started < 1.5


def test_recv_on_a_threaded_client_returns_the_matching_content(server, make_client):
    install_echo(server)
    client = make_client(server, threaded=True)
    client.start()
    result = []
    receiver = threading.Thread(target=lambda: result.append(client.recv("echo", timeout=10)), daemon=True)
    receiver.start()

    def caught():
        # Echoes that arrive before recv waits go to (no) handler; keep asking until one is caught.
        client.send("echo", "e")
        return result

    assert wait_until(caught, interval=0.05) == ["e"]
    receiver.join(5)


def test_recv_raises_client_disconnected_when_the_server_closes(server, make_client):
    client = make_client(server)
    wait_until(lambda: server.get_all_clients())
    server.close()
    with pytest.raises(ClientDisconnected):
        client.recv(timeout=5)


def test_recv_on_a_closed_client_raises_client_disconnected(server, make_client):
    client = make_client(server)
    client.close()
    with pytest.raises(ClientDisconnected):
        client.recv(timeout=1)


# ---------------------------------------------------------------- names and groups


def test_change_name_is_seen_by_the_server(server, make_client, recorder):
    changes = recorder()
    server.on("name_change")(changes)
    client = make_client(server, "old")
    client.change_name("new")
    (info, old, new), = changes.wait_for(1)
    assert (old, new) == ("old", "new")
    assert info.ip == client.get_client_addr()
    assert server.get_all_clients(key="name") == ["new"]
    assert client.name == "new"


def test_change_name_none_goes_back_to_the_connect_name(server, make_client, recorder):
    changes = recorder()
    server.on("name_change")(changes)
    client = make_client(server, "start")
    client.change_name("middle")
    client.change_name(None)
    changes.wait_for(2)
    assert changes.items[1][1:] == ("middle", "start")
    assert server.get_all_clients(key="name") == ["start"]


def test_change_group_is_seen_by_the_server_and_none_goes_back(server, make_client, recorder):
    changes = recorder()
    server.on("group_change")(changes)
    client = make_client(server, "c", "first")
    client.change_group("second")
    changes.wait_for(1)
    assert server.get_group("second") == [ClientInfo(client.get_client_addr(), "c", "second")]
    client.change_group(None)
    changes.wait_for(2)
    assert [item[1:] for item in changes.items] == [("first", "second"), ("second", "first")]
    assert server.get_all_clients(key="group") == ["first"]


def test_changed_name_is_used_by_send_client(server, make_client):
    install_echo(server)
    client = make_client(server, "before")
    client.change_name("after")
    sync(client)
    server.send_client("after", "hello", "by new name")
    assert client.recv("hello", timeout=5) == "by new name"


# ---------------------------------------------------------------- lookups


@pytest.mark.parametrize("form", ["name", "tuple", "str", "ClientInfo"])
def test_get_client_by_each_reference_form(server, make_client, form):
    asker = make_client(server, "asker")
    other = make_client(server, "other", "grp")
    wait_until(lambda: len(server.get_all_clients()) == 2)
    expected = ClientInfo(other.get_client_addr(), "other", "grp")
    ip, port = other.get_client_addr()
    reference = {"name": "other", "tuple": (ip, port), "str": f"{ip}:{port}", "ClientInfo": expected}[form]
    found = asker.get_client(reference)
    assert isinstance(found, ClientInfo)
    assert found == expected
    assert found.ip == (ip, port)


def test_get_client_finds_itself(server, make_client):
    client = make_client(server, "me")
    assert client.get_client("me") == ClientInfo(client.get_client_addr(), "me")


@pytest.mark.parametrize("missing", ["ghost", ("127.0.0.1", 1), ClientInfo(("127.0.0.1", 1), "ghost")], ids=repr)
def test_get_client_raises_client_not_found(server, make_client, missing):
    client = make_client(server, "me")
    with pytest.raises(ClientNotFound):
        client.get_client(missing)


def test_get_client_on_a_threaded_client(server, make_client):
    client = make_client(server, "threaded", threaded=True)
    client.start()
    make_client(server, "other")
    wait_until(lambda: len(server.get_all_clients()) == 2)
    assert client.get_client("other").name == "other"


def test_get_server_addr_is_the_servers_address(server, make_client):
    client = make_client(server)
    assert client.get_server_addr() == server.get_addr()


def test_get_client_addr_matches_what_the_server_sees(server, make_client, recorder):
    joins = recorder()
    server.on("join")(joins)
    client = make_client(server)
    (info,) = joins.wait_for(1)
    assert client.get_client_addr() == info.ip
    assert client.get_client_addr()[0] == LOOPBACK


# ---------------------------------------------------------------- cache


def test_get_cache_keeps_the_last_n_messages(server, make_client):
    client = make_client(server, "c", cache_size=3)
    client.on("handled")(lambda content: None)
    wait_until(lambda: server.get_all_clients())
    server.send_client("c", "first", 0)
    server.send_client("c", "handled", 1)
    server.send_client("c", "unhandled", [2])
    server.send_client("c", "last", "three")
    assert client.recv("last", timeout=5) == "three"

    cache = client.get_cache()
    assert len(cache) == 3
    assert all(isinstance(member, MessageCacheMember) for member in cache)
    assert [member.command for member in cache] == ["handled", "unhandled", "last"]
    assert [member.content for member in cache] == [1, [2], "three"]
    assert [member.called for member in cache[:2]] == [True, False]
    assert all(isinstance(member.header, int) and member.header > 0 for member in cache)
    assert client.get_cache(0).command == "handled"
    assert client.get_cache(-1).content == "three"


def test_get_cache_is_empty_with_cache_size_minus_one(server, make_client):
    client = make_client(server, "c")
    wait_until(lambda: server.get_all_clients())
    server.send_client("c", "x", 1)
    assert client.recv("x", timeout=5) == 1
    assert client.get_cache() == []


def test_get_cache_is_unlimited_with_cache_size_zero(server, make_client):
    client = make_client(server, "c", cache_size=0)
    wait_until(lambda: server.get_all_clients())
    for number in range(20):
        server.send_client("c", "n", number)
    server.send_client("c", "end", None)
    client.recv("end", timeout=5)
    assert [member.content for member in client.get_cache()] == list(range(20)) + [None]


# ---------------------------------------------------------------- close


@pytest.mark.parametrize("bound", [False, True], ids=["fresh", "after-recv"])
def test_close_with_emit_leave_runs_the_servers_leave_promptly(server, make_client, recorder, bound):
    leaves = recorder()
    server.on("leave")(leaves)
    install_echo(server)
    client = make_client(server, "leaver")
    if bound:
        sync(client)
    addr = client.get_client_addr()
    started = time.monotonic()
    client.close()
    assert leaves.wait_for(1, timeout=2) == [ClientInfo(addr, "leaver")]
    assert time.monotonic() - started < 1
    assert client.closed


@pytest.mark.parametrize("bound", [False, True], ids=["fresh", "after-recv"])
def test_close_without_emit_leave_still_runs_leave_on_eof(server, make_client, recorder, bound):
    leaves = recorder()
    server.on("leave")(leaves)
    install_echo(server)
    client = make_client(server, "quiet")
    if bound:
        sync(client)
    addr = client.get_client_addr()
    client.close(emit_leave=False)
    assert leaves.wait_for(1, timeout=5) == [ClientInfo(addr, "quiet")]
    wait_until(lambda: server.get_all_clients() == [])


def test_close_twice_is_harmless(server, make_client):
    client = make_client(server)
    client.close()
    client.close()
    assert client.closed


def test_close_of_a_threaded_client_stops_its_loop(server, make_client, recorder):
    leaves = recorder()
    server.on("leave")(leaves)
    client = make_client(server, "bg", threaded=True)
    client.start()
    client.close()
    client.join(timeout=5)
    assert client.closed
    assert leaves.wait_for(1)[0].name == "bg"


def test_recv_on_a_threaded_client_from_another_thread_raises_once_closed(server, make_client):
    """recv on a ThreadedHiSockClient, called from another thread, raises once the client closes."""
    client = make_client(server, threaded=True)
    client.start()
    outcome = []

    def wait_forever():
        try:
            client.recv("never", timeout=10)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_forever, daemon=True)
    waiter.start()
    client.close()
    waiter.join(5)
    assert not waiter.is_alive(), "recv kept waiting after close"
    assert len(outcome) == 1 and isinstance(outcome[0], ClientDisconnected)


# ---------------------------------------------------------------- start(callback, error_handler)


def test_threaded_client_start_calls_callback_after_each_handled_message(server, make_client, recorder):
    events = recorder()
    client = make_client(server, "t", threaded=True)
    client.on("work")(lambda content: events(("handled", content)))
    client.start(callback=lambda: events("callback"))
    wait_until(lambda: server.get_all_clients())
    for number in range(3):
        server.send_client("t", "work", number)

    def handled_and_called_back():
        items = list(events.items)
        positions = [i for i, item in enumerate(items) if isinstance(item, tuple)]
        return len(positions) == 3 and positions[-1] + 1 < len(items) and items

    items = wait_until(handled_and_called_back)
    for index, item in enumerate(items):
        if isinstance(item, tuple):
            assert items[index + 1] == "callback", f"no callback right after {item}: {items}"
    assert [item for item in items if isinstance(item, tuple)] == [("handled", 0), ("handled", 1), ("handled", 2)]


def test_threaded_client_start_error_handler_gets_the_exception_and_keeps_running(server, make_client, recorder):
    errors, later = recorder(), recorder()
    client = make_client(server, "t", threaded=True)
    boom = ZeroDivisionError("handler failed")

    @client.on("explode")
    def explode(content):
        raise boom

    client.on("later")(later)
    client.start(error_handler=errors)
    wait_until(lambda: server.get_all_clients())
    server.send_client("t", "explode", None)
    server.send_client("t", "later", "still running")
    assert errors.wait_for(1) == [boom]
    assert later.wait_for(1) == ["still running"]
    assert not client.closed


def test_threaded_client_without_error_handler_logs_and_keeps_running(server, make_client, recorder, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    later = recorder()
    client = make_client(server, "t", threaded=True)

    @client.on("explode")
    def explode(content):
        raise LookupError("logged")

    client.on("later")(later)
    client.start()
    wait_until(lambda: server.get_all_clients())
    server.send_client("t", "explode", None)
    server.send_client("t", "later", "ok")
    assert later.wait_for(1) == ["ok"]
    records = wait_until(
        lambda: [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], LookupError)]
    )
    assert records[0].name == "hisock_gevent"
    assert records[0].levelno >= logging.ERROR


def test_plain_client_start_runs_handlers_until_disconnected(server, make_client, recorder):
    """HiSockClient.start() blocks, dispatching, and returns when the server disconnects it."""
    got = recorder()
    client = make_client(server, "p")

    @client.on("msg")
    def on_msg(content):
        got(content)
        if content == "last":
            server.disconnect_client("p")

    wait_until(lambda: server.get_all_clients())
    server.send_client("p", "msg", "first")
    server.send_client("p", "msg", "last")
    client.start()  # returns once the server has disconnected us
    assert got.items == ["first", "last"]
    assert client.closed
