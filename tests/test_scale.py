"""Many connections at once: broadcasts to a thousand, connection limits, port probes, slow readers.

The server is a ThreadedHiSockServer on its own thread (the pytest process is not
monkey-patched).  Some tests use real HiSockClients; where only the wire matters, raw
stdlib sockets speak HiSock's framing directly, which is much cheaper per connection.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from conftest import wait_until
from rawpeer import RawPeer

import hisock_gevent
from hisock_gevent.messages import Command, parse_server_body
from hisock_gevent.typecast import decode

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


# ---------------------------------------------------------------- raw HiSock peers


def _commands_for_all(peers: List[RawPeer], wanted: str, count: int, timeout: float) -> Dict[RawPeer, List[Any]]:
    """Read from every peer at once until each has ``count`` ``wanted`` commands."""
    got: Dict[RawPeer, List[Any]] = {peer: [] for peer in peers}
    selector = selectors.DefaultSelector()
    for peer in peers:
        peer.sock.setblocking(False)
        selector.register(peer, selectors.EVENT_READ, peer)
    waiting = set(peers)

    def take(peer: RawPeer) -> None:
        while len(got[peer]) < count:
            body = peer.take_frame()
            if body is None:
                break
            message = parse_server_body(body)
            if isinstance(message, Command) and message.command == wanted:
                got[peer].append(decode(message.fmt, message.payload))
        if len(got[peer]) >= count:
            waiting.discard(peer)
            selector.unregister(peer)

    deadline = time.monotonic() + timeout
    try:
        for peer in list(waiting):
            take(peer)
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                peer = key.data
                try:
                    data = peer.sock.recv(262144)
                except BlockingIOError:
                    continue
                if not data:
                    raise AssertionError("the server closed a connection that should have stayed open")
                peer.feed(data)
                take(peer)
    finally:
        selector.close()
        for peer in peers:
            peer.sock.setblocking(True)
    assert not waiting, f"{len(waiting)} of {len(peers)} peers did not get {count} {wanted!r} within {timeout} s"
    return got


# ---------------------------------------------------------------- a thousand clients


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_thousand_hisockclients_connected_at_once_each_receive_a_broadcast(server, make_client):
    count = 1000
    connecting_threads = 20
    joins: List[Any] = []
    server.on("join")(joins.append)
    started = time.monotonic()

    # Each join is announced to everyone already there (HiSock's $CLTCONN$), so joining one
    # by one waits on O(n) writes per client; threads let the server batch them.  The
    # constructor needs no hub, so any thread may create the clients.
    clients: List[hisock_gevent.HiSockClient] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def connect_some(how_many: int) -> None:
        try:
            for _ in range(how_many):
                client = make_client(server, answer_timeout=60)
                with lock:
                    clients.append(client)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=connect_some, args=(count // connecting_threads,), daemon=True)
        for _ in range(connecting_threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(clients) == count
    wait_until(lambda: len(server.get_all_clients()) == count, timeout=30)
    assert len(joins) == count
    assert len({info.ip for info in server.get_all_clients()}) == count

    server.send_all_clients("news", "x")

    # recv binds each client to this thread; it dispatches the $CLTCONN$s queued before "news".
    got = [client.recv("news", timeout=30) for client in clients]
    assert got == ["x"] * count
    assert len(server.get_all_clients()) == count
    # Closing the server first spares the teardown a $CLTDISCONN$ storm (n² frames).
    server.close()
    assert time.monotonic() - started < 100


@pytest.mark.slow
def test_thousand_raw_connections_each_receive_every_broadcast_in_order(server, raw):
    count = 1000
    broadcasts = 5
    peers = [raw(server, name=None, timeout=WAIT) for _ in range(count)]
    wait_until(lambda: len(server.get_all_clients()) == count, timeout=30)

    for index in range(broadcasts):
        server.send_all_clients("tick", index)

    got = _commands_for_all(peers, "tick", broadcasts, timeout=30)
    assert all(values == list(range(broadcasts)) for values in got.values())
    assert len(server.get_all_clients()) == count


# ---------------------------------------------------------------- max_connections


def test_max_connections_admits_exactly_the_limit_of_many_concurrent_clients_and_rejects_the_rest_promptly(make_server):
    limit, attempts = 50, 60
    server = make_server(max_connections=limit)
    joins: List[Any] = []
    server.on("join")(joins.append)
    server.start()

    barrier = threading.Barrier(attempts)
    results: List[Tuple[str, Any, float]] = []
    lock = threading.Lock()

    def attempt() -> None:
        try:
            barrier.wait(WAIT)
        except threading.BrokenBarrierError:
            pass
        began = time.monotonic()
        try:
            client = hisock_gevent.HiSockClient(server.get_addr(), connect_timeout=WAIT, answer_timeout=WAIT)
            client.wait_joined()
            outcome: Tuple[str, Any] = ("joined", client)
        except hisock_gevent.ConnectionRejected as exc:
            outcome = ("rejected", exc)
        except BaseException as exc:  # anything else is a failure the test reports
            outcome = ("error", exc)
        with lock:
            results.append((outcome[0], outcome[1], time.monotonic() - began))

    threads = [threading.Thread(target=attempt, daemon=True) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(WAIT * 2)
        assert not any(thread.is_alive() for thread in threads), "a connection attempt hung"
        kinds = [kind for kind, _, _ in results]
        errors = [value for kind, value, _ in results if kind == "error"]
        assert errors == []
        assert kinds.count("joined") == limit
        assert kinds.count("rejected") == attempts - limit
        slowest_rejection = max(elapsed for kind, _, elapsed in results if kind == "rejected")
        assert slowest_rejection < 5.0, f"a rejection took {slowest_rejection:.2f} s"
        wait_until(lambda: len(server.get_all_clients()) == limit, timeout=WAIT)
        assert len(joins) == limit
    finally:
        for kind, value, _ in results:
            if kind == "joined":
                value.close()


def test_max_connections_frees_a_slot_when_a_client_leaves(make_server, make_client):
    server = make_server(max_connections=3)
    server.start()
    members = [make_client(server) for _ in range(3)]
    with pytest.raises(hisock_gevent.ConnectionRejected):
        make_client(server)
    members[0].close()
    wait_until(lambda: len(server.get_all_clients()) == 2, timeout=WAIT)
    late = wait_until(lambda: _try_connect(server, make_client), timeout=WAIT)
    assert late is not None
    wait_until(lambda: len(server.get_all_clients()) == 3, timeout=WAIT)


def _try_connect(server: Any, make_client: Any) -> Optional[hisock_gevent.HiSockClient]:
    try:
        return make_client(server)
    except hisock_gevent.ConnectionRejected:
        return None


# ---------------------------------------------------------------- port probes


def test_port_probes_interleaved_with_real_clients_cost_them_nothing_and_never_join(server, make_client):
    probes = 200
    talkers = 4
    rounds = 100
    joins: List[Any] = []
    leaves: List[Any] = []
    server.on("join")(joins.append)
    server.on("leave")(leaves.append)

    @server.on("echo")
    def echo(client, content):
        server.send_client(client, "echoed", content)

    clients = [make_client(server, name=f"talker-{n}") for n in range(talkers)]
    wait_until(lambda: len(joins) == talkers, timeout=WAIT)
    probe_errors: List[BaseException] = []
    probes_done = threading.Event()

    def probe_all() -> None:
        try:
            for index in range(probes):
                probe = socket.create_connection(server.get_addr(), timeout=WAIT)
                if index % 3 == 0:
                    # Abortive close (RST) as some scanners do.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif index % 3 == 1:
                    probe.sendall(b"12")  # half a header, then gone
                probe.close()
        except BaseException as exc:
            probe_errors.append(exc)
        finally:
            probes_done.set()

    prober = threading.Thread(target=probe_all, daemon=True)
    prober.start()
    for index in range(rounds):
        for n, client in enumerate(clients):
            client.send("echo", [n, index])
        for n, client in enumerate(clients):
            assert client.recv("echoed", timeout=WAIT) == [n, index]
    assert probes_done.wait(WAIT * 2)
    prober.join(WAIT)
    assert probe_errors == []

    assert len(joins) == talkers
    assert leaves == []
    assert sorted(server.get_all_clients("name")) == sorted(f"talker-{n}" for n in range(talkers))
    # Still accepting and serving afterwards.
    newcomer = make_client(server, name="newcomer")
    newcomer.send("echo", "after")
    assert newcomer.recv("echoed", timeout=WAIT) == "after"
    assert len(joins) == talkers + 1


# ---------------------------------------------------------------- slow readers


def test_client_that_never_reads_does_not_delay_broadcasts_to_the_others(make_server, make_client, raw):
    # Room for everything the sloth leaves unread (~25 MiB): it stays, queued, in nobody's way.
    server = make_server(max_queue_bytes=64 * 1024 * 1024)
    server.start()
    broadcasts = 400
    size = 64 * 1024
    readers = 3
    received: Dict[int, List[int]] = {n: [] for n in range(readers)}
    done = [threading.Event() for _ in range(readers)]
    lock = threading.Lock()

    slow = raw(server, name="sloth", rcvbuf=4096, timeout=WAIT)
    slow.read_message()  # its own $CLTCONN$: joined; it reads nothing from now on

    for n in range(readers):
        client = make_client(server, name=f"reader-{n}", threaded=True)

        def on_big(content, n=n):
            with lock:
                received[n].append(int(content[:8]) if len(content) == size else -1)
                if len(received[n]) == broadcasts:
                    done[n].set()

        client.on("big")(on_big)
        client.start()
    wait_until(lambda: len(server.get_all_clients()) == readers + 1, timeout=WAIT)

    started = time.monotonic()
    for index in range(broadcasts):
        server.send_all_clients("big", b"%08d" % index + b"." * (size - 8))
    sending_took = time.monotonic() - started
    for event in done:
        assert event.wait(30), "a reader did not get every broadcast"
    all_took = time.monotonic() - started

    with lock:
        assert all(values == list(range(broadcasts)) for values in received.values())
    # ~25 MiB went to the sloth, far beyond what the kernel buffers; it is still queued, not
    # in anyone's way.
    assert sending_took < 10.0, f"queueing {broadcasts} broadcasts took {sending_took:.2f} s"
    assert all_took < 20.0, f"the readers needed {all_took:.2f} s"
    assert "sloth" in server.get_all_clients("name")


def test_client_that_never_reads_is_dropped_past_max_queue_bytes_and_the_others_carry_on(make_server, make_client, raw):
    server = make_server(max_queue_bytes=1024 * 1024)
    leaves: List[Any] = []
    left = threading.Event()

    @server.on("leave")
    def on_leave(client):
        leaves.append(client.name)
        left.set()

    server.start()
    slow = raw(server, name="sloth", rcvbuf=4096, timeout=WAIT)
    slow.read_message()
    # A reader that keeps reading: a threaded client, dispatching on its own thread.
    reader = make_client(server, name="reader", threaded=True)
    got: List[int] = []
    all_in = threading.Event()
    broadcasts = 100

    @reader.on("big")
    def on_big(content):
        got.append(content[0])
        if len(got) == broadcasts:
            all_in.set()

    reader.start()
    wait_until(lambda: len(server.get_all_clients()) == 2, timeout=WAIT)

    payload = b"." * (64 * 1024)
    for index in range(broadcasts):
        server.send_all_clients("big", [index, payload])
    assert left.wait(WAIT), "the sloth was never dropped"
    assert all_in.wait(WAIT), f"the reader got {len(got)} of {broadcasts}"
    assert got == list(range(broadcasts))
    assert leaves == ["sloth"]
    assert server.get_all_clients("name") == ["reader"]
