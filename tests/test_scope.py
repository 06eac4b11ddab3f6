"""Broadcasts that skip someone (``exclude``) and who hears of joins (``announce``), on one server.

``tests/test_cluster.py`` runs the same behaviours on one server and across workers with
hisock_gevent clients; here one server is checked to the byte with raw HiSock 3.x peers
(who receives which ``$CLTCONN$`` / ``$CLTDISCONN$`` under each announcement scope), and
for what only one process shows: the option's checks, the frame built once, the warning
of a shared name pointing at the caller.  Every "nobody else got it" is asserted after a
marker broadcast by the server has arrived behind it on the same connection.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import Recorder, wait_until
from rawpeer import RawPeer, cmd_body

import hisock_gevent
from hisock_gevent import ClientInfo, GroupNotFound
from hisock_gevent.config import ServerConfig
from hisock_gevent.outgoing import OutgoingCommand

pytestmark = pytest.mark.timeout(30)

SCOPES = ("all", "group", "none")
MARK = b"$CMD$mark$MSG$"


# ---------------------------------------------------------------- the option


def test_announce_defaults_to_all_and_travels_with_the_config() -> None:
    assert ServerConfig().announce == "all"
    config = ServerConfig(announce="group")
    assert dataclasses.replace(config, max_pending=10).announce == "group"


@pytest.mark.parametrize("bad", ["rooms", "ALL", "", None, ["group"]])
def test_announce_outside_the_three_scopes_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="announce must be one of 'all', 'group', 'none'"):
        ServerConfig(announce=bad)
    with pytest.raises(ValueError, match="announce must be one of"):
        hisock_gevent.HiSockServer(("127.0.0.1", 0), announce=bad)


def test_a_server_reads_its_scope_as_an_attribute(make_server) -> None:
    assert make_server(announce="none").announce == "none"


# ---------------------------------------------------------------- raw peers


class Watcher:
    """A raw HiSock 3.x peer that joined, and what it was told since (bodies, in order)."""

    def __init__(self, server: Any, name: str, group: Optional[str]):
        self.peer = RawPeer(server.get_addr())
        self.name = name
        answer = self.peer.hello(name, group=group)  # asserts the first frame is $CLTCONN$
        self.answer = json.loads(answer[len(b"$CLTCONN$"):])
        self.told: List[Tuple[str, Dict[str, Any]]] = []

    @property
    def ipstr(self) -> str:
        return f"{self.peer.addr[0]}:{self.peer.addr[1]}"

    def read_until_mark(self) -> None:
        """Read up to the next ``mark`` broadcast, keeping every announcement before it."""
        while True:
            body = self.peer.read_frame()
            if body.startswith(MARK):
                return
            for tag in ("$CLTCONN$", "$CLTDISCONN$"):
                if body.startswith(tag.encode()):
                    self.told.append((tag, json.loads(body[len(tag):])))

    def send(self, body: bytes) -> None:
        self.peer.send_frame(body)


def about(watcher: Watcher, name: str) -> List[Tuple[str, Optional[str]]]:
    """What ``watcher`` was told of ``name``: (tag, group the announcement carried)."""
    return [(tag, info["group"]) for tag, info in watcher.told if info["name"] == name]


@pytest.fixture(params=SCOPES)
def scoped(request: pytest.FixtureRequest, make_server) -> Iterator[Tuple[str, Any, Recorder, Callable[..., Watcher]]]:
    """(scope, a started server with that scope, its recorded reserved events, a factory of
    joined Watchers closed at teardown); the server sends ``mark`` to everyone on ``flush``."""
    server = make_server(announce=request.param)
    events = Recorder()
    for event in ("join", "leave"):
        server.on(event)(lambda client, event=event: events(event, client.name))
    for event in ("name_change", "group_change"):
        server.on(event)(lambda client, old, new, event=event: events(event, client.name, old, new))

    @server.on("flush")
    def flush(client: ClientInfo) -> None:
        server.send_all_clients("mark")

    server.start()
    watchers: List[Watcher] = []

    def watch(name: str, group: Optional[str]) -> Watcher:
        watchers.append(Watcher(server, name, group))
        return watchers[-1]

    yield request.param, server, events, watch
    for watcher in watchers:
        watcher.peer.close()


def flush(watchers: List[Watcher], via: Watcher) -> None:
    """Everything the server did before ``via``'s next message has reached every watcher."""
    via.send(cmd_body("flush", b"", b""))
    for watcher in watchers:
        watcher.read_until_mark()


def test_who_hears_joins_and_leaves_under_each_scope(scoped) -> None:
    scope, server, events, watch = scoped
    red, blue, loner = watch("red", "red"), watch("blue", "blue"), watch("loner", None)
    watchers = [red, blue, loner]
    flush(watchers, red)
    for watcher in watchers:
        watcher.told.clear()

    dave = watch("dave", "red")
    assert dave.answer["name"] == "dave" and dave.answer["ipstr"] == dave.ipstr  # its own answer, in every scope
    drifter = watch("drifter", None)
    dave.send(b"$USRCLOSE$")
    wait_until(lambda: ("leave", "dave") in events.items)
    drifter.peer.close()
    wait_until(lambda: ("leave", "drifter") in events.items)
    flush(watchers, red)

    expected = {
        "all": {name: [("$CLTCONN$", "red"), ("$CLTDISCONN$", "red")] for name in ("red", "blue", "loner")},
        "group": {"red": [("$CLTCONN$", "red"), ("$CLTDISCONN$", "red")], "blue": [], "loner": []},
        "none": {"red": [], "blue": [], "loner": []},
    }[scope]
    assert {watcher.name: about(watcher, "dave") for watcher in watchers} == expected
    drifter_heard = [("$CLTCONN$", None), ("$CLTDISCONN$", None)] if scope == "all" else []
    assert [about(watcher, "drifter") for watcher in watchers] == [drifter_heard] * 3
    joins = [name for event, name in events.items if event == "join"]
    assert joins == ["red", "blue", "loner", "dave", "drifter"]  # join and leave run in every scope


def test_who_hears_group_and_name_changes_under_each_scope(scoped) -> None:
    scope, server, events, watch = scoped
    alice, red, blue = watch("alice", "red"), watch("red", "red"), watch("blue", "blue")
    watchers = [alice, red, blue]
    flush(watchers, alice)
    for watcher in watchers:
        watcher.told.clear()

    alice.send(b"$CHGROUP$blue")
    alice.send(b"$CHNAME$alicia")
    flush(watchers, alice)
    blue.send(b"$CHGROUP$")  # back to the group it connected with: no change
    flush(watchers, blue)

    if scope == "group":
        assert red.told == [("$CLTDISCONN$", {"ip": list(alice.peer.addr), "name": "alice", "group": "red", "ipstr": alice.ipstr})]
        assert blue.told == [("$CLTCONN$", {"ip": list(alice.peer.addr), "name": "alice", "group": "blue", "ipstr": alice.ipstr})]
    else:
        assert red.told == blue.told == []
    assert alice.told == []  # the client that moved hears nothing of itself
    assert [item for item in events.items if item[0].endswith("_change")] == [
        ("group_change", "alice", "red", "blue"),
        ("name_change", "alicia", "alice", "alicia"),
        ("group_change", "blue", "blue", "blue"),
    ]


def test_group_scope_sends_the_same_bytes_as_all_scope_to_those_it_tells(make_server, raw) -> None:
    server = make_server(announce="group")
    server.start()
    watcher = raw(server)
    watcher.hello("watcher", group="red")
    joiner = raw(server)
    answer = joiner.hello("joiner", group="red")  # a plain peer's answer: the frame everyone gets under "all"

    assert watcher.read_frame() == answer
    joiner.send_frame(b"$USRCLOSE$")
    assert watcher.read_frame() == b"$CLTDISCONN$" + answer[len(b"$CLTCONN$"):]


# ---------------------------------------------------------------- exclude


@pytest.fixture
def exclusions(server, make_client) -> Callable[..., List[List[Any]]]:
    """``exclusions(send)``: four clients c0..c3 (c0, c1 in red); ``send(server, infos)``
    sends; returns what each received as ``shout`` before the server's ``mark``."""
    clients = [make_client(server, f"c{i}", "red" if i < 2 else None, threaded=True) for i in range(4)]
    inboxes = [Recorder() for _ in clients]
    for client, inbox in zip(clients, inboxes):
        client.on("*")(lambda command, content, inbox=inbox: inbox(command, content))
        client.start()

    def run(send: Callable[[Any, List[ClientInfo]], None]) -> List[List[Any]]:
        infos = [client.get_client(client.name) for client in clients]
        for inbox in inboxes:
            inbox.items.clear()
        send(server, infos)
        server.send_all_clients("mark", "end")
        for inbox in inboxes:
            wait_until(lambda inbox=inbox: ("mark", "end") in inbox.items)
        return [[content for command, content in inbox.items if command == "shout"] for inbox in inboxes]

    return run


@pytest.mark.parametrize(
    "exclude, skipped",
    [
        (lambda infos: infos[1], [1]),  # a ClientInfo
        (lambda infos: "c2", [2]),  # a name
        (lambda infos: infos[3].ipstr, [3]),  # "ip:port"
        (lambda infos: infos[0].ip, [0]),  # (ip, port)
        (lambda infos: [infos[0], "c3"], [0, 3]),  # a list
        (lambda infos: {infos[1], infos[2].ipstr}, [1, 2]),  # a set
        (lambda infos: ("c0", "c1", infos[2].ip), [0, 1, 2]),  # a tuple that is not one address
        (lambda infos: frozenset(["c3"]), [3]),
        (lambda infos: [], []),
        (lambda infos: None, []),
        (lambda infos: ["nobody", "127.0.0.1:1", ("127.0.0.1", 1)], []),  # not connected: ignored
    ],
)
def test_send_all_clients_skips_exactly_the_excluded(exclusions, exclude, skipped) -> None:
    got = exclusions(lambda server, infos: server.send_all_clients("shout", "hi", exclude=exclude(infos)))

    assert got == [[] if i in skipped else ["hi"] for i in range(4)]


def test_send_group_skips_the_excluded_members_only(exclusions) -> None:
    got = exclusions(lambda server, infos: server.send_group("red", "shout", "reds", exclude=[infos[1], "c2"]))

    assert got == [["reds"], [], [], []]


def test_send_group_excluding_every_member_sends_nothing_and_an_empty_group_still_raises(exclusions) -> None:
    def send(server: Any, infos: List[ClientInfo]) -> None:
        server.send_group(infos[0], "shout", "nobody", exclude=infos[:2])
        with pytest.raises(GroupNotFound):
            server.send_group("blue", "shout", "lost", exclude="c0")

    assert exclusions(send) == [[], [], [], []]


@pytest.mark.parametrize("bad", [42, [42], [("127.0.0.1", "x")], [["c0"]], {"c0": 1}, b"c0", ("a", "b", 3)])
def test_an_exclude_of_a_wrong_form_raises_value_error_and_nobody_receives(exclusions, bad) -> None:
    def send(server: Any, infos: List[ClientInfo]) -> None:
        with pytest.raises(ValueError):
            server.send_all_clients("shout", "lost", exclude=bad)
        with pytest.raises(ValueError):
            server.send_group("red", "shout", "lost", exclude=bad)

    assert exclusions(send) == [[], [], [], []]


def test_the_chat_idiom_from_a_handler_reaches_everyone_but_the_sender(server, make_client) -> None:
    @server.on("say")
    def say(client: ClientInfo, text: str) -> None:
        server.send_all_clients("said", text, exclude=client)
        server.send_group(client, "said_in_group", text, exclude=client)

    alice, bob, carol = (make_client(server, name, "red") for name in ("alice", "bob", "carol"))
    alice.send("say", "hi")
    for client in (bob, carol):
        assert client.recv("said", timeout=5) == "hi"
        assert client.recv("said_in_group", timeout=5) == "hi"
    server.send_all_clients("said", "end")
    assert alice.recv("said", timeout=5) == "end"  # not "hi"


def test_a_name_two_clients_share_excludes_the_first_joiner_with_a_warning_at_the_caller(server, make_client) -> None:
    caught: List[warnings.WarningMessage] = []

    @server.on("shout_but_twin")
    def shout_but_twin(client: ClientInfo) -> None:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            server.send_all_clients("shout", "not to the first twin", exclude="twin")
        caught.extend(record)
        server.send_all_clients("mark")

    first = make_client(server, "twin")
    second = make_client(server, "twin")
    other = make_client(server, "other")
    other.send("shout_but_twin")

    assert second.recv("shout", timeout=5) == "not to the first twin"
    assert other.recv("shout", timeout=5) == "not to the first twin"
    first.recv("mark", timeout=5)
    assert [str(w.message) for w in caught] == ["2 clients are named 'twin'; using the one that joined first"]
    assert caught[0].filename == __file__  # the handler's own line, not the library's


def test_excluding_the_plain_peer_builds_only_the_extended_frame_once(server, make_client, monkeypatch) -> None:
    builds: List[bool] = []
    original = OutgoingCommand._build

    def counting(self: OutgoingCommand, msgpack_ok: bool) -> bytes:
        builds.append(msgpack_ok)
        return original(self, msgpack_ok)

    monkeypatch.setattr(OutgoingCommand, "_build", counting)
    extended = [make_client(server, f"e{i}", "red") for i in range(5)]
    plain = make_client(server, "plain", "red", use_msgpack=False)

    server.send_all_clients("flag", True, exclude="plain")  # a bool a plain peer could not get
    server.send_group("red", "flag", False, exclude=["plain"])

    assert builds == [True, True]  # one frame per send, for all five
    for client in extended:
        assert client.recv("flag", timeout=5) is True
        assert client.recv("flag", timeout=5) is False
    server.send_all_clients("flag", "end")
    assert plain.recv("flag", timeout=5) == "end"
