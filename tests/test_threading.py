"""Threads and hubs: what a plain (not monkey-patched) program and a patched one can rely on.

The pytest process is not monkey-patched, so here a ThreadedHiSockServer and a
ThreadedHiSockClient each run a gevent hub on their own OS thread, ``threaded=True``
handlers run on real worker threads, and calls from any other thread are marshalled to the
owner's hub.  The monkey-patched mode and a GUI-style main loop run as subprocesses
(``tests/programs/``) because patching cannot be undone inside this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from conftest import LOOPBACK, wait_until

import hisock_gevent

pytestmark = pytest.mark.timeout(60)

PROGRAMS = Path(__file__).parent / "programs"
REPO_ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 60
WAIT = 10.0


# ---------------------------------------------------------------- helpers


def _thread_names() -> Dict[int, str]:
    return {t.ident: t.name for t in threading.enumerate() if t.ident is not None}


def _thread_by_ident(ident: int) -> Optional[threading.Thread]:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return thread
    return None


class IdentRecorder:
    """Records (thread ident, value) pairs from handlers; thread-safe, waitable."""

    def __init__(self) -> None:
        self.items: List[Tuple[int, Any]] = []
        self._cond = threading.Condition()

    def add(self, value: Any) -> None:
        with self._cond:
            self.items.append((threading.get_ident(), value))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = WAIT) -> List[Tuple[int, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.items) >= count, timeout):
                raise AssertionError(f"expected {count} handler calls within {timeout} s, got {len(self.items)}")
            return list(self.items)

    @property
    def idents(self) -> set:
        with self._cond:
            return {ident for ident, _ in self.items}


def _run_program(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run tests/programs/<name> with this interpreter; kill it by pid if it overstays."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAMS / name), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
    )
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"{name} did not finish within {SUBPROCESS_TIMEOUT} s\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---------------------------------------------------------------- plain process: threads


def test_threaded_server_and_client_run_handlers_on_their_own_threads_while_main_thread_works(server, make_client):
    rounds = 50
    main_ident = threading.get_ident()
    progress = {"count": 0}
    server_calls = IdentRecorder()
    client_calls = IdentRecorder()
    all_pongs = threading.Event()

    @server.on("ping")
    def on_ping(client, content):
        server_calls.add(progress["count"])
        server.send_client(client, "pong", content)

    client = make_client(server, threaded=True)

    @client.on("pong")
    def on_pong(content):
        client_calls.add(content)
        if content == rounds - 1:
            all_pongs.set()

    client.start()

    # Real work in the main thread; it sends one ping every so often and never blocks on I/O.
    sent = 0
    deadline = time.monotonic() + WAIT
    while not all_pongs.is_set():
        progress["count"] += 1
        if progress["count"] % 500 == 0 and sent < rounds:
            client.send("ping", sent)
            sent += 1
        assert time.monotonic() < deadline, f"only {len(client_calls.items)} pongs arrived"

    assert [value for _, value in client_calls.items] == list(range(rounds))
    names = _thread_names()
    (server_ident,) = server_calls.idents
    (client_ident,) = client_calls.idents
    assert server_ident != main_ident and names.get(server_ident) == "hisock-server"
    assert client_ident != main_ident and names.get(client_ident) == "hisock-client"
    seen = [count for _, count in server_calls.items]
    assert seen == sorted(seen) and seen[-1] > seen[0], "the main thread made no progress while the server handled pings"


def test_threaded_server_close_returns_only_after_its_thread_ended_and_the_port_is_free(make_server, make_client):
    server = make_server()
    seen = IdentRecorder()

    @server.on("hi")
    def on_hi(client, content):
        seen.add(content)
        server.send_client(client, "ho", content)

    server.start()
    port = server.get_addr()[1]
    client = make_client(server)
    client.send("hi", 1)
    assert client.recv("ho", timeout=WAIT) == 1
    ((server_ident, _),) = seen.items
    server_thread = _thread_by_ident(server_ident)
    assert server_thread is not None and server_thread.name == "hisock-server"

    server.close()

    assert not server_thread.is_alive()
    assert server_ident not in _thread_names()
    # The same port serves again at once (bind + listen would fail while the old listener lived).
    reborn = hisock_gevent.ThreadedHiSockServer((LOOPBACK, port))
    try:
        @reborn.on("hi")
        def on_hi_again(client, content):
            reborn.send_client(client, "ho", content + 1)

        reborn.start()
        second = make_client(reborn)
        second.send("hi", 41)
        assert second.recv("ho", timeout=WAIT) == 42
    finally:
        reborn.close()


def test_threaded_client_close_returns_only_after_its_thread_ended(server, make_client):
    seen = IdentRecorder()

    @server.on("join")
    def on_join(client):
        server.send_client(client, "welcome", "hi")

    client = make_client(server, threaded=True)

    @client.on("welcome")
    def welcome(content):
        seen.add(content)

    client.start()
    ((client_ident, content),) = seen.wait_for(1)
    assert content == "hi"
    client_thread = _thread_by_ident(client_ident)
    assert client_thread is not None and client_thread.name == "hisock-client"

    client.close()

    assert not client_thread.is_alive()
    assert client_ident not in _thread_names()
    wait_until(lambda: server.get_all_clients() == [], timeout=WAIT)


def test_server_methods_from_main_and_eight_threads_deliver_every_message_once_in_order(server, make_client):
    sender_threads = 8
    sends_per_sender = 200
    tags = [f"t{n}" for n in range(sender_threads)] + ["main"]
    received: Dict[str, Dict[str, List[int]]] = {"alice": {}, "bob": {}}
    lock = threading.Lock()
    fences = {"alice": threading.Event(), "bob": threading.Event()}

    def listener(name: str) -> hisock_gevent.ThreadedHiSockClient:
        client = make_client(server, name=name, threaded=True)

        @client.on("seq")
        def on_seq(content):
            tag, index = content
            with lock:
                received[name].setdefault(tag, []).append(index)

        @client.on("fence")
        def on_fence():
            fences[name].set()

        client.start()
        return client

    listener("alice")
    listener("bob")
    kicked = {tag: threading.Event() for tag in tags}
    for tag in tags:
        victim = make_client(server, name=f"victim-{tag}", threaded=True)
        victim.on("force_disconnect")(kicked[tag].set)
        victim.start()
    wait_until(lambda: len(server.get_all_clients()) == 2 + len(tags), timeout=WAIT)

    errors: List[BaseException] = []
    barrier = threading.Barrier(len(tags))

    def sender(tag: str) -> None:
        try:
            barrier.wait(WAIT)
            for index in range(sends_per_sender):
                if index % 2 == 0:
                    server.send_client("alice", "seq", [tag, index])
                else:
                    server.send_all_clients("seq", [tag, index])
                if index % 40 == 0:
                    names = server.get_all_clients("name")
                    assert "alice" in names and "bob" in names, names
                if index == sends_per_sender // 2:
                    server.disconnect_client(f"victim-{tag}")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(tag,), daemon=True) for tag in tags[:-1]]
    for thread in threads:
        thread.start()
    sender("main")
    for thread in threads:
        thread.join(WAIT * 3)
        assert not thread.is_alive()
    assert errors == []

    # One connection keeps order, so anything duplicated would arrive before the fence.
    server.send_all_clients("fence")
    assert fences["alice"].wait(WAIT) and fences["bob"].wait(WAIT)
    with lock:
        assert {tag: received["alice"].get(tag) for tag in tags} == {tag: list(range(sends_per_sender)) for tag in tags}
        assert {tag: received["bob"].get(tag) for tag in tags} == {
            tag: list(range(1, sends_per_sender, 2)) for tag in tags
        }
    assert all(event.wait(WAIT) for event in kicked.values())
    assert sorted(server.get_all_clients("name")) == ["alice", "bob"]


def test_server_method_called_from_another_thread_raises_its_exception_in_that_thread(server):
    outcome: List[BaseException] = []

    def call() -> None:
        try:
            server.send_client("nobody-by-this-name", "x", 1)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], hisock_gevent.ClientNotFound)


# ---------------------------------------------------------------- plain process: threaded handlers


@pytest.mark.slow
def test_threaded_handler_sleeping_does_not_stall_another_clients_round_trip(server, make_client):
    main_ident = threading.get_ident()
    slow_started = threading.Event()
    slow_finished = threading.Event()
    slow_idents: List[int] = []
    server_idents: List[int] = []

    @server.on("slow", threaded=True)
    def slow(client, content):
        slow_idents.append(threading.get_ident())
        slow_started.set()
        time.sleep(1.0)
        slow_finished.set()
        # From the worker thread: marshalled to the server's hub.
        server.send_client(client, "slow-done", content)

    @server.on("ping")
    def ping(client, content):
        server_idents.append(threading.get_ident())
        server.send_client(client, "pong", content)

    sleeper = make_client(server)
    other = make_client(server)
    sleeper.send("slow", "zzz")
    assert slow_started.wait(WAIT)

    other.send("ping", 7)
    assert other.recv("pong", timeout=WAIT) == 7
    assert not slow_finished.is_set(), "the pong only came after the sleeping handler had finished"

    assert sleeper.recv("slow-done", timeout=WAIT) == "zzz"
    assert slow_finished.is_set()
    (worker,) = slow_idents
    (hub_thread,) = server_idents
    assert worker not in (main_ident, hub_thread)
    assert _thread_names().get(hub_thread) == "hisock-server"


@pytest.mark.slow
def test_threaded_handlers_sleep_in_parallel_on_worker_threads(server, make_client):
    clients = 4
    done = IdentRecorder()

    @server.on("nap", threaded=True)
    def nap(client, content):
        time.sleep(1.0)
        done.add(content)
        server.send_client(client, "rested", content)

    nappers = [make_client(server) for _ in range(clients)]
    started = time.monotonic()
    for index, napper in enumerate(nappers):
        napper.send("nap", index)
    for index, napper in enumerate(nappers):
        assert napper.recv("rested", timeout=WAIT) == index
    elapsed = time.monotonic() - started
    assert elapsed < clients * 1.0 * 0.75, f"{clients} one-second naps took {elapsed:.2f} s: they ran one after another"
    assert len(done.idents) == clients


def test_threaded_client_handler_can_send_from_its_worker_thread(server, make_client):
    @server.on("ask")
    def ask(client, content):
        server.send_client(client, "question", content)

    @server.on("answer")
    def answer(client, content):
        server.send_client(client, "thanks", content)

    client = make_client(server, threaded=True)
    thanked = IdentRecorder()
    worker_idents: List[int] = []

    @client.on("question", threaded=True)
    def question(content):
        worker_idents.append(threading.get_ident())
        time.sleep(0.2)
        client.send("answer", content * 2)

    @client.on("thanks")
    def thanks(content):
        thanked.add(content)

    client.start()
    client.send("ask", 21)
    ((dispatcher, value),) = thanked.wait_for(1)
    assert value == 42
    assert worker_idents and worker_idents[0] != dispatcher
    assert _thread_names().get(dispatcher) == "hisock-client"


# ---------------------------------------------------------------- plain process: HiSockClient on a thread


def test_hisockclient_created_and_started_in_a_worker_thread_runs_there_and_stops_on_close(server):
    @server.on("hello")
    def hello(client, content):
        server.send_client(client, "reply", content)

    replies = IdentRecorder()
    holder: Dict[str, hisock_gevent.HiSockClient] = {}
    errors: List[BaseException] = []
    start_returned = threading.Event()

    def run() -> None:
        try:
            client = hisock_gevent.HiSockClient(server.get_addr(), name="worker")
            holder["client"] = client
            client.on("reply")(replies.add)
            client.send("hello", "from-thread")
            client.start()
            start_returned.set()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-client-thread", daemon=True)
    thread.start()
    try:
        ((ident, value),) = replies.wait_for(1)
        assert value == "from-thread" and ident == thread.ident

        # Calls from the main thread are run on the worker thread's hub.
        holder["client"].send("hello", "from-main")
        assert replies.wait_for(2)[1] == (thread.ident, "from-main")

        holder["client"].close()
        assert start_returned.wait(WAIT), "start() did not return after close()"
        thread.join(WAIT)
        assert not thread.is_alive()
        assert errors == []
        wait_until(lambda: server.get_all_clients() == [], timeout=WAIT)
    finally:
        if "client" in holder:
            holder["client"].close()


def test_hisockclient_bound_to_main_thread_refuses_start_from_another_thread(server, make_client):
    @server.on("join")
    def on_join(client):
        server.send_client(client, "welcome", 1)

    client = make_client(server)
    assert client.recv("welcome", timeout=WAIT) == 1  # binds the client to this thread
    outcome: List[BaseException] = []

    def start_elsewhere() -> None:
        try:
            client.start()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=start_elsewhere, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], hisock_gevent.ClientException)


def test_hisockclient_bound_to_the_main_thread_sends_without_waiting_for_the_next_recv(server, make_client):
    arrived = threading.Event()

    @server.on("join")
    def on_join(client):
        server.send_client(client, "welcome", 1)

    @server.on("score")
    def score(client, content):
        arrived.set()

    client = make_client(server)
    assert client.recv("welcome", timeout=WAIT) == 1  # binds the client to this thread
    client.send("score", 10)
    # The main thread now does something else (a real lock wait, as in a plain program):
    # the message must be on its way already, as HiSock's send() was.
    assert arrived.wait(5.0), "send() queued the message until the main thread next entered gevent"


# ---------------------------------------------------------------- close() from inside a handler


def _port_is_free(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((LOOPBACK, port))
        probe.listen(1)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.mark.parametrize("threaded", [False, True], ids=["inline-handler", "threaded-handler"])
def test_threaded_server_closed_from_its_own_handler_returns_to_the_handler_and_its_thread_ends(make_server, make_client, threaded):
    server = make_server()
    errors: List[BaseException] = []
    hub_idents: List[int] = []
    after_close = threading.Event()

    @server.on("join")
    def on_join(client):
        hub_idents.append(threading.get_ident())

    @server.on("shutdown", threaded=threaded)
    def shutdown(client):
        server.close()
        after_close.set()  # the handler goes on after close() returns

    server.start(error_handler=errors.append)
    port = server.get_addr()[1]
    client = make_client(server)  # never bound to a hub: send() writes at once
    wait_until(lambda: hub_idents, timeout=WAIT)
    server_thread = _thread_by_ident(hub_idents[0])
    assert server_thread is not None

    client.send("shutdown")
    assert after_close.wait(WAIT), "server.close() called from a handler never returned to it"
    server_thread.join(WAIT)
    assert not server_thread.is_alive(), "the server's thread did not end"
    assert errors == []
    assert _port_is_free(port)


def test_threaded_server_closed_from_a_threaded_handler_lets_that_worker_finish_cleanly(make_server, make_client, capfd):
    server = make_server()
    worker_idents: List[int] = []
    after_close = threading.Event()

    @server.on("shutdown", threaded=True)
    def shutdown(client):
        worker_idents.append(threading.get_ident())
        server.close()
        after_close.set()

    server.start()
    client = make_client(server)
    client.send("shutdown")
    assert after_close.wait(WAIT)
    server.join(WAIT)
    # The worker hands its (empty) result back to the server's hub, then exits.
    wait_until(lambda: worker_idents[0] not in sys._current_frames(), timeout=WAIT)
    stderr = capfd.readouterr().err
    assert "destroyed loop" not in stderr and "Failed to run worker thread" not in stderr, stderr


def test_hisockserver_start_returns_normally_when_a_handler_closes_the_server(make_client):
    server = hisock_gevent.HiSockServer((LOOPBACK, 0))

    @server.on("shutdown")
    def shutdown(client):
        server.close()

    outcome: List[Any] = []

    def serve() -> None:
        try:
            server.start()
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = make_client(server)
        client.send("shutdown")
        thread.join(WAIT)
        assert not thread.is_alive()
        assert outcome == ["returned"]
    finally:
        if thread.is_alive():
            server.close()


@pytest.mark.parametrize("threaded", [False, True], ids=["inline-handler", "threaded-handler"])
def test_threaded_client_closed_from_its_own_handler_returns_promptly_and_its_thread_ends(server, make_client, threaded):
    @server.on("join")
    def on_join(client):
        server.send_client(client, "bye")

    client = make_client(server, threaded=True)
    dispatcher: List[int] = []
    took: List[float] = []
    closed = threading.Event()

    @client.on("client_connect")
    def on_connect(info):
        dispatcher.append(threading.get_ident())

    @client.on("bye", threaded=threaded)
    def bye():
        started = time.monotonic()
        client.close()
        took.append(time.monotonic() - started)
        closed.set()

    client.start()
    assert closed.wait(WAIT), "client.close() called from a handler never returned to it"
    assert took[0] < 2.0, f"client.close() from its own handler took {took[0]:.2f} s"
    client_thread = _thread_by_ident(dispatcher[0]) if dispatcher else None
    if client_thread is not None:
        client_thread.join(WAIT)
        assert not client_thread.is_alive()
    wait_until(lambda: server.get_all_clients() == [], timeout=WAIT)


# ---------------------------------------------------------------- subprocess programs


@pytest.mark.slow
def test_monkey_patched_program_runs_server_and_clients_as_greenlets():
    result = _run_program("patched_roundtrip.py")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout.startswith("OK"), result.stdout


@pytest.mark.slow
def test_plain_gui_like_main_loop_polls_a_queue_filled_by_handlers_and_finishes():
    result = _run_program("plain_gui_like.py")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout.startswith("OK"), result.stdout


@pytest.mark.slow
def test_server_and_client_in_one_process_may_call_each_other_from_their_handlers():
    result = _run_program("cross_calls.py")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout.startswith("OK"), result.stdout
