"""Several workers joined by Redis behave as ONE HiSock server: one specification, every topology.

Each scenario runs, unchanged, against:

* ``single``: one server, no backplane (the reference behaviour);
* ``two_workers`` and ``three_workers``: ThreadedHiSockServers in this process, each on its
  own OS thread and hub, each given ``backplane=redis_url``;
* ``two_hosts``: two servers on different loopback addresses (127.0.0.1 and 127.0.0.2),
  each given its own :class:`RedisBackplane` (own worker id, a namespace of the test's
  own): the in-process stand-in for two machines (``test_cluster_faults.py`` runs real
  worker processes).

Clients are spread round robin over the workers, so neighbours in a test are held by
different workers whenever there are several.  A worker's mirror of the others' clients
is updated asynchronously: tests wait for it (:meth:`Cluster.wait_for_mirror`) before
they rely on it.  "Exactly once" is asserted only after a marker sent down the same path
has arrived, never after a sleep.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import pytest
from conftest import LOOPBACK, Recorder, wait_until
from redis_server import redis_server  # noqa: F401  (a fixture)

from hisock_gevent import (
    ClientInfo,
    ClientNotFound,
    GroupNotFound,
    ThreadedHiSockClient,
    ThreadedHiSockServer,
)
from hisock_gevent.backplane import RedisBackplane
from hisock_gevent.registry import Delivery

pytestmark = pytest.mark.timeout(60)

TOPOLOGIES = ("single", "two_workers", "three_workers", "two_hosts")
#: The loopback address that stands in for a second machine.
SECOND_HOST = "127.0.0.2"
#: Seconds any one expected effect may take to show (Redis round trips included).
WAIT = 10.0
#: How many numbered messages the ordering test relays each way.
ORDERED_COUNT = 200
CLUSTER_STATS_KEYS = {
    "worker", "redis", "down_s", "remote_clients", "published", "received", "dropped", "malformed", "received_by_kind",
}


# ---------------------------------------------------------------- the cluster under test


class Member:
    """A started ThreadedHiSockClient of the cluster, recording everything it receives."""

    def __init__(self, client: ThreadedHiSockClient, worker: int):
        self.client = client
        #: Index of the server (in ``Cluster.servers``) this client is connected to.
        self.worker = worker
        self.inbox = Recorder()  # (command, content) of every command message
        self.connects = Recorder()  # ClientInfo of every client_connect
        self.disconnects = Recorder()  # ClientInfo of every client_disconnect
        self.log = Recorder()  # all of the above in arrival order: (kind, what)

        @client.on("*")
        def on_any(command: str, content: Any) -> None:
            self.inbox(command, content)
            self.log(command, content)

        @client.on("client_connect")
        def on_connect(info: ClientInfo) -> None:
            self.connects(info)
            self.log("client_connect", info)

        @client.on("client_disconnect")
        def on_disconnect(info: ClientInfo) -> None:
            self.disconnects(info)
            self.log("client_disconnect", info)

        client.start()

    @property
    def info(self) -> ClientInfo:
        """What every server should say about this client."""
        return ClientInfo(self.client.get_client_addr(), self.client.name, self.client.group)

    def send(self, command: str, content: Any = None) -> None:
        self.client.send(command, content)

    def received(self, command: str) -> List[Any]:
        return [content for cmd, content in list(self.inbox.items) if cmd == command]

    def wait_for(self, command: str, content: Any) -> List[Any]:
        """Wait until ``content`` has arrived as ``command``; everything received as it so far."""
        wait_until(lambda: content in self.received(command), WAIT)
        return self.received(command)

    def heard_connect(self, info: ClientInfo) -> int:
        return list(self.connects.items).count(info)

    def heard_disconnect(self, info: ClientInfo) -> int:
        return list(self.disconnects.items).count(info)

    def sync(self, token: str) -> None:
        """Round trip to its own worker: everything it sent before is handled there."""
        self.send("echo", token)
        self.wait_for("echo", token)

    def heard_about(self, address: Tuple[str, int], since: int = 0) -> List[Tuple[str, ClientInfo]]:
        """Every client_connect / client_disconnect it heard about the client at ``address``
        (from its ``since``-th event on)."""
        return [item for item in list(self.log.items)[since:] if item[0].startswith("client_") and item[1].ip == address]


class Cluster:
    """The servers of one topology, their recorded reserved events, and the clients made.

    Every server has the same handlers: ``shout`` broadcasts, ``tell`` sends to a group,
    ``relay`` sends to one client by name or address, ``echo`` answers the sender; a
    ``tell``/``relay`` that finds nobody answers the sender ``failed`` with the exception's
    name.  ``shout_but`` broadcasts ``content["text"]`` as ``shout`` except to
    ``content["exclude"]``; ``say`` sends to the sender's group but the sender, as ``said``
    (the chat idiom).  ``join``, ``leave``, ``name_change`` and ``group_change`` are
    recorded with the index of the server that ran them.  ``options`` go to every server.
    """

    def __init__(self, topology: str, redis_url: Optional[str], **options: Any):
        self.topology = topology
        self.servers: List[ThreadedHiSockServer] = []
        self.members: List[Member] = []
        self.joins = Recorder()  # (worker, ClientInfo)
        self.leaves = Recorder()  # (worker, ClientInfo)
        self.name_changes = Recorder()  # (worker, ClientInfo, old, new)
        self.group_changes = Recorder()  # (worker, ClientInfo, old, new)
        self._next = 0
        try:
            for index, (host, backplane) in enumerate(self._layout(topology, redis_url)):
                server = ThreadedHiSockServer((host, 0), backplane=backplane, **options)
                self.servers.append(server)
                self._install_handlers(index, server)
                server.start()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _layout(topology: str, redis_url: Optional[str]) -> List[Tuple[str, Union[str, Delivery, None]]]:
        if topology == "single":
            return [(LOOPBACK, None)]
        assert redis_url is not None
        if topology == "two_workers":
            return [(LOOPBACK, redis_url)] * 2
        if topology == "three_workers":
            return [(LOOPBACK, redis_url)] * 3
        if topology == "four_workers":
            return [(LOOPBACK, redis_url)] * 4
        if topology == "two_hosts":
            namespace = f"cluster-test-{uuid.uuid4().hex[:8]}"
            return [
                (host, RedisBackplane(redis_url, namespace=namespace, worker_id=f"{label}:{os.getpid()}"))
                for host, label in ((LOOPBACK, "host-a"), (SECOND_HOST, "host-b"))
            ]
        raise ValueError(topology)

    def _install_handlers(self, index: int, server: ThreadedHiSockServer) -> None:
        @server.on("join")
        def on_join(client: ClientInfo) -> None:
            self.joins(index, client)

        @server.on("leave")
        def on_leave(client: ClientInfo) -> None:
            self.leaves(index, client)

        @server.on("name_change")
        def on_name_change(client: ClientInfo, old: Optional[str], new: Optional[str]) -> None:
            self.name_changes(index, client, old, new)

        @server.on("group_change")
        def on_group_change(client: ClientInfo, old: Optional[str], new: Optional[str]) -> None:
            self.group_changes(index, client, old, new)

        @server.on("shout")
        def shout(client: ClientInfo, content: Any) -> None:
            server.send_all_clients("shout", content)

        @server.on("tell")
        def tell(client: ClientInfo, content: Any) -> None:
            try:
                server.send_group(content["group"], "told", content["text"])
            except GroupNotFound:
                server.send_client(client, "failed", "GroupNotFound")

        @server.on("relay")
        def relay(client: ClientInfo, content: Any) -> None:
            try:
                server.send_client(content["to"], "relayed", content["body"])
            except ClientNotFound:
                server.send_client(client, "failed", "ClientNotFound")

        @server.on("echo")
        def echo(client: ClientInfo, content: Any) -> None:
            server.send_client(client, "echo", content)

        @server.on("shout_but")
        def shout_but(client: ClientInfo, content: Any) -> None:
            server.send_all_clients("shout", content["text"], exclude=content["exclude"])

        @server.on("say")
        def say(client: ClientInfo, content: Any) -> None:
            server.send_group(client, "said", content, exclude=client)

    @property
    def clustered(self) -> bool:
        return self.topology != "single"

    def connect(self, name: Optional[str], group: Optional[str] = None, **kwargs: Any) -> Member:
        """A started client connected to the next worker, round robin (``kwargs`` go to the client)."""
        worker = self._next % len(self.servers)
        self._next += 1
        return self.connect_to(worker, name, group, **kwargs)

    def connect_to(self, worker: int, name: Optional[str], group: Optional[str] = None, **kwargs: Any) -> Member:
        """A started client connected to ``servers[worker]``."""
        client = ThreadedHiSockClient(self.servers[worker].get_addr(), name, group, **kwargs)
        member = Member(client, worker)
        self.members.append(member)
        return member

    def wait_for_mirror(self, count: int) -> None:
        """Wait until every server's get_all_clients() has ``count`` clients."""
        wait_until(lambda: all(len(server.get_all_clients()) == count for server in self.servers), WAIT)

    def mark(self, worker: int, token: str) -> None:
        """``servers[worker]`` broadcasts ``mark``; wait until every member still connected
        has it: whatever that worker sent or published before has arrived everywhere."""
        self.servers[worker].send_all_clients("mark", token)
        for member in self.members:
            if not member.client.closed:
                member.wait_for("mark", token)

    def settle(self, token: str) -> None:
        """:meth:`mark` from every worker: whatever any of them sent before has arrived."""
        for worker in range(len(self.servers)):
            self.mark(worker, f"{token} {worker}")

    def close(self) -> None:
        for member in self.members:
            try:
                member.client.close()
            except Exception:
                pass
        for server in self.servers:
            server.close()


def _quietly(predicate: Any) -> Any:
    """``predicate()``, with a client not (yet) known counting as False."""
    try:
        return predicate()
    except ClientNotFound:
        return False


def _second_host_usable() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((SECOND_HOST, 0))
        return True
    except OSError:
        return False


@pytest.fixture(params=TOPOLOGIES)
def make_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(**server_options)``: a started Cluster of the parametrized topology;
    clients and servers close at teardown."""
    topology = request.param
    redis_url = None
    if topology != "single":
        redis_url = request.getfixturevalue("redis_server").url
    if topology == "two_hosts" and not _second_host_usable():
        pytest.skip(f"cannot bind {SECOND_HOST} on this machine")
    made: List[Cluster] = []

    def factory(**options: Any) -> Cluster:
        made.append(Cluster(topology, redis_url, **options))
        return made[-1]

    try:
        yield factory
    finally:
        for each in made:
            each.close()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """A started Cluster of the parametrized topology with the default options."""
    return make_cluster()


# ---------------------------------------------------------------- broadcast


def test_broadcast_from_a_handler_reaches_every_client_exactly_once(cluster: Cluster) -> None:
    members = [cluster.connect(f"c{i}", "red" if i % 2 else "blue") for i in range(5)]
    cluster.wait_for_mirror(5)
    senders = members[: len(cluster.servers)]  # one on every worker
    for sender in senders:
        sender.send("shout", f"hello from {sender.client.name}")
    for sender in senders:
        sender.send("shout", f"end from {sender.client.name}")

    for member in members:
        for sender in senders:
            member.wait_for("shout", f"end from {sender.client.name}")
    expected = sorted(f"{what} from {sender.client.name}" for sender in senders for what in ("hello", "end"))
    for member in members:
        assert sorted(member.received("shout")) == expected, member.info


# ---------------------------------------------------------------- groups


def test_group_send_reaches_exactly_the_group_members_across_workers(cluster: Cluster) -> None:
    groups = ["red", "red", "blue", "red", "blue", None]
    members = [cluster.connect(f"c{i}", group) for i, group in enumerate(groups)]
    cluster.wait_for_mirror(len(members))
    sender = members[-1]  # in no group

    sender.send("tell", {"group": "red", "text": "to red"})
    sender.send("tell", {"group": "blue", "text": "to blue"})
    sender.send("shout", "end")  # same sender, same path: arrives after the group sends
    for member in members:
        member.wait_for("shout", "end")

    for member, group in zip(members, groups):
        expected = [] if group is None else [f"to {group}"]
        assert member.received("told") == expected, member.info


def test_group_send_to_an_empty_group_raises_group_not_found_on_every_worker(cluster: Cluster) -> None:
    members = [cluster.connect(f"c{i}", "red") for i in range(len(cluster.servers) + 1)]
    cluster.wait_for_mirror(len(members))

    for server in cluster.servers:
        with pytest.raises(GroupNotFound):
            server.send_group("nobody-here", "told", "lost")
        with pytest.raises(GroupNotFound):
            server.get_group("nobody-here")
    for member in members[: len(cluster.servers)]:  # from a handler on every worker
        member.send("tell", {"group": "nobody-here", "text": "lost"})
        assert member.wait_for("failed", "GroupNotFound") == ["GroupNotFound"]
    for member in members:
        member.sync("end")
        assert member.received("told") == []


# ---------------------------------------------------------------- broadcasts that skip someone


def test_a_broadcast_with_exclude_skips_exactly_the_excluded_clients_across_workers(cluster: Cluster) -> None:
    members = [cluster.connect(f"c{i}", "red") for i in range(5)]
    cluster.wait_for_mirror(5)
    sender, c1, c2, c3, c4 = members
    cases = [
        ("one name", "c1", {"c1"}),
        ("one ClientInfo", c2.info, {"c2"}),
        ("one ip:port", c3.info.ipstr, {"c3"}),
        ("one (ip, port)", c4.info.ip, {"c4"}),
        ("a list", [c1.info, "c3", c4.info.ip], {"c1", "c3", "c4"}),
        ("a tuple of two names", ("c1", "c2"), {"c1", "c2"}),
        ("the sender, and two that are not connected", [sender.info, "nobody", "127.0.0.1:1"], {"c0"}),
    ]
    for text, exclude, _ in cases:  # from a handler on the sender's worker
        sender.send("shout_but", {"text": text, "exclude": exclude})
    sender.send("shout", "end")
    for member in members:
        member.wait_for("shout", "end")

    for member in members:
        expected = [text for text, _, skipped in cases if member.client.name not in skipped]
        assert member.received("shout") == expected + ["end"], member.info


def test_a_broadcast_from_any_worker_skips_a_client_held_by_another(cluster: Cluster) -> None:
    members = [cluster.connect(f"c{i}") for i in range(len(cluster.servers) + 2)]
    cluster.wait_for_mirror(len(members))
    last = len(cluster.servers) - 1
    skipped = ([member for member in members if member.worker != last] or members)[:2]  # held by other workers

    cluster.servers[last].send_all_clients("shout", "but two", exclude={skipped[0].info, skipped[1].client.name})
    cluster.mark(last, "sent")

    for member in members:
        assert member.received("shout") == ([] if member in skipped else ["but two"]), member.info


@pytest.mark.filterwarnings("ignore:.*clients are named:UserWarning")
def test_excluding_a_name_two_clients_share_skips_the_one_that_joined_first_on_every_worker(cluster: Cluster) -> None:
    first = cluster.connect("twin")
    cluster.wait_for_mirror(1)
    second = cluster.connect("twin")  # on another worker, when there is one
    other = cluster.connect("other")
    cluster.wait_for_mirror(3)

    for index, server in enumerate(cluster.servers):
        with pytest.warns(UserWarning, match="2 clients are named 'twin'"):
            server.send_all_clients("shout", f"via {index}", exclude="twin")
        cluster.mark(index, f"sent {index}")

    with pytest.warns(UserWarning, match="2 clients are named 'twin'") as record:  # from a handler
        other.send("shout_but", {"text": "from a handler", "exclude": "twin"})
        other.wait_for("shout", "from a handler")
    cluster.mark(other.worker, "handled")

    everything = [f"via {index}" for index in range(len(cluster.servers))]
    assert first.received("shout") == []
    assert second.received("shout") == everything + ["from a handler"]
    assert other.received("shout") == everything + ["from a handler"]
    assert record[0].filename == __file__  # the handler's line, on every topology


def test_a_group_send_with_exclude_skips_the_sender_and_the_excluded_across_workers(cluster: Cluster) -> None:
    groups = ["red", "red", "red", "blue", None]
    red0, red1, red2, blue, loner = members = [cluster.connect(f"c{i}", group) for i, group in enumerate(groups)]
    cluster.wait_for_mirror(len(members))

    red0.send("say", "hi from c0")  # send_group(client, ..., exclude=client)
    red0.send("shout", "end")
    for member in members:
        member.wait_for("shout", "end")
    assert [member.received("said") for member in members] == [[], ["hi from c0"], ["hi from c0"], [], []]

    last = len(cluster.servers) - 1
    server = cluster.servers[last]
    server.send_group("red", "told", "but c1 and c2", exclude=[red1.info, "c2"])
    server.send_group("red", "told", "to nobody", exclude=[red0.info, red1.info, red2.info])  # no error
    with pytest.raises(GroupNotFound):
        server.send_group("nobody-here", "told", "lost", exclude="c0")
    cluster.mark(last, "sent")
    assert [member.received("told") for member in members] == [["but c1 and c2"], [], [], [], []]
    assert blue.received("said") == loner.received("said") == []


# ---------------------------------------------------------------- one client


def test_send_client_by_name_and_address_reaches_a_client_on_another_worker(cluster: Cluster) -> None:
    alice = cluster.connect("alice", "red")
    bob = cluster.connect("bob", "red")
    cluster.wait_for_mirror(2)

    alice.send("relay", {"to": "bob", "body": "by name"})
    alice.send("relay", {"to": bob.info.ipstr, "body": "by address"})
    bob.send("relay", {"to": "alice", "body": "back by name"})
    bob.send("relay", {"to": alice.info.ipstr, "body": "back by address"})

    assert bob.wait_for("relayed", "by address") == ["by name", "by address"]
    assert alice.wait_for("relayed", "back by address") == ["back by name", "back by address"]


def test_send_client_to_an_unknown_client_raises_client_not_found_on_every_worker(cluster: Cluster) -> None:
    members = [cluster.connect(f"c{i}") for i in range(len(cluster.servers) + 1)]
    cluster.wait_for_mirror(len(members))
    unused = "127.0.0.1:1"

    for server in cluster.servers:
        for unknown in ("nobody", unused):
            with pytest.raises(ClientNotFound):
                server.send_client(unknown, "relayed", "lost")
            with pytest.raises(ClientNotFound):
                server.get_client(unknown)
    for member in members[: len(cluster.servers)]:  # from a handler on every worker
        member.send("relay", {"to": "nobody", "body": "lost"})
        member.send("relay", {"to": unused, "body": "lost"})
        member.send("echo", "end")
        assert member.wait_for("echo", "end") == ["end"]
        assert member.received("failed") == ["ClientNotFound", "ClientNotFound"]
    for member in members:
        assert member.received("relayed") == []


# ---------------------------------------------------------------- getters


def test_getters_agree_on_every_worker(cluster: Cluster) -> None:
    groups = ["red", "blue", "red", None, "blue"]
    members = [cluster.connect(f"c{i}", group) for i, group in enumerate(groups)]
    cluster.wait_for_mirror(len(members))
    everyone = {member.info for member in members}

    for server in cluster.servers:
        assert set(server.get_all_clients()) == everyone
        assert sorted(server.get_all_clients(key="name")) == sorted(member.client.name for member in members)
        for member in members:
            info = member.info
            for ref in (info.name, info.ipstr, info.ip, info):
                assert server.get_client(ref) == info, (server, ref)
        for group in ("red", "blue"):
            assert set(server.get_group(group)) == {m.info for m in members if m.client.group == group}
    # A client asks ($GETCLT$) its own worker about one held by another.
    first, last = members[0], members[len(cluster.servers) - 1]
    assert first.client.get_client(last.client.name) == last.info


# ---------------------------------------------------------------- changes


def test_change_name_and_group_run_their_handlers_once_and_propagate(cluster: Cluster) -> None:
    alice = cluster.connect("alice", "red")
    bob = cluster.connect("bob", "red")
    carol = cluster.connect("carol", "blue")
    cluster.wait_for_mirror(3)
    address = alice.info.ip

    alice.client.change_name("alicia")
    alice.client.change_group("blue")
    alice.sync("changed")  # her worker has handled both changes
    renamed = ClientInfo(address, "alicia", "blue")

    def everyone_sees_it() -> bool:
        for server in cluster.servers:
            if server.get_client("alicia") != renamed:
                return False
            if {info.name for info in server.get_all_clients()} != {"alicia", "bob", "carol"}:
                return False
        return True

    wait_until(lambda: _quietly(everyone_sees_it), WAIT)
    for server in cluster.servers:
        with pytest.raises(ClientNotFound):
            server.get_client("alice")
        assert server.get_client(f"{address[0]}:{address[1]}") == renamed
        assert set(server.get_group("red")) == {bob.info}
        assert set(server.get_group("blue")) == {carol.info, renamed}

    # Sends by the new name and to the new group work from another worker.
    bob.send("relay", {"to": "alicia", "body": "hi alicia"})
    bob.send("tell", {"group": "blue", "text": "to blue"})
    bob.send("tell", {"group": "red", "text": "to red"})
    bob.send("shout", "end")
    for member in (alice, bob, carol):
        member.wait_for("shout", "end")
    assert alice.received("relayed") == ["hi alicia"]
    assert alice.received("told") == ["to blue"]
    assert carol.received("told") == ["to blue"]
    assert bob.received("told") == ["to red"]

    owner = alice.worker
    assert cluster.name_changes.items == [(owner, ClientInfo(address, "alicia", "red"), "alice", "alicia")]
    assert cluster.group_changes.items == [(owner, renamed, "red", "blue")]


# ---------------------------------------------------------------- leaves and joins


def test_a_leaving_client_runs_leave_once_and_everyone_hears_and_forgets_it(cluster: Cluster) -> None:
    alice = cluster.connect("alice", "red")
    bob = cluster.connect("bob", "red")
    carol = cluster.connect("carol", "blue")
    cluster.wait_for_mirror(3)
    bob_info, carol_info = bob.info, carol.info

    bob.client.close()
    for member in (alice, carol):
        wait_until(lambda member=member: member.heard_disconnect(bob_info), WAIT)
    cluster.wait_for_mirror(2)
    for server in cluster.servers:
        assert bob_info not in server.get_all_clients()
        for ref in ("bob", bob_info.ipstr):
            with pytest.raises(ClientNotFound):
                server.get_client(ref)
        assert set(server.get_group("red")) == {alice.info}

    # A second leave down the same path is the marker: once it is heard, the first
    # cannot still be on its way.
    carol.client.close()
    wait_until(lambda: alice.heard_disconnect(carol_info), WAIT)
    cluster.wait_for_mirror(1)
    assert sorted(cluster.leaves.items, key=lambda item: item[1].name) == [
        (bob.worker, bob_info),
        (carol.worker, carol_info),
    ]
    assert alice.heard_disconnect(bob_info) == 1
    assert carol.heard_disconnect(bob_info) == 1
    assert alice.heard_disconnect(carol_info) == 1


def test_a_joining_client_is_announced_to_everyone_and_runs_join_once(cluster: Cluster) -> None:
    existing = [cluster.connect("alice", "red"), cluster.connect("bob", "blue")]
    cluster.wait_for_mirror(2)

    carol = cluster.connect("carol", "red")
    carol_info = carol.info
    for member in existing:
        wait_until(lambda member=member: member.heard_connect(carol_info), WAIT)
    cluster.wait_for_mirror(3)

    dave = cluster.connect("dave", None)  # the marker: announced down the same path
    dave_info = dave.info
    for member in existing + [carol]:
        wait_until(lambda member=member: member.heard_connect(dave_info), WAIT)
    cluster.wait_for_mirror(4)

    for member in existing:
        assert member.heard_connect(carol_info) == 1, member.info
    assert carol.heard_connect(carol_info) == 1  # its own welcome
    joined = [item for item in cluster.joins.items if item[1].name in ("carol", "dave")]
    assert joined == [(carol.worker, carol_info), (dave.worker, dave_info)]
    assert sorted(info.name for _, info in cluster.joins.items) == ["alice", "bob", "carol", "dave"]


# ---------------------------------------------------------------- announcement scope


def test_name_and_group_changes_are_announced_to_nobody_in_the_default_scope(cluster: Cluster) -> None:
    alice = cluster.connect("alice", "red")
    members = [alice, cluster.connect("bob", "red"), cluster.connect("carol", "blue")]
    cluster.wait_for_mirror(3)
    cluster.settle("joined")
    assert all(server.announce == "all" for server in cluster.servers)
    heard_before = [len(member.log.items) for member in members]

    alice.client.change_group("blue")
    alice.client.change_name("alicia")
    alice.sync("changed")
    cluster.mark(alice.worker, "changed")

    for member, before in zip(members, heard_before):
        assert [item for item in member.log.items[before:] if item[0].startswith("client_")] == [], member.info
    assert len(cluster.group_changes.items) == len(cluster.name_changes.items) == 1


def test_group_scope_tells_a_join_and_a_leave_only_to_the_members_of_its_group(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(announce="group")
    red0, red1 = cluster.connect("red0", "red"), cluster.connect("red1", "red")
    blue, loner = cluster.connect("blue", "blue"), cluster.connect("loner", None)
    cluster.wait_for_mirror(4)

    red2 = cluster.connect("red2", "red")
    red2.client.wait_joined(WAIT)
    cluster.wait_for_mirror(5)
    cluster.mark(red2.worker, "red2 joined")
    red2_info = red2.info
    assert [member.heard_connect(red2_info) for member in (red0, red1, blue, loner)] == [1, 1, 0, 0]
    assert red2.heard_about(red2_info.ip) == [("client_connect", red2_info)]  # its own answer only

    drifter = cluster.connect("drifter", None)  # in no group: announced to nobody
    drifter.client.wait_joined(WAIT)
    cluster.wait_for_mirror(6)
    cluster.mark(drifter.worker, "drifter joined")
    drifter_info = drifter.info
    for member in (red0, red1, red2, blue, loner):
        assert member.heard_about(drifter_info.ip) == [], member.info
    assert drifter.heard_about(drifter_info.ip) == [("client_connect", drifter_info)]

    red1_info = red1.info
    red1.client.close()
    wait_until(lambda: (red1.worker, red1_info) in cluster.leaves.items, WAIT)
    cluster.wait_for_mirror(5)
    cluster.mark(red1.worker, "red1 left")
    assert [member.heard_disconnect(red1_info) for member in (red0, red2, blue, loner, drifter)] == [1, 1, 0, 0, 0]
    assert sorted(info.name for _, info in cluster.joins.items) == ["blue", "drifter", "loner", "red0", "red1", "red2"]
    assert cluster.leaves.items == [(red1.worker, red1_info)]


def test_group_scope_tells_a_group_change_as_a_leave_to_the_old_group_and_a_join_to_the_new(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(announce="group")
    alice, bob = cluster.connect("alice", "red"), cluster.connect("bob", "red")
    carol, dave = cluster.connect("carol", "blue"), cluster.connect("dave", None)
    members = [alice, bob, carol, dave]
    cluster.wait_for_mirror(4)
    # A join another worker hears of after its own client joined is announced to it (the
    # mirror is a few milliseconds behind): count only what is heard from now on.
    cluster.settle("joined")
    since = {member.client.name: len(member.log.items) for member in members}
    a, d = alice.info.ip, dave.info.ip

    alice.client.change_group("blue")
    alice.sync("moved")
    cluster.mark(alice.worker, "alice moved")
    assert bob.heard_about(a, since["bob"]) == [("client_disconnect", ClientInfo(a, "alice", "red"))]
    assert carol.heard_about(a, since["carol"]) == [("client_connect", ClientInfo(a, "alice", "blue"))]
    assert dave.heard_about(a, since["dave"]) == []
    assert alice.heard_about(a, since["alice"]) == []  # the client that moved hears nothing of itself

    dave.client.change_group("red")  # into a group, then out of every group
    dave.sync("in")
    dave.client.change_group(None)
    dave.sync("out")
    cluster.mark(dave.worker, "dave moved")
    assert bob.heard_about(d, since["bob"]) == [("client_connect", ClientInfo(d, "dave", "red")), ("client_disconnect", ClientInfo(d, "dave", "red"))]
    assert alice.heard_about(d, since["alice"]) == carol.heard_about(d, since["carol"]) == []

    cluster.settle("moved")
    heard_before = [len(member.log.items) for member in members]
    bob.client.change_name("robert")  # a name change is announced to nobody, as on HiSock
    bob.client.change_group("red")  # the group it is in: no change to announce
    bob.sync("renamed")
    cluster.mark(bob.worker, "bob renamed")
    for member, before in zip(members, heard_before):
        assert [item for item in member.log.items[before:] if item[0].startswith("client_")] == [], member.info

    assert cluster.group_changes.items == [
        (alice.worker, ClientInfo(a, "alice", "blue"), "red", "blue"),
        (dave.worker, ClientInfo(d, "dave", "red"), None, "red"),
        (dave.worker, ClientInfo(d, "dave", None), "red", None),
        (bob.worker, ClientInfo(bob.info.ip, "robert", "red"), "red", "red"),
    ]
    assert len(cluster.name_changes.items) == 1


def test_none_scope_announces_nothing_but_each_clients_own_answer(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(announce="none")
    members = [cluster.connect("a", "red"), cluster.connect("b", "red"), cluster.connect("c", None)]
    cluster.wait_for_mirror(3)
    d = cluster.connect("d", "red")
    d.client.wait_joined(WAIT)
    members.append(d)
    a, b, c = members[:3]
    cluster.wait_for_mirror(4)

    b.client.change_group("blue")
    a.client.change_name("alpha")
    for member in (a, b):
        member.sync("changed")
    c_info = c.info
    c.client.close()
    wait_until(lambda: (c.worker, c_info) in cluster.leaves.items, WAIT)
    cluster.wait_for_mirror(3)
    for member in (a, b, c, d):
        cluster.mark(member.worker, f"after {member.client.name}")

    for member in (a, b, d):
        assert [item[0] for item in member.log.items if item[0].startswith("client_")] == ["client_connect"], member.info
        assert member.connects.items[0].ip == member.info.ip  # its own answer
    assert sorted(info.name for _, info in cluster.joins.items) == ["a", "b", "c", "d"]
    assert cluster.leaves.items == [(c.worker, c_info)]
    assert len(cluster.group_changes.items) == len(cluster.name_changes.items) == 1


# ---------------------------------------------------------------- ordering


@pytest.mark.slow
def test_messages_between_two_clients_keep_their_order_across_workers(cluster: Cluster) -> None:
    alice = cluster.connect("alice")
    bob = cluster.connect("bob")
    cluster.wait_for_mirror(2)

    for number in range(ORDERED_COUNT):
        alice.send("relay", {"to": "bob", "body": number})
        bob.send("relay", {"to": "alice", "body": -number})
    alice.send("relay", {"to": "bob", "body": "end"})
    bob.send("relay", {"to": "alice", "body": "end"})

    assert bob.wait_for("relayed", "end") == list(range(ORDERED_COUNT)) + ["end"]
    assert alice.wait_for("relayed", "end") == [-n for n in range(ORDERED_COUNT)] + ["end"]


def test_a_clients_announcements_keep_their_place_among_its_messages(cluster: Cluster) -> None:
    alice = cluster.connect("alice")
    cluster.wait_for_mirror(1)
    carol = cluster.connect("carol")  # on another worker, when there is one
    carol_info = carol.info

    # carol's worker knows alice already, so carol can talk at once: alice must hear that
    # carol joined before anything carol says, and that she left after her last word.
    carol.send("relay", {"to": "alice", "body": "first words"})
    carol.send("relay", {"to": "alice", "body": "last words"})
    carol.client.close()
    wait_until(lambda: alice.heard_disconnect(carol_info), WAIT)

    about_carol = [
        item for item in alice.log.items
        if item[0] == "relayed" or (item[0].startswith("client_") and item[1] == carol_info)
    ]
    assert about_carol == [
        ("client_connect", carol_info),
        ("relayed", "first words"),
        ("relayed", "last words"),
        ("client_disconnect", carol_info),
    ]


# ---------------------------------------------------------------- dialects and names


def test_plain_hisock_clients_get_their_own_dialect_from_other_workers(cluster: Cluster) -> None:
    alice = cluster.connect("alice", "red")
    plain = cluster.connect("plain", "red", use_msgpack=False)
    extended = cluster.connect("extended", "red")
    cluster.wait_for_mirror(3)
    for member in (alice, plain, extended):
        member.client.wait_joined()  # the dialect is settled by the server's answer to the hello
    assert not plain.client.msgpack_ok and extended.client.msgpack_ok
    content = {"text": "hi", "numbers": [1, 2, 3]}

    alice.send("shout", content)
    alice.send("tell", {"group": "red", "text": content})
    alice.send("relay", {"to": "plain", "body": content})
    alice.send("relay", {"to": "extended", "body": content})
    alice.send("shout", "end")
    for member in (plain, extended):
        member.wait_for("shout", "end")
        assert member.received("shout") == [content, "end"]
        assert member.received("told") == [content]
        assert member.received("relayed") == [content]


@pytest.mark.filterwarnings("ignore:.*clients are named:UserWarning")
def test_a_name_two_clients_share_means_the_one_that_joined_first_on_every_worker(cluster: Cluster) -> None:
    first = cluster.connect("twin", "red")
    cluster.wait_for_mirror(1)
    second = cluster.connect("twin", "blue")  # on another worker, when there is one
    cluster.wait_for_mirror(2)

    for server in cluster.servers:
        assert server.get_client("twin") == first.info, server
    for server in cluster.servers:
        server.send_client("twin", "relayed", f"via {server.get_addr()}")
    second.sync("end")
    for server in cluster.servers:
        first.wait_for("relayed", f"via {server.get_addr()}")
    assert second.received("relayed") == []


# ---------------------------------------------------------------- stats


def test_stats_report_the_cluster_for_backplane_servers(cluster: Cluster) -> None:
    members = [cluster.connect(f"c{i}") for i in range(len(cluster.servers) + 1)]
    cluster.wait_for_mirror(len(members))
    members[0].send("shout", "counted")
    for member in members:
        member.wait_for("shout", "counted")

    if not cluster.clustered:
        assert "cluster" not in cluster.servers[0].stats()
        return

    def cluster_stats() -> List[Any]:
        return [server.stats()["cluster"] for server in cluster.servers]

    wait_until(lambda: all(stats["redis"] == "up" and stats["published"] >= 1 for stats in cluster_stats()), WAIT)
    everything = cluster_stats()
    assert len({stats["worker"] for stats in everything}) == len(cluster.servers)
    for index, stats in enumerate(everything):
        assert set(stats) == CLUSTER_STATS_KEYS
        local = sum(1 for member in members if member.worker == index)
        assert stats["remote_clients"] == len(members) - local
        assert stats["received"] >= 1
        assert stats["dropped"] == 0
        assert stats["down_s"] == 0.0
    if cluster.topology == "two_hosts":
        assert [stats["worker"].split(":")[0] for stats in everything] == ["host-a", "host-b"]


# ---------------------------------------------------------------- what each worker does


GROUP_SENDS = 200


def test_a_group_send_is_published_only_to_the_workers_holding_members(redis_server) -> None:  # noqa: F811
    cluster = Cluster("four_workers", redis_server.url)
    try:
        members = [cluster.connect_to(0, f"red{i}", "red") for i in range(3)]
        others = [cluster.connect_to(worker, f"blue{worker}", "blue") for worker in (1, 2, 3)]
        cluster.wait_for_mirror(len(members) + len(others))
        sender = others[0]  # on worker 1
        before = [server.stats()["cluster"] for server in cluster.servers]

        for number in range(GROUP_SENDS):
            sender.send("tell", {"group": "red", "text": number})
        # The marker takes the same path after them and reaches every worker: once every
        # client has it, whatever Redis delivered for the group sends has arrived.
        sender.send("shout", "marker")
        for member in members + others:
            member.wait_for("shout", "marker")
        after = [server.stats()["cluster"] for server in cluster.servers]

        for member in members:
            assert member.received("told") == list(range(GROUP_SENDS))
        for member in others:
            assert member.received("told") == []
        received = [later["received"] - earlier["received"] for earlier, later in zip(before, after)]
        assert received == [GROUP_SENDS + 1, 1, 1, 1]  # the marker, heard on every worker's "all" channel
        applied = [later["received_by_kind"].get("group", 0) - earlier["received_by_kind"].get("group", 0) for earlier, later in zip(before, after)]
        assert applied == [GROUP_SENDS, 0, 0, 0]
        assert after[1]["published"] - before[1]["published"] == GROUP_SENDS + 1
    finally:
        cluster.close()
