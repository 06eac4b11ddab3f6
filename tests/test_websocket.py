"""The WebSocket transport (PROTOCOL.md section 10): the mapping with bytes alone, then
servers over real sockets, where WebSocket and TCP clients share one registry.

The WebSocket peers are ``tests/wspeer.py``: wsproto's client side on a blocking socket,
with hand-made HiSock bodies.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest
from conftest import LOOPBACK, Recorder, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wspeer import Rejected, WsPeer, cmd_body, hello_body, http_get
from wsproto import ConnectionType
from wsproto.connection import Connection as WsprotoConnection
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

import hisock_gevent
from hisock_gevent.config import ServerConfig
from hisock_gevent.errors import (
    MalformedMessage,
    MessageTooLarge,
    TextMessageRefused,
    WebSocketProtocolError,
)
from hisock_gevent.frames import frame
from hisock_gevent.websocket import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
    Rejection,
    Upgrade,
    WebSocketFrames,
    accept_token,
    binary_header,
    close_code_for,
    origin_problem,
    static_file,
    upgrade_verdict,
)
from hisock_gevent.ws_connection import message_pieces

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key


def upgrade_headers(**changes: str) -> dict:
    headers = {
        "host": "127.0.0.1:8081",
        "upgrade": "websocket",
        "connection": "keep-alive, Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": KEY,
    }
    headers.update({name.replace("_", "-"): value for name, value in changes.items()})
    return {name: value for name, value in headers.items() if value}


def client_side() -> WsprotoConnection:
    return WsprotoConnection(ConnectionType.CLIENT)


# ---------------------------------------------------------------------- the upgrade, with dicts


def test_an_upgrade_is_answered_with_the_accept_token_of_rfc_6455():
    verdict = upgrade_verdict("GET", upgrade_headers())
    assert verdict == Upgrade((("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")))
    assert accept_token(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("method", "changes", "status"),
    [
        ("POST", {}, "405 Method Not Allowed"),
        ("GET", {"upgrade": ""}, "426 Upgrade Required"),
        ("GET", {"upgrade": "h2c"}, "426 Upgrade Required"),
        ("GET", {"connection": "keep-alive"}, "400 Bad Request"),
        ("GET", {"sec_websocket_version": "8"}, "426 Upgrade Required"),
        ("GET", {"sec_websocket_key": ""}, "400 Bad Request"),
        ("GET", {"sec_websocket_key": "bm90IDE2IGJ5dGVz"}, "400 Bad Request"),
        ("GET", {"sec_websocket_key": "!!!!"}, "400 Bad Request"),
        ("GET", {"origin": "http://evil.example"}, "403 Forbidden"),
    ],
)
def test_a_bad_upgrade_is_refused_with_the_http_status_that_says_why(method, changes, status):
    verdict = upgrade_verdict(method, upgrade_headers(**changes))
    assert isinstance(verdict, Rejection) and verdict.status == status and verdict.reason


def test_a_wrong_version_is_told_the_version_the_server_speaks():
    verdict = upgrade_verdict("GET", upgrade_headers(sec_websocket_version="8"))
    assert ("Sec-WebSocket-Version", "13") in verdict.headers


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "127.0.0.1:8081", None, True),  # a program, not a page
        ("http://127.0.0.1:8081", "127.0.0.1:8081", None, True),  # the WebSocket's own page
        ("http://localhost:8081", "LOCALHOST:8081", None, True),
        ("https://example.com", "example.com", None, True),  # default ports on both sides
        ("http://example.com", "example.com:80", None, True),
        ("http://127.0.0.1:8000", "127.0.0.1:8081", None, False),  # another port
        ("http://evil.example", "127.0.0.1:8081", None, False),
        ("null", "127.0.0.1:8081", None, False),  # a file:// page or a sandbox
        ("http://evil.example", "127.0.0.1:8081", ("*",), True),
        ("HTTPS://App.Example.com/", "x", ("https://app.example.com",), True),
        ("https://app.example.com:8443", "x", ("https://app.example.com",), False),
        ("http://127.0.0.1:8081", "127.0.0.1:8081", ("https://app.example.com",), False),  # a list is the whole list
    ],
)
def test_the_origin_check(origin, host, allowed, ok):
    assert (origin_problem(origin, host, allowed) is None) == ok


def test_the_browser_client_and_its_modules_are_served_from_the_package():
    assert static_file("/hisock.js") == (ROOT / "hisock_gevent" / "static" / "hisock.js").read_bytes()
    assert static_file("/msgpack/index.mjs") == (ROOT / "hisock_gevent" / "static" / "msgpack" / "index.mjs").read_bytes()
    assert static_file("/msgpack/utils/utf8.mjs") is not None
    for path in ("/", "/static/hisock.js", "/msgpack/LICENSE", "/msgpack/../hisock.js", "/msgpack/nope.mjs", "/hisock.js/", "/package.json"):
        assert static_file(path) is None, path


# ---------------------------------------------------------------------- messages, with bytes


def test_a_fragmented_message_arrives_as_one_body_and_a_ping_is_answered():
    client = client_side()
    frames = WebSocketFrames(1000)
    data = client.send(BytesMessage(b"$CMD$", message_finished=False)) + client.send(BytesMessage(b"ping$MSG$0       "))
    data += client.send(Ping(b"are you there"))
    assert frames.receive(data[:7]) == [] and frames.mid_frame
    assert frames.receive(data[7:]) == [b"$CMD$ping$MSG$0       "]
    assert not frames.mid_frame
    client.receive_data(frames.data_to_send())
    assert [type(event) for event in client.events()] == [Pong]


def test_bodies_come_out_byte_by_byte_too():
    client = client_side()
    data = client.send(BytesMessage(b"one")) + client.send(BytesMessage(b"")) + client.send(BytesMessage(b"x" * 300))
    frames = WebSocketFrames(1000)
    got: List[bytes] = []
    for i in range(len(data)):
        got += frames.receive(data[i : i + 1])
    assert got == [b"one", b"", b"x" * 300]


def test_a_text_message_is_refused():
    frames = WebSocketFrames(1000)
    with pytest.raises(TextMessageRefused) as caught:
        frames.receive(client_side().send(TextMessage("$CMD$ping$MSG$0       ")))
    assert close_code_for(caught.value) == CLOSE_UNSUPPORTED_DATA


def test_a_message_over_the_limit_is_refused_when_its_header_arrives():
    frames = WebSocketFrames(1000)
    header_only = bytes([0x82, 0xFF]) + (10**12).to_bytes(8, "big") + b"mask"
    with pytest.raises(MessageTooLarge) as caught:
        frames.receive(header_only)
    assert close_code_for(caught.value) == CLOSE_TOO_BIG


def test_a_message_over_the_limit_in_fragments_is_refused():
    client = client_side()
    frames = WebSocketFrames(1000)
    frames.receive(client.send(BytesMessage(b"x" * 600, message_finished=False)))
    with pytest.raises(MessageTooLarge):
        frames.receive(client.send(BytesMessage(b"x" * 600)))


def test_the_first_message_has_the_hello_limit_and_the_next_the_message_limit():
    client = client_side()
    frames = WebSocketFrames(1000, first_message_limit=100)
    with pytest.raises(MessageTooLarge):
        frames.receive(client.send(BytesMessage(b"x" * 101)))
    frames = WebSocketFrames(1000, first_message_limit=100)
    assert frames.receive(client.send(BytesMessage(b"x" * 100))) == [b"x" * 100]
    assert frames.receive(client.send(BytesMessage(b"y" * 1000))) == [b"y" * 1000]


def test_bodies_before_a_broken_frame_are_handed_out_first():
    client = client_side()
    frames = WebSocketFrames(1000)
    data = client.send(BytesMessage(b"first")) + client.send(TextMessage("then text"))
    assert frames.receive(data) == [b"first"]
    assert frames.failed
    with pytest.raises(TextMessageRefused):
        frames.receive(b"")


def test_an_unmasked_frame_breaks_rfc_6455():
    frames = WebSocketFrames(1000)
    with pytest.raises(WebSocketProtocolError) as caught:
        frames.receive(b"\x82\x01a")
    assert caught.value.code == 1002 and close_code_for(caught.value) == 1002


def test_the_peers_close_is_answered_with_its_code_and_ends_reading():
    client = client_side()
    frames = WebSocketFrames(1000)
    assert frames.receive(client.send(CloseConnection(code=1000, reason="bye"))) == []
    assert frames.closed_by_peer and frames.peer_close_code == 1000
    client.receive_data(frames.data_to_send())
    (answer,) = list(client.events())
    assert isinstance(answer, CloseConnection) and answer.code == 1000
    assert frames.close(CLOSE_POLICY) == b""  # answered already: nothing more to send


def test_a_close_frame_carries_the_code_and_a_short_reason():
    frames = WebSocketFrames(1000)
    client = client_side()
    client.receive_data(frames.close(CLOSE_POLICY, "é" * 200))
    (event,) = list(client.events())
    assert event.code == CLOSE_POLICY and len(event.reason.encode()) <= 123


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_binary_headers_read_back_with_wsproto(length):
    client = client_side()
    client.receive_data(binary_header(length) + b"z" * length)
    events = list(client.events())
    assert b"".join(event.data for event in events) == b"z" * length
    assert events[-1].message_finished and all(isinstance(event, BytesMessage) for event in events)


def test_close_codes_of_the_errors():
    assert close_code_for(MalformedMessage("x")) == CLOSE_POLICY
    assert close_code_for(MessageTooLarge("x")) == CLOSE_TOO_BIG
    assert close_code_for(RuntimeError("a bug")) == 1011


def test_whole_frames_become_one_message_each_and_a_broadcast_is_cut_once():
    data = frame(b"first", 16) + frame(b"", 16) + frame(b"x" * 300, 16)
    pieces = message_pieces(data, 16)
    client = client_side()
    client.receive_data(b"".join(bytes(piece) for piece in pieces))
    assert [bytes(event.data) for event in client.events()] == [b"first", b"", b"x" * 300]
    assert message_pieces(data, 16) is pieces  # the next receiver of the same frame


# ---------------------------------------------------------------------- servers


@pytest.fixture
def ws_server(make_server) -> Any:
    srv = make_server(websocket=(LOOPBACK, 0))
    srv.start()
    return srv


@pytest.fixture
def peers() -> Iterator[Any]:
    made: List[WsPeer] = []

    def connect(srv: Any, **kwargs: Any) -> WsPeer:
        peer = WsPeer(srv.websocket_addr, **kwargs)
        made.append(peer)
        return peer

    yield connect
    for peer in made:
        peer.close()


def test_websocket_and_tcp_clients_share_groups_names_and_handlers(ws_server, peers, make_client, recorder):
    said = recorder()
    srv = ws_server
    srv.on("say")(lambda client, content: (said(client.name, content), srv.send_group(client, "said", f"{client.name}: {content}")))
    web = peers(srv)
    answer = web.hello("web", "lobby")
    assert answer["name"] == "web" and "caps" not in answer  # a plain peer, like HiSock 3.x
    tcp = make_client(srv, "tcp", "lobby")
    assert web.recv_body().startswith(b"$CLTCONN$")  # tcp joined
    outsider = make_client(srv, "outsider", "elsewhere")
    assert json.loads(web.recv_body()[len(b"$CLTCONN$"):])["name"] == "outsider"

    assert {info.name for info in srv.get_group("lobby")} == {"web", "tcp"}
    assert srv.get_client("web").ip == tuple(answer["ip"])

    web.send_body(cmd_body("say", "hello tcp"))
    assert tcp.recv("said", timeout=5) == "web: hello tcp"
    assert web.recv_body() == cmd_body("said", "web: hello tcp")  # the sender's group includes it
    tcp.send("say", "hello web")
    assert web.recv_body() == cmd_body("said", "tcp: hello web")
    assert said.wait_for(2) == [("web", "hello tcp"), ("tcp", "hello web")]
    with pytest.raises(TimeoutError):
        outsider.recv("said", timeout=0.3)

    srv.send_client("web", "direct", {"n": 2**70})
    assert web.recv_body().startswith(b"$CMD$direct$MSG$")


def test_a_websocket_client_changes_name_and_group_and_leaves(ws_server, peers, recorder):
    srv = ws_server
    changes, left = recorder(), recorder()
    srv.on("name_change")(lambda client, old, new: changes("name", old, new))
    srv.on("group_change")(lambda client, old, new: changes("group", old, new))
    srv.on("leave")(lambda client: left(client.name))
    web = peers(srv)
    web.hello("before", "g1")
    web.send_body(b"$CHNAME$after")
    web.send_body(b"$CHGROUP$g2")
    assert changes.wait_for(2) == [("name", "before", "after"), ("group", "g1", "g2")]
    assert srv.get_client("after").group == "g2"
    web.send_body(b"$USRCLOSE$")
    assert web.wait_closed() == CLOSE_NORMAL
    assert left.wait_for(1) == ["after"]
    wait_until(lambda: not srv.clients)


def test_disconnect_client_sends_disconn_then_closes_normally(ws_server, peers):
    web = peers(ws_server)
    web.hello("kicked", caps=["msgpack"])
    ws_server.disconnect_client("kicked")
    assert web.recv_body() == b'$DISCONN${"reason":"disconnected by the server"}'
    assert web.wait_closed() == CLOSE_NORMAL


def test_closing_the_server_says_going_away(make_server, peers):
    srv = make_server(websocket=(LOOPBACK, 0))
    srv.start()
    web = peers(srv)
    web.hello("stay", caps=["msgpack"])
    srv.close()
    assert web.recv_body() == b'$DISCONN${"reason":"server closing"}'
    assert web.wait_closed() == CLOSE_GOING_AWAY
    with pytest.raises(OSError):
        WsPeer(srv.websocket_addr, timeout=1)


def test_the_websocket_port_serves_the_client_files_and_pages(make_server):
    page = b"<!doctype html><title>hi</title>"
    srv = make_server(websocket=(LOOPBACK, 0), websocket_pages={"/": ("text/html; charset=utf-8", page)})
    srv.start()
    status, headers, body = http_get(srv.websocket_addr, "/hisock.js")
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["access-control-allow-origin"] == "*"  # importable by pages of other origins
    assert body == static_file("/hisock.js")
    status, headers, body = http_get(srv.websocket_addr, "/msgpack/index.mjs")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert http_get(srv.websocket_addr, "/")[::2] == (200, page)
    assert http_get(srv.websocket_addr, "/nothing")[0] == 404
    assert http_get(srv.websocket_addr, "/hisock")[0] == 426  # the WebSocket path wants an upgrade


def test_a_refused_upgrade_says_why_and_the_port_keeps_serving(ws_server, peers, caplog):
    caplog.set_level(logging.WARNING, logger="hisock_gevent")
    with pytest.raises(Rejected) as caught:
        WsPeer(ws_server.websocket_addr, origin="http://evil.example")
    assert caught.value.status == 403 and b"evil.example" in caught.value.body
    assert any("refusing a WebSocket upgrade" in r.getMessage() and "evil.example" in r.getMessage() for r in caplog.records)
    peers(ws_server, origin="http://{}:{}".format(*ws_server.websocket_addr)).hello("own page")


def test_websocket_origins_lets_the_listed_pages_in(make_server, peers):
    srv = make_server(websocket=(LOOPBACK, 0), websocket_origins=["https://app.example.com"])
    srv.start()
    peers(srv, origin="https://app.example.com").hello("listed")
    with pytest.raises(Rejected):
        WsPeer(srv.websocket_addr, origin="http://{}:{}".format(*srv.websocket_addr))


def test_max_connections_turns_a_websocket_away_with_disconn_and_1008(make_server, peers, make_client):
    srv = make_server(max_connections=1, websocket=(LOOPBACK, 0))
    srv.start()
    make_client(srv, "first")
    late = peers(srv)
    assert late.recv_body() == b"$DISCONN$"
    assert late.wait_closed() == CLOSE_POLICY


def test_no_hello_in_time_closes_with_1008(make_server, peers, caplog):
    caplog.set_level(logging.WARNING, logger="hisock_gevent")
    srv = make_server(websocket=(LOOPBACK, 0), handshake_timeout=0.3)
    srv.start()
    silent = peers(srv)
    assert silent.wait_closed(5) == CLOSE_POLICY
    assert any("no hello within" in r.getMessage() for r in caplog.records)


def test_an_http_request_that_never_ends_is_closed_after_the_handshake_timeout(make_server, caplog):
    caplog.set_level(logging.WARNING, logger="hisock_gevent")
    srv = make_server(websocket=(LOOPBACK, 0), handshake_timeout=0.3)
    srv.start()
    with socket.create_connection(srv.websocket_addr, timeout=5) as slow:
        slow.sendall(b"GET /hisock HTTP/1.1\r\nHost: x\r\n")
        assert slow.recv(100) == b""
    assert any("no WebSocket upgrade" in r.getMessage() for r in caplog.records)


def test_a_message_that_stalls_midway_hits_the_frame_timeout(make_server, peers, caplog):
    caplog.set_level(logging.WARNING, logger="hisock_gevent")
    srv = make_server(websocket=(LOOPBACK, 0), frame_timeout=0.3)
    srv.start()
    web = peers(srv)
    web.hello("staller")
    whole = web.ws.send(BytesMessage(data=cmd_body("say", "x" * 100)))
    web.send_raw(whole[:20])  # the header and a part of the body, then nothing
    assert web.wait_closed(5) == CLOSE_POLICY
    assert any("took longer than" in r.getMessage() for r in caplog.records)


def test_a_client_that_does_not_answer_pings_is_dropped(make_server, peers, caplog, recorder):
    caplog.set_level(logging.WARNING, logger="hisock_gevent")
    left = recorder()
    srv = make_server(websocket=(LOOPBACK, 0), websocket_ping_interval=0.2, websocket_ping_timeout=0.3)
    srv.on("leave")(lambda client: left(client.name))
    srv.start()
    answering = peers(srv)
    answering.hello("answering")
    mute = peers(srv)
    mute.hello("mute")
    # The mute peer reads nothing, so it never answers; the other keeps pumping pongs.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not left.items:
        try:
            answering.recv_body(timeout=0.1)
        except TimeoutError:
            pass
    assert left.wait_for(1) == ["mute"]
    assert any("no answer to a WebSocket ping" in r.getMessage() for r in caplog.records)
    assert srv.get_client("answering")


def test_a_slow_reader_is_dropped_and_the_others_are_served(make_server, peers, make_client, caplog):
    caplog.set_level(logging.WARNING, logger="hisock_gevent")
    srv = make_server(websocket=(LOOPBACK, 0), max_queue_bytes=256 * 1024)
    srv.start()
    slow = peers(srv)
    slow.hello("slow")
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader = make_client(srv, "reader")
    chunk = "x" * 60_000
    for _ in range(200):
        srv.send_all_clients("flood", chunk)
        if not any(info.name == "slow" for info in srv.get_all_clients()):
            break
        assert reader.recv("flood", timeout=5) == chunk
    wait_until(lambda: all(info.name != "slow" for info in srv.get_all_clients()))
    assert any("dropping" in r.getMessage() and "max_queue_bytes" in r.getMessage() for r in caplog.records)
    srv.send_all_clients("after", "still here")
    assert reader.recv("after", timeout=5) == "still here"


def test_the_wsgi_app_upgrades_inside_a_pywsgi_server_of_another_thread(server, make_client):
    """A pywsgi server on its own thread and hub: the socket is handed to the server's hub."""
    import gevent
    from gevent.pywsgi import WSGIServer

    app = server.websocket_app()
    started = threading.Event()
    holder: dict = {}

    def run() -> None:
        http = WSGIServer((LOOPBACK, 0), app, log=None)
        http.start()
        holder["http"] = http
        holder["stop"] = gevent.get_hub().loop.async_()
        holder["stop"].start(http.stop)
        started.set()
        http.serve_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(5)
    addr = holder["http"].address
    try:
        web = WsPeer(addr)
        web.hello("via wsgi", "g")
        tcp = make_client(server, "tcp", "g")
        assert web.recv_body().startswith(b"$CLTCONN$")
        server.send_group("g", "hi", "both")
        assert tcp.recv("hi", timeout=5) == "both"
        assert web.recv_body().startswith(b"$CMD$hi$MSG$")
        assert http_get(addr, "/hisock.js")[0] == 200
        web.send_body(b"$USRCLOSE$")
        assert web.wait_closed() == CLOSE_NORMAL
        wait_until(lambda: [info.name for info in server.get_all_clients()] == ["tcp"])
        web.close()
    finally:
        holder["stop"].send()
        thread.join(5)


def test_the_wsgi_app_answers_503_until_the_server_serves(make_server):
    srv = make_server()
    app = srv.websocket_app()
    statuses: List[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/hisock", **{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in upgrade_headers().items()}}
    app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["503 Service Unavailable"]


def test_the_wsgi_example_serves_websocket_clients_beside_its_own_routes(tmp_path):
    program = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "wsgi_app.py"), "--port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        ports = {}
        deadline = time.monotonic() + 20
        while len(ports) < 2 and time.monotonic() < deadline:
            line = program.stdout.readline() if program.stdout else ""
            for kind in ("hisock", "http"):
                if f"{kind} serving on" in line:
                    ports[kind] = int(line.rsplit(":", 1)[1])
        assert len(ports) == 2, "the example did not say where it serves"
        web = WsPeer((LOOPBACK, ports["http"]))
        web.hello("browser", "lobby")
        status, _, body = http_get((LOOPBACK, ports["http"]), "/clients")
        assert status == 200 and "browser" in body.decode()
        tcp = hisock_gevent.HiSockClient((LOOPBACK, ports["hisock"]), "tcp", "lobby")
        tcp.wait_joined()
        assert web.recv_body().startswith(b"$CLTCONN$")
        tcp.close()
        web.close()
    finally:
        program.terminate()
        program.wait(10)


def test_without_the_websocket_option_there_is_no_listener(server):
    assert server.websocket_addr is None


@pytest.mark.parametrize(
    "options",
    [
        {"websocket": ("127.0.0.1",)},
        {"websocket": "127.0.0.1:8081"},
        {"websocket": ("127.0.0.1", 70000)},
        {"websocket_origins": "https://example.com"},
        {"websocket_ping_interval": 0},
        {"websocket_ping_timeout": -1},
        {"websocket_pages": {"no-slash": ("text/html", b"")}},
        {"websocket_pages": {"/": ("text/html", "not bytes")}},
    ],
)
def test_websocket_options_are_checked(options):
    with pytest.raises(ValueError):
        ServerConfig(**options)


def test_an_ipv6_websocket_address_is_refused():
    with pytest.raises(ValueError, match="IPv6"):
        hisock_gevent.HiSockServer((LOOPBACK, 0), websocket=("::1", 0))


def test_hello_body_helper_is_a_valid_hello():
    # (the helper the hostile tests share; the server parses it like a TCP hello)
    assert hello_body("a", None).startswith(b"$CLTHELLO$")
    assert base64.b64decode(KEY)


# ---------------------------------------------------------------------- the hot path against wsproto

_PIECES = st.one_of(
    st.tuples(st.just("binary"), st.binary(max_size=300)),
    st.tuples(st.just("sized"), st.sampled_from([125, 126, 127, 65535, 65536, 70_000])),
    st.tuples(st.just("fragmented"), st.lists(st.binary(max_size=40), min_size=2, max_size=4)),
    st.tuples(st.just("ping"), st.binary(max_size=20)),
    st.tuples(st.just("text"), st.text(max_size=10)),
    st.tuples(st.just("unmasked"), st.binary(max_size=10)),
    st.tuples(st.just("close"), st.sampled_from([1000, 1001, 4000])),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=12)),
)


def _client_bytes(piece: Any) -> bytes:
    kind, value = piece
    client = client_side()
    if kind == "binary":
        return client.send(BytesMessage(value))
    if kind == "sized":
        return client.send(BytesMessage(b"s" * value))
    if kind == "fragmented":
        return b"".join(client.send(BytesMessage(part, message_finished=i == len(value) - 1)) for i, part in enumerate(value))
    if kind == "ping":
        return client.send(Ping(value))
    if kind == "text":
        return client.send(TextMessage(value))
    if kind == "unmasked":
        return binary_header(len(value)) + value
    if kind == "close":
        return client.send(CloseConnection(code=value))
    return value


def _run(frames: WebSocketFrames, chunks: List[bytes]) -> List[Any]:
    trace: List[Any] = []
    for chunk in chunks + [b""]:
        try:
            trace.append(("bodies", frames.receive(chunk), frames.data_to_send(), frames.closed_by_peer))
        except Exception as exc:
            trace.append(("error", type(exc).__name__, getattr(exc, "code", None)))
            break
    return trace


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(_PIECES, max_size=8), cuts=st.lists(st.integers(min_value=1, max_value=200_000), max_size=6),
       limits=st.sampled_from([(70_000, 70_000), (100, 70_000), (70_000, 200)]))
def test_the_hand_read_frames_are_what_wsproto_reads(pieces: List[Any], cuts: List[int], limits: Any) -> None:
    data = b"".join(_client_bytes(piece) for piece in pieces)
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:])]
    first, rest = limits
    fast = _run(WebSocketFrames(rest, first, fast=True), chunks)
    slow = _run(WebSocketFrames(rest, first, fast=False), chunks)
    # The same bodies, answers and errors, though the fast path may find a too-large
    # claim in the same call as wsproto or sooner: compare what both hand out overall.
    assert _flatten(fast) == _flatten(slow)


def _flatten(trace: List[Any]) -> Any:
    bodies = [body for step in trace if step[0] == "bodies" for body in step[1]]
    answers = b"".join(step[2] for step in trace if step[0] == "bodies")
    errors = [step[1:] for step in trace if step[0] == "error"]
    closed = any(step[3] for step in trace if step[0] == "bodies")
    return bodies, answers, errors, closed


def test_messages_sent_right_behind_the_upgrade_request_are_read(ws_server):
    """A client may send its first messages before the 101 arrives (pywsgi has buffered them)."""
    client = client_side()
    hello = client.send(BytesMessage(hello_body("eager", "g"))) + client.send(BytesMessage(cmd_body("ping", "x")))
    request = (
        "GET /hisock HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\n\r\n".format(*ws_server.websocket_addr, KEY)
    ).encode()
    got = Recorder()
    ws_server.on("ping")(lambda client, content: got(client.name, content))
    with socket.create_connection(ws_server.websocket_addr, timeout=5) as sock:
        sock.sendall(request + hello)
        answer = b""
        while b"$CLTCONN$" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 101 ")
        assert got.wait_for(1) == [("eager", "x")]


def test_chat_refuses_an_origin_without_a_websocket_port():
    from cliprogram import one_shot

    result = one_shot("chat", "--websocket-origin", "https://example.com")
    assert result.returncode == 2 and "--websocket-origin needs --websocket-port" in result.stderr


def test_a_tcp_and_a_websocket_client_at_one_source_address_are_two_clients(ws_server, peers, caplog):
    """The kernel may give a TCP and a WebSocket connection the same source port (their
    destination ports differ); both must be served, and neither may hide the other."""
    from rawpeer import RawPeer

    probe = socket.socket()
    probe.bind((LOOPBACK, 0))
    source = probe.getsockname()
    probe.close()
    srv = ws_server
    tcp = RawPeer(srv.get_addr(), source=source)
    try:
        tcp.hello("tcp", "room")
        web = peers(srv, source=source)
        web.hello("web", "room")
        assert tcp.sock.getsockname() == web.sock.getsockname() == source
        wait_until(lambda: len(srv.get_all_clients()) == 2)
        assert "shares its address" in caplog.text
        srv.send_client("web", "only", "for web")
        srv.send_client("tcp", "only", "for tcp")
        assert web.recv_body() == cmd_body("only", "for web")
        while not (body := tcp.read_frame(timeout=5)).startswith(b"$CMD$only"):
            pass
        assert body == cmd_body("only", "for tcp")
        assert sorted(info.name for info in srv.get_group("room")) == ["tcp", "web"]
    finally:
        tcp.close()
    # The first to join there left: the address (and the name) lead to the other one.
    wait_until(lambda: len(srv.get_all_clients()) == 1)
    assert srv.get_client(f"{source[0]}:{source[1]}").name == "web"
    srv.send_client(source, "still", "here")
    assert json.loads(web.recv_body()[len(b"$CLTDISCONN$") :])["name"] == "tcp"
    assert web.recv_body() == cmd_body("still", "here")
