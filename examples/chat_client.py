r"""Chat client for ``chat_server.py``: type lines to talk, slash commands for the rest.

Shows a ThreadedHiSockClient (``threaded_connect``): the client receives and calls its
handlers on its own thread, so the main thread is free to block in ``input()``.  Incoming
messages are printed with a timestamp as they arrive.

Run the server first (see ``chat_server.py``), then, from the project root::

    python examples/chat_client.py --name alice                 # interactive
    python examples/chat_client.py --name bob --room games      # start in room "games"

Typed lines:

    some text          say it to your room (or to everyone when you are in no room)
    /nick NAME         change your name
    /join ROOM         move to another room ("/join" alone: back to your starting room)
    /w NAME text       whisper to one person
    /who               list the people in your room
    /quit              leave (end of input, Ctrl-D, does the same)

Non-interactive use, e.g. from scripts and tests::

    python examples/chat_client.py --name bot --say "hello" --count 3   # say it 3 times, see it come back 3 times, leave
    printf 'hi\n/who\n' | python examples/chat_client.py --name bot    # run the lines, leave at EOF
    printf '/who\n' | python examples/chat_client.py --name bot --linger 1   # ...and print answers for 1 s

With ``--say`` the client waits (up to 5 s) until the server has sent each of its lines
back to it, so they are printed before it leaves; ``--linger`` adds time for other answers.

Exit status: 0 after /quit or end of input, 1 when the server closed the connection,
2 when the server cannot be reached.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any, List, Optional

import hisock_gevent

HELP = "commands: text | /nick NAME | /join ROOM | /w NAME text | /who | /quit"
#: With --say, the longest wait for the server to send our own lines back to us.
ECHO_WAIT = 5.0


def stamp() -> str:
    return time.strftime("%H:%M:%S")


_print_lock = threading.Lock()


def show(line: str) -> None:
    """Print one timestamped line; safe from the client's thread and the main thread at once."""
    with _print_lock:
        # One write per line, so lines from two threads never interleave.
        sys.stdout.write(f"[{stamp()}] {line}\n")
        sys.stdout.flush()


def text_of(content: Any, key: str) -> str:
    """``content[key]`` as display text, whatever a server sent us."""
    if isinstance(content, dict):
        value = content.get(key, "")
        return value if isinstance(value, str) else repr(value)
    return ""


class ServerGone(Exception):
    """Raised in the main thread (blocked in input()) when the connection ends on its own."""


def _raise_server_gone(signum: int, frame: Any) -> None:
    raise ServerGone()


def install_wakeup() -> None:
    """Let :func:`wake_main_thread` interrupt a blocking ``input()`` (call from the main thread)."""
    if hasattr(signal, "pthread_kill") and hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, _raise_server_gone)


def wake_main_thread() -> None:
    """Make the main thread raise ServerGone (or KeyboardInterrupt where there are no signals)."""
    if hasattr(signal, "pthread_kill") and hasattr(signal, "SIGUSR1"):
        # A real signal aimed at the main thread interrupts its blocking read at once.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # type: ignore[arg-type]
    else:
        import _thread

        _thread.interrupt_main()


class ChatClient:
    """The chat client: a ThreadedHiSockClient plus the line commands."""

    def __init__(self, host: str, port: int, name: Optional[str], room: Optional[str]):
        self.client = hisock_gevent.threaded_connect((host, port), name=name, group=room)
        self.quitting = False
        self.server_gone = threading.Event()
        # How others see us (the chat server shows the address of a client without a name),
        # and what the server has sent back of our own lines, by text.
        self.me = name or hisock_gevent.iptup_to_str(self.client.get_client_addr())
        self._own_lines: Counter[str] = Counter()
        self._heard = threading.Condition()
        on = self.client.on
        on("said")(self.on_said)
        on("whisper")(self.on_whisper)
        on("system")(self.on_system)
        on("who")(self.on_who)
        on("error")(self.on_error)
        on("force_disconnect")(self.on_force_disconnect)
        on("*")(self.on_other)

    # ---------------------------------------------------------------- incoming

    def on_said(self, content: Any) -> None:
        room = text_of(content, "room")
        where = f"@{room}" if room else ""
        show(f"<{text_of(content, 'from')}{where}> {text_of(content, 'text')}")
        if text_of(content, "from") == self.me:
            with self._heard:
                self._own_lines[text_of(content, "text")] += 1
                self._heard.notify_all()

    def on_whisper(self, content: Any) -> None:
        show(f"*{text_of(content, 'from')} whispers* {text_of(content, 'text')}")

    def on_system(self, content: Any) -> None:
        show(f"* {text_of(content, 'text') if isinstance(content, dict) else content}")

    def on_who(self, content: Any) -> None:
        names = content.get("names", []) if isinstance(content, dict) else []
        room = text_of(content, "room")
        label = f"room {room!r}" if room else "the lobby"
        show(f"in {label}: {', '.join(str(name) for name in names) or '(nobody)'}")

    def on_error(self, content: Any) -> None:
        show(f"! {content}")

    def on_other(self, command: str, content: Any) -> None:
        show(f"({command}) {content!r}")

    def on_force_disconnect(self) -> None:
        show("the server disconnected us")

    # ---------------------------------------------------------------- outgoing

    def handle_line(self, line: str) -> bool:
        """Act on one typed line; False when the user asked to quit."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.client.send("say", line)
            return True
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if command == "/quit":
            return False
        if command == "/nick":
            if not rest:
                show("usage: /nick NAME")
            else:
                self.client.change_name(rest)
        elif command == "/join":
            self.client.change_group(rest or None)
        elif command in ("/w", "/whisper", "/msg"):
            target, _, text = rest.partition(" ")
            if not target or not text.strip():
                show("usage: /w NAME text")
            else:
                self.client.send("whisper", {"to": target, "text": text.strip()})
                show(f"-> {target}: {text.strip()}")
        elif command == "/who":
            self.client.send("who")
        else:
            show(f"unknown command {command}; {HELP}")
        return True

    # ---------------------------------------------------------------- running

    def start(self) -> None:
        self.client.start()
        # Wake the main thread (blocked in input()) when the connection ends on its own.
        threading.Thread(target=self._watch_connection, name="chat-watch", daemon=True).start()

    def _watch_connection(self) -> None:
        self.client.join()
        if self.quitting:
            return
        self.server_gone.set()
        with self._heard:
            self._heard.notify_all()
        show("connection closed")
        wake_main_thread()

    def send_line(self, line: str) -> bool:
        try:
            return self.handle_line(line)
        except hisock_gevent.ClientDisconnected:
            self.server_gone.set()
            return False

    def wait_for_own_lines(self, text: str, count: int, timeout: float) -> int:
        """Wait until the server has sent ``count`` of our lines saying ``text`` back to us,
        the connection ends, or ``timeout`` seconds pass; how many came back."""
        with self._heard:
            self._heard.wait_for(lambda: self._own_lines[text] >= count or self.server_gone.is_set(), timeout)
            return self._own_lines[text]

    def close(self) -> None:
        self.quitting = True
        self.client.close()


def read_lines(chat: ChatClient) -> bool:
    """Send typed (or piped) lines until /quit or the end of input; True at the end of input."""
    if sys.stdin.isatty():
        show(HELP)
    while not chat.server_gone.is_set():
        try:
            line = input()
        except EOFError:
            return True
        if not chat.send_line(line):
            return False
    return False


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="hisock_gevent chat client (see chat_server.py)")
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=6969, help="server port (default 6969)")
    parser.add_argument("--name", default=None, help="your name (default: none; others see your address)")
    parser.add_argument("--room", default=None, help="room to start in (default: none, the lobby)")
    parser.add_argument("--say", default=None, help="non-interactive: say TEXT --count times, then leave")
    parser.add_argument("--count", type=int, default=1, help="with --say: how many times (default 1)")
    parser.add_argument(
        "--linger", type=float, default=0.0,
        help="after the end of input (or --say), keep printing incoming messages this many seconds before leaving",
    )
    args = parser.parse_args(argv)

    try:
        chat = ChatClient(args.host, args.port, args.name, args.room)
    except (hisock_gevent.ServerNotRunning, hisock_gevent.ConnectionRejected) as exc:
        print(f"cannot connect: {exc}", file=sys.stderr)
        return 2
    show(f"connected to {args.host}:{args.port} as {chat.me}" + (f" in room {args.room!r}" if args.room else ""))
    install_wakeup()
    chat.start()

    try:
        if args.say is not None:
            input_ended = True
            sent = 0
            for _ in range(args.count):
                if not chat.send_line(args.say):
                    input_ended = False
                    break
                sent += 1
            # The server strips what we say, and answers a blank line with an error.
            said = args.say.strip()
            if input_ended and said and not said.startswith("/"):
                heard = chat.wait_for_own_lines(said, sent, ECHO_WAIT)
                if heard < sent and not chat.server_gone.is_set():
                    show(f"! only {heard} of {sent} lines came back within {ECHO_WAIT:g} s")
        else:
            input_ended = read_lines(chat)
        if input_ended and args.linger > 0:
            # Stay a little to print the answers to what was just sent.
            chat.server_gone.wait(args.linger)
    except (KeyboardInterrupt, ServerGone):
        pass
    finally:
        gone = chat.server_gone.is_set()
        chat.close()
    if gone:
        return 1
    show("bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
