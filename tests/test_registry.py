"""The registry and the local delivery seam, with in-memory peers: no sockets, no gevent.

:class:`~hisock_gevent.registry.ClientRegistry` keeps HiSock's ``clients`` and
``clients_rev`` in step with its indexes by address, name and group;
:class:`~hisock_gevent.registry.LocalDelivery` answers the server's lookups and sends
through it, and :func:`~hisock_gevent.registry.fan_out` gives every peer the frame of its
dialect, built once, or nobody anything.  A peer is :class:`memory_bus.FakePeer`: an
``info``, a ``sock`` (any object), ``msgpack_ok`` and ``send`` that keeps the frames.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Tuple

import pytest
from memory_bus import HEADER_LEN, FakePeer

from hisock_gevent import ClientNotFound, GroupNotFound, InvalidTypeCast
from hisock_gevent.errors import ContentTooLarge
from hisock_gevent.outgoing import OutgoingCommand
from hisock_gevent.registry import ClientRegistry, LocalDelivery, address_of, fan_out, frames_for
from hisock_gevent.utils import ClientInfo

IP = "10.0.0.1"


def peer(port: int, name: Optional[str] = None, group: Optional[str] = None, msgpack_ok: bool = True) -> FakePeer:
    return FakePeer((IP, port), name, group, msgpack_ok)


def registry_of(*peers: FakePeer) -> ClientRegistry:
    registry: ClientRegistry = ClientRegistry()
    for each in peers:
        registry.add(each)
    return registry


def assert_in_step(registry: ClientRegistry, peers: List[FakePeer]) -> None:
    """``clients``, ``clients_rev`` and every index say the same thing: exactly ``peers``."""
    assert registry.clients == {each.sock: each.info for each in peers}
    assert registry.clients_rev == {each.info: each.sock for each in peers}
    assert len(registry) == len(peers)
    assert set(registry) == set(peers)
    for each in peers:
        assert each in registry
        assert registry.at(each.info.ip) is each
        if each.info.name is not None:
            assert each in registry.named(each.info.name)
        if each.info.group is not None:
            assert each in registry.group(each.info.group)
    names = {each.info.name for each in peers if each.info.name is not None}
    for name in names:
        assert set(registry.named(name)) == {each for each in peers if each.info.name == name}
    expected_groups = {}
    for each in peers:
        if each.info.group is not None:
            expected_groups[each.info.group] = expected_groups.get(each.info.group, 0) + 1
    assert registry.groups() == expected_groups


def command(content: Any = "hi", name: str = "note", max_body: Optional[int] = None) -> OutgoingCommand:
    return OutgoingCommand(name, content, HEADER_LEN, max_body=max_body)


# ------------------------------------------------------------------ add, update, remove


def test_an_empty_registry_has_no_clients_and_no_groups():
    registry = ClientRegistry()
    assert len(registry) == 0
    assert list(registry) == []
    assert registry.clients == {} and registry.clients_rev == {}
    assert registry.groups() == {} and registry.group_sizes() == {}


def test_add_puts_the_peer_in_clients_clients_rev_and_every_index():
    alice, bob = peer(1, "alice", "red"), peer(2, "bob", None)
    registry = registry_of(alice, bob)
    assert registry.clients[alice.sock] is alice.info
    assert registry.clients_rev[alice.info] is alice.sock
    assert_in_step(registry, [alice, bob])


def test_iterating_gives_the_peers_in_join_order_from_a_snapshot():
    first, second, third = peer(3, "c"), peer(1, "a"), peer(2, "b")
    registry = registry_of(first, second, third)
    seen = []
    for each in registry:  # removing while iterating is safe: the loop walks a copy
        seen.append(each)
        registry.remove(each)
    assert seen == [first, second, third]
    assert len(registry) == 0


def test_update_moves_the_peer_to_its_new_name_and_group_in_every_map():
    alice = peer(1, "alice", "red")
    registry = registry_of(alice)
    old_info = alice.info
    new_info = ClientInfo(alice.info.ip, "alicia", "blue")

    assert registry.update(alice, new_info) is old_info
    assert alice.info is new_info
    assert old_info not in registry.clients_rev
    assert registry.named("alice") == []
    with pytest.raises(GroupNotFound):
        registry.group("red")
    assert registry.named("alicia") == [alice]
    assert registry.group("blue") == [alice]
    assert_in_step(registry, [alice])


def test_update_to_no_name_and_no_group_leaves_the_peer_findable_by_address_only():
    alice = peer(1, "alice", "red")
    registry = registry_of(alice)
    registry.update(alice, ClientInfo(alice.info.ip, None, None))
    assert registry.named("alice") == []
    assert registry.groups() == {}
    assert registry.find((IP, 1)) is alice
    assert_in_step(registry, [alice])


def test_remove_forgets_the_peer_everywhere_and_drops_emptied_names_and_groups():
    alice, bob = peer(1, "alice", "red"), peer(2, "bob", "red")
    registry = registry_of(alice, bob)

    assert registry.remove(alice) is True
    assert alice not in registry
    assert registry.at(alice.info.ip) is None
    assert registry.named("alice") == []
    assert registry.groups() == {"red": 1}
    assert_in_step(registry, [bob])

    assert registry.remove(bob) is True
    assert registry.groups() == {}
    assert_in_step(registry, [])


def test_remove_of_a_peer_that_is_not_registered_is_false_and_changes_nothing():
    alice = peer(1, "alice", "red")
    registry = registry_of(alice)
    assert registry.remove(peer(2, "ghost", "red")) is False
    assert_in_step(registry, [alice])


def test_remove_of_a_stale_peer_at_a_reused_address_leaves_the_new_one():
    old = peer(1, "old", "red")
    registry = registry_of(old)
    registry.remove(old)
    new = peer(1, "new", "red")  # the same (ip, port), a new connection
    registry.add(new)
    assert registry.remove(old) is False
    assert old not in registry
    assert_in_step(registry, [new])


def test_contains_is_about_this_peer_not_its_address():
    registered, lookalike = peer(1, "a"), peer(1, "a")
    registry = registry_of(registered)
    assert registered in registry
    assert lookalike not in registry


def test_group_sizes_are_largest_first_then_by_name_without_the_ungrouped():
    registry = registry_of(
        peer(1, group="b"), peer(2, group="a"), peer(3, group="c"), peer(4, group="c"), peer(5, group=None)
    )
    assert list(registry.group_sizes().items()) == [("c", 2), ("a", 1), ("b", 1)]


# ------------------------------------------------------------------ find


def test_find_by_address_tuple_ipstr_name_and_clientinfo_gives_the_same_peer():
    alice = peer(1, "alice", "red")
    registry = registry_of(peer(2, "bob"), alice)
    assert registry.find((IP, 1)) is alice
    assert registry.find(f"{IP}:1") is alice
    assert registry.find("alice") is alice
    assert registry.find(alice.info) is alice


def test_find_by_a_clientinfo_goes_by_its_address_even_when_its_name_is_stale():
    alice = peer(1, "alice", "red")
    registry = registry_of(alice)
    stale = alice.info
    registry.update(alice, ClientInfo(alice.info.ip, "alicia", "red"))
    assert registry.find(stale) is alice


@pytest.mark.parametrize(
    "reference", [(IP, 9), f"{IP}:9", "nobody", ClientInfo((IP, 9), "alice", "red")], ids=["tuple", "ipstr", "name", "clientinfo"]
)
def test_find_of_nobody_raises_client_not_found(reference: Any):
    registry = registry_of(peer(1, "alice", "red"))
    with pytest.raises(ClientNotFound):
        registry.find(reference)


@pytest.mark.parametrize(
    "reference",
    [(IP, "1"), (1, 1), (IP, 1, 2), (IP,), 42, 4.2, None, b"alice", ["10.0.0.1", 1]],
    ids=["port-str", "ip-int", "three", "one", "int", "float", "none", "bytes", "list"],
)
def test_find_by_a_reference_of_the_wrong_shape_raises_value_error(reference: Any):
    registry = registry_of(peer(1, "alice", "red"))
    with pytest.raises(ValueError):
        registry.find(reference)


def test_find_by_a_shared_name_warns_and_gives_the_first_joiner():
    first, second = peer(2, "twin"), peer(1, "twin")
    registry = registry_of(first, second)
    with pytest.warns(UserWarning, match="2 clients are named 'twin'"):
        assert registry.find("twin") is first
    assert registry.named("twin") == [first, second]


def test_find_by_a_shared_name_gives_the_next_joiner_once_the_first_leaves():
    first, second = peer(1, "twin"), peer(2, "twin")
    registry = registry_of(first, second)
    registry.remove(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one client left with the name: no warning
        assert registry.find("twin") is second


def test_find_by_a_unique_name_does_not_warn():
    registry = registry_of(peer(1, "alice"), peer(2, "bob"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.find("bob").info.name == "bob"


def test_a_group_change_keeps_the_first_joiner_first_among_a_shared_name():
    first, second = peer(1, "twin", "red"), peer(2, "twin", "red")
    registry = registry_of(first, second)
    registry.update(first, ClientInfo(first.info.ip, "twin", "blue"))
    assert registry.named("twin") == [first, second]


def test_a_name_change_keeps_the_group_in_join_order():
    first, second = peer(1, "a", "red"), peer(2, "b", "red")
    registry = registry_of(first, second)
    registry.update(first, ClientInfo(first.info.ip, "a2", "red"))
    assert registry.group("red") == [first, second]


# ------------------------------------------------------------------ at, named, group


def test_at_gives_the_peer_at_an_address_or_none():
    alice = peer(1, "alice")
    registry = registry_of(alice)
    assert registry.at((IP, 1)) is alice
    assert registry.at((IP, 2)) is None
    assert registry.at(("10.0.0.2", 1)) is None


def test_named_gives_every_peer_with_the_name_in_join_order_and_none_for_nobody():
    a, b, c = peer(3, "x"), peer(1, "y"), peer(2, "x")
    registry = registry_of(a, b, c)
    assert registry.named("x") == [a, c]
    assert registry.named("y") == [b]
    assert registry.named("z") == []


def test_group_by_name_or_clientinfo_gives_its_members_in_join_order():
    a, b, c = peer(3, "a", "red"), peer(1, "b", "blue"), peer(2, "c", "red")
    registry = registry_of(a, b, c)
    assert registry.group("red") == [a, c]
    assert registry.group(b.info) == [b]
    assert registry.group(ClientInfo(("10.9.9.9", 1), "outsider", "red")) == [a, c]
    assert registry.groups() == {"red": 2, "blue": 1}


@pytest.mark.parametrize(
    "group",
    ["green", ClientInfo((IP, 1), "alice", None), 7, None, b"red"],
    ids=["unknown", "clientinfo-without-group", "int", "none", "bytes"],
)
def test_group_of_nobody_or_of_a_wrong_type_raises_group_not_found(group: Any):
    registry = registry_of(peer(1, "alice", "red"))
    with pytest.raises(GroupNotFound):
        registry.group(group)


def test_group_not_found_is_also_a_type_error_as_hisock_documents():
    with pytest.raises(TypeError):
        ClientRegistry().group("nobody")


# ------------------------------------------------------------------ address_of


@pytest.mark.parametrize(
    "reference, address",
    [
        ((IP, 80), (IP, 80)),
        (f"{IP}:80", (IP, 80)),
        ("255.255.255.255:65535", ("255.255.255.255", 65535)),
        (ClientInfo((IP, 80), "n", "g"), (IP, 80)),
        ("alice", None),
        ("localhost:80", None),
        (f"{IP}:", None),
        (f"{IP}:123456", None),
        ("", None),
    ],
    ids=["tuple", "ipstr", "ipstr-max", "clientinfo", "name", "hostname-port", "no-port", "long-port", "empty"],
)
def test_address_of_gives_the_address_a_reference_names_or_none_for_a_name(reference: Any, address: Optional[Tuple[str, int]]):
    assert address_of(reference) == address


@pytest.mark.parametrize("reference", [(IP, "80"), (80, IP), (IP,), 80, None, [IP, 80]])
def test_address_of_a_reference_of_the_wrong_shape_raises_value_error(reference: Any):
    with pytest.raises(ValueError):
        address_of(reference)


# ------------------------------------------------------------------ LocalDelivery: lookups


def test_local_delivery_lookups_answer_with_clientinfo():
    alice, bob, carol = peer(1, "alice", "red"), peer(2, "bob", None), peer(3, "carol", "red")
    delivery = LocalDelivery(registry_of(alice, bob, carol))
    assert delivery.find_client("bob") is bob.info
    assert delivery.find_client((IP, 3)) is carol.info
    assert delivery.group_members("red") == [alice.info, carol.info]
    assert delivery.all_clients() == [alice.info, bob.info, carol.info]
    with pytest.raises(ClientNotFound):
        delivery.find_client("dave")
    with pytest.raises(GroupNotFound):
        delivery.group_members("blue")


def test_local_delivery_hooks_do_nothing_by_default():
    delivery = LocalDelivery(registry_of(peer(1, "alice")))
    assert delivery.disconnect_elsewhere("alice", force=False, call_func=True) is False
    assert delivery.stats() is None


# ------------------------------------------------------------------ LocalDelivery: sends


def test_to_client_sends_the_frame_of_the_peers_dialect_to_it_alone():
    modern, plain, other = peer(1, "modern"), peer(2, "plain", msgpack_ok=False), peer(3, "other")
    delivery = LocalDelivery(registry_of(modern, plain, other))
    message = command([1, "x"])

    delivery.to_client("modern", message)
    delivery.to_client((IP, 2), message)

    assert modern.frames == [message.frame_for(True)]
    assert plain.frames == [message.frame_for(False)]
    assert other.frames == []
    assert modern.got("note") == plain.got("note") == [[1, "x"]]


def test_to_client_of_nobody_raises_and_sends_nothing():
    alice = peer(1, "alice")
    delivery = LocalDelivery(registry_of(alice))
    with pytest.raises(ClientNotFound):
        delivery.to_client("bob", command())
    assert alice.frames == []


def test_to_client_that_the_plain_dialect_cannot_carry_raises_and_sends_nothing():
    plain = peer(1, "plain", msgpack_ok=False)
    delivery = LocalDelivery(registry_of(plain))
    with pytest.raises(InvalidTypeCast):
        delivery.to_client("plain", command([1, None]))
    assert plain.frames == []


def test_to_group_reaches_only_that_group():
    red1, blue, red2 = peer(1, "r1", "red"), peer(2, "b", "blue"), peer(3, "r2", "red", msgpack_ok=False)
    delivery = LocalDelivery(registry_of(red1, blue, red2))
    delivery.to_group("red", command("hello"))
    assert red1.got("note") == red2.got("note") == ["hello"]
    assert blue.frames == []


def test_to_group_by_clientinfo_reaches_that_clients_group():
    red1, blue, red2 = peer(1, "r1", "red"), peer(2, "b", "blue"), peer(3, "r2", "red")
    delivery = LocalDelivery(registry_of(red1, blue, red2))
    delivery.to_group(red2.info, command("hello"))
    assert red1.got("note") == red2.got("note") == ["hello"]
    assert blue.frames == []


def test_to_group_of_nobody_raises_group_not_found_and_sends_nothing():
    alice = peer(1, "alice", "red")
    delivery = LocalDelivery(registry_of(alice))
    with pytest.raises(GroupNotFound):
        delivery.to_group("blue", command())
    assert alice.frames == []


def test_to_all_reaches_everyone_in_their_dialect():
    modern, plain = peer(1, "modern"), peer(2, "plain", msgpack_ok=False)
    delivery = LocalDelivery(registry_of(modern, plain))
    message = command(2.5)
    delivery.to_all(message)
    assert modern.frames == [message.frame_for(True)]
    assert plain.frames == [message.frame_for(False)]


def test_to_all_with_nobody_connected_sends_nothing_and_does_not_raise():
    LocalDelivery(ClientRegistry()).to_all(command())


def test_announce_sends_the_same_frame_to_everyone_but_the_excluded_peer():
    a, b, c = peer(1, "a"), peer(2, "b", msgpack_ok=False), peer(3, "c")
    delivery = LocalDelivery(registry_of(a, b, c))
    frame = b"<an announcement frame>"
    delivery.announce(frame, about=a.info, exclude=b)
    assert a.frames == [frame] and c.frames == [frame]
    assert a.frames[0] is frame
    assert b.frames == []
    delivery.announce(frame, about=a.info)
    assert len(b.frames) == 1


def test_joined_announces_to_everyone_else_and_left_only_when_there_is_a_frame():
    a, b = peer(1, "a"), peer(2, "b")
    registry = registry_of(a, b)
    delivery = LocalDelivery(registry)
    delivery.joined(b, b"joined")
    assert a.frames == [b"joined"] and b.frames == []

    registry.remove(b)
    delivery.left(b, None)  # the server is disconnecting everyone: nobody is told
    assert a.frames == [b"joined"]
    delivery.left(b, b"left")
    assert a.frames == [b"joined", b"left"] and b.frames == []


# ------------------------------------------------------------------ fan_out: one frame per dialect, all or nothing


def test_fan_out_builds_each_dialects_frame_once_and_shares_it():
    peers = [peer(port, msgpack_ok=port % 2 == 0) for port in range(1, 7)]
    fan_out(peers, command({"k": [1, 2]}))
    plain = [each.frames[0] for each in peers if not each.msgpack_ok]
    extended = [each.frames[0] for each in peers if each.msgpack_ok]
    assert all(frame is plain[0] for frame in plain)
    assert all(frame is extended[0] for frame in extended)
    assert all(len(each.frames) == 1 for each in peers)


def test_frames_for_builds_only_the_dialects_the_peers_speak():
    message = command("x")
    assert frames_for([peer(1), peer(2)], message) == (b"", message.frame_for(True))
    assert frames_for([peer(1, msgpack_ok=False)], message) == (message.frame_for(False), b"")
    assert frames_for([], message) == (b"", b"")


def test_frames_for_a_msgpack_only_audience_never_builds_the_plain_frame():
    # Content the plain dialect cannot carry is fine when nobody needs the plain frame.
    peers = [peer(1), peer(2)]
    fan_out(peers, command([True, None]))
    assert peers[0].got("note") == peers[1].got("note") == [[True, None]]


@pytest.mark.parametrize("plain_first", [True, False], ids=["plain-peer-first", "plain-peer-last"])
def test_fan_out_that_a_plain_peer_cannot_receive_reaches_nobody(plain_first: bool):
    plain, modern = peer(1, "plain", msgpack_ok=False), peer(2, "modern")
    peers = [plain, modern] if plain_first else [modern, plain]
    with pytest.raises(InvalidTypeCast):
        fan_out(peers, command([True, None]))
    assert plain.frames == [] and modern.frames == []


def test_fan_out_of_content_too_large_for_the_receivers_reaches_nobody():
    peers = [peer(1, msgpack_ok=False), peer(2)]
    with pytest.raises(ContentTooLarge):
        fan_out(peers, command("x" * 1000, max_body=100))
    assert all(each.frames == [] for each in peers)


def test_fan_out_accepts_any_iterable_of_peers():
    peers = [peer(1), peer(2, msgpack_ok=False)]
    fan_out(iter(peers), command("once"))
    assert [each.got("note") for each in peers] == [["once"], ["once"]]


# ------------------------------------------------------------------ two clients at one address


def test_two_clients_at_one_address_are_both_registered_and_each_is_reached_by_its_own_info(caplog):
    # A TCP and a WebSocket client whose source ports match, or two behind one proxy.
    first, second = peer(7, "tcp", "red"), peer(7, "ws", "red")
    registry = registry_of(first, second)
    assert "shares its address" in caplog.text
    assert len(registry) == 2 and set(registry) == {first, second}
    assert first in registry and second in registry
    assert registry.group("red") == [first, second]
    assert registry.all_at(first.info.ip) == [first, second]
    assert registry.find(second.info) is second and registry.find(first.info) is first
    assert registry.holding(second.info) is second
    delivery = LocalDelivery(registry)
    delivery.to_client(second.info, command("for ws"))
    assert second.frames and not first.frames


def test_an_address_shared_by_two_clients_names_the_first_with_a_warning():
    first, second = peer(7, "tcp"), peer(7, "ws")
    registry = registry_of(first, second)
    with pytest.warns(UserWarning, match="2 clients share the address"):
        assert registry.find(f"{IP}:7") is first
    with pytest.warns(UserWarning):
        assert registry.find((IP, 7)) is first


def test_when_the_first_at_an_address_leaves_the_next_takes_its_place_and_nothing_stale_stays():
    first, second, other = peer(7, "tcp", "red"), peer(7, "ws", "red"), peer(8, "other", "red")
    registry = registry_of(first, second, other)
    assert registry.remove(first)
    assert registry.at(first.info.ip) is second
    assert_in_step(registry, [second, other])
    assert registry.named("tcp") == [] and registry.group("red") == [second, other]
    assert registry.remove(second) and not registry.remove(second)
    assert_in_step(registry, [other])
    assert registry.at(first.info.ip) is None


def test_when_the_second_at_an_address_leaves_the_first_stays_and_nothing_stale_stays():
    first, second = peer(7, "tcp", "red"), peer(7, "ws", "blue")
    registry = registry_of(first, second)
    assert registry.remove(second)
    assert_in_step(registry, [first])
    with pytest.raises(GroupNotFound):
        registry.group("blue")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.find(f"{IP}:7") is first  # one client there again: no warning
