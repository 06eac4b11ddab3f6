"""Bodies (PROTOCOL.md section 2): reserved ``$WORD$`` messages and command messages.

Pure tests: every body is built by hand and parsed, every message object is serialised
and compared byte for byte.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hisock_gevent.errors import HandshakeError, MalformedMessage, RemoteProtocolError
from hisock_gevent.messages import (
    CAPABILITY_MSGPACK,
    GETCLT_COMMAND,
    NO_SUCH_CLIENT,
    ChangeGroup,
    ChangeName,
    Command,
    Disconnect,
    GetClient,
    Hello,
    KeepAck,
    KeepAlive,
    PeerJoined,
    PeerLeft,
    UserClose,
    command_body,
    is_reserved_command,
    parse_client_body,
    parse_server_body,
)

pytestmark = pytest.mark.timeout(30)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INFO = {"ip": ["127.0.0.1", 5000], "name": "bob", "group": "g", "ipstr": "127.0.0.1:5000"}


def _json_tail(body: bytes, tag: bytes):
    assert body.startswith(tag), body
    return json.loads(body[len(tag) :])


# ------------------------------------------------------------------ constants


def test_protocol_constants_have_their_wire_values():
    assert CAPABILITY_MSGPACK == "msgpack"
    assert GETCLT_COMMAND == "$GETCLT$"
    assert NO_SUCH_CLIENT == "$NOEXIST$"


def test_parse_errors_are_remote_protocol_errors():
    assert issubclass(MalformedMessage, RemoteProtocolError)
    assert issubclass(HandshakeError, RemoteProtocolError)


# ------------------------------------------------------------------ client -> server: parsing


def test_hello_from_plain_hisock_client_parses_name_and_group():
    msg = parse_client_body(b'$CLTHELLO${"name": "raw", "group": "g"}')
    assert msg == Hello("raw", "g", {})
    assert msg.capabilities == ()


def test_hello_with_null_name_and_group_parses_as_none():
    assert parse_client_body(b'$CLTHELLO${"name": null, "group": null}') == Hello(None, None, {})


def test_hello_without_name_and_group_keys_parses_as_none():
    assert parse_client_body(b"$CLTHELLO${}") == Hello(None, None, {})


def test_hello_keeps_unknown_keys_in_extra():
    msg = parse_client_body(b'$CLTHELLO${"name": "a", "group": "b", "caps": ["msgpack"], "v": 3}')
    assert isinstance(msg, Hello)
    assert (msg.name, msg.group) == ("a", "b")
    assert msg.extra == {"caps": ["msgpack"], "v": 3}
    assert msg.capabilities == ("msgpack",)


def test_hello_capabilities_ignore_non_string_entries_and_non_list_caps():
    msg = parse_client_body(b'$CLTHELLO${"caps": ["msgpack", 5, null]}')
    assert msg.capabilities == ("msgpack",)
    msg = parse_client_body(b'$CLTHELLO${"caps": "msgpack"}')
    assert msg.capabilities == ()


def test_hello_accepts_unicode_name():
    msg = parse_client_body('$CLTHELLO${"name": "Zoë ☃", "group": null}'.encode())
    assert msg.name == "Zoë ☃"


def test_user_close_parses():
    assert parse_client_body(b"$USRCLOSE$") == UserClose()


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"$CHNAME$newname", ChangeName("newname")),
        (b"$CHNAME$", ChangeName("")),
        ("$CHNAME$Zoë".encode(), ChangeName("Zoë")),
        (b"$CHNAME$has $dollar$ in it", ChangeName("has $dollar$ in it")),
        (b"$CHGROUP$g2", ChangeGroup("g2")),
        (b"$CHGROUP$", ChangeGroup("")),
        (b"$KEEPACK$", KeepAck()),
        (b"$KEEPACK$1.2.3.4:5", KeepAck()),  # upstream HiSock appends its address
        (b"$GETCLT$bob", GetClient("bob")),
        (b"$GETCLT$127.0.0.1:5000", GetClient("127.0.0.1:5000")),
    ],
)
def test_reserved_client_message_parses(body, expected):
    assert parse_client_body(body) == expected


# ------------------------------------------------------------------ server -> client: parsing


def test_peer_joined_parses_its_info():
    body = b"$CLTCONN$" + json.dumps(INFO).encode()
    assert parse_server_body(body) == PeerJoined(INFO)


def test_peer_joined_keeps_extra_keys_like_caps():
    info = dict(INFO, caps=["msgpack"])
    msg = parse_server_body(b"$CLTCONN$" + json.dumps(info).encode())
    assert isinstance(msg, PeerJoined)
    assert msg.info["caps"] == ["msgpack"]


def test_peer_left_parses_its_info():
    body = b"$CLTDISCONN$" + json.dumps(INFO).encode()
    assert parse_server_body(body) == PeerLeft(INFO)


def test_disconnect_parses():
    assert parse_server_body(b"$DISCONN$") == Disconnect()


def test_keepalive_parses():
    assert parse_server_body(b"$KEEPALIVE$") == KeepAlive()


@pytest.mark.parametrize(
    "body",
    [b"$CLTHELLO${}", b"$USRCLOSE$", b"$CHNAME$x", b"$CHGROUP$x", b"$KEEPACK$", b"$GETCLT$x"],
)
def test_server_parser_refuses_client_only_tags(body):
    with pytest.raises(MalformedMessage):
        parse_server_body(body)


@pytest.mark.parametrize(
    "body",
    [b"$CLTCONN$" + json.dumps(INFO).encode(), b"$CLTDISCONN$" + json.dumps(INFO).encode(), b"$DISCONN$", b"$KEEPALIVE$"],
)
def test_client_parser_refuses_server_only_tags(body):
    with pytest.raises(MalformedMessage):
        parse_client_body(body)


@pytest.mark.parametrize(
    "body",
    [
        b"$CLTCONN$not json",
        b"$CLTCONN$[1, 2]",
        b'$CLTCONN${"name": "x"}',  # no ip
        b"$CLTCONN$",
        b"$CLTDISCONN$\xff\xfe\x00",
        b"$CLTDISCONN$" + b"[" * 100_000,
    ],
)
def test_server_parser_refuses_bad_client_info(body):
    with pytest.raises(MalformedMessage):
        parse_server_body(body)


# ------------------------------------------------------------------ command messages


def test_command_body_is_byte_exact():
    assert command_body(b"ping", b"2s", b"hi") == b"$CMD$ping$MSG$2       2shi"


def test_command_body_pads_fmt_length_to_eight_bytes():
    assert command_body(b"x", b"d1s2[1i1i]", b"a12") == b"$CMD$x$MSG$10      d1s2[1i1i]a12"
    assert command_body(b"x", b"", b"") == b"$CMD$x$MSG$0       "
    assert command_body(b"x", b"a" * 12345678, b"")[:24] == b"$CMD$x$MSG$12345678aaaaa"


@pytest.mark.parametrize(
    "body, command, fmt, payload",
    [
        (b"$CMD$ping$MSG$2       2shi", "ping", b"2s", b"hi"),
        (b"$CMD$x$MSG$0       ", "x", b"", b""),
        (b"$CMD$x$MSG$10      d1s2[1i1i]a12", "x", b"d1s2[1i1i]", b"a12"),
        (b"$CMD$$MSG$2       2shi", "", b"2s", b"hi"),
        ("$CMD$héllo$MSG$0       ".encode(), "héllo", b"", b""),
        # The payload may contain $MSG$: the command ends at the first one.
        (b"$CMD$x$MSG$2       5s$MSG$", "x", b"5s", b"$MSG$"),
        # A fmt length with leading spaces is still a decimal padded with spaces.
        (b"$CMD$x$MSG$ 2      2shi", "x", b"2s", b"hi"),
    ],
)
def test_command_message_parses_command_fmt_and_payload(body, command, fmt, payload):
    for parse in (parse_client_body, parse_server_body):
        assert parse(body) == Command(command, fmt, payload)


@pytest.mark.parametrize(
    "command",
    ["CMD", "Dog", "Mail", "Done", "C", "M", "D", "$", "$dollar", "$$x", "CMD$MS", "MSG", "CCMMDD$$", "Mail$"],
)
def test_command_starting_with_c_m_d_or_dollar_parses_exactly(command):
    body = b"$CMD$" + command.encode() + b"$MSG$2       2shi"
    for parse in (parse_client_body, parse_server_body):
        msg = parse(body)
        assert isinstance(msg, Command)
        assert msg.command == command
        assert (msg.fmt, msg.payload) == (b"2s", b"hi")


@pytest.mark.parametrize(
    "body",
    [
        b"$CMD$\xff\xfe$MSG$0       ",  # command not utf-8
        b"$CMD$x",  # no $MSG$
        b"$CMD$x$MSG",  # truncated $MSG$
        b"$CMD$",  # nothing at all
        b"$CMD$x$MSG$",  # no fmt length
        b"$CMD$x$MSG$2     ",  # fmt length field shorter than 8 bytes
        b"$CMD$x$MSG$abc     2shi",  # fmt length not decimal
        b"$CMD$x$MSG$        ",  # fmt length all spaces
        b"$CMD$x$MSG$-1      ",
        b"$CMD$x$MSG$+2      2shi",
        b"$CMD$x$MSG$1_0     0123456789",
        b"$CMD$x$MSG$\t2      2shi",
        "$CMD$x$MSG$\u0662      2shi".encode(),  # ARABIC-INDIC DIGIT TWO
        b"$CMD$x$MSG$5       2s",  # fmt length past end of message
        b"$CMD$x$MSG$99999999",
    ],
)
def test_bad_command_message_raises_malformed_message(body):
    for parse in (parse_client_body, parse_server_body):
        with pytest.raises(MalformedMessage):
            parse(body)


# ------------------------------------------------------------------ malformed bodies


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"hello",
        b"$",
        b"$$",
        b"$NOPE$",
        b"$NOPE$payload",
        b"CMD$x$MSG$0       ",  # no leading $
        b"$cmd$x$MSG$0       ",  # tags are case-sensitive
        b"$CLTHELLO",  # tag never closed
        b"$USRCLOSE",
        b" $USRCLOSE$",
        b"$GETCLT$\xff",  # query not utf-8
        b"$CHNAME$\xc3",  # name not utf-8
        b"$CHGROUP$\xed\xa0\x80",  # group is a utf-8-encoded surrogate
    ],
)
def test_unknown_or_broken_client_body_raises_malformed_message(body):
    with pytest.raises(MalformedMessage):
        parse_client_body(body)


@pytest.mark.parametrize("body", [b"", b"hello", b"$", b"$NOPE$", b"$DISCONN", b"$cmd$x$MSG$0       "])
def test_unknown_server_body_raises_malformed_message(body):
    with pytest.raises(MalformedMessage):
        parse_server_body(body)


@pytest.mark.parametrize(
    "body",
    [
        b"$CLTHELLO$",  # empty
        b"$CLTHELLO$not json",
        b"$CLTHELLO${'name': 'single quotes'}",
        b"$CLTHELLO$[1, 2]",  # not an object
        b'$CLTHELLO$"name"',
        b"$CLTHELLO$null",
        b"$CLTHELLO$42",
        b'$CLTHELLO${"name": 5}',
        b'$CLTHELLO${"name": ["x"]}',
        b'$CLTHELLO${"group": true}',
        b'$CLTHELLO${"group": {"a": 1}}',
        b"$CLTHELLO$\xff\xfe\xfd",
        b"$CLTHELLO$" + b"[" * 100_000,  # deep nesting must not escape as RecursionError
        b'$CLTHELLO${"name": "a"}trailing',
    ],
)
def test_bad_hello_raises_handshake_error(body):
    with pytest.raises(HandshakeError):
        parse_client_body(body)


# ------------------------------------------------------------------ to_body


@pytest.mark.parametrize(
    "message, body",
    [
        (UserClose(), b"$USRCLOSE$"),
        (ChangeName("newname"), b"$CHNAME$newname"),
        (ChangeName(""), b"$CHNAME$"),
        (ChangeName("Zoë"), "$CHNAME$Zoë".encode()),
        (ChangeGroup("g2"), b"$CHGROUP$g2"),
        (ChangeGroup(""), b"$CHGROUP$"),
        (KeepAck(), b"$KEEPACK$"),
        (GetClient("bob"), b"$GETCLT$bob"),
        (GetClient("127.0.0.1:5000"), b"$GETCLT$127.0.0.1:5000"),
        (Disconnect(), b"$DISCONN$"),
        (KeepAlive(), b"$KEEPALIVE$"),
        (Command("ping", b"2s", b"hi"), b"$CMD$ping$MSG$2       2shi"),
        (Command("x", b"", b""), b"$CMD$x$MSG$0       "),
        (Command("x", b"d1s2[1i1i]", b"a12"), b"$CMD$x$MSG$10      d1s2[1i1i]a12"),
        (Command("CMD", b"1i", b"7"), b"$CMD$CMD$MSG$2       1i7"),
        (Command("héllo", b"", b""), "$CMD$héllo$MSG$0       ".encode()),
        (Command(GETCLT_COMMAND, b"", b""), b"$CMD$$GETCLT$$MSG$0       "),
    ],
)
def test_to_body_is_byte_exact(message, body):
    assert message.to_body() == body


def test_hello_to_body_is_tag_and_json_object():
    body = Hello("raw", "g").to_body()
    assert _json_tail(body, b"$CLTHELLO$") == {"name": "raw", "group": "g"}


def test_hello_to_body_writes_null_for_missing_name_and_group():
    assert _json_tail(Hello(None, None).to_body(), b"$CLTHELLO$") == {"name": None, "group": None}


def test_hello_to_body_includes_extra_keys():
    body = Hello("a", None, {"caps": ["msgpack"]}).to_body()
    assert _json_tail(body, b"$CLTHELLO$") == {"name": "a", "group": None, "caps": ["msgpack"]}


def test_hello_to_body_is_ascii_or_utf8_json():
    body = Hello("Zoë", "☃").to_body()
    assert _json_tail(body, b"$CLTHELLO$") == {"name": "Zoë", "group": "☃"}


def test_peer_joined_to_body_is_tag_and_info_json():
    assert _json_tail(PeerJoined(INFO).to_body(), b"$CLTCONN$") == INFO


def test_peer_left_to_body_is_tag_and_info_json():
    assert _json_tail(PeerLeft(INFO).to_body(), b"$CLTDISCONN$") == INFO


@pytest.mark.parametrize(
    "message",
    [
        Hello("a", "b"),
        Hello(None, None),
        Hello("a", None, {"caps": ["msgpack"], "x": {"y": [1, 2]}}),
        UserClose(),
        ChangeName("n"),
        ChangeName(""),
        ChangeGroup("g"),
        KeepAck(),
        GetClient("who"),
        Command("Dog", b"l1i2s", b"1ab"),
        Command("$dollar", b"", b""),
    ],
)
def test_client_message_round_trips_through_its_body(message):
    assert parse_client_body(message.to_body()) == message


@pytest.mark.parametrize(
    "message",
    [PeerJoined(INFO), PeerLeft(INFO), Disconnect(), KeepAlive(), Command("Mail", b"2s", b"hi")],
)
def test_server_message_round_trips_through_its_body(message):
    assert parse_server_body(message.to_body()) == message


# ------------------------------------------------------------------ is_reserved_command


@pytest.mark.parametrize("command", ["$GETCLT$", "$x$", "$CLTHELLO$", "a$b$", "$ab$cd", "$$$"])
def test_dollar_wrapped_commands_are_reserved(command):
    assert is_reserved_command(command) is True


@pytest.mark.parametrize("command", ["ping", "CMD", "$ping", "ping$", "$$", "", "a$b", "Mail"])
def test_ordinary_commands_are_not_reserved(command):
    assert is_reserved_command(command) is False


# ------------------------------------------------------------------ fuzz

VALID_CLIENT_BODIES = [
    b'$CLTHELLO${"name": "raw", "group": "g", "caps": ["msgpack"]}',
    b"$USRCLOSE$",
    b"$CHNAME$newname",
    b"$CHGROUP$g2",
    b"$KEEPACK$",
    b"$GETCLT$127.0.0.1:5000",
    b"$CMD$ping$MSG$2       2shi",
    b"$CMD$x$MSG$10      d1s2[1i1i]a12",
]
VALID_SERVER_BODIES = [
    b"$CLTCONN$" + json.dumps(INFO).encode(),
    b"$CLTDISCONN$" + json.dumps(INFO).encode(),
    b"$DISCONN$",
    b"$KEEPALIVE$",
    b"$CMD$$GETCLT$$MSG$4       d1s1sab",
]
TAGS = [b"$CLTHELLO$", b"$USRCLOSE$", b"$CHNAME$", b"$CHGROUP$", b"$KEEPACK$", b"$GETCLT$",
        b"$CLTCONN$", b"$CLTDISCONN$", b"$DISCONN$", b"$KEEPALIVE$", b"$CMD$", b"$MSG$"]
ALL_VALID = VALID_CLIENT_BODIES + VALID_SERVER_BODIES


def _parse_or_protocol_error(parse, body):
    try:
        return parse(body)
    except (MalformedMessage, HandshakeError):
        return None


@st.composite
def mutated_bodies(draw):
    body = bytearray(draw(st.sampled_from(ALL_VALID)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(body), 1)))
        if op == "flip" and body:
            body[pos % len(body)] = draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and body:
            del body[pos % len(body)]
        elif op == "truncate":
            del body[pos:]
        elif op == "splice":
            body[pos:pos] = draw(st.sampled_from(TAGS))
    return bytes(body)


def _check_result(msg, allowed):
    assert msg is None or isinstance(msg, allowed)
    if isinstance(msg, Command):
        assert isinstance(msg.command, str)
        assert isinstance(msg.fmt, bytes) and isinstance(msg.payload, bytes)


CLIENT_TYPES = (Hello, UserClose, ChangeName, ChangeGroup, KeepAck, GetClient, Command)
SERVER_TYPES = (PeerJoined, PeerLeft, Disconnect, KeepAlive, Command)


@FUZZ
@given(body=st.binary(max_size=200))
def test_random_bytes_parse_or_raise_only_protocol_errors(body):
    _check_result(_parse_or_protocol_error(parse_client_body, body), CLIENT_TYPES)
    _check_result(_parse_or_protocol_error(parse_server_body, body), SERVER_TYPES)


@FUZZ
@given(tag=st.sampled_from(TAGS), tail=st.binary(max_size=120))
def test_known_tag_with_random_tail_parses_or_raises_only_protocol_errors(tag, tail):
    body = tag + tail
    _check_result(_parse_or_protocol_error(parse_client_body, body), CLIENT_TYPES)
    _check_result(_parse_or_protocol_error(parse_server_body, body), SERVER_TYPES)


@pytest.mark.slow
@FUZZ
@given(body=mutated_bodies())
def test_mutated_valid_bodies_parse_or_raise_only_protocol_errors(body):
    _check_result(_parse_or_protocol_error(parse_client_body, body), CLIENT_TYPES)
    _check_result(_parse_or_protocol_error(parse_server_body, body), SERVER_TYPES)


@FUZZ
@given(
    command=st.text(max_size=20).filter(lambda c: "$MSG$" not in c),
    fmt=st.binary(max_size=30),
    payload=st.binary(max_size=60),
)
def test_any_command_fmt_and_payload_round_trip_through_command_body(command, fmt, payload):
    try:
        raw = command.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates are not text a peer could send
    body = command_body(raw, fmt, payload)
    for parse in (parse_client_body, parse_server_body):
        assert parse(body) == Command(command, fmt, payload)


@pytest.mark.slow
@FUZZ
@given(
    extra=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("name", "group")),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
            max_leaves=8,
        ),
        max_size=4,
    ),
    name=st.none() | st.text(max_size=10),
    group=st.none() | st.text(max_size=10),
)
def test_any_hello_round_trips_with_its_extra_keys(extra, name, group):
    try:
        body = Hello(name, group, extra).to_body()
    except UnicodeEncodeError:
        return
    assert parse_client_body(body) == Hello(name, group, extra)
