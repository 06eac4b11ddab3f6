"""The interactive client behind ``hisock-gevent client``: a prompt in, everything received out.

What a typed line means (local ``/`` commands, the payload rule) is decided in
:mod:`hisock_gevent.lines`; this module connects that to a terminal and a client.
:class:`Console` has two front ends:

* **a terminal with prompt_toolkit** (stdin and stdout are TTYs): a prompt showing your
  name and group, with line editing and a history (up/down).  What arrives is printed
  above the prompt, and the line being typed is redrawn intact below it
  (prompt_toolkit's ``patch_stdout``).
* **plain lines** (stdin is a pipe or a file, or prompt_toolkit is missing): lines are
  read with ``input()``; on a terminal the stdlib ``readline`` gives line editing, but
  an incoming message may land in the middle of the line being typed.

Threads, and why nothing polls: the program is not monkey-patched, so the
:class:`~hisock_gevent.ThreadedHiSockClient` receives and runs its handlers on its own
OS thread with its own gevent hub, while the main thread reads lines (prompt_toolkit's
asyncio loop, or ``input()``).  Handlers write to ``sys.stdout``, which prompt_toolkit's
proxy makes thread-safe (it hands the text to the asyncio loop with
``call_soon_threadsafe``); the main thread sends through the client's thread-safe
methods.  When the connection ends on its own, a watcher thread blocked in
``client.join()`` wakes the main thread: a future set with ``call_soon_threadsafe`` ends
the prompt, or, under ``input()``, a SIGUSR1 aimed at the main thread interrupts the read.

This is a program's front end: it prints to the terminal, where the library only logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, List

from .client import ThreadedHiSockClient
from .errors import ClientDisconnected, InvalidTypeCast
from .lines import (
    LineError,
    Local,
    Send,
    describe_type,
    format_content,
    help_text,
    parse_line,
    visible,
)
from .utils import ClientInfo, iptup_to_str

__all__ = ["Console", "prompt_toolkit_available"]

PROG = "hisock-gevent"


def prompt_toolkit_available() -> bool:
    """True when prompt_toolkit can be imported."""
    try:
        import prompt_toolkit  # noqa: F401
    except ImportError:
        return False
    return True


class _ServerGone(Exception):
    """Ends the read of a line when the connection ended on its own."""


def _describe_client(info: ClientInfo) -> str:
    label = visible(info.name) if info.name else info.ipstr
    extra = f" ({info.ipstr})" if info.name else ""
    group = f" in group {visible(info.group)!r}" if info.group else ""
    return f"{label}{extra}{group}"


class Console:
    """A connected ThreadedHiSockClient driven by typed lines; see the module docstring.

    :param client: connected, not yet started.
    :param json_mode: start in JSON mode (every payload is JSON).
    """

    def __init__(self, client: ThreadedHiSockClient, json_mode: bool = False):
        self.client = client
        self.json_mode = json_mode
        #: Set when the connection ended without us leaving.
        self.gone = threading.Event()
        self._leaving = False
        self._print_lock = threading.Lock()
        #: Interrupts the main thread's read of a line; set by the running front end.
        self._wake: Callable[[], None] = lambda: None
        client.on("*")(self._on_command)
        client.on("client_connect")(self._on_join)
        client.on("client_disconnect")(self._on_leave)
        client.on("force_disconnect")(self._on_force_disconnect)

    # ---------------------------------------------------------------- output

    def show(self, line: str) -> None:
        """One timestamped line on stdout (safe from any thread)."""
        with self._print_lock:
            # sys.stdout is looked up each time: under the prompt it is prompt_toolkit's proxy.
            sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
            sys.stdout.flush()

    def notice(self, text: str) -> None:
        """A message from this program (not from the server) on stderr."""
        with self._print_lock:
            sys.stderr.write(f"{PROG}: {text}\n")
            sys.stderr.flush()

    def prompt_text(self) -> str:
        """``name@group> `` (the address when nameless), with ``[json]`` in JSON mode."""
        name = self.client.name or iptup_to_str(self.client.get_client_addr())
        group = f"@{self.client.group}" if self.client.group else ""
        mode = " [json]" if self.json_mode else ""
        return visible(f"{name}{group}{mode}> ")

    # ---------------------------------------------------------------- incoming (the client's thread)

    def _on_command(self, command: str, content: Any) -> None:
        self.show(f"{visible(command)} {format_content(content)}")

    def _on_join(self, info: ClientInfo) -> None:
        self.show(f"+ joined: {_describe_client(info)}")

    def _on_leave(self, info: ClientInfo) -> None:
        self.show(f"- left: {_describe_client(info)}")

    def _on_force_disconnect(self) -> None:
        reason = self.client.disconnect_reason
        self.show("! the server disconnected us" + (f": {reason}" if reason else ""))

    def _watch(self) -> None:
        """Wake the main thread when the connection ends without us leaving."""
        self.client.join()
        if self._leaving:
            return
        self.gone.set()
        self._wake()

    # ---------------------------------------------------------------- outgoing (the main thread)

    def act(self, line: str) -> bool:
        """Do what one typed line says; False when it is time to leave."""
        try:
            action = parse_line(line, self.json_mode)
        except LineError as exc:
            self.notice(str(exc))
            return True
        try:
            if isinstance(action, Send):
                return self._send(action)
            if isinstance(action, Local):
                return self._local(action)
        except ClientDisconnected:
            self.gone.set()
            return False
        return True

    def _send(self, action: Send) -> bool:
        try:
            self.client.send(action.command, action.content)
        except (ValueError, TypeError, InvalidTypeCast) as exc:
            self.notice(f"cannot send {action.command!r}: {exc}")
            return True
        if action.content is not None and not isinstance(action.content, str):
            self.notice(f"sent {action.command} with {describe_type(action.content)}")
        return True

    def _local(self, action: Local) -> bool:
        name, argument = action.name, action.argument
        if name == "quit":
            return False
        if name == "help":
            with self._print_lock:
                print(help_text(self.json_mode), flush=True)
        elif name == "json":
            self.json_mode = not self.json_mode
            self.notice("JSON mode on: payloads are JSON (\"text\" in quotes)" if self.json_mode
                        else "JSON mode off: payloads are text, {...} and [...] are JSON")
        elif name == "name":
            self.client.change_name(argument or None)
            self.notice(f"name: {self.client.name or '(none)'}")
        elif name == "group":
            self.client.change_group(argument or None)
            self.notice(f"group: {self.client.group or '(none)'}")
        return True

    # ---------------------------------------------------------------- running

    def run(self) -> int:
        """Start the client and read lines until Ctrl-D, ``/quit`` or the server goes.

        :returns: 0 when we left, 1 when the server closed the connection.
        """
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        use_prompt = interactive and prompt_toolkit_available()
        if interactive and not use_prompt:
            self.notice("prompt_toolkit is not installed: incoming messages may break into the line you type")
        self.client.start()
        threading.Thread(target=self._watch, name="hisock-console-watch", daemon=True).start()
        try:
            if use_prompt:
                asyncio.run(self._read_with_prompt())
            else:
                self._read_plain(interactive)
        except (EOFError, KeyboardInterrupt, _ServerGone):
            pass
        finally:
            self._leaving = True
            self.client.close()
        if self.gone.is_set():
            self.notice("the server closed the connection")
            return 1
        return 0

    async def _read_with_prompt(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        loop = asyncio.get_running_loop()
        gone = loop.create_future()

        def set_gone() -> None:
            if not gone.done():
                gone.set_result(None)

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are leaving anyway
                loop.call_soon_threadsafe(set_gone)

        self._wake = wake
        session: PromptSession[str] = PromptSession()
        with patch_stdout(), _logging_to(sys.stderr):
            while not self.gone.is_set():
                reading = asyncio.ensure_future(session.prompt_async(self.prompt_text))
                await asyncio.wait({reading, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    # The server went away while a line was being typed: end the prompt.
                    if session.app.is_running:
                        session.app.exit(exception=_ServerGone())
                    else:
                        reading.cancel()
                    with contextlib.suppress(_ServerGone, asyncio.CancelledError):
                        await reading
                    return
                if not self.act(reading.result()):
                    return

    def _read_plain(self, interactive: bool) -> None:
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        can_signal = hasattr(signal, "pthread_kill") and hasattr(signal, "SIGUSR1")
        reading = [False]
        if can_signal:
            main_ident = threading.main_thread().ident
            assert main_ident is not None

            def interrupt(signum: int, frame: Any) -> None:
                if reading[0]:
                    raise _ServerGone()

            signal.signal(signal.SIGUSR1, interrupt)
            # A signal aimed at the main thread interrupts its blocking read at once.
            self._wake = lambda: signal.pthread_kill(main_ident, signal.SIGUSR1)
        while not self.gone.is_set():
            reading[0] = True
            try:
                line = input(self.prompt_text() if interactive else "")
            finally:
                reading[0] = False
            if not self.act(line):
                return


@contextlib.contextmanager
def _logging_to(stream: Any) -> Iterator[None]:
    """Point the logging handlers writing to the real stderr at ``stream`` for a while.

    Under the prompt, ``stream`` is prompt_toolkit's proxy: a warning logged by the
    library then appears above the prompt instead of inside it.
    """
    moved: List[logging.StreamHandler] = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, sys.__stdout__):
            moved.append(handler)
    previous = [handler.setStream(stream) for handler in moved]
    try:
        yield
    finally:
        for handler, old in zip(moved, previous):
            if old is not None:
                handler.setStream(old)

