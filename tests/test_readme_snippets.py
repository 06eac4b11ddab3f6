"""The README's own code, as a newcomer would use it (issue 13, items 9 and 11).

The server snippet of the API guide, saved as it is, runs under ``hisock-gevent serve``
on the port the command names, whatever port the snippet itself says and even when that
port is taken; its ``broadcast`` handler does not fail for a sender outside any group, and
``serve`` says nothing about the snippet's own address, which it never served.  The
reconnecting client of "Beyond HiSock", saved as it is (its port aside), comes back when
its server does and says so.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cliprogram import Program
from conftest import wait_until

import hisock_gevent

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet_after(heading: str) -> str:
    """The first Python block after ``heading`` in the README."""
    text = README.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def server_snippet() -> str:
    return snippet_after("### A server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_server_snippet_runs_under_serve_on_the_port_the_command_names(tmp_path, caplog):
    code = server_snippet()
    assert "server.start()" in code and "6969" in code  # the snippet as documented
    (tmp_path / "myapp.py").write_text(code)
    port = free_port()
    # Whoever holds the snippet's own port, serve does not need it.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 6969))
        holder.listen(1)
    except OSError:
        pass  # someone else holds it already: just as good
    program = Program(["serve", "myapp:server", "--port", str(port)], cwd=tmp_path)
    try:
        host, served = program.address()
        assert served == port
        alice = hisock_gevent.HiSockClient((host, served), "alice")  # in no group
        bob = hisock_gevent.HiSockClient((host, served), "bob")
        assert alice.recv("welcome", timeout=10) == "hello, alice!"
        assert bob.recv("welcome", timeout=10) == "hello, bob!"
        alice.send("broadcast", "hi all")  # no group: the handler must not raise
        alice.send("slow_job", "job")
        assert alice.recv("done", timeout=10) == "job"
        bob.close()
        assert alice.recv("system", timeout=10) == "bob left"
        alice.close()
    finally:
        program.kill()
        holder.close()
    assert "Traceback" not in "".join(program.seen["stderr"])


def test_serve_names_the_address_it_cannot_bind(tmp_path):
    (tmp_path / "myapp.py").write_text(server_snippet())
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    program = Program(["serve", "myapp:server", "--port", str(taken)], cwd=tmp_path)
    try:
        line = program.expect(rf"127\.0\.0\.1:{taken}", "stderr", timeout=20)
        assert "in use" in line.string
        assert program.wait(timeout=20) == 2
    finally:
        program.kill()
        holder.close()


@pytest.mark.slow
def test_serve_logs_nothing_about_the_address_the_snippet_named(tmp_path):
    # The snippet's own server (127.0.0.1:6969) is made at import and dropped unbound:
    # a newcomer serving on another port must not read that a server at 6969 closed.
    (tmp_path / "myapp.py").write_text(server_snippet())
    program = Program(["serve", "myapp:server", "--port", "0"], cwd=tmp_path)
    try:
        host, port = program.address()
        assert port != 6969
        before = program.seen["stderr"][:-1]
        assert before == [], before
    finally:
        program.kill()


@pytest.mark.slow
def test_the_reconnect_snippet_comes_back_with_its_server(tmp_path):
    code = snippet_after("**Clients that reconnect.**")
    assert "reconnect=True" in code and '("127.0.0.1", 6969)' in code
    port = free_port()
    code = code.replace('("127.0.0.1", 6969)', f'("127.0.0.1", {port})')
    script = tmp_path / "snippet.py"
    # The snippet as a program would hold it: imported hisock_gevent, then stays alive.
    script.write_text("import time\n\nimport hisock_gevent\n\n" + code + "\ntime.sleep(60)\n")
    first = hisock_gevent.ThreadedHiSockServer(("127.0.0.1", port))
    first.start()
    proc = subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE, text=True)
    second = None
    try:
        wait_until(lambda: first.get_all_clients(), timeout=20, message="the snippet's client never joined")
        first.close()
        second = hisock_gevent.ThreadedHiSockServer(("127.0.0.1", port))
        second.start()
        wait_until(lambda: second.get_all_clients(), timeout=20, message="the snippet's client never came back")
        assert proc.stdout is not None
        assert proc.stdout.readline() == "back, as alice\n"
        (info,) = second.get_all_clients()
        assert (info.name, info.group) == ("alice", "red")
    finally:
        proc.kill()
        proc.wait(timeout=10)
        first.close()
        if second is not None:
            second.close()
