"""``hisock-gevent serve MODULE:ATTR --workers N``: worker processes on one port, supervised.

Everything runs as real processes: the supervisor is started like a user would start it,
its workers are found by the pids it logs, and every client asks a worker ``whoami`` (the
worker answers with its pid).  Processes are stopped by pid, and only those this test
started (the supervisor) or that it started (its workers).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from conftest import wait_until
from redis_server import redis_server  # noqa: F401  (a fixture)
from test_cli import WAIT, Program, one_shot, run  # noqa: F401  (run is a fixture)

import hisock_gevent
from hisock_gevent.cli import _worker_options, build_parser

# Slow by nature: every test starts worker processes (and some a Redis server).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

#: Seconds for N workers to import gevent and the app and log that they serve.
STARTUP = 30.0
#: Bounds on the loops that open clients until the pids they want have answered.
MAX_CLIENTS = 200
CLIENT_LOOP_SECONDS = 30.0

READY_RE = r"serving on ([\d.]+):(\d+) with (\d+) workers \(pids ([\d, ]+)\)"

APP = '''
import os

import hisock_gevent

if os.path.exists("broken"):
    raise RuntimeError("the app is broken")


def make_server(host="127.0.0.1", port=6969, reuse_port=False, listener=None):
    made = hisock_gevent.HiSockServer((host, port), reuse_port=reuse_port, listener=listener)

    @made.on("whoami")
    def whoami(client, content):
        made.send_client(client, "iam", os.getpid())

    return made


def make_cluster(host="127.0.0.1", port=6969, reuse_port=False, listener=None, backplane=None):
    import logging

    made = hisock_gevent.HiSockServer((host, port), reuse_port=reuse_port, listener=listener, backplane=backplane)

    @made.on("whoami")
    def whoami(client, content):
        made.send_client(client, "iam", os.getpid())

    @made.on("relay")
    def relay(client, content):
        try:
            made.send_client(content["to"], "msg", content["text"])
        except hisock_gevent.ClientNotFound:
            pass  # not known here yet: the test sends again

    @made.on("leave")
    def leave(client):
        logging.getLogger("wk_app").warning("LEAVE %s", client.name)

    return made


def make_liar(host="127.0.0.1", port=6969, reuse_port=False, listener=None):
    import logging

    # The line a worker logs once it serves, and yet it never will.
    logging.getLogger("hisock_gevent.cli").info("serving on %s:%s", host, port)
    raise RuntimeError("not serving after all")


def make_blocking(host="127.0.0.1", port=6969, reuse_port=False, listener=None):
    import time

    made = make_server(host, port, reuse_port, listener)

    @made.on("block")
    def block(client, seconds):
        time.sleep(seconds)  # the program is not monkey-patched: this blocks the hub

    return made


def make_with_kwargs(host="127.0.0.1", port=6969, **options):
    return make_server(host, port, **options)


def make_plain(host="127.0.0.1", port=6969):
    return hisock_gevent.HiSockServer((host, port))


server = hisock_gevent.HiSockServer(("127.0.0.1", 0))


@server.on("whoami")
def whoami(client, content):
    server.send_client(client, "iam", os.getpid())
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "wk_app.py").write_text(textwrap.dedent(APP))
    return tmp_path


def whoami(addr: Tuple[str, int]) -> int:
    """Connect, ask ``whoami``, leave: the pid of the worker that answered."""
    client = hisock_gevent.connect(addr, connect_timeout=WAIT)
    try:
        client.send("whoami")
        return client.recv("iam", timeout=WAIT)
    finally:
        client.close()


def ask_until(addr: Tuple[str, int], done: Callable[[Set[int]], bool]) -> Set[int]:
    """Short clients, one after another, until the pids that answered satisfy ``done``."""
    answered: Set[int] = set()
    deadline = time.monotonic() + CLIENT_LOOP_SECONDS
    for _ in range(MAX_CLIENTS):
        answered.add(whoami(addr))
        if done(answered) or time.monotonic() > deadline:
            break
    return answered


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie left to an init that does not reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_until_gone(pids: Set[int], timeout: float = 15.0) -> Set[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid in pids if alive(pid)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def is_our_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
    except OSError:
        return False
    return b"hisock_gevent" in argv and b"--worker-index" in argv


class Cluster:
    """A running ``serve --workers`` supervisor and the worker pids it has logged."""

    def __init__(self, program: Program):
        self.program = program
        self.addr: Tuple[str, int] = ("", 0)
        self.pids: List[int] = []
        self.known_pids: Set[int] = set()

    def wait_serving(self) -> re.Match:
        match = self.program.expect(READY_RE, "stderr", timeout=STARTUP)
        self.addr = (match.group(1), int(match.group(2)))
        self.pids = [int(pid) for pid in match.group(4).split(", ")]
        self.known_pids.update(self.pids)
        return match

    def expect(self, pattern: str, timeout: float = WAIT) -> re.Match:
        return self.program.expect(pattern, "stderr", timeout=timeout)

    def stop(self) -> None:
        """SIGTERM the supervisor if still running; SIGKILL any worker of ours it left behind."""
        proc = self.program.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.program.kill()
        for pid in wait_until_gone(self.known_pids, timeout=5):
            if is_our_worker(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start_cluster(run, app_dir: Path) -> Iterator[Callable[..., Cluster]]:  # noqa: F811
    """``start_cluster(*options, target=..., workers=2)``: a supervisor that is serving."""
    clusters: List[Cluster] = []

    def start(*options: str, target: str = "wk_app:make_server", workers: int = 2) -> Cluster:
        program = run("serve", target, "--workers", str(workers), "--port", "0", *options, cwd=app_dir)
        cluster = Cluster(program)
        clusters.append(cluster)
        cluster.wait_serving()
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


# ---------------------------------------------------------------------- serving


def test_two_workers_both_answer_clients_on_the_one_port(start_cluster):
    cluster = start_cluster()
    assert len(set(cluster.pids)) == 2
    assert cluster.addr[1] != 0

    answered = ask_until(cluster.addr, lambda pids: pids == set(cluster.pids))

    assert answered == set(cluster.pids)


def test_a_factory_taking_kwargs_is_given_reuse_port(start_cluster):
    cluster = start_cluster(target="wk_app:make_with_kwargs")

    assert whoami(cluster.addr) in cluster.pids


def test_without_reuse_port_the_workers_serve_the_supervisors_listening_socket(start_cluster):
    cluster = start_cluster("--no-reuse-port")
    assert "sharing one listening socket" in cluster.program.seen["stderr"][-1]

    for _ in range(5):
        assert whoami(cluster.addr) in cluster.pids

    # Connections wait in the shared backlog: a dying worker refuses no one.
    os.kill(cluster.pids[0], signal.SIGKILL)
    for _ in range(5):
        assert whoami(cluster.addr) != cluster.pids[0]
    cluster.expect(rf"pid {cluster.pids[0]}\) was killed by SIGKILL; restarting")


def test_worker_options_pass_on_every_given_option_but_those_the_supervisor_sets():
    args = build_parser().parse_args(
        ["serve", "app:make", "--workers", "3", "--port", "7000", "--host", "0.0.0.0",
         "--max-connections", "5", "--keepalive", "--log-level", "debug", "--stats-port", "8000",
         "--backplane", "redis://localhost:6379/0", "--no-reuse-port"]
    )

    options = _worker_options(args)

    assert options == ["--log-level", "DEBUG", "--max-connections", "5", "--keepalive", "--backplane", "redis://localhost:6379/0"]


# ---------------------------------------------------------------------- supervision


def test_a_killed_worker_is_logged_and_restarted_while_the_other_keeps_serving(start_cluster):
    cluster = start_cluster()
    client = hisock_gevent.connect(cluster.addr, name="stays", connect_timeout=WAIT)
    try:
        client.send("whoami")
        survivor = client.recv("iam", timeout=WAIT)
        victim = next(pid for pid in cluster.pids if pid != survivor)

        os.kill(victim, signal.SIGKILL)

        cluster.expect(rf"worker \d \(pid {victim}\) was killed by SIGKILL; restarting it in [\d.]+ s")
        client.send("whoami")
        assert client.recv("iam", timeout=WAIT) == survivor
        new_pid = int(cluster.expect(r"worker \d restarted: pid (\d+) serving").group(1))
        cluster.known_pids.add(new_pid)
        assert new_pid not in cluster.pids
        assert not alive(victim)

        answered = ask_until(cluster.addr, lambda pids: new_pid in pids)

        assert new_pid in answered and victim not in answered
        client.send("whoami")
        assert client.recv("iam", timeout=WAIT) == survivor
    finally:
        client.close()


def test_a_worker_that_cannot_restart_is_retried_with_growing_delays_while_the_other_serves(start_cluster, app_dir):
    cluster = start_cluster()
    (app_dir / "broken").write_text("")
    victim, survivor = cluster.pids

    os.kill(victim, signal.SIGKILL)

    cluster.expect(rf"worker \d \(pid {victim}\) was killed by SIGKILL; restarting it in 0.5 s")
    failed = r"exited with status 2: importing 'wk_app' failed: RuntimeError: the app is broken; restarting it in "
    cluster.expect(failed + r"1.0 s")
    assert whoami(cluster.addr) == survivor
    cluster.expect(failed + r"2.0 s")
    assert cluster.program.proc.poll() is None

    (app_dir / "broken").unlink()

    new_pid = int(cluster.expect(r"worker \d restarted: pid (\d+) serving").group(1))
    cluster.known_pids.add(new_pid)
    assert new_pid in ask_until(cluster.addr, lambda pids: new_pid in pids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_to_the_supervisor_stops_every_worker_and_exits_0(start_cluster, signum):
    cluster = start_cluster()
    client = hisock_gevent.connect(cluster.addr, connect_timeout=WAIT)
    try:
        client.send("whoami")
        assert client.recv("iam", timeout=WAIT) in cluster.pids

        cluster.program.proc.send_signal(signum)

        assert cluster.program.wait(timeout=20) == 0
        assert wait_until_gone(set(cluster.pids), timeout=5) == set()
        with pytest.raises(hisock_gevent.ClientDisconnected):
            client.recv(timeout=WAIT)
    finally:
        client.close()
    cluster.expect(r"hisock_gevent.cli INFO stopped$")


def test_readiness_comes_from_the_workers_pipe_not_from_a_line_it_logs(app_dir):
    # Each worker logs "serving on HOST:PORT" with the shared port, then fails: a
    # supervisor matching log lines would think both serve and restart them forever.
    result = one_shot("serve", "wk_app:make_liar", "--workers", "2", "--port", "0", cwd=app_dir, timeout=STARTUP)

    assert result.returncode == 2
    assert "restarting" not in result.stderr and "with 2 workers" not in result.stderr
    assert "not serving after all" in result.stderr.strip().splitlines()[-1]


def _wait_hung_killed_and_replaced(cluster: Cluster, victim: int) -> int:
    """The supervisor's log says ``victim`` was hung, killed and replaced; the new pid."""
    cluster.expect(rf"worker \d \(pid {victim}\) is hung: it had not answered for [\d.]+ s \(worker timeout 2 s\); killing it")
    cluster.expect(rf"worker \d \(pid {victim}\) was killed by SIGKILL because it had not answered for [\d.]+ s")
    new_pid = int(cluster.expect(r"worker \d restarted: pid (\d+) serving").group(1))
    cluster.known_pids.add(new_pid)
    return new_pid


def test_a_stopped_worker_is_found_hung_killed_and_replaced(start_cluster):
    cluster = start_cluster("--worker-timeout", "2", target="wk_app:make_blocking")
    victim, survivor = cluster.pids
    started = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    try:
        new_pid = _wait_hung_killed_and_replaced(cluster, victim)
        assert time.monotonic() - started < 2 + 5

        assert wait_until_gone({victim}) == set()
        answered = ask_until(cluster.addr, lambda pids: {new_pid, survivor} <= pids)
        assert answered == {new_pid, survivor}
    finally:
        if alive(victim) and is_our_worker(victim):
            os.kill(victim, signal.SIGCONT)


def test_a_handler_that_blocks_the_hub_gets_its_worker_killed_and_replaced(start_cluster):
    cluster = start_cluster("--worker-timeout", "2", target="wk_app:make_blocking")
    client = hisock_gevent.connect(cluster.addr, connect_timeout=WAIT)
    try:
        client.send("whoami")
        victim = client.recv("iam", timeout=WAIT)
        client.send("block", 60.0)

        new_pid = _wait_hung_killed_and_replaced(cluster, victim)

        with pytest.raises(hisock_gevent.ClientDisconnected):
            client.recv(timeout=WAIT)
        assert new_pid in ask_until(cluster.addr, lambda pids: new_pid in pids)
    finally:
        client.close()


def test_workers_close_themselves_when_the_supervisor_is_killed(start_cluster):
    cluster = start_cluster()

    cluster.program.kill()

    assert wait_until_gone(set(cluster.pids), timeout=10) == set()


# ---------------------------------------------------------------------- what cannot start


def test_an_instance_target_works_with_workers_sharing_the_port(start_cluster):
    # wk_app.server is made at import (on port 0); each worker's import binds with
    # SO_REUSEPORT, then the worker rebuilds it on the shared port with its handlers.
    cluster = start_cluster(target="wk_app:server")

    answered = ask_until(cluster.addr, lambda pids: pids == set(cluster.pids))

    assert answered == set(cluster.pids)


def test_an_instance_made_at_import_on_the_served_port_works_with_workers(run, app_dir):  # noqa: F811
    # The usual HiSock program: the server is made at import on a fixed port, and
    # `serve --workers 2 --port` names that same port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (app_dir / "fixed_app.py").write_text(textwrap.dedent(f"""
        import os
        import hisock_gevent

        server = hisock_gevent.start_server(("127.0.0.1", {port}))


        @server.on("whoami")
        def whoami(client, content):
            server.send_client(client, "iam", os.getpid())
    """))
    cluster = Cluster(run("serve", "fixed_app:server", "--workers", "2", "--port", str(port), cwd=app_dir))
    try:
        cluster.wait_serving()
        assert cluster.addr[1] == port

        answered = ask_until(cluster.addr, lambda pids: pids == set(cluster.pids))

        assert answered == set(cluster.pids)
    finally:
        cluster.stop()


def test_an_instance_target_works_with_one_inherited_socket_too(start_cluster):
    # Made at import, it binds nothing there (serve imports programs with deferred_servers):
    # each worker rebuilds it on the inherited socket.
    cluster = start_cluster("--no-reuse-port", target="wk_app:server")

    answered = ask_until(cluster.addr, lambda pids: pids == set(cluster.pids))

    assert answered == set(cluster.pids)


def test_a_factory_that_does_not_take_reuse_port_is_refused_with_exit_status_2(app_dir):
    result = one_shot("serve", "wk_app:make_plain", "--workers", "2", "--port", "0", cwd=app_dir, timeout=STARTUP)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "reuse_port" in lines[0], result.stderr


@pytest.mark.parametrize("target", ["no_such_module_xyz:app", "wk_app:missing"])
def test_a_bad_target_with_workers_exits_2_at_once_without_restarting(app_dir, target):
    started = time.monotonic()

    result = one_shot("serve", target, "--workers", "2", "--port", "0", cwd=app_dir, timeout=STARTUP)

    assert result.returncode == 2
    assert time.monotonic() - started < 15
    assert "restarting" not in result.stderr and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr


def test_workers_without_a_port_is_a_usage_error(app_dir):
    result = one_shot("serve", "wk_app:make_server", "--workers", "2", cwd=app_dir)

    assert result.returncode == 2
    assert "--port" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_workers_on_a_port_in_use_exit_2_before_starting_any_worker(app_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]

        result = one_shot("serve", "wk_app:make_server", "--workers", "2", "--port", str(port), cwd=app_dir)

    assert result.returncode == 2
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr
    assert "[worker" not in result.stderr


# ---------------------------------------------------------------------- reuse_port and listener without --workers


def test_reuse_port_lets_two_single_servers_share_a_port_even_when_rebuilt(run, app_dir):  # noqa: F811
    # An instance target is rebuilt with reuse_port: the rebuild must carry it.
    first = run("serve", "wk_app:server", "--port", "0", "--reuse-port", cwd=app_dir)
    addr = first.address()
    second = run("serve", "wk_app:make_server", "--port", str(addr[1]), "--reuse-port", cwd=app_dir)
    assert second.address() == addr

    answered = ask_until(addr, lambda pids: pids == {first.proc.pid, second.proc.pid})

    assert answered == {first.proc.pid, second.proc.pid}


@pytest.mark.parametrize("target", ["wk_app:server", "wk_app:make_server"])
def test_listen_fd_serves_an_inherited_listening_socket(app_dir, target):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        fd = listening.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "hisock_gevent", "serve", target, "--listen-fd", str(fd)],
            cwd=str(app_dir),
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            serving: Optional[re.Match] = None
            assert proc.stderr is not None
            for line in proc.stderr:
                serving = re.search(r"serving on ([\d.]+):(\d+)", line)
                if serving:
                    break
            assert serving is not None and int(serving.group(2)) == listening.getsockname()[1]

            assert whoami(listening.getsockname()) == proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(timeout=WAIT) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=WAIT)


# ---------------------------------------------------------------------- with a backplane


def test_workers_with_a_redis_backplane_act_as_one_server(start_cluster, redis_server):  # noqa: F811
    cluster = start_cluster("--backplane", redis_server.url, target="wk_app:make_cluster")
    # Clients stay connected until one is held by each worker.
    by_pid: Dict[int, hisock_gevent.ThreadedHiSockClient] = {}
    inbox: Dict[str, List[Any]] = {}
    opened: List[hisock_gevent.ThreadedHiSockClient] = []
    try:
        deadline = time.monotonic() + CLIENT_LOOP_SECONDS
        for index in range(MAX_CLIENTS):
            if len(by_pid) == 2 or time.monotonic() > deadline:
                break
            name = f"user{index}"
            client = hisock_gevent.ThreadedHiSockClient(cluster.addr, name=name)
            opened.append(client)
            inbox[name] = []
            client.on("msg")(lambda text, name=name: inbox[name].append(("msg", text)))
            client.on("client_disconnect")(lambda info, name=name: inbox[name].append(("left", info.name)))
            # A handler, not recv(): the answer may arrive before recv() would be waiting.
            client.on("iam")(lambda pid, name=name: inbox[name].append(("iam", pid)))
            client.start()
            client.send("whoami")
            wait_until(
                lambda name=name: any(event[0] == "iam" for event in inbox[name]), WAIT, interval=0.01,
                message=f"{name} got no answer to whoami",
            )
            pid = next(event[1] for event in inbox[name] if event[0] == "iam")
            by_pid.setdefault(pid, client)
        assert len(by_pid) == 2, f"clients reached only {sorted(by_pid)}"
        (pid_a, a), (pid_b, b) = sorted(by_pid.items())

        # a (on one worker) reaches b (on the other) by name, once b's worker has told Redis.
        deadline = time.monotonic() + WAIT
        while ("msg", "across") not in inbox[b.name]:
            assert time.monotonic() < deadline, f"the relay never arrived; {inbox[b.name]!r}"
            a.send("relay", {"to": b.name, "text": "across"})
            time.sleep(0.1)

        # b's worker dies: a survivor runs b's leave once, and a hears that b left.
        os.kill(pid_b, signal.SIGKILL)
        cluster.expect(rf"\(pid {pid_b}\) was killed by SIGKILL")
        cluster.known_pids.add(int(cluster.expect(r"worker \d restarted: pid (\d+) serving").group(1)))
        # Within the worker TTL (5 s) and a heartbeat, the survivor claims b.
        cluster.expect(rf"LEAVE {b.name}$", timeout=WAIT + 10)
        wait_until(
            lambda: ("left", b.name) in inbox[a.name], WAIT, interval=0.01,
            message=f"{a.name} never heard that {b.name} left",
        )
        leaves = [line for line in cluster.program.seen["stderr"] if re.search(rf"LEAVE {b.name}$", line)]
        assert len(leaves) == 1, leaves
    finally:
        for client in opened:
            try:
                client.close()
            except Exception:
                pass
