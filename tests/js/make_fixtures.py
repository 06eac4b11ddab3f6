"""Byte vectors from the Python library, for the JavaScript client's tests (tests/js/).

Run ``python tests/js/make_fixtures.py`` to rewrite ``tests/js/fixtures.json``;
tests/test_js_client.py regenerates it in memory and fails when the committed file differs,
so the vectors cannot drift from hisock_gevent's typecast, messages and frames.

Values are described in tagged JSON that JavaScript can rebuild exactly: ``{"t": "int",
"v": "123"}`` (digits, so no precision is lost), ``{"t": "float", "v": "<8-byte big-endian
hex>"}`` (NaN, infinities and -0.0 included), ``{"t": "bytes", "v": "<hex>"}``, ``{"t":
"dict", "v": [[key, value], ...]}`` (key types kept), ``{"t": "tuple", ...}``,
``{"t": "clientinfo", "v": [host, port, name, group]}`` and so on.

Sections of the file:

* ``content``: ``value`` encoded in a dialect by ``typecast.encode`` -> ``fmt``/``payload``
  hex, and ``decoded``, what ``typecast.decode`` makes of those bytes.  JavaScript must
  decode the bytes to ``decoded`` and encode ``value`` to the same bytes.
* ``decode_only``: bytes a sender other than hisock_gevent's encoder may produce (leading
  zeros, 4-byte floats, other msgpack forms) with what Python decodes them to.
* ``refused``: values ``encode`` refuses in that dialect (JavaScript must refuse them too).
* ``malformed``: fmt/payload pairs ``decode`` refuses.
* ``messages``: message objects and their bodies, both directions; ``malformed_bodies``:
  bodies the parsers refuse.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import msgpack

from hisock_gevent import typecast
from hisock_gevent.errors import InvalidTypeCast, MalformedPayload, RemoteProtocolError
from hisock_gevent.messages import (
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
    parse_client_body,
    parse_server_body,
)
from hisock_gevent.utils import ClientInfo

FIXTURES = Path(__file__).with_name("fixtures.json")

ALICE = ClientInfo(("127.0.0.1", 50000), "alice", "lobby")
NAMELESS = ClientInfo(("10.0.0.2", 1), None, None)


def describe(value: Any) -> Dict[str, Any]:
    """Tagged JSON for a decoded or Sendable Python value (see the module docstring)."""
    if value is None:
        return {"t": "none"}
    if isinstance(value, bool):
        return {"t": "bool", "v": value}
    if isinstance(value, int):
        return {"t": "int", "v": _digits(value)}
    if isinstance(value, float):
        return {"t": "float", "v": struct.pack(">d", value).hex()}
    if isinstance(value, str):
        return {"t": "str", "v": value}
    if isinstance(value, (bytes, bytearray)):
        return {"t": "bytes", "v": bytes(value).hex()}
    if isinstance(value, list):
        return {"t": "list", "v": [describe(item) for item in value]}
    if isinstance(value, tuple):
        return {"t": "tuple", "v": [describe(item) for item in value]}
    if isinstance(value, dict):
        return {"t": "dict", "v": [[describe(k), describe(v)] for k, v in value.items()]}
    if isinstance(value, ClientInfo):
        return {"t": "clientinfo", "v": [value.ip[0], value.ip[1], value.name, value.group]}
    raise TypeError(f"cannot describe {value!r}")


def _digits(number: int) -> str:
    """``str(number)`` even past Python's 4300-digit conversion limit (for the refused cases)."""
    get_limit = getattr(sys, "get_int_max_str_digits", None)
    if get_limit is None:  # a Python without the limit
        return str(number)
    limit = get_limit()
    sys.set_int_max_str_digits(0)
    try:
        return str(number)
    finally:
        sys.set_int_max_str_digits(limit)


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _ext(code: int, data: bytes) -> bytes:
    """A msgpack ext of type ``code`` holding ``data``, in msgpack-python's own framing."""
    return bytes(msgpack.packb(msgpack.ExtType(code, data)))


def _nested_tuple_ext(depth: int) -> bytes:
    """``depth`` tuples one inside the other (the innermost empty), as msgpack ext type 1."""
    value = msgpack.ExtType(typecast.EXT_TUPLE, msgpack.packb([]))
    for _ in range(depth - 1):
        value = msgpack.ExtType(typecast.EXT_TUPLE, msgpack.packb([value]))
    return bytes(msgpack.packb(value))


#: (name, value): each is encoded in every dialect that accepts it.
VALUES: List[Tuple[str, Any]] = [
    ("none", None),
    ("str", "hi"),
    ("str-empty", ""),
    ("str-non-ascii", "Zoë"),
    ("str-astral", "a😀b"),
    ("str-nul", "a\x00b"),
    ("str-bom", "\ufeffbom"),
    ("str-msg-marker", "$MSG$ and $CMD$"),
    ("str-long", "x" * 300),
    ("int-zero", 0),
    ("int-negative", -42),
    ("int-127", 127),
    ("int-128", 128),
    ("int-255", 255),
    ("int-256", 256),
    ("int-65535", 65535),
    ("int-65536", 65536),
    ("int-2^31-1", 2**31 - 1),
    ("int-2^31", 2**31),
    ("int-2^32-1", 2**32 - 1),
    ("int-2^32", 2**32),
    ("int-minus-32", -32),
    ("int-minus-33", -33),
    ("int-minus-128", -128),
    ("int-minus-129", -129),
    ("int-minus-32768", -32768),
    ("int-minus-32769", -32769),
    ("int-minus-2^31", -(2**31)),
    ("int-minus-2^31-1", -(2**31) - 1),
    ("int-max-safe", 2**53 - 1),
    ("int-min-safe", -(2**53 - 1)),
    ("int-2^53", 2**53),
    ("int-minus-2^53", -(2**53)),
    ("int-2^63-1", 2**63 - 1),
    ("int-minus-2^63", -(2**63)),
    ("int-2^64-1", 2**64 - 1),
    ("int-2^64", 2**64),
    ("int-minus-2^63-1", -(2**63) - 1),
    ("int-googol", 10**100),
    ("int-4300-digits", 10**4300 - 1),
    ("bytes", b"\x00\xff"),
    ("bytes-empty", b""),
    ("bytes-long", bytes(range(256)) + b"\x01" * 44),
    ("float-half", 0.5),
    ("float-tenth", 0.1),
    ("float-21.5", 21.5),
    ("float-integral", 2.0),
    ("float-minus-zero", -0.0),
    ("float-1e20", 1e20),
    ("float-huge", 1e300),
    ("float-minus-huge", -1e300),
    ("float-single-max", float(struct.unpack(">f", b"\x7f\x7f\xff\xff")[0])),
    ("float-rounds-to-single-max", float(struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]) + 2.0**102),
    ("float-past-single-max", float(struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]) + 2.0**103),
    ("float-tiny", 1e-320),
    ("float-minus-tiny", -1e-320),
    ("float-inf", math.inf),
    ("float-minus-inf", -math.inf),
    ("float-nan", math.nan),
    ("bool-true", True),
    ("bool-false", False),
    ("clientinfo", ALICE),
    ("clientinfo-nameless", NAMELESS),
    ("list-empty", []),
    ("list-of-empty-list", [[]]),
    ("dict-empty", {}),
    ("tuple-empty", ()),
    ("list", [1, "ab"]),
    ("tuple", (1, "ab")),
    ("dict", {"a": [1, 2]}),
    ("list-with-tuple", [1, (2, 3)]),
    ("dict-in-dict", {"k": {"x": 1}}),
    ("list-deep", [[["deep"]]]),
    ("list-floats", [0.5, 0.1, -2.5, 2.0, 1e300]),
    ("list-bytes", [b"\x00", b"", "s"]),
    ("list-big-ints", [2**53, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**30]),
    ("list-small-ints", [0, 1, -1, 127, 128, -32, -33, 255, 256, 65535, 65536, 2**32 - 1, 2**32]),
    ("list-16", list(range(16))),
    ("dict-16", {f"k{i:02}": i for i in range(16)}),
    ("dict-int-keys", {1: "a", 2: "b"}),
    ("dict-mixed-keys", {"s": 1, 2: "i", 2.5: "f", b"k": "b", (1, 2): "t"}),
    ("dict-tuple-in-tuple-key", {(1, (2, "x")): [1]}),
    ("dict-str-key-after-int", {3: "three", "a": "A"}),
    ("dict-proto-key", {"__proto__": 1, "b": 2}),
    ("dict-repeated-shapes", {"a": {"a": {"a": {}}}}),
    ("tuple-nested", ((1, 2), (3, (4, ())))),
    ("tuple-holding-dict", ({"a": (1,)}, [()])),
    ("list-none-bool", [None, True, False]),
    ("dict-none-value", {"x": None}),
    ("dict-none-key", {None: 1, True: 2}),
    ("list-clientinfo", [ALICE, NAMELESS]),
    ("dict-clientinfo-key", {ALICE: "alice"}),
    ("list-nested-64", nested(64)),
    ("tuple-at-depth-64", [nested(62, ())]),
]

#: (name, fmt, payload): valid input hisock_gevent's encoder does not write itself.
DECODE_ONLY: List[Tuple[str, bytes, bytes]] = [
    ("len-leading-zeros", b"002s", b"hi"),
    ("len-leading-zeros-in-list", b"l01i002s", b"1ab"),
    ("int-leading-zeros", b"3i", b"007"),
    ("int-minus-zero", b"2i", b"-0"),
    ("int-long-leading-zeros", b"20i", b"00000000000000000042"),
    ("int-16-digits", b"16i", b"9007199254740993"),
    ("single-top-level", b"4f", struct.pack(">f", 21.5)),
    ("double-in-list", b"l8f", struct.pack(">d", 0.1)),
    ("msgpack-float32", b"m", b"\xca" + struct.pack(">f", 0.1)),
    ("msgpack-uint64-small", b"m", b"\xcf" + (5).to_bytes(8, "big")),
    ("msgpack-int64-small", b"m", b"\xd3" + (-5).to_bytes(8, "big", signed=True)),
    ("msgpack-bigint-ext-small", b"m", b"\xd4\x03" + b"7"),
    ("msgpack-bigint-ext-minus", b"m", b"\xc7\x05\x03" + b"-0042"),
    ("msgpack-tuple-ext16", b"m", b"\xc8\x00\x03\x01\x92\x01\x02"),
    ("msgpack-tuple-fixext4", b"m", b"\xd6\x01\x93\x01\x02\x03"),
    ("msgpack-str-as-bin8-header", b"m", b"\xd9\x02hi"),
    ("msgpack-timestamp32", b"m", b"\xd6\xff" + (1_700_000_000).to_bytes(4, "big")),
    ("msgpack-timestamp64", b"m", b"\xd7\xff" + ((500_000_000 << 34) | 1_700_000_000).to_bytes(8, "big")),
    ("msgpack-repeated-key", b"m", b"\x82\xa1a\x01\xa1a\x02"),
    ("msgpack-map16-small", b"m", b"\xde\x00\x01\xa1a\x01"),
    ("msgpack-array32", b"m", b"\xdd\x00\x00\x00\x01\x01"),
    ("msgpack-proto-key", b"m", b"\x81\xa9__proto__\x01"),
    ("msgpack-float-key", b"m", b"\x81\xcb" + struct.pack(">d", 1.5) + b"\x01"),
    ("msgpack-bin-key", b"m", b"\x81\xc4\x01k\x01"),
    ("msgpack-clientinfo-uint64-port", b"m", _ext(2, b"\x94\xa1h\xcf" + (80).to_bytes(8, "big") + b"\xc0\xc0")),
    ("dict-repeated-key", b"d1s1i1s1i", b"a1a2"),
]

#: (name, value, dialect) that encode refuses.
REFUSED: List[Tuple[str, Any, str]] = [
    ("none-in-list-plain", [None], "plain"),
    ("bool-in-dict-plain", {"a": False}, "plain"),
    ("clientinfo-in-tuple-plain", (ALICE,), "plain"),
    ("none-key-plain", {None: 1}, "plain"),
    ("nested-65-plain", nested(65), "plain"),
    ("nested-65-extended", nested(65), "extended"),
    ("tuple-at-depth-65-extended", [nested(63, ())], "extended"),
    ("int-4301-digits-plain", 10**4301 - 1, "plain"),
    ("int-4301-digits-extended", [10**4301 - 1], "extended"),
]


#: (name, fmt, payload) that decode refuses.
MALFORMED: List[Tuple[str, bytes, bytes]] = [
    ("none-with-payload", b"", b"x"),
    ("len-mismatch", b"3s", b"ab"),
    ("no-len", b"s", b""),
    ("unknown-letter", b"2x", b"ab"),
    ("unknown-letter-in-list", b"l2x", b"ab"),
    ("len-with-sign", b"+2s", b"ab"),
    ("len-with-space", b" 2s", b"ab"),
    ("len-20-digits", b"00000000000000000002s", b"ab"),
    ("len-20-digits-in-list", b"l00000000000000000002s", b"ab"),
    ("fmt-not-ascii", b"l1s\xc3\xa9", b"a"),
    ("single-not-ascii", b"\xd9s", b""),
    ("str-not-utf8", b"1s", b"\xff"),
    ("str-surrogate-utf8", b"3s", b"\xed\xa0\x80"),
    ("str-overlong-utf8", b"2s", b"\xc0\xaf"),
    ("int-empty", b"0i", b""),
    ("int-plus", b"2i", b"+1"),
    ("int-space", b"2i", b" 1"),
    ("int-underscore", b"3i", b"1_0"),
    ("int-minus-only", b"1i", b"-"),
    ("int-float-text", b"3i", b"1.5"),
    ("int-non-ascii-digit", b"2i", "٣".encode()),
    ("int-4301-digits", b"4301i", b"9" * 4301),
    ("float-3-bytes", b"3f", b"abc"),
    ("float-3-bytes-in-list", b"l3f", b"abc"),
    ("payload-longer", b"l1i", b"12"),
    ("len-past-end", b"l2i", b"1"),
    ("container-len-mismatch", b"l2[1i]", b"12"),
    ("container-len-past-end", b"l3[1i]", b"1"),
    ("container-open", b"l1[1i", b"1"),
    ("closer-mismatch", b"l1[1i)", b"1"),
    ("closer-with-len", b"l1[1i1]", b"1"),
    ("closer-at-top", b"l]", b""),
    ("ends-with-len", b"l1i1", b"1"),
    ("dict-odd-items", b"d1s", b"a"),
    ("dict-list-key", b"d0[]1s", b"a"),
    ("dict-dict-key", b"d0{}1s", b"a"),
    ("dict-tuple-with-list-key", b"d0(0[])1s", b"a"),
    ("nested-65", b"l" + b"0[" * 64 + b"]" * 64, b""),
    ("msgpack-trailing", b"m", b"\x01\x02"),
    ("msgpack-truncated", b"m", b"\x92\x01"),
    ("msgpack-empty", b"m", b""),
    ("msgpack-never-used-byte", b"m", b"\xc1"),
    ("msgpack-str-not-utf8", b"m", b"\xa1\xff"),
    ("msgpack-key-not-utf8", b"m", b"\x81\xa1\xff\x01"),
    ("msgpack-unknown-ext", b"m", b"\xd4\x05\x00"),
    ("msgpack-tuple-not-array", b"m", b"\xd4\x01\x05"),
    ("msgpack-tuple-trailing", b"m", b"\xd5\x01\x90\x01"),
    ("msgpack-clientinfo-3-fields", b"m", _ext(2, b"\x93\xa1h\x01\xc0")),
    ("msgpack-clientinfo-port-str", b"m", _ext(2, b"\x94\xa1h\xa1p\xc0\xc0")),
    ("msgpack-clientinfo-port-range", b"m", _ext(2, b"\x94\xa1h\xce\x00\x01\x00\x00\xc0\xc0")),
    ("msgpack-clientinfo-port-bool", b"m", _ext(2, b"\x94\xa1h\xc3\xc0\xc0")),
    ("msgpack-clientinfo-name-int", b"m", _ext(2, b"\x94\xa1h\x01\x01\xc0")),
    ("msgpack-clientinfo-holds-ext", b"m", _ext(2, b"\x94\xa1h\x01\xd4\x037\xc0")),
    ("msgpack-clientinfo-holds-timestamp", b"m", _ext(2, b"\x94\xa1h\x01\xd6\xff\x00\x00\x00\x01\xc0")),
    ("msgpack-bigint-not-digits", b"m", b"\xd5\x03" + b"1x"),
    ("msgpack-bigint-empty", b"m", b"\xc7\x00\x03"),
    ("msgpack-bigint-plus", b"m", b"\xd5\x03" + b"+1"),
    ("msgpack-list-key", b"m", b"\x81\x90\x01"),
    ("msgpack-map-key", b"m", b"\x81\x80\x01"),
    ("msgpack-tuple-with-list-key", b"m", b"\x81\xd5\x01\x91\x90\x01"),
    ("msgpack-nested-65", b"m", b"\x91" * 64 + b"\x90"),
    ("msgpack-tuple-nested-65", b"m", _nested_tuple_ext(65)),
    ("msgpack-timestamp-bad-length", b"m", b"\xd5\xff\x00\x00"),
]


INFO_BOB = {"ip": ["127.0.0.1", 50002], "name": "bob", "group": None, "ipstr": "127.0.0.1:50002"}
INFO_ZOE = {"ip": ["::1", 7], "name": "Zoë", "group": "ü", "ipstr": "::1:7"}

#: (name, direction, message object).  "to_server" bodies are parsed by parse_client_body.
MESSAGES: List[Tuple[str, str, Any]] = [
    ("hello-plain", "to_server", Hello("bob", None)),
    ("hello-extended", "to_server", Hello("alice", "lobby", {"caps": ["msgpack", "call"], "auth": "s3cret"})),
    ("hello-nameless", "to_server", Hello(None, None, {"caps": ["msgpack", "call"]})),
    ("hello-non-ascii", "to_server", Hello("Zoë", "😀", {"caps": ["msgpack", "call"], "auth": {"k": ["ü", 1]}})),
    ("usrclose", "to_server", UserClose()),
    ("chname", "to_server", ChangeName("carol")),
    ("chname-reset", "to_server", ChangeName("")),
    ("chname-non-ascii", "to_server", ChangeName("Zoë")),
    ("chgroup", "to_server", ChangeGroup("red")),
    ("chgroup-reset", "to_server", ChangeGroup("")),
    ("keepack", "to_server", KeepAck()),
    ("getclt-name", "to_server", GetClient("alice")),
    ("getclt-address", "to_server", GetClient("127.0.0.1:50000")),
    ("command-to-server", "to_server", Command("say", b"2s", b"hi")),
    ("command-none-to-server", "to_server", Command("ping", b"", b"")),
    ("cltconn", "to_client", PeerJoined(INFO_BOB)),
    ("cltconn-answer", "to_client", PeerJoined({**ALICE.as_dict(), "ip": ["127.0.0.1", 50000], "caps": ["msgpack", "call"]})),
    ("cltconn-non-ascii", "to_client", PeerJoined(INFO_ZOE)),
    ("cltdisconn", "to_client", PeerLeft(INFO_BOB)),
    ("disconn", "to_client", Disconnect()),
    ("disconn-reason", "to_client", Disconnect({"reason": "authentication failed"})),
    ("keepalive", "to_client", KeepAlive()),
    ("command-to-client", "to_client", Command("temp", b"8f", struct.pack(">d", 0.1))),
    ("command-dollar-to-client", "to_client", Command("a$b", b"1i", b"1")),
    ("getclt-answer", "to_client", Command("$GETCLT$", *typecast.encode({"ip": ("127.0.0.1", 50002), "name": "bob", "group": None}, msgpack_ok=True))),
    ("getclt-noexist", "to_client", Command("$GETCLT$", *typecast.encode({"traceback": "$NOEXIST$"}))),
]

#: Bodies that parse as something, though hisock_gevent never sends them so.
LENIENT_BODIES: List[Tuple[str, str, bytes]] = [
    ("disconn-garbage", "to_client", b"$DISCONN$not json"),
    ("disconn-array", "to_client", b"$DISCONN$[1]"),
    ("cltconn-extra-keys", "to_client", b'$CLTCONN${"ip":["h",1],"x":[1]}'),
    ("command-fmt-len-leading-spaces", "to_client", b"$CMD$x$MSG$  2     hi"),
    ("command-fmt-len-leading-zeros", "to_client", b"$CMD$x$MSG$02      2shi"),
    ("hello-spaces", "to_server", b'$CLTHELLO$ { "name" : "a" , "caps" : 5 }'),
    ("keepack-address", "to_server", b"$KEEPACK$127.0.0.1:5"),
]

#: (name, direction, body) the parser for that direction refuses.
MALFORMED_BODIES: List[Tuple[str, str, bytes]] = [
    ("empty", "to_client", b""),
    ("no-dollar", "to_client", b"hello"),
    ("unclosed-tag", "to_client", b"$CLTCONN"),
    ("unknown-tag", "to_client", b"$NOPE$"),
    ("lowercase-tag", "to_client", b"$keepalive$"),
    ("client-tag-to-client", "to_client", b"$CHNAME$x"),
    ("server-tag-to-server", "to_server", b"$KEEPALIVE$"),
    ("command-no-msg", "to_client", b"$CMD$say"),
    ("command-no-fmt-len", "to_client", b"$CMD$say$MSG$"),
    ("command-short-fmt-len", "to_client", b"$CMD$say$MSG$2"),
    ("command-fmt-len-not-number", "to_client", b"$CMD$say$MSG$x       "),
    ("command-fmt-len-inner-space", "to_client", b"$CMD$say$MSG$1 1     "),
    ("command-fmt-len-plus", "to_client", b"$CMD$say$MSG$+2      2s"),
    ("command-fmt-runs-past", "to_client", b"$CMD$say$MSG$5       ab"),
    ("command-not-utf8", "to_client", b"$CMD$\xff$MSG$0       "),
    ("cltconn-not-json", "to_client", b"$CLTCONN$nope"),
    ("cltconn-array", "to_client", b"$CLTCONN$[]"),
    ("cltconn-no-ip", "to_client", b'$CLTCONN${"name":"a"}'),
    ("cltconn-ip-bool-port", "to_client", b'$CLTCONN${"ip":["h",true]}'),
    ("cltconn-ip-three", "to_client", b'$CLTCONN${"ip":["h",1,2]}'),
    ("cltconn-ip-int-host", "to_client", b'$CLTCONN${"ip":[1,1]}'),
    ("cltconn-name-int", "to_client", b'$CLTCONN${"ip":["h",1],"name":5}'),
    ("cltdisconn-group-list", "to_client", b'$CLTDISCONN${"ip":["h",1],"group":[]}'),
    ("cltconn-not-utf8", "to_client", b'$CLTCONN${"ip":["\xff",1]}'),
    ("hello-not-json", "to_server", b"$CLTHELLO$hi"),
    ("hello-array", "to_server", b"$CLTHELLO$[]"),
    ("hello-name-int", "to_server", b'$CLTHELLO${"name":5}'),
    ("hello-group-list", "to_server", b'$CLTHELLO${"group":[]}'),
    ("chname-not-utf8", "to_server", b"$CHNAME$\xff"),
    ("getclt-not-utf8", "to_server", b"$GETCLT$\xff"),
]


def describe_message(message: Any) -> Dict[str, Any]:
    """A message object as JSON: its class name as ``type`` and its fields."""
    kind = type(message).__name__
    if isinstance(message, Hello):
        return {"type": kind, "name": message.name, "group": message.group, "extra": message.extra}
    if isinstance(message, Command):
        return {"type": kind, "command": message.command, "fmt": message.fmt.hex(), "payload": message.payload.hex()}
    if isinstance(message, (PeerJoined, PeerLeft)):
        return {"type": kind, "info": message.info}
    if isinstance(message, Disconnect):
        return {"type": kind, "details": message.details}
    if isinstance(message, ChangeName):
        return {"type": kind, "name": message.name}
    if isinstance(message, ChangeGroup):
        return {"type": kind, "group": message.group}
    if isinstance(message, GetClient):
        return {"type": kind, "query": message.query}
    return {"type": kind}


def _parser(direction: str) -> Any:
    return parse_client_body if direction == "to_server" else parse_server_body


def generate() -> Dict[str, Any]:
    content = []
    refused = []
    for name, value in VALUES:
        for dialect in ("plain", "extended"):
            try:
                fmt, payload = typecast.encode(value, msgpack_ok=dialect == "extended")
            except InvalidTypeCast:
                refused.append({"name": f"{name}-{dialect}", "dialect": dialect, "value": describe(value)})
                continue
            content.append({
                "name": f"{name}-{dialect}",
                "dialect": dialect,
                "value": describe(value),
                "fmt": fmt.hex(),
                "payload": payload.hex(),
                "decoded": describe(typecast.decode(fmt, payload)),
            })
    for name, value, dialect in REFUSED:
        try:
            typecast.encode(value, msgpack_ok=dialect == "extended")
        except InvalidTypeCast:
            refused.append({"name": name, "dialect": dialect, "value": describe(value)})
        else:  # pragma: no cover - the list above is wrong
            raise AssertionError(f"{name}: encode accepted it")
    decode_only = [
        {"name": name, "fmt": fmt.hex(), "payload": payload.hex(), "decoded": describe(typecast.decode(fmt, payload))}
        for name, fmt, payload in DECODE_ONLY
    ]
    malformed = []
    for name, fmt, payload in MALFORMED:
        try:
            typecast.decode(fmt, payload)
        except MalformedPayload:
            malformed.append({"name": name, "fmt": fmt.hex(), "payload": payload.hex()})
        else:  # pragma: no cover - the list above is wrong
            raise AssertionError(f"{name}: decode accepted it")
    messages = []
    for name, direction, message in MESSAGES:
        body = message.to_body()
        assert _parser(direction)(body) == message, name
        messages.append({"name": name, "direction": direction, "message": describe_message(message), "body": body.hex()})
    lenient = [
        {"name": name, "direction": direction, "body": body.hex(), "message": describe_message(_parser(direction)(body))}
        for name, direction, body in LENIENT_BODIES
    ]
    malformed_bodies = []
    for name, direction, body in MALFORMED_BODIES:
        try:
            _parser(direction)(body)
        except RemoteProtocolError:
            malformed_bodies.append({"name": name, "direction": direction, "body": body.hex()})
        else:  # pragma: no cover - the list above is wrong
            raise AssertionError(f"{name}: the parser accepted it")
    return {
        "about": "generated by tests/js/make_fixtures.py from hisock_gevent; do not edit by hand",
        "content": content,
        "decode_only": decode_only,
        "refused": refused,
        "malformed": malformed,
        "messages": messages,
        "lenient_bodies": lenient,
        "malformed_bodies": malformed_bodies,
    }


def render() -> str:
    """The fixtures file's text: one case per line, so a diff shows which case changed."""
    data = generate()
    lines = ["{", f'  "about": {json.dumps(data["about"])},']
    sections = [key for key in data if key != "about"]
    for index, key in enumerate(sections):
        lines.append(f'  "{key}": [')
        cases = data[key]
        for number, case in enumerate(cases):
            comma = "," if number < len(cases) - 1 else ""
            lines.append(f"    {json.dumps(case, ensure_ascii=False, allow_nan=False)}{comma}")
        lines.append("  ]" + ("," if index < len(sections) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    FIXTURES.write_text(render(), encoding="utf-8")
    print(f"wrote {FIXTURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
