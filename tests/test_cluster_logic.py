"""The cluster logic (hisock_gevent.cluster) on an in-memory bus: no sockets, no Redis, milliseconds.

Three or four :class:`~memory_bus.FakeServer` workers share one
:class:`~memory_bus.MemoryNetwork`; ``net.pump()`` delivers what was published so far,
so each test states exactly what has reached whom.
"""

from __future__ import annotations

from typing import Iterator, List

import msgpack
import pytest
from memory_bus import FakeServer, MemoryNetwork

from hisock_gevent import ClientInfo, ClientNotFound, GroupNotFound, InvalidTypeCast
from hisock_gevent.cluster_messages import (
    Bye,
    Changed,
    ClientEntry,
    Here,
    Joined,
    Kick,
    Left,
    MalformedClusterMessage,
    Mark,
    Reaped,
    ToAll,
    ToClient,
    ToGroup,
    decode,
)

ALICE_ENTRY = ClientEntry("w1#1", "w1", ("10.0.0.1", 5000), "alice", "red", True, 1700000000.5)


@pytest.fixture
def net() -> MemoryNetwork:
    return MemoryNetwork()


@pytest.fixture
def workers(net: MemoryNetwork) -> Iterator[List[FakeServer]]:
    servers = [FakeServer(net, f"w{i}") for i in range(3)]
    yield servers
    for server in servers:
        server.delivery.stop()


# ---------------------------------------------------------------- the wire


@pytest.mark.parametrize(
    "message",
    [
        Joined("w1", ALICE_ENTRY),
        Changed("w1", ALICE_ENTRY),
        Left("w1", ALICE_ENTRY),
        Here("w1", (ALICE_ENTRY, ALICE_ENTRY), complete=False),
        Here("w1", ()),
        Reaped("w2", "w1", (ALICE_ENTRY,)),
        ToAll("w1", b"plain", b""),
        ToAll("w1", b"plain", b"extended", ("w2#7", "w3#1")),
        ToGroup("w1", "red", b"", b"extended"),
        ToGroup("w1", "red", b"plain", b"", ("w2#7",)),
        ToClient("w1", "w2#7", b"frame"),
        Kick("w1", "w2#7", True, False),
        Bye("w1"),
        Mark("w1", "a-token"),
    ],
)
def test_every_cluster_message_round_trips_through_its_wire_form(message) -> None:
    data = message.to_wire()

    assert decode(data) == message
    assert type(message).from_wire(data) == message


def test_a_send_that_skips_nobody_is_the_same_bytes_as_before_exclusions_existed() -> None:
    # Workers without exclusions read these; and these read theirs.
    old_all = msgpack.packb(["all", "w1", b"plain", b"ext"], use_bin_type=True)
    old_group = msgpack.packb(["group", "w1", "red", b"plain", b"ext"], use_bin_type=True)

    assert ToAll("w1", b"plain", b"ext").to_wire() == old_all
    assert ToGroup("w1", "red", b"plain", b"ext").to_wire() == old_group
    assert decode(old_all) == ToAll("w1", b"plain", b"ext", ())
    assert decode(old_group) == ToGroup("w1", "red", b"plain", b"ext", ())


def test_a_client_entry_round_trips_and_gives_its_client_info() -> None:
    assert ClientEntry.from_wire(ALICE_ENTRY.to_wire()) == ALICE_ENTRY
    assert ALICE_ENTRY.info == ClientInfo(("10.0.0.1", 5000), "alice", "red")


@pytest.mark.parametrize(
    "junk",
    [
        b"\xc1not msgpack",
        b"\x93\x01\x02\x03",  # [1, 2, 3]
        b"\x92\xa4join\xa1x",  # ["join", "x"]: no entry
        b"\x94\xa2to\xa1x\xa3a:b\xc0",  # ["to", "x", "a:b", None]: the frame is not bytes
        b"\x92\xa5nosuch\xa1x",  # an unknown tag
        b"\x93\xa4kick\x01\x90",  # the origin is not a str
        ToClient("w1", "w2#7", b"frame").to_wire()[:-3],  # cut short
        msgpack.packb(["all", "w1", b"", b"", "w2#7"]),  # excluded clients not a list
        msgpack.packb(["group", "w1", "red", b"", b"", [7]]),  # an excluded id not a str
        msgpack.packb(["all", "w1", b"", b"", [], "extra"]),  # too many fields
    ],
)
def test_junk_is_refused_with_malformed_cluster_message(junk: bytes) -> None:
    with pytest.raises(MalformedClusterMessage):
        decode(junk)


def test_from_wire_of_one_class_refuses_another() -> None:
    with pytest.raises(MalformedClusterMessage):
        Joined.from_wire(Left("w1", ALICE_ENTRY).to_wire())


# ---------------------------------------------------------------- sends


def test_send_client_by_name_and_address_reaches_a_client_of_another_worker(net, workers) -> None:
    w0, w1, _ = workers
    w0.join(("10.0.0.1", 1000), "alice")
    bob = w1.join(("10.0.0.2", 2000), "bob")
    net.pump()

    w0.send_client("bob", "msg", "by name")
    w0.send_client("10.0.0.2:2000", "msg", "by address")
    w0.send_client(("10.0.0.2", 2000), "msg", "by tuple")
    net.pump()

    assert bob.got("msg") == ["by name", "by address", "by tuple"]


def test_a_send_to_one_client_goes_only_to_its_worker(net, workers) -> None:
    w0, w1, w2 = workers
    w0.join(("10.0.0.1", 1000), "alice")
    w1.join(("10.0.0.2", 2000), "bob")
    net.pump()

    w0.send_client("bob", "msg", "hi")
    net.pump()

    assert net.delivered["w1", "to"] == 1
    assert net.delivered["w2", "to"] == 0


def test_a_broadcast_reaches_every_client_once_in_its_dialect(net, workers) -> None:
    w0, w1, w2 = workers
    peers = [w0.join(("10.0.0.1", 1), "a"), w1.join(("10.0.0.2", 2), "b", msgpack_ok=False), w2.join(("10.0.0.3", 3), "c")]
    net.pump()

    w1.send_all("shout", {"n": [1, 2]})
    net.pump()

    for peer in peers:
        assert peer.got("shout") == [{"n": [1, 2]}], peer


def test_a_group_send_reaches_exactly_the_members(net, workers) -> None:
    w0, w1, w2 = workers
    red = [w0.join(("10.0.0.1", 1), "a", "red"), w2.join(("10.0.0.3", 3), "c", "red")]
    blue = w1.join(("10.0.0.2", 2), "b", "blue")
    net.pump()

    w1.send_group("red", "told", "reds")
    net.pump()

    assert [peer.got("told") for peer in red] == [["reds"], ["reds"]]
    assert blue.got("told") == []


def test_a_group_nobody_is_in_raises_group_not_found_everywhere(net, workers) -> None:
    workers[0].join(("10.0.0.1", 1), "a", "red")
    net.pump()

    for server in workers:
        with pytest.raises(GroupNotFound):
            server.send_group("blue", "told", "x")
        with pytest.raises(GroupNotFound):
            server.delivery.group_members("blue")


def test_an_unknown_client_raises_client_not_found_everywhere(net, workers) -> None:
    workers[0].join(("10.0.0.1", 1), "a")
    net.pump()

    for server in workers:
        for ref in ("nobody", "10.9.9.9:1", ("10.9.9.9", 1)):
            with pytest.raises(ClientNotFound):
                server.send_client(ref, "msg")


# ---------------------------------------------------------------- membership


def test_a_join_is_announced_once_to_the_clients_of_every_other_worker(net, workers) -> None:
    w0, w1, w2 = workers
    watchers = [w0.join(("10.0.0.1", 1), "a"), w1.join(("10.0.0.2", 2), "b"), w2.join(("10.0.0.3", 3), "c")]
    net.pump()

    w1.join(("10.0.0.4", 4), "dave")
    net.pump()

    for watcher in watchers:
        assert [event for event in watcher.received() if event == ("joined", "dave")] == [("joined", "dave")], watcher


def test_a_leave_is_announced_once_and_forgotten_everywhere(net, workers) -> None:
    w0, w1, w2 = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    bob = w1.join(("10.0.0.2", 2), "bob")
    net.pump()

    w1.leave(bob)
    net.pump()

    assert alice.received().count(("left", "bob")) == 1
    for server in workers:
        with pytest.raises(ClientNotFound):
            server.delivery.find_client("bob")
        assert [info.name for info in server.delivery.all_clients()] == ["alice"]


def test_a_change_of_name_and_group_reaches_every_mirror(net, workers) -> None:
    w0, w1, w2 = workers
    alice = w0.join(("10.0.0.1", 1), "alice", "red")
    net.pump()

    w0.change(alice, "alicia", "blue")
    net.pump()

    for server in workers:
        assert server.delivery.find_client("alicia") == ClientInfo(("10.0.0.1", 1), "alicia", "blue")
        assert server.delivery.group_members("blue") == [ClientInfo(("10.0.0.1", 1), "alicia", "blue")]
        with pytest.raises(ClientNotFound):
            server.delivery.find_client("alice")


def test_a_worker_that_starts_later_learns_the_others_from_the_table(net, workers) -> None:
    workers[0].join(("10.0.0.1", 1), "alice", "red")
    workers[1].join(("10.0.0.2", 2), "bob", "red")
    net.pump()

    late = FakeServer(net, "late")
    try:
        assert {info.name for info in late.delivery.all_clients()} == {"alice", "bob"}
        assert len(late.delivery.group_members("red")) == 2
    finally:
        late.delivery.stop()


@pytest.mark.filterwarnings("ignore:.*clients are named:UserWarning")
def test_a_shared_name_means_the_client_that_joined_first_on_every_worker(net, workers) -> None:
    w0, w1, w2 = workers
    first = w1.join(("10.0.0.1", 1), "twin")
    net.pump()
    second = w2.join(("10.0.0.2", 2), "twin")
    net.pump()

    for server in workers:
        with pytest.warns(UserWarning, match="2 clients are named 'twin'"):
            server.send_client("twin", "msg", server.delivery.worker_id)
    net.pump()

    assert sorted(first.got("msg")) == ["w0", "w1", "w2"]
    assert second.got("msg") == []


def test_disconnect_client_of_another_worker_kicks_it_there_and_everyone_hears_it_left(net, workers) -> None:
    w0, w1, w2 = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    carol = w2.join(("10.0.0.3", 3), "carol")
    w1.join(("10.0.0.2", 2), "bob")
    net.pump()

    info = w0.delivery.find_client("bob")
    assert w0.delivery.disconnect_elsewhere(info, force=False, call_func=True)
    with pytest.raises(ClientNotFound):
        w0.delivery.find_client("bob")  # at once, on the worker that asked
    net.pump()

    assert w1.kicks == [(("10.0.0.2", 2), False, True)]
    assert alice.received().count(("left", "bob")) == 1
    assert carol.received().count(("left", "bob")) == 1


# ---------------------------------------------------------------- a worker dies


def test_a_reaped_workers_clients_leave_once_on_the_reaper_and_everyone_hears_it(net, workers) -> None:
    w0, w1, w2 = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    carol = w2.join(("10.0.0.3", 3), "carol")
    w1.join(("10.0.0.2", 2), "bob", "red")
    net.pump()

    net.reap("w1", by="w0")
    net.pump()

    assert w0.leaves == [ClientInfo(("10.0.0.2", 2), "bob", "red")]
    assert w1.leaves == [] and w2.leaves == []
    assert alice.received().count(("left", "bob")) == 1
    assert carol.received().count(("left", "bob")) == 1
    for server in (w0, w2):
        with pytest.raises(ClientNotFound):
            server.delivery.find_client("bob")


# ---------------------------------------------------------------- two clients behind one address

SHARED = ("10.0.0.9", 4000)


@pytest.fixture
def behind_one_address(net, workers):
    """alice on w0 and bob on w1 at the same ip:port (two hosts behind one proxy); w2 watches."""
    alice = workers[0].join(SHARED, "alice", "red")
    net.pump()
    bob = workers[1].join(SHARED, "bob", "blue")
    net.pump()
    return alice, bob


def test_two_clients_sharing_an_address_on_two_workers_are_both_known_everywhere(net, workers, behind_one_address) -> None:
    for server in workers:
        assert sorted(info.name for info in server.delivery.all_clients()) == ["alice", "bob"]
        assert server.delivery.find_client("alice").ip == server.delivery.find_client("bob").ip == SHARED


def test_private_messages_by_name_reach_exactly_their_addressee_after_a_rename(net, workers, behind_one_address) -> None:
    alice, bob = behind_one_address
    workers[0].change(alice, "alice2", "red")
    net.pump()

    for server in workers:
        server.send_client("alice2", "msg", f"alice2 from {server.delivery.worker_id}")
        server.send_client("bob", "msg", f"bob from {server.delivery.worker_id}")
    net.pump()

    assert sorted(alice.got("msg")) == ["alice2 from w0", "alice2 from w1", "alice2 from w2"]
    assert sorted(bob.got("msg")) == ["bob from w0", "bob from w1", "bob from w2"]


def test_a_shared_address_means_the_first_joiner_with_a_warning_on_every_worker(net, workers, behind_one_address) -> None:
    alice, bob = behind_one_address
    for server in workers:
        for ref in (SHARED, "10.0.0.9:4000"):
            with pytest.warns(UserWarning, match="2 clients are at 10.0.0.9:4000; using the one that joined first"):
                assert server.delivery.find_client(ref).name == "alice"


def test_the_client_info_of_one_of_them_names_that_one_without_a_warning(net, workers, behind_one_address, recwarn) -> None:
    alice, bob = behind_one_address
    for server in workers:
        bob_info = next(info for info in server.delivery.all_clients() if info.name == "bob")
        server.send_client(bob_info, "msg", "to bob's info")
    net.pump()

    assert bob.got("msg") == ["to bob's info"] * 3
    assert alice.got("msg") == []
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)]


def test_disconnect_client_of_one_of_them_kicks_only_that_one(net, workers, behind_one_address) -> None:
    alice, bob = behind_one_address
    w0, w1, w2 = workers

    # On alice's own worker, bob is the other worker's client at the same address.
    assert w0.delivery.disconnect_elsewhere(w0.delivery.find_client("bob"), force=True, call_func=False)
    net.pump()

    assert w1.kicks == [(SHARED, True, False)]
    assert w0.kicks == [] and alice in w0.registry
    assert [info.name for info in w2.delivery.all_clients()] == ["alice"]
    assert not w0.delivery.disconnect_elsewhere(w0.delivery.find_client("alice"), force=True, call_func=False)


def test_reaping_one_worker_takes_only_its_client_of_a_shared_address(net, workers, behind_one_address) -> None:
    alice, bob = behind_one_address
    net.reap("w1", by="w2")
    net.pump()

    assert workers[2].leaves == [ClientInfo(SHARED, "bob", "blue")]
    for server in (workers[0], workers[2]):
        assert [info.name for info in server.delivery.all_clients()] == ["alice"]
    assert alice.received().count(("left", "bob")) == 1


# ---------------------------------------------------------------- coming back, catching up


def events_about(peer, name: str, since: int = 0) -> List[str]:
    """What ``peer`` heard of ``name`` joining and leaving, from its ``since``-th frame on."""
    return [kind for kind, who in peer.received()[since:] if who == name and kind in ("joined", "left")]


def test_a_reaped_worker_that_comes_back_is_announced_again_once_and_reachable(net, workers) -> None:
    w0, w1, w2 = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    carol = w2.join(("10.0.0.3", 3), "carol")
    bob = w1.join(("10.0.0.2", 2), "bob", "red")
    net.pump()
    net.reap("w1", by="w0")  # w1 was paused past the TTL
    net.pump()

    net.come_back("w1")
    net.pump()

    for watcher in (alice, carol):
        assert events_about(watcher, "bob") == ["joined", "left", "joined"], watcher
    assert events_about(bob, "bob") == []  # its own worker never lost it
    assert w0.leaves == [ClientInfo(("10.0.0.2", 2), "bob", "red")]  # leave ran once, not again
    w2.send_client("bob", "msg", "welcome back")
    w0.send_group("red", "told", "reds")
    net.pump()
    assert bob.got("msg") == ["welcome back"] and bob.got("told") == ["reds"]


def test_coming_back_tells_the_others_who_left_and_joined_while_cut_off(net, workers) -> None:
    w0, w1, _ = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    bob = w1.join(("10.0.0.2", 2), "bob")
    net.pump()
    mark = len(alice.frames)
    net.cut.add("w1")
    w1.leave(bob)  # the others never hear of these two
    w1.join(("10.0.0.4", 4), "dave")
    net.cut.discard("w1")

    net.come_back("w1")
    net.pump()

    assert events_about(alice, "bob", mark) == ["left"]
    assert events_about(alice, "dave", mark) == ["joined"]
    assert sorted(info.name for info in w0.delivery.all_clients()) == ["alice", "dave"]


def test_a_worker_that_resubscribes_catches_up_on_what_it_missed(net, workers) -> None:
    w0, w1, _ = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    bob = w1.join(("10.0.0.2", 2), "bob")
    net.pump()
    mark = len(alice.frames)
    net.cut.add("w0")  # w0's subscription is down
    w1.leave(bob)
    w1.join(("10.0.0.4", 4), "dave")
    net.pump()
    net.cut.discard("w0")

    net.resubscribe("w0")

    assert events_about(alice, "bob", mark) == ["left"]
    assert events_about(alice, "dave", mark) == ["joined"]


def test_after_redis_restarts_empty_the_workers_that_write_back_are_not_announced_again(net, workers) -> None:
    w0, w1, w2 = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    w1.join(("10.0.0.2", 2), "bob")
    w2.join(("10.0.0.3", 3), "carol")
    net.pump()
    mark = len(alice.frames)
    net.table.clear()  # Redis restarted empty: w0 resubscribes before the others are back

    net.resubscribe("w0")
    net.come_back("w1")
    net.pump()
    w0.delivery.tick(now=float("inf"))  # w2 never came back: its clients leave now

    assert events_about(alice, "bob", mark) == []
    assert events_about(alice, "carol", mark) == ["left"]
    assert sorted(info.name for info in w0.delivery.all_clients()) == ["alice", "bob"]


def test_a_worker_missing_from_a_snapshot_keeps_its_clients_for_the_grace_period(net, workers) -> None:
    w0, w1, _ = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    w1.join(("10.0.0.2", 2), "bob")
    net.pump()
    mark = len(alice.frames)
    net.table.pop("w1")

    net.resubscribe("w0")
    w0.delivery.tick()  # within the grace period

    assert events_about(alice, "bob", mark) == []
    w0.send_client("bob", "msg", "still here?")


# ---------------------------------------------------------------- sends that skip someone


def test_a_broadcast_skips_excluded_clients_of_every_worker_by_their_cluster_identity(net, workers) -> None:
    w0, w1, w2 = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    bob = w1.join(("10.0.0.2", 2), "bob")
    carol = w2.join(("10.0.0.3", 3), "carol")
    dave = w2.join(("10.0.0.4", 4), "dave")
    net.pump()

    w0.send_all("shout", "but bob and dave", exclude=("bob", ("10.0.0.4", 4), "nobody", "10.9.9.9:9"))
    net.pump()

    assert [peer.got("shout") for peer in (alice, bob, carol, dave)] == [["but bob and dave"], [], ["but bob and dave"], []]
    published = [message for message in w0.delivery.bus.sent if isinstance(message, ToAll)]
    assert [sorted(message.exclude) for message in published] == [sorted(["w1#1", "w2#2"])]


def test_a_broadcast_excluding_everyone_elsewhere_is_not_published(net, workers) -> None:
    w0, w1, _ = workers
    alice = w0.join(("10.0.0.1", 1), "alice")
    bob = w1.join(("10.0.0.2", 2), "bob")
    net.pump()

    w0.send_all("shout", "just alice", exclude=[bob.info])
    net.pump()

    assert alice.got("shout") == ["just alice"] and bob.got("shout") == []
    assert not [message for message in w0.delivery.bus.sent if isinstance(message, ToAll)]


def test_a_group_send_tells_each_worker_only_its_own_excluded_members(net, workers) -> None:
    w0, w1, w2 = workers
    a = w0.join(("10.0.0.1", 1), "a", "red")
    b1 = w1.join(("10.0.0.2", 2), "b1", "red")
    b2 = w1.join(("10.0.0.3", 3), "b2", "red")
    c = w2.join(("10.0.0.4", 4), "c", "red")
    blue = w2.join(("10.0.0.5", 5), "blue", "blue")
    net.pump()

    w0.send_group("red", "told", "reds but b1 and c", exclude=[b1.info, "c", "blue", "a"])
    net.pump()

    assert [peer.got("told") for peer in (a, b1, b2, c, blue)] == [[], [], ["reds but b1 and c"], [], []]
    groups = [message for message in w0.delivery.bus.sent if isinstance(message, ToGroup)]
    assert [message.exclude for message in groups] == [("w1#1",)]  # w2's only member is skipped: no message
    assert net.delivered["w2", "group"] == 0


def test_a_group_send_excluding_every_member_sends_nothing_and_raises_nothing(net, workers) -> None:
    w0, w1, _ = workers
    a = w0.join(("10.0.0.1", 1), "a", "red")
    b = w1.join(("10.0.0.2", 2), "b", "red")
    net.pump()

    w1.send_group("red", "told", "nobody", exclude=["a", "b"])
    net.pump()

    assert a.got("told") == b.got("told") == []
    with pytest.raises(GroupNotFound):
        w1.send_group("blue", "told", "nobody", exclude=["a"])


def test_a_plain_peer_excluded_spares_the_plain_frame(net, workers) -> None:
    w0, w1, _ = workers
    a = w0.join(("10.0.0.1", 1), "a", "red")
    plain = w1.join(("10.0.0.2", 2), "plain", "red", msgpack_ok=False)
    net.pump()

    w0.send_all("flag", True, exclude="plain")  # a bool cannot reach a plain peer
    w0.send_group("red", "flag", False, exclude=[plain.info])
    net.pump()

    assert a.got("flag") == [True, False] and plain.got("flag") == []
    with pytest.raises(InvalidTypeCast):
        w0.send_all("flag", True)


# ---------------------------------------------------------------- announcement scope


@pytest.fixture
def scoped(net) -> Iterator:
    """``scoped(announce)``: three workers with that announcement scope."""
    made: List[FakeServer] = []

    def make(announce: str) -> List[FakeServer]:
        made.extend(FakeServer(net, f"w{i}", announce=announce) for i in range(3))
        return made[-3:]

    yield make
    for server in made:
        server.delivery.stop()


def test_group_scope_tells_another_workers_join_and_leave_only_to_its_group(net, scoped) -> None:
    w0, w1, w2 = scoped("group")
    red, blue, loner = w0.join(("10.0.0.1", 1), "red", "red"), w0.join(("10.0.0.2", 2), "blue", "blue"), w2.join(("10.0.0.3", 3), "loner")
    net.pump()

    dave = w1.join(("10.0.0.4", 4), "dave", "red")
    nobody = w1.join(("10.0.0.5", 5), "nobody", None)
    net.pump()
    w1.leave(dave)
    w1.leave(nobody)
    net.pump()

    assert events_about(red, "dave") == ["joined", "left"]
    assert events_about(blue, "dave") == events_about(loner, "dave") == []
    for peer in (red, blue, loner):
        assert events_about(peer, "nobody") == []
        assert events_about(peer, "red") == []  # red joined first: told no one, as on HiSock


def test_group_scope_tells_another_workers_group_change_as_a_leave_and_a_join(net, scoped) -> None:
    w0, w1, _ = scoped("group")
    red, blue = w0.join(("10.0.0.1", 1), "red", "red"), w0.join(("10.0.0.2", 2), "blue", "blue")
    alice = w1.join(("10.0.0.3", 3), "alice", "red")
    net.pump()
    mark = [len(red.frames), len(blue.frames)]

    w1.change(alice, "alice", "blue")
    net.pump()
    w1.change(alice, "alicia", "blue")  # a name change: nobody hears
    net.pump()

    assert events_about(red, "alice", mark[0]) == ["left"]
    assert events_about(blue, "alice", mark[1]) == ["joined"]
    assert [kind for kind, _ in red.received()[mark[0]:]] == ["left"]
    assert [kind for kind, _ in blue.received()[mark[1]:]] == ["joined"]


def test_group_scope_tells_a_group_change_missed_while_cut_off_when_the_worker_comes_back(net, scoped) -> None:
    w0, w1, _ = scoped("group")
    red, blue = w0.join(("10.0.0.1", 1), "red", "red"), w0.join(("10.0.0.2", 2), "blue", "blue")
    alice = w1.join(("10.0.0.3", 3), "alice", "red")
    net.pump()
    mark = [len(red.frames), len(blue.frames)]
    net.cut.add("w1")
    w1.change(alice, "alice", "blue")  # the others never hear of it
    net.cut.discard("w1")

    net.come_back("w1")
    net.pump()

    assert events_about(red, "alice", mark[0]) == ["left"]
    assert events_about(blue, "alice", mark[1]) == ["joined"]


def test_all_scope_tells_nobody_of_another_workers_group_change(net, workers) -> None:
    w0, w1, _ = workers
    red = w0.join(("10.0.0.1", 1), "red", "red")
    alice = w1.join(("10.0.0.3", 3), "alice", "red")
    net.pump()
    mark = len(red.frames)

    w1.change(alice, "alice", "blue")
    net.pump()

    assert red.frames[mark:] == []


def test_none_scope_tells_nobody_of_another_workers_clients(net, scoped) -> None:
    w0, w1, _ = scoped("none")
    watchers = [w0.join(("10.0.0.1", 1), "a", "red"), w0.join(("10.0.0.2", 2), "b")]
    net.pump()

    dave = w1.join(("10.0.0.4", 4), "dave", "red")
    net.pump()
    w1.change(dave, "dave", "blue")
    w1.leave(dave)
    net.pump()
    net.reap("w1", by="w0")
    net.pump()

    assert [watcher.frames for watcher in watchers] == [[], []]
    assert [info.name for info in w0.delivery.all_clients()] == ["a", "b"]
