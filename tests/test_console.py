"""``hisock-gevent client``: the prompt in a terminal, and the same lines read from a pipe.

The server is a ThreadedHiSockServer in this process on a free loopback port, so each
test sees exactly what reached it.  The terminal tests run the client in a pseudo-terminal
and read the screen through a terminal emulator (pyte); every wait is on the screen, the
client's output or a message reaching the server, with a timeout.
"""

from __future__ import annotations

import queue
import textwrap
from typing import Any, Iterator, List, Optional, Tuple

import pytest
from cliprogram import WAIT, Program, Terminal, hostport

import hisock_gevent

pytestmark = pytest.mark.timeout(60)


class Heard:
    """What reached the server, in order: ("cmd", command, content), ("name", old, new), ("group", old, new)."""

    def __init__(self, server: hisock_gevent.ThreadedHiSockServer):
        self.events: queue.Queue[Tuple[Any, ...]] = queue.Queue()
        self.joins: queue.Queue[hisock_gevent.ClientInfo] = queue.Queue()
        server.on("join")(self.joins.put)
        server.on("*")(lambda client, command, content: self.events.put(("cmd", command, content)))
        server.on("name_change")(lambda client, old, new: self.events.put(("name", old, new)))
        server.on("group_change")(lambda client, old, new: self.events.put(("group", old, new)))

    def next(self, timeout: float = WAIT) -> Tuple[Any, ...]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing reached the server within {timeout} s") from None

    def joined(self, timeout: float = WAIT) -> hisock_gevent.ClientInfo:
        try:
            return self.joins.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nobody joined within {timeout} s") from None

    def take(self, count: int) -> List[Tuple[Any, ...]]:
        return [self.next() for _ in range(count)]


@pytest.fixture
def served(make_server) -> Iterator[Tuple[hisock_gevent.ThreadedHiSockServer, Heard]]:
    server = make_server()
    heard = Heard(server)
    server.start()
    yield server, heard


@pytest.fixture
def terminals() -> Iterator[List[Terminal]]:
    opened: List[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


@pytest.fixture
def programs() -> Iterator[List[Program]]:
    started: List[Program] = []
    yield started
    for program in started:
        program.kill()


def open_client(terminals: List[Terminal], server: hisock_gevent.ThreadedHiSockServer, *args: str) -> Terminal:
    terminal = Terminal(["client", hostport(server.get_addr()), *args])
    terminals.append(terminal)
    return terminal


def piped_client(programs: List[Program], server: hisock_gevent.ThreadedHiSockServer, lines: List[str], *args: str) -> Program:
    """A client reading ``lines`` from a pipe, which is then closed (end of input)."""
    program = Program(["client", hostport(server.get_addr()), *args], stdin=True)
    programs.append(program)
    assert program.proc.stdin is not None
    program.proc.stdin.write("".join(line + "\n" for line in lines))
    program.proc.stdin.close()
    return program


def enter(terminal: Terminal, prompt: str, keys: str, shown: Optional[str] = None) -> None:
    """Type ``keys`` and Enter, then wait for the line (``shown``, default ``keys``) above the next
    empty prompt: keys typed before that prompt would be echoed by the terminal."""
    terminal.type(keys + "\r")
    line = shown if shown is not None else keys
    terminal.wait_for(
        lambda s: s.cursor_line == prompt and any(row.endswith(f"> {line}") for row in s.lines[: s.cursor_row]),
        f"the prompt after {line!r}",
    )


# ---------------------------------------------------------------------- in a terminal


def test_a_message_arriving_while_typing_is_printed_above_the_line_which_stays_intact(terminals, served):
    server, heard = served
    terminal = open_client(terminals, server, "--name", "alice", "--group", "lobby")
    terminal.wait_for(lambda s: s.cursor_line == "alice@lobby>", "the prompt")
    alice = heard.joined()

    terminal.type("say partial")
    terminal.wait_for(lambda s: s.cursor_line == "alice@lobby> say partial", "the partial line")
    server.send_client(alice, "notice", "pushed while typing")

    screen = terminal.wait_for(lambda s: s.row_of('notice "pushed while typing"') >= 0, "the pushed message")
    screen = terminal.wait_for(
        lambda s: s.cursor_line == "alice@lobby> say partial" and s.cursor_row > s.row_of('notice "pushed while typing"'),
        "the partial line redrawn below the message",
    )
    assert "partial" not in screen.lines[screen.row_of("pushed while typing")]

    terminal.type(" and the rest\r")
    assert heard.next() == ("cmd", "say", "partial and the rest")


def test_arrow_up_recalls_earlier_lines_and_no_escape_sequence_reaches_the_server(terminals, served):
    server, heard = served
    terminal = open_client(terminals, server, "--name", "alice")
    terminal.wait_for(lambda s: s.cursor_line == "alice>", "the prompt")

    enter(terminal, "alice>", "say one")
    enter(terminal, "alice>", "say two")
    assert heard.take(2) == [("cmd", "say", "one"), ("cmd", "say", "two")]

    terminal.type("\x1b[A")
    terminal.wait_for(lambda s: s.cursor_line == "alice> say two", "the last line recalled")
    terminal.type("\x1b[A")
    terminal.wait_for(lambda s: s.cursor_line == "alice> say one", "the line before it recalled")
    enter(terminal, "alice>", "\x1b[D\x1b[D\x1b[DX", shown="say Xone")  # arrow left three times, then an edit

    assert heard.next() == ("cmd", "say", "Xone")
    terminal.type("\x04")
    assert terminal.wait() == 0
    assert heard.events.empty()


def test_name_and_group_commands_change_them_on_the_server_and_in_the_prompt(terminals, served):
    server, heard = served
    terminal = open_client(terminals, server, "--name", "alice", "--group", "lobby")
    terminal.wait_for(lambda s: s.cursor_line == "alice@lobby>", "the prompt")

    enter(terminal, "bob@lobby>", "/name bob")
    assert heard.next() == ("name", "alice", "bob")
    enter(terminal, "bob@room2>", "/group room2")
    assert heard.next() == ("group", "lobby", "room2")


@pytest.mark.slow
def test_the_prompt_ends_with_exit_status_1_when_the_server_closes(terminals, served):
    server, _ = served
    terminal = open_client(terminals, server, "--name", "alice")
    terminal.wait_for(lambda s: s.cursor_line == "alice>", "the prompt")
    terminal.type("say unfinished")
    terminal.wait_for(lambda s: s.cursor_line.endswith("say unfinished"), "the typed text")

    server.close()

    terminal.wait_for(lambda s: s.row_of("the server disconnected us") >= 0, "the disconnection")
    terminal.wait_for(lambda s: s.row_of("the server closed the connection") >= 0, "the closing notice")
    assert terminal.wait() == 1


def test_without_prompt_toolkit_a_terminal_gets_plain_input(terminals, served):
    server, heard = served
    # prompt_toolkit made unimportable, then the command as usual.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["prompt_toolkit"] = None
        from hisock_gevent.cli import main
        sys.argv[0] = "hisock-gevent"
        sys.exit(main())
        """
    )
    terminal = Terminal(["client", hostport(server.get_addr()), "--name", "alice"], python_code=code)
    terminals.append(terminal)
    terminal.wait_for(lambda s: s.row_of("prompt_toolkit is not installed") >= 0, "the notice")
    # Without prompt_toolkit the join notice may land before or inside the prompt (which is
    # what the notice warns of): wait for both, wherever they are.
    terminal.wait_for(lambda s: s.row_of("joined: alice") >= 0 and s.row_of("alice>") >= 0, "the plain prompt")

    terminal.type("say plain\r")

    assert heard.next() == ("cmd", "say", "plain")
    terminal.type("\x04")
    assert terminal.wait() == 0


# ---------------------------------------------------------------------- from a pipe


def test_payloads_are_text_unless_json_objects_and_json_mode_sends_json_values(programs, served):
    server, heard = served
    client = piped_client(
        programs, server,
        ["say 42", "say true", 'whisper {"to": "bob", "text": "hi"}', "say [afk] back", "/json", "say 42", 'say "42"', "say null"],
        "--name", "alice",
    )

    got = heard.take(7)

    assert got == [
        ("cmd", "say", "42"),
        ("cmd", "say", "true"),
        ("cmd", "whisper", {"to": "bob", "text": "hi"}),
        ("cmd", "say", "[afk] back"),
        ("cmd", "say", 42),
        ("cmd", "say", "42"),
        ("cmd", "say", None),
    ]
    assert type(got[4][2]) is int
    assert client.wait() == 0
    client.expect(r"sent whisper with a JSON object", "stderr")


def test_json_mode_refuses_a_payload_that_is_not_json_and_sends_nothing(programs, served):
    server, heard = served
    client = piped_client(programs, server, ["say not json", 'say "after"'], "--name", "alice", "--json")

    client.expect(r"not JSON", "stderr")
    assert heard.next() == ("cmd", "say", "after")  # the refused line never arrived before it
    assert client.wait() == 0


def test_local_commands_never_reach_the_server_and_double_slash_sends_a_slash_command(programs, served):
    server, heard = served
    client = piped_client(programs, server, ["/help", "/frobnicate", "/name bob", "//me waves", "/quit", "say never"], "--name", "alice")

    assert heard.take(2) == [("name", "alice", "bob"), ("cmd", "/me", "waves")]
    client.expect(r"/name \[NAME\]")
    client.expect(r"no local command /frobnicate", "stderr")
    assert client.wait() == 0
    assert heard.events.empty()  # /quit left before "say never"
