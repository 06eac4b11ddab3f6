"""Faults of a Redis-joined cluster, with workers as real processes (tests/programs/cluster_worker.py).

A worker killed with SIGKILL: its clients' ``leave`` runs once, on a surviving worker, and
the other clients hear ``$CLTDISCONN$``.  Redis stopped for a few seconds: local delivery
goes on, sends to other workers fail with a logged error, and once Redis is back the
cluster finds itself again without anyone restarting anything.  And the backplane in a
monkey-patched program, where its Redis I/O runs in greenlets.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
from conftest import wait_until
from rawpeer import RawPeer
from redis_server import redis_server  # noqa: F401  (a fixture)
from tcp_proxy import PausableProxy

import hisock_gevent
from hisock_gevent.frames import DEFAULT_HEADER_LEN
from hisock_gevent.messages import (
    ChangeName,
    Command,
    PeerJoined,
    PeerLeft,
)
from hisock_gevent.outgoing import OutgoingCommand
from hisock_gevent.typecast import decode as decode_content

# Slow by nature: worker processes, Redis, and waits for heartbeats and TTLs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

WORKER = Path(__file__).parent / "programs" / "cluster_worker.py"
WAIT = 15.0


class Worker:
    """A cluster_worker.py process whose stdout lines are kept, and its stderr too."""

    def __init__(self, redis_url: str, namespace: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--redis", redis_url, "--namespace", namespace],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True).start()
        #: Its name in Redis.
        self.worker_id = self.expect(r"WORKER (\S+)").group(1)
        match = self.expect(r"serving on ([\d.]+):(\d+)")
        self.addr: Tuple[str, int] = (match.group(1), int(match.group(2)))

    def _pump(self, stream: Any, keep: List[str], to_queue: bool) -> None:
        for line in stream:
            keep.append(line.rstrip("\n"))
            if to_queue:
                self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r}; stdout {self.stdout!r}; stderr {self.stderr[-20:]!r}")

    def count(self, line: str) -> int:
        return self.stdout.count(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(WAIT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()


class Inbox:
    """A ThreadedHiSockClient that records what it receives."""

    def __init__(self, worker: Worker, name: str, group: Optional[str] = None):
        self.name = name
        self.events: List[Tuple[str, Any]] = []
        self.client = hisock_gevent.ThreadedHiSockClient(worker.addr, name=name, group=group)
        for command in ("msg", "shout", "error", "told", "who"):
            self.client.on(command)(lambda content, command=command: self.events.append((command, content)))
        self.client.on("client_disconnect")(lambda info: self.events.append(("left", info.name)))
        self.client.on("client_connect")(lambda info: self.events.append(("joined", info.name)))
        self.client.on("force_disconnect")(lambda: self.events.append(("kicked", name)))
        self.client.start()

    def wait_for(self, event: Tuple[str, Any], timeout: float = WAIT) -> None:
        wait_until(
            lambda: event in self.events, timeout, interval=0.01,
            message=lambda: f"{self.name} never got {event!r}; got {self.events!r}",
        )

    def send(self, command: str, content: Any = None) -> None:
        self.client.send(command, content)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


class SharedAddressPeer(Inbox):
    """A plain HiSock client on a socket bound by hand (SO_REUSEADDR and SO_REUSEPORT), so
    that two of them, connected to two different workers, share one source ``ip:port``: what
    the workers see of two hosts' clients behind a proxy that reuses source ports."""

    def __init__(self, worker: Worker, name: str, source: Tuple[str, int]):
        self.name = name
        self.events = []
        # The hello has no capabilities: the plain dialect.
        self.peer = RawPeer(worker.addr, name, source=source, timeout=WAIT)
        self.source: Tuple[str, int] = self.peer.addr
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send(self, command: str, content: Any = None) -> None:
        self.peer.send_raw(OutgoingCommand(command, content, DEFAULT_HEADER_LEN).frame_for(False))

    def rename(self, name: str) -> None:
        self.peer.send_frame(ChangeName(name).to_body())

    def _read(self) -> None:
        while True:
            try:
                message = self.peer.read_message(timeout=60)
            except socket.timeout:
                continue
            except (EOFError, OSError):
                return
            if isinstance(message, Command):
                self.events.append((message.command, decode_content(message.fmt, message.payload)))
            elif isinstance(message, (PeerJoined, PeerLeft)):
                self.events.append(("joined" if isinstance(message, PeerJoined) else "left", message.info.get("name")))

    def messages(self) -> List[Any]:
        return [content for kind, content in self.events if kind == "msg"]

    def close(self) -> None:
        self.peer.close()


@pytest.fixture
def cluster(redis_server, request):  # noqa: F811
    started: List[Worker] = []
    clients: List[Inbox] = []
    proxies: List[PausableProxy] = []
    namespace = re.sub(r"\W", "_", request.node.name)

    class Cluster:
        redis = redis_server

        def worker(self, url: Optional[str] = None) -> Worker:
            """A worker on the test's Redis (or at ``url``: a proxy in front of it)."""
            worker = Worker(url or redis_server.url, namespace)
            started.append(worker)
            return worker

        def proxy(self) -> PausableProxy:
            made = PausableProxy(redis_server.port)
            proxies.append(made)
            return made

        def client(self, worker: Worker, name: str, group: Optional[str] = None) -> Inbox:
            inbox = Inbox(worker, name, group)
            clients.append(inbox)
            worker.expect(f"JOIN {name}$")
            return inbox

        def shared_address_client(self, worker: Worker, name: str, source: Tuple[str, int]) -> SharedAddressPeer:
            peer = SharedAddressPeer(worker, name, source)
            clients.append(peer)
            worker.expect(f"JOIN {name}$")
            return peer

    yield Cluster()
    for inbox in clients:
        inbox.close()
    for worker in started:
        worker.stop()
    for proxy in proxies:
        proxy.close()


def relay_until_delivered(sender: Inbox, receiver: Inbox, text: str, timeout: float = WAIT) -> None:
    """Send ``relay`` to ``receiver`` until it arrives (the mirror fills asynchronously)."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while ("msg", text) not in receiver.events:
        assert time.monotonic() < deadline, f"{text!r} never reached {receiver.name}; sender got {sender.events!r}"
        attempt += 1
        sender.send("relay", {"to": receiver.name, "text": text})
        receiver_deadline = time.monotonic() + 0.5
        while ("msg", text) not in receiver.events and time.monotonic() < receiver_deadline:
            time.sleep(0.01)


def test_a_killed_workers_clients_leave_once_on_a_survivor(cluster):
    doomed, survivor_a, survivor_b = cluster.worker(), cluster.worker(), cluster.worker()
    victim = cluster.client(doomed, "victim")
    alice = cluster.client(survivor_a, "alice")
    bob = cluster.client(survivor_b, "bob")
    # The cluster is joined up: alice reaches the victim and bob across workers.
    relay_until_delivered(alice, victim, "ping victim")
    relay_until_delivered(alice, bob, "ping bob")

    doomed.kill()

    # Within the worker TTL (1 s here) plus a heartbeat, a survivor claims the victim.
    alice.wait_for(("left", "victim"))
    bob.wait_for(("left", "victim"))
    wait_until(
        lambda: survivor_a.count("LEAVE victim") + survivor_b.count("LEAVE victim") >= 1, WAIT, interval=0.01,
        message="no survivor ran leave for the victim",
    )
    # Once: a marker sent after the claim has gone all the way round before we count.
    relay_until_delivered(bob, alice, "after the claim")
    assert survivor_a.count("LEAVE victim") + survivor_b.count("LEAVE victim") == 1
    assert alice.events.count(("left", "victim")) == 1 and bob.events.count(("left", "victim")) == 1

    # The rest carry on: the victim is unknown now, alice and bob still reach each other.
    alice.client.send("relay", {"to": "victim", "text": "still there?"})
    alice.wait_for(("error", "ClientNotFound: no client named 'victim'"))
    relay_until_delivered(bob, alice, "we carry on")


def test_the_cluster_recovers_by_itself_after_redis_stops_for_a_while(cluster):
    first, second = cluster.worker(), cluster.worker()
    alice = cluster.client(first, "alice")
    carol = cluster.client(first, "carol")
    bob = cluster.client(second, "bob")
    relay_until_delivered(alice, bob, "before")

    cluster.redis.stop()
    # Local delivery goes on while Redis is away.
    alice.client.send("relay", {"to": "carol", "text": "local while down"})
    carol.wait_for(("msg", "local while down"))
    # A send to the other worker fails with a logged error (and is not delivered later).
    alice.client.send("relay", {"to": "bob", "text": "lost while down"})
    wait_until(
        lambda: any("unreachable" in line for line in first.stderr), WAIT, interval=0.02,
        message=lambda: f"no error logged; stderr {first.stderr[-10:]!r}",
    )
    time.sleep(2.0)  # the outage itself: "stop Redis for a few seconds"

    cluster.redis.start()  # empty: it kept nothing
    # Both workers reconnect, write their clients back and reload their mirrors.
    relay_until_delivered(alice, bob, "after", timeout=30)
    relay_until_delivered(bob, carol, "after, the other way", timeout=30)
    assert ("msg", "lost while down") not in bob.events
    # Nobody left: Redis going away is not a client going away.
    assert not [event for event in alice.events + bob.events + carol.events if event[0] == "left"]
    assert first.count("LEAVE alice") == 0 and second.count("LEAVE bob") == 0
    # The outage is told once, and its end too, not once per retry.
    outage = [line for line in first.stderr if "unreachable" in line]
    assert len(outage) == 1, outage
    assert any("Redis is back" in line for line in first.stderr)


def test_disconnect_client_reaches_a_client_of_another_worker(cluster):
    first, second = cluster.worker(), cluster.worker()
    alice = cluster.client(first, "alice")
    bob = cluster.client(second, "bob")
    relay_until_delivered(alice, bob, "hello bob")

    alice.client.send("kick", "bob")

    bob.wait_for(("kicked", "bob"))
    alice.wait_for(("left", "bob"))
    second.expect("LEAVE bob$")  # call_func=True runs leave, on bob's own worker
    assert first.count("LEAVE bob") == 0
    alice.client.send("kick", "bob")
    alice.wait_for(("error", "ClientNotFound: no client named 'bob'"))


def test_a_monkey_patched_program_runs_a_cluster_in_greenlets(redis_server):  # noqa: F811
    program = Path(__file__).parent / "programs" / "patched_cluster.py"
    result = subprocess.run([sys.executable, str(program), redis_server.url], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1:] == ["OK"], (result.stdout, result.stderr[-2000:])
    assert result.returncode == 0


def test_two_server_processes_on_different_ports_act_as_one_server(cluster):
    """Two processes on their own ports stand in for two hosts sharing one Redis."""
    host_a, host_b = cluster.worker(), cluster.worker()
    assert host_a.addr[1] != host_b.addr[1]
    alice = cluster.client(host_a, "alice", "red")
    bob = cluster.client(host_b, "bob", "red")
    carol = cluster.client(host_b, "carol", "blue")
    relay_until_delivered(alice, bob, "named send across")

    # Getters see everyone, from either side.
    everyone = ["alice@red", "bob@red", "carol@blue"]
    for asker in (alice, carol):
        deadline = time.monotonic() + WAIT
        while ("who", everyone) not in asker.events:
            assert time.monotonic() < deadline, f"{asker.name} never saw everyone: {asker.events!r}"
            asker.client.send("who")
            time.sleep(0.1)

    # A broadcast reaches every client once; a group send only the group, across hosts.
    carol.client.send("tell", {"group": "red", "text": "reds only"})
    alice.wait_for(("told", "reds only"))
    bob.wait_for(("told", "reds only"))
    carol.client.send("shout", "everyone")
    for inbox in (alice, bob, carol):
        inbox.wait_for(("shout", "everyone"))
    assert ("told", "reds only") not in carol.events
    assert [inbox.events.count(("shout", "everyone")) for inbox in (alice, bob, carol)] == [1, 1, 1]


def test_junk_in_redis_is_logged_and_ignored_and_the_cluster_carries_on(cluster, request):
    import redis

    first, second, doomed = cluster.worker(), cluster.worker(), cluster.worker()
    alice = cluster.client(first, "alice")
    bob = cluster.client(second, "bob")
    victim = cluster.client(doomed, "victim")
    relay_until_delivered(alice, bob, "before the junk")
    relay_until_delivered(alice, victim, "before the junk")

    namespace = re.sub(r"\W", "_", request.node.name)
    junk = redis.Redis.from_url(cluster.redis.url)
    try:
        for data in (b"\xc1not msgpack", b"\x93\x01\x02\x03", b"\x92\xa4join\xa1x", b"\x94\xa2to\xa1x\xa3a:b\xc0"):
            junk.publish(f"{namespace}:all", data)
        # Entries that are not ours in the doomed worker's own hash.
        junk.hset(f"{namespace}:clients:{doomed.worker_id}", "not-an-id", b"\xc1")
        junk.hset(f"{namespace}:clients:{doomed.worker_id}", f"{doomed.worker_id}#999", b"\x91\x01")
    finally:
        junk.close()

    # Both workers say so in their logs, and nobody falls over.
    for worker in (first, second):
        wait_until(
            lambda worker=worker: any("backplane: ignoring" in line for line in worker.stderr), WAIT, interval=0.02,
            message=lambda worker=worker: f"no warning logged; stderr {worker.stderr[-10:]!r}",
        )
        assert not any("Traceback" in line for line in worker.stderr), worker.stderr
    relay_until_delivered(bob, alice, "after the junk")
    alice.client.send("shout", "still one server")
    bob.wait_for(("shout", "still one server"))

    # Claiming a dead worker's clients reads the junk entries too, and skips them.
    doomed.kill()
    alice.wait_for(("left", "victim"))
    relay_until_delivered(bob, alice, "after the claim")
    assert first.count("LEAVE victim") + second.count("LEAVE victim") == 1
    assert first.proc.poll() is None and second.proc.poll() is None
    assert not any("Traceback" in line for line in first.stderr + second.stderr)


def test_two_clients_sharing_one_address_on_two_workers_each_get_exactly_their_own_messages(cluster):
    first, second, third = cluster.worker(), cluster.worker(), cluster.worker()
    carol = cluster.client(third, "carol")
    alice = cluster.shared_address_client(first, "alice", ("127.0.0.1", 0))
    bob = cluster.shared_address_client(second, "bob", alice.source)
    assert bob.source == alice.source
    # The third worker knows both, each as itself.
    relay_until_delivered(carol, alice, "hello alice")
    relay_until_delivered(carol, bob, "hello bob")

    alice.rename("alice2")
    first.expect("RENAME alice alice2$")
    alice.name = "alice2"
    relay_until_delivered(carol, alice, "hello alice2")

    # Private messages by name, from every worker: each reaches exactly its addressee.
    carol.send("relay", {"to": "alice2", "text": "carol to alice2"})
    carol.send("relay", {"to": "bob", "text": "carol to bob"})
    alice.send("relay", {"to": "bob", "text": "alice2 to bob"})
    bob.send("relay", {"to": "alice2", "text": "bob to alice2"})
    # An address both share means the one that joined first, as a shared name does.
    host, port = alice.source
    carol.send("relay", {"to": f"{host}:{port}", "text": "carol to the address"})
    carol.send("relay", {"to": "alice2", "text": "end"})
    carol.send("relay", {"to": "bob", "text": "end"})
    alice.wait_for(("msg", "end"))
    bob.wait_for(("msg", "end"))

    def private(peer: SharedAddressPeer) -> List[str]:
        return sorted(text for text in peer.messages() if not text.startswith("hello"))

    assert private(alice) == sorted(["carol to alice2", "bob to alice2", "carol to the address", "end"])
    assert private(bob) == sorted(["carol to bob", "alice2 to bob", "end"])
    assert {text for text in alice.messages() if text.startswith("hello")} == {"hello alice", "hello alice2"}
    assert {text for text in bob.messages() if text.startswith("hello")} == {"hello bob"}
    assert any(f"2 clients are at {host}:{port}; using the one that joined first" in line for line in third.stderr)


def numbers(inbox: Inbox) -> List[int]:
    """The numbered messages ``inbox`` received, in arrival order."""
    return [text for kind, text in inbox.events if kind == "msg" and isinstance(text, int)]


def assert_in_order_once(received: List[int], must_have: List[int], may_have: List[int]) -> None:
    """Each number at most once, in the order sent; everything in ``must_have``, nothing
    outside ``may_have``."""
    assert received == sorted(set(received)), f"duplicated or out of order: {received}"
    assert set(must_have) <= set(received), f"missing {sorted(set(must_have) - set(received))}"
    assert set(received) <= set(may_have), f"unexpected {sorted(set(received) - set(may_have))}"


def send_numbers(sender: Inbox, to: str, numbers_to_send: range) -> None:
    for number in numbers_to_send:
        sender.send("relay", {"to": to, "text": number})


def test_a_worker_paused_past_the_ttl_registers_its_clients_again_when_it_resumes(cluster):
    paused, survivor = cluster.worker(), cluster.worker()
    alice = cluster.client(paused, "alice")
    bob = cluster.client(survivor, "bob")
    relay_until_delivered(bob, alice, "warm up")
    relay_until_delivered(alice, bob, "warm up, back")
    send_numbers(bob, "alice", range(0, 10))
    alice.wait_for(("msg", 9))

    os.kill(paused.proc.pid, signal.SIGSTOP)
    try:
        # Past the TTL (1 s) the survivor reaps alice: its leave runs there, bob hears it.
        survivor.expect("LEAVE alice$")
        bob.wait_for(("left", "alice"))
        send_numbers(bob, "alice", range(10, 20))  # alice is unknown now: these fail
        bob.wait_for(("error", "ClientNotFound: no client named 'alice'"))
    finally:
        os.kill(paused.proc.pid, signal.SIGCONT)
    resumed = time.monotonic()

    # Within a heartbeat (0.2 s here) the resumed worker writes alice back; bob's worker
    # announces her again (bob hears client_connect), and she is reachable again.
    bob.wait_for(("joined", "alice"))
    assert time.monotonic() - resumed < 0.2 + 3.0  # one heartbeat, plus a loaded machine's slack
    send_numbers(bob, "alice", range(20, 30))
    alice.wait_for(("msg", 29))
    relay_until_delivered(alice, bob, "and back")

    assert_in_order_once(numbers(alice), must_have=[*range(0, 10), *range(20, 30)], may_have=list(range(30)))
    assert bob.events.count(("left", "alice")) == 1 and bob.events.count(("joined", "alice")) == 1
    # alice's own worker never lost her, nor bob: she heard only her welcome and bob's join.
    assert [event for event in alice.events if event[0] in ("left", "joined")] == [("joined", "alice"), ("joined", "bob")]
    assert paused.count("LEAVE alice") == 0 and survivor.count("LEAVE alice") == 1
    assert any("writing its 1 client(s) back" in line for line in paused.stderr), paused.stderr[-10:]


def membership(inbox: Inbox, since: int = 0) -> List[Tuple[str, Any]]:
    """The joins and leaves ``inbox`` heard, from its ``since``-th event on."""
    return [event for event in inbox.events[since:] if event[0] in ("joined", "left")]


def test_a_worker_cut_off_from_redis_past_the_ttl_is_reaped_comes_back_and_catches_up(cluster):
    proxy = cluster.proxy()
    cut, other = cluster.worker(url=proxy.url), cluster.worker()
    alice, carol = cluster.client(cut, "alice"), cluster.client(cut, "carol")
    bob, erin = cluster.client(other, "bob"), cluster.client(other, "erin")
    relay_until_delivered(bob, alice, "warm up")
    relay_until_delivered(alice, bob, "warm up, back")
    send_numbers(bob, "alice", range(0, 10))
    send_numbers(alice, "bob", range(100, 110))
    alice.wait_for(("msg", 9))
    bob.wait_for(("msg", 109))
    marks = {inbox.name: len(inbox.events) for inbox in (alice, carol, bob)}

    proxy.partition()
    try:
        # Past the TTL (1 s) the other side reaps the cut-off worker's clients.
        bob.wait_for(("left", "alice"))
        bob.wait_for(("left", "carol"))
        # The cut-off worker serves its own clients; its sends across are lost, and logged.
        alice.send("relay", {"to": "carol", "text": "local while cut off"})
        carol.wait_for(("msg", "local while cut off"))
        send_numbers(alice, "bob", range(110, 120))
        wait_until(lambda: any("unreachable" in line for line in cut.stderr), 15, interval=0.01, message="never an outage logged")
        # Meanwhile the other side changes.
        erin.close()
        dave = cluster.client(other, "dave")
    finally:
        proxy.heal()

    # The cut-off worker reaches Redis again, finds it was reaped and writes its clients
    # back: the other side hears them join again.  Its own clients hear what they missed.
    bob.wait_for(("joined", "alice"), timeout=30)
    bob.wait_for(("joined", "carol"))
    for inbox in (alice, carol):
        inbox.wait_for(("left", "erin"), timeout=30)
        inbox.wait_for(("joined", "dave"))
    send_numbers(bob, "alice", range(20, 30))
    send_numbers(alice, "bob", range(120, 130))
    alice.wait_for(("msg", 29))
    bob.wait_for(("msg", 129))
    relay_until_delivered(dave, alice, "hello from dave")

    assert_in_order_once(numbers(alice), must_have=[*range(0, 10), *range(20, 30)], may_have=list(range(30)))
    assert_in_order_once(numbers(bob), must_have=[*range(100, 110), *range(120, 130)], may_have=list(range(100, 130)))
    assert membership(bob, marks["bob"]) == [("left", "erin"), ("left", "alice"), ("left", "carol"), ("joined", "dave"), ("joined", "alice"), ("joined", "carol")] or sorted(
        membership(bob, marks["bob"])
    ) == sorted([("left", "erin"), ("left", "alice"), ("left", "carol"), ("joined", "dave"), ("joined", "alice"), ("joined", "carol")])
    for inbox in (alice, carol):
        assert sorted(membership(inbox, marks[inbox.name])) == [("joined", "dave"), ("left", "erin")], inbox.name
    assert other.count("LEAVE alice") == 1 and cut.count("LEAVE alice") == 0
    assert any("dead while it could not reach Redis; wrote its 2 client(s) back" in line for line in cut.stderr), "\n".join(cut.stderr)


def test_redis_restarting_during_a_broadcast_storm_loses_one_stretch_and_delivers_nothing_twice(cluster):
    first, second = cluster.worker(), cluster.worker()
    sender, alice = cluster.client(first, "sender"), cluster.client(first, "alice")
    bob, carol = cluster.client(second, "bob"), cluster.client(second, "carol")
    relay_until_delivered(alice, bob, "warm up")
    relay_until_delivered(bob, sender, "warm up, back")
    everyone = (sender, alice, bob, carol)
    marks = {inbox.name: len(inbox.events) for inbox in everyone}

    def shouts(inbox: Inbox) -> List[int]:
        return [text for kind, text in inbox.events if kind == "shout" and isinstance(text, int)]

    stop = threading.Event()
    sent: List[int] = []
    sent_at: List[float] = []

    def storm() -> None:
        for number in range(20_000):  # bounded: about 40 s at most
            if stop.is_set():
                return
            sender.send("shout", number)
            sent.append(number)
            sent_at.append(time.monotonic())
            time.sleep(0.002)

    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(shouts(bob)) >= 100, WAIT, interval=0.01, message="never bob in the storm")
        cluster.redis.stop()
        time.sleep(1.0)
        cluster.redis.start()  # empty
        restarted, restarted_at = len(sent), time.monotonic()
        # Across again: bob gets what was sent well after the restart.
        wait_until(
            lambda: any(number > restarted + 100 for number in shouts(bob)), 30, interval=0.01,
            message="never the storm across again",
        )
    finally:
        stop.set()
        thread.join(5)
    sender.send("shout", "end")
    for inbox in everyone:
        inbox.wait_for(("shout", "end"))

    for inbox in (sender, alice):  # on the sender's worker: everything, once, in order
        assert shouts(inbox) == sent, inbox.name
    for inbox in (bob, carol):
        got = shouts(inbox)
        assert got == sorted(set(got)), f"{inbox.name}: duplicated or out of order"
        missing = sorted(set(sent) - set(got))
        # What was lost is what was sent while Redis was away (and reconnecting): one stretch.
        assert missing and missing == list(range(missing[0], missing[-1] + 1)), (inbox.name, missing)
        # The backoff doubles from 0.1 s: after about 1 s away the next try comes within
        # 0.8 s of the restart; then a resubscribe, and a loaded machine's slack.
        assert sent_at[missing[-1]] - restarted_at <= 3.0, (inbox.name, sent_at[missing[-1]] - restarted_at)
    # Redis going away is not a client going away: nobody heard anyone join or leave.
    for inbox in everyone:
        assert membership(inbox, marks[inbox.name]) == [], inbox.name


def test_a_worker_paused_for_less_than_the_ttl_loses_nothing_and_nobody_hears_a_thing(cluster):
    paused, other = cluster.worker(), cluster.worker()
    alice = cluster.client(paused, "alice")
    bob = cluster.client(other, "bob")
    relay_until_delivered(bob, alice, "warm up")
    relay_until_delivered(alice, bob, "warm up, back")
    marks = {inbox.name: len(inbox.events) for inbox in (alice, bob)}

    os.kill(paused.proc.pid, signal.SIGSTOP)
    try:
        send_numbers(bob, "alice", range(0, 20))  # wait in Redis for the paused worker
        time.sleep(0.5)  # half the TTL (1 s)
    finally:
        os.kill(paused.proc.pid, signal.SIGCONT)
    send_numbers(bob, "alice", range(20, 40))
    alice.wait_for(("msg", 39))

    assert numbers(alice) == list(range(40))
    assert membership(alice, marks["alice"]) == [] and membership(bob, marks["bob"]) == []
    assert other.count("LEAVE alice") == 0
