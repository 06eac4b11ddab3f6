"""Hostile WebSocket peers over real sockets, as tests/test_hostile.py does for TCP.

A ThreadedHiSockServer with a WebSocket listener serves two good clients, ``good-tcp``
(the library's client) and ``good-ws`` (a WebSocket peer), who relay numbered notes to
each other through the server while one hostile peer misbehaves: a bad handshake, a
text message where binary is expected, an oversized message, a page from the wrong
Origin, a client that stops reading.  Each time:

* the hostile connection, and only it, is refused or closed, with the HTTP status or the
  WebSocket close code PROTOCOL.md section 10 names;
* one WARNING line of the ``hisock_gevent`` logger names its address and says why;
* a hostile client that had joined gets ``leave`` once and is gone from ``clients``;
* the good clients lose nothing: every note arrives, in order, both ways.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Iterator, List, Tuple

import pytest
from conftest import LOOPBACK, Recorder, wait_until
from wspeer import Rejected, WsPeer, cmd_body
from wsproto.events import BytesMessage

import hisock_gevent

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
LIMITS = dict(max_message_size=64 * 1024, handshake_timeout=0.5, max_queue_bytes=256 * 1024, frame_timeout=1.0)


class Scene:
    """The server, the good clients and what the server logged and ran."""

    def __init__(self, caplog: Any):
        self.caplog = caplog
        self.left = Recorder()
        self.server = hisock_gevent.ThreadedHiSockServer((LOOPBACK, 0), websocket=(LOOPBACK, 0), **LIMITS)
        srv = self.server
        srv.on("leave")(lambda client: self.left(client.name))

        @srv.on("note")
        def relay(client: Any, content: Any) -> None:
            target = "good-ws" if client.name == "good-tcp" else "good-tcp"
            try:
                srv.send_client(target, "note", content)
            except hisock_gevent.ClientNotFound:
                pass

        srv.start()
        self.tcp = hisock_gevent.HiSockClient(srv.get_addr(), "good-tcp", "good")
        self.tcp.wait_joined()
        self.ws = WsPeer(srv.websocket_addr)
        self.ws.hello("good-ws", "good")
        self.sent = 0

    def exchange(self, rounds: int = 5) -> None:
        """Notes both ways; every one must arrive, in order."""
        for _ in range(rounds):
            self.sent += 1
            text = f"note {self.sent}"
            self.tcp.send("note", text)
            assert self.ws.recv_body(skip=(b"$CLTCONN$", b"$CLTDISCONN$")) == cmd_body("note", text)
            self.ws.send_body(cmd_body("note", text + " back"))
            assert self.tcp.recv("note", timeout=WAIT) == text + " back"

    def warnings_about(self, port: int) -> List[str]:
        return [
            r.getMessage() for r in self.caplog.records
            if r.name == "hisock_gevent" and r.levelno == logging.WARNING and f":{port}" in r.getMessage()
        ]

    def close(self) -> None:
        self.ws.close()
        self.tcp.close()
        self.server.close()


@pytest.fixture
def scene(caplog: Any) -> Iterator[Scene]:
    caplog.set_level(logging.WARNING, logger="hisock_gevent")
    made = Scene(caplog)
    made.exchange()
    yield made
    made.exchange()
    assert sorted(info.name for info in made.server.get_all_clients()) == ["good-tcp", "good-ws"]
    made.close()


def _raw_request(addr: Tuple[str, int], request: bytes) -> Tuple[bytes, int]:
    """Send raw bytes to the WebSocket port; (what came back, our port)."""
    with socket.create_connection(addr, timeout=WAIT) as sock:
        port = sock.getsockname()[1]
        sock.sendall(request)
        answer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return answer, port
            answer += chunk


BAD_HANDSHAKES = {
    "not http": (b"HELLO THERE\r\n\r\n", b"400"),
    "no key": (b"GET /hisock HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", b"400"),
    "old version": (b"GET /hisock HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", b"426"),
    "a post": (b"POST /hisock HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n", b"405"),
}


@pytest.mark.parametrize("case", sorted(BAD_HANDSHAKES))
def test_a_bad_handshake_is_refused_with_a_log_line(scene: Scene, case: str) -> None:
    request, status = BAD_HANDSHAKES[case]
    answer, port = _raw_request(scene.server.websocket_addr, request)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
    wait_until(lambda: len(scene.warnings_about(port)) == 1)
    assert not scene.left.items


def test_a_silent_connection_to_the_websocket_port_is_closed_with_a_log_line(scene: Scene) -> None:
    answer, port = _raw_request(scene.server.websocket_addr, b"GET /hisock HTTP/1.1\r\n")  # and nothing more
    assert answer == b""
    (line,) = scene.warnings_about(port)
    assert "within 0.5 s" in line


def test_a_text_message_closes_that_connection_with_1003(scene: Scene) -> None:
    hostile = WsPeer(scene.server.websocket_addr)
    port = hostile.sock.getsockname()[1]
    hostile.hello("texter")
    hostile.send_text("$CMD$note$MSG$0       ")
    assert hostile.wait_closed() == 1003
    assert scene.left.wait_for(1) == ["texter"]
    (line,) = scene.warnings_about(port)
    assert "text message" in line


def test_a_text_message_instead_of_the_hello_closes_with_1003_and_nobody_hears_of_it(scene: Scene) -> None:
    hostile = WsPeer(scene.server.websocket_addr)
    port = hostile.sock.getsockname()[1]
    hostile.send_text('$CLTHELLO${"name": "sneaky"}')
    assert hostile.wait_closed() == 1003
    assert len(scene.warnings_about(port)) == 1
    assert not scene.left.items


def test_an_oversized_message_closes_that_connection_with_1009_before_it_is_read(scene: Scene) -> None:
    hostile = WsPeer(scene.server.websocket_addr)
    port = hostile.sock.getsockname()[1]
    hostile.hello("bigmouth")
    whole = hostile.ws.send(BytesMessage(data=b"$CMD$note$MSG$0       " + b"x" * (LIMITS["max_message_size"] * 4)))
    hostile.send_raw(whole[:16])  # the frame's header claims 256 KiB: refused right there
    assert hostile.wait_closed() == 1009
    assert scene.left.wait_for(1) == ["bigmouth"]
    (line,) = scene.warnings_about(port)
    assert "more than the limit" in line


def test_a_page_from_the_wrong_origin_is_refused_with_403(scene: Scene) -> None:
    with pytest.raises(Rejected) as caught:
        WsPeer(scene.server.websocket_addr, origin="https://evil.example")
    assert caught.value.status == 403
    lines = [r.getMessage() for r in scene.caplog.records if "evil.example" in r.getMessage()]
    assert len(lines) == 1 and "refusing a WebSocket upgrade" in lines[0]
    assert not scene.left.items


def test_a_client_that_stops_reading_is_dropped_alone(scene: Scene) -> None:
    hostile = WsPeer(scene.server.websocket_addr)
    hostile.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    port = hostile.sock.getsockname()[1]
    hostile.hello("deaf", "good")
    chunk = "y" * 50_000
    for _ in range(100):
        if scene.left.items:
            break
        try:
            scene.server.send_client("deaf", "flood", chunk)
        except hisock_gevent.ClientNotFound:
            break
        scene.exchange(1)  # the good ones are served all along
    assert scene.left.wait_for(1, timeout=WAIT) == ["deaf"]
    (line,) = scene.warnings_about(port)
    assert "max_queue_bytes" in line
    hostile.close()


def test_hostile_peers_on_both_transports_at_once_leave_the_good_clients_alone(scene: Scene, raw: Callable[..., Any]) -> None:
    texter = WsPeer(scene.server.websocket_addr)
    texter.hello("ws-hostile")
    tcp_hostile = raw(scene.server)
    tcp_hostile.send_raw(b"not a header at all!!")
    texter.send_text("boo")
    assert texter.wait_closed() == 1003
    tcp_hostile.read_until_eof()
    scene.exchange(10)
    assert scene.left.wait_for(1) == ["ws-hostile"]
