"""HiSockServer as documented in HiSock 3.0's ``hisock.server`` page, end to end over loopback.

Every class, method, parameter, variable, exception and reserved event of that page has
at least one test here.  Servers are ThreadedHiSockServer (own OS thread); clients are
HiSockClient pumped from the test thread by ``recv``, or ThreadedHiSockClient.
"""

from __future__ import annotations

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
    GroupNotFound,
    HiSockClient,
    HiSockServer,
    MessageCacheMember,
    ServerNotRunning,
    ThreadedHiSockClient,
    ThreadedHiSockServer,
)
from hisock_gevent.server import start_server, start_threaded_server

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------- helpers


def install_echo(server: HiSockServer) -> None:
    """``echo`` answers the sender with the same content: a round trip proves the server
    has handled everything that client sent before it."""

    @server.on("echo")
    def echo(client: ClientInfo, content: Any) -> None:
        server.send_client(client, "echo", content)


def sync(client: HiSockClient, token: Any = "sync") -> None:
    client.send("echo", token)
    assert client.recv("echo", timeout=5) == token


def info_of(server: HiSockServer, client: HiSockClient) -> ClientInfo:
    return server.get_client(client.get_client_addr())


def assert_maps_in_step(server: HiSockServer) -> None:
    clients = dict(server.clients)
    clients_rev = dict(server.clients_rev)
    assert len(clients) == len(clients_rev)
    for sock, info in clients.items():
        assert clients_rev[info] is sock
    assert set(clients.values()) == set(server.get_all_clients())


def same_value(a: Any, b: Any) -> bool:
    """Equal, and of the same type all the way down (True is not 1, a tuple is not a list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and same_value(list(a.items()), list(b.items()))
    return a == b


SENDABLES = [
    pytest.param(b"\x00\xffraw bytes", id="bytes"),
    pytest.param(b"", id="empty-bytes"),
    pytest.param("plain str", id="str"),
    pytest.param("ünïcödé ✓", id="unicode-str"),
    pytest.param("", id="empty-str"),
    pytest.param(42, id="int"),
    pytest.param(-7, id="negative-int"),
    pytest.param(0, id="zero"),
    pytest.param(3.141592653589793, id="float"),
    pytest.param(-0.5, id="negative-float"),
    pytest.param(None, id="None"),
    pytest.param(True, id="True"),
    pytest.param(False, id="False"),
    pytest.param(ClientInfo(("10.1.2.3", 4567), "someone", "somewhere"), id="ClientInfo"),
    pytest.param(ClientInfo(("10.1.2.3", 4567)), id="ClientInfo-no-name"),
    pytest.param([1, "two", b"three", 4.5], id="list"),
    pytest.param([], id="empty-list"),
    pytest.param((1, "two", None), id="tuple"),
    pytest.param((), id="empty-tuple"),
    pytest.param({"a": 1, "b": "two"}, id="dict"),
    pytest.param({}, id="empty-dict"),
    pytest.param({2: "int key", None: [None], 1.5: b"float key", b"k": False}, id="dict-odd-keys"),
    pytest.param("$CMD$ not a command $MSG$", id="str-with-protocol-markers"),
    pytest.param(b"$CMD$x$MSG$00000000", id="bytes-with-protocol-markers"),
    pytest.param(2**100, id="big-int"),
    pytest.param([2**100, -(2**70)], id="big-ints-in-list"),
    pytest.param(float("inf"), id="infinity"),
    pytest.param({(1, 2): "tuple key", ClientInfo(("1.2.3.4", 5)): "ClientInfo key"}, id="hashable-keys"),
    pytest.param([[], {}, ()], id="nested-empties"),
    pytest.param(
        {
            "users": [ClientInfo(("10.0.0.1", 1), "n", "g"), (1, [2, (3, None)])],
            "flags": {"on": True, "off": False},
            "blob": b"\x00\x01",
            "deep": [[[{"x": (1.25,)}]]],
        },
        id="nested",
    ),
]


# ---------------------------------------------------------------- constructor


@pytest.mark.parametrize("addr", [[LOOPBACK, 0], f"{LOOPBACK}:0", None], ids=["list", "str", "None"])
def test_constructor_raises_type_error_when_addr_is_not_a_tuple(addr):
    with pytest.raises(TypeError):
        HiSockServer(addr)


def test_addr_and_get_addr_give_the_real_bound_address(make_server):
    server = make_server()
    assert server.addr == server.get_addr()
    ip, port = server.get_addr()
    assert ip == LOOPBACK
    assert isinstance(port, int) and port > 0
    # Something really listens there.
    with socket.create_connection((ip, port), timeout=2):
        pass


def test_get_addr_matches_what_a_client_connects_to(make_server, make_client):
    server = make_server()
    server.start()
    client = make_client(server)
    assert client.get_server_addr() == server.get_addr()


def test_header_len_is_stored_and_a_server_and_client_with_header_len_32_talk(make_server, make_client):
    server = make_server(header_len=32)
    assert server.header_len == 32
    install_echo(server)
    server.start()
    client = make_client(server, "wide", header_len=32)
    sync(client, {"long": "x" * 5000})
    assert server.get_all_clients(key="name") == ["wide"]


def test_client_with_a_different_header_len_is_refused_not_hung(make_server, make_client):
    server = make_server(header_len=32)
    server.start()
    started = time.monotonic()
    with pytest.raises(ConnectionRejected):
        make_client(server, header_len=16)
    assert time.monotonic() - started < 5
    assert server.get_all_clients() == []


def test_max_connections_rejects_the_extra_client_promptly_without_join(make_server, make_client, recorder):
    joins = recorder()
    server = make_server(max_connections=2)
    server.on("join")(joins)
    install_echo(server)
    server.start()
    first = make_client(server, "first")
    make_client(server, "second")
    joins.wait_for(2)

    started = time.monotonic()
    with pytest.raises(ConnectionRejected):
        make_client(server, "third")
    assert time.monotonic() - started < 2

    sync(first)
    assert [info.name for info in joins.items] == ["first", "second"]
    assert sorted(server.get_all_clients(key="name")) == ["first", "second"]


def test_max_connections_frees_a_slot_when_a_client_leaves(make_server, make_client, recorder):
    joins, leaves = recorder(), recorder()
    server = make_server(max_connections=2)
    server.on("join")(joins)
    server.on("leave")(leaves)
    install_echo(server)
    server.start()
    first = make_client(server, "first")
    make_client(server, "second")
    joins.wait_for(2)

    first.close()
    assert leaves.wait_for(1)[0].name == "first"

    latecomer = make_client(server, "latecomer")
    sync(latecomer)
    assert [info.name for info in joins.wait_for(3)] == ["first", "second", "latecomer"]


def test_cache_size_minus_one_keeps_no_cache(make_server, make_client):
    server = make_server(cache_size=-1)
    install_echo(server)
    server.start()
    client = make_client(server)
    client.send("anything", 1)
    sync(client)
    sync(client, "once more")
    assert server.cache == []


def test_cache_size_zero_keeps_every_message(make_server, make_client):
    server = make_server(cache_size=0)
    install_echo(server)
    server.start()
    client = make_client(server)
    for number in range(25):
        client.send("number", number)
    sync(client)
    # The echo's own cache entry may land just after its reply went out.
    wait_until(lambda: len(server.cache) == 26)
    assert [member.content for member in server.cache] == list(range(25)) + ["sync"]


def test_cache_size_n_keeps_the_last_n_messages_with_their_fields(make_server, make_client):
    server = make_server(cache_size=3)
    install_echo(server)

    @server.on("handled")
    def handled(client, content):
        pass

    server.start()
    client = make_client(server)
    client.send("handled", "one")
    client.send("handled", "two")
    client.send("nobody_listens", [3])
    sync(client, "four")

    wait_until(lambda: server.cache and server.cache[-1].command == "echo")
    cache = list(server.cache)
    assert len(cache) == 3
    assert all(isinstance(member, MessageCacheMember) for member in cache)
    assert [member.command for member in cache] == ["handled", "nobody_listens", "echo"]
    assert [member.content for member in cache] == ["two", [3], "four"]
    assert [member.called for member in cache] == [True, False, True]
    assert all(isinstance(member.header, int) and member.header > 0 for member in cache)


@pytest.mark.slow
def test_keepalive_keeps_an_answering_client_and_drops_silent_ones(make_server, make_client, recorder):
    leaves = recorder()
    server = make_server(keepalive=True, keepalive_interval=0.2, keepalive_timeout=0.4)
    server.on("leave")(leaves)
    server.start()

    alive = make_client(server, "alive", threaded=True)
    alive.start()
    # A HiSockClient nobody pumps never answers $KEEPALIVE$.
    make_client(server, "silent-1")
    assert leaves.wait_for(1)[0].name == "silent-1"
    make_client(server, "silent-2")
    assert [info.name for info in leaves.wait_for(2)] == ["silent-1", "silent-2"]

    # Several keepalive rounds have passed: the answering client is still there.
    assert server.get_all_clients(key="name") == ["alive"]
    assert not alive.closed


def test_keepalive_drop_tells_the_silent_client_it_was_disconnected(make_server, make_client, recorder):
    leaves = recorder()
    server = make_server(keepalive=True, keepalive_interval=0.1, keepalive_timeout=0.2)
    server.on("leave")(leaves)
    server.start()
    silent = make_client(server, "silent")
    forced = recorder()
    silent.on("force_disconnect")(forced)
    leaves.wait_for(1)
    with pytest.raises(ClientDisconnected):
        silent.recv(timeout=5)
    forced.wait_for(1)


def test_keepalive_is_sent_as_a_framed_message(make_server, raw):
    server = make_server(keepalive=True, keepalive_interval=0.1, keepalive_timeout=5)
    server.start()
    peer = raw(server, "raw")
    bodies = [peer.read_frame(), peer.read_frame()]
    assert bodies[0].startswith(b"$CLTCONN$")
    assert bodies[1] == b"$KEEPALIVE$"


def test_keepalive_off_sends_no_keepalive(make_server, raw):
    server = make_server(keepalive=False)
    install_echo(server)
    server.start()
    peer = raw(server, "raw")
    assert peer.read_frame().startswith(b"$CLTCONN$")
    with pytest.raises(socket.timeout):
        peer.read_frame(timeout=0.3)


# ---------------------------------------------------------------- variables


def test_clients_and_clients_rev_stay_in_step_through_joins_changes_and_leaves(make_server, make_client, recorder):
    joins, leaves, names, groups = recorder(), recorder(), recorder(), recorder()
    server = make_server()
    server.on("join")(joins)
    server.on("leave")(leaves)
    server.on("name_change")(names)
    server.on("group_change")(groups)
    server.start()

    a = make_client(server, "a", "red")
    b = make_client(server, "b", "red")
    make_client(server, "c")
    joins.wait_for(3)
    assert len(server.clients) == 3
    assert_maps_in_step(server)
    assert set(server.clients.values()) == set(joins.items)

    a.change_name("a2")
    names.wait_for(1)
    assert_maps_in_step(server)
    assert "a2" in [info.name for info in server.clients.values()]
    assert "a" not in [info.name for info in server.clients_rev]

    a.change_group("blue")
    groups.wait_for(1)
    assert_maps_in_step(server)
    assert ClientInfo(a.get_client_addr(), "a2", "blue") in server.clients_rev

    b.close()
    leaves.wait_for(1)
    assert len(server.clients) == 2
    assert_maps_in_step(server)
    assert "b" not in [info.name for info in server.clients.values()]


def test_clients_keys_are_the_client_sockets(make_server, make_client, recorder):
    joins = recorder()
    server = make_server()
    server.on("join")(joins)
    server.start()
    client = make_client(server, "sock")
    joins.wait_for(1)
    (sock,) = server.clients
    assert sock.getpeername()[:2] == client.get_client_addr()


def test_funcs_contains_registered_handlers(make_server):
    server = make_server()

    def on_join(client):
        pass

    def on_custom(client, content):
        pass

    server.on("join")(on_join)
    server.on("custom", threaded=True)(on_custom)
    assert server.funcs["join"]["func"] is on_join
    assert server.funcs["custom"]["func"] is on_custom
    assert server.funcs["custom"]["threaded"] is True
    assert server.funcs["join"]["threaded"] is False
    assert "not_registered" not in server.funcs


# ---------------------------------------------------------------- close


def test_close_disconnects_every_client(make_server, make_client, recorder):
    server = make_server()
    server.start()
    plain = make_client(server, "plain")
    plain_forced = recorder()
    plain.on("force_disconnect")(plain_forced)
    threaded = make_client(server, "threaded", threaded=True)
    threaded_forced = recorder()
    threaded.on("force_disconnect")(threaded_forced)
    threaded.start()
    wait_until(lambda: len(server.get_all_clients()) == 2)

    server.close()

    with pytest.raises(ClientDisconnected):
        plain.recv(timeout=5)
    assert len(plain_forced.items) == 1
    threaded_forced.wait_for(1)
    assert server.get_all_clients() == []


def test_close_frees_the_port_at_once(make_server):
    server = make_server()
    server.start()
    port = server.get_addr()[1]
    server.close()
    with pytest.raises(ServerNotRunning):
        HiSockClient((LOOPBACK, port), connect_timeout=2)
    again = ThreadedHiSockServer((LOOPBACK, port))
    try:
        assert again.get_addr() == (LOOPBACK, port)
    finally:
        again.close()


def test_close_twice_is_harmless(make_server):
    server = make_server()
    server.start()
    server.close()
    server.close()
    never_started = make_server()
    never_started.close()
    never_started.close()


def test_start_after_close_returns_at_once():
    server = HiSockServer((LOOPBACK, 0))
    server.close()
    runner = threading.Thread(target=server.start, daemon=True)
    runner.start()
    runner.join(2)
    assert not runner.is_alive()


# ---------------------------------------------------------------- disconnecting


@pytest.mark.parametrize("force", [False, True], ids=["polite", "forced"])
def test_disconnect_all_clients_disconnects_everyone_and_server_keeps_serving(make_server, make_client, force):
    server = make_server()
    install_echo(server)
    server.start()
    first = make_client(server, "first")
    second = make_client(server, "second")
    wait_until(lambda: len(server.get_all_clients()) == 2)

    server.disconnect_all_clients(force=force)

    for client in (first, second):
        with pytest.raises(ClientDisconnected):
            client.recv(timeout=5)
    assert server.get_all_clients() == []
    newcomer = make_client(server, "newcomer")
    sync(newcomer)


def test_disconnect_all_clients_polite_runs_force_disconnect_on_clients(make_server, make_client, recorder):
    server = make_server()
    server.start()
    client = make_client(server)
    forced = recorder()
    client.on("force_disconnect")(forced)
    wait_until(lambda: server.get_all_clients())
    server.disconnect_all_clients()
    with pytest.raises(ClientDisconnected):
        client.recv(timeout=5)
    forced.wait_for(1)


def test_disconnect_all_clients_polite_sends_disconn_and_forced_does_not(make_server, raw):
    server = make_server()
    server.start()
    polite = raw(server, "polite")
    wait_until(lambda: len(server.get_all_clients()) == 1)
    server.disconnect_all_clients(force=False)
    assert b"$DISCONN$" in polite.frames_until_eof()

    forced = raw(server, "forced")
    wait_until(lambda: len(server.get_all_clients()) == 1)
    server.disconnect_all_clients(force=True)
    assert b"$DISCONN$" not in forced.frames_until_eof()


@pytest.mark.parametrize("form", ["tuple", "str", "name", "ClientInfo"])
def test_disconnect_client_by_each_reference_form(make_server, make_client, recorder, form):
    server = make_server()
    server.start()
    target = make_client(server, "target")
    other = make_client(server, "other")
    gone = recorder()
    other.on("client_disconnect")(gone)
    wait_until(lambda: len(server.get_all_clients()) == 2)
    info = info_of(server, target)
    reference = {
        "tuple": target.get_client_addr(),
        "str": f"{target.get_client_addr()[0]}:{target.get_client_addr()[1]}",
        "name": "target",
        "ClientInfo": info,
    }[form]

    server.disconnect_client(reference)

    with pytest.raises(ClientDisconnected):
        target.recv(timeout=5)
    assert server.get_all_clients(key="name") == ["other"]
    # The remaining client hears about it before anything sent afterwards.
    server.send_client("other", "marker", "MARKER")
    assert other.recv(timeout=5) == "MARKER"
    assert gone.items == [info]


def test_disconnect_client_polite_sends_disconn_and_forced_does_not(make_server, raw):
    server = make_server()
    server.start()
    polite = raw(server, "polite")
    forced = raw(server, "forced")
    wait_until(lambda: len(server.get_all_clients()) == 2)

    server.disconnect_client("polite", force=False)
    assert b"$DISCONN$" in polite.frames_until_eof()
    server.disconnect_client("forced", force=True)
    assert b"$DISCONN$" not in forced.frames_until_eof()
    assert server.get_all_clients() == []


def test_disconnect_client_call_func_true_runs_leave(make_server, make_client, recorder):
    leaves = recorder()
    server = make_server()
    server.on("leave")(leaves)
    server.start()
    client = make_client(server, "leaver")
    wait_until(lambda: server.get_all_clients())
    info = info_of(server, client)
    server.disconnect_client(info, call_func=True)
    assert leaves.wait_for(1) == [info]


def test_disconnect_client_call_func_false_does_not_run_leave(make_server, make_client, recorder):
    leaves = recorder()
    server = make_server()
    server.on("leave")(leaves)
    install_echo(server)
    server.start()
    client = make_client(server, "kicked")
    witness = make_client(server, "witness")
    wait_until(lambda: len(server.get_all_clients()) == 2)
    server.disconnect_client("kicked")  # call_func defaults to False
    with pytest.raises(ClientDisconnected):
        client.recv(timeout=5)
    sync(witness)
    assert leaves.items == []


def test_disconnect_client_tells_the_other_clients(make_server, make_client, recorder):
    server = make_server()
    server.start()
    watcher = make_client(server, "watcher", threaded=True)
    gone = recorder()
    watcher.on("client_disconnect")(gone)
    watcher.start()
    target = make_client(server, "target", "grp")
    wait_until(lambda: len(server.get_all_clients()) == 2)
    server.disconnect_client("target")
    (info,) = gone.wait_for(1)
    assert info == ClientInfo(target.get_client_addr(), "target", "grp")


@pytest.mark.parametrize("bad", [("1.2.3.4",), 123, ("x", "y"), ("127.0.0.1", 1, 2), 1.5], ids=repr)
def test_disconnect_client_raises_value_error_for_a_wrong_format(server, bad):
    with pytest.raises(ValueError):
        server.disconnect_client(bad)


@pytest.mark.parametrize(
    "missing",
    ["ghost", ("127.0.0.1", 1), "127.0.0.1:1", ClientInfo(("127.0.0.1", 1), "ghost")],
    ids=["name", "tuple", "str", "ClientInfo"],
)
def test_disconnect_client_raises_client_not_found(server, make_client, missing):
    make_client(server, "present")
    with pytest.raises(ClientNotFound):
        server.disconnect_client(missing)


def test_disconnect_client_warns_when_two_clients_share_the_name(server, make_client):
    make_client(server, "twin")
    make_client(server, "twin")
    wait_until(lambda: len(server.get_all_clients()) == 2)
    with pytest.warns(UserWarning):
        server.disconnect_client("twin")
    assert server.get_all_clients(key="name") == ["twin"]


# ---------------------------------------------------------------- lookups


@pytest.fixture
def three_clients(server, make_client):
    alice = make_client(server, "alice", "red")
    bob = make_client(server, "bob", "blue")
    anon = make_client(server)
    wait_until(lambda: len(server.get_all_clients()) == 3)
    return alice, bob, anon


def test_get_all_clients_without_key_gives_client_infos(server, three_clients):
    alice, bob, anon = three_clients
    infos = server.get_all_clients()
    assert all(isinstance(info, ClientInfo) for info in infos)
    assert set(infos) == {
        ClientInfo(alice.get_client_addr(), "alice", "red"),
        ClientInfo(bob.get_client_addr(), "bob", "blue"),
        ClientInfo(anon.get_client_addr(), None, None),
    }


def test_get_all_clients_by_string_keys(server, three_clients):
    alice, bob, anon = three_clients
    assert sorted(server.get_all_clients(key="name"), key=str) == sorted(["alice", "bob", None], key=str)
    assert sorted(server.get_all_clients(key="group"), key=str) == sorted(["red", "blue", None], key=str)
    assert set(server.get_all_clients(key="ip")) == {c.get_client_addr() for c in three_clients}


def test_get_all_clients_with_a_callable_key_filters(server, three_clients):
    alice = three_clients[0]
    assert server.get_all_clients(key=lambda info: info.group == "red") == [
        ClientInfo(alice.get_client_addr(), "alice", "red")
    ]
    assert server.get_all_clients(key=lambda info: False) == []


def test_get_all_clients_is_empty_without_clients(server):
    assert server.get_all_clients() == []


@pytest.mark.parametrize("form", ["name", "tuple", "str", "ClientInfo"])
def test_get_client_by_each_reference_form(server, three_clients, form):
    alice = three_clients[0]
    expected = ClientInfo(alice.get_client_addr(), "alice", "red")
    ip, port = alice.get_client_addr()
    reference = {"name": "alice", "tuple": (ip, port), "str": f"{ip}:{port}", "ClientInfo": expected}[form]
    assert server.get_client(reference) == expected


@pytest.mark.parametrize("bad", [("1.2.3.4",), 123, ("x", "y")], ids=repr)
def test_get_client_raises_value_error_for_a_wrong_format(server, bad):
    with pytest.raises(ValueError):
        server.get_client(bad)


@pytest.mark.parametrize("missing", ["ghost", ("127.0.0.1", 1), "127.0.0.1:1", ClientInfo(("127.0.0.1", 1))])
def test_get_client_raises_client_not_found(server, three_clients, missing):
    with pytest.raises(ClientNotFound):
        server.get_client(missing)


def test_get_client_warns_when_two_clients_share_the_name(server, make_client):
    make_client(server, "twin")
    make_client(server, "twin")
    wait_until(lambda: len(server.get_all_clients()) == 2)
    with pytest.warns(UserWarning):
        found = server.get_client("twin")
    assert found.name == "twin"
    assert found in server.get_all_clients()


def test_get_group_by_name_and_by_clientinfo(server, make_client):
    red1 = make_client(server, "red1", "red")
    make_client(server, "blue1", "blue")
    red2 = make_client(server, "red2", "red")
    wait_until(lambda: len(server.get_all_clients()) == 3)
    expected = [
        ClientInfo(red1.get_client_addr(), "red1", "red"),
        ClientInfo(red2.get_client_addr(), "red2", "red"),
    ]
    assert server.get_group("red") == expected
    assert server.get_group(expected[1]) == expected
    assert [info.name for info in server.get_group("blue")] == ["blue1"]


def test_get_group_raises_group_not_found(server, three_clients):
    with pytest.raises(GroupNotFound):
        server.get_group("green")
    groupless = server.get_client(three_clients[2].get_client_addr())
    with pytest.raises(GroupNotFound):
        server.get_group(groupless)


# ---------------------------------------------------------------- on(): reserved events


def test_join_handler_gets_the_new_clients_info(server, make_client, recorder):
    joins = recorder()

    @server.on("join")
    def on_join(client):
        joins(client)

    client = make_client(server, "newbie", "newgroup")
    assert joins.wait_for(1) == [ClientInfo(client.get_client_addr(), "newbie", "newgroup")]


def test_leave_handler_gets_the_leaving_clients_info(server, make_client, recorder):
    leaves = recorder()

    @server.on("leave")
    def on_leave(client):
        leaves(client)

    client = make_client(server, "leaver", "grp")
    addr = client.get_client_addr()
    wait_until(lambda: server.get_all_clients())
    client.close()
    assert leaves.wait_for(1) == [ClientInfo(addr, "leaver", "grp")]


def test_message_handler_with_three_args_gets_client_command_content(server, make_client, recorder):
    messages = recorder()

    @server.on("message")
    def on_message(client, command, content):
        messages(client, command, content)

    @server.on("handled")
    def handled(client, content):
        pass

    client = make_client(server, "talker")
    client.send("handled", [1, 2])
    client.send("unhandled", {"k": "v"})
    first, second = messages.wait_for(2)
    info = ClientInfo(client.get_client_addr(), "talker")
    assert first == (info, "handled", [1, 2])
    assert second == (info, "unhandled", {"k": "v"})


def test_message_handler_with_two_args_gets_client_and_content(server, make_client, recorder):
    messages = recorder()

    @server.on("message")
    def on_message(client, content):
        messages(client, content)

    client = make_client(server, "talker")
    client.send("whatever", "the content")
    assert messages.wait_for(1) == [(ClientInfo(client.get_client_addr(), "talker"), "the content")]


def test_message_runs_after_the_commands_own_handler(server, make_client, recorder):
    order = recorder()
    server.on("cmd")(lambda client, content: order("cmd"))
    server.on("message")(lambda client, command, content: order("message"))
    client = make_client(server)
    client.send("cmd", 1)
    assert order.wait_for(2) == ["cmd", "message"]


def test_name_change_handler_gets_client_old_and_new_name(server, make_client, recorder):
    changes = recorder()

    @server.on("name_change")
    def on_name_change(client, old_name, new_name):
        changes(client, old_name, new_name)

    client = make_client(server, "before")
    client.change_name("after")
    (client_info, old, new), = changes.wait_for(1)
    assert (old, new) == ("before", "after")
    assert client_info.ip == client.get_client_addr()
    assert server.get_client("after").ip == client.get_client_addr()
    with pytest.raises(ClientNotFound):
        server.get_client("before")


def test_name_change_to_none_goes_back_to_the_connect_name(server, make_client, recorder):
    changes = recorder()
    server.on("name_change")(changes)
    client = make_client(server, "original")
    client.change_name("temporary")
    client.change_name(None)
    changes.wait_for(2)
    assert [(old, new) for _, old, new in changes.items] == [("original", "temporary"), ("temporary", "original")]
    assert server.get_all_clients(key="name") == ["original"]


def test_group_change_handler_gets_client_old_and_new_group(server, make_client, recorder):
    changes = recorder()

    @server.on("group_change")
    def on_group_change(client, old_group, new_group):
        changes(client, old_group, new_group)

    client = make_client(server, "mover", "red")
    client.change_group("blue")
    client.change_group(None)
    changes.wait_for(2)
    assert [(old, new) for _, old, new in changes.items] == [("red", "blue"), ("blue", "red")]
    assert changes.items[0][0].ip == client.get_client_addr()
    assert server.get_all_clients(key="group") == ["red"]


def test_catch_all_handler_gets_commands_without_a_handler(server, make_client, recorder):
    caught, handled = recorder(), recorder()

    @server.on("*")
    def catch_all(client, command, content):
        caught(client, command, content)

    server.on("known")(lambda client, content: handled(content))
    client = make_client(server, "c")
    client.send("known", 1)
    client.send("unknown", 2)
    assert caught.wait_for(1) == [(ClientInfo(client.get_client_addr(), "c"), "unknown", 2)]
    assert handled.wait_for(1) == [1]


def test_unreserved_handlers_with_zero_one_and_two_params(server, make_client, recorder):
    calls = recorder()

    @server.on("zero")
    def zero():
        calls("zero")

    @server.on("one")
    def one(client):
        calls(("one", client))

    @server.on("two")
    def two(client, content):
        calls(("two", client, content))

    client = make_client(server, "p")
    client.send("zero", "ignored")
    client.send("one", "ignored")
    client.send("two", "kept")
    info = ClientInfo(client.get_client_addr(), "p")
    assert calls.wait_for(3) == ["zero", ("one", info), ("two", info, "kept")]


@pytest.mark.parametrize(
    "command, func",
    [
        ("join", lambda: None),
        ("join", lambda a, b: None),
        ("leave", lambda a, b: None),
        ("message", lambda a: None),
        ("message", lambda a, b, c, d: None),
        ("name_change", lambda a, b: None),
        ("group_change", lambda a: None),
        ("*", lambda a, b: None),
        ("custom", lambda a, b, c: None),
    ],
    ids=["join-0", "join-2", "leave-2", "message-1", "message-4", "name_change-2", "group_change-1", "star-2", "custom-3"],
)
def test_on_raises_type_error_for_a_wrong_number_of_params(make_server, command, func):
    server = make_server()
    with pytest.raises(TypeError):
        server.on(command)(func)
    assert command not in server.funcs


@pytest.mark.parametrize("command", ["$custom$", "$CLTHELLO$", "a$b$c"])
def test_on_raises_value_error_for_reserved_dollar_commands(make_server, command):
    server = make_server()
    with pytest.raises(ValueError):
        server.on(command)(lambda client, content: None)


@pytest.mark.slow
def test_threaded_handler_does_not_stall_other_clients(server, make_client):
    slow_started, slow_finished = threading.Event(), threading.Event()

    @server.on("slow", threaded=True)
    def slow(client, content):
        slow_started.set()
        time.sleep(1)
        slow_finished.set()

    @server.on("ping")
    def ping(client, content):
        server.send_client(client, "pong", content)

    sleeper = make_client(server, "sleeper")
    pinger = make_client(server, "pinger")
    sleeper.send("slow")
    assert slow_started.wait(5)
    pinger.send("ping", "hello")
    assert pinger.recv("pong", timeout=0.9) == "hello"
    assert not slow_finished.is_set(), "the pong came only after the sleeping handler finished"
    assert slow_finished.wait(5)


def test_threaded_handler_gets_the_same_arguments_and_can_use_the_server(server, make_client, recorder):
    got = recorder()

    @server.on("bg", threaded=True)
    def background(client, content):
        got(client, content)
        server.send_client(client, "bg-reply", [content, threading.current_thread().name])

    client = make_client(server, "bg-client")
    client.send("bg", {"x": 1})
    assert got.wait_for(1) == [(ClientInfo(client.get_client_addr(), "bg-client"), {"x": 1})]
    content, thread_name = client.recv("bg-reply", timeout=5)
    assert content == {"x": 1}
    assert thread_name != threading.current_thread().name


def test_override_turns_join_into_a_plain_command(server, make_client, recorder):
    calls = recorder()
    install_echo(server)

    @server.on("join", override=True)
    def join_command(client, content):
        calls(client, content)

    client = make_client(server, "joiner")
    sync(client)
    assert calls.items == [], "the reserved join event still called the overriding handler"
    client.send("join", "as a command")
    sync(client)
    assert calls.wait_for(1) == [(ClientInfo(client.get_client_addr(), "joiner"), "as a command")]


def test_override_on_leave_does_not_run_on_disconnect(server, make_client, recorder):
    calls = recorder()
    install_echo(server)
    server.on("leave", override=True)(lambda client, content: calls(content))
    leaver, witness = make_client(server, "leaver"), make_client(server, "witness")
    leaver.close()
    wait_until(lambda: server.get_all_clients(key="name") == ["witness"])
    sync(witness)
    assert calls.items == []
    witness.send("leave", "explicit")
    sync(witness)
    assert calls.wait_for(1) == ["explicit"]


# ---------------------------------------------------------------- sending


@pytest.mark.parametrize("value", SENDABLES)
def test_send_client_round_trips_every_sendable(server, make_client, value):
    client = make_client(server, "receiver")
    wait_until(lambda: server.get_all_clients())
    server.send_client("receiver", "value", value)
    received = client.recv("value", timeout=5)
    assert same_value(received, value), f"sent {value!r}, got {received!r}"


@pytest.mark.parametrize("value", SENDABLES)
def test_send_group_round_trips_every_sendable(server, make_client, value):
    client = make_client(server, "receiver", "grp")
    wait_until(lambda: server.get_all_clients())
    server.send_group("grp", "value", value)
    received = client.recv("value", timeout=5)
    assert same_value(received, value), f"sent {value!r}, got {received!r}"


@pytest.mark.parametrize("value", SENDABLES)
def test_send_all_clients_round_trips_every_sendable(server, make_client, value):
    first, second = make_client(server, "first"), make_client(server, "second")
    wait_until(lambda: len(server.get_all_clients()) == 2)
    server.send_all_clients("value", value)
    for client in (first, second):
        received = client.recv("value", timeout=5)
        assert same_value(received, value), f"sent {value!r}, got {received!r}"


@pytest.mark.parametrize("command", ["Cmd", "MSG", "Done", "$dollar", "cmd with spaces", "ünïcode"])
def test_command_names_arrive_intact_both_ways(server, make_client, recorder, command):
    """No character of a command is eaten (upstream lstrip()ed "$CMD$" and lost C, M, D and $)."""
    got = recorder()

    @server.on(command)
    def handler(client, content):
        got(content)
        server.send_client(client, command, content + 1)

    client = make_client(server)
    client.send(command, 1)
    assert got.wait_for(1) == [1]
    assert client.recv(command, timeout=5) == 2


def test_send_all_clients_without_content_sends_none(server, make_client):
    client = make_client(server)
    wait_until(lambda: server.get_all_clients())
    server.send_all_clients("bare")
    assert client.recv("bare", timeout=5) is None


@pytest.fixture
def audience(server, make_client):
    """Three clients: a and b in group g1, c in g2."""
    a = make_client(server, "a", "g1")
    b = make_client(server, "b", "g1")
    c = make_client(server, "c", "g2")
    wait_until(lambda: len(server.get_all_clients()) == 3)
    return {"a": a, "b": b, "c": c}


def assert_received(audience, expected_first: dict) -> None:
    """Everyone gets the marker; the addressed ones get their message before it, the rest nothing."""
    for name, client in audience.items():
        if name in expected_first:
            assert client.recv(timeout=5) == expected_first[name], f"{name} missed its message"
        assert client.recv(timeout=5) == "MARKER", f"{name} received something not meant for it"


@pytest.mark.parametrize("form", ["name", "tuple", "str", "ClientInfo"])
def test_send_client_reaches_only_that_client(server, audience, form):
    ip, port = audience["b"].get_client_addr()
    reference = {"name": "b", "tuple": (ip, port), "str": f"{ip}:{port}", "ClientInfo": server.get_client("b")}[form]
    server.send_client(reference, "only", "for b")
    server.send_all_clients("marker", "MARKER")
    assert_received(audience, {"b": "for b"})


def test_send_group_by_name_reaches_only_that_group(server, audience):
    server.send_group("g1", "grp", "for g1")
    server.send_all_clients("marker", "MARKER")
    assert_received(audience, {"a": "for g1", "b": "for g1"})


def test_send_group_by_clientinfo_reaches_only_that_group(server, audience):
    server.send_group(server.get_client("c"), "grp", "for g2")
    server.send_all_clients("marker", "MARKER")
    assert_received(audience, {"c": "for g2"})


def test_send_all_clients_reaches_everyone(server, audience):
    server.send_all_clients("all", "for all")
    server.send_all_clients("marker", "MARKER")
    assert_received(audience, {"a": "for all", "b": "for all", "c": "for all"})


def test_send_group_raises_group_not_found_which_is_a_type_error(server, audience):
    with pytest.raises(GroupNotFound):
        server.send_group("nobody-here", "cmd", 1)
    with pytest.raises(TypeError):
        server.send_group("nobody-here", "cmd", 1)
    groupless = ClientInfo(audience["a"].get_client_addr(), "a", None)
    with pytest.raises(TypeError):
        server.send_group(groupless, "cmd", 1)
    # Nothing was sent to anyone.
    server.send_all_clients("marker", "MARKER")
    assert_received(audience, {})


@pytest.mark.parametrize("bad", [("1.2.3.4",), 123, ("x", "y")], ids=repr)
def test_send_client_raises_value_error_for_a_wrong_format(server, bad):
    with pytest.raises(ValueError):
        server.send_client(bad, "cmd", 1)


@pytest.mark.parametrize("missing", ["ghost", ("127.0.0.1", 1), "127.0.0.1:1", ClientInfo(("127.0.0.1", 1))])
def test_send_client_raises_client_not_found(server, audience, missing):
    with pytest.raises(ClientNotFound):
        server.send_client(missing, "cmd", 1)


def test_send_client_warns_when_two_clients_share_the_name(server, make_client):
    first = make_client(server, "twin")
    second = make_client(server, "twin")
    wait_until(lambda: len(server.get_all_clients()) == 2)
    with pytest.warns(UserWarning):
        server.send_client("twin", "hello", "one of you")
    server.send_all_clients("marker", "MARKER")
    firsts = [first.recv(timeout=5), second.recv(timeout=5)]
    assert sorted(firsts) == ["MARKER", "one of you"]


def test_send_refuses_reserved_command_names(server, audience):
    with pytest.raises(ValueError):
        server.send_all_clients("$DISCONN$")
    with pytest.raises(ValueError):
        server.send_client("a", "$DISCONN$")


# ---------------------------------------------------------------- start(callback, error_handler)


def test_start_callback_runs_after_each_handled_message(make_server, make_client, recorder):
    order = recorder()
    server = make_server()
    server.on("work")(lambda client, content: order(("handled", content)))
    server.start(callback=lambda: order("callback"))
    client = make_client(server)
    for number in range(3):
        client.send("work", number)
    assert order.wait_for(6) == [("handled", 0), "callback", ("handled", 1), "callback", ("handled", 2), "callback"]


def test_start_error_handler_gets_the_exception_and_serving_continues(make_server, make_client, recorder):
    errors = recorder()
    server = make_server()
    install_echo(server)
    boom = ValueError("boom from a handler")

    @server.on("explode")
    def explode(client, content):
        raise boom

    server.start(error_handler=errors)
    culprit, bystander = make_client(server, "culprit"), make_client(server, "bystander")
    culprit.send("explode")
    assert errors.wait_for(1) == [boom]
    sync(culprit, "still here")
    sync(bystander, "me too")
    assert sorted(server.get_all_clients(key="name")) == ["bystander", "culprit"]


def test_start_error_handler_gets_errors_of_reserved_handlers(make_server, make_client, recorder):
    errors = recorder()
    server = make_server()
    install_echo(server)

    @server.on("join")
    def bad_join(client):
        raise RuntimeError("join failed")

    server.start(error_handler=errors)
    client = make_client(server, "joiner")
    (error,) = errors.wait_for(1)
    assert isinstance(error, RuntimeError) and str(error) == "join failed"
    sync(client)


def test_start_without_error_handler_logs_and_keeps_serving(make_server, make_client, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    server = make_server()
    install_echo(server)

    @server.on("explode")
    def explode(client, content):
        raise KeyError("logged, not fatal")

    server.start()
    client = make_client(server)
    client.send("explode")
    sync(client)

    def logged():
        return [
            record
            for record in caplog.records
            if record.name == "hisock_gevent" and record.exc_info and isinstance(record.exc_info[1], KeyError)
        ]

    records = wait_until(logged)
    assert records[0].levelno >= logging.ERROR
    sync(client, "again")


def test_plain_server_start_blocks_until_close(make_client):
    server = HiSockServer((LOOPBACK, 0))
    install_echo(server)
    runner = threading.Thread(target=server.start, daemon=True)
    runner.start()
    try:
        client = make_client(server)
        sync(client)
        assert runner.is_alive()
    finally:
        server.close()
    runner.join(5)
    assert not runner.is_alive()


# ---------------------------------------------------------------- start_server / start_threaded_server


def test_start_server_returns_a_hisockserver_with_the_given_parameters():
    server = start_server((LOOPBACK, 0), 5, 24)
    try:
        assert type(server) is HiSockServer
        assert server.max_connections == 5
        assert server.header_len == 24
        assert server.get_addr()[0] == LOOPBACK
    finally:
        server.close()
    defaults = hisock_gevent.start_server((LOOPBACK, 0))
    try:
        assert defaults.max_connections == 0
        assert defaults.header_len == 16
    finally:
        defaults.close()


def test_start_threaded_server_returns_a_working_threaded_server(make_client):
    server = start_threaded_server((LOOPBACK, 0), max_connections=1, header_len=20)
    try:
        assert isinstance(server, ThreadedHiSockServer)
        assert server.max_connections == 1
        assert server.header_len == 20
        install_echo(server)
        server.start()
        client = make_client(server, header_len=20)
        sync(client)
        with pytest.raises(ConnectionRejected):
            make_client(server, header_len=20)
    finally:
        server.close()


def test_threaded_server_start_returns_at_once_and_serves_in_the_background(make_server, make_client):
    server = make_server()
    install_echo(server)
    started = time.monotonic()
    server.start()
    assert time.monotonic() - started < 2
    sync(make_client(server))


def test_threaded_client_against_server(make_server, make_client, recorder):
    """A ThreadedHiSockClient's handlers run while the test thread only waits."""
    server = make_server()
    install_echo(server)
    server.start()
    client = make_client(server, threaded=True)
    echoes = recorder()
    client.on("echo")(echoes)
    client.start()
    client.send("echo", "bg")
    assert echoes.wait_for(1) == ["bg"]
    assert isinstance(client, ThreadedHiSockClient)
