"""The ``hisock-gevent`` command, run as a real program in subprocesses."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

import hisock_gevent

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
WAIT = 10.0
SERVING_RE = re.compile(r"serving on ([\d.]+):(\d+)")

APP = '''
import hisock_gevent

server = hisock_gevent.HiSockServer(("127.0.0.1", 0))


@server.on("ping")
def ping(client, content):
    # Looks up the module global: serve replaces it when it rebuilds the server.
    server.send_client(client, "pong", {"echo": content, "made_by": "instance"})


def make_server(host="127.0.0.1", port=6969):
    made = hisock_gevent.HiSockServer((host, port))

    @made.on("ping")
    def ping(client, content):
        made.send_client(client, "pong", {"echo": content, "made_by": "factory"})

    return made


not_a_server = 42
'''


def command() -> List[str]:
    script = os.path.join(os.path.dirname(sys.executable), "hisock-gevent")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "hisock_gevent"]


class Program:
    """A running hisock-gevent process whose stdout and stderr are read line by line."""

    def __init__(self, args: List[str], cwd: Optional[Path] = None, stdin: bool = False):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            command() + args,
            cwd=str(cwd) if cwd else None,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: Dict[str, queue.Queue[str]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        for name in ("stdout", "stderr"):
            threading.Thread(target=self._pump, args=(name,), daemon=True).start()

    def _pump(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.lines[name].put(line)

    def expect(self, pattern: str, stream: str = "stdout", timeout: float = WAIT) -> re.Match:
        """The first (new) line of ``stream`` matching ``pattern``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} on {stream}; saw {self.seen[stream]!r}")
            try:
                line = self.lines[stream].get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen[stream].append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def address(self) -> Tuple[str, int]:
        match = self.expect(SERVING_RE.pattern, "stderr")
        return match.group(1), int(match.group(2))

    def wait(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=WAIT)


@pytest.fixture
def run():
    """Start hisock-gevent programs; every one still running is killed (by pid) afterwards."""
    started: List[Program] = []

    def start(*args: str, cwd: Optional[Path] = None, stdin: bool = False) -> Program:
        program = Program(list(args), cwd=cwd, stdin=stdin)
        started.append(program)
        return program

    yield start
    for program in started:
        program.kill()


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cli_app.py").write_text(textwrap.dedent(APP))
    return tmp_path


def one_shot(*args: str, cwd: Optional[Path] = None, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(command() + list(args), cwd=str(cwd) if cwd else None, capture_output=True, text=True, timeout=timeout)


def hostport(addr: Tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


# ---------------------------------------------------------------------- serve


@pytest.mark.parametrize("target, made_by", [("cli_app:server", "instance"), ("cli_app:make_server", "factory")])
def test_serve_runs_the_app_on_the_given_port_and_send_wait_prints_the_reply(run, app_dir, target, made_by):
    server = run("serve", target, "--host", HOST, "--port", "0", cwd=app_dir)
    addr = server.address()
    assert addr[1] != 0

    result = one_shot("send", hostport(addr), "ping", '{"n": [1, 2]}', "--wait", "pong")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"echo": {"n": [1, 2]}, "made_by": made_by}


@pytest.mark.parametrize("target", ["cli_app:server", "cli_app:make_server"])
def test_serve_stats_port_serves_json_and_prometheus_text_that_follow_the_traffic(run, app_dir, target):
    from prometheus_client.parser import text_string_to_metric_families

    server = run("serve", target, "--port", "0", "--stats-port", "0", cwd=app_dir)
    stats_url = "http://{}:{}".format(*server.expect(r"stats at http://([\d.]+):(\d+)/", "stderr").groups())
    addr = server.address()

    def get(path: str) -> str:
        with urllib.request.urlopen(stats_url + path, timeout=WAIT) as response:
            assert response.status == 200
            return response.read().decode()

    before = json.loads(get("/stats"))
    assert before["address"] == hostport(addr)
    assert before["connections"]["accepted"] == 0 and before["messages"] == {"in": 0, "out": 0}

    for n in range(3):
        result = one_shot("send", hostport(addr), "ping", str(n), "--wait", "pong", "--group", "g")
        assert result.returncode == 0, result.stderr

    after = json.loads(get("/stats"))
    assert after["connections"]["accepted"] == 3
    assert after["clients"]["joins"] == 3
    # Each one-shot client: at least its hello and ping in (its goodbye may still be on the
    # way), and its join answer and the pong out.
    assert after["messages"]["in"] >= 6 and after["messages"]["out"] >= 6
    assert after["bytes"]["in"] > 0 and after["bytes"]["out"] > 0

    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(get("/metrics"))
        for sample in family.samples
        if not sample.labels
    }
    assert samples["hisock_connections_accepted_total"] == 3
    assert samples["hisock_messages_received_total"] >= after["messages"]["in"]


def test_sigterm_closes_the_server_disconnects_clients_and_exits_0(run, app_dir):
    server = run("serve", "cli_app:make_server", "--port", "0", cwd=app_dir)
    addr = server.address()
    client = hisock_gevent.connect(addr, name="watcher")
    try:
        client.send("ping", "x")
        assert client.recv("pong", timeout=WAIT)["echo"] == "x"

        server.proc.send_signal(signal.SIGTERM)

        assert server.wait() == 0
        with pytest.raises(hisock_gevent.ClientDisconnected):
            client.recv(timeout=WAIT)
    finally:
        client.close()
    server.expect("stopped", "stderr")


def test_send_wait_times_out_with_exit_status_1(run, app_dir):
    server = run("serve", "cli_app:make_server", "--port", "0", cwd=app_dir)
    addr = server.address()

    result = one_shot("send", hostport(addr), "unknown", "--wait", "never", "--timeout", "0.5")

    assert result.returncode == 1
    assert "never" in result.stderr


def test_send_to_a_closed_port_exits_2_quickly():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    started = time.monotonic()

    result = one_shot("send", f"{HOST}:{port}", "ping")

    assert result.returncode == 2
    assert time.monotonic() - started < 5
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["send", "not-an-address", "ping"],
        ["client", "127.0.0.1:notaport"],
        ["send", "127.0.0.1:70000", "ping"],
        ["serve", "no_such_module_xyz:app"],
        ["serve", "cli_app:missing"],
        ["serve", "cli_app:not_a_server"],
        ["serve", "cli_app"],
        ["serve", "cli_app:server", "--port", "abc"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_give_a_one_line_error_and_exit_status_2(app_dir, args):
    result = one_shot(*args, cwd=app_dir)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr


def test_serve_help_says_workers_take_a_server_made_at_import_as_well_as_a_factory():
    result = one_shot("serve", "--help")

    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "MODULE:ATTR may be a server made at import" in text
    assert "with --no-reuse-port only such a factory works" in text
    assert "Needs --port and a factory" not in text


def test_help_describes_every_subcommand():
    result = one_shot("--help")

    assert result.returncode == 0
    for subcommand in ("serve", "chat", "client", "send"):
        assert subcommand in result.stdout


# ---------------------------------------------------------------------- chat and the interactive client


def test_chat_clients_talk_through_the_chat_server_and_the_client_exits_0_on_eof(run):
    chat = run("chat", "--port", "0")
    addr = chat.address()
    alice = run("client", hostport(addr), "--name", "alice", stdin=True)
    alice.expect("connected to", "stderr")

    said = one_shot("send", hostport(addr), "say", "hello from bob", "--name", "bob")
    assert said.returncode == 0, said.stderr
    alice.expect(r"\+ joined: bob")
    said_line = alice.expect(r"\] said ")
    assert "hello from bob" in said_line.string

    alice.proc.stdin.write("say hi from alice\n")
    alice.proc.stdin.flush()
    assert "hi from alice" in alice.expect(r"\] said ").string

    who = one_shot("send", hostport(addr), "who", "--wait", "who", "--name", "carol")
    assert who.returncode == 0, who.stderr
    assert {"alice", "carol"} <= set(json.loads(who.stdout)["names"])

    alice.proc.stdin.close()
    assert alice.wait() == 0


def test_serve_on_a_port_in_use_gives_a_one_line_error_and_exit_status_2(app_dir):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]

        result = one_shot("serve", "cli_app:server", "--port", str(port), cwd=app_dir)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"cannot serve on {HOST}:{port}" in result.stderr


def test_interactive_client_shows_the_forced_disconnect_and_exits_1_when_the_server_stops(run, app_dir):
    server = run("serve", "cli_app:make_server", "--port", "0", cwd=app_dir)
    addr = server.address()
    client = run("client", hostport(addr), "--name", "zed", stdin=True)
    client.proc.stdin.write('ping {"k": "v"}\n')
    client.proc.stdin.flush()
    assert json.loads(client.expect(r"\] pong (.*)$").group(1)) == {"echo": {"k": "v"}, "made_by": "factory"}

    server.proc.send_signal(signal.SIGINT)

    assert server.wait() == 0
    client.expect("the server disconnected us")
    assert client.wait() == 1
