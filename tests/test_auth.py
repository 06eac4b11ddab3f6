"""Authentication: ``HiSockServer(authenticate=check)`` against ``connect(..., auth=...)``.

``check(client_info, credentials) -> bool`` runs on each hello, before ``join``.  An
accepted client joins as usual; a refused one gets ``$DISCONN$`` (with a reason when it
is a hisock_gevent client, bare for a plain HiSock peer) and nobody else hears of it.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import pytest
import trustme
from conftest import LOOPBACK, wait_until
from rawpeer import HEADER_LEN, cmd_body, hello_body, install_echo, sync, wire_frame

import hisock_gevent
from hisock_gevent import ClientInfo, ConnectionRejected, HiSockClient
from hisock_gevent.errors import AuthenticationFailed

pytestmark = pytest.mark.timeout(60)

PROMPT = 3.0
SECRET = "open sesame"


# ------------------------------------------------------------------ helpers


class Checker:
    """An authentication check that records every call and accepts ``SECRET`` (or a given rule)."""

    def __init__(self, rule: Optional[Callable[[ClientInfo, Any], Any]] = None):
        self.calls: List[Tuple[ClientInfo, Any]] = []
        self.rule = rule or (lambda info, credentials: credentials == SECRET)
        self._lock = threading.Lock()

    def __call__(self, info: ClientInfo, credentials: Any) -> Any:
        with self._lock:
            self.calls.append((info, credentials))
        return self.rule(info, credentials)


@pytest.fixture
def checker() -> Checker:
    return Checker()


@pytest.fixture
def auth_server(make_server: Callable[..., Any], checker: Checker, recorder: Any) -> Any:
    """A started server with ``authenticate=checker`` that records join/leave names."""
    srv = make_server(authenticate=checker)
    srv.joined = recorder()
    srv.left = recorder()
    srv.on("join")(lambda client: srv.joined(client.name))
    srv.on("leave")(lambda client: srv.left(client.name))
    install_echo(srv)
    srv.start()
    return srv


def observer_events(server: Any, observer: HiSockClient, marker: str = "marker") -> List[Tuple[str, Optional[str]]]:
    """Everything the observer heard about other clients, up to a marker the server sends it now.

    The server writes to the observer in order, so anything it said about a refused client
    would be dispatched before the marker is received.
    """
    server.send_client(observer.get_client_addr(), marker, marker)
    assert observer.recv(marker, timeout=5) == marker
    return list(observer.events)


def make_observer(make_client: Callable[..., HiSockClient], server: Any, **kwargs: Any) -> HiSockClient:
    observer = make_client(server, "observer", auth=SECRET, **kwargs)
    observer.events = []
    observer.on("client_connect")(lambda client: observer.events.append(("connect", client.name)))
    observer.on("client_disconnect")(lambda client: observer.events.append(("disconnect", client.name)))
    observer.on("*")(lambda command, content: observer.events.append((command, content)))
    return observer


# ------------------------------------------------------------------ the public face


def test_authentication_failed_is_exported_and_is_a_connection_rejected():
    assert issubclass(AuthenticationFailed, ConnectionRejected)
    assert hisock_gevent.AuthenticationFailed is AuthenticationFailed
    assert "AuthenticationFailed" in hisock_gevent.__all__


# ------------------------------------------------------------------ accepted


def test_accepted_client_joins_and_talks(auth_server, make_client, checker):
    client = make_client(auth_server, "alice", "team", auth=SECRET)
    sync(client)
    assert auth_server.joined.wait_for(1) == ["alice"]
    assert auth_server.get_all_clients("name") == ["alice"]


def test_check_sees_address_name_group_and_credentials(auth_server, make_client, checker):
    client = make_client(auth_server, "alice", "team", auth=SECRET)
    assert len(checker.calls) == 1
    info, credentials = checker.calls[0]
    assert isinstance(info, ClientInfo)
    assert info.ip == client.get_client_addr()
    assert info.ipstr == f"{client.get_client_addr()[0]}:{client.get_client_addr()[1]}"
    assert info.name == "alice"
    assert info.group == "team"
    assert credentials == SECRET


def test_check_runs_before_join(make_server, make_client):
    order: List[str] = []
    srv = make_server(authenticate=lambda info, credentials: order.append("check") or True)
    srv.on("join")(lambda client: order.append("join"))
    install_echo(srv)
    srv.start()
    sync(make_client(srv, "x"))
    wait_until(lambda: len(order) == 2)
    assert order == ["check", "join"]


def test_client_without_auth_passes_none_to_the_check(make_server, make_client):
    checker = Checker(lambda info, credentials: credentials is None)
    srv = make_server(authenticate=checker)
    srv.start()
    make_client(srv, "anon")
    assert checker.calls[0][1] is None


@pytest.mark.parametrize(
    "credentials",
    [
        "token-123",
        "ünïcødé ✓ 🔑",
        "",
        42,
        -1.5,
        True,
        ["user", "password", 3],
        {"user": "alice", "password": "s3cret", "scopes": ["read", "write"], "meta": {"n": 1, "ok": False, "x": None}},
        [{"a": [1, [2, [3, {"deep": "yes"}]]]}],
    ],
    ids=["str", "unicode", "empty-str", "int", "float", "bool", "list", "dict", "nested"],
)
def test_credentials_arrive_intact(make_server, make_client, credentials):
    checker = Checker(lambda info, got: True)
    srv = make_server(authenticate=checker)
    install_echo(srv)
    srv.start()
    client = make_client(srv, "c", auth=credentials)
    sync(client)
    got = checker.calls[0][1]
    assert got == credentials and type(got) is type(credentials)


def test_truthy_non_bool_answer_accepts_and_falsy_refuses(make_server, make_client):
    srv = make_server(authenticate=lambda info, credentials: credentials)
    srv.start()
    make_client(srv, "yes", auth=[1])
    with pytest.raises(AuthenticationFailed):
        make_client(srv, "no", auth=[])
    assert srv.get_all_clients("name") == ["yes"]


def test_check_can_decide_by_name_and_group(make_server, make_client):
    srv = make_server(authenticate=lambda info, credentials: info.group == "staff" and credentials == info.name[::-1])
    srv.start()
    make_client(srv, "bob", "staff", auth="bob"[::-1])
    with pytest.raises(AuthenticationFailed):
        make_client(srv, "eve", "guests", auth="eve"[::-1])
    with pytest.raises(AuthenticationFailed):
        make_client(srv, "mallory", "staff", auth="wrong")
    assert srv.get_all_clients("name") == ["bob"]


# ------------------------------------------------------------------ refused


def test_refused_client_raises_authentication_failed_promptly(auth_server, make_client):
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed) as caught:
        make_client(auth_server, "mallory", auth="guess")
    assert time.monotonic() - started < PROMPT
    assert isinstance(caught.value, ConnectionRejected)
    assert "authentication" in str(caught.value).lower()


def test_refused_client_without_any_auth_raises_authentication_failed(auth_server, make_client):
    with pytest.raises(AuthenticationFailed):
        make_client(auth_server, "nobody")


def test_refused_threaded_client_raises_from_its_constructor(auth_server, make_client):
    with pytest.raises(AuthenticationFailed):
        make_client(auth_server, "mallory", threaded=True, auth="guess")


def test_connect_function_raises_authentication_failed_where_the_answer_is_awaited(auth_server):
    client = hisock_gevent.connect(auth_server.get_addr(), "mallory", auth="guess")
    with pytest.raises(AuthenticationFailed):
        client.wait_joined()
    with pytest.raises(AuthenticationFailed):
        client.recv(timeout=5)
    client.close()


def test_join_and_leave_never_run_for_a_refused_client(auth_server, make_client):
    with pytest.raises(AuthenticationFailed):
        make_client(auth_server, "mallory", auth="guess")
    # An accepted client afterwards: its join (and its leave) are the only ones.
    client = make_client(auth_server, "alice", auth=SECRET)
    sync(client)
    client.close()
    assert auth_server.left.wait_for(1) == ["alice"]
    assert auth_server.joined.items == ["alice"]
    assert auth_server.left.items == ["alice"]


def test_refused_client_is_never_in_the_client_list(auth_server, make_client):
    for attempt in range(5):
        with pytest.raises(AuthenticationFailed):
            make_client(auth_server, f"mallory{attempt}", auth=attempt)
    assert auth_server.get_all_clients() == []


def test_no_other_client_hears_of_a_refused_client(auth_server, make_client):
    observer = make_observer(make_client, auth_server)
    assert observer_events(auth_server, observer, "m0") == [("connect", "observer")]
    with pytest.raises(AuthenticationFailed):
        make_client(auth_server, "mallory", auth="guess")
    assert observer_events(auth_server, observer, "m1") == [("connect", "observer")]
    # Positive control: an accepted client is heard of, coming and going.
    accepted = make_client(auth_server, "alice", auth=SECRET)
    accepted.close()
    auth_server.left.wait_for(1)
    assert observer_events(auth_server, observer, "m2") == [
        ("connect", "observer"),
        ("connect", "alice"),
        ("disconnect", "alice"),
    ]


def test_raw_observer_gets_no_cltconn_for_a_refused_client(auth_server, make_client, raw):
    observer = raw(auth_server)
    observer.send_frame(hello_body("raw-observer", auth=SECRET))
    assert observer.read_frame().startswith(b"$CLTCONN$")
    with pytest.raises(AuthenticationFailed):
        make_client(auth_server, "mallory", auth="guess")
    auth_server.send_client("raw-observer", "marker", "m")
    assert observer.read_frame() == cmd_body("marker", b"1s", b"m")


def test_plain_hisock_peer_refused_gets_exactly_a_bare_disconn(auth_server, raw):
    peer = raw(auth_server)
    peer.send_frame(hello_body("plain", None, auth="guess"))
    assert peer.read_until_eof() == wire_frame(b"$DISCONN$")


def test_hisock_gevent_peer_refused_gets_the_reason_after_disconn(auth_server, raw):
    peer = raw(auth_server)
    peer.send_frame(hello_body("capable", None, auth="guess", caps=["msgpack"]))
    data = peer.read_until_eof()
    body = data[HEADER_LEN:]
    assert data == wire_frame(body)
    assert body.startswith(b"$DISCONN$")
    assert "authentication" in json.loads(body[len(b"$DISCONN$") :])["reason"]


def test_plain_hisock_peer_accepted_gets_its_cltconn(auth_server, raw):
    peer = raw(auth_server)
    peer.send_frame(hello_body("plain", None, auth=SECRET))
    body = peer.read_frame()
    assert body.startswith(b"$CLTCONN$")
    assert json.loads(body[len(b"$CLTCONN$") :])["name"] == "plain"
    assert auth_server.joined.wait_for(1) == ["plain"]


def test_refused_client_messages_sent_after_its_hello_are_never_handled(auth_server, raw, recorder):
    heard = recorder()
    auth_server.on("*")(lambda client, command, content: heard((command, content)))
    peer = raw(auth_server)
    # Hello and a command in one write: the command must not be acted on.
    peer.sock.sendall(wire_frame(hello_body("sneaky", None, auth="guess")) + wire_frame(cmd_body("steal", b"4s", b"gold")))
    assert peer.read_until_eof() == wire_frame(b"$DISCONN$")
    honest = raw(auth_server)
    honest.sock.sendall(wire_frame(hello_body("honest", None, auth=SECRET)) + wire_frame(cmd_body("ask", b"2s", b"ok")))
    assert heard.wait_for(1) == [("ask", "ok")]
    assert auth_server.joined.items == ["honest"]


def test_check_that_raises_is_a_refusal_and_is_logged(make_server, make_client, recorder, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")

    def check(info: ClientInfo, credentials: Any) -> bool:
        if credentials == "boom":
            raise LookupError("the user database is down")
        return True

    srv = make_server(authenticate=check)
    joined = recorder()
    srv.on("join")(lambda client: joined(client.name))
    install_echo(srv)
    srv.start()
    with pytest.raises(AuthenticationFailed):
        make_client(srv, "unlucky", auth="boom")
    logged = wait_until(
        lambda: [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], LookupError)]
    )
    assert logged[0].levelno >= logging.ERROR
    # The server is fine afterwards.
    client = make_client(srv, "lucky", auth="fine")
    sync(client)
    assert joined.wait_for(1) == ["lucky"]
    assert srv.get_all_clients("name") == ["lucky"]


def test_check_failing_with_a_type_error_is_a_refusal(make_server, make_client):
    """A check raising something odd (here a TypeError from a bad comparison) is still a refusal."""
    srv = make_server(authenticate=lambda info, credentials: credentials["token"] == "t")
    install_echo(srv)
    srv.start()
    with pytest.raises(AuthenticationFailed):
        make_client(srv, "bad", auth=["not", "a", "dict"])
    sync(make_client(srv, "good", auth={"token": "t"}))


def test_refusal_is_logged_as_a_warning(auth_server, make_client, caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    with pytest.raises(AuthenticationFailed):
        make_client(auth_server, "mallory", auth="guess")
    records = wait_until(lambda: [r for r in caplog.records if "authentication" in r.getMessage()])
    assert records[0].levelno == logging.WARNING
    assert "mallory" in records[0].getMessage()


def test_many_refused_attempts_leave_the_server_serving(auth_server, make_client):
    good = make_client(auth_server, "good", auth=SECRET)
    for attempt in range(20):
        with pytest.raises(AuthenticationFailed):
            make_client(auth_server, f"bad{attempt}", auth=f"guess{attempt}")
    sync(good)
    assert auth_server.get_all_clients("name") == ["good"]
    assert auth_server.joined.items == ["good"]


def test_refused_clients_do_not_keep_max_connections_slots(make_server, make_client):
    srv = make_server(max_connections=1, authenticate=Checker())
    install_echo(srv)
    srv.start()
    for attempt in range(3):
        with pytest.raises(AuthenticationFailed):
            make_client(srv, f"mallory{attempt}", auth="guess")
    # The slot is free again (the refused connections are gone), within a short wait.
    client = wait_until(lambda: _try_connect(srv, "alice", SECRET, make_client))
    sync(client)
    assert srv.get_all_clients("name") == ["alice"]


def _try_connect(srv: Any, name: str, auth: Any, make_client: Callable[..., HiSockClient]) -> Optional[HiSockClient]:
    try:
        return make_client(srv, name, auth=auth)
    except AuthenticationFailed:
        raise
    except ConnectionRejected:
        return None


def test_plain_hisock_gevent_client_without_msgpack_is_still_refused(auth_server, make_client):
    """Without caps the server answers like to a HiSock 3.x peer: a bare $DISCONN$."""
    with pytest.raises(ConnectionRejected):
        make_client(auth_server, "old-style", auth="guess", use_msgpack=False)
    assert auth_server.get_all_clients() == []


def test_auth_that_json_cannot_carry_is_refused_on_the_calling_side(auth_server, make_client):
    """``auth`` is documented as anything JSON can carry: bytes are the caller's mistake."""
    with pytest.raises((TypeError, ValueError)):
        make_client(auth_server, "bytes", auth=b"\x00secret")
    assert auth_server.get_all_clients() == []
    assert auth_server.joined.items == []


# ------------------------------------------------------------------ with TLS


@pytest.fixture(scope="module")
def tls_pair() -> Tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


def test_authentication_over_tls_accepts_and_refuses(make_server, make_client, tls_pair, recorder):
    server_ctx, client_ctx = tls_pair
    checker = Checker(lambda info, credentials: credentials in (SECRET, {"secret": SECRET}))
    srv = make_server(ssl_context=server_ctx, authenticate=checker)
    joined = recorder()
    srv.on("join")(lambda client: joined(client.name))
    install_echo(srv)
    srv.start()
    observer = make_observer(make_client, srv, ssl_context=client_ctx)
    with pytest.raises(AuthenticationFailed):
        make_client(srv, "mallory", ssl_context=client_ctx, auth="guess")
    client = make_client(srv, "alice", ssl_context=client_ctx, auth={"secret": SECRET})
    with pytest.raises(AuthenticationFailed):
        make_client(srv, "mallory2", ssl_context=client_ctx, auth={"secret": "nope"})
    sync(client)
    assert observer_events(srv, observer) == [("connect", "observer"), ("connect", "alice")]
    assert joined.wait_for(2) == ["observer", "alice"]
    assert [info.name for info, _ in checker.calls] == ["observer", "mallory", "alice", "mallory2"]
    assert checker.calls[2][1] == {"secret": SECRET}


def test_authentication_over_tls_refusal_sends_a_bare_disconn_to_a_plain_peer(make_server, tls_pair):
    server_ctx, client_ctx = tls_pair
    srv = make_server(ssl_context=server_ctx, authenticate=Checker())
    srv.start()
    sock = client_ctx.wrap_socket(socket.create_connection(srv.get_addr(), timeout=5), server_hostname=LOOPBACK)
    try:
        sock.sendall(wire_frame(hello_body("plain-tls", None, auth="guess")))
        data = b""
        for _ in range(100):  # bounded
            try:
                chunk = sock.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
        assert data == wire_frame(b"$DISCONN$")
    finally:
        sock.close()
