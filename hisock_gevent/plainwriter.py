"""Writes to a client's socket before any gevent hub owns it, without ever blocking the caller.

A :class:`~hisock_gevent.client.HiSockClient` is made with a plain blocking socket so it
works from any thread; only its first ``start()``/``recv()`` hands the socket to a hub.
Sends made before that go through a :class:`PlainWriter`: what the kernel takes at once
is gone; what it does not take waits here, at most ``max_bytes`` of it (more means the
server is not reading: the writer fails and the caller gets ClientDisconnected), and a
short-lived real thread finishes the job as the kernel makes room.  No lock is held while
waiting, so ``close()`` always gets through.
"""

from __future__ import annotations

import logging
import socket as _stdlib_socket
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional

import gevent.monkey

__all__ = ["PlainWriter", "WriterFailed"]

logger = logging.getLogger("hisock_gevent")

_allocate_lock: Callable[[], Any] = gevent.monkey.get_original("_thread", "allocate_lock")
_RealThread: Any = gevent.monkey.get_original("threading", "Thread")
_real_select: Callable[..., Any] = gevent.monkey.get_original("select", "select")
_DONTWAIT = getattr(_stdlib_socket, "MSG_DONTWAIT", 0)
#: How long the helper thread waits for room before it looks at its flags again.
_POLL = 0.25


class WriterFailed(OSError):
    """The bytes cannot be written: the connection failed, or the peer stopped reading."""


class PlainWriter:
    """A bounded, non-blocking writer for a blocking stdlib socket.

    :param sock: the connected socket (blocking; only written with MSG_DONTWAIT here).
    :param max_bytes: the most bytes that may wait unwritten; more fails the writer.
    """

    def __init__(self, sock: _stdlib_socket.socket, max_bytes: int):
        self._sock = sock
        self.max_bytes = max_bytes
        self._pending: Deque[Any] = deque()
        self._offset = 0
        self._pending_bytes = 0
        self._lock = _allocate_lock()
        self._helper: Optional[Any] = None
        self._stopped = False
        #: Why the writer failed, or None.
        self.failure: Optional[str] = None

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def write(self, data: bytes) -> None:
        """Write ``data`` after what is pending, without waiting for the peer.

        :raises WriterFailed: the connection failed, or more than ``max_bytes`` would wait.
        """
        with self._lock:
            if self.failure is not None:
                raise WriterFailed(self.failure)
            if self._stopped:
                raise WriterFailed("the writer was stopped")
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._write_what_fits()
            if self._pending_bytes > self.max_bytes:
                self._fail(
                    f"the server is not reading: {self._pending_bytes} bytes could not be sent "
                    f"(max_queue_bytes={self.max_bytes})"
                )
            if self.failure is not None:
                raise WriterFailed(self.failure)
            if self._pending and self._helper is None:
                self._helper = _RealThread(target=self._finish_in_background, name="hisock-plain-writer", daemon=True)
                self._helper.start()

    def take_over(self) -> List[bytes]:
        """Stop writing and hand back what is still pending, in order (for the connection
        that owns the socket from now on)."""
        with self._lock:
            self._stopped = True
            pending = list(self._pending)
            if pending and self._offset:
                pending[0] = bytes(memoryview(pending[0])[self._offset :])
            self._pending.clear()
            self._pending_bytes = 0
            self._offset = 0
            return pending

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for what is pending to be written; True if it was."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._stopped or self.failure is not None:
                    return not self._pending
                self._write_what_fits()
                if not self._pending:
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._wait_for_room(min(remaining, _POLL)):
                return False

    def stop(self) -> None:
        """Write nothing more (the socket is about to close)."""
        with self._lock:
            self._stopped = True

    # ------------------------------------------------------------------ internals

    def _write_what_fits(self) -> None:
        """Send pending bytes until the kernel would block (the lock is held)."""
        while self._pending and self.failure is None:
            head = self._pending[0]
            view = memoryview(head)[self._offset :] if self._offset else head
            try:
                sent = self._sock.send(view, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(f"sending to the server failed: {exc}")
                return
            self._pending_bytes -= sent
            self._offset += sent
            if self._offset >= len(head):
                self._pending.popleft()
                self._offset = 0

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        self._pending.clear()
        self._pending_bytes = 0
        self._offset = 0

    def _wait_for_room(self, timeout: float) -> bool:
        """Wait (no lock held) until the socket can take bytes; False if it is unusable."""
        try:
            _real_select([], [self._sock], [], timeout)
        except (OSError, ValueError):
            return False
        return True

    def _finish_in_background(self) -> None:
        while True:
            with self._lock:
                # Deciding to end and saying so happen under one lock: a write() that
                # comes after sees no helper and starts a new one.
                if self._stopped or self.failure is not None or not self._pending:
                    self._helper = None
                    return
            if not self._wait_for_room(_POLL):
                with self._lock:
                    self._helper = None
                return
            with self._lock:
                if not self._stopped:
                    self._write_what_fits()
