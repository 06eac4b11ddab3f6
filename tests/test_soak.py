"""A bounded soak: a few hundred clients joining, talking, renaming, regrouping and leaving.

The server is a ThreadedHiSockServer in this (unpatched) process, so its ``clients``,
``clients_rev`` and groups can be inspected; the clients are HiSockClients in the
greenlets of ONE monkey-patched subprocess (tests/programs/soak_clients.py), each driven
by its own seeded random generator.  The server gives every connection an id
(``welcome``) and forwards each note as ``msg [sender id, n]`` to the client it names or
to everyone in the group it names, writing down, per receiving connection, what it sent.

At the end, per connection: everything the server sent to a client that stayed arrived
exactly once and in order (for one that left during the soak: a prefix of it); the
server handled every note each client sent, once and in order; ``join`` and ``leave`` ran
once per connection and ``name_change``/``group_change`` once per change; ``clients`` and
``clients_rev`` are exact inverses and agree with ``get_all_clients``, ``get_client``,
``get_group`` and with the clients that are still connected; and once everyone has left
and the server has closed, the process holds no more file descriptors or live greenlets
than before the server existed.

Wall time is about ``HISOCK_SOAK_SECONDS`` (default 20) plus ~10 s; the number of clients
is ``HISOCK_SOAK_CLIENTS`` (default 250) and the seed ``HISOCK_SOAK_SEED``.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set

import greenlet
import pytest
from conftest import wait_until

import hisock_gevent

# Slow by nature: a soak runs for many seconds on purpose.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SOAK_SECONDS = float(os.environ.get("HISOCK_SOAK_SECONDS", "20"))
SOAK_CLIENTS = int(os.environ.get("HISOCK_SOAK_CLIENTS", "250"))
SOAK_SEED = int(os.environ.get("HISOCK_SOAK_SEED", "20240601"))
RAMP_SECONDS = 2.0
PROGRAM = Path(__file__).parent / "programs" / "soak_clients.py"
GROUPS = [f"g{index}" for index in range(8)]
CONTROLLER = "__ctl__"
PHASE_WAIT = 60.0
FD_SLACK = 3
GREENLET_SLACK = 3


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_greenlets() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet) and not obj.dead)


def settle(measure: Any, limit: int, what: str, timeout: float = 10.0) -> None:
    wait_until(
        lambda: measure() <= limit, timeout, interval=0.05,
        message=lambda: f"{what}: {measure()} at the end, at most {limit} expected",
    )


class Ledger:
    """The server's side of the soak, written by its handlers (on the server's thread)."""

    def __init__(self, server: hisock_gevent.ThreadedHiSockServer):
        self.server = server
        self.lock = threading.Lock()
        self.current: Dict[str, str] = {}  # ipstr -> id of the connection now at that address
        self.serial = 0
        self.joins: Dict[str, int] = collections.Counter()
        self.leaves: Dict[str, int] = collections.Counter()
        self.name_changes: Dict[str, int] = collections.Counter()
        self.group_changes: Dict[str, int] = collections.Counter()
        self.notes: Dict[str, List[int]] = collections.defaultdict(list)  # sender id -> n, in order handled
        self.delivered: Dict[str, List[List[Any]]] = collections.defaultdict(list)  # receiver id -> [sender id, n]
        self.undeliverable = 0
        self.fins: Set[str] = set()
        self.odd: List[Any] = []
        self.allfin: List[str] = []
        self.allfin_event = threading.Event()
        self.reported = threading.Event()
        self._register()

    def _register(self) -> None:
        srv = self.server

        @srv.on("join")
        def join(client: hisock_gevent.ClientInfo) -> None:
            with self.lock:
                self.serial += 1
                conn_id = f"{client.ipstr}#{self.serial}"
                if client.ipstr in self.current:
                    self.odd.append(("join at a taken address", client))
                self.current[client.ipstr] = conn_id
                self.joins[conn_id] += 1
            srv.send_client(client, "welcome", conn_id)

        @srv.on("leave")
        def leave(client: hisock_gevent.ClientInfo) -> None:
            with self.lock:
                conn_id = self.current.pop(client.ipstr, None)
                if conn_id is None:
                    self.odd.append(("leave of an unknown client", client))
                else:
                    self.leaves[conn_id] += 1

        @srv.on("name_change")
        def name_change(client: hisock_gevent.ClientInfo, old: Any, new: Any) -> None:
            with self.lock:
                self.name_changes[self.current[client.ipstr]] += 1

        @srv.on("group_change")
        def group_change(client: hisock_gevent.ClientInfo, old: Any, new: Any) -> None:
            with self.lock:
                self.group_changes[self.current[client.ipstr]] += 1

        @srv.on("note")
        def note(client: hisock_gevent.ClientInfo, content: Any) -> None:
            sender = self.current[client.ipstr]
            n = content["n"]
            self.notes[sender].append(n)
            item = [sender, n]
            if "to" in content:
                try:
                    target = srv.get_client(content["to"])
                except hisock_gevent.ClientNotFound:
                    self.undeliverable += 1  # renamed or gone since the sender looked
                    return
                srv.send_client(target, "msg", item)
                self.delivered[self.current[target.ipstr]].append(item)
            else:
                try:
                    members = srv.get_group(content["group"])
                except hisock_gevent.GroupNotFound:
                    self.undeliverable += 1
                    return
                srv.send_group(content["group"], "msg", item)
                for member in members:
                    self.delivered[self.current[member.ipstr]].append(item)

        @srv.on("fin")
        def fin(client: hisock_gevent.ClientInfo, count: Any) -> None:
            with self.lock:
                self.fins.add(self.current[client.ipstr])

        @srv.on("allfin")
        def allfin(client: hisock_gevent.ClientInfo, live: Any) -> None:
            self.allfin = list(live)
            self.allfin_event.set()

        @srv.on("reported")
        def reported() -> None:
            self.reported.set()

        @srv.on("*")
        def anything(client: Any, command: Any, content: Any) -> None:
            self.odd.append((client, command, content))


class Problems(logging.Handler):
    """WARNING-or-worse lines of the hisock_gevent logger (none are expected in a soak)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def problems() -> Iterator[Problems]:
    handler = Problems()
    logger = logging.getLogger("hisock_gevent")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def soak_process(tmp_path: Path) -> Iterator[Any]:
    """Factory for the client subprocess; killed by pid at teardown if still running."""
    procs: List[subprocess.Popen] = []

    def start(port: int) -> Any:
        log = open(tmp_path / "soak_clients.log", "wb")
        proc = subprocess.Popen(
            [
                sys.executable, str(PROGRAM),
                "--port", str(port),
                "--clients", str(SOAK_CLIENTS),
                "--seconds", str(SOAK_SECONDS),
                "--seed", str(SOAK_SEED),
                "--ramp", str(RAMP_SECONDS),
                "--report", str(tmp_path / "report.json"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_event(
    event: threading.Event, proc: subprocess.Popen, timeout: float, what: str, log: Path, tick: Any = None
) -> None:
    """Wait for a server-side event, failing early if the client process died; ``tick()``
    runs about twice a second meanwhile."""
    deadline = time.monotonic() + timeout
    while not event.wait(0.5):
        if proc.poll() is not None:
            raise AssertionError(f"the client process exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s:\n{log.read_text()[-4000:]}")
        if tick is not None:
            tick()


def registry_invariants(server: hisock_gevent.ThreadedHiSockServer) -> List[str]:
    """What is wrong with the registry right now; run on the server's own thread, so the
    snapshot is atomic with respect to joins, leaves and changes (none of them yields)."""
    found: List[str] = []
    clients, rev = server.clients, server.clients_rev
    if len(clients) != len(rev):
        found.append(f"{len(clients)} clients but {len(rev)} clients_rev entries")
    for sock, info in clients.items():
        if rev.get(info) is not sock:
            found.append(f"clients_rev does not map {info} back to its socket")
    for info, sock in rev.items():
        if clients.get(sock) != info:
            found.append(f"clients does not map the socket of {info} back to it")
    infos = set(clients.values())
    if set(server.get_all_clients()) != infos:
        found.append("get_all_clients() disagrees with clients")
    for info in infos:
        if server.get_client(info.ipstr) != info or (info.name is not None and server.get_client(info.name) != info):
            found.append(f"get_client does not find {info}")
    for group in GROUPS:
        members = {info for info in infos if info.group == group}
        try:
            got = server.get_group(group)
        except hisock_gevent.GroupNotFound:
            got = []
        if len(got) != len(members) or set(got) != members:
            found.append(f"get_group({group!r}) gives {len(got)} clients, clients has {len(members)} in it")
    return found


def check_registry(server: hisock_gevent.ThreadedHiSockServer, expected: Dict[str, Any]) -> None:
    """clients / clients_rev / get_all_clients / get_client / get_group agree with each other
    and with ``expected`` (ipstr -> (name, group)) plus the controller."""
    clients = dict(server.clients)
    rev = dict(server.clients_rev)
    assert len(clients) == len(rev) == len(expected) + 1
    for sock, info in clients.items():
        assert rev.get(info) is sock, f"clients_rev does not map {info} back to its socket"
    for info, sock in rev.items():
        assert clients.get(sock) == info, f"clients does not map the socket of {info} back to it"
    infos = set(clients.values())
    assert set(server.get_all_clients()) == infos
    found = {info.ipstr: (info.name, info.group) for info in infos if info.name != CONTROLLER}
    assert found == expected
    for info in infos:
        assert server.get_client(info.name) == info
        assert server.get_client(info.ipstr) == info
    for group in GROUPS:
        members = {info for info in infos if info.group == group}
        if members:
            got = server.get_group(group)
            assert len(got) == len(members) and set(got) == members, f"get_group({group!r}) disagrees with clients"
        else:
            with pytest.raises(hisock_gevent.GroupNotFound):
                server.get_group(group)


def test_soak_clients_join_talk_rename_regroup_and_leave(make_server, soak_process, problems, tmp_path):
    gc.collect()
    fds_before = fd_count()
    greenlets_before = live_greenlets()
    started = time.monotonic()

    server = make_server()
    ledger = Ledger(server)
    server.start()
    proc = soak_process(server.get_addr()[1])
    log = tmp_path / "soak_clients.log"

    # -- the soak runs (the registry is checked on the server's thread as it churns);
    # then every live client has said fin and the controller allfin.
    churn_findings: List[str] = []
    churn_checks = []

    def check_while_churning() -> None:
        churn_checks.append(len(server.get_all_clients()))
        churn_findings.extend(server._home.call(registry_invariants, server))

    wait_event(ledger.allfin_event, proc, RAMP_SECONDS + SOAK_SECONDS + PHASE_WAIT, "allfin", log, check_while_churning)
    assert churn_findings == [], churn_findings[:10]
    assert len(churn_checks) >= SOAK_SECONDS and max(churn_checks) > SOAK_CLIENTS // 2
    live_ids = set(ledger.allfin)
    wait_until(lambda: live_ids <= ledger.fins, timeout=PHASE_WAIT)
    # Every note of every client has been handled: each client's stream is complete
    # once this broadcast reaches it.
    server.send_all_clients("finack")
    wait_event(ledger.reported, proc, PHASE_WAIT, "the report", log)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["errors"] == [], "\n".join(report["errors"])
    records = report["records"]
    by_id = {record["conn_id"]: record for record in records}
    assert len(by_id) == len(records), "two connections got the same id"
    assert set(report["live"]) == live_ids and len(live_ids) == SOAK_CLIENTS

    # -- while everyone still connected is connected: the registry is consistent.
    expected = {
        record["ipstr"]: (record["name"], record["group"]) for record in records if record["conn_id"] in live_ids
    }
    check_registry(server, expected)
    assert server._home.call(registry_invariants, server) == []

    # -- delivery: exactly once, in order; a client that left may miss only the tail.
    # Findings are collected so that one kind of discrepancy does not hide the others
    # (nor the registry, descriptor and greenlet checks further down).
    findings: List[str] = []

    def expect(condition: bool, finding: str) -> None:
        if not condition:
            findings.append(finding)

    total_delivered = 0
    for conn_id, record in by_id.items():
        expect(record["odd"] == [], f"{conn_id} got unexpected messages: {record['odd'][:5]}")
        got = record["received"]
        sent = ledger.delivered.get(conn_id, [])
        if conn_id in live_ids:
            expect(got == sent, f"{conn_id} (connected): received {len(got)} messages, the server sent it {len(sent)}, or not in order")
        else:
            expect(record["left"], f"{conn_id} is neither live nor left")
            expect(got == sent[: len(got)], f"{conn_id} (left): did not receive a prefix of what the server sent it")
        expect(len({tuple(item) for item in got}) == len(got), f"{conn_id} received a message twice")
        total_delivered += len(got)
        # The server handled every note, once and in order, and every change.
        handled = ledger.notes.get(conn_id, [])
        expect(
            handled == record["sent"],
            f"{conn_id} ({'left' if record['left'] else 'connected'}): the server handled notes "
            f"{handled[-3:]} (of {len(handled)}), the client sent {record['sent'][-3:]} (of {len(record['sent'])})",
        )
        expect(ledger.name_changes.get(conn_id, 0) == record["name_changes"], f"{conn_id}: name_change ran {ledger.name_changes.get(conn_id, 0)} times for {record['name_changes']} changes")
        expect(ledger.group_changes.get(conn_id, 0) == record["group_changes"], f"{conn_id}: group_change ran {ledger.group_changes.get(conn_id, 0)} times for {record['group_changes']} changes")
        expect(ledger.joins[conn_id] == 1, f"{conn_id}: join ran {ledger.joins[conn_id]} times")
    expect(ledger.odd == [], f"odd server-side events: {ledger.odd[:5]}")

    # It really was a soak: traffic, renames, regroups and churn all happened.
    left = [record for record in records if record["left"]]
    assert total_delivered > SOAK_CLIENTS * SOAK_SECONDS, total_delivered
    assert len(left) > SOAK_CLIENTS * SOAK_SECONDS / 100, len(left)
    assert sum(r["name_changes"] for r in records) > 0 and sum(r["group_changes"] for r in records) > 0

    # -- everybody leaves: leave ran once per connection, the registry is empty.
    server.send_client(CONTROLLER, "closeall")
    assert proc.wait(PHASE_WAIT) == 0, log.read_text()[-4000:]
    wait_until(lambda: server.get_all_clients() == [], timeout=PHASE_WAIT)
    assert dict(server.clients) == {} and dict(server.clients_rev) == {}
    for group in GROUPS:
        with pytest.raises(hisock_gevent.GroupNotFound):
            server.get_group(group)
    assert all(ledger.leaves[conn_id] == 1 for conn_id in by_id), "leave did not run exactly once per connection"
    assert set(ledger.leaves) == set(ledger.joins) and all(count == 1 for count in ledger.leaves.values())
    assert ledger.current == {}
    expect(problems.lines == [], f"{len(problems.lines)} WARNING lines for well-behaved clients, e.g. {problems.lines[:3]}")

    # -- and the server leaves nothing behind.
    server.close()
    settle(fd_count, fds_before + FD_SLACK, "open file descriptors")
    settle(live_greenlets, greenlets_before + GREENLET_SLACK, "live greenlets")
    assert time.monotonic() - started < RAMP_SECONDS + SOAK_SECONDS + 90
    summary = f"{len(records)} connections, {len(left)} left during the soak, {total_delivered} messages delivered"
    assert findings == [], f"{len(findings)} discrepancies ({summary}):\n" + "\n".join(findings[:30])
