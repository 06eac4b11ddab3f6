"""Shared fixtures: a running server on a free loopback port, and clients that clean up after themselves.

The test process is NOT monkey-patched: the server runs as a ThreadedHiSockServer on its
own OS thread and hub, and clients are used from the test's thread, exactly as a plain
HiSock program would.  Tests wait on events (``wait_until``, ``recv(timeout=...)``), never
on bare sleeps.
"""

from __future__ import annotations

import resource
import threading
import time
from typing import Any, Callable, Iterator, List, Union

import pytest
from rawpeer import RawPeer

import hisock_gevent

LOOPBACK = "127.0.0.1"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 16384) if hard != resource.RLIM_INFINITY else 16384
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


_raise_fd_limit()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.005,
    message: Union[str, Callable[[], str], None] = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; fail the
    test after ``timeout`` s, saying ``message`` (a callable is asked at that moment, so
    it can show the state that was waited on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            if message is None:
                raise AssertionError(f"condition not met within {timeout} s: {predicate}")
            raise AssertionError(f"{message() if callable(message) else message} (waited {timeout} s)")
        time.sleep(interval)


class Recorder:
    """Thread-safe list of events with a wait for a count."""

    def __init__(self) -> None:
        self.items: List[Any] = []
        self._cond = threading.Condition()

    def __call__(self, *args: Any) -> None:
        with self._cond:
            self.items.append(args[0] if len(args) == 1 else args)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> List[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.items) >= count, timeout):
                raise AssertionError(f"expected {count} events within {timeout} s, got {self.items!r}")
            return list(self.items)


@pytest.fixture
def recorder() -> Callable[[], Recorder]:
    return Recorder


@pytest.fixture
def make_server() -> Iterator[Callable[..., hisock_gevent.ThreadedHiSockServer]]:
    """Factory: ``make_server(**kwargs)`` -> a ThreadedHiSockServer on a free port (not started)."""
    servers: List[hisock_gevent.ThreadedHiSockServer] = []

    def factory(**kwargs: Any) -> hisock_gevent.ThreadedHiSockServer:
        server = hisock_gevent.ThreadedHiSockServer((LOOPBACK, 0), **kwargs)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server: Callable[..., hisock_gevent.ThreadedHiSockServer]) -> hisock_gevent.ThreadedHiSockServer:
    """A started ThreadedHiSockServer with default settings; register handlers before connecting."""
    srv = make_server()
    srv.start()
    return srv


@pytest.fixture
def make_client() -> Iterator[Callable[..., hisock_gevent.HiSockClient]]:
    """Factory: ``make_client(server_or_addr, name=None, group=None, joined=True, **kw)``:
    a client whose hello the server has accepted (``joined=False``: just made); closed at
    teardown."""
    clients: List[hisock_gevent.HiSockClient] = []

    def factory(
        target: Any, name: Any = None, group: Any = None, threaded: bool = False, joined: bool = True, **kwargs: Any
    ) -> hisock_gevent.HiSockClient:
        addr = target.get_addr() if hasattr(target, "get_addr") else target
        cls = hisock_gevent.ThreadedHiSockClient if threaded else hisock_gevent.HiSockClient
        client = cls(addr, name, group, **kwargs)
        clients.append(client)
        if joined:
            # The constructor returns once the hello is sent (as HiSock's does); most tests
            # want the server's answer in first, and a refusal raised here.
            client.wait_joined()
        return client

    yield factory
    for client in clients:
        try:
            client.close()
        except Exception:
            pass


@pytest.fixture
def raw() -> Iterator[Callable[..., RawPeer]]:
    """Factory: ``raw(server_or_addr, name=..., group=None, **kw)`` -> a RawPeer connected
    to it (saying hello first when a name is given, None included); closed at teardown."""
    peers: List[RawPeer] = []

    def connect(target: Any, *args: Any, **kwargs: Any) -> RawPeer:
        addr = target.get_addr() if hasattr(target, "get_addr") else target
        peer = RawPeer(addr, *args, **kwargs)
        peers.append(peer)
        return peer

    yield connect
    for peer in peers:
        peer.close()


# ------------------------------------------------------------------ figures

#: (test id, what was measured, value) for every figure an adversarial test recorded.
_FIGURES: List[tuple] = []


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """``figure("worst round trip during the flood", "41 ms")``: keep a measured figure so
    the run ends with a table of them (the numbers a closing note or a reviewer wants)."""

    def record(what: str, value: str) -> None:
        _FIGURES.append((request.node.nodeid.split("::")[-1], what, value))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("figures the adversarial tests measured")
    for test, what, value in _FIGURES:
        terminalreporter.write_line(f"{test}: {what} = {value}")
