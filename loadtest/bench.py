"""Benchmark hisock_gevent against two hand-written servers (gevent, asyncio on uvloop), in one command.

    python loadtest/bench.py --quick        # every scenario, a few minutes
    python loadtest/bench.py --smoke        # a tiny version of every scenario, seconds (CI)
    python loadtest/bench.py                # the full run (longer windows, more repeats)
    python loadtest/bench.py --profile      # S1 against hisock_gevent under cProfile
    python loadtest/bench.py --quick --workers 2 --scenarios S1,S2   # 1 process vs 2 joined by Redis
    python loadtest/bench.py --quick --join-storm   # 10,000 joins with announce="all", "group", "none"
    python loadtest/bench.py --quick --websocket                       # S1, S2 over TCP vs over WebSocket
    python loadtest/bench.py --quick --s100k  # S6 alone: 100,000 held clients, or as many as the machine allows

Each server under test runs in its own process, started fresh for every case:

* ``hisock``   -- ``loadtest/hisock_server.py``: hisock_gevent's public API only;
* ``baseline`` -- ``loadtest/baselines/gevent_server.py``: the same wire work by hand on a
  bare ``gevent.server.StreamServer`` (the ceiling for Python on gevent);
* ``uvloop``   -- ``loadtest/baselines/uvloop_server.py``: the same wire work by hand as an
  asyncio ``Protocol`` on uvloop (what the protocol costs on a C event loop without
  greenlets).  Without uvloop it runs on asyncio's default loop, says so on its ``PORT``
  line, and the table's column and the JSON (``"loop"``) are labelled after it.

Load comes from separate ``loadtest/loadgen.py`` processes speaking the wire protocol with
raw gevent sockets.  Scenarios (each bounded in time):

* S1 ping-pong: C clients each keep W ``ping`` requests in flight; round trips/s, p50/p99.
* S2 fan-out: N clients; one sends ``broadcast``, the server calls ``send_all_clients``;
  time until every client has it (median of K repeats) and deliveries/s.
* S3 connections: open and hand-shake up to 10,000 clients; how many are held, and the
  server's RSS per connection.
* S4 bulk: 1 MiB ``bytes`` payloads one way with a small ack; MB/s.
* S5 codec: ``hisock_gevent.typecast`` encode+decode, native letters vs msgpack.
* S6 held at scale (only when named: ``--s100k`` or ``--scenarios S6``): 100,000 joined
  clients on one server process with ``announce="none"``, or as many as RLIMIT_NOFILE's
  hard limit allows, from ``holdgen.py`` processes (raw sockets on one epoll each) bound to
  127.0.0.2, .3, ...; RSS per connection, joins/s, server CPU per join, the fan-out time of
  a broadcast to all of them and the generators' share of the CPU.  hisock and the gevent
  baseline only.

Prints one table (absolute figures, and the ratios hisock/gevent baseline and hisock/uvloop
baseline measured in the same run) and writes every figure and ratio as JSON
(``loadtest/results/bench-<mode>-<time>.json`` unless ``--json`` says otherwise).
``--compare OLD.json NEW.json`` prints two runs side by side.
Exit status 0 when every case ran (whatever the figures), 1 when a case failed to run.

``--workers N`` compares, for S1 and S2 only, one ``hisock`` process with ``hisock xN``: N
``hisock_server.py`` processes sharing one port (SO_REUSEPORT) and joined by the Redis
backplane through a redis-server bench starts for the case.  Server CPU is the sum over
the workers; redis-server's is reported apart.  Nothing is pinned in that mode.

``--join-storm`` opens S3's clients (10,000; 100 in ``--smoke``) against ``hisock`` three
times, once per announcement scope (``HiSockServer(announce="all" | "group" | "none")``),
every client in a group of 50, and compares how long the joins take and what they cost.

``--websocket`` compares, for S1 and S2 only, the same hisock server loaded over TCP
(``loadgen.py``) and over WebSocket (``wsload.py``: the same clients, upgraded at
``/hisock``, one body per binary message); the server runs with its WebSocket listener
in both columns, so only the transport differs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
PYTHON = sys.executable

SERVERS = {
    "hisock": os.path.join(HERE, "hisock_server.py"),
    "baseline": os.path.join(HERE, "baselines", "gevent_server.py"),
    "uvloop": os.path.join(HERE, "baselines", "uvloop_server.py"),
}
#: The servers every hisock figure is divided by, in the order of the table's columns.
BASELINES = ("baseline", "uvloop")
LOADGEN = os.path.join(HERE, "loadgen.py")
#: The load generator of ``--websocket`` (the same scenarios over WebSocket, PROTOCOL.md section 10).
WSLOAD = os.path.join(HERE, "wsload.py")
#: The transports ``--websocket`` compares, in the table's column order.
TRANSPORTS = ("tcp", "websocket")
HOLDGEN = os.path.join(HERE, "holdgen.py")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
#: Seconds a fresh redis-server has to answer PING, and tries on other free ports.
REDIS_START_WAIT = 10.0
REDIS_START_ATTEMPTS = 3
#: Least CPU share (of one core) a worker must use during S1 to count as busy.
BUSY_WORKER_CPU = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

sys.path.insert(0, HERE)
import wire  # noqa: E402

# ---------------------------------------------------------------------------- settings

MODES: Dict[str, Dict[str, Any]] = {
    "smoke": {
        "s1_cases": [(1, 1), (4, 4)], "s1_warmup": 0.2, "s1_duration": 0.6,
        "s2_clients": [20], "s2_repeats": 2,
        "s3_clients": 100, "s3_ramp_timeout": 20.0,
        "s4_warmup": 0.2, "s4_duration": 0.6,
        "s5_seconds": 0.02,
        "s6_clients": 300, "s6_ramp_timeout": 30.0, "s6_hold_s": 0.5, "s6_repeats": 2,
        "case_timeout": 30.0,
    },
    "quick": {
        "s1_cases": [(c, w) for c in (1, 50, 500) for w in (1, 4)], "s1_warmup": 1.0, "s1_duration": 3.0,
        "s2_clients": [100, 1000, 5000], "s2_repeats": 21,
        "s3_clients": 10000, "s3_ramp_timeout": 90.0,
        "s4_warmup": 0.5, "s4_duration": 3.0,
        "s5_seconds": 0.3,
        "s6_clients": 100_000, "s6_ramp_timeout": 300.0, "s6_hold_s": 5.0, "s6_repeats": 5,
        "case_timeout": 120.0,
    },
    "full": {
        "s1_cases": [(c, w) for c in (1, 50, 500) for w in (1, 4)], "s1_warmup": 2.0, "s1_duration": 10.0,
        "s2_clients": [100, 1000, 5000], "s2_repeats": 21,
        "s3_clients": 10000, "s3_ramp_timeout": 240.0,
        "s4_warmup": 1.0, "s4_duration": 10.0,
        "s5_seconds": 1.0,
        "s6_clients": 100_000, "s6_ramp_timeout": 600.0, "s6_hold_s": 30.0, "s6_repeats": 11,
        "case_timeout": 360.0,
    },
}

#: The targets, shown next to the figures (informative only); README.md's performance
#: section says where each comes from.
TARGETS = {
    "S1": "hisock >= 0.75x baseline rt/s",
    "S2": "fan-out time <= 1.35x baseline at 1,000 clients",
    "S3": "10,000 held, RSS <= 40 KiB/conn",
    "S4": "hisock >= 0.8x baseline MB/s",
    "S5": "msgpack >= 3x faster than native (dict, list)",
    "S6": "100,000 joined clients held by one process (announce='none')",
}
#: The case sizes the S2 and S3 targets are about: a run whose cases are smaller (--smoke)
#: cannot reach them by construction, so they are not judged there.
S2_TARGET_CLIENTS = 1000
S3_TARGET_CLIENTS = 10000
S6_TARGET_CLIENTS = 100_000

# ---------------------------------------------------------------------------- /proc


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of a live process (all its threads), in seconds (0.0 once it is gone).

    From ``/proc/<pid>/task/*/schedstat`` (nanoseconds) when the kernel has it, else from
    ``/proc/<pid>/stat`` (clock ticks, usually 10 ms).
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, field: str) -> Optional[int]:
    """A KiB field (``VmRSS:``, ``VmHWM:``) of /proc/<pid>/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_rss_kib(pid: int) -> Optional[int]:
    """VmRSS of a live process, in KiB."""
    return proc_status_kib(pid, "VmRSS:")


def system_busy_seconds() -> float:
    """CPU seconds every CPU spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


class CpuMeter:
    """CPU used by given pids, and by everything else on the machine, between two marks."""

    def __init__(self, pids: Dict[str, List[int]]):
        self.pids = pids
        self.t0 = 0.0
        self.start: Dict[str, float] = {}
        self.busy0 = 0.0

    def _sample(self) -> Dict[str, float]:
        return {group: sum(proc_cpu_seconds(pid) for pid in pids) for group, pids in self.pids.items()}

    def mark(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = system_busy_seconds()
        self.start = self._sample()

    def read(self) -> Dict[str, float]:
        """Cores used (1.0 = one core busy all the time) per group, plus ``other``."""
        elapsed = max(1e-6, time.monotonic() - self.t0)
        now = self._sample()
        shares = {group: (now[group] - self.start[group]) / elapsed for group in now}
        shares["other"] = max(0.0, (system_busy_seconds() - self.busy0) / elapsed - sum(shares.values()))
        return shares


def wait_quiet(pids: Sequence[int], timeout: float, threshold: float = 0.05, window: float = 0.25) -> float:
    """Wait until the pids together use less than ``threshold`` of a core; return seconds waited."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = sum(proc_cpu_seconds(pid) for pid in pids)
    while time.monotonic() < deadline:
        time.sleep(window)
        used = sum(proc_cpu_seconds(pid) for pid in pids)
        if (used - last) / window < threshold:
            break
        last = used
    return time.monotonic() - t0


# ---------------------------------------------------------------------------- processes


class CaseFailed(Exception):
    """A case could not run to the end (its figures are missing, the rest goes on)."""


class LimitReached(CaseFailed):
    """The server did not get the case ready within its time bound (e.g. not all clients
    joined in time).  A measurement, not a harness failure: it does not change the exit status."""


class Proc:
    """A child process whose stdout lines are read by a thread (JSON events or text)."""

    def __init__(self, argv: List[str], label: str, affinity: Optional[set] = None):
        self.label = label
        self.stderr = tempfile.TemporaryFile()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=ROOT,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self._terminated = False
        if affinity:
            try:
                os.sched_setaffinity(self.pid, affinity)
            except OSError:
                pass
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        self.pending: List[Dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def stderr_tail(self, limit: int = 1500) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read().decode(errors="replace")[-limit:]
        except (OSError, ValueError):
            return ""

    def line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise CaseFailed(f"{self.label}: nothing within {timeout:.1f} s") from None
        if line is None:
            self.lines.put(None)
            raise CaseFailed(f"{self.label} exited (status {self.popen.poll()}): {self.stderr_tail()}")
        return line

    def expect(self, ev: str, timeout: float, **match: Any) -> Dict[str, Any]:
        """The next JSON event named ``ev`` (events that arrive meanwhile are kept)."""
        for i, event in enumerate(self.pending):
            if event.get("ev") == ev and all(event.get(k) == v for k, v in match.items()):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            line = self.line(deadline - time.monotonic())
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("ev") == "error":
                raise CaseFailed(f"{self.label}: {event.get('error')}")
            if event.get("ev") == ev and all(event.get(k) == v for k, v in match.items()):
                return event
            self.pending.append(event)

    def send(self, text: str) -> None:
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(text.encode() + b"\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def terminate(self) -> None:
        """Ask the process we started to end (stdin closed, SIGTERM) without waiting."""
        if self.popen.poll() is None and not self._terminated:
            self._terminated = True
            try:
                if self.popen.stdin is not None:
                    self.popen.stdin.close()
            except OSError:
                pass
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 3.0) -> None:
        """End the process we started: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self.stderr.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: str) -> Tuple[Proc, str]:
    """A throwaway redis-server on a free 127.0.0.1 port, persistence off; (process, URL)."""
    tail = ""
    for _ in range(REDIS_START_ATTEMPTS):  # another program may take the free port first
        port = free_port()
        argv = [
            REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", workdir, "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning",
        ]
        proc = Proc(argv, "redis-server")
        deadline = time.monotonic() + REDIS_START_WAIT
        while time.monotonic() < deadline and proc.popen.poll() is None:
            if redis_answers(port):
                return proc, f"redis://127.0.0.1:{port}/0"
            time.sleep(0.02)
        tail = proc.stderr_tail()
        proc.stop()
    raise CaseFailed(f"redis-server did not answer within {REDIS_START_WAIT:.0f} s: {tail}")


class Case:
    """The server process(es) plus their load generators; stopped whatever happens.

    ``workers=0``: one server process (today's cases).  ``workers=N``: a fresh
    redis-server and N ``hisock_server.py`` processes sharing one port (SO_REUSEPORT),
    joined by the Redis backplane and answering ``clients SEQ`` on stdin; never pinned.
    """

    def __init__(self, kind: str, pin: bool, server_args: Sequence[str] = (), workers: int = 0, transport: Optional[str] = None):
        self.kind = kind
        #: ``--websocket``: the server also serves WebSocket (whichever transport this case
        #: loads it with, so both run against the same server), and the generators speak
        #: ``transport`` ("tcp" or "websocket").
        self.transport = transport
        self.ws_port: Optional[int] = None
        if transport is not None:
            server_args = (*server_args, "--websocket")
        self.label = f"{kind} x{workers}" if workers else kind
        self.workers = workers
        self.pin = pin and NCPU >= 2 and not workers
        self.servers: List[Proc] = []
        self.gens: List[Proc] = []
        self.redis: Optional[Proc] = None
        self._redis_dir: Optional[str] = None
        #: What the first server said after its port, e.g. "uvloop 0.21.0" (or "").
        self.banner = ""
        try:
            if workers:
                self._redis_dir = tempfile.mkdtemp(prefix="bench-redis-")
                self.redis, url = start_redis(self._redis_dir)
                server_args = (*server_args, "--reuse-port", "--redis", url, "--control")
            self.port = self._start_server(0, server_args, {0} if self.pin else None)
            for _ in range(1, workers):
                self._start_server(self.port, server_args, None)
        except BaseException:
            self.close()
            raise
        self.server = self.servers[0]

    def _start_server(self, port: int, server_args: Sequence[str], affinity: Optional[set]) -> int:
        n = len(self.servers)
        label = f"{self.kind} server" + (f" #{n}" if self.workers else "")
        self.servers.append(Proc([PYTHON, SERVERS[self.kind], "--port", str(port), *server_args], label, affinity))
        line = self.servers[-1].line(15.0)
        if not line.startswith("PORT "):
            raise CaseFailed(f"{label} said {line!r}")
        words = line.split(None, 2)
        if n == 0 and len(words) > 2:
            banner = words[2].strip()
            self.banner = banner[1:-1] if banner.startswith("(") and banner.endswith(")") else banner
        if "--websocket" in server_args:
            ws_line = self.servers[-1].line(15.0)
            if not ws_line.startswith("WSPORT "):
                raise CaseFailed(f"{label} said {ws_line!r} where its WebSocket port was expected")
            self.ws_port = int(ws_line.split()[1])
        return int(words[1])

    def about(self) -> Dict[str, str]:
        """What to record next to the figures: the event loop a baseline said it runs on."""
        return {"loop": self.banner} if self.banner else {}

    @property
    def server_pids(self) -> List[int]:
        return [server.pid for server in self.servers]

    @property
    def pids(self) -> List[int]:
        """Every process of the case: servers, redis-server, generators."""
        return self.server_pids + ([self.redis.pid] if self.redis else []) + [g.pid for g in self.gens]

    def spawn(self, scenario: str, params_list: Sequence[Dict[str, Any]]) -> List[Proc]:
        gen_cpus = set(range(1, NCPU)) if self.pin else None
        script, port = (WSLOAD, self.ws_port) if self.transport == "websocket" else (LOADGEN, self.port)
        for i, params in enumerate(params_list):
            if scenario == "s6":  # its own generator: raw sockets on one epoll
                argv = [PYTHON, HOLDGEN, "--port", str(self.port), "--params", json.dumps(params)]
            else:
                argv = [PYTHON, script, "--port", str(port), "--scenario", scenario, "--params", json.dumps(params)]
            self.gens.append(Proc(argv, f"{os.path.basename(argv[1])[:-3]} {scenario}#{i} ({self.label})", gen_cpus))
        return self.gens

    def meter(self) -> CpuMeter:
        groups = {"server": self.server_pids, "gen": [g.pid for g in self.gens]}
        if self.redis is not None:
            groups["redis"] = [self.redis.pid]
        return CpuMeter(groups)

    def wait_mirrors(self, clients: int, timeout: float) -> Tuple[float, List[int]]:
        """Wait until every worker knows all ``clients`` (its own and, through Redis, the
        others'); return the seconds waited and each worker's own client count.

        :raises LimitReached: a worker's mirror is still short after ``timeout`` seconds.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        answers: List[Dict[str, Any]] = []
        for seq in range(1, 1_000_000):
            for server in self.servers:
                server.send(f"clients {seq}")
            answers = [server.expect("clients", max(5.0, deadline - time.monotonic()), seq=seq) for server in self.servers]
            if all(a["total"] >= clients for a in answers):
                return time.monotonic() - t0, [a["local"] for a in answers]
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise LimitReached(f"after {timeout:.0f} s the workers know {[a['total'] for a in answers]} of {clients:,} clients")

    def __enter__(self) -> Case:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process the case started, by pid: servers, generators, redis-server."""
        # The servers first, all at once: a generator closing 10,000 sockets would
        # otherwise make them announce 10,000 departures to everyone left.
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            server.stop()
        for gen in self.gens:
            gen.send("quit")
        for gen in self.gens:
            gen.stop()
        # Redis last: the workers say goodbye in it while they close.
        if self.redis is not None:
            self.redis.stop()
        if self._redis_dir is not None:
            shutil.rmtree(self._redis_dir, ignore_errors=True)


def split(total: int, parts: int) -> List[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------------------- scenarios


def run_s1(
    kind: str, clients: int, window: int, cfg: Dict[str, Any], pin: bool, server_args: Sequence[str] = (), workers: int = 0,
    transport: Optional[str] = None,
) -> Dict[str, Any]:
    """S1 ping-pong; with ``workers`` the server is N processes joined by Redis
    (server CPU is then their sum, and each worker's share and clients are reported);
    with ``transport`` (``--websocket``) the server serves WebSocket too and the load
    comes over that transport."""
    params = {"clients": clients, "window": window, "warmup": cfg["s1_warmup"], "duration": cfg["s1_duration"], "ramp_timeout": cfg["case_timeout"] / 2}
    cluster: Dict[str, Any] = {}
    with Case(kind, pin, server_args, workers, transport) as case:
        (gen,) = case.spawn("s1", [params])
        ready = gen.expect("ready", cfg["case_timeout"])
        if ready["connected"] < clients:
            raise LimitReached(f"only {ready['connected']:,} of {clients:,} clients joined within the bound: {ready['errors']}")
        if workers:
            cluster["mirror_s"], cluster["worker_clients"] = case.wait_mirrors(clients, cfg["case_timeout"] / 4)
        wait_quiet(case.pids, 10.0)
        meter = case.meter()
        per_worker = CpuMeter({str(i): [pid] for i, pid in enumerate(case.server_pids)})
        gen.send("go")
        gen.expect("start", 30.0)
        meter.mark()
        per_worker.mark()
        gen.expect("end", cfg["s1_duration"] + 30.0)
        cpu = meter.read()
        worker_cpu = per_worker.read()
        result = gen.expect("result", 30.0)
    rate = result["round_trips"] / result["elapsed"]
    figures = {
        "clients": clients, "window": window, "rt_per_s": rate,
        "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "gen_cpu": result["cpu"], "server_cpu": cpu["server"], "other_cpu": cpu["other"],
        "server_cpu_us_per_rt": cpu["server"] / rate * 1e6 if rate else None,
        "errors": result["errors"], **case.about(),
    }
    if workers:
        shares = [worker_cpu[str(i)] for i in range(workers)]
        figures.update(cluster)
        figures.update({
            "workers": workers, "redis_cpu": cpu["redis"], "worker_cpu": shares,
            # The kernel picks a worker per connection by the 4-tuple hash: check that
            # every worker got clients and did work while the round trips were counted.
            "all_workers_busy": all(n > 0 for n in cluster["worker_clients"]) and all(x >= BUSY_WORKER_CPU for x in shares),
        })
    return figures


def run_s2(kind: str, clients: int, cfg: Dict[str, Any], pin: bool, workers: int = 0, transport: Optional[str] = None) -> Dict[str, Any]:
    """S2 fan-out; with ``workers`` the server is N processes joined by Redis, and the
    broadcast reaches the other workers' clients through it.  Measuring starts only once
    every worker's mirror knows all N clients."""
    procs = 1 if clients <= 200 else 2
    counts = split(clients, procs)
    ramp_timeout = cfg["case_timeout"] * 0.6
    params = [{"clients": n, "sender": i == 0, "ramp_timeout": ramp_timeout} for i, n in enumerate(counts)]
    cluster: Dict[str, Any] = {}
    with Case(kind, pin, workers=workers, transport=transport) as case:
        gens = case.spawn("s2", params)
        readies = [gen.expect("ready", ramp_timeout + 30.0) for gen in gens]
        connected = sum(r["connected"] for r in readies)
        if connected < clients:
            raise LimitReached(f"only {connected:,} of {clients:,} clients joined within {ramp_timeout:.0f} s: {[r['errors'] for r in readies]}")
        ramp = max(r["ramp_s"] for r in readies)
        if workers:
            cluster["mirror_s"], cluster["worker_clients"] = case.wait_mirrors(clients, cfg["case_timeout"] / 4)
        settle = wait_quiet(case.pids, cfg["case_timeout"] / 4)
        times: List[float] = []
        server_cpu0 = sum(proc_cpu_seconds(pid) for pid in case.server_pids)
        redis_cpu0 = proc_cpu_seconds(case.redis.pid) if case.redis else 0.0
        gen_cpu0 = sum(proc_cpu_seconds(g.pid) for g in gens)
        for seq in range(cfg["s2_repeats"]):
            gens[0].send(f"send {seq}")
            sent = gens[0].expect("sent", 30.0, seq=seq)
            lasts = [gen.expect("got", 60.0, seq=seq)["last"] for gen in gens]
            times.append(max(lasts) - sent["t"])
            wait_quiet(case.pids, 5.0, threshold=0.1, window=0.05)
        # CPU per broadcast (the quiet waits in between cost next to nothing).
        server_ms = (sum(proc_cpu_seconds(pid) for pid in case.server_pids) - server_cpu0) / len(times) * 1000
        redis_ms = ((proc_cpu_seconds(case.redis.pid) if case.redis else 0.0) - redis_cpu0) / len(times) * 1000
        gen_ms = (sum(proc_cpu_seconds(g.pid) for g in gens) - gen_cpu0) / len(times) * 1000
    median = statistics.median(times)
    figures = {
        "clients": clients, "repeats": len(times), "median_ms": median * 1000, "min_ms": min(times) * 1000,
        "max_ms": max(times) * 1000, "deliveries_per_s": clients / median, "ramp_s": ramp, "settle_s": settle,
        "gen_procs": procs, "server_cpu_ms_per_broadcast": server_ms, "gen_cpu_ms_per_broadcast": gen_ms,
        **case.about(),
    }
    if workers:
        figures.update(cluster)
        figures.update({"workers": workers, "redis_cpu_ms_per_broadcast": redis_ms})
    return figures


def run_s3(kind: str, clients: int, cfg: Dict[str, Any], pin: bool) -> Dict[str, Any]:
    procs = 1 if clients <= 200 else 2
    ramp_timeout = cfg["s3_ramp_timeout"]
    params = [{"clients": n, "ramp_timeout": ramp_timeout, "connect_timeout": 60.0} for n in split(clients, procs)]
    with Case(kind, pin) as case:
        time.sleep(0.2)
        rss_idle = proc_rss_kib(case.server.pid) or 0
        gens = case.spawn("s3", params)
        meter = case.meter()
        meter.mark()
        t0 = time.monotonic()
        readies = [gen.expect("ready", ramp_timeout + 60.0) for gen in gens]
        ramp = time.monotonic() - t0
        ramp_cpu = meter.read()
        connected = sum(r["connected"] for r in readies)
        errors: Dict[str, int] = {}
        for r in readies:
            for name, count in r["errors"].items():
                errors[name] = errors.get(name, 0) + count
        settle = wait_quiet([case.server.pid] + [g.pid for g in gens], cfg["case_timeout"] / 4)
        time.sleep(1.0)  # connections are held for a while, not just opened
        for gen in gens:
            gen.send("check")
        held = sum(gen.expect("held", 30.0)["alive"] for gen in gens)
        rss_held = proc_rss_kib(case.server.pid) or 0
        rss_peak = proc_status_kib(case.server.pid, "VmHWM:") or 0
        if case.server.popen.poll() is not None:
            raise CaseFailed(f"the {kind} server died: {case.server.stderr_tail()}")
    per_conn = (rss_held - rss_idle) / held if held else None
    return {
        "clients": clients, "connected": connected, "held": held, "errors": errors, "ramp_s": ramp,
        "settle_s": settle, "rss_idle_kib": rss_idle, "rss_held_kib": rss_held, "rss_peak_kib": rss_peak,
        "rss_per_conn_kib": per_conn, "ramp_cpu": ramp_cpu, **case.about(),
    }


def run_s4(kind: str, cfg: Dict[str, Any], pin: bool) -> Dict[str, Any]:
    params = {"size": 1 << 20, "window": 2, "warmup": cfg["s4_warmup"], "duration": cfg["s4_duration"]}
    with Case(kind, pin) as case:
        (gen,) = case.spawn("s4", [params])
        gen.expect("ready", 30.0)
        meter = case.meter()
        gen.send("go")
        gen.expect("start", 30.0)
        meter.mark()
        gen.expect("end", cfg["s4_duration"] + 30.0)
        cpu = meter.read()
        result = gen.expect("result", 30.0)
        rss = proc_rss_kib(case.server.pid)
    return {
        "payload_bytes": params["size"], "window": params["window"], "mb_per_s": result["bytes"] / result["elapsed"] / 1e6,
        "messages_per_s": result["acks"] / result["elapsed"], "gen_cpu": result["cpu"], "server_cpu": cpu["server"],
        "other_cpu": cpu["other"], "server_rss_kib": rss, "errors": result["errors"],
        "server_cpu_ms_per_mb": cpu["server"] / (result["bytes"] / result["elapsed"] / 1e6) * 1000 if result["bytes"] else None,
        **case.about(),
    }


def s5_payloads() -> Dict[str, Any]:
    chat = {"from": "alice", "room": "lobby", "text": "hello everyone, is the meeting still at three?", "ts": 1700000000}
    ints = list(range(-50, 50))
    nested = {
        "user": {"id": 4242, "name": "bob", "email": "bob@example.com", "roles": ["admin", "dev", "ops"]},
        "settings": {"theme": "dark", "lang": "en", "notifications": {"email": 1, "push": 0, "digest": "weekly"}},
        "items": [{"id": i, "name": f"item-{i}", "price": 100 + 7 * i, "tags": ["red", "small"]} for i in range(10)],
        "history": [{"at": 1700000000 + i * 60, "event": "login", "ok": 1} for i in range(5)],
    }
    return {"chat message dict": chat, "list of 100 ints": ints, "nested dict ~1 KB": nested}


def time_per_op(func: Callable[[], Any], seconds: float, repeats: int = 5) -> float:
    """Best of ``repeats`` timings of ``func`` (timeit-style: the minimum is the least
    disturbed by other load), in microseconds per call; about ``seconds`` in all."""
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            func()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds / repeats or number >= 10_000_000:
            break
        number *= 2 if elapsed == 0 else max(2, min(10, int(seconds / repeats / elapsed) + 1))
    best = elapsed
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(number):
            func()
        best = min(best, time.perf_counter() - t0)
    return best / number * 1e6


def run_s5(cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    from hisock_gevent import typecast

    rows = []
    for name, value in s5_payloads().items():
        figures: Dict[str, Any] = {"payload": name}
        for codec, msgpack_ok in (("native", False), ("msgpack", True)):
            fmt, payload = typecast.encode(value, msgpack_ok=msgpack_ok)
            if typecast.decode(fmt, payload) != value:
                raise CaseFailed(f"S5 {codec}: {name} does not round-trip")

            def op(value: Any = value, msgpack_ok: bool = msgpack_ok) -> None:
                f, p = typecast.encode(value, msgpack_ok=msgpack_ok)
                typecast.decode(f, p)

            figures[f"{codec}_us"] = time_per_op(op, cfg["s5_seconds"])
            figures[f"{codec}_bytes"] = len(fmt) + len(payload)
        figures["speedup"] = figures["native_us"] / figures["msgpack_us"]
        rows.append(figures)
    return rows


# ---------------------------------------------------------------------------- S6 held at scale

#: The servers S6 runs against: both can announce joins to nobody (the uvloop baseline cannot).
S6_KINDS = ("hisock", "baseline")
#: Descriptors a server process needs besides one per client (listener, epoll, stdio, ...).
S6_FD_MARGIN = 100
#: Clients bound to one source address (127.0.0.2, .3, ...): well under the ephemeral
#: port range, which bounds the connections from one address to the server's one port.
S6_PER_SOURCE = 10_000
#: Clients per generator process at most (each holds one descriptor per client).
S6_MAX_PER_GEN = 25_000
#: Handshakes in flight for all generators together, under the server's max_pending (4096).
S6_CONCURRENCY = 2_000
#: Clients S6 opens when the server announces every join to everyone (a hisock_gevent
#: without ``announce``): N joins then cost about N²/2 frames, 50 million at this size.
S6_ANNOUNCE_ALL_CLIENTS = 10_000
#: Progress samples (a quarter of a second apart) a ramp needs for joins/s early and late.
S6_MIN_SAMPLES = 8


def nofile_limits() -> Tuple[int, int]:
    """This process's RLIMIT_NOFILE (soft, hard); "unlimited" as wire.NOFILE_CEILING."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    return (wire.NOFILE_CEILING if soft == inf else soft), (wire.NOFILE_CEILING if hard == inf else hard)


def ephemeral_ports() -> int:
    """How many ports /proc/sys/net/ipv4/ip_local_port_range gives (28,232 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28_232


def hisock_announce_supported() -> bool:
    """True when this hisock_gevent's ServerConfig has ``announce`` (who hears of joins)."""
    import dataclasses

    try:
        from hisock_gevent.config import ServerConfig
    except ImportError:  # a hisock_gevent from before ServerConfig (a before/after bench)
        return False
    return "announce" in {field.name for field in dataclasses.fields(ServerConfig)}


def s6_plan(asked: int, per_source: int = S6_PER_SOURCE, per_gen: int = S6_MAX_PER_GEN) -> Dict[str, Any]:
    """How many clients S6 can hold here, and how: generator processes, source addresses.

    The server holds one descriptor per client, so RLIMIT_NOFILE's hard limit caps the
    case (only CAP_SYS_RESOURCE raises it; every process raises its soft limit to it).
    Without ``announce`` in hisock_gevent, the case is capped at S6_ANNOUNCE_ALL_CLIENTS.
    """
    soft, hard = nofile_limits()
    announce = "none" if hisock_announce_supported() else "all"
    clients, limited_by = asked, []
    if hard - S6_FD_MARGIN < clients:
        clients = hard - S6_FD_MARGIN
        limited_by.append(f"RLIMIT_NOFILE hard limit {hard:,} (one descriptor per client in the server)")
    if announce == "all" and clients > S6_ANNOUNCE_ALL_CLIENTS:
        clients = S6_ANNOUNCE_ALL_CLIENTS
        limited_by.append("hisock_gevent has no announce='none': every join is announced to all (N²/2 frames)")
    ports = ephemeral_ports()
    per_source = max(1, min(per_source, ports * 9 // 10))
    sources = [f"127.0.0.{2 + i}" for i in range(min(253, -(-clients // per_source)))]
    per_gen = max(1, min(per_gen, hard - 64))
    counts = split(clients, -(-clients // per_gen))
    firsts = [sum(counts[:i]) for i in range(len(counts))]
    return {
        "asked": asked, "clients": clients, "limited_by": limited_by, "announce": announce,
        "nofile_soft": soft, "nofile_hard": hard, "ephemeral_ports": ports, "per_source": per_source,
        "sources": sources, "gen_counts": counts, "gen_firsts": firsts,
    }


def join_rates(progress: List[Tuple[float, int, int]], total: int, t0: float) -> Dict[str, Optional[float]]:
    """Joins/s early and late in the ramp, from each generator's ``(t, gen, joined)``
    samples: between 10 % and 35 % of the clients, and between 65 % and 90 %.  A rate that
    falls as clients accumulate is a cost per join that grows with them."""
    latest: Dict[int, int] = {}
    series = [(t0, 0)]
    for t, gen, joined in sorted(progress):
        latest[gen] = joined
        series.append((t, sum(latest.values())))

    samples = collections.Counter(gen for _, gen, _ in progress)
    if not samples or min(samples.values()) < S6_MIN_SAMPLES:
        return {"joins_per_s_early": None, "joins_per_s_late": None}  # a ramp too short to tell

    def crossing(fraction: float) -> Optional[float]:
        goal = fraction * total
        for (ta, a), (tb, b) in zip(series, series[1:]):
            if a < goal <= b:
                return ta + (tb - ta) * (goal - a) / (b - a)
        return None

    def rate(lo: float, hi: float) -> Optional[float]:
        a, b = crossing(lo), crossing(hi)
        return None if a is None or b is None or b <= a else (hi - lo) * total / (b - a)

    return {"joins_per_s_early": rate(0.10, 0.35), "joins_per_s_late": rate(0.65, 0.90)}


def slab_kib() -> Optional[int]:
    """The kernel's slab memory, machine-wide (/proc/meminfo ``Slab:``), KiB: where both
    ends of every TCP connection live (other programs move it too)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Slab:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_s6(kind: str, plan: Dict[str, Any], cfg: Dict[str, Any], pin: bool) -> Dict[str, Any]:
    """S6: open ``plan["clients"]`` clients from several generator processes and source
    addresses, hold them, then time broadcasts to all of them; RSS per connection, joins/s
    (whole ramp, early and late), fan-out time and every process's CPU."""
    clients = plan["clients"]
    counts = plan["gen_counts"]
    ramp_timeout = cfg["s6_ramp_timeout"]
    concurrency = max(50, S6_CONCURRENCY // len(counts))
    params = [
        {
            "clients": n, "first": first, "sources": plan["sources"], "per_source": plan["per_source"],
            "sender": i == 0, "ramp_timeout": ramp_timeout, "connect_timeout": 60.0, "concurrency": concurrency,
        }
        for i, (n, first) in enumerate(zip(counts, plan["gen_firsts"]))
    ]
    with Case(kind, pin, ("--announce", plan["announce"])) as case:
        time.sleep(0.2)
        rss_idle = proc_rss_kib(case.server.pid) or 0
        slab_idle = slab_kib()
        meter = case.meter()
        meter.mark()
        t0 = time.monotonic()
        gens = case.spawn("s6", params)
        meter.pids["gen"] = [g.pid for g in gens]
        readies = [gen.expect("ready", ramp_timeout + 60.0) for gen in gens]
        ramp_cpu = meter.read()
        connected = sum(r["connected"] for r in readies)
        errors: Dict[str, int] = {}
        for r in readies:
            for name, count in r["errors"].items():
                errors[name] = errors.get(name, 0) + count
        if connected < clients * 0.99:
            raise LimitReached(f"only {connected:,} of {clients:,} clients joined within {ramp_timeout:.0f} s: {errors}")
        ramp = max(r["ramp_s"] for r in readies)
        progress = [(e["t"], i, e["joined"]) for i, gen in enumerate(gens) for e in gen.pending if e.get("ev") == "progress"]
        for gen in gens:
            gen.pending = [e for e in gen.pending if e.get("ev") != "progress"]
        settle = wait_quiet(case.pids, cfg["case_timeout"] / 4)
        time.sleep(cfg["s6_hold_s"])  # held for a while, not just opened
        for gen in gens:
            gen.send("check")
        held = sum(gen.expect("held", 30.0)["alive"] for gen in gens)
        rss_held = proc_rss_kib(case.server.pid) or 0
        slab_held = slab_kib()
        gen_rss = sum(proc_rss_kib(g.pid) or 0 for g in gens)
        times: List[float] = []
        server_cpu0 = proc_cpu_seconds(case.server.pid)
        gen_cpu0 = sum(proc_cpu_seconds(g.pid) for g in gens)
        for seq in range(cfg["s6_repeats"]):
            gens[0].send(f"send {seq}")
            sent = gens[0].expect("sent", 30.0, seq=seq)
            lasts = [gen.expect("got", 120.0, seq=seq)["last"] for gen in gens]
            times.append(max(lasts) - sent["t"])
            wait_quiet(case.pids, 10.0, threshold=0.1, window=0.05)
        server_ms = (proc_cpu_seconds(case.server.pid) - server_cpu0) / len(times) * 1000
        gen_ms = (sum(proc_cpu_seconds(g.pid) for g in gens) - gen_cpu0) / len(times) * 1000
        rss_after = proc_rss_kib(case.server.pid) or 0
        rss_peak = proc_status_kib(case.server.pid, "VmHWM:") or 0
        if case.server.popen.poll() is not None:
            raise CaseFailed(f"the {kind} server died: {case.server.stderr_tail()}")
    median = statistics.median(times)
    busy = ramp_cpu["gen"] + ramp_cpu["server"]
    return {
        "clients": clients, "connected": connected, "held": held, "errors": errors, "ramp_s": ramp, "settle_s": settle,
        "joins_per_s": connected / ramp if ramp else None, **join_rates(progress, connected, t0),
        "rss_idle_kib": rss_idle, "rss_held_kib": rss_held, "rss_after_fanout_kib": rss_after, "rss_peak_kib": rss_peak,
        "rss_per_conn_kib": (rss_held - rss_idle) / held if held else None,
        "gen_rss_kib": gen_rss, "gen_procs": len(gens),
        "kernel_slab_kib_per_conn": (slab_held - slab_idle) / held if held and slab_held is not None and slab_idle is not None else None,
        "ramp_cpu": ramp_cpu, "gen_cpu": ramp_cpu["gen"], "server_cpu": ramp_cpu["server"], "other_cpu": ramp_cpu["other"],
        "gen_cpu_share": ramp_cpu["gen"] / busy if busy else None,
        "server_cpu_us_per_join": ramp_cpu["server"] * ramp / connected * 1e6 if connected else None,
        "gen_cpu_us_per_join": ramp_cpu["gen"] * ramp / connected * 1e6 if connected else None,
        "median_ms": median * 1000, "min_ms": min(times) * 1000, "max_ms": max(times) * 1000, "repeats": len(times),
        "deliveries_per_s": held / median if median else None,
        "server_cpu_ms_per_broadcast": server_ms, "gen_cpu_ms_per_broadcast": gen_ms,
        "gen_cpu_share_fanout": gen_ms / (gen_ms + server_ms) if gen_ms + server_ms else None,
        **case.about(),
    }


# ---------------------------------------------------------------------------- running


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def attempt(label: str, func: Callable[[], Dict[str, Any]], failures: List[str]) -> Dict[str, Any]:
    t0 = time.monotonic()
    try:
        result = func()
    except LimitReached as exc:
        log(f"  {label}: stopped by its time bound: {exc}")
        return {"limit": str(exc), "wall_s": round(time.monotonic() - t0, 2)}
    except CaseFailed as exc:
        log(f"  {label}: FAILED: {exc}")
        failures.append(f"{label}: {exc}")
        return {"error": str(exc)}
    except Exception as exc:  # a bug in the bench itself: record it, run the other cases
        log(f"  {label}: CRASHED: {type(exc).__name__}: {exc}")
        failures.append(f"{label}: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    result["wall_s"] = round(time.monotonic() - t0, 2)
    log(f"  {label}: done in {result['wall_s']:.1f} s")
    return result


def run_all(
    mode: str, kinds: Sequence[str], scenarios: Sequence[str], pin: bool, s6: Optional[Dict[str, Optional[int]]] = None,
) -> Tuple[Dict[str, Any], List[str]]:
    """Every case of every scenario asked for; ``s6`` overrides S6's ``clients``,
    ``per_source`` and ``per_gen``."""
    s6 = s6 or {}
    cfg = MODES[mode]
    failures: List[str] = []
    out: Dict[str, Any] = {}
    if "S1" in scenarios:
        log("S1 ping-pong")
        out["S1"] = []
        for clients, window in cfg["s1_cases"]:
            row: Dict[str, Any] = {"clients": clients, "window": window}
            for kind in kinds:
                row[kind] = attempt(f"S1 C={clients} W={window} {kind}", lambda kind=kind, clients=clients, window=window: run_s1(kind, clients, window, cfg, pin), failures)
            out["S1"].append(row)
    if "S2" in scenarios:
        log("S2 fan-out")
        out["S2"] = []
        for clients in cfg["s2_clients"]:
            row = {"clients": clients}
            for kind in kinds:
                row[kind] = attempt(f"S2 N={clients} {kind}", lambda kind=kind, clients=clients: run_s2(kind, clients, cfg, pin), failures)
            out["S2"].append(row)
    if "S3" in scenarios:
        log("S3 connections")
        row = {"clients": cfg["s3_clients"]}
        for kind in kinds:
            row[kind] = attempt(f"S3 N={cfg['s3_clients']} {kind}", lambda kind=kind: run_s3(kind, cfg["s3_clients"], cfg, pin), failures)
        out["S3"] = [row]
    if "S4" in scenarios:
        log("S4 bulk")
        row = {"payload_bytes": 1 << 20}
        for kind in kinds:
            row[kind] = attempt(f"S4 {kind}", lambda kind=kind: run_s4(kind, cfg, pin), failures)
        out["S4"] = [row]
    if "S6" in scenarios:
        plan = s6_plan(s6.get("clients") or cfg["s6_clients"], s6.get("per_source") or S6_PER_SOURCE, s6.get("per_gen") or S6_MAX_PER_GEN)
        log(f"S6 held at scale: {plan['clients']:,} clients (asked {plan['asked']:,}), announce={plan['announce']!r}, "
            f"{len(plan['gen_counts'])} generator(s), sources {plan['sources'][0]}..{plan['sources'][-1]}; "
            f"RLIMIT_NOFILE soft/hard {plan['nofile_soft']:,}/{plan['nofile_hard']:,}"
            + "".join(f"; limited by {why}" for why in plan["limited_by"]))
        row = {"clients": plan["clients"], "plan": plan}
        for kind in [k for k in kinds if k in S6_KINDS]:
            row[kind] = attempt(f"S6 N={plan['clients']} {kind}", lambda kind=kind: run_s6(kind, plan, cfg, pin), failures)
        out["S6"] = [row]
    if "S5" in scenarios:
        log("S5 codec")
        try:
            out["S5"] = run_s5(cfg)
        except CaseFailed as exc:
            failures.append(f"S5: {exc}")
            out["S5"] = [{"error": str(exc)}]
    return out, failures


# ---------------------------------------------------------------------------- the table


def fmt_num(value: Optional[float], digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


#: Which way a figure should go, said in the ratio column of every row.
HIGHER, LOWER = "higher", "lower"


def versus(a: Optional[float], b: Optional[float], better: str, note: str = "") -> str:
    """The ratio cell of a table row: ``a / b`` and which way is better, e.g.
    ``"0.92x (higher is better)"`` or ``"1.10x (p99; lower is better)"``."""
    return f"{ratio(a, b):>6} ({note + '; ' if note else ''}{better} is better)"


def get(result: Any, key: str) -> Optional[float]:
    if not isinstance(result, dict) or "error" in result or "limit" in result:
        return None
    return result.get(key)


def limits(results: Dict[str, Any], kinds: Sequence[str] = tuple(SERVERS)) -> List[str]:
    """Cases a server could not get ready within their time bound."""
    found = []
    for scenario, rows in results.items():
        for row in rows:
            for kind in kinds:
                if isinstance(row.get(kind), dict) and "limit" in row[kind]:
                    case = ", ".join(f"{k}={v}" for k, v in row.items() if k not in kinds and k not in ("ratios", "plan"))
                    found.append(f"{scenario} {case} {kind}: {row[kind]['limit']}")
    return found


def _pair(result: Any, a: str, b: str, digits: int = 2) -> str:
    x, y = get(result, a), get(result, b)
    return "-" if x is None or y is None else f"{x:.{digits}f} / {y:.{digits}f}"


def _cpu(result: Any) -> str:
    g, s, o = get(result, "gen_cpu"), get(result, "server_cpu"), get(result, "other_cpu")
    if g is None or s is None:
        return "-"
    return f"{g * 100:.0f} / {s * 100:.0f} / {(o or 0) * 100:.0f}"


def _rss(result: Any) -> str:
    i, h, p = get(result, "rss_idle_kib"), get(result, "rss_held_kib"), get(result, "rss_peak_kib")
    return "-" if i is None or h is None else f"{i / 1024:.0f} / {h / 1024:.0f} / {(p or 0) / 1024:.0f}"


def _gen_shares(result: Any) -> str:
    """S6: the load generators' share of the CPU the case used (generators + server)."""
    a, b = get(result, "gen_cpu_share"), get(result, "gen_cpu_share_fanout")
    return "-" if a is None or b is None else f"{a * 100:.0f} % / {b * 100:.0f} %"


def _num(key: str, digits: int = 0) -> Callable[[Any], str]:
    return lambda result: fmt_num(get(result, key), digits)


class Metric(NamedTuple):
    """One row of the table: its label, how one server's result shows in its cell, and the
    figure the ratio columns divide (hisock / each baseline) with which way is better and
    a note for the ratio cell.  A row without a ``key`` has no ratio."""

    label: str
    cell: Callable[[Any], str]
    key: Optional[str] = None
    better: str = ""
    note: str = ""


#: The table's rows for the scenarios that run against servers (S5 runs in-process), and
#: the figures whose ratios go into the JSON (``row["ratios"][<baseline>][<key>]``).
METRICS: Dict[str, List[Metric]] = {
    "S1": [
        Metric("round trips/s", _num("rt_per_s"), "rt_per_s", HIGHER),
        Metric("p50 / p99 latency ms", lambda r: _pair(r, "p50_ms", "p99_ms"), "p99_ms", LOWER, note="p99"),
        Metric("server CPU us per round trip", _num("server_cpu_us_per_rt", 1), "server_cpu_us_per_rt", LOWER),
        Metric("CPU % gen / server / other", _cpu),
    ],
    "S2": [
        Metric("all received, median ms", _num("median_ms", 1), "median_ms", LOWER),
        Metric("deliveries/s", _num("deliveries_per_s"), "deliveries_per_s", HIGHER),
        Metric(
            "CPU ms/broadcast server / gen", lambda r: _pair(r, "server_cpu_ms_per_broadcast", "gen_cpu_ms_per_broadcast", 1),
            "server_cpu_ms_per_broadcast", LOWER, note="srv",
        ),
        Metric("join storm (ramp) s", _num("ramp_s", 1), "ramp_s", LOWER),
    ],
    "S3": [
        Metric("held", _num("held"), "held", HIGHER),
        Metric("server RSS KiB/conn", _num("rss_per_conn_kib", 1), "rss_per_conn_kib", LOWER),
        Metric("server RSS MiB idle/held/peak", _rss),
        Metric("open + hand-shake all, s", _num("ramp_s", 1), "ramp_s", LOWER),
    ],
    "S4": [
        Metric("MB/s (10^6 B)", _num("mb_per_s", 1), "mb_per_s", HIGHER),
        Metric("server CPU ms per MB", _num("server_cpu_ms_per_mb", 2), "server_cpu_ms_per_mb", LOWER),
        Metric("CPU % gen / server / other", _cpu),
    ],
    "S6": [
        Metric("held", _num("held"), "held", HIGHER),
        Metric("server RSS KiB/conn", _num("rss_per_conn_kib", 1), "rss_per_conn_kib", LOWER),
        Metric("server RSS MiB idle/held/peak", _rss),
        Metric("joins/s, whole ramp", _num("joins_per_s"), "joins_per_s", HIGHER),
        Metric("joins/s early / late in the ramp", lambda r: _pair(r, "joins_per_s_early", "joins_per_s_late", 0)),
        Metric("server CPU us per join", _num("server_cpu_us_per_join"), "server_cpu_us_per_join", LOWER),
        Metric("ramp CPU % gen / server / other", _cpu),
        Metric("fan-out to all, median ms", _num("median_ms", 1), "median_ms", LOWER),
        Metric(
            "CPU ms/broadcast server / gen", lambda r: _pair(r, "server_cpu_ms_per_broadcast", "gen_cpu_ms_per_broadcast", 1),
            "server_cpu_ms_per_broadcast", LOWER, note="srv",
        ),
        Metric("generator's share of CPU, ramp / fan-out", _gen_shares),
    ],
}
TITLES = {"S1": "S1 ping-pong", "S2": "S2 fan-out", "S3": "S3 connections", "S4": "S4 bulk", "S6": "S6 held at scale"}


def case_label(scenario: str, row: Dict[str, Any]) -> str:
    if scenario == "S1":
        return f"C={row['clients']} W={row['window']}"
    if scenario == "S4":
        return "1 MiB, window 2"
    if scenario == "S6":
        return f"N={row['clients']:,} announce={row['plan']['announce']}"
    return f"N={row['clients']:,}"


def add_ratios(results: Dict[str, Any]) -> None:
    """Give every S1-S4 row ``"ratios"``: for each baseline, hisock's figure divided by the
    baseline's for every metric with a ratio (None where either figure is missing).
    Which way is better for each key: ``RATIO_BETTER``."""
    for scenario, metrics in METRICS.items():
        for row in results.get(scenario, []):
            h = row.get("hisock")
            row["ratios"] = {
                kind: {m.key: _quotient(get(h, m.key), get(row.get(kind), m.key)) for m in metrics if m.key}
                for kind in BASELINES if kind in row
            }


def _quotient(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else round(a / b, 4)


#: Which way is better for each ratio key of the JSON (written into its ``meta``).
RATIO_BETTER = {m.key: m.better for metrics in METRICS.values() for m in metrics if m.key}


def baseline_loop(results: Dict[str, Any]) -> Optional[str]:
    """The event loop the uvloop baseline said it ran on (the first case that says), e.g.
    "uvloop 0.21.0" or "asyncio default loop; uvloop is not installed"."""
    for rows in results.values():
        for row in rows:
            loop = get(row.get("uvloop"), "loop")
            if loop:
                return str(loop)
    return None


def loop_titles(results: Dict[str, Any]) -> Tuple[str, str]:
    """The uvloop baseline's column title and ratio title, after the loop it said it ran:
    ("uvloop baseline", "ratio h/uvloop"), or the asyncio fallback's titles."""
    loop = baseline_loop(results)
    if loop is None or loop.startswith("uvloop"):
        return "uvloop baseline", "ratio h/uvloop"
    return "asyncio baseline (no uvloop)", "ratio h/asyncio"


def table_rows(results: Dict[str, Any]) -> List[Tuple[str, ...]]:
    """Rows of (scenario, case, metric, hisock, gevent baseline, uvloop baseline,
    ratio to the gevent baseline, ratio to the uvloop baseline)."""
    rows: List[Tuple[str, ...]] = []
    for scenario, metrics in METRICS.items():
        for row in results.get(scenario, []):
            h = row.get("hisock")
            for i, m in enumerate(metrics):
                cells = [m.cell(row.get(kind)) for kind in ("hisock", *BASELINES)]
                ratios = [versus(get(h, m.key), get(row.get(kind), m.key), m.better, m.note) if m.key else "" for kind in BASELINES]
                lead = (TITLES[scenario], case_label(scenario, row)) if i == 0 else ("", "")
                rows.append((*lead, m.label, *cells, *ratios))
    for row in results.get("S5", []):
        if "error" in row:
            rows.append(("S5 codec", "-", "error", row["error"][:40], "", "", "", ""))
            continue
        rows.append((
            "S5 codec" if row is results["S5"][0] else "",
            row["payload"],
            "encode+decode us/op",
            f"{row['msgpack_us']:.1f} msgpack",
            f"{row['native_us']:.1f} native",
            "",
            f"{row['speedup']:.1f}x faster ({HIGHER} is better)",
            "",
        ))
    return rows


def render_table(results: Dict[str, Any]) -> str:
    title, ratio_title = loop_titles(results)
    header = ("scenario", "case", "metric", "hisock_gevent", "gevent baseline", title, "ratio h/gevent", ratio_title)
    return render_rows(header, table_rows(results))


def render_rows(header: Tuple[str, ...], body: Sequence[Tuple[str, ...]], first_figure: int = 3) -> str:
    """Text columns, a rule under the header and between scenarios; the figures (from
    column ``first_figure`` on) right-aligned, the ratio columns (ratio, then which way
    is better) left-aligned."""
    rows = [header] + list(body)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = [i >= first_figure and not header[i].startswith("ratio") for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        if n > 1 and r[0]:
            lines.append("-+-".join("-" * w for w in widths))
        cells = [r[i].rjust(widths[i]) if right[i] else r[i].ljust(widths[i]) for i in range(len(header))]
        lines.append(" | ".join(cells))
        if n == 0:
            lines.append("=+=".join("=" * w for w in widths))
    return "\n".join(lines)


def target_lines(results: Dict[str, Any]) -> List[str]:
    """The targets this run can judge, each with the figure measured and whether it is met.

    A target about a bigger case than the run has (S2 at 1,000 clients, S3 at 10,000) is
    left out: :func:`targets_out_of_reach` names those.
    """
    lines: List[str] = []

    def verdict(ok: Optional[bool]) -> str:
        return "n/a" if ok is None else "met" if ok else "NOT met"

    s1 = [(row, get(row.get("hisock"), "rt_per_s"), get(row.get("baseline"), "rt_per_s")) for row in results.get("S1", [])]
    s1 = [(row, h / b) for row, h, b in s1 if h is not None and b]
    if s1:
        worst_row, worst = min(s1, key=lambda item: item[1])
        figures = ", ".join(f"C={row['clients']} W={row['window']}: {r:.2f}x" for row, r in s1)
        lines.append(f"S1  hisock >= 0.75x baseline round trips/s in every case: worst {worst:.2f}x (C={worst_row['clients']} W={worst_row['window']}) -> {verdict(worst >= 0.75)}  [{figures}]")
    for row in results.get("S2", []):
        if row["clients"] == S2_TARGET_CLIENTS:
            h, b = get(row.get("hisock"), "median_ms"), get(row.get("baseline"), "median_ms")
            ok = None if h is None or b is None else h / b <= 1.35
            if h is None and isinstance(row.get("hisock"), dict) and "limit" in row["hisock"]:
                ok = False
            lines.append(f"S2  fan-out time at 1,000 clients <= 1.35x baseline: {ratio(h, b)} -> {verdict(ok)}")
    for row in results.get("S3", []):
        if row["clients"] < S3_TARGET_CLIENTS:
            continue
        h = row.get("hisock")
        held, per = get(h, "held"), get(h, "rss_per_conn_kib")
        ok = None if held is None else held >= S3_TARGET_CLIENTS and per is not None and per <= 40
        lines.append(f"S3  10,000 clients held, RSS <= 40 KiB/conn: {fmt_num(held)} held, {fmt_num(per, 1)} KiB/conn -> {verdict(ok)}")
    for row in results.get("S4", []):
        h, b = get(row.get("hisock"), "mb_per_s"), get(row.get("baseline"), "mb_per_s")
        ok = None if h is None or not b else h / b >= 0.8
        lines.append(f"S4  hisock >= 0.8x baseline MB/s: {ratio(h, b)} -> {verdict(ok)}")
    for row in results.get("S6", []):
        if row["clients"] < S6_TARGET_CLIENTS:
            continue
        h = row.get("hisock")
        held, per = get(h, "held"), get(h, "rss_per_conn_kib")
        ok = None if held is None else held >= S6_TARGET_CLIENTS
        lines.append(f"S6  100,000 clients held by one process: {fmt_num(held)} held, {fmt_num(per, 1)} KiB/conn -> {verdict(ok)}")
    s5 = [row for row in results.get("S5", []) if "speedup" in row]
    if s5:
        checked = [row for row in s5 if row["payload"] in ("chat message dict", "list of 100 ints")]
        ok = all(row["speedup"] >= 3 for row in checked) if checked else None
        figures = ", ".join(f"{row['payload']}: {row['speedup']:.2f}x" for row in s5)
        lines.append(f"S5  msgpack >= 3x faster than native for the dict and the list: {verdict(ok)}  [{figures}]")
    return lines


def targets_out_of_reach(results: Dict[str, Any]) -> List[str]:
    """Targets of scenarios that ran only with cases smaller than the target's."""
    missed: List[str] = []
    s2 = [row["clients"] for row in results.get("S2", [])]
    if s2 and S2_TARGET_CLIENTS not in s2:
        missed.append(f"S2 (about {S2_TARGET_CLIENTS:,} clients; this run had {', '.join(f'{n:,}' for n in s2)})")
    s3 = [row["clients"] for row in results.get("S3", [])]
    if s3 and max(s3) < S3_TARGET_CLIENTS:
        missed.append(f"S3 (about {S3_TARGET_CLIENTS:,} clients; this run opened {max(s3):,})")
    for row in results.get("S6", []):
        if row["clients"] < S6_TARGET_CLIENTS:
            why = "; ".join(row["plan"]["limited_by"]) or f"asked for {row['plan']['asked']:,}"
            missed.append(f"S6 ({S6_TARGET_CLIENTS:,} clients; this run opened {row['clients']:,}: {why})")
    return missed


# ---------------------------------------------------------------------------- --workers

#: S1 cases for ``--workers``: enough clients that the kernel's 4-tuple hash almost surely
#: gives every worker some (with C clients, a worker gets none with probability ~N**-(C-1)).
WORKERS_S1_CASES = {
    "smoke": [(16, 2)],
    "quick": [(c, w) for c in (50, 500) for w in (1, 4)],
    "full": [(c, w) for c in (50, 500) for w in (1, 4)],
}
WORKERS_SCENARIOS = ("S1", "S2")


def cluster_kind(workers: int) -> str:
    return f"hisock x{workers}"


def run_workers(mode: str, workers: int, scenarios: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """S1 and S2 against one hisock process (no Redis) and against ``workers`` processes
    sharing a port through SO_REUSEPORT and joined by a fresh redis-server; never pinned."""
    cfg = MODES[mode]
    single, cluster = "hisock", cluster_kind(workers)
    failures: List[str] = []
    out: Dict[str, Any] = {}
    if "S1" in scenarios:
        log("S1 ping-pong")
        out["S1"] = []
        for clients, window in WORKERS_S1_CASES[mode]:
            row: Dict[str, Any] = {"clients": clients, "window": window}
            for kind, n in ((single, 0), (cluster, workers)):
                row[kind] = attempt(f"S1 C={clients} W={window} {kind}", lambda n=n, clients=clients, window=window: run_s1("hisock", clients, window, cfg, False, workers=n), failures)
            out["S1"].append(row)
    if "S2" in scenarios:
        log("S2 fan-out")
        out["S2"] = []
        for clients in cfg["s2_clients"]:
            row = {"clients": clients}
            for kind, n in ((single, 0), (cluster, workers)):
                row[kind] = attempt(f"S2 N={clients} {kind}", lambda n=n, clients=clients: run_s2("hisock", clients, cfg, False, workers=n), failures)
            out["S2"].append(row)
    return out, failures


def workers_table_rows(results: Dict[str, Any], workers: int) -> List[Tuple[str, str, str, str, str, str]]:
    k1, kn = "hisock", cluster_kind(workers)
    rows: List[Tuple[str, str, str, str, str, str]] = []
    for row in results.get("S1", []):
        a, b = row.get(k1), row.get(kn)
        case = f"C={row['clients']} W={row['window']}"
        rows.append(("S1 ping-pong", case, "round trips/s", fmt_num(get(a, "rt_per_s")), fmt_num(get(b, "rt_per_s")), versus(get(b, "rt_per_s"), get(a, "rt_per_s"), HIGHER)))
        rows.append(("", "", "p50 / p99 latency ms", _pair(a, "p50_ms", "p99_ms"), _pair(b, "p50_ms", "p99_ms"), versus(get(b, "p99_ms"), get(a, "p99_ms"), LOWER, note="p99")))
        rows.append(("", "", "server CPU us per round trip", fmt_num(get(a, "server_cpu_us_per_rt"), 1), fmt_num(get(b, "server_cpu_us_per_rt"), 1), versus(get(b, "server_cpu_us_per_rt"), get(a, "server_cpu_us_per_rt"), LOWER)))
        rows.append(("", "", "CPU % gen / server / redis / other", _cpu4(a), _cpu4(b), ""))
        rows.append(("", "", "clients; CPU % per worker", _spread(a, row["clients"]), _spread(b, row["clients"]), _busy(b)))
    for row in results.get("S2", []):
        a, b = row.get(k1), row.get(kn)
        case = f"N={row['clients']:,}"
        rows.append(("S2 fan-out", case, "all received, median ms", fmt_num(get(a, "median_ms"), 1), fmt_num(get(b, "median_ms"), 1), versus(get(b, "median_ms"), get(a, "median_ms"), LOWER)))
        rows.append(("", "", "deliveries/s", fmt_num(get(a, "deliveries_per_s")), fmt_num(get(b, "deliveries_per_s")), versus(get(b, "deliveries_per_s"), get(a, "deliveries_per_s"), HIGHER)))
        rows.append(("", "", "CPU ms/broadcast server / redis / gen", _ms3(a), _ms3(b), versus(get(b, "server_cpu_ms_per_broadcast"), get(a, "server_cpu_ms_per_broadcast"), LOWER, note="srv")))
        rows.append(("", "", "join storm (ramp) s", fmt_num(get(a, "ramp_s"), 1), fmt_num(get(b, "ramp_s"), 1), versus(get(b, "ramp_s"), get(a, "ramp_s"), LOWER)))
        rows.append(("", "", "clients per worker; mirror wait s", _spread(a, row["clients"], cpu=False), _spread(b, row["clients"], cpu=False), ""))
    return rows


def _cpu4(result: Any) -> str:
    g, s, o = get(result, "gen_cpu"), get(result, "server_cpu"), get(result, "other_cpu")
    if g is None or s is None:
        return "-"
    r = get(result, "redis_cpu")
    return f"{g * 100:.0f} / {s * 100:.0f} / {'-' if r is None else f'{r * 100:.0f}'} / {(o or 0) * 100:.0f}"


def _ms3(result: Any) -> str:
    s, g = get(result, "server_cpu_ms_per_broadcast"), get(result, "gen_cpu_ms_per_broadcast")
    if s is None or g is None:
        return "-"
    r = get(result, "redis_cpu_ms_per_broadcast")
    return f"{s:.1f} / {'-' if r is None else f'{r:.1f}'} / {g:.1f}"


def _spread(result: Any, clients: int, cpu: bool = True) -> str:
    """Each worker's clients (and CPU %, or the mirror wait); one process: all of them."""
    if get(result, "server_cpu" if cpu else "median_ms") is None:
        return "-"
    local = result.get("worker_clients")
    if local is None:
        return f"{clients:,}; {result['server_cpu'] * 100:.0f}" if cpu else f"{clients:,}"
    counts = " + ".join(f"{n:,}" for n in local)
    if cpu:
        return counts + "; " + " + ".join(f"{x * 100:.0f}" for x in result["worker_cpu"])
    return f"{counts}; {result['mirror_s']:.1f}"


def _busy(result: Any) -> str:
    busy = get(result, "all_workers_busy")
    return "" if busy is None else "all busy" if busy else "NOT all busy"


def workers_notes(results: Dict[str, Any], workers: int) -> List[str]:
    """The closing note: each ratio xN/1 with the load generator's share of the CPU."""
    k1, kn = "hisock", cluster_kind(workers)
    lines: List[str] = []

    def gen_share(result: Any) -> str:
        g = get(result, "gen_cpu")
        return "-" if g is None else f"{g * 100:.0f} % of a core ({g / NCPU * 100:.0f} % of the machine)"

    for row in results.get("S1", []):
        a, b = row.get(k1), row.get(kn)
        lines.append(
            f"S1 C={row['clients']} W={row['window']}: round trips/s x{workers}/1 = {ratio(get(b, 'rt_per_s'), get(a, 'rt_per_s'))}; "
            f"load generator {gen_share(a)} with 1 process, {gen_share(b)} with {workers}"
        )
    unbalanced = [f"C={row['clients']} W={row['window']}" for row in results.get("S1", []) if get(row.get(kn), "all_workers_busy") is False]
    if results.get("S1"):
        lines.append("S1: every worker got clients and used CPU in every case" if not unbalanced else f"S1: NOT every worker got clients and CPU in {', '.join(unbalanced)}")
    for row in results.get("S2", []):
        a, b = row.get(k1), row.get(kn)
        gens = [get(x, "gen_cpu_ms_per_broadcast") for x in (a, b)]
        servers = [get(x, "server_cpu_ms_per_broadcast") for x in (a, b)]
        redis = [get(x, "redis_cpu_ms_per_broadcast") or 0.0 for x in (a, b)]
        share = " / ".join(
            "-" if g is None or s is None else f"{g / max(1e-9, g + s + r) * 100:.0f} %"
            for g, s, r in zip(gens, servers, redis)
        )
        lines.append(
            f"S2 N={row['clients']:,}: fan-out time x{workers}/1 = {ratio(get(b, 'median_ms'), get(a, 'median_ms'))}, "
            f"server CPU per broadcast x{workers}/1 = {ratio(servers[1], servers[0])}; "
            f"load generator's share of the CPU per broadcast (1 process / {workers}): {share}"
        )
    return lines


def print_workers(document: Dict[str, Any], workers: int) -> None:
    results = document["results"]
    header = ("scenario", "case", "metric", "hisock (1 process)", cluster_kind(workers), f"ratio x{workers}/1")
    print()
    print(render_rows(header, workers_table_rows(results, workers)))
    print()
    bounded = limits(results, ("hisock", cluster_kind(workers)))
    if bounded:
        print("Stopped by their time bound (shown as '-'):\n  " + "\n  ".join(bounded))
        print()
    print(f"1 process vs {workers} worker processes (SO_REUSEPORT on one port, joined by a fresh redis-server, persistence off):")
    for line in document["notes"]:
        print("  " + line)
    print(f"Pinning: off for both kinds ({workers} workers, redis-server and the load generator(s) share the {NCPU} CPUs as the kernel schedules them).")
    print(f"CPU % is of one core: server = sum over the {workers} workers, redis = redis-server, gen = load generator, other = processes outside "
          "the benchmark (noise). 'clients; CPU % per worker': each worker's own clients and CPU during the window.")


# ---------------------------------------------------------------------------- join storm

#: The announcement scopes ``--join-storm`` compares, "all" (HiSock's) first.
JOIN_STORM_SCOPES = ("all", "group", "none")
#: Clients per group in the join storm (every scope gets the same hellos).
JOIN_STORM_GROUP_SIZE = 50


def run_join_storm(scope: str, clients: int, cfg: Dict[str, Any], pin: bool) -> Dict[str, Any]:
    """S3's ramp (open and hand-shake ``clients``, 200 in flight per generator) against
    ``hisock_server.py --announce scope``, every client in a group of
    :data:`JOIN_STORM_GROUP_SIZE`.  The ramp ends when every client has its own answer;
    the announcements of the last joins may still be on their way then, so the storm is
    also timed until the server and generators are quiet."""
    procs = 1 if clients <= 200 else 2
    ramp_timeout = cfg["s3_ramp_timeout"]
    params = [
        {
            "clients": n, "ramp_timeout": ramp_timeout, "connect_timeout": 60.0,
            "group_size": JOIN_STORM_GROUP_SIZE, "group_prefix": f"g{i}-",
        }
        for i, n in enumerate(split(clients, procs))
    ]
    with Case("hisock", pin, ("--announce", scope)) as case:
        time.sleep(0.2)
        gens = case.spawn("s3", params)
        meter = case.meter()
        meter.mark()
        server_cpu0 = proc_cpu_seconds(case.server.pid)
        t0 = time.monotonic()
        readies = [gen.expect("ready", ramp_timeout + 60.0) for gen in gens]
        ramp = time.monotonic() - t0
        ramp_cpu = meter.read()
        connected = sum(r["connected"] for r in readies)
        if connected < clients:
            raise LimitReached(f"only {connected:,} of {clients:,} clients joined within {ramp_timeout:.0f} s: {[r['errors'] for r in readies]}")
        settle = wait_quiet([case.server.pid] + [g.pid for g in gens], cfg["case_timeout"] / 4)
        server_cpu = proc_cpu_seconds(case.server.pid) - server_cpu0
        for gen in gens:
            gen.send("check")
        checks = [gen.expect("held", 30.0) for gen in gens]
        gen_cpu = sum(c["cpu_s"] for c in checks)  # from each ramp's start: no start-up
        if case.server.popen.poll() is not None:
            raise CaseFailed(f"the hisock server died: {case.server.stderr_tail()}")
    return {
        "scope": scope, "clients": clients, "group_size": JOIN_STORM_GROUP_SIZE, "connected": connected,
        "held": sum(c["alive"] for c in checks), "ramp_s": ramp, "settle_s": settle, "storm_s": ramp + settle,
        "server_cpu_s": server_cpu, "gen_cpu_s": gen_cpu,
        "gen_cpu_share": gen_cpu / max(1e-9, gen_cpu + server_cpu),
        "ramp_cpu": ramp_cpu, "gen_cpu": ramp_cpu["gen"], "server_cpu": ramp_cpu["server"], "other_cpu": ramp_cpu["other"],
        "announce_mb": sum(c["bytes"] for c in checks) / 1e6, "gen_procs": procs,
    }


def run_join_storms(mode: str, pin: bool) -> Tuple[Dict[str, Any], List[str]]:
    cfg = MODES[mode]
    failures: List[str] = []
    clients = cfg["s3_clients"]
    log(f"join storm: {clients:,} clients in groups of {JOIN_STORM_GROUP_SIZE}, announce = {', '.join(JOIN_STORM_SCOPES)}")
    row: Dict[str, Any] = {"clients": clients, "group_size": JOIN_STORM_GROUP_SIZE}
    for scope in JOIN_STORM_SCOPES:
        row[scope] = attempt(f"join storm N={clients} announce={scope}", lambda scope=scope: run_join_storm(scope, clients, cfg, pin), failures)
    return {"join_storm": [row]}, failures


#: The join storm table's rows: label, figure (or cell function), which way is better.
JOIN_STORM_METRICS: List[Metric] = [
    Metric("join storm (ramp) s", _num("ramp_s", 1), "ramp_s", LOWER),
    Metric("until quiet (ramp + settle) s", _num("storm_s", 1), "storm_s", LOWER),
    Metric("server CPU s (ramp + settle)", _num("server_cpu_s", 2), "server_cpu_s", LOWER),
    Metric("gen CPU s (ramp + settle)", _num("gen_cpu_s", 2), "gen_cpu_s", LOWER),
    Metric("gen share of the CPU used, %", lambda r: fmt_num(None if get(r, "gen_cpu_share") is None else r["gen_cpu_share"] * 100), None),
    Metric("CPU % gen / server / other (ramp)", _cpu),
    Metric("announcements received, MB", _num("announce_mb", 1), "announce_mb", LOWER),
    Metric("held", _num("held"), "held", HIGHER),
]


def join_storm_rows(results: Dict[str, Any]) -> List[Tuple[str, ...]]:
    """Rows of (case, metric, all, group, none, group/all, none/all)."""
    rows: List[Tuple[str, ...]] = []
    for row in results.get("join_storm", []):
        base = row.get("all")
        for i, m in enumerate(JOIN_STORM_METRICS):
            cells = [m.cell(row.get(scope)) for scope in JOIN_STORM_SCOPES]
            ratios = [versus(get(row.get(scope), m.key), get(base, m.key), m.better) if m.key else "" for scope in JOIN_STORM_SCOPES[1:]]
            case = f"N={row['clients']:,}, groups of {row['group_size']}" if i == 0 else ""
            rows.append((case, m.label, *cells, *ratios))
    return rows


def main_join_storm(args: argparse.Namespace, mode: str, pin: bool) -> int:
    """``--join-storm``: the same joins under each announcement scope; table and JSON."""
    started = time.time()
    load_before = os.getloadavg()
    results, failures = run_join_storms(mode, pin)
    wall = time.time() - started
    row = results["join_storm"][0]
    for key in ("ramp_s", "storm_s", "server_cpu_s", "announce_mb"):
        row.setdefault("ratios", {})[key] = {scope: _quotient(get(row.get(scope), key), get(row.get("all"), key)) for scope in JOIN_STORM_SCOPES[1:]}
    document: Dict[str, Any] = {
        "limits": limits(results, JOIN_STORM_SCOPES),
        "meta": {
            "mode": mode, "scopes": list(JOIN_STORM_SCOPES), "group_size": JOIN_STORM_GROUP_SIZE,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "wall_s": round(wall, 1),
            "python": platform.python_version(), "platform": platform.platform(), "cpus": NCPU, "pinned": pin and NCPU >= 2,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "failures": failures,
            "settings": {k: v for k, v in MODES[mode].items() if k.startswith(("s3_", "case_"))},
        },
        "results": results,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    path = args.json or os.path.join(RESULTS_DIR, f"bench-{mode}-joinstorm-{stamp}.json")
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    header = ("case", "metric", *(f"announce={scope}" for scope in JOIN_STORM_SCOPES), *(f"ratio {scope}/all" for scope in JOIN_STORM_SCOPES[1:]))
    print()
    print(f"Join storm: {row['clients']:,} clients (S3's ramp: {'2 generators' if row['clients'] > 200 else '1 generator'}, "
          f"200 handshakes in flight each), every client in a group of {JOIN_STORM_GROUP_SIZE}; only the server's announce differs.")
    print(render_rows(header, join_storm_rows(results), first_figure=2))
    print()
    if document["limits"]:
        print("Stopped by their time bound (shown as '-'):\n  " + "\n  ".join(document["limits"]))
    print("'join storm (ramp)': until every client has its own answer; 'until quiet': until the announcements still on their way "
          "have been written and read too. 'gen share': the load generators' part of the CPU the server and generators used.")
    print(f"Load average before/after: {load_before[0]:.2f} / {document['meta']['loadavg_after'][0]:.2f}. "
          f"{mode} run took {wall:.0f} s; results in {os.path.relpath(path, ROOT)}")
    if failures:
        print(f"{len(failures)} case(s) failed to run:\n  " + "\n  ".join(failures))
        return 1
    return 0


# ---------------------------------------------------------------------------- --websocket

WEBSOCKET_SCENARIOS = ("S1", "S2")


def run_websocket(mode: str, scenarios: Sequence[str], pin: bool) -> Tuple[Dict[str, Any], List[str]]:
    """S1 and S2 against the hisock server (serving both transports), loaded over TCP
    (loadgen.py) and over WebSocket (wsload.py), one case after the other."""
    cfg = MODES[mode]
    failures: List[str] = []
    out: Dict[str, Any] = {}
    if "S1" in scenarios:
        log("S1 ping-pong")
        out["S1"] = []
        for clients, window in cfg["s1_cases"]:
            row: Dict[str, Any] = {"clients": clients, "window": window}
            for transport in TRANSPORTS:
                row[transport] = attempt(
                    f"S1 C={clients} W={window} {transport}",
                    lambda transport=transport, clients=clients, window=window: run_s1("hisock", clients, window, cfg, pin, transport=transport),
                    failures,
                )
            out["S1"].append(row)
    if "S2" in scenarios:
        log("S2 fan-out")
        out["S2"] = []
        for clients in cfg["s2_clients"]:
            row = {"clients": clients}
            for transport in TRANSPORTS:
                row[transport] = attempt(
                    f"S2 N={clients} {transport}",
                    lambda transport=transport, clients=clients: run_s2("hisock", clients, cfg, pin, transport=transport),
                    failures,
                )
            out["S2"].append(row)
    for rows in out.values():
        for row in rows:
            row["ratio_websocket_to_tcp"] = {
                key: _quotient(get(row.get("websocket"), key), get(row.get("tcp"), key))
                for key in ("rt_per_s", "p99_ms", "server_cpu_us_per_rt", "median_ms", "deliveries_per_s", "server_cpu_ms_per_broadcast", "ramp_s")
                if get(row.get("tcp"), key) is not None
            }
    return out, failures


def websocket_table_rows(results: Dict[str, Any]) -> List[Tuple[str, str, str, str, str, str]]:
    rows: List[Tuple[str, str, str, str, str, str]] = []
    for row in results.get("S1", []):
        a, b = row.get("tcp"), row.get("websocket")
        case = f"C={row['clients']} W={row['window']}"
        rows.append(("S1 ping-pong", case, "round trips/s", fmt_num(get(a, "rt_per_s")), fmt_num(get(b, "rt_per_s")), versus(get(b, "rt_per_s"), get(a, "rt_per_s"), HIGHER)))
        rows.append(("", "", "p50 / p99 latency ms", _pair(a, "p50_ms", "p99_ms"), _pair(b, "p50_ms", "p99_ms"), versus(get(b, "p99_ms"), get(a, "p99_ms"), LOWER, note="p99")))
        rows.append(("", "", "server CPU us per round trip", fmt_num(get(a, "server_cpu_us_per_rt"), 1), fmt_num(get(b, "server_cpu_us_per_rt"), 1), versus(get(b, "server_cpu_us_per_rt"), get(a, "server_cpu_us_per_rt"), LOWER)))
        rows.append(("", "", "CPU % gen / server / other", _cpu(a), _cpu(b), ""))
    for row in results.get("S2", []):
        a, b = row.get("tcp"), row.get("websocket")
        case = f"N={row['clients']:,}"
        rows.append(("S2 fan-out", case, "all received, median ms", fmt_num(get(a, "median_ms"), 1), fmt_num(get(b, "median_ms"), 1), versus(get(b, "median_ms"), get(a, "median_ms"), LOWER)))
        rows.append(("", "", "deliveries/s", fmt_num(get(a, "deliveries_per_s")), fmt_num(get(b, "deliveries_per_s")), versus(get(b, "deliveries_per_s"), get(a, "deliveries_per_s"), HIGHER)))
        rows.append((
            "", "", "CPU ms/broadcast server / gen", _pair(a, "server_cpu_ms_per_broadcast", "gen_cpu_ms_per_broadcast", 1),
            _pair(b, "server_cpu_ms_per_broadcast", "gen_cpu_ms_per_broadcast", 1),
            versus(get(b, "server_cpu_ms_per_broadcast"), get(a, "server_cpu_ms_per_broadcast"), LOWER, note="srv"),
        ))
        rows.append(("", "", "join storm (ramp) s", fmt_num(get(a, "ramp_s"), 1), fmt_num(get(b, "ramp_s"), 1), versus(get(b, "ramp_s"), get(a, "ramp_s"), LOWER)))
    return rows


def main_websocket(args: argparse.Namespace, mode: str) -> int:
    """``--websocket``: S1 and S2 over TCP and over WebSocket against one server build; table and JSON."""
    import importlib.util

    if importlib.util.find_spec("wsproto") is None:
        print("--websocket needs wsproto (pip install -e '.[websocket]')", file=sys.stderr)
        return 2
    asked = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    scenarios = [s for s in asked if s in WEBSOCKET_SCENARIOS]
    if not scenarios:
        print(f"--websocket runs {' and '.join(WEBSOCKET_SCENARIOS)} only; --scenarios asked for {', '.join(asked)}", file=sys.stderr)
        return 2
    pin = not args.no_pin
    started = time.time()
    load_before = os.getloadavg()
    log(f"bench.py --{mode} --websocket: hisock over TCP vs over WebSocket; scenarios {', '.join(scenarios)}"
        f"{' (the others are ignored)' if len(scenarios) < len(asked) else ''}; {NCPU} CPUs; pinning {'on' if pin and NCPU >= 2 else 'off'}")
    results, failures = run_websocket(mode, scenarios, pin)
    wall = time.time() - started
    settings = {k: v for k, v in MODES[mode].items() if k.startswith(("s1_", "s2_", "case_"))}
    document: Dict[str, Any] = {
        "limits": limits(results, TRANSPORTS),
        "meta": {
            "mode": mode, "transports": list(TRANSPORTS), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_s": round(wall, 1), "python": platform.python_version(), "platform": platform.platform(), "cpus": NCPU,
            "pinned": pin and NCPU >= 2, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "settings": settings,
            "failures": failures, "ratio_better": RATIO_BETTER,
        },
        "results": results,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    path = args.json or os.path.join(RESULTS_DIR, f"bench-{mode}-websocket-{stamp}.json")
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    print()
    print(render_rows(("scenario", "case", "metric", "hisock over TCP", "hisock over WebSocket", "ratio ws/tcp"), websocket_table_rows(results)))
    print()
    if document["limits"]:
        print("Stopped by their time bound (shown as '-'):\n  " + "\n  ".join(document["limits"]))
        print()
    print("One server build (loadtest/hisock_server.py --websocket) for both columns; the TCP load is loadgen.py, the WebSocket load "
          "wsload.py (masked frames made by wsproto, server frames read by hand). CPU % is of one core.")
    print(f"Load average before/after: {load_before[0]:.2f} / {document['meta']['loadavg_after'][0]:.2f}. "
          f"{mode} run took {wall:.0f} s; results in {os.path.relpath(path, ROOT)}")
    if failures:
        print(f"{len(failures)} case(s) failed to run:\n  " + "\n  ".join(failures))
        return 1
    return 0


# ---------------------------------------------------------------------------- profiling


def run_profile(cfg: Dict[str, Any], pin: bool, clients: int, window: int, top: int, out_path: str) -> None:
    """S1 against the hisock server under cProfile; print the top functions by tottime."""
    import pstats

    log(f"profiling hisock_gevent: S1 C={clients} W={window}, {cfg['s1_duration']} s, stats -> {out_path}")
    if os.path.exists(out_path):
        os.remove(out_path)
    figures = run_s1("hisock", clients, window, cfg, pin, server_args=("--profile", out_path))
    for _ in range(100):  # the server writes its stats while closing
        if os.path.exists(out_path) and os.path.getsize(out_path) > 0:
            break
        time.sleep(0.1)
    print(f"S1 C={clients} W={window} under cProfile: {figures['rt_per_s']:,.0f} round trips/s (profiling slows it down)")
    stats = pstats.Stats(out_path)
    stats.sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------------------- compare


def compare(old_path: str, new_path: str) -> None:
    """Print the table rows of two result files side by side: the hisock figure, and its
    ratio to each baseline (a file from before the uvloop baseline has "-" there)."""
    with open(old_path) as f:
        old = json.load(f)
    with open(new_path) as f:
        new = json.load(f)
    before = {r[:3]: r for r in _keyed(table_rows(old["results"]))}
    print(
        f"{'scenario / case':<34} {'metric':<32} {'old hisock':>16} {'new hisock':>16} "
        f"{'old h/gevent':>12} {'new h/gevent':>12} {'old h/uvloop':>12} {'new h/uvloop':>12}  better"
    )
    for row in _keyed(table_rows(new["results"])):
        prev = before.get(row[:3], ("", "", "", "-", "-", "-", "-", "-"))
        label = f"{row[0]} {row[1]}"
        (old_g, _), (old_u, _) = _split_ratio(prev[6]), _split_ratio(prev[7])
        (new_g, better), (new_u, _) = _split_ratio(row[6]), _split_ratio(row[7])
        print(
            f"{label[:34]:<34} {row[2][:32]:<32} {prev[3]:>16} {row[3]:>16} "
            f"{old_g:>12} {new_g:>12} {old_u:>12} {new_u:>12}  {better}"
        )


def _split_ratio(cell: str) -> Tuple[str, str]:
    """A ratio cell of :func:`versus` as (the ratio, which way is better)."""
    value, _, rest = cell.strip().partition(" (")
    return value, rest.rstrip(")").rpartition("; ")[2].replace(" is better", "")


def _keyed(rows: List[Tuple[str, ...]]) -> List[Tuple[str, ...]]:
    """Fill the blank scenario/case cells of continuation rows so each row stands alone."""
    keyed, scenario, case = [], "", ""
    for r in rows:
        scenario = r[0] or scenario
        case = r[1] or case
        keyed.append((scenario, case) + tuple(r[2:]))
    return keyed


# ---------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="hisock_gevent vs hand-written gevent and uvloop servers (see loadtest/README.md)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="every scenario with short windows (a few minutes)")
    size.add_argument("--smoke", action="store_true", help="a tiny version of every scenario (seconds; for CI)")
    parser.add_argument("--scenarios", default="S1,S2,S3,S4,S5", help="comma-separated subset, e.g. S1,S4 (S6 runs only when named)")
    parser.add_argument(
        "--s100k", action="store_true",
        help="run S6 only: hold 100,000 clients (or as many as RLIMIT_NOFILE allows) on one server process",
    )
    parser.add_argument("--s6-clients", type=int, metavar="N", help="clients S6 asks for (default: 300 with --smoke, else 100,000)")
    parser.add_argument(
        "--s6-per-source", type=int, metavar="N",
        help=f"S6 clients per source address 127.0.0.2, .3, ... (default {S6_PER_SOURCE:,}; at most 90 %% of the ephemeral ports)",
    )
    parser.add_argument(
        "--s6-per-gen", type=int, metavar="N",
        help=f"S6 clients per generator process (default {S6_MAX_PER_GEN:,}; at most the hard RLIMIT_NOFILE less 64)",
    )
    parser.add_argument(
        "--servers", default="hisock,baseline,uvloop",
        help="comma-separated subset of hisock,baseline,uvloop (baseline = the gevent baseline; uvloop = the asyncio one)",
    )
    parser.add_argument("--json", metavar="PATH", help="where to write the results (default loadtest/results/bench-<mode>-<time>.json)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and the generators to the others")
    parser.add_argument("--profile", action="store_true", help="run S1 (C=50, W=4) against hisock_gevent under cProfile and print the top functions")
    parser.add_argument("--profile-clients", type=int, default=50, metavar="C", help="clients for --profile (default 50)")
    parser.add_argument("--profile-window", type=int, default=4, metavar="W", help="requests in flight per client for --profile (default 4)")
    parser.add_argument("--profile-out", default=os.path.join(RESULTS_DIR, "hisock-s1.prof"), metavar="PATH")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="print two result files side by side and exit")
    parser.add_argument(
        "--websocket", action="store_true",
        help="compare S1 and S2 over TCP with the same over WebSocket, against one hisock server serving both "
        "(ignores --servers and the scenarios other than S1, S2)",
    )
    parser.add_argument(
        "--workers", type=int, metavar="N",
        help="compare S1 and S2 on one hisock process with N worker processes on one port joined by Redis "
        "(starts its own redis-server; not pinned; ignores --servers and the scenarios other than S1, S2)",
    )
    parser.add_argument(
        "--join-storm", action="store_true",
        help="open S3's clients (10,000; 100 with --smoke) against hisock once per announcement scope "
        "(announce = all, group, none; groups of 50) and compare the join storms (ignores --servers and --scenarios)",
    )
    args = parser.parse_args(argv)

    if args.compare:
        compare(*args.compare)
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = MODES[mode]
    pin = not args.no_pin
    wire.raise_nofile()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    if args.profile:
        run_profile(cfg, pin, args.profile_clients, args.profile_window, 25, args.profile_out)
        return 0
    if args.websocket:
        return main_websocket(args, mode)
    if args.workers is not None:
        if args.workers < 2:
            parser.error("--workers needs N >= 2")
        return main_workers(args, mode)
    if args.join_storm:
        return main_join_storm(args, mode, pin)

    kinds = [k for k in args.servers.split(",") if k]
    scenarios = ["S6"] if args.s100k else [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    unknown = [k for k in kinds if k not in SERVERS] + [s for s in scenarios if s not in TARGETS]
    if unknown:
        parser.error(f"unknown server or scenario: {', '.join(unknown)}")

    started = time.time()
    load_before = os.getloadavg()
    log(f"bench.py --{mode}: servers {', '.join(kinds)}; scenarios {', '.join(scenarios)}; {NCPU} CPUs; pinning {'on' if pin and NCPU >= 2 else 'off'}")
    s6 = {"clients": args.s6_clients, "per_source": args.s6_per_source, "per_gen": args.s6_per_gen}
    results, failures = run_all(mode, kinds, scenarios, pin, s6)
    add_ratios(results)
    wall = time.time() - started
    document = {
        "targets": target_lines(results),
        "targets_out_of_reach": targets_out_of_reach(results),
        "limits": limits(results),
        "meta": {
            "mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "wall_s": round(wall, 1),
            "python": platform.python_version(), "platform": platform.platform(), "cpus": NCPU, "pinned": pin and NCPU >= 2,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "targets": TARGETS,
            "settings": {k: v for k, v in cfg.items()}, "failures": failures,
            "baseline_loop": baseline_loop(results), "ratio_better": RATIO_BETTER,
        },
        "results": results,
    }
    path = args.json or os.path.join(RESULTS_DIR, f"bench-{mode}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json")
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    print()
    print(render_table(results))
    print()
    loop = document["meta"]["baseline_loop"]
    if loop is not None and loop.startswith("uvloop"):
        print(f"uvloop baseline: an asyncio Protocol on {loop} (loadtest/baselines/uvloop_server.py).")
    elif loop is not None:
        print(f"asyncio baseline: uvloop_server.py ran on the {loop}; install uvloop (pip install -e '.[load]') for the uvloop figures.")
    bounded = limits(results)
    if bounded:
        print("Stopped by their time bound (shown as '-'):\n  " + "\n  ".join(bounded))
        print()
    if document["targets"]:
        print("Targets (informative; they fail nothing):")
        for line in document["targets"]:
            print("  " + line)
    if document["targets_out_of_reach"]:
        print(f"Not judged (this {mode} run's cases are smaller than theirs): " + "; ".join(document["targets_out_of_reach"]))
    print(f"CPU % is of one core; 'other' is CPU used by processes outside the benchmark (noise). Load average before/after: "
          f"{load_before[0]:.2f} / {document['meta']['loadavg_after'][0]:.2f}.")
    print(f"{mode} run took {wall:.0f} s; results in {os.path.relpath(path, ROOT)}")
    if failures:
        print(f"{len(failures)} case(s) failed to run:\n  " + "\n  ".join(failures))
        return 1
    return 0


def main_workers(args: argparse.Namespace, mode: str) -> int:
    """``--workers N``: S1 and S2, one process vs N workers joined by Redis; table and JSON."""
    import importlib.util

    missing = ([] if os.path.exists(REDIS_SERVER) else [REDIS_SERVER]) + ([] if importlib.util.find_spec("redis") else ["redis-py"])
    if missing:
        print(f"--workers needs {' and '.join(missing)} (Debian's redis-server; pip install redis)", file=sys.stderr)
        return 2
    workers = args.workers
    asked = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    scenarios = [s for s in asked if s in WORKERS_SCENARIOS]
    if not scenarios:
        print(f"--workers runs {' and '.join(WORKERS_SCENARIOS)} only; --scenarios asked for {', '.join(asked)}", file=sys.stderr)
        return 2
    started = time.time()
    load_before = os.getloadavg()
    log(f"bench.py --{mode} --workers {workers}: hisock (1 process) vs {cluster_kind(workers)} (Redis backplane); scenarios "
        f"{', '.join(scenarios)}{' (the others are ignored)' if len(scenarios) < len(asked) else ''}; {NCPU} CPUs; pinning off")
    results, failures = run_workers(mode, workers, scenarios)
    wall = time.time() - started
    settings = {"s1_cases": WORKERS_S1_CASES[mode], **{k: v for k, v in MODES[mode].items() if k.startswith(("s1_", "s2_", "case_")) and k != "s1_cases"}}
    document: Dict[str, Any] = {
        "notes": workers_notes(results, workers),
        "limits": limits(results, ("hisock", cluster_kind(workers))),
        "meta": {
            "mode": mode, "workers": workers, "kinds": ["hisock", cluster_kind(workers)],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "wall_s": round(wall, 1),
            "python": platform.python_version(), "platform": platform.platform(), "cpus": NCPU, "pinned": False,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "settings": settings, "failures": failures,
        },
        "results": results,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    path = args.json or os.path.join(RESULTS_DIR, f"bench-{mode}-workers{workers}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    print_workers(document, workers)
    print(f"Load average before/after: {load_before[0]:.2f} / {document['meta']['loadavg_after'][0]:.2f}. "
          f"{mode} run took {wall:.0f} s; results in {os.path.relpath(path, ROOT)}")
    if failures:
        print(f"{len(failures)} case(s) failed to run:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
