"""Programs in the shape of HiSock's own examples and tests, run on hisock_gevent (issue 13).

Written here after upstream's patterns (no upstream code): a server made before its
client in one process, both started afterwards; a threaded client that sends and then
recv()s; name and group changes; every Sendable type; HiSock names a ported program
imports; and what a porting user hits with handler errors, ``SystemExit`` in a handler and
blocking ``threaded=True`` handlers.  HiSock 3.x itself is not on PyPI (2.0.2 is the
newest release there), so the byte-level tests of tests/test_wire.py stand in for the
plain-HiSock pairings.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, List

import pytest
from conftest import LOOPBACK, Recorder, wait_until

import hisock_gevent
from hisock_gevent import ClientInfo

pytestmark = pytest.mark.timeout(60)


def test_a_server_and_a_client_made_before_either_starts_talk_once_started():
    """Upstream's gather_test shape: the client's constructor must not wait for a server
    that has not started yet."""
    server = hisock_gevent.ThreadedHiSockServer((LOOPBACK, 0))
    began = time.monotonic()
    client = hisock_gevent.ThreadedHiSockClient(server.get_addr())
    assert time.monotonic() - began < 1.0
    got: List[Any] = []
    done = threading.Event()

    @server.on("join")
    def join(info: ClientInfo) -> None:
        server.send_client(info, "sus", b"AMOGUS")

    @client.on("sus")
    def sus(data: bytes) -> None:
        got.append(data)
        done.set()

    server.start()
    client.start()
    try:
        assert done.wait(10)
        assert got == [b"AMOGUS"]
    finally:
        client.close()
        server.close()


@pytest.mark.slow
def test_send_then_recv_never_loses_the_answer(make_server, make_client):
    """A threaded client that sends, starts a thread, then recv()s: the reply may come
    before recv() is waiting; it must still be the one recv() returns, every time."""
    srv = make_server()

    @srv.on("ask")
    def ask(info: ClientInfo, content: int) -> None:
        srv.send_client(info, "answer", content * 2)

    srv.start()
    client = make_client(srv, "asker", threaded=True)
    client.start()
    for n in range(200):
        client.send("ask", n)
        threading.Thread(target=lambda: None).start()  # a thread start between the two
        time.sleep(0.001)
        assert client.recv("answer", timeout=5) == 2 * n


@pytest.mark.slow
def test_a_reply_that_nobody_takes_is_kept_only_a_while(make_server, make_client, monkeypatch):
    import hisock_gevent.client as client_module

    monkeypatch.setattr(client_module, "UNCLAIMED_SECONDS", 0.2)
    srv = make_server()
    srv.start()
    client = make_client(srv, "late", threaded=True)
    client.start()  # its dispatcher finds no handler for "stale" and keeps it a while
    srv.send_client("late", "fresh", 1)
    wait_until(lambda: len(client._unclaimed) == 1)
    assert client.recv("fresh", timeout=1) == 1  # taken within the while
    srv.send_client("late", "stale", 2)
    wait_until(lambda: len(client._unclaimed) == 1)
    time.sleep(0.3)  # the while is over (a test of expiry: the sleep is the point)
    with pytest.raises(TimeoutError):
        client.recv("stale", timeout=0.3)


def test_names_and_groups_change_and_everyone_sees_it(make_server, make_client, recorder):
    changes = recorder()
    srv = make_server()
    srv.on("name_change")(lambda info, old, new: changes(("name", old, new)))
    srv.on("group_change")(lambda info, old, new: changes(("group", old, new)))
    srv.start()
    client = make_client(srv, "before", "g1")
    client.change_name("after")
    client.change_group("g2")
    assert changes.wait_for(2) == [("name", "before", "after"), ("group", "g1", "g2")]
    assert client.get_client("after").group == "g2"
    client.change_name(None)  # back to the connect name
    wait_until(lambda: srv.get_all_clients(key="name") == ["before"])


@pytest.mark.parametrize(
    "value",
    ["text", b"\x00bytes", 12345678901234567890, 3.141592653589793, [1, "a", [2.5]], {"k": [1, 2]}, None, True, (1, "t")],
    ids=["str", "bytes", "int", "float", "list", "dict", "none", "bool", "tuple"],
)
def test_every_sendable_type_round_trips_between_hisock_gevent_peers(make_server, make_client, value):
    srv = make_server()

    @srv.on("echo")
    def echo(info: ClientInfo, content: Any) -> None:
        srv.send_client(info, "echo", content)

    srv.start()
    client = make_client(srv, "types")
    client.send("echo", value)
    assert client.recv("echo", timeout=5) == value


def test_hisock_names_a_ported_program_imports_exist():
    from hisock_gevent import constants, utils
    from hisock_gevent.server import ClientException, GroupNotFound, ServerException

    assert constants.__version__ == hisock_gevent.__version__
    assert utils.make_header(b"hello", 16) == b"5" + b" " * 15
    assert utils.make_header("hi", 4, encode=False) == "2   "
    with pytest.raises(ValueError):
        utils.validate_command_not_reserved("$reserved$")
    utils.validate_command_not_reserved("fine")
    assert utils.RECV_BUFFERSIZE == hisock_gevent.HiSockServer.RECV_BUFFERSIZE == 8192
    assert utils.SendableTypes is not None
    assert issubclass(GroupNotFound, hisock_gevent.GroupNotFound) and ClientException and ServerException
    assert isinstance(utils.get_local_ip(), str)
    assert isinstance(utils.get_local_ip(all_ips=True), list)


def test_receive_message_reads_one_frame_from_a_blocking_socket(make_server):
    import json
    import socket

    from hisock_gevent.utils import receive_message

    srv = make_server()
    srv.start()
    sock = socket.create_connection(srv.get_addr(), timeout=5)
    try:
        body = b"$CLTHELLO$" + json.dumps({"name": "r", "group": None}).encode()
        sock.sendall(str(len(body)).encode().ljust(16) + body)
        message = receive_message(sock, 16)
        assert isinstance(message, dict) and message["data"].startswith(b"$CLTCONN$")
        assert int(message["header"]) == len(message["data"])
    finally:
        sock.close()


def test_client_disconnected_is_a_connection_error_hisock_programs_catch(make_server, make_client):
    srv = make_server()
    srv.start()
    client = make_client(srv)
    client.close()
    with pytest.raises(OSError):  # what a HiSock program wraps its sends in
        client.send("x", "y")
    assert issubclass(hisock_gevent.ClientDisconnected, ConnectionError)


# The SystemExit ends the client's thread, as it would on HiSock; pytest reports any
# exception that ends a thread, SystemExit included, which is the point here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_system_exit_in_a_client_handler_closes_the_client_and_leaves_it_usable(make_server, make_client, recorder):
    left = recorder()
    srv = make_server()
    srv.on("leave")(lambda info: left(info.name))
    srv.start()
    client = make_client(srv, "quitter", threaded=True)

    @client.on("quit")
    def quit_game() -> None:
        raise SystemExit  # what upstream's tictactoe client does on "quit"

    client.start()
    srv.send_client("quitter", "quit")
    assert left.wait_for(1) == ["quitter"]
    client.join(5)
    assert client.closed
    with pytest.raises(hisock_gevent.ClientDisconnected):
        client.send("after", "x")
    client.close()  # still works, and does nothing


def test_handler_errors_are_printed_when_nobody_configured_logging():
    program = textwrap.dedent(
        """
        import hisock_gevent
        server = hisock_gevent.ThreadedHiSockServer(("127.0.0.1", 0))

        @server.on("join")
        def join(client):
            1 / 0

        server.start()
        client = hisock_gevent.HiSockClient(server.get_addr(), "x")
        client.wait_joined()
        client.get_client("x")  # a round trip: join has run
        client.close()
        server.close()
        """
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "ZeroDivisionError" in result.stderr and "Traceback" in result.stderr
    assert "'join'" in result.stderr


@pytest.mark.slow
def test_many_blocking_threaded_handlers_run_at_once_in_a_plain_program(make_server, make_client):
    srv = make_server()
    done = Recorder()

    @srv.on("nap", threaded=True)
    def nap(info: ClientInfo) -> None:
        time.sleep(1)
        done(1)

    srv.start()
    client = make_client(srv, "napper")
    began = time.monotonic()
    for _ in range(80):
        client.send("nap")
    done.wait_for(80, timeout=10)
    assert time.monotonic() - began < 2.5  # HiSock starts a thread each: not 64 at a time


def test_close_does_not_run_leave_for_the_clients_it_disconnects(make_server, make_client, recorder):
    left = recorder()
    srv = make_server()
    srv.on("leave")(lambda info: left(info.name))
    srv.start()
    client = make_client(srv, "stays")
    forced = threading.Event()
    client.on("force_disconnect")(forced.set)
    threading.Thread(target=client.start, daemon=True).start()
    srv.close()
    assert forced.wait(5)  # the client was told $DISCONN$
    assert left.items == []


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_is_refused_with_a_clear_error(host):
    with pytest.raises(ValueError, match="IPv6 addresses are not supported"):
        hisock_gevent.HiSockServer((host, 0))
    with pytest.raises(ValueError, match="IPv6 addresses are not supported"):
        hisock_gevent.HiSockClient((host, 6969))
