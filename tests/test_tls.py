"""TLS end to end: servers and clients on ``ssl_context=`` or ``certfile``/``cafile``, over loopback.

A throwaway CA and a certificate for 127.0.0.1 are made with trustme at test time.
Servers are ThreadedHiSockServer on their own OS thread; clients are HiSockClient pumped
from the test thread, ThreadedHiSockClient, or raw stdlib (TLS) sockets written by hand
where the wire itself is under test.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any, Callable, Iterator, List, Tuple

import pytest
import trustme
from conftest import LOOPBACK, wait_until
from rawpeer import HEADER_LEN, RawPeer, hello_body, install_echo, sync, wire_frame

import hisock_gevent
from hisock_gevent import (
    ClientDisconnected,
    ClientInfo,
    ConnectionRejected,
    HiSockClient,
    ThreadedHiSockClient,
)
from hisock_gevent.errors import TLSError

pytestmark = pytest.mark.timeout(60)

#: A failure is "prompt" when it comes well inside the default 10 s answer timeout.
PROMPT = 3.0
TWO_MIB = 2 * 1024 * 1024


# ------------------------------------------------------------------ certificates


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def client_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("client@example.org")


@pytest.fixture
def server_ctx(server_cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def pem_files(tmp_path: Any, ca: trustme.CA, server_cert: trustme.LeafCert, client_cert: trustme.LeafCert) -> dict:
    """PEM files on disk: the CA, the server's key+chain, the client's key+chain."""
    paths = {
        "ca": str(tmp_path / "ca.pem"),
        "server": str(tmp_path / "server.pem"),
        "client": str(tmp_path / "client.pem"),
        "client_cert": str(tmp_path / "client-cert.pem"),
        "client_key": str(tmp_path / "client-key.pem"),
    }
    ca.cert_pem.write_to_path(paths["ca"])
    server_cert.private_key_and_cert_chain_pem.write_to_path(paths["server"])
    client_cert.private_key_and_cert_chain_pem.write_to_path(paths["client"])
    for index, blob in enumerate(client_cert.cert_chain_pems):
        blob.write_to_path(paths["client_cert"], append=index > 0)
    client_cert.private_key_pem.write_to_path(paths["client_key"])
    return paths


@pytest.fixture
def tls_server(make_server: Callable[..., Any], server_ctx: ssl.SSLContext) -> Any:
    """A started TLS server with an ``echo`` command (answers the sender with its content)."""
    srv = make_server(ssl_context=server_ctx)
    install_echo(srv)
    srv.start()
    return srv


# ------------------------------------------------------------------ helpers


class RawTLSPeer(RawPeer):
    """A HiSock 3.x-style peer on a blocking stdlib TLS socket (no library framing)."""

    def __init__(self, addr: Tuple[str, int], ctx: ssl.SSLContext, timeout: float = 5.0):
        super().__init__(addr, timeout=timeout, wrap=lambda sock: ctx.wrap_socket(sock, server_hostname=addr[0]))


@pytest.fixture
def raw_tls(client_ctx: ssl.SSLContext) -> Iterator[Callable[..., RawTLSPeer]]:
    peers: List[RawTLSPeer] = []

    def connect(server: Any) -> RawTLSPeer:
        peer = RawTLSPeer(server.get_addr(), client_ctx)
        peers.append(peer)
        return peer

    yield connect
    for peer in peers:
        peer.close()


def tls_hint_records(caplog: Any, level: int = logging.WARNING) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= level and "TLS" in r.getMessage()]


# ------------------------------------------------------------------ the public face


def test_tls_error_is_exported_by_the_package():
    """The brief and the client's docstring name ``hisock_gevent.TLSError``; users catch it from the package."""
    assert hisock_gevent.TLSError is TLSError
    assert issubclass(hisock_gevent.TLSError, hisock_gevent.HiSockError)
    assert "TLSError" in hisock_gevent.__all__


# ------------------------------------------------------------------ round trips


def test_small_message_round_trips_both_ways_over_tls(tls_server, make_client, client_ctx, recorder):
    seen = recorder()
    tls_server.on("note")(lambda client, content: seen(content))
    client = make_client(tls_server, "alice", ssl_context=client_ctx)
    client.send("note", "hello over TLS")
    assert seen.wait_for(1) == ["hello over TLS"]
    tls_server.send_client(client.get_client_addr(), "note", {"n": [1, 2.5, "x", None, True]})
    assert client.recv("note", timeout=5) == {"n": [1, 2.5, "x", None, True]}


def test_two_mib_bytes_round_trip_both_ways_over_tls(tls_server, make_client, client_ctx):
    payload = os.urandom(TWO_MIB)
    client = make_client(tls_server, "big", ssl_context=client_ctx)
    client.send("echo", payload)
    echoed = client.recv("echo", timeout=20)
    assert type(echoed) is bytes and len(echoed) == TWO_MIB and echoed == payload


def test_several_large_messages_in_a_row_arrive_in_order_over_tls(tls_server, make_client, client_ctx):
    payloads = [bytes([i]) * (512 * 1024 + i) for i in range(4)]
    client = make_client(tls_server, "burst", ssl_context=client_ctx)
    for payload in payloads:
        client.send("echo", payload)
    for payload in payloads:
        assert client.recv("echo", timeout=20) == payload


def test_message_sent_by_join_handler_reaches_the_tls_client(make_server, make_client, server_ctx, client_ctx):
    """The join handler's message may share a TLS record with the hello's answer; it must not be lost."""
    srv = make_server(ssl_context=server_ctx)

    @srv.on("join")
    def join(client: ClientInfo) -> None:
        srv.send_client(client, "welcome", f"hi {client.name}")

    srv.start()
    client = make_client(srv, "newbie", ssl_context=client_ctx)
    assert client.recv("welcome", timeout=5) == "hi newbie"


def test_broadcast_reaches_every_tls_client(tls_server, make_client, client_ctx):
    clients = [make_client(tls_server, f"c{i}", "room", ssl_context=client_ctx) for i in range(4)]
    wait_until(lambda: len(tls_server.get_all_clients()) == 4)
    tls_server.send_all_clients("news", ["everyone", 1])
    tls_server.send_group("room", "room-news", b"\x00" * 70_000)
    for client in clients:
        assert client.recv("news", timeout=5) == ["everyone", 1]
        assert client.recv("room-news", timeout=5) == b"\x00" * 70_000


def test_threaded_client_over_tls_handles_messages_and_sends(tls_server, make_client, client_ctx, recorder):
    got = recorder()
    client = make_client(tls_server, "bg", threaded=True, ssl_context=client_ctx)
    assert isinstance(client, ThreadedHiSockClient)
    client.on("echo")(lambda content: got(content))
    client.start()
    big = os.urandom(300_000)
    client.send("echo", "first")
    client.send("echo", big)
    assert got.wait_for(2, timeout=10) == ["first", big]
    tls_server.send_client(client.get_client_addr(), "echo", "pushed")
    assert got.wait_for(3)[2] == "pushed"


def test_client_made_on_one_thread_keeps_its_tls_session_on_another(tls_server, client_ctx):
    """The handshake runs in the constructor; the session must carry on in whichever hub adopts the socket."""
    made: List[Any] = []
    maker = threading.Thread(target=lambda: made.append(HiSockClient(tls_server.get_addr(), "moved", ssl_context=client_ctx)))
    maker.start()
    maker.join(10)
    assert made and isinstance(made[0], HiSockClient)
    client = made[0]
    try:
        sync(client, "after the move")
        sync(client, os.urandom(100_000))
    finally:
        client.close()


def test_connect_function_accepts_ssl_context(tls_server, client_ctx):
    client = hisock_gevent.connect(tls_server.get_addr(), "fn", ssl_context=client_ctx)
    try:
        sync(client)
    finally:
        client.close()


def test_tls_client_leaving_runs_leave_and_others_hear_of_it(tls_server, make_client, client_ctx, recorder):
    left = recorder()
    tls_server.on("leave")(lambda client: left(client.name))
    gone = recorder()
    watcher = make_client(tls_server, "watcher", ssl_context=client_ctx)
    watcher.on("client_disconnect")(lambda client: gone(client.name))
    leaver = make_client(tls_server, "leaver", ssl_context=client_ctx)
    leaver.close()
    assert left.wait_for(1) == ["leaver"]
    # The watcher dispatches while it waits for its own echo.
    sync(watcher)
    assert gone.wait_for(1) == ["leaver"]


# ------------------------------------------------------------------ mismatches


def test_plain_client_against_tls_server_is_rejected_promptly_mentioning_tls(tls_server, make_client, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    started = time.monotonic()
    with pytest.raises(ConnectionRejected, match="TLS"):
        make_client(tls_server, "plain")
    assert time.monotonic() - started < PROMPT
    records = wait_until(lambda: tls_hint_records(caplog))
    assert all(r.levelno == logging.WARNING for r in records)
    assert not tls_server.get_all_clients()


def test_tls_client_against_plain_server_fails_promptly_and_server_hints_at_tls(server, make_client, client_ctx, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    started = time.monotonic()
    with pytest.raises((TLSError, ConnectionRejected)):
        make_client(server, "tls", ssl_context=client_ctx)
    assert time.monotonic() - started < PROMPT
    records = wait_until(lambda: tls_hint_records(caplog))
    assert any("TLS" in r.getMessage() for r in records)
    assert not server.get_all_clients()


def test_client_not_trusting_the_ca_fails_with_certificate_verify_failed(tls_server, make_client, caplog):
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    other = trustme.CA()
    other.configure_trust(untrusting)
    started = time.monotonic()
    with pytest.raises(TLSError, match="(?i)certificate verify failed"):
        make_client(tls_server, "wary", ssl_context=untrusting)
    assert time.monotonic() - started < PROMPT
    assert not tls_server.get_all_clients()


def test_client_with_a_cafile_of_another_ca_fails(tls_server, make_client, tmp_path):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(TLSError, match="(?i)certificate verify failed"):
        make_client(tls_server, "wary", cafile=str(other))


def test_wrong_server_hostname_fails_verification(tls_server, make_client, client_ctx):
    with pytest.raises(TLSError, match="(?i)certificate verify failed|hostname|mismatch"):
        make_client(tls_server, "wrong-name", ssl_context=client_ctx, server_hostname="not-this-server.example")


def test_server_hostname_matching_another_name_in_the_cert_works(tls_server, make_client, client_ctx):
    client = make_client(tls_server, "by-name", ssl_context=client_ctx, server_hostname="localhost")
    sync(client)


@pytest.mark.slow
def test_silent_tcp_peer_on_tls_port_is_dropped_after_handshake_timeout_and_blocks_nobody(
    make_server, make_client, server_ctx, client_ctx, caplog
):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    srv = make_server(ssl_context=server_ctx, handshake_timeout=0.5)
    install_echo(srv)
    srv.start()
    silent = socket.create_connection(srv.get_addr(), timeout=5)
    try:
        # Others connect and talk while the silent peer holds its handshake open.
        client = make_client(srv, "busy", ssl_context=client_ctx)
        sync(client)
        started = time.monotonic()
        silent.settimeout(5)
        try:
            assert silent.recv(1024) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 3
        sync(client, "still here")
    finally:
        silent.close()


@pytest.mark.slow
def test_tls_peer_that_never_says_hello_is_dropped_after_handshake_timeout(make_server, server_ctx, raw_tls, recorder):
    srv = make_server(ssl_context=server_ctx, handshake_timeout=0.5)
    joined = recorder()
    srv.on("join")(lambda client: joined(client.name))
    srv.start()
    mute = raw_tls(srv)  # the TLS handshake completes in the constructor
    started = time.monotonic()
    with pytest.raises((EOFError, ConnectionResetError, ssl.SSLError)):
        mute.read_frame(timeout=5)
    assert time.monotonic() - started < 3
    assert joined.items == []


def test_server_close_sends_disconn_to_tls_clients_after_their_queued_messages(make_server, server_ctx, client_ctx, recorder):
    srv = make_server(ssl_context=server_ctx)
    srv.start()
    events = recorder()
    client = ThreadedHiSockClient(srv.get_addr(), "tls-reader", ssl_context=client_ctx)
    client.on("n")(lambda content: events(content))
    client.on("force_disconnect")(lambda: events("force_disconnect"))
    client.start()
    try:
        wait_until(lambda: srv.get_all_clients("name") == ["tls-reader"])
        for index in range(50):
            srv.send_client("tls-reader", "n", [index, b"\x00" * 20_000])
        srv.close(timeout=10)
        got = events.wait_for(51, timeout=15)
        assert [item[0] for item in got[:50]] == list(range(50))
        assert got[50] == "force_disconnect"
    finally:
        client.close()


def test_corrupt_tls_record_after_join_drops_only_that_client(tls_server, make_client, client_ctx, recorder, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    left = recorder()
    tls_server.on("leave")(lambda client: left(client.name))
    good = make_client(tls_server, "good", ssl_context=client_ctx)
    # A raw TLS session driven through memory buffers, so garbage can follow the handshake.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx.wrap_bio(incoming, outgoing, server_hostname=LOOPBACK)
    sock = socket.create_connection(tls_server.get_addr(), timeout=5)
    try:
        for _ in range(20):  # bounded: TLS 1.3 needs two flights
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        obj.write(wire_frame(hello_body("corrupt")))
        sock.sendall(outgoing.read())
        wait_until(lambda: "corrupt" in tls_server.get_all_clients("name"))
        # An application-data record whose contents are not what the session encrypted.
        sock.sendall(b"\x17\x03\x03\x00\x40" + os.urandom(0x40))
        assert left.wait_for(1) == ["corrupt"]
    finally:
        sock.close()
    sync(good)
    assert tls_server.get_all_clients("name") == ["good"]
    assert any("TLS" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)


def test_client_hearing_corrupt_tls_records_from_the_server_closes(server_cert, client_ctx):
    """A hand-made TLS server answers the hello, then sends garbage: the client ends, it does not hang."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(10)
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(sctx)
    done = threading.Event()
    constructed = threading.Event()

    def serve() -> None:
        conn, addr = listener.accept()
        tls = sctx.wrap_socket(conn, server_side=True)
        with tls:
            tls.settimeout(10)
            data = b""
            while len(data) < HEADER_LEN or len(data) < HEADER_LEN + int(data[:HEADER_LEN]):
                chunk = tls.recv(65536)
                if not chunk:
                    return
                data += chunk
            info = {"ip": [addr[0], addr[1]], "name": "x", "group": None, "ipstr": f"{addr[0]}:{addr[1]}"}
            tls.sendall(wire_frame(b"$CLTCONN$" + json.dumps(info).encode()))
            constructed.wait(10)
            # Raw bytes under the TLS layer: a record the client cannot decrypt.
            os.write(tls.fileno(), b"\x17\x03\x03\x00\x40" + os.urandom(0x40))
            done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = HiSockClient(listener.getsockname()[:2], "x", ssl_context=client_ctx)
    constructed.set()
    try:
        started = time.monotonic()
        with pytest.raises(ClientDisconnected):
            client.recv(timeout=5)
        assert time.monotonic() - started < PROMPT
    finally:
        done.set()
        client.close()
        thread.join(5)
        listener.close()


# ------------------------------------------------------------------ certificates from files, mutual TLS


def test_server_certfile_and_keyfile_arguments_serve_tls(make_server, make_client, pem_files, server_cert, tmp_path):
    key = tmp_path / "server-key.pem"
    chain = tmp_path / "server-chain.pem"
    server_cert.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(server_cert.cert_chain_pems):
        blob.write_to_path(str(chain), append=index > 0)
    srv = make_server(certfile=str(chain), keyfile=str(key))
    install_echo(srv)
    srv.start()
    assert srv.ssl_context is not None
    client = make_client(srv, "files", cafile=pem_files["ca"])
    sync(client, b"over a server built from PEM files")


def test_server_certfile_holding_key_and_chain_serves_tls(make_server, make_client, pem_files):
    srv = make_server(certfile=pem_files["server"])
    install_echo(srv)
    srv.start()
    client = make_client(srv, "one-file", cafile=pem_files["ca"])
    sync(client)


def test_plain_client_against_certfile_server_is_rejected(make_server, make_client, pem_files):
    srv = make_server(certfile=pem_files["server"])
    srv.start()
    with pytest.raises(ConnectionRejected, match="TLS"):
        make_client(srv, "plain")


@pytest.fixture
def mtls_server(make_server: Callable[..., Any], server_cert: trustme.LeafCert, pem_files: dict) -> Any:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=pem_files["ca"])
    srv = make_server(ssl_context=ctx)
    install_echo(srv)
    return srv


def test_mutual_tls_with_client_certfile_and_keyfile_works(mtls_server, make_client, pem_files, recorder):
    joined = recorder()
    mtls_server.on("join")(lambda client: joined(client.name))
    mtls_server.start()
    client = make_client(
        mtls_server, "certified", cafile=pem_files["ca"], certfile=pem_files["client_cert"], keyfile=pem_files["client_key"]
    )
    sync(client, os.urandom(200_000))
    assert joined.wait_for(1) == ["certified"]


def test_mutual_tls_with_client_certfile_holding_the_key_works(mtls_server, make_client, pem_files):
    mtls_server.start()
    client = make_client(mtls_server, "one-file", cafile=pem_files["ca"], certfile=pem_files["client"])
    sync(client)


def test_mutual_tls_with_client_ssl_context_works(mtls_server, make_client, client_ctx, client_cert):
    mtls_server.start()
    client_cert.configure_cert(client_ctx)
    client = make_client(mtls_server, "ctx", ssl_context=client_ctx)
    sync(client)


def test_mutual_tls_without_a_client_certificate_is_refused(mtls_server, make_client, pem_files, recorder, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    joined = recorder()
    mtls_server.on("join")(lambda client: joined(client.name))
    mtls_server.start()
    started = time.monotonic()
    with pytest.raises((TLSError, ConnectionRejected)):
        make_client(mtls_server, "anonymous", cafile=pem_files["ca"])
    assert time.monotonic() - started < PROMPT
    # A certified client still gets in, and it is the only one that ever joined.
    client = make_client(mtls_server, "certified", cafile=pem_files["ca"], certfile=pem_files["client"])
    sync(client)
    assert joined.wait_for(1) == ["certified"]
    assert mtls_server.get_all_clients("name") == ["certified"]
    assert wait_until(lambda: tls_hint_records(caplog))


def test_mutual_tls_with_a_certificate_from_another_ca_is_refused(mtls_server, make_client, client_ctx):
    mtls_server.start()
    stranger = trustme.CA().issue_cert("stranger@example.org")
    stranger.configure_cert(client_ctx)
    with pytest.raises((TLSError, ConnectionRejected)):
        make_client(mtls_server, "stranger", ssl_context=client_ctx)
    assert not mtls_server.get_all_clients()


# ------------------------------------------------------------------ keepalive


@pytest.mark.slow
def test_keepalive_over_tls_keeps_an_answering_client_and_drops_a_silent_one(
    make_server, make_client, server_ctx, client_ctx, raw_tls, recorder
):
    srv = make_server(ssl_context=server_ctx, keepalive=True, keepalive_interval=0.2, keepalive_timeout=0.5)
    install_echo(srv)
    left = recorder()
    srv.on("leave")(lambda client: left(client.name))
    srv.start()
    alive = make_client(srv, "alive", threaded=True, ssl_context=client_ctx)
    alive.start()
    # A raw TLS peer that reads and answers keepalives by hand: it counts the rounds.
    counter = raw_tls(srv)
    counter.send_frame(hello_body("counter"))
    silent = raw_tls(srv)
    silent.send_frame(hello_body("silent"))
    wait_until(lambda: len(srv.get_all_clients()) == 3)
    rounds = 0
    for _ in range(200):  # bounded: a handful of frames per round at most
        body = counter.read_frame()
        if body == b"$KEEPALIVE$":
            counter.send_frame(b"$KEEPACK$")
            rounds += 1
            if rounds >= 6:
                break
    assert rounds >= 6
    # The silent peer went long ago; the threaded client answered every round by itself.
    assert left.wait_for(1) == ["silent"]
    assert sorted(srv.get_all_clients("name")) == ["alive", "counter"]
    assert left.items == ["silent"]
    got = recorder()
    alive.on("echo")(lambda content: got(content))
    alive.send("echo", "still alive")
    assert got.wait_for(1) == ["still alive"]


# ------------------------------------------------------------------ closing


@pytest.mark.slow
def test_closing_a_tls_server_leaves_no_greenlets_even_with_handshakes_in_flight(server_ctx, client_ctx):
    import gc

    import gevent

    def live() -> set:
        gc.collect()
        return {id(g) for g in gc.get_objects() if isinstance(g, gevent.Greenlet) and not g.dead}

    before = live()
    srv = hisock_gevent.ThreadedHiSockServer((LOOPBACK, 0), ssl_context=server_ctx, handshake_timeout=30)
    srv.start()
    silent = [socket.create_connection(srv.get_addr(), timeout=5) for _ in range(3)]  # no ClientHello
    half = socket.create_connection(srv.get_addr(), timeout=5)
    half.sendall(b"\x16\x03\x01\x00\xff")  # a TLS record header, then nothing
    client = ThreadedHiSockClient(srv.get_addr(), "tls", ssl_context=client_ctx)
    client.start()
    try:
        wait_until(lambda: srv.get_all_clients("name") == ["tls"])
        started = time.monotonic()
        srv.close(timeout=1)
        assert time.monotonic() - started < 5
    finally:
        client.close()
        for sock in silent + [half]:
            sock.close()
    wait_until(lambda: not [t for t in threading.enumerate() if t.name == "hisock-server" and t.is_alive()])
    leaked = live() - before
    assert not leaked, [repr(g) for g in gc.get_objects() if id(g) in leaked]
    with pytest.raises(hisock_gevent.ServerNotRunning):
        HiSockClient(srv.get_addr(), "late", ssl_context=client_ctx)
