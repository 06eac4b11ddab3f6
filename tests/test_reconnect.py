"""Clients that reconnect (issue 14 part 2): a real server process killed and restarted
under connected clients, over real loopback sockets."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Optional

import pytest
from conftest import LOOPBACK, Recorder, wait_until

import hisock_gevent
from hisock_gevent.reconnect import backoff

pytestmark = pytest.mark.timeout(90)

PROGRAM = Path(__file__).parent / "programs" / "notes_server.py"
DELAY, DELAY_MAX = 0.2, 1.0


class NotesServer:
    """tests/programs/notes_server.py on a fixed port; its lines are collected."""

    def __init__(self, port: int):
        self.proc = subprocess.Popen(
            [sys.executable, str(PROGRAM), str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "READY"
        self.lines: List[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()

    def notes(self, name: str) -> List[str]:
        with self._cond:
            return [line.split(" ", 3)[3] for line in self.lines if line.startswith(f"NOTE {name} ")]

    def wait_lines(self, predicate: Any, timeout: float = 10) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.lines), timeout), self.lines

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def close_gracefully(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@pytest.fixture
def servers():
    started: List[NotesServer] = []

    def start(port: int) -> NotesServer:
        server = NotesServer(port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def clients():
    made: List[hisock_gevent.ThreadedHiSockClient] = []

    def make(port: int, name: str, group: Optional[str], **kwargs: Any) -> hisock_gevent.ThreadedHiSockClient:
        options = dict(reconnect=True, reconnect_delay=DELAY, reconnect_delay_max=DELAY_MAX)
        options.update(kwargs)
        client = hisock_gevent.ThreadedHiSockClient((LOOPBACK, port), name, group, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_backoff_doubles_from_the_first_delay_up_to_the_most_with_jitter_below():
    for attempt in range(1, 12):
        ceiling = min(0.2 * 2 ** (attempt - 1), 1.0)
        assert backoff(attempt, 0.2, 1.0, lambda low, high: low) == ceiling / 2
        assert backoff(attempt, 0.2, 1.0, lambda low, high: high) == ceiling
        assert ceiling / 2 <= backoff(attempt, 0.2, 1.0) <= ceiling


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["killed", "closed"])
def test_clients_come_back_after_the_server_restarts_and_nothing_is_lost_or_doubled(outage, servers, clients):
    port = free_port()
    server = servers(port)
    names = [("ann", "red"), ("bob", "blue"), ("cy", None)]
    back = {name: Recorder() for name, _ in names}
    made = []
    for name, group in names:
        client = clients(port, name, group)
        client.on("reconnect")(lambda name=name: back[name](1))
        client.start()
        made.append(client)
    for client in made:
        for n in range(10):
            client.send("note", n)
    server.wait_lines(lambda lines: all(sum(f"NOTE {name} " in line for line in lines) == 10 for name, _ in names))

    if outage == "killed":
        server.kill()
    else:
        server.close_gracefully()  # $DISCONN$ "server closing": come back too
    wait_until(lambda: all(client.reconnecting for client in made), timeout=5)
    for client in made:  # sent while there is no server: kept, in order
        for n in range(10, 15):
            client.send("note", n)
    # A name change while away travels in the next hello.
    made[2].change_name("cyrus")
    began = time.monotonic()
    restarted = servers(port)
    for name, _ in names:
        back[name].wait_for(1, timeout=10)
    took = time.monotonic() - began
    assert took < DELAY_MAX + 2.0, f"the clients needed {took:.1f} s to come back"

    expected_joins = {("ann", "red"), ("bob", "blue"), ("cyrus", "None")}
    restarted.wait_lines(lambda lines: {tuple(line.split()[1:3]) for line in lines if line.startswith("JOIN")} == expected_joins)
    restarted.wait_lines(lambda lines: sum(line.startswith("NOTE") for line in lines) == 15)
    assert server.notes("ann") == [str(n) for n in range(10)]
    for name in ("ann", "bob", "cyrus"):
        assert restarted.notes(name) == [str(n) for n in range(10, 15)], restarted.lines
    assert [line for line in restarted.lines if line.startswith("NOTE ann")][0].startswith("NOTE ann red")
    for client in made:
        assert not client.closed
        client.send("note", "after")
    restarted.wait_lines(lambda lines: sum(line.endswith(" after") for line in lines) == 3)


@pytest.mark.slow
def test_a_client_the_server_disconnects_does_not_come_back(servers, clients):
    port = free_port()
    server = servers(port)
    forced = threading.Event()
    kicked = clients(port, "kicked", None)
    kicked.on("force_disconnect")(forced.set)
    kicked.start()
    other = clients(port, "other", None)
    other.start()
    server.wait_lines(lambda lines: sum(line.startswith("JOIN") for line in lines) == 2)
    other.send("kick", "kicked")
    assert forced.wait(5)
    kicked.join(5)
    assert kicked.closed and not kicked.reconnecting


def test_close_while_reconnecting_stops_at_once(clients):
    port = free_port()
    listener = socket.create_server((LOOPBACK, port))
    accepted = []

    def accept_then_drop() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.recv(65536)
        conn.sendall(b"%-16d" % 60 + b'$CLTCONN${"ip":["127.0.0.1",1],"name":"x","group":null,"caps":[]}'[:60])
        conn.close()
        listener.close()  # nobody answers any more: the client keeps trying

    threading.Thread(target=accept_then_drop, daemon=True).start()
    client = clients(port, "x", None, reconnect_delay=0.5, reconnect_delay_max=0.5)
    client.start()
    wait_until(lambda: client.reconnecting, timeout=5)
    began = time.monotonic()
    client.close()
    assert time.monotonic() - began < 1.0
    assert client.closed and not client.reconnecting


def test_sends_past_the_bound_while_reconnecting_raise(clients, servers):
    port = free_port()
    server = servers(port)
    client = clients(port, "heavy", None, max_queue_bytes=64 * 1024)
    client.start()
    server.wait_lines(lambda lines: any(line.startswith("JOIN") for line in lines))
    server.kill()
    wait_until(lambda: client.reconnecting, timeout=5)
    with pytest.raises(hisock_gevent.ClientDisconnected, match="reconnecting"):
        for _ in range(10):
            client.send("note", b"x" * 16 * 1024)


def test_a_full_server_is_retried_until_there_is_room(make_server, make_client, clients):
    srv = make_server(max_connections=1)
    srv.start()
    first = make_client(srv, "first")
    came = threading.Event()
    waiting = clients(srv.get_addr()[1], "waiting", None)
    waiting.on("reconnect")(came.set)
    waiting.start()
    wait_until(lambda: waiting.reconnecting, timeout=5)  # refused (full): backing off
    first.close()
    assert came.wait(DELAY_MAX + 5)
    wait_until(lambda: srv.get_all_clients(key="name") == ["waiting"])


def test_a_failed_authentication_is_not_retried(make_server, clients):
    srv = make_server(authenticate=lambda info, credentials: credentials == "right")
    srv.start()
    forced = threading.Event()
    client = clients(srv.get_addr()[1], "mallory", None, auth="wrong")
    client.on("force_disconnect")(forced.set)
    client.start()
    assert forced.wait(5)
    client.join(5)
    assert client.closed and not client.reconnecting
    assert srv.stats()["connections"]["refused"] == {"auth_failed": 1}
