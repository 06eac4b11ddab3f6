"""The wire, byte for byte: raw stdlib sockets against a running hisock_gevent server.

Every peer here is a plain blocking socket that writes and reads the bytes PROTOCOL.md
describes, built by hand (tests/rawpeer.py, not the library's own framing), so
interoperability with HiSock 3.x programs is tested by bytes, not assumed.
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import wait_until
from rawpeer import (
    HEADER_LEN,
    RawPeer,
    as_single,
    cmd_body,
    floats_in,
    hisock_floats,
    split_cmd,
    split_frames,
    wire_frame,
)

import hisock_gevent
from hisock_gevent import ClientNotFound, InvalidTypeCast
from hisock_gevent.typecast import decode

pytestmark = pytest.mark.timeout(30)

READ_TIMEOUT = 5.0
NATIVE_FMT_BYTES = set(b"0123456789sibfltd[](){}")


def same_value(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 != 1.0 != True here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same_value(ka, kb) and same_value(a[ka], b[kb]) for ka, kb in zip(a, b)
        )
    return a == b


def info_json(peer: RawPeer, name: Optional[str], group: Optional[str]) -> Dict[str, Any]:
    return {"ip": [peer.addr[0], peer.addr[1]], "name": name, "group": group, "ipstr": peer.ipstr}


# ------------------------------------------------------------------ handshake


def test_plain_hello_is_answered_with_cltconn_info_and_no_caps(server, raw):
    peer = raw(server)
    peer.send_raw(wire_frame(b'$CLTHELLO${"name": "raw", "group": "g"}'))
    body = peer.read_frame()
    assert body.startswith(b"$CLTCONN$")
    info = json.loads(body[len(b"$CLTCONN$") :])
    host, port = peer.sock.getsockname()
    # Exactly these keys: a plain HiSock client never sees "caps".
    assert info == {"ip": [host, port], "name": "raw", "group": "g", "ipstr": f"{host}:{port}"}


def test_hello_with_msgpack_caps_is_answered_with_caps(server, raw):
    peer = raw(server)
    info = peer.hello_info("raw", "g", caps=["msgpack"])
    assert info["caps"] == ["msgpack"]
    assert info["max_message_size"] == 16 * 1024 * 1024  # limits both sides know
    assert {k: v for k, v in info.items() if k not in ("caps", "max_message_size")} == info_json(peer, "raw", "g")


def test_hello_with_unknown_keys_is_accepted(server, raw):
    peer = raw(server)
    info = peer.hello_info("raw", "g", version="9.9", future={"x": [1, 2]})
    assert info == info_json(peer, "raw", "g")


def test_hello_with_null_name_and_group_joins_without_them(server, raw):
    peer = raw(server)
    assert peer.hello_info(None, None) == info_json(peer, None, None)


def test_hello_sent_byte_by_byte_is_reassembled(server, raw):
    peer = raw(server)
    data = wire_frame(b'$CLTHELLO${"name": "slow", "group": null}')
    for i in range(len(data)):
        peer.send_raw(data[i : i + 1])
    body = peer.read_frame()
    assert json.loads(body[len(b"$CLTCONN$") :]) == info_json(peer, "slow", None)


def test_several_frames_in_one_write_are_all_handled(server, raw, recorder):
    got = recorder()
    server.on("ping")(got)
    peer = raw(server)
    peer.send_raw(
        wire_frame(b'$CLTHELLO${"name": "batch", "group": "g"}')
        + wire_frame(cmd_body("ping", b"1i", b"1"))
        + wire_frame(cmd_body("ping", b"1i", b"2"))
        + wire_frame(b"$GETCLT$batch")
    )
    assert peer.read_frame().startswith(b"$CLTCONN$")
    command, fmt, payload = split_cmd(peer.read_frame())
    assert command == "$GETCLT$" and decode(fmt, payload)["name"] == "batch"
    items = got.wait_for(2)
    assert [content for _client, content in items] == [1, 2]


def test_join_handler_gets_the_clients_info(server, raw, recorder):
    joined = recorder()
    server.on("join")(joined)
    peer = raw(server)
    peer.hello("raw", "g")
    (info,) = joined.wait_for(1)
    assert info.ip == peer.addr
    assert (info.name, info.group) == ("raw", "g")


def test_custom_header_len_is_used_both_ways(make_server, raw):
    srv = make_server(header_len=8)
    srv.start()
    peer = raw(srv, header_len=8)
    assert peer.hello_info("eight", "g") == info_json(peer, "eight", "g")
    _fmt, content = peer.getclt("eight")
    assert content["name"] == "eight"


# ------------------------------------------------------------------ join / leave announcements


def test_existing_client_hears_cltconn_for_a_newcomer(server, raw):
    first = raw(server)
    first.hello("one", "g")
    second = raw(server)
    assert second.hello_info("two", "h") == info_json(second, "two", "h")
    body = first.read_frame()
    assert body.startswith(b"$CLTCONN$")
    assert json.loads(body[len(b"$CLTCONN$") :]) == info_json(second, "two", "h")


def test_usrclose_runs_leave_and_others_hear_cltdisconn(server, raw, recorder):
    left = recorder()
    server.on("leave")(left)
    first = raw(server)
    first.hello("one", "g")
    second = raw(server)
    second.hello("two", "h")
    assert first.read_frame().startswith(b"$CLTCONN$")

    second.send_frame(b"$USRCLOSE$")

    body = first.read_frame()
    assert body.startswith(b"$CLTDISCONN$")
    assert json.loads(body[len(b"$CLTDISCONN$") :]) == info_json(second, "two", "h")
    (info,) = left.wait_for(1)
    assert (info.ip, info.name, info.group) == (second.addr, "two", "h")
    assert second.read_until_eof() == b""
    assert server.get_all_clients(key="name") == ["one"]


def test_closing_the_socket_without_usrclose_also_runs_leave(server, raw, recorder):
    left = recorder()
    server.on("leave")(left)
    first = raw(server)
    first.hello("one", "g")
    second = raw(server)
    second.hello("two", "h")
    assert first.read_frame().startswith(b"$CLTCONN$")

    second.close()

    body = first.read_frame()
    assert body.startswith(b"$CLTDISCONN$")
    assert json.loads(body[len(b"$CLTDISCONN$") :])["name"] == "two"
    assert left.wait_for(1)[0].name == "two"


# ------------------------------------------------------------------ name and group changes


def test_chname_runs_name_change_and_renames_the_client(server, raw, recorder):
    changes = recorder()
    server.on("name_change")(changes)
    peer = raw(server)
    peer.hello("raw", "g")

    peer.send_frame(b"$CHNAME$newname")

    ((client, old, new),) = changes.wait_for(1)
    assert (old, new) == ("raw", "newname")
    assert client.name == "newname" and client.ip == peer.addr
    assert server.get_client("newname").ip == peer.addr
    with pytest.raises(ClientNotFound):
        server.get_client("raw")


def test_empty_chname_returns_to_the_connect_name(server, raw, recorder):
    changes = recorder()
    server.on("name_change")(changes)
    peer = raw(server)
    peer.hello("raw", "g")
    peer.send_frame(b"$CHNAME$newname")
    changes.wait_for(1)

    peer.send_frame(b"$CHNAME$")

    _, (client, old, new) = changes.wait_for(2)
    assert (old, new) == ("newname", "raw")
    assert server.get_client("raw").ip == peer.addr
    with pytest.raises(ClientNotFound):
        server.get_client("newname")


def test_chgroup_runs_group_change_and_moves_the_client(server, raw, recorder):
    changes = recorder()
    server.on("group_change")(changes)
    peer = raw(server)
    peer.hello("raw", "g")

    peer.send_frame(b"$CHGROUP$g2")

    ((client, old, new),) = changes.wait_for(1)
    assert (old, new) == ("g", "g2")
    assert client.group == "g2"
    assert [c.ip for c in server.get_group("g2")] == [peer.addr]
    assert server.get_client("raw").group == "g2"


def test_empty_chgroup_returns_to_the_connect_group(server, raw, recorder):
    changes = recorder()
    server.on("group_change")(changes)
    peer = raw(server)
    peer.hello("raw", "g")
    peer.send_frame(b"$CHGROUP$g2")
    changes.wait_for(1)

    peer.send_frame(b"$CHGROUP$")

    _, (client, old, new) = changes.wait_for(2)
    assert (old, new) == ("g2", "g")
    assert server.get_client("raw").group == "g"


def test_utf8_chname_is_decoded(server, raw, recorder):
    changes = recorder()
    server.on("name_change")(changes)
    peer = raw(server)
    peer.hello("raw", "g")
    peer.send_frame("$CHNAME$Zoë ☃".encode())
    ((_client, _old, new),) = changes.wait_for(1)
    assert new == "Zoë ☃"


# ------------------------------------------------------------------ keepalive


@pytest.fixture
def keepalive_server(make_server):
    srv = make_server(keepalive=True, keepalive_interval=0.2, keepalive_timeout=0.5)
    srv.start()
    return srv


def test_keepalive_is_sent_as_a_normal_frame(keepalive_server, raw):
    peer = raw(keepalive_server)
    peer.hello("raw", "g")
    # read_frame checks the header: an unframed "$KEEPALIVE$" (upstream's bug) fails here.
    assert peer.read_frame(timeout=3) == b"$KEEPALIVE$"


@pytest.mark.slow
@pytest.mark.parametrize("ack_style", ["plain", "upstream_with_address"])
def test_client_answering_keepack_stays_connected_for_many_rounds(keepalive_server, raw, recorder, ack_style):
    left = recorder()
    keepalive_server.on("leave")(left)
    peer = raw(keepalive_server)
    peer.hello("raw", "g")
    ack = b"$KEEPACK$" if ack_style == "plain" else b"$KEEPACK$" + peer.ipstr.encode()
    started = time.monotonic()
    rounds = 0
    # Long enough that a missing ack would have been noticed more than once (0.2 + 0.5 s).
    while rounds < 6 or time.monotonic() - started < 1.5:
        assert peer.read_frame(timeout=3) == b"$KEEPALIVE$"
        peer.send_frame(ack)
        rounds += 1
    assert keepalive_server.get_all_clients(key="name") == ["raw"]
    assert left.items == []
    # Still served: a request gets its answer.
    peer.send_frame(b"$GETCLT$raw")
    body = peer.read_frame_skipping(b"$KEEPALIVE$")
    assert split_cmd(body)[0] == "$GETCLT$"


@pytest.mark.slow
def test_client_not_answering_keepalive_is_dropped(keepalive_server, raw, recorder):
    left = recorder()
    keepalive_server.on("leave")(left)
    peer = raw(keepalive_server)
    peer.hello("silent", "g")

    (info,) = left.wait_for(1, timeout=5)
    assert info.name == "silent" and info.ip == peer.addr

    frames = split_frames(peer.read_until_eof(timeout=5))
    assert frames, "the dropped client was told nothing"
    assert frames[-1] == b"$DISCONN$"
    assert set(frames[:-1]) == {b"$KEEPALIVE$"}
    assert keepalive_server.get_all_clients() == []


@pytest.mark.slow
def test_silent_client_is_dropped_while_answering_one_stays(keepalive_server, raw, recorder):
    left = recorder()
    keepalive_server.on("leave")(left)
    good = raw(keepalive_server)
    good.hello("good", "g")
    silent = raw(keepalive_server)
    silent.hello("silent", "g")

    deadline = time.monotonic() + 5
    heard_left = None
    while heard_left is None:
        assert time.monotonic() < deadline, "the silent client was never dropped"
        body = good.read_frame()
        if body == b"$KEEPALIVE$":
            good.send_frame(b"$KEEPACK$")
        elif body.startswith(b"$CLTDISCONN$"):
            heard_left = json.loads(body[len(b"$CLTDISCONN$") :])
    assert heard_left == info_json(silent, "silent", "g")
    assert [c.name for c in left.wait_for(1)] == ["silent"]
    assert keepalive_server.get_all_clients(key="name") == ["good"]


# ------------------------------------------------------------------ $GETCLT$


def test_getclt_by_name_answers_a_framed_getclt_command(server, raw):
    asker = raw(server)
    asker.hello("asker", "g")
    other = raw(server)
    other.hello("other", "h")

    fmt, content = asker.getclt("other")

    assert set(fmt) <= NATIVE_FMT_BYTES, f"plain peer got a non-native fmt {fmt!r}"
    assert content == {"ip": [other.addr[0], other.addr[1]], "name": "other", "group": "h"}


def test_getclt_by_ip_port_answers_the_same_info(server, raw):
    asker = raw(server)
    asker.hello("asker", "g")
    other = raw(server)
    other.hello("other", "h")

    fmt, content = asker.getclt(other.ipstr)

    assert set(fmt) <= NATIVE_FMT_BYTES
    assert content == {"ip": [other.addr[0], other.addr[1]], "name": "other", "group": "h"}


def test_getclt_for_an_unknown_client_answers_noexist(server, raw):
    peer = raw(server)
    peer.hello("raw", "g")
    peer.send_frame(b"$GETCLT$nobody")
    body = peer.read_frame()
    assert body == cmd_body("$GETCLT$", b"d9s9s", b"traceback$NOEXIST$")
    assert body == b"$CMD$$GETCLT$$MSG$5       d9s9straceback$NOEXIST$"


def test_getclt_for_an_unknown_address_answers_noexist(server, raw):
    peer = raw(server)
    peer.hello("raw", "g")
    _fmt, content = peer.getclt("127.0.0.1:1")
    assert content == {"traceback": "$NOEXIST$"}


def test_getclt_for_client_without_name_gives_plain_peer_a_native_answer(server, raw):
    asker = raw(server)
    asker.hello("asker", "g")
    anonymous = raw(server)
    anonymous.hello(None, None)

    fmt, content = asker.getclt(anonymous.ipstr)

    assert set(fmt) <= NATIVE_FMT_BYTES
    assert content["ip"] == [anonymous.addr[0], anonymous.addr[1]]
    assert content.get("name") is None and content.get("group") is None


def test_getclt_answer_to_msgpack_peer_decodes_to_the_info(server, raw):
    asker = raw(server)
    asker.hello("asker", "g", caps=["msgpack"])
    anonymous = raw(server)
    anonymous.hello(None, "h")

    _fmt, content = asker.getclt(anonymous.ipstr)

    assert content["ip"] == [anonymous.addr[0], anonymous.addr[1]]
    assert content["group"] == "h"
    assert content.get("name") is None


# ------------------------------------------------------------------ $DISCONN$


def test_disconnect_client_sends_disconn_then_closes(server, raw):
    peer = raw(server)
    peer.hello("raw", "g")

    server.disconnect_client("raw")

    assert peer.read_frame() == b"$DISCONN$"
    assert peer.read_until_eof() == b""
    assert server.get_all_clients() == []


def test_disconnect_client_tells_the_others_cltdisconn(server, raw):
    stays = raw(server)
    stays.hello("stays", "g")
    goes = raw(server)
    goes.hello("goes", "g")
    assert stays.read_frame().startswith(b"$CLTCONN$")

    server.disconnect_client("goes")

    body = stays.read_frame()
    assert body.startswith(b"$CLTDISCONN$")
    assert json.loads(body[len(b"$CLTDISCONN$") :]) == info_json(goes, "goes", "g")
    assert goes.read_frame() == b"$DISCONN$"


# ------------------------------------------------------------------ server -> plain peer: the letters


SERVER_TO_PLAIN = [
    ("str", "hi", b"2s", b"hi"),
    ("empty str", "", b"0s", b""),
    ("utf-8 str", "Zoë", b"4s", "Zoë".encode()),
    ("int", 42, b"2i", b"42"),
    ("negative int", -7, b"2i", b"-7"),
    ("zero", 0, b"1i", b"0"),
    ("big int", 10**20, b"21i", b"100000000000000000000"),
    ("bytes", b"\x00\xff$MSG$", b"7b", b"\x00\xff$MSG$"),
    ("float is a big-endian single", 1.5, b"4f", struct.pack(">f", 1.5)),
    ("float 0.1 rounded to a single", 0.1, b"4f", b"\x3d\xcc\xcc\xcd"),
    ("float past the single range", -1e300, b"4f", b"\xff\x80\x00\x00"),
    ("list", [1, "ab"], b"l1i2s", b"1ab"),
    ("tuple", (1, "ab"), b"t1i2s", b"1ab"),
    ("dict", {"a": [1, 2]}, b"d1s2[1i1i]", b"a12"),
    ("empty list", [], b"l", b""),
    ("empty tuple", (), b"t", b""),
    ("empty dict", {}, b"d", b""),
    ("nested tuple and dict", [(1, 2), {"k": "v"}], b"l2(1i1i)2{1s1s}", b"12kv"),
    ("nested dict", {"k": {"x": 1}}, b"d1s2{1s1i}", b"kx1"),
    ("deep list", [[["deep"]]], b"l4[4[4s]]", b"deep"),
    ("float and bytes in list", [1.5, b"z"], b"l4f1b", struct.pack(">f", 1.5) + b"z"),
    ("float key and value", {0.5: -2.0}, b"d4f4f", struct.pack(">f", 0.5) + struct.pack(">f", -2.0)),
    ("int key", {1: "one"}, b"d1i3s", b"1one"),
    ("none", None, b"", b""),
]


@pytest.mark.parametrize(
    "content, fmt, payload", [case[1:] for case in SERVER_TO_PLAIN], ids=[case[0] for case in SERVER_TO_PLAIN]
)
def test_send_client_to_plain_peer_writes_exact_native_bytes(server, raw, content, fmt, payload):
    peer = raw(server)
    peer.hello("raw", "g")

    server.send_client("raw", "x", content)

    body = peer.read_frame()
    assert body == cmd_body("x", fmt, payload)
    # And what a HiSock 3.x peer would rebuild from those bytes is the value sent (its
    # floats rounded to singles, as HiSock always sent them).
    assert same_value(decode(fmt, payload), as_single(content))


def test_send_client_dict_example_from_the_protocol_is_byte_exact(server, raw):
    peer = raw(server)
    peer.hello("raw", "g")
    server.send_client("raw", "x", {"a": [1, 2]})
    assert peer.read_frame() == b"$CMD$x$MSG$10      d1s2[1i1i]a12"


def test_send_client_without_content_writes_empty_fmt(server, raw):
    peer = raw(server)
    peer.hello("raw", "g")
    server.send_client("raw", "ping")
    assert peer.read_frame() == b"$CMD$ping$MSG$0       "


def test_send_all_clients_writes_the_same_bytes_to_every_plain_peer(server, raw):
    one = raw(server)
    one.hello("one", "g")
    two = raw(server)
    two.hello("two", "g")

    server.send_all_clients("x", [1, "ab"])

    expected = cmd_body("x", b"l1i2s", b"1ab")
    assert one.read_frame_skipping(b"$CLTCONN$") == expected
    assert two.read_frame() == expected


def test_send_group_reaches_only_that_groups_plain_peers(server, raw):
    inside = raw(server)
    inside.hello("in", "blue")
    outside = raw(server)
    outside.hello("out", "red")
    assert inside.read_frame().startswith(b"$CLTCONN$")

    server.send_group("blue", "x", "hi")
    server.send_client("out", "marker", None)

    assert inside.read_frame() == cmd_body("x", b"2s", b"hi")
    # The outsider's next frame is the marker sent after the group message.
    assert outside.read_frame() == cmd_body("marker", b"", b"")


def test_command_names_starting_with_c_m_d_are_sent_exactly(server, raw):
    peer = raw(server)
    peer.hello("raw", "g")
    for name in ("CMD", "Dog", "Mail", "$dollar"):
        server.send_client("raw", name, "hi")
    assert [split_cmd(peer.read_frame())[0] for _ in range(4)] == ["CMD", "Dog", "Mail", "$dollar"]


UNSENDABLE_TO_PLAIN = [
    ("bool", True),
    ("None in list", [1, None]),
    ("None as dict value", {"a": None}),
    ("bool in tuple", (False,)),
    ("ClientInfo", hisock_gevent.ClientInfo(("127.0.0.1", 5), "n", "g")),
]


@pytest.mark.parametrize(
    "content", [case[1] for case in UNSENDABLE_TO_PLAIN], ids=[case[0] for case in UNSENDABLE_TO_PLAIN]
)
def test_value_native_letters_cannot_carry_raises_and_sends_nothing(server, raw, content):
    peer = raw(server)
    peer.hello("raw", "g")

    with pytest.raises(InvalidTypeCast):
        server.send_client("raw", "x", content)
    server.send_client("raw", "after", "ok")

    # Nothing was written for the refused message: the next frame is the one sent after it.
    assert peer.read_frame() == cmd_body("after", b"2s", b"ok")


def test_broadcast_a_plain_peer_cannot_receive_reaches_nobody(server, raw):
    modern = raw(server)
    modern.hello("modern", "g", caps=["msgpack"])
    plain = raw(server)
    plain.hello("plain", "g")
    assert modern.read_frame().startswith(b"$CLTCONN$")

    with pytest.raises(InvalidTypeCast):
        server.send_all_clients("x", [True, None])
    server.send_all_clients("after", "ok")

    expected = cmd_body("after", b"2s", b"ok")
    assert modern.read_frame() == expected
    assert plain.read_frame() == expected


def test_msgpack_peer_receives_values_the_letters_cannot_carry(server, raw):
    peer = raw(server)
    peer.hello("modern", "g", caps=["msgpack"])
    server.send_client("modern", "x", {"a": None, "b": [True, (1, 2)]})
    command, fmt, payload = split_cmd(peer.read_frame())
    assert command == "x"
    assert same_value(decode(fmt, payload), {"a": None, "b": [True, (1, 2)]})


# ------------------------------------------------------------------ floats: singles for plain peers


FLOATS_TO_PLAIN = [
    ("top-level", 0.1),
    ("negative top-level", -2.75),
    ("in a list", [0.1, "x", -2.5]),
    ("in a tuple", (1.5, 3)),
    ("dict key and value", {"k": 0.1, 2.5: "v"}),
    ("nested", {"a": [(1.5, [1e-3])], "b": {0.25: 1e300}}),
]


@pytest.mark.parametrize(
    "content", [case[1] for case in FLOATS_TO_PLAIN], ids=[case[0] for case in FLOATS_TO_PLAIN]
)
def test_floats_to_a_plain_peer_unpack_with_hisocks_own_rule(server, raw, content):
    peer = raw(server)
    assert "caps" not in peer.hello_info("raw", "g")  # a plain HiSock hello: no caps offered

    server.send_client("raw", "x", content)

    command, fmt, payload = split_cmd(peer.read_frame())
    assert command == "x" and set(fmt) <= NATIVE_FMT_BYTES
    # struct.unpack("!f", ...) on each float's bytes, as HiSock 3.x does: exactly 4 each.
    assert hisock_floats(fmt, payload) == [as_single(value) for value in floats_in(content)]
    assert same_value(decode(fmt, payload), as_single(content))


def test_float_broadcast_gives_plain_peers_singles_and_extended_peers_exact_doubles(server, raw):
    plain = raw(server)
    plain.hello("plain", "g")
    extended = raw(server)
    assert extended.hello_info("extended", "g", caps=["msgpack"])["caps"] == ["msgpack"]
    assert plain.read_frame().startswith(b"$CLTCONN$")

    server.send_all_clients("x", 0.1)
    server.send_all_clients("y", [0.1, {"k": 0.1}])

    assert plain.read_frame() == cmd_body("x", b"4f", struct.pack(">f", 0.1))
    _, fmt, payload = split_cmd(plain.read_frame())
    assert hisock_floats(fmt, payload) == [as_single(0.1)] * 2
    assert extended.read_frame() == cmd_body("x", b"8f", struct.pack(">d", 0.1))
    _, fmt, payload = split_cmd(extended.read_frame())
    assert fmt == b"m" and same_value(decode(fmt, payload), [0.1, {"k": 0.1}])


class PlainHiSockServer:
    """A HiSock 3.x server made of a listening stdlib socket, for one client.

    It answers the client's hello with the client's ``$CLTCONN$`` (``caps`` in it only if
    given, as a hisock_gevent server would) and queues every body the client sends next.
    """

    def __init__(self, caps: Optional[List[str]] = None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(READ_TIMEOUT)
        self.addr: Tuple[str, int] = self.listener.getsockname()[:2]
        self.caps = caps
        self.hello: Optional[Dict[str, Any]] = None
        self.bodies: queue.Queue[bytes] = queue.Queue()
        self._conn: Optional[socket.socket] = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _recv_exact(self, conn: socket.socket, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = conn.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)

    def _read_body(self, conn: socket.socket) -> bytes:
        return self._recv_exact(conn, int(self._recv_exact(conn, HEADER_LEN)))

    def _serve(self) -> None:
        try:
            conn, address = self.listener.accept()
        except OSError:
            return
        self._conn = conn
        conn.settimeout(READ_TIMEOUT * 2)
        try:
            hello = self._read_body(conn)
            if not hello.startswith(b"$CLTHELLO$"):
                return  # self.hello stays None: the test fails on it
            self.hello = json.loads(hello[len(b"$CLTHELLO$") :])
            info: Dict[str, Any] = {"ip": [address[0], address[1]], "name": self.hello.get("name"),
                                    "group": self.hello.get("group"), "ipstr": f"{address[0]}:{address[1]}"}
            if self.caps is not None:
                info["caps"] = self.caps
            conn.sendall(wire_frame(b"$CLTCONN$" + json.dumps(info).encode()))
            while True:
                self.bodies.put(self._read_body(conn))
        except (OSError, EOFError):
            pass

    def next_command(self, timeout: float = READ_TIMEOUT) -> Tuple[str, bytes, bytes]:
        """(command, fmt, payload) of the next command message the client sent."""
        return split_cmd(self.bodies.get(timeout=timeout))

    def close(self) -> None:
        self.listener.close()
        if self._conn is not None:
            self._conn.close()
        self._thread.join(READ_TIMEOUT)


@pytest.fixture
def plain_server() -> Iterator[Callable[..., PlainHiSockServer]]:
    made: List[PlainHiSockServer] = []

    def factory(caps: Optional[List[str]] = None) -> PlainHiSockServer:
        made.append(PlainHiSockServer(caps))
        return made[-1]

    yield factory
    for fake in made:
        fake.close()


@pytest.mark.parametrize("use_msgpack", [True, False], ids=["offering-msgpack", "plain-client"])
def test_client_writes_four_byte_floats_to_a_plain_hisock_server(plain_server, make_client, use_msgpack):
    fake = plain_server()
    client = make_client(fake.addr, "me", use_msgpack=use_msgpack)
    assert ("caps" in fake.hello) is use_msgpack  # offered or not, the server did not accept it
    assert client.msgpack_ok is False

    sent = [0.1, [0.1, "x", {"k": -2.5, 1.5: (1e300,)}]]
    for value in sent:
        client.send("x", value)

    for value in sent:
        command, fmt, payload = fake.next_command()
        assert command == "x" and set(fmt) <= NATIVE_FMT_BYTES
        assert hisock_floats(fmt, payload) == [as_single(item) for item in floats_in(value)]


def test_client_writes_exact_floats_to_a_server_that_accepts_msgpack(plain_server, make_client):
    fake = plain_server(caps=["msgpack"])
    client = make_client(fake.addr, "me")
    assert client.msgpack_ok is True

    client.send("x", 0.1)
    client.send("x", [0.1, {"k": 1e300}])

    assert fake.next_command() == ("x", b"8f", struct.pack(">d", 0.1))
    _, fmt, payload = fake.next_command()
    assert fmt == b"m" and same_value(decode(fmt, payload), [0.1, {"k": 1e300}])


def test_plain_dialect_client_floats_reach_our_server_as_singles(server, make_client, recorder):
    got = recorder()
    server.on("*")(got)
    client = make_client(server, "plain", use_msgpack=False)

    client.send("x", 0.1)
    client.send("y", [0.1, {"k": 1e300}])

    items = got.wait_for(2)
    assert [(command, content) for _client, command, content in items] == [
        ("x", as_single(0.1)),
        ("y", [as_single(0.1), {"k": float("inf")}]),
    ]


# ------------------------------------------------------------------ plain peer -> server: the letters


CLIENT_TO_SERVER = [
    ("str", b"2s", b"hi", "hi"),
    ("utf-8 str", b"4s", "Zoë".encode(), "Zoë"),
    ("int", b"3i", b"-12", -12),
    ("bytes", b"3b", b"\x00\xff\x01", b"\x00\xff\x01"),
    ("single float", b"4f", struct.pack(">f", 1.5), 1.5),
    ("single float inexact", b"4f", struct.pack(">f", 0.1), struct.unpack(">f", struct.pack(">f", 0.1))[0]),
    ("double float", b"8f", struct.pack(">d", 0.1), 0.1),
    ("list", b"l1i2s", b"1ab", [1, "ab"]),
    ("tuple", b"t1i2s", b"1ab", (1, "ab")),
    ("dict", b"d1s2[1i1i]", b"a12", {"a": [1, 2]}),
    ("nested tuple in dict", b"d1s2(1i1i)", b"a12", {"a": (1, 2)}),
    ("nested dict", b"d1s2{1s1i}", b"kx1", {"k": {"x": 1}}),
    ("single float in list", b"l4f2s", struct.pack(">f", -2.0) + b"ok", [-2.0, "ok"]),
    ("empty list", b"l", b"", []),
    ("none", b"", b"", None),
]


@pytest.mark.parametrize(
    "fmt, payload, expected", [case[1:] for case in CLIENT_TO_SERVER], ids=[case[0] for case in CLIENT_TO_SERVER]
)
def test_plain_peer_command_reaches_handler_with_right_value_and_type(server, raw, recorder, fmt, payload, expected):
    got = recorder()
    server.on("t")(got)
    peer = raw(server)
    peer.hello("raw", "g")

    peer.send_frame(cmd_body("t", fmt, payload))

    ((client, content),) = got.wait_for(1)
    assert client.ip == peer.addr
    assert same_value(content, expected), f"{content!r} is not {expected!r}"


@pytest.mark.parametrize("command", ["CMD", "Dog", "Mail", "Done", "MSG", "$dollar", "C"])
def test_command_starting_with_c_m_d_or_dollar_reaches_its_handler_exactly(server, raw, recorder, command):
    got = recorder()
    wrong = recorder()
    server.on(command)(got)
    server.on("*")(wrong)
    peer = raw(server)
    peer.hello("raw", "g")

    peer.send_frame(cmd_body(command, b"2s", b"hi"))
    peer.send_frame(b"$GETCLT$raw")  # answered after the command was handled
    peer.read_frame()

    ((_client, content),) = got.wait_for(1)
    assert content == "hi"
    assert wrong.items == []


def test_unhandled_command_reaches_catch_all_with_exact_name(server, raw, recorder):
    everything = recorder()
    server.on("*")(everything)
    peer = raw(server)
    peer.hello("raw", "g")
    for name in ("CMD", "Mail", "$dollar", "Dx"):
        peer.send_frame(cmd_body(name, b"1i", b"7"))
    items = everything.wait_for(4)
    assert [(command, content) for _client, command, content in items] == [
        ("CMD", 7),
        ("Mail", 7),
        ("$dollar", 7),
        ("Dx", 7),
    ]


# ------------------------------------------------------------------ port probes and bad peers


def test_port_probe_without_hello_does_not_disturb_the_server(server, raw, recorder):
    joined = recorder()
    server.on("join")(joined)
    for _ in range(3):
        probe = raw(server)
        probe.close()
    half = raw(server)
    half.send_raw(b"12   ")  # half a header, then gone
    half.close()

    peer = raw(server)
    assert peer.hello_info("real", "g") == info_json(peer, "real", "g")
    _fmt, content = peer.getclt("real")

    assert content["name"] == "real"
    assert [info.name for info in joined.wait_for(1)] == ["real"]
    assert server.get_all_clients(key="name") == ["real"]


def _hello(name: str) -> bytes:
    return wire_frame(b'$CLTHELLO${"name": "%s", "group": "g"}' % name.encode())


BAD_BEFORE_HELLO = {
    "non-decimal header": b"+5              hello",
    "hex header": b"0x10            " + b"x" * 16,
    "command before hello": wire_frame(cmd_body("x", b"2s", b"hi")),
    "keepack before hello": wire_frame(b"$KEEPACK$"),
    "unknown tag": wire_frame(b"$WHAT$"),
    "not a message": wire_frame(b"hello there"),
    "hello not json": wire_frame(b"$CLTHELLO$nope"),
    "hello not an object": wire_frame(b'$CLTHELLO$["a"]'),
    "hello name not a string": wire_frame(b'$CLTHELLO${"name": 5, "group": "g"}'),
    "oversize header": b"1000000000000000",
}


@pytest.mark.parametrize("data", list(BAD_BEFORE_HELLO.values()), ids=list(BAD_BEFORE_HELLO))
def test_bad_input_before_hello_closes_only_that_connection(server, raw, recorder, data):
    joined = recorder()
    server.on("join")(joined)
    good = raw(server)
    good.hello("good", "g")

    bad = raw(server)
    bad.send_raw(data)

    assert bad.read_until_eof() == b""
    # The good client is still served and never heard of the bad one.
    _fmt, content = good.getclt("good")
    assert content["name"] == "good"
    assert [info.name for info in joined.wait_for(1)] == ["good"]
    assert server.get_all_clients(key="name") == ["good"]


BAD_AFTER_HELLO = {
    "non-decimal header": b"abcdefghijklmnop",
    "negative header": b"-5              hello",
    "bad fmt": wire_frame(cmd_body("x", b"zz", b"hi")),
    "fmt not matching payload": wire_frame(cmd_body("x", b"5s", b"hi")),
    "bad float size": wire_frame(cmd_body("x", b"3f", b"abc")),
    "fmt length not decimal": wire_frame(b"$CMD$x$MSG$zz      2shi"),
    "no $MSG$": wire_frame(b"$CMD$x"),
    "command not utf-8": wire_frame(cmd_body("x", b"", b"").replace(b"x", b"\xff")),
    "unknown tag": wire_frame(b"$WHAT$"),
    "server-only tag": wire_frame(b"$KEEPALIVE$"),
    "second hello": _hello("again"),
    "oversize header": b"1000000000000000",
}


@pytest.mark.parametrize("data", list(BAD_AFTER_HELLO.values()), ids=list(BAD_AFTER_HELLO))
def test_bad_input_after_hello_closes_only_that_connection(server, raw, recorder, data):
    got = recorder()
    left = recorder()
    server.on("x")(got)
    server.on("leave")(left)
    good = raw(server)
    good.hello("good", "g")
    bad = raw(server)
    bad.hello("bad", "g")
    assert good.read_frame().startswith(b"$CLTCONN$")

    bad.send_raw(data)

    assert bad.read_until_eof() == b""
    body = good.read_frame()
    assert body.startswith(b"$CLTDISCONN$")
    assert json.loads(body[len(b"$CLTDISCONN$") :]) == info_json(bad, "bad", "g")
    assert [info.name for info in left.wait_for(1)] == ["bad"]
    assert got.items == []  # the bad command's handler never ran
    # The good client is still served.
    good.send_frame(cmd_body("x", b"2s", b"ok"))
    assert got.wait_for(1)[0][1] == "ok"
    assert server.get_all_clients(key="name") == ["good"]


def test_oversize_frame_is_refused_before_its_body_is_sent(make_server, raw, recorder):
    left = recorder()
    srv = make_server(max_message_size=1024)
    srv.on("leave")(left)
    srv.start()
    peer = raw(srv)
    peer.hello("big", "g")

    # Only the header of a 1025-byte body: the server must not wait for the body.
    peer.send_raw(b"1025            ")

    assert peer.read_until_eof(timeout=3) == b""
    assert [info.name for info in left.wait_for(1)] == ["big"]


def test_frame_of_exactly_max_message_size_is_accepted(make_server, raw, recorder):
    got = recorder()
    srv = make_server(max_message_size=1024)
    srv.on("x")(got)
    srv.start()
    peer = raw(srv)
    peer.hello("big", "g")
    prefix = cmd_body("x", b"1000b", b"")
    payload = b"z" * (1024 - len(prefix))
    body = cmd_body("x", b"%db" % len(payload), payload)
    assert len(body) == 1024

    peer.send_frame(body)

    assert got.wait_for(1)[0][1] == payload


# ------------------------------------------------------------------ more handshake and connection edges


def test_hello_with_a_space_after_the_tag_is_accepted(server, raw):
    # Older HiSock clients wrote f"$CLTHELLO$ {json.dumps(hello)}".
    peer = raw(server)
    peer.send_frame(b'$CLTHELLO$ {"name": "old", "group": "g"}')
    body = peer.read_frame()
    assert json.loads(body[len(b"$CLTCONN$") :]) == info_json(peer, "old", "g")


def test_caps_are_never_announced_to_other_clients(server, raw):
    plain = raw(server)
    plain.hello("plain", "g")
    modern = raw(server)
    assert modern.hello_info("modern", "g", caps=["msgpack"])["caps"] == ["msgpack"]
    body = plain.read_frame()
    assert json.loads(body[len(b"$CLTCONN$") :]) == info_json(modern, "modern", "g")


def test_silence_past_the_handshake_timeout_closes_the_connection(make_server, raw, recorder):
    joined = recorder()
    srv = make_server(handshake_timeout=0.3)
    srv.on("join")(joined)
    srv.start()
    silent = raw(srv)
    half = raw(srv)
    half.send_raw(wire_frame(b'$CLTHELLO${"name": "half"')[:-4])

    assert silent.read_until_eof(timeout=3) == b""
    assert half.read_until_eof(timeout=3) == b""
    assert joined.items == []
    assert srv.get_all_clients() == []


def test_client_over_max_connections_gets_framed_disconn_and_no_join(make_server, raw, recorder):
    joined = recorder()
    srv = make_server(max_connections=1)
    srv.on("join")(joined)
    srv.start()
    first = raw(srv)
    first.hello("first", "g")

    second = raw(srv)
    assert second.read_frame() == b"$DISCONN$"
    assert second.read_until_eof() == b""
    assert [info.name for info in joined.wait_for(1)] == ["first"]
    assert srv.get_all_clients(key="name") == ["first"]


def test_force_disconnect_closes_without_disconn(server, raw):
    peer = raw(server)
    peer.hello("raw", "g")
    server.disconnect_client("raw", force=True)
    assert peer.read_until_eof() == b""
    assert server.get_all_clients() == []


def test_disconnect_client_with_call_func_runs_leave(server, raw, recorder):
    left = recorder()
    server.on("leave")(left)
    peer = raw(server)
    peer.hello("raw", "g")
    server.disconnect_client("raw", call_func=True)
    assert peer.read_frame() == b"$DISCONN$"
    assert [info.name for info in left.wait_for(1)] == ["raw"]


def test_connection_closed_mid_frame_runs_leave(server, raw, recorder):
    left = recorder()
    server.on("leave")(left)
    peer = raw(server)
    peer.hello("raw", "g")
    peer.send_raw(b"100             only part of the body")
    peer.close()
    assert [info.name for info in left.wait_for(1)] == ["raw"]
    wait_until(lambda: server.get_all_clients() == [])


def test_half_closed_client_has_its_last_command_handled_then_leaves(server, raw, recorder):
    got = recorder()
    left = recorder()
    server.on("x")(got)
    server.on("leave")(left)
    peer = raw(server)
    peer.hello("raw", "g")
    peer.send_frame(cmd_body("x", b"4s", b"last"))
    peer.sock.shutdown(socket.SHUT_WR)
    assert got.wait_for(1)[0][1] == "last"
    assert [info.name for info in left.wait_for(1)] == ["raw"]


# ------------------------------------------------------------------ segmentation independence


def test_valid_frames_before_a_bad_header_in_one_write_are_still_handled(server, raw, recorder):
    """The same bytes must mean the same thing however TCP happens to cut them.

    Sent in separate writes, the hello joins and the command runs before the garbage
    closes the connection; sent in one write, they must too.
    """
    joined = recorder()
    got = recorder()
    server.on("join")(joined)
    server.on("x")(got)
    peer = raw(server)
    peer.send_raw(
        wire_frame(b'$CLTHELLO${"name": "raw", "group": null}')
        + wire_frame(cmd_body("x", b"2s", b"hi"))
        + b"garbage!garbage!"
    )
    peer.read_until_eof()  # the garbage still closes the connection
    assert [info.name for info in joined.wait_for(1, timeout=2)] == ["raw"]
    assert got.wait_for(1, timeout=2)[0][1] == "hi"


# ------------------------------------------------------------------ frames the server cannot build


def test_hello_whose_announcement_does_not_fit_the_header_leaves_no_ghost_client(make_server, raw):
    """header_len 3 allows 999-byte bodies: this hello fits, its $CLTCONN$ answer does not."""
    srv = make_server(header_len=3)
    srv.start()
    other = raw(srv, header_len=3)
    other.hello("other", None)
    peer = raw(srv, header_len=3)
    peer.send_frame(b"$CLTHELLO$" + json.dumps({"name": "x" * 960, "group": None}).encode())

    peer.read_until_eof()

    # Whatever the server decides about such a client, once its connection is closed it
    # must not stay listed as connected.
    wait_until(lambda: srv.get_all_clients(key="name") == ["other"], timeout=2)


def test_leave_runs_for_a_client_whose_info_no_longer_fits_the_header(make_server, raw, recorder):
    left = recorder()
    srv = make_server(header_len=3)
    srv.on("leave")(left)
    srv.start()
    stays = raw(srv, header_len=3)
    stays.hello("stays", None)
    goes = raw(srv, header_len=3)
    goes.hello("goes", None)

    goes.send_frame(b"$CHNAME$" + b"y" * 980)  # fits a frame; a $CLTDISCONN$ with it does not
    goes.send_frame(b"$USRCLOSE$")

    assert [info.ip for info in left.wait_for(1, timeout=2)] == [goes.addr]
    wait_until(lambda: srv.get_all_clients(key="name") == ["stays"], timeout=2)


def test_getclt_answer_too_long_for_the_header_does_not_disconnect_the_asker(make_server, raw, recorder):
    got = recorder()
    srv = make_server(header_len=3, max_name_length=1000)
    srv.on("x")(got)
    srv.start()
    asker = raw(srv, header_len=3)
    asker.hello("asker", None)
    long = raw(srv, header_len=3)
    long.hello("long", None)
    assert asker.read_frame().startswith(b"$CLTCONN$")
    long.send_raw(wire_frame(b"$CHNAME$" + b"y" * 980, 3))
    wait_until(lambda: srv.get_client(long.ipstr).name != "long", timeout=3)

    asker.send_frame(b"$GETCLT$" + long.ipstr.encode())  # the answer cannot be framed
    asker.send_frame(cmd_body("x", b"2s", b"ok"))

    # The asker did nothing wrong: it must stay connected and be served.
    assert got.wait_for(1, timeout=2)[0][1] == "ok"
    assert "asker" in srv.get_all_clients(key="name")
