"""The ``hisock-gevent`` command, run as a real program in subprocesses."""

from __future__ import annotations

import json
import signal
import socket
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

import pytest
from cliprogram import HOST, WAIT, Program, hostport, one_shot

import hisock_gevent

pytestmark = pytest.mark.timeout(60)


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


# ---------------------------------------------------------------------- serve


@pytest.mark.slow
@pytest.mark.parametrize("target, made_by", [("cli_app:server", "instance"), ("cli_app:make_server", "factory")])
def test_serve_runs_the_app_on_the_given_port_and_send_wait_prints_the_reply(run, app_dir, target, made_by):
    server = run("serve", target, "--host", HOST, "--port", "0", cwd=app_dir)
    addr = server.address()
    assert addr[1] != 0

    result = one_shot("send", hostport(addr), "ping", '{"n": [1, 2]}', "--wait", "pong")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"echo": {"n": [1, 2]}, "made_by": made_by}


@pytest.mark.slow
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


@pytest.mark.slow
def test_send_wait_times_out_with_exit_status_1(run, app_dir):
    server = run("serve", "cli_app:make_server", "--port", "0", cwd=app_dir)
    addr = server.address()

    result = one_shot("send", hostport(addr), "unknown", "--wait", "never", "--timeout", "0.5")

    assert result.returncode == 1
    assert "never" in result.stderr


@pytest.mark.slow
def test_send_wait_stops_at_an_error_reply_and_exits_1_with_its_reason(run):
    chat = run("chat", "--port", "0")
    addr = chat.address()
    started = time.monotonic()

    result = one_shot(
        "send", hostport(addr), "whisper", '{"to": "nobody", "text": "psst"}', "--wait", "whisper", "--timeout", "30",
        timeout=40,
    )

    assert result.returncode == 1
    assert "the server answered error: no one is called 'nobody'" in result.stderr
    assert time.monotonic() - started < 15, "it waited for the timeout instead of stopping at the error"
    assert result.stdout == ""


@pytest.mark.slow
def test_send_wait_timeout_says_what_the_server_sent_instead(run):
    chat = run("chat", "--port", "0")
    addr = chat.address()

    result = one_shot("send", hostport(addr), "who", "--wait", "never", "--timeout", "1", "--name", "carol")

    assert result.returncode == 1
    assert "no 'never' within 1 s" in result.stderr
    assert 'who {"room": "", "names": ["carol"]}' in result.stderr


@pytest.mark.slow
def test_send_payload_is_text_by_default_and_json_with_the_json_flag(run):
    chat = run("chat", "--port", "0")
    addr = chat.address()

    as_text = one_shot("send", hostport(addr), "say", "42", "--wait", "said", "--name", "bob")
    as_json = one_shot("send", hostport(addr), "say", "42", "--json", "--wait", "said", "--name", "bob")

    assert as_text.returncode == 0, as_text.stderr
    assert json.loads(as_text.stdout) == {"from": "bob", "room": "", "text": "42"}
    assert as_json.returncode == 1
    assert "say needs a non-empty text" in as_json.stderr


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
        ["send", "127.0.0.1:6969", "say", "not json", "--json"],
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


@pytest.mark.slow
def test_serve_help_says_workers_take_a_server_made_at_import_as_well_as_a_factory():
    result = one_shot("serve", "--help")

    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "MODULE:ATTR may be a server made at import" in text
    assert "only such a factory works" not in text  # an instance works with --no-reuse-port too
    assert "Needs --port and a factory" not in text


def test_help_describes_every_subcommand():
    result = one_shot("--help")

    assert result.returncode == 0
    for subcommand in ("serve", "chat", "client", "send"):
        assert subcommand in result.stdout


# ---------------------------------------------------------------------- chat and the interactive client


@pytest.mark.slow
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


@pytest.mark.slow
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
