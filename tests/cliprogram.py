"""Run the ``hisock-gevent`` command in tests: with pipes (:class:`Program`, :func:`one_shot`)
or in a pseudo-terminal whose screen is emulated (:class:`Terminal`)."""

from __future__ import annotations

import fcntl
import os
import pty
import queue
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HOST = "127.0.0.1"
WAIT = 10.0
SERVING_RE = re.compile(r"serving on ([\d.]+):(\d+)")


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


def one_shot(*args: str, cwd: Optional[Path] = None, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(command() + list(args), cwd=str(cwd) if cwd else None, capture_output=True, text=True, timeout=timeout)


def hostport(addr: Tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


class Screen:
    """What a :class:`Terminal` shows at one moment: its lines (right-trimmed) and the cursor's row."""

    def __init__(self, lines: List[str], cursor_row: int):
        self.lines = lines
        self.cursor_row = cursor_row

    @property
    def cursor_line(self) -> str:
        return self.lines[self.cursor_row]

    def row_of(self, text: str) -> int:
        """The last row containing ``text``; -1 when none does."""
        rows = [i for i, line in enumerate(self.lines) if text in line]
        return rows[-1] if rows else -1

    def __str__(self) -> str:
        return "\n".join(f"{i:2} {line}" for i, line in enumerate(self.lines) if line) + f"\n(cursor on row {self.cursor_row})"


class Terminal:
    """``hisock-gevent ARGS`` in a pseudo-terminal; the screen it draws is emulated by pyte.

    Keys are typed with :meth:`type` (bytes as a terminal sends them: ``"\\r"`` for Enter,
    ``"\\x1b[A"`` for arrow up, ``"\\x04"`` for Ctrl-D).  Waits are on the screen's content.
    """

    ROWS, COLUMNS = 24, 100

    def __init__(self, args: List[str], python_code: Optional[str] = None):
        import pyte

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", self.ROWS, self.COLUMNS, 0, 0))
        # No cursor position requests: nobody here would answer them.
        env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-c", python_code, *args] if python_code else command() + args
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self._master = master
        self._screen = pyte.Screen(self.COLUMNS, self.ROWS)
        self._stream = pyte.ByteStream(self._screen)
        self._cond = threading.Condition()
        self._ended = False
        self._reader = threading.Thread(target=self._read, name="pty-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the program's side of the terminal is closed
                data = b""
            with self._cond:
                if not data:
                    self._ended = True
                    self._cond.notify_all()
                    return
                self._stream.feed(data)
                self._cond.notify_all()

    def type(self, keys: str) -> None:
        os.write(self._master, keys.encode())

    def _snapshot(self) -> Screen:
        return Screen([line.rstrip() for line in self._screen.display], self._screen.cursor.y)

    def wait_for(self, predicate: Callable[[Screen], bool], what: str, timeout: float = WAIT) -> Screen:
        """The screen once ``predicate`` holds for it; fails after ``timeout`` s or when the output ends."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                screen = self._snapshot()
                if predicate(screen):
                    return screen
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._ended:
                    raise AssertionError(f"{what}: not on the screen within {timeout} s (exit status {self.proc.poll()}):\n{screen}")
                self._cond.wait(remaining)

    def wait(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=WAIT)
        self._reader.join(WAIT)
        os.close(self._master)
