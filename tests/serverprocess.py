"""A HiSockServer in a process of its own (tests/programs/promise_server.py), for tests
that measure the server's memory or its hub without the test's threads in the way.

The program prints ``JOIN``/``LEAVE``/``ERROR`` lines, collected here as they come;
``stats()`` reads its ``/stats`` page; memory comes from ``/proc/<pid>/status``.  The
process is ended through its stdin and, failing that, by its pid.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Tuple

PROGRAM = Path(__file__).parent / "programs" / "promise_server.py"
MiB = 1024 * 1024


class ServerProcess:
    """Start the attack server with ``HiSockServer(**options)``; ``patched=True`` to
    monkey-patch it first."""

    def __init__(self, **options: Any):
        self.proc = subprocess.Popen(
            [sys.executable, str(PROGRAM), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().split() if self.proc.stdout else []
        if not line or line[0] != "READY":
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.addr: Tuple[str, int] = ("127.0.0.1", int(line[1]))
        self.stats_port = int(line[2])
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._stderr: List[str] = []
        threading.Thread(target=self._collect, daemon=True).start()
        threading.Thread(target=self._collect_stderr, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def _collect_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip("\n"))

    @property
    def stderr(self) -> List[str]:
        return list(self._stderr)

    def count(self, prefix: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if line.startswith(prefix))

    def wait_for(self, prefix: str, count: int, timeout: float) -> List[str]:
        """Wait until ``count`` lines start with ``prefix``; fail the test after ``timeout``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(1 for line in self.lines if line.startswith(prefix)) >= count, timeout)
            got = [line for line in self.lines if line.startswith(prefix)]
        if not ok:
            raise AssertionError(f"{len(got)} of {count} {prefix!r} lines within {timeout} s; stderr: {self.stderr[-5:]}")
        return got

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def rss(self) -> int:
        """Resident memory now, in bytes."""
        return self._status("VmRSS")

    def peak_rss(self) -> int:
        """The most resident memory the process has had, in bytes."""
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        """Make the peak start again from now (Linux: writing 5 to clear_refs)."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as refs:
            refs.write("5")

    def stats(self) -> Dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats", timeout=10) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
