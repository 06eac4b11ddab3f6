"""Limits both sides know, as a person at the terminal meets them (issue 17): a line too
long for the server is refused by the client with the server's limit in the message,
instead of the connection just closing."""

from __future__ import annotations

import pytest
from cliprogram import Program

pytestmark = pytest.mark.timeout(60)


def test_a_line_over_the_servers_limit_is_refused_with_that_limit():
    server = Program(["chat", "--port", "0"])
    client = None
    try:
        host, port = server.address()
        client = Program(["client", f"{host}:{port}", "--name", "piper"], stdin=True)
        client.expect("joined: piper")
        assert client.proc.stdin is not None
        client.proc.stdin.write("say " + "x" * (17 * 1024 * 1024) + "\n")
        client.proc.stdin.flush()
        line = client.expect(r"more than the 16777216-byte limit", "stderr", timeout=30)
        assert "cannot send 'say'" in line.string
        client.proc.stdin.write("say still here\n")  # and the connection is still up
        client.proc.stdin.flush()
        client.expect("still here")
    finally:
        if client is not None:
            client.kill()
        server.kill()
