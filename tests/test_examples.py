"""The example programs in examples/ do what their docstrings promise.

Each example server runs as a subprocess on a free loopback port (``--port 0``; the port
is read from its ``serving on HOST:PORT`` line) and is stopped with SIGTERM by its pid in
teardown.  The tests talk to it with hisock_gevent clients and with the example client
scripts, whose stdin is a pipe.  Every wait is on an output line or a message, with a
timeout; "X does not receive Y" is checked after a round trip to the server (a ``who``
request) that X's copy of Y would have had to arrive before.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Pattern, Tuple, Union

import pytest

import hisock_gevent

# Slow by nature: the examples run as subprocesses.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

LOOPBACK = "127.0.0.1"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WAIT = 10.0
TIMESTAMP = r"\[\d\d:\d\d:\d\d\]"


# --------------------------------------------------------------------------- processes


class ExampleProcess:
    """An example script running as a subprocess, its output collected line by line."""

    def __init__(self, script: str, *args: str, stdin: bool = False):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
        )
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name=f"read-{script}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: Union[str, Pattern[str]], timeout: float = WAIT, start: int = 0) -> re.Match[str]:
        """The first output line (from index ``start``) that ``pattern`` matches; fail after ``timeout`` s."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    raise AssertionError(
                        f"no output line matching {regex.pattern!r} within {timeout} s "
                        f"(exited: {self.popen.poll()}); output so far:\n{self.output_unlocked()}"
                    )
                self._cond.wait(remaining)

    def output_unlocked(self) -> str:
        return "\n".join(self.lines)

    def send_line(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def close_stdin(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()

    def wait(self, timeout: float = WAIT) -> int:
        """Wait for the process to exit (and its output to be read); its exit status."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.popen.args} did not exit within {timeout} s; output:\n{self.output}") from None
        self._reader.join(timeout)
        return code

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def stop(self) -> None:
        """Teardown: SIGTERM by pid, then SIGKILL if it does not go."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(WAIT)
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        self._reader.join(WAIT)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class ExampleServer(ExampleProcess):
    """An example server started with ``--port 0``; ``port`` is the one it reported."""

    def __init__(self, script: str, *args: str):
        super().__init__(script, "--host", LOOPBACK, "--port", "0", *args)
        match = self.wait_for_line(r"serving on (\d+\.\d+\.\d+\.\d+):(\d+)")
        assert match.group(1) == LOOPBACK
        self.port = int(match.group(2))
        assert self.port > 0


@pytest.fixture
def run_script() -> Iterator[Callable[..., ExampleProcess]]:
    """Factory: ``run_script(script, *args, stdin=False)``; every process is stopped in teardown."""
    processes: List[ExampleProcess] = []

    def factory(script: str, *args: str, stdin: bool = False) -> ExampleProcess:
        process = ExampleProcess(script, *args, stdin=stdin)
        processes.append(process)
        return process

    yield factory
    for process in processes:
        process.stop()


@pytest.fixture
def echo_server() -> Iterator[ExampleServer]:
    server = ExampleServer("echo_server.py")
    yield server
    server.stop()


@pytest.fixture
def chat_server() -> Iterator[ExampleServer]:
    server = ExampleServer("chat_server.py")
    yield server
    server.stop()


# --------------------------------------------------------------------------- chat probes


Message = Tuple[str, Any]


class ChatProbe:
    """A hisock_gevent ThreadedHiSockClient that records every command message it receives."""

    def __init__(self, port: int, name: Optional[str], room: Optional[str] = None, **kwargs: Any):
        self.name = name
        self.messages: List[Message] = []
        self._cond = threading.Condition()
        self.client = hisock_gevent.threaded_connect((LOOPBACK, port), name=name, group=room, **kwargs)

        @self.client.on("*")
        def record(command: str, content: Any) -> None:
            with self._cond:
                self.messages.append((command, content))
                self._cond.notify_all()

        self.client.start()

    def wait_for(self, predicate: Callable[[str, Any], bool], timeout: float = WAIT, start: int = 0) -> Message:
        """The first message (from index ``start``) that ``predicate(command, content)`` accepts."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for command, content in self.messages[start:]:
                    if predicate(command, content):
                        return command, content
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.name}: no matching message within {timeout} s; got {self.messages!r}")
                self._cond.wait(remaining)

    def wait_for_system(self, event: str, name: str, timeout: float = WAIT) -> dict:
        _, content = self.wait_for(
            lambda c, m: c == "system" and isinstance(m, dict) and m.get("event") == event and m.get("name") == name,
            timeout,
        )
        return content

    def barrier(self) -> List[Message]:
        """Round-trip a ``who`` request; every message received before its answer.

        Anything the server sent us before it read the ``who`` has arrived by then.
        """
        with self._cond:
            start = len(self.messages)
        self.client.send("who")
        with self._cond:
            if not self._cond.wait_for(lambda: any(c == "who" for c, _ in self.messages[start:]), WAIT):
                raise AssertionError(f"{self.name}: no answer to 'who' within {WAIT} s")
            position = next(i for i in range(start, len(self.messages)) if self.messages[i][0] == "who")
            return list(self.messages[:position])

    def received(self, command: str) -> List[Any]:
        with self._cond:
            return [content for c, content in self.messages if c == command]

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def probe(chat_server: ExampleServer) -> Iterator[Callable[..., ChatProbe]]:
    """Factory: ``probe(name, room=None)`` -> a connected ChatProbe, closed in teardown."""
    probes: List[ChatProbe] = []

    def factory(name: Optional[str], room: Optional[str] = None, **kwargs: Any) -> ChatProbe:
        chat_probe = ChatProbe(chat_server.port, name, room, **kwargs)
        probes.append(chat_probe)
        # Our own join announcement marks the point from which the server knows us.
        if name is not None:
            chat_probe.wait_for_system("join", name)
        return chat_probe

    yield factory
    for chat_probe in probes:
        chat_probe.close()


def said(text: str, sender: Optional[str] = None) -> Callable[[str, Any], bool]:
    return lambda c, m: (
        c == "said" and isinstance(m, dict) and m.get("text") == text and (sender is None or m.get("from") == sender)
    )


def is_said(message: Message) -> bool:
    return message[0] == "said"


# --------------------------------------------------------------------------- echo


def test_echo_server_reports_the_port_it_listens_on(echo_server: ExampleServer) -> None:
    with socket.create_connection((LOOPBACK, echo_server.port), timeout=WAIT):
        pass


def test_echo_server_answers_ping_with_identical_pong(echo_server: ExampleServer) -> None:
    client = hisock_gevent.connect((LOOPBACK, echo_server.port), name="tester")
    try:
        for content in ("hello", "", "ünïcødé ✓", {"text": "hi", "numbers": [1, -2, 3.5], "nested": {"raw": b"\x00\xff"}}):
            client.send("ping", content)
            assert client.recv("pong", timeout=WAIT) == content
    finally:
        client.close()


def test_echo_round_trips_msgpack_only_types_exactly(echo_server: ExampleServer) -> None:
    client = hisock_gevent.connect((LOOPBACK, echo_server.port))
    try:
        content = {"flag": True, "nothing": None, "pair": (1, "two"), 1.5: [False, None]}
        client.send("ping", content)
        echoed = client.recv("pong", timeout=WAIT)
        assert echoed == content
        assert echoed["flag"] is True and echoed["nothing"] is None
        assert isinstance(echoed["pair"], tuple)
    finally:
        client.close()


def test_echo_server_answers_a_call_to_echo_with_its_content(echo_server: ExampleServer) -> None:
    client = hisock_gevent.connect((LOOPBACK, echo_server.port), name="caller")
    try:
        for content in ("hello", b"\x00\xff", {"pair": (1, "two"), "flag": True}, None):
            assert client.call("echo", content, timeout=WAIT) == content
    finally:
        client.close()


def test_echo_answers_each_client_only(echo_server: ExampleServer) -> None:
    first = hisock_gevent.connect((LOOPBACK, echo_server.port), name="first")
    second = hisock_gevent.connect((LOOPBACK, echo_server.port), name="second")
    try:
        first.send("ping", "from first")
        second.send("ping", "from second")
        assert second.recv("pong", timeout=WAIT) == "from second"
        assert first.recv("pong", timeout=WAIT) == "from first"
    finally:
        first.close()
        second.close()


def test_echo_client_script_prints_round_trips_and_exits_zero(echo_server: ExampleServer, run_script: Callable[..., ExampleProcess]) -> None:
    client = run_script("echo_client.py", "--port", str(echo_server.port), "--count", "4", "--text", "abc")
    assert client.wait() == 0, client.output
    pongs = [line for line in client.lines if line.startswith("pong ")]
    assert len(pongs) == 4
    assert pongs[0].startswith("pong 1/4: 'abc #0' in ") and pongs[0].endswith(" ms")
    assert "'text': 'abc'" in pongs[1]
    assert re.search(r"^4 pongs: min [\d.]+ ms, mean [\d.]+ ms, max [\d.]+ ms$", client.output, re.M)
    echo_server.wait_for_line(r"echo-client \(127\.0\.0\.1:\d+\) left")


def test_echo_client_script_exits_2_when_no_server_listens(run_script: Callable[..., ExampleProcess]) -> None:
    # A bound socket that does not listen: connecting to its port is refused.
    with socket.socket() as placeholder:
        placeholder.bind((LOOPBACK, 0))
        port = placeholder.getsockname()[1]
        client = run_script("echo_client.py", "--port", str(port), "--count", "1")
        assert client.wait() == 2
    assert "cannot connect" in client.output


# --------------------------------------------------------------------------- chat server


def test_chat_join_is_announced_to_everyone(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice")
    probe("bob", room="red")
    announcement = alice.wait_for_system("join", "bob")
    assert "bob joined" in announcement["text"] and announcement["room"] == "red"


def test_chat_say_reaches_the_room_but_not_other_rooms(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice", room="red")
    bob = probe("bob", room="red")
    carol = probe("carol", room="blue")
    alice.client.send("say", "hello red")
    _, content = bob.wait_for(said("hello red", "alice"))
    assert content == {"from": "alice", "room": "red", "text": "hello red"}
    alice.wait_for(said("hello red", "alice"))  # the speaker sees its own line
    assert not [m for m in carol.barrier() if is_said(m)]


def test_chat_say_without_room_reaches_everyone(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice")
    bob = probe("bob")
    carol = probe("carol", room="blue")
    alice.client.send("say", "hello all")
    for listener in (alice, bob, carol):
        _, content = listener.wait_for(said("hello all", "alice"))
        assert content["room"] == ""


def test_chat_whisper_reaches_only_its_target(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice")
    bob = probe("bob")
    carol = probe("carol")
    alice.client.send("whisper", {"to": "bob", "text": "psst"})
    _, content = bob.wait_for(lambda c, m: c == "whisper")
    assert content == {"from": "alice", "text": "psst"}
    for other in (alice, carol):
        assert not [m for m in other.barrier() if m[0] == "whisper"]


def test_chat_whisper_to_unknown_name_is_answered_with_an_error(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice")
    alice.client.send("whisper", {"to": "nobody", "text": "hello?"})
    _, content = alice.wait_for(lambda c, m: c == "error")
    assert "nobody" in content


def test_chat_nick_change_is_announced_and_whispers_follow_it(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice")
    bob = probe("bob")
    alice.client.change_name("alicia")
    announcement = bob.wait_for_system("nick", "alicia")
    assert announcement["old"] == "alice" and announcement["new"] == "alicia"
    assert "alice is now known as alicia" in announcement["text"]
    bob.client.send("whisper", {"to": "alicia", "text": "nice name"})
    _, content = alice.wait_for(lambda c, m: c == "whisper")
    assert content == {"from": "bob", "text": "nice name"}


def test_chat_join_room_is_announced_and_moves_the_client(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice", room="red")
    bob = probe("bob")
    bob.client.change_group("red")
    announcement = alice.wait_for_system("room", "bob")
    assert announcement["old"] == "" and announcement["new"] == "red"
    alice.client.send("say", "welcome")
    _, content = bob.wait_for(said("welcome", "alice"))
    assert content["room"] == "red"


def test_chat_who_lists_the_names_in_the_askers_room(probe: Callable[..., ChatProbe]) -> None:
    probe("alice", room="red")
    bob = probe("bob", room="red")
    probe("carol", room="blue")
    bob.client.send("who")
    _, content = bob.wait_for(lambda c, m: c == "who")
    assert content == {"room": "red", "names": ["alice", "bob"]}


def test_chat_who_in_the_lobby_lists_everyone(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice")
    probe("bob", room="red")
    alice.client.send("who")
    _, content = alice.wait_for(lambda c, m: c == "who")
    assert content == {"room": "", "names": ["alice", "bob"]}


@pytest.mark.parametrize(
    "command, content",
    [
        ("say", 42),
        ("say", None),
        ("say", "   "),
        ("say", {"text": "hi"}),
        ("say", b"\xff\xfe"),
        ("whisper", "bob hi"),
        ("whisper", {"to": 5, "text": "hi"}),
        ("whisper", {"to": "bob"}),
        ("whisper", [1, 2, 3]),
        ("no_such_command", "x"),
    ],
)
def test_chat_server_answers_bad_payloads_with_an_error_and_keeps_serving(
    probe: Callable[..., ChatProbe], command: str, content: Any
) -> None:
    alice = probe("alice")
    bob = probe("bob")
    alice.client.send(command, content)
    _, error = alice.wait_for(lambda c, m: c == "error")
    assert isinstance(error, str) and error
    alice.client.send("say", "still here")
    bob.wait_for(said("still here", "alice"))


def test_chat_leave_is_announced_to_the_others(probe: Callable[..., ChatProbe]) -> None:
    alice = probe("alice")
    bob = probe("bob")
    bob.close()
    announcement = alice.wait_for_system("leave", "bob")
    assert announcement["text"] == "bob left"


def test_chat_works_with_a_plain_hisock_client(probe: Callable[..., ChatProbe]) -> None:
    # A client that does not offer the msgpack extension gets only HiSock 3.x type casting.
    plain = probe("plain", use_msgpack=False)
    assert plain.client.msgpack_ok is False
    alice = probe("alice")
    plain.wait_for_system("join", "alice")
    alice.client.send("say", "can you read this?")
    _, content = plain.wait_for(said("can you read this?", "alice"))
    assert content == {"from": "alice", "room": "", "text": "can you read this?"}
    plain.client.send("who")
    _, who = plain.wait_for(lambda c, m: c == "who")
    assert who == {"room": "", "names": ["alice", "plain"]}


# --------------------------------------------------------------------------- chat client script


def start_chat_client(run_script: Callable[..., ExampleProcess], server: ExampleServer, *args: str) -> ExampleProcess:
    client = run_script("chat_client.py", "--port", str(server.port), *args, stdin=True)
    client.wait_for_line(rf"^{TIMESTAMP} connected to 127\.0\.0\.1:{server.port} as ")
    return client


def test_chat_client_script_says_typed_lines_and_prints_incoming_ones(
    chat_server: ExampleServer, run_script: Callable[..., ExampleProcess], probe: Callable[..., ChatProbe]
) -> None:
    bob = probe("bob", room="red")
    alice = start_chat_client(run_script, chat_server, "--name", "alice", "--room", "red")
    bob.wait_for_system("join", "alice")
    alice.send_line("hello bob")
    _, content = bob.wait_for(said("hello bob", "alice"))
    assert content["room"] == "red"
    bob.client.send("say", "hi alice")
    alice.wait_for_line(rf"^{TIMESTAMP} <bob@red> hi alice$")


def test_chat_client_script_slash_commands(
    chat_server: ExampleServer, run_script: Callable[..., ExampleProcess], probe: Callable[..., ChatProbe]
) -> None:
    bob = probe("bob")
    alice = start_chat_client(run_script, chat_server, "--name", "alice")
    bob.wait_for_system("join", "alice")

    alice.send_line("/nick alicia")
    bob.wait_for_system("nick", "alicia")

    alice.send_line("/w bob just between us")
    _, whisper = bob.wait_for(lambda c, m: c == "whisper")
    assert whisper == {"from": "alicia", "text": "just between us"}

    alice.send_line("/who")
    alice.wait_for_line(rf"^{TIMESTAMP} in the lobby: alicia, bob$")

    alice.send_line("/join games")
    announcement = bob.wait_for_system("room", "alicia")
    assert announcement["new"] == "games"
    alice.send_line("in games now")
    alice.wait_for_line(rf"^{TIMESTAMP} <alicia@games> in games now$")
    assert not [m for m in bob.barrier() if is_said(m)]

    bob.client.send("whisper", {"to": "alicia", "text": "found you"})
    alice.wait_for_line(rf"^{TIMESTAMP} \*bob whispers\* found you$")

    alice.send_line("/w nobody hello")
    alice.wait_for_line(rf"^{TIMESTAMP} ! no one is called 'nobody'$")


def test_chat_client_script_exits_zero_on_eof_and_the_leave_is_announced(
    chat_server: ExampleServer, run_script: Callable[..., ExampleProcess], probe: Callable[..., ChatProbe]
) -> None:
    bob = probe("bob")
    alice = start_chat_client(run_script, chat_server, "--name", "alice")
    bob.wait_for_system("join", "alice")
    alice.send_line("last words")
    alice.close_stdin()
    assert alice.wait() == 0, alice.output
    bob.wait_for(said("last words", "alice"))
    announcement = bob.wait_for_system("leave", "alice")
    assert announcement["text"] == "alice left"


def test_chat_client_script_quit_command_exits_zero(
    chat_server: ExampleServer, run_script: Callable[..., ExampleProcess], probe: Callable[..., ChatProbe]
) -> None:
    bob = probe("bob")
    alice = start_chat_client(run_script, chat_server, "--name", "alice")
    alice.send_line("/quit")
    assert alice.wait() == 0, alice.output
    bob.wait_for_system("leave", "alice")


def test_chat_client_script_linger_prints_answers_after_the_end_of_input(
    chat_server: ExampleServer, run_script: Callable[..., ExampleProcess], probe: Callable[..., ChatProbe]
) -> None:
    probe("bob")
    alice = start_chat_client(run_script, chat_server, "--name", "alice", "--linger", "3")
    alice.send_line("/who")
    alice.close_stdin()
    alice.wait_for_line(rf"^{TIMESTAMP} in the lobby: alice, bob$")
    assert alice.wait() == 0, alice.output


def test_chat_client_script_say_mode_sends_count_lines_then_leaves(
    chat_server: ExampleServer, run_script: Callable[..., ExampleProcess], probe: Callable[..., ChatProbe]
) -> None:
    bob = probe("bob")
    bot = run_script("chat_client.py", "--port", str(chat_server.port), "--name", "bot", "--say", "beep", "--count", "3")
    assert bot.wait() == 0, bot.output
    bob.wait_for_system("leave", "bot")
    assert [m for m in bob.received("said") if m["from"] == "bot"] == [{"from": "bot", "room": "", "text": "beep"}] * 3


def test_chat_client_script_say_mode_prints_its_own_lines_before_it_leaves(
    chat_server: ExampleServer, run_script: Callable[..., ExampleProcess]
) -> None:
    bot = run_script("chat_client.py", "--port", str(chat_server.port), "--name", "bot", "--say", "hello", "--count", "3")
    assert bot.wait() == 0, bot.output
    lines = bot.output.splitlines()
    echoes = [n for n, line in enumerate(lines) if re.fullmatch(rf"{TIMESTAMP} <bot> hello", line)]
    assert len(echoes) == 3, bot.output
    bye = [n for n, line in enumerate(lines) if re.fullmatch(rf"{TIMESTAMP} bye", line)]
    assert bye and bye[0] > echoes[-1], bot.output
    assert "came back" not in bot.output


def test_chat_client_script_exits_1_when_the_server_stops(
    chat_server: ExampleServer, run_script: Callable[..., ExampleProcess]
) -> None:
    alice = start_chat_client(run_script, chat_server, "--name", "alice")
    alice.wait_for_line(rf"^{TIMESTAMP} \* alice joined$")
    chat_server.signal(signal.SIGTERM)
    assert alice.wait() == 1, alice.output
    assert "the server disconnected us" in alice.output
    assert chat_server.wait() == 0


# --------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize("script", ["echo_server.py", "chat_server.py"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_servers_close_cleanly_on_signal(script: str, signum: int) -> None:
    server = ExampleServer(script)
    try:
        client = hisock_gevent.threaded_connect((LOOPBACK, server.port), name="watcher")
        disconnected = threading.Event()
        client.on("force_disconnect")(disconnected.set)
        client.start()
        server.signal(signum)
        assert server.wait() == 0, server.output
        assert disconnected.wait(WAIT), "the client was not told $DISCONN$"
        server.wait_for_line(r"INFO stopped$")
        client.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- wsgi app

# No proxy from the environment may stand between the tests and the loopback HTTP server.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WsgiAppServer(ExampleServer):
    """``examples/wsgi_app.py`` with both ports free: ``port`` is HiSock's, ``http_port`` HTTP's."""

    def __init__(self) -> None:
        super().__init__("wsgi_app.py", "--http-port", "0")
        hisock = self.wait_for_line(r"hisock serving on (\d+\.\d+\.\d+\.\d+):(\d+)$")
        assert int(hisock.group(2)) == self.port
        http = self.wait_for_line(r"http serving on (\d+\.\d+\.\d+\.\d+):(\d+)$")
        assert http.group(1) == LOOPBACK
        self.http_port = int(http.group(2))

    def http(self, method: str, path: str, body: Union[bytes, Any, None] = None) -> Tuple[int, str, bytes]:
        """``(status, content type, body)`` of one request; ``body`` is sent as is (bytes) or as JSON."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.http_port}{path}", data=data, method=method)
        try:
            with _HTTP.open(request, timeout=WAIT) as response:
                return response.status, response.headers.get_content_type(), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.headers.get_content_type(), error.read()

    def json(self, method: str, path: str, body: Union[bytes, Any, None] = None) -> Tuple[int, Any]:
        """``(status, decoded JSON body)``; fails unless the answer is JSON."""
        status, content_type, data = self.http(method, path, body)
        assert content_type == "application/json", (status, content_type, data)
        return status, json.loads(data)


@pytest.fixture
def wsgi_app() -> Iterator[WsgiAppServer]:
    server = WsgiAppServer()
    yield server
    server.stop()


@pytest.fixture
def wsgi_probe(wsgi_app: WsgiAppServer) -> Iterator[Callable[..., Tuple[ChatProbe, Dict[str, Any]]]]:
    """Factory: ``wsgi_probe(name, group=None)`` -> (a connected ChatProbe, its ``hello`` answer).

    The ``hello`` round trip marks the point from which the server knows the client; the
    answer is the client's entry as ``GET /clients`` shows it.
    """
    probes: List[ChatProbe] = []

    def factory(name: Optional[str], group: Optional[str] = None) -> Tuple[ChatProbe, Dict[str, Any]]:
        wsgi_probe = ChatProbe(wsgi_app.port, name, group)
        probes.append(wsgi_probe)
        return wsgi_probe, hello(wsgi_probe)

    yield factory
    for wsgi_probe in probes:
        wsgi_probe.close()


def hello(wsgi_probe: ChatProbe) -> Dict[str, Any]:
    """Round-trip a ``hello``; its answer.  Whatever the server sent before reading it has arrived."""
    start = len(wsgi_probe.messages)  # the list only grows
    wsgi_probe.client.send("hello")
    return wsgi_probe.wait_for(lambda c, m: c == "hello", start=start)[1]


def test_wsgi_app_lists_connected_clients_as_json(
    wsgi_app: WsgiAppServer, wsgi_probe: Callable[..., Tuple[ChatProbe, Dict[str, Any]]]
) -> None:
    assert wsgi_app.json("GET", "/clients") == (200, [])
    _, alice = wsgi_probe("alice", "red")
    _, bob = wsgi_probe("bob")
    assert alice["name"] == "alice" and alice["group"] == "red" and alice["address"].startswith(f"{LOOPBACK}:")
    assert bob["name"] == "bob" and bob["group"] is None
    status, clients = wsgi_app.json("GET", "/clients")
    assert status == 200
    assert sorted(clients, key=lambda c: c["name"]) == [alice, bob]


@pytest.mark.parametrize("field", ["name", "address"])
def test_wsgi_app_post_send_to_one_client_reaches_only_it(
    wsgi_app: WsgiAppServer, wsgi_probe: Callable[..., Tuple[ChatProbe, Dict[str, Any]]], field: str
) -> None:
    alice, alice_entry = wsgi_probe("alice")
    bob, _ = wsgi_probe("bob")
    content = {"text": "hi alice", "n": [1, 2.5, None, True]}
    status, answer = wsgi_app.json("POST", "/send", {"command": "news", "content": content, "to": alice_entry[field]})
    assert status == 200
    assert answer == {"sent": True, "command": "news", "recipients": [alice_entry["address"]]}
    assert alice.wait_for(lambda c, m: c == "news") == ("news", content)
    hello(bob)
    assert bob.received("news") == []


def test_wsgi_app_post_send_to_a_group_reaches_only_that_group(
    wsgi_app: WsgiAppServer, wsgi_probe: Callable[..., Tuple[ChatProbe, Dict[str, Any]]]
) -> None:
    alice, alice_entry = wsgi_probe("alice", "red")
    bob, bob_entry = wsgi_probe("bob", "red")
    carol, _ = wsgi_probe("carol", "blue")
    status, answer = wsgi_app.json("POST", "/send", {"command": "news", "content": "red only", "group": "red"})
    assert status == 200 and answer["sent"] is True
    assert sorted(answer["recipients"]) == sorted([alice_entry["address"], bob_entry["address"]])
    for member in (alice, bob):
        assert member.wait_for(lambda c, m: c == "news") == ("news", "red only")
    hello(carol)
    assert carol.received("news") == []


def test_wsgi_app_post_send_without_a_target_reaches_everyone(
    wsgi_app: WsgiAppServer, wsgi_probe: Callable[..., Tuple[ChatProbe, Dict[str, Any]]]
) -> None:
    probes = [wsgi_probe("alice", "red")[0], wsgi_probe("bob")[0]]
    status, answer = wsgi_app.json("POST", "/send", {"command": "news", "content": "to all"})
    assert status == 200 and len(answer["recipients"]) == 2
    for listener in probes:
        assert listener.wait_for(lambda c, m: c == "news") == ("news", "to all")


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/send", b"{not json", 400),
        ("POST", "/send", b"\xff\xfe", 400),
        ("POST", "/send", b"", 400),
        ("POST", "/send", ["news", "hi"], 400),
        ("POST", "/send", {"content": "no command"}, 400),
        ("POST", "/send", {"command": 5}, 400),
        ("POST", "/send", {"command": "$DISCONN$"}, 400),
        ("POST", "/send", {"command": "news", "to": 5}, 400),
        ("POST", "/send", {"command": "news", "to": "alice", "group": "red"}, 400),
        ("POST", "/send", {"command": "news", "to": "nobody"}, 404),
        ("POST", "/send", {"command": "news", "to": "127.0.0.1:1"}, 404),
        ("POST", "/send", {"command": "news", "group": "nobody-here"}, 404),
        ("POST", "/send", b"x" * (64 * 1024 + 1), 413),
        ("GET", "/send", None, 405),
        ("POST", "/clients", b"{}", 405),
        ("GET", "/nowhere", None, 404),
    ],
    ids=[
        "bad-json", "not-utf8", "empty", "not-an-object", "no-command", "command-not-str", "reserved-command",
        "to-not-str", "to-and-group", "unknown-name", "unknown-address", "unknown-group", "too-large",
        "wrong-method-send", "wrong-method-clients", "unknown-path",
    ],
)
def test_wsgi_app_answers_bad_requests_with_a_json_4xx_and_keeps_serving(
    wsgi_app: WsgiAppServer,
    wsgi_probe: Callable[..., Tuple[ChatProbe, Dict[str, Any]]],
    method: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    alice, _ = wsgi_probe("alice", "red")
    got_status, error = wsgi_app.json(method, path, body)
    assert got_status == status
    assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"]
    assert "Traceback" not in wsgi_app.output
    assert wsgi_app.json("POST", "/send", {"command": "news", "content": "still here", "to": "alice"})[0] == 200
    assert alice.wait_for(lambda c, m: c == "news") == ("news", "still here")


def test_wsgi_app_root_is_plain_text_help(wsgi_app: WsgiAppServer) -> None:
    status, content_type, body = wsgi_app.http("GET", "/")
    assert (status, content_type) == (200, "text/plain")
    assert "POST /send" in body.decode() and "GET /clients" in body.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_wsgi_app_closes_both_servers_and_exits_zero_on_signal(signum: int) -> None:
    server = WsgiAppServer()
    try:
        client = hisock_gevent.threaded_connect((LOOPBACK, server.port), name="watcher")
        disconnected = threading.Event()
        client.on("force_disconnect")(disconnected.set)
        client.start()
        client.wait_joined()  # the constructor returns once the hello is sent, not answered
        assert server.json("GET", "/clients")[1][0]["name"] == "watcher"
        server.signal(signum)
        assert server.wait() == 0, server.output
        assert disconnected.wait(WAIT), "the client was not told $DISCONN$"
        server.wait_for_line(r"wsgi_app INFO stopped$")
        with pytest.raises(OSError):
            socket.create_connection((LOOPBACK, server.http_port), timeout=WAIT).close()
        client.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- every example


@pytest.mark.parametrize("script", sorted(path.name for path in EXAMPLES.glob("*.py")))
def test_example_opens_with_a_docstring_saying_how_to_run_it(script: str) -> None:
    docstring = ast.get_docstring(ast.parse((EXAMPLES / script).read_text(encoding="utf-8")))
    assert docstring, f"{script} has no module docstring"
    assert f"python examples/{script}" in docstring, f"{script}'s docstring does not show how to run it"
