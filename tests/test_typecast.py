"""The content codec (PROTOCOL.md section 3), tested with values and bytes only."""

from __future__ import annotations

import enum
import math
import struct
import sys
import threading
import time
from collections import OrderedDict, namedtuple
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawpeer import as_single, hisock_floats

from hisock_gevent.errors import InvalidTypeCast, MalformedPayload
from hisock_gevent.typecast import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ITEMS,
    MSGPACK_LETTER,
    decode,
    encode,
    is_native,
)
from hisock_gevent.utils import ClientInfo

pytestmark = pytest.mark.timeout(60)

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DAMAGE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


def assert_same(got: Any, want: Any, path: str = "value") -> None:
    """Equal *and* of the same type all the way down (bool is not int, tuple is not list,
    bytes is not str); floats compared by bits, NaN by NaN-ness."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), f"{path}: {got!r} is not NaN"
        else:
            assert struct.pack(">d", got) == struct.pack(">d", want), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: lengths {len(got)} != {len(want)}"
        for index, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{index}]")
    elif isinstance(want, dict):
        assert len(got) == len(want), f"{path}: sizes {len(got)} != {len(want)}"
        for index, ((gk, gv), (wk, wv)) in enumerate(zip(got.items(), want.items())):
            assert_same(gk, wk, f"{path}.key#{index}")
            assert_same(gv, wv, f"{path}[{wk!r}]")
    elif isinstance(want, ClientInfo):
        assert got == want, f"{path}: {got!r} != {want!r}"
        assert_same(got.ip, want.ip, f"{path}.ip")
        assert_same(got.name, want.name, f"{path}.name")
        assert_same(got.group, want.group, f"{path}.group")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


SENDABLE_LEAVES = (str, bytes, int, float, bool, type(None), ClientInfo)


def assert_sendable(value: Any) -> None:
    """Whatever decode returns must be made only of Sendable types."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) in (list, tuple):
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            assert type(item) in SENDABLE_LEAVES, f"decode returned a {type(item).__name__}"


def decode_or_malformed(fmt: bytes, payload: bytes, **limits: int) -> None:
    """decode() may succeed or raise MalformedPayload, and nothing else."""
    try:
        value = decode(fmt, payload, **limits)
    except MalformedPayload:
        return
    assert_sendable(value)


def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


# --------------------------------------------------------------------------- strategies

ints = st.integers() | st.integers(min_value=-(10**100), max_value=10**100)
client_infos = st.builds(
    ClientInfo,
    st.tuples(st.text(max_size=15), st.integers(0, 65535)),
    st.none() | st.text(max_size=8),
    st.none() | st.text(max_size=8),
)
native_leaves = st.binary(max_size=12) | st.text(max_size=12) | ints | st.floats()
# NaN keys never compare equal, so no dict could hold one and find it again.
native_keys = st.recursive(
    st.binary(max_size=6) | st.text(max_size=6) | ints | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=5,
)
native_values = st.recursive(
    native_leaves,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(native_keys, inner, max_size=4)
    ),
    max_leaves=20,
)
all_keys = st.recursive(
    st.binary(max_size=6)
    | st.text(max_size=6)
    | ints
    | st.floats(allow_nan=False)
    | st.none()
    | st.booleans()
    | client_infos,
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=5,
)
sendables = st.recursive(
    native_leaves | st.none() | st.booleans() | client_infos,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(all_keys, inner, max_size=4)
    ),
    max_leaves=20,
)


# --------------------------------------------------------------------------- PROTOCOL.md examples


@pytest.mark.parametrize(
    "value, fmt, payload",
    [
        ("hi", b"2s", b"hi"),
        ([1, "ab"], b"l1i2s", b"1ab"),
        ({"a": [1, 2]}, b"d1s2[1i1i]", b"a12"),
        ((1, "ab"), b"t1i2s", b"1ab"),
        ([1, (2, 3)], b"l1i2(1i1i)", b"123"),
        ({"k": {"x": 1}}, b"d1s2{1s1i}", b"kx1"),
        (-42, b"3i", b"-42"),
        (b"\x00\xff", b"2b", b"\x00\xff"),
        (1.5, b"4f", struct.pack(">f", 1.5)),
        ([1.5, "a"], b"l4f1s", struct.pack(">f", 1.5) + b"a"),
        ({"x": -0.25}, b"d1s4f", b"x" + struct.pack(">f", -0.25)),
        ([], b"l", b""),
        ([[]], b"l0[]", b""),
        ({}, b"d", b""),
        ((), b"t", b""),
        (None, b"", b""),
        ("é", b"2s", "é".encode()),
    ],
)
def test_native_encoding_is_byte_exact(value, fmt, payload):
    assert encode(value) == (fmt, payload)
    assert_same(decode(fmt, payload), value)


def test_four_byte_float_decodes_as_single_precision():
    assert_same(decode(b"4f", struct.pack(">f", 1.5)), 1.5)
    assert_same(decode(b"l4f", struct.pack(">f", -0.25)), [-0.25])


def test_eight_byte_float_decodes_as_a_double_at_top_level_and_inside_containers():
    assert_same(decode(b"8f", struct.pack(">d", 0.1)), 0.1)
    assert_same(decode(b"l8f1s", struct.pack(">d", 0.1) + b"a"), [0.1, "a"])


# --------------------------------------------------------------------------- floats by dialect


def test_float_to_a_plain_peer_is_a_four_byte_single():
    fmt, payload = encode(0.1, msgpack_ok=False)
    assert (fmt, payload) == (b"4f", struct.pack(">f", 0.1))
    assert struct.unpack("!f", payload) == (struct.unpack(">f", struct.pack(">f", 0.1))[0],)
    assert_same(decode(fmt, payload), as_single(0.1))


@pytest.mark.parametrize(
    "value",
    [
        [0.1, "x", -2.5],
        (1.5, (0.1,)),
        {"k": 0.1},
        {0.1: "float key", "nested": [[3.25], {"x": (1e-3,)}]},
        [1e300, -1e300, float("inf"), 0.0, -0.0],
    ],
    ids=["list", "tuple", "dict-value", "key-and-nested", "extremes"],
)
def test_floats_inside_containers_to_a_plain_peer_are_singles_hisock_can_unpack(value):
    fmt, payload = encode(value, msgpack_ok=False)
    assert b"8f" not in fmt
    floats = hisock_floats(fmt, payload)
    assert len(floats) == fmt.count(b"f") > 0
    assert_same(decode(fmt, payload), as_single(value))


def test_floats_between_hisock_gevent_peers_stay_exact():
    # A top-level float keeps a native letter even in the extended dialect: 8 bytes, exact.
    fmt, payload = encode(0.1, msgpack_ok=True)
    assert (fmt, payload) == (b"8f", struct.pack(">d", 0.1))
    assert_same(decode(fmt, payload), 0.1)
    # Floats in containers travel inside the msgpack document, as doubles.
    value = [0.1, {"k": (1e300, -1e-300)}, {0.1: "key"}]
    fmt, payload = encode(value, msgpack_ok=True)
    assert fmt == MSGPACK_LETTER
    assert_same(decode(fmt, payload), value)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_float_past_the_single_range_reaches_a_plain_peer_as_infinity_of_its_sign(sign):
    largest_single = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]
    half_ulp = 2.0 ** (127 - 24)
    rounds_to_infinity = sign * (largest_single + half_ulp)
    with pytest.raises(OverflowError):  # what struct alone would do
        struct.pack("!f", rounds_to_infinity)
    for value in (sign * 1e300, rounds_to_infinity, sign * sys.float_info.max):
        assert encode(value) == (b"4f", struct.pack(">f", sign * math.inf))
        assert_same(decode(*encode([value])), [sign * math.inf])
    # Just below the rounding point it is still the largest single, not infinity.
    assert_same(decode(*encode(math.nextafter(rounds_to_infinity, 0.0))), sign * largest_single)


def test_tiny_floats_keep_their_sign_and_nan_stays_nan_for_a_plain_peer():
    assert_same(decode(*encode(-1e-300)), -0.0)
    assert_same(decode(*encode(1e-300)), 0.0)
    assert math.isnan(decode(*encode(float("nan"))))
    assert_same(decode(*encode([float("-inf")])), [float("-inf")])


@PROPERTY
@given(st.floats())
def test_every_float_to_a_plain_peer_is_the_nearest_single(value):
    fmt, payload = encode(value)
    assert fmt == b"4f" and len(payload) == 4
    assert_same(decode(fmt, payload), as_single(value))
    assert_same(decode(*encode(value, msgpack_ok=True)), value)


def test_top_level_primitives_stay_native_when_msgpack_is_allowed():
    for value in ("hi", 7, b"x", None):
        assert encode(value, msgpack_ok=True) == encode(value)
    assert encode(2.5, msgpack_ok=True)[0] == b"8f"


def test_containers_use_msgpack_when_allowed():
    fmt, payload = encode({"user": "alice", "ts": 1}, msgpack_ok=True)
    assert fmt == MSGPACK_LETTER
    assert msgpack.unpackb(payload) == {"user": "alice", "ts": 1}


def test_msgpack_ext_layout_is_stable():
    """The ext codes are wire format shared with other hisock_gevent peers."""
    packb = msgpack.packb
    assert encode((1, 2), msgpack_ok=True) == (b"m", packb(msgpack.ExtType(1, packb([1, 2]))))
    info = ClientInfo(("10.0.0.1", 5000), "ann", None)
    assert encode(info, msgpack_ok=True) == (
        b"m",
        packb(msgpack.ExtType(2, packb(["10.0.0.1", 5000, "ann", None]))),
    )
    assert encode([2**64], msgpack_ok=True) == (
        b"m",
        packb([msgpack.ExtType(3, b"18446744073709551616")]),
    )


def test_msgpack_keeps_64_bit_ints_native_and_bigger_ones_exact():
    for value in (2**64 - 1, -(2**63), 2**64, -(2**63) - 1, 10**4000, -(10**4000)):
        assert_same(decode(*encode([value], msgpack_ok=True)), [value])


def test_bool_and_client_info_round_trip_through_msgpack():
    value = [True, False, None, ClientInfo(("h", 1), "n", "g"), {None: (1, True)}]
    assert_same(decode(*encode(value, msgpack_ok=True)), value)
    assert_same(decode(*encode(True, msgpack_ok=True)), True)


# --------------------------------------------------------------------------- round-trip properties


@pytest.mark.slow
@PROPERTY
@given(sendables)
def test_every_sendable_round_trips_exactly_through_msgpack(value):
    assert_same(decode(*encode(value, msgpack_ok=True)), value)


@pytest.mark.slow
@PROPERTY
@given(native_values | st.none())
def test_native_values_round_trip_without_msgpack_with_floats_as_singles(value):
    assert is_native(value)
    assert_same(decode(*encode(value, msgpack_ok=False)), as_single(value))


@pytest.mark.slow
@PROPERTY
@given(sendables)
def test_without_msgpack_a_value_round_trips_or_is_refused(value):
    if is_native(value):
        assert_same(decode(*encode(value)), as_single(value))
    else:
        with pytest.raises(InvalidTypeCast):
            encode(value)


def test_bytes_like_values_arrive_as_bytes():
    for ok in (False, True):
        assert_same(decode(*encode(bytearray(b"ab"), msgpack_ok=ok)), b"ab")
        assert_same(decode(*encode(memoryview(b"ab"), msgpack_ok=ok)), b"ab")
        mixed = [bytearray(b"ab"), memoryview(b"c")]
        assert_same(decode(*encode(mixed, msgpack_ok=ok)), [b"ab", b"c"])


def test_subclasses_arrive_as_their_base_type():
    class Colour(enum.IntEnum):
        RED = 1

    class Shouty(str):
        def __str__(self) -> str:
            return "OVERRIDDEN"

    Point = namedtuple("Point", "x y")
    value = [Colour.RED, Shouty("quiet"), Point(1, 2), OrderedDict(a=1)]
    want = [1, "quiet", (1, 2), {"a": 1}]
    for ok in (False, True):
        assert_same(decode(*encode(value, msgpack_ok=ok)), want)
    assert_same(decode(*encode(Colour.RED)), 1)


def test_is_native_says_which_values_need_msgpack():
    assert is_native(None) and is_native("x") and is_native([1, (2.0, b"x"), {"k": "v"}])
    assert not is_native(True)
    assert not is_native([None])
    assert not is_native({"k": ClientInfo(("h", 1))})
    assert not is_native({None: 1})
    assert not is_native({1})


def test_msgpack_encoding_is_safe_from_several_threads():
    value = {"t": (1, (2, [3, (4,)])), "c": ClientInfo(("h", 2)), "big": 2**70}
    failures = []

    def worker():
        for _ in range(300):
            try:
                assert_same(decode(*encode(value, msgpack_ok=True)), value)
            except AssertionError as exc:  # pragma: no cover - reported below
                failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


# --------------------------------------------------------------------------- refusing to encode


@pytest.mark.parametrize("value", [{1, 2}, object(), [frozenset()], {"k": 1j}, (print,)])
@pytest.mark.parametrize("msgpack_ok", [False, True])
def test_unsupported_types_are_refused_by_name(value, msgpack_ok):
    with pytest.raises(InvalidTypeCast, match="is not Sendable"):
        encode(value, msgpack_ok=msgpack_ok)


@pytest.mark.parametrize(
    "value, what",
    [
        (True, "bool"),
        (ClientInfo(("h", 1)), "ClientInfo"),
        ([1, None], "None"),
        ((False,), "bool"),
        ({"who": ClientInfo(("h", 1))}, "ClientInfo"),
        ({None: 1}, "None"),
        ([[{"deep": True}]], "bool"),
    ],
)
def test_values_only_msgpack_carries_are_refused_without_it(value, what):
    with pytest.raises(InvalidTypeCast, match=f"^{what}.*without the msgpack extension"):
        encode(value, msgpack_ok=False)


def test_nesting_up_to_the_limit_is_sent_and_beyond_it_refused():
    for ok in (False, True):
        deepest = nested_list(DEFAULT_MAX_DEPTH)
        assert_same(decode(*encode(deepest, msgpack_ok=ok)), deepest)
        with pytest.raises(InvalidTypeCast, match="nest deeper"):
            encode(nested_list(DEFAULT_MAX_DEPTH + 1), msgpack_ok=ok)


def test_self_containing_containers_are_refused():
    looped: list = []
    looped.append(looped)
    deep_tuple: tuple = ()
    for _ in range(5000):
        deep_tuple = (deep_tuple,)
    for ok in (False, True):
        for value in (looped, deep_tuple):
            with pytest.raises(InvalidTypeCast):
                encode(value, msgpack_ok=ok)


def test_unencodable_strings_and_huge_ints_are_refused():
    for ok in (False, True):
        for value in ("\ud800", ["\udfff"], 10**5000, [10**5000]):
            with pytest.raises(InvalidTypeCast):
                encode(value, msgpack_ok=ok)


def test_client_info_with_a_bad_address_is_refused():
    with pytest.raises(InvalidTypeCast):
        encode(ClientInfo(("h", 70000)), msgpack_ok=True)


# --------------------------------------------------------------------------- decoding: bad input


@pytest.mark.parametrize(
    "fmt, payload",
    [
        (b"", b"x"),  # None carries no bytes
        (b"3s", b"ab"),  # LEN is not the payload length
        (b"2s", b"\xff\xfe"),  # not UTF-8
        (b"3f", b"abc"),  # floats are 4 or 8 bytes
        (b"l3f", b"abc"),
        (b"0i", b""),
        (b"2i", b"+1"),  # int() would accept these; the protocol does not
        (b"2i", b" 1"),
        (b"2i", b"1 "),
        (b"3i", b"1_0"),
        (b"2i", "١".encode()),  # an Arabic-Indic digit
        (b"1i", b"-"),
        (b"l2i", b"+1"),  # the same inside a container
        (b"l2i", b" 1"),
        (b"l3i", b"1_0"),
        (b"l4301i", b"1" * 4301),
        (b"4301i", b"1" * 4301),  # beyond Python's int digit limit
        (b"2x", b"ab"),  # unknown letter
        (b"s", b""),  # prim without LEN
        (b"99999999999999999999s", b"a"),
        (b"l9999999999999999999s", b"a"),
        (b"l1x", b"a"),
        (b"l1", b"a"),
        (b"l1s", b""),  # payload too short
        (b"l0s", b"a"),  # payload too long
        (b"l1[1s", b"a"),  # unclosed
        (b"l1s]", b"a"),  # closing what was never opened
        (b"l1[1s)", b"a"),  # wrong closer
        (b"l1[1s1]", b"a"),  # a closer with a LEN
        (b"l2[1s]", b"ab"),  # container LEN larger than its children
        (b"l1[2s]", b"ab"),
        (b"l1[0s]1s", b"a"),  # the total fits, but the nested LEN is a lie  # ... and smaller
        (b"d1s", b"a"),  # key without value
        (b"d2[1s1s]1s", b"abc"),  # a list is not hashable
        (b"l1{2[1s1s]1s}", b"abc"),
        (b"l1s\xff", b"a"),  # non-ASCII fmt
        ("l1s", b"a"),  # not even bytes
        (b"m", b""),
        (b"m", b"\xc0\xc0"),  # trailing data
        (b"m", b"\x92\x01"),  # truncated
        (b"m", b"\xc1"),  # reserved byte
        (b"m", b"\xa2\xff\xfe"),  # str that is not UTF-8
        (b"m", b"\x81\x91\x01\x02"),  # map keyed by a list
        (b"m", b"\xdd\xff\xff\xff\xff"),  # array claiming 4 billion items
        (b"m", b"\xdb\xff\xff\xff\xff"),  # str claiming 4 GiB
        (b"m", msgpack.packb(msgpack.ExtType(42, b""))),  # unknown ext
        (b"m", msgpack.packb(msgpack.ExtType(1, msgpack.packb({})))),  # tuple ext without array
        (b"m", msgpack.packb(msgpack.ExtType(2, msgpack.packb(["h", 70000, None, None])))),
        (b"m", msgpack.packb(msgpack.ExtType(2, msgpack.packb(["h", 1, 5, None])))),
        (b"m", msgpack.packb(msgpack.ExtType(2, msgpack.packb(["h", 1, None])))),
        (b"m", msgpack.packb(msgpack.ExtType(2, msgpack.packb([["h", 1], 1, None, None])))),
        (b"m", msgpack.packb(msgpack.ExtType(1, msgpack.packb([1]) + b"\xc0"))),  # extra bytes
        (b"m", msgpack.packb(msgpack.ExtType(1, b"\x92\x01"))),  # tuple body cut short
        (b"m", msgpack.packb(msgpack.ExtType(3, b"12a"))),
        (b"m", msgpack.packb(msgpack.ExtType(3, b"+12"))),
    ],
)
def test_bad_input_raises_malformed_payload(fmt, payload):
    with pytest.raises(MalformedPayload):
        decode(fmt, payload)


def test_tuples_are_hashable_dict_keys():
    assert_same(decode(b"d2(1s1s)1s", b"abc"), {("a", "b"): "c"})


def test_payload_may_be_a_memoryview():
    assert_same(decode(b"l1i2s", memoryview(b"xx1ab")[2:]), [1, "ab"])
    assert_same(decode(b"m", memoryview(msgpack.packb([1]))), [1])


def test_msgpack_timestamp_decodes_as_a_sendable_float():
    # msgpack handles its own ext -1 without calling our hook; it must not leak a Timestamp.
    assert_same(decode(b"m", msgpack.packb(msgpack.Timestamp(1, 500_000_000))), 1.5)


# --------------------------------------------------------------------------- decoding: limits


def test_deep_native_nesting_is_refused_quickly():
    depth = 100_000
    fmt = b"l" + b"0[" * depth + b"]" * depth
    started = time.perf_counter()
    with pytest.raises(MalformedPayload, match="nest deeper"):
        decode(fmt, b"")
    assert time.perf_counter() - started < 2


def test_deep_msgpack_nesting_is_refused_quickly():
    started = time.perf_counter()
    arrays_in_arrays = b"\x91" * 100_000 + b"\xc0"
    within_msgpacks_own_stack = b"\x91" * 1000 + b"\xc0"
    maps_in_maps = b"\x81\xc0" * 50_000 + b"\xc0"
    for payload in (arrays_in_arrays, within_msgpacks_own_stack, maps_in_maps):
        with pytest.raises(MalformedPayload):
            decode(b"m", payload)
    assert time.perf_counter() - started < 2


def test_deep_tuple_ext_nesting_is_refused_without_recursion_error():
    # Each tuple ext is a separate document: only our own depth count stops the recursion.
    body = msgpack.packb([])
    for _ in range(3000):
        body = msgpack.packb(msgpack.ExtType(1, b"\x91" + body))
    with pytest.raises(MalformedPayload, match="nest deeper"):
        decode(b"m", body)


def test_tuples_nested_past_the_recursion_limit_fail_cleanly_even_with_a_huge_max_depth():
    # Nested unpackb calls would overflow the C stack (SIGSEGV) after ~200 levels.
    body = msgpack.packb([])
    for _ in range(5000):
        body = msgpack.packb(msgpack.ExtType(1, b"\x91" + body))
    with pytest.raises(MalformedPayload):
        decode(b"m", body, max_depth=10**9)


def test_client_info_inside_client_info_is_refused_not_recursed_into():
    body = msgpack.packb(["h", 1, None, None])
    for _ in range(5000):
        body = msgpack.packb(msgpack.ExtType(2, b"\x94" + body + b"\x01\xc0\xc0"))
    with pytest.raises(MalformedPayload):
        decode(b"m", body, max_depth=10**9)


@pytest.mark.parametrize("ok", [False, True])
def test_depth_limit_is_exact_and_configurable(ok):
    fmt, payload = encode(nested_list(DEFAULT_MAX_DEPTH), msgpack_ok=ok)
    assert_same(decode(fmt, payload), nested_list(DEFAULT_MAX_DEPTH))
    with pytest.raises(MalformedPayload):
        decode(fmt, payload, max_depth=DEFAULT_MAX_DEPTH - 1)
    fmt, payload = encode(nested_list(3), msgpack_ok=ok)
    assert_same(decode(fmt, payload, max_depth=3), nested_list(3))
    with pytest.raises(MalformedPayload):
        decode(fmt, payload, max_depth=2)


def test_msgpack_depth_beyond_the_limit_is_refused():
    with pytest.raises(MalformedPayload, match="nest deeper"):
        decode(b"m", msgpack.packb(nested_list(DEFAULT_MAX_DEPTH + 1)))
    tuples: Any = ()
    for _ in range(DEFAULT_MAX_DEPTH):
        tuples = (tuples,)
    with pytest.raises(MalformedPayload, match="nest deeper"):
        decode(*encode(tuples[0], msgpack_ok=True), max_depth=DEFAULT_MAX_DEPTH - 2)


@pytest.mark.parametrize("ok", [False, True])
def test_item_limit(ok):
    fmt, payload = encode(list(range(1000)), msgpack_ok=ok)
    assert decode(fmt, payload, max_items=1001) == list(range(1000))
    with pytest.raises(MalformedPayload, match="more than 1000 values"):
        decode(fmt, payload, max_items=1000)


def test_more_than_the_default_item_limit_is_refused_before_parsing():
    fmt = b"l" + b"0s" * DEFAULT_MAX_ITEMS
    started = time.perf_counter()
    with pytest.raises(MalformedPayload, match="more than"):
        decode(fmt, b"")
    assert time.perf_counter() - started < 2


def test_dict_keys_built_to_share_a_hash_are_refused_quickly():
    # Int hashes are not randomised: i * (2**61 - 1) all hash to 0.  Inserting 20 000 such
    # keys into a dict takes seconds; the decoder must refuse them before building it.
    keys = [(2**61 - 1) * i for i in range(20_000)]
    native_fmt = b"d" + b"".join(b"%di1i" % len(str(key)) for key in keys)
    native_payload = b"".join(str(key).encode() + b"0" for key in keys)
    packed_map = b"\xdf" + len(keys).to_bytes(4, "big") + b"".join(
        msgpack.packb(msgpack.ExtType(3, str(key).encode())) + b"\x00" for key in keys
    )
    started = time.perf_counter()
    for fmt, payload in ((native_fmt, native_payload), (b"m", packed_map)):
        with pytest.raises(MalformedPayload, match="share hash values"):
            decode(fmt, payload)
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("ok", [False, True])
def test_a_few_colliding_dict_keys_are_fine(ok):
    value = {-1: "a", -2: "b"}  # hash(-1) == hash(-2) in CPython
    value.update({(2**61 - 1) * i: i for i in range(1, 50)})
    value.update({i: i for i in range(100)})
    assert_same(decode(*encode(value, msgpack_ok=ok)), value)


def test_int_digit_limit_is_exact():
    assert decode(b"4300i", b"9" * 4300) == int("9" * 4300)
    assert decode(b"4301i", b"-" + b"9" * 4300) == -int("9" * 4300)


# --------------------------------------------------------------------------- fuzzing


@FUZZ
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_random_bytes_only_ever_raise_malformed_payload(fmt, payload):
    decode_or_malformed(fmt, payload)
    decode_or_malformed(b"m", payload)


@pytest.mark.slow
@FUZZ
@given(st.text(alphabet="0123456789sibfltdm[](){}-", max_size=30), st.binary(max_size=30))
def test_grammar_shaped_fmts_only_ever_raise_malformed_payload(fmt, payload):
    decode_or_malformed(fmt.encode(), payload, max_depth=4, max_items=20)


@pytest.mark.slow
@DAMAGE
@given(sendables, st.booleans(), st.data())
def test_damaged_encodings_only_ever_raise_malformed_payload(value, msgpack_ok, data):
    try:
        fmt, payload = encode(value, msgpack_ok=msgpack_ok)
    except InvalidTypeCast:
        fmt, payload = encode(value, msgpack_ok=True)
    parts = [bytearray(fmt), bytearray(payload)]
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        target = parts[data.draw(st.integers(0, 1), label="fmt or payload")]
        how = data.draw(st.sampled_from(["flip", "truncate", "duplicate", "insert", "delete"]))
        at = data.draw(st.integers(0, len(target)), label="at")
        if how == "flip" and at < len(target):
            target[at] ^= data.draw(st.integers(1, 255), label="mask")
        elif how == "truncate":
            del target[at:]
        elif how == "duplicate":
            width = data.draw(st.integers(1, 8), label="width")
            target[at:at] = target[at : at + width]
        elif how == "insert":
            target.insert(at, data.draw(st.integers(0, 255), label="byte"))
        elif how == "delete" and at < len(target):
            del target[at]
    decode_or_malformed(bytes(parts[0]), bytes(parts[1]))
