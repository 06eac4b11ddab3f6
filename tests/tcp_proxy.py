"""A small TCP proxy on 127.0.0.1 whose forwarding can be stopped: a network partition on demand.

:meth:`PausableProxy.partition` stops moving bytes both ways and stops accepting: the
connections stay open, what is sent waits in the kernel's buffers (then the sender's
timeouts fire), and new connections wait in the backlog, as behind a cut cable.
:meth:`PausableProxy.heal` moves bytes again.  Plain threads; every loop looks at its stop
flag at least every :data:`POLL` seconds.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import List

POLL = 0.1


class PausableProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(POLL)
        self.port: int = self._listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def partition(self) -> None:
        self._forwarding.clear()

    def heal(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            try:
                sock.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(2.0)

    def _accept(self) -> None:
        while not self._closed:
            if not self._forwarding.wait(POLL):
                continue
            try:
                downstream, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                downstream.close()  # the target is down: so is the proxy's side
                continue
            with self._lock:
                self._sockets += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                thread = threading.Thread(target=self._pump, args=(source, sink), name="proxy-pump", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed:
                if not self._forwarding.wait(POLL):
                    continue
                readable, _, _ = select.select([source], [], [], POLL)
                if not readable:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
