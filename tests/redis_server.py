"""A throwaway redis-server for the backplane tests: free port, no persistence, stopped by pid.

Debian's ``redis-server`` package provides the binary (``.ci/run`` installs it when it is
missing).  Without it the tests that need it are skipped on a developer's machine and fail
under CI, where they must run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_WAIT = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1; :meth:`stop` and :meth:`start` again keep the port."""

    def __init__(self, workdir: Path, port: Optional[int] = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--protected-mode", "yes", "--daemonize", "no",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_WAIT
        while not _answers_ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.workdir}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {START_WAIT} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop it (by pid) and wait until the port refuses."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=START_WAIT)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=START_WAIT)


def require_redis() -> None:
    missing = [] if os.path.exists(REDIS_SERVER) else [REDIS_SERVER]
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("redis (pip install -e '.[test]')")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the backplane tests must run under CI, but {', '.join(missing)} is missing")
        pytest.skip(f"needs Debian's redis-server and redis-py: {', '.join(missing)} missing")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test."""
    require_redis()
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
