"""Frames (PROTOCOL.md section 1): the fixed-width decimal header and the incremental parser.

Pure tests: bytes in, bodies out, no sockets.
"""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hisock_gevent.errors import InvalidHeader, MessageTooLarge, RemoteProtocolError
from hisock_gevent.frames import (
    DEFAULT_HEADER_LEN,
    FrameParser,
    frame,
    make_header,
    parse_header,
)

pytestmark = pytest.mark.timeout(30)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _hdr(text: str, width: int = 16) -> bytes:
    """A header built by hand, independent of make_header."""
    return text.encode("utf-8").ljust(width, b" ")


# ------------------------------------------------------------------ make_header / frame


def test_default_header_len_is_16():
    assert DEFAULT_HEADER_LEN == 16


def test_header_is_decimal_length_padded_with_spaces():
    assert make_header(11) == b"11              "
    assert len(make_header(11)) == 16


def test_header_for_empty_body_is_zero_padded_with_spaces():
    assert make_header(0) == b"0" + b" " * 15


@pytest.mark.parametrize(
    "length, header_len, expected",
    [
        (11, 4, b"11  "),
        (5, 1, b"5"),
        (9999, 4, b"9999"),
        (123, 8, b"123     "),
        (10**16 - 1, 16, b"9999999999999999"),
        (42, 32, b"42" + b" " * 30),
    ],
)
def test_header_width_follows_header_len(length, header_len, expected):
    assert make_header(length, header_len) == expected


@pytest.mark.parametrize(
    "length, header_len",
    [(10, 1), (10000, 4), (10**16, 16), (10**8, 8)],
)
def test_header_raises_value_error_when_length_does_not_fit(length, header_len):
    with pytest.raises(ValueError):
        make_header(length, header_len)


def test_frame_is_header_followed_by_body():
    assert frame(b"hello world") == b"11              hello world"


def test_frame_of_empty_body_is_header_only():
    assert frame(b"") == b"0               "


def test_frame_uses_given_header_len():
    assert frame(b"abc", header_len=8) == b"3       abc"
    assert frame(b"abc", 4) == b"3   abc"


def test_frame_raises_value_error_when_body_too_long_for_header():
    with pytest.raises(ValueError):
        frame(b"x" * 10, header_len=1)


# ------------------------------------------------------------------ parse_header


@pytest.mark.parametrize(
    "header, expected",
    [
        (b"11              ", 11),
        (b"0               ", 0),
        (b"9999999999999999", 10**16 - 1),
        (b"0000000000000011", 11),
        (b"   11           ", 11),  # surrounding spaces are stripped
        (b"7", 7),
        (b"12  ", 12),
    ],
)
def test_parse_header_accepts_space_padded_decimal(header, expected):
    assert parse_header(header) == expected


@pytest.mark.parametrize(
    "text",
    [
        "+5",
        "-5",
        "1_0",
        "\t5",
        "5\t",
        "5\n",
        "\n5",
        "1 0",
        "0x10",
        "1e3",
        "5.0",
        "",  # all spaces
        "abc",
        "\x005",
        "\u0665",  # ARABIC-INDIC DIGIT FIVE
        "\uff15",  # FULLWIDTH DIGIT FIVE
        "\u00b2",  # SUPERSCRIPT TWO (str.isdigit() is True for it)
        "\u0969",  # DEVANAGARI DIGIT THREE
    ],
)
def test_parse_header_rejects_non_decimal_as_invalid_header(text):
    with pytest.raises(InvalidHeader):
        parse_header(_hdr(text))


def test_invalid_header_is_a_remote_protocol_error():
    assert issubclass(InvalidHeader, RemoteProtocolError)
    assert issubclass(MessageTooLarge, RemoteProtocolError)


# ------------------------------------------------------------------ FrameParser


def test_parser_returns_several_frames_from_one_feed_in_order():
    parser = FrameParser()
    data = frame(b"one") + frame(b"") + frame(b"three") + frame(b"$CMD$x$MSG$0       ")
    assert parser.feed(data) == [b"one", b"", b"three", b"$CMD$x$MSG$0       "]
    assert parser.mid_frame is False


def test_parser_returns_bytes_objects():
    bodies = FrameParser().feed(frame(b"abc"))
    assert [type(b) for b in bodies] == [bytes]


def test_parser_reassembles_a_frame_split_byte_by_byte():
    parser = FrameParser()
    data = frame(b"hello world")
    got: List[bytes] = []
    for i in range(len(data)):
        out = parser.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert out == [], f"a body came out after only {i + 1} bytes"
            assert parser.mid_frame is True
        got += out
    assert got == [b"hello world"]
    assert parser.mid_frame is False


def test_parser_accepts_empty_feeds():
    parser = FrameParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"3      ") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"         ab") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"c") == [b"abc"]


def test_parser_keeps_the_start_of_the_next_frame():
    parser = FrameParser()
    data = frame(b"first") + frame(b"second")
    cut = len(frame(b"first")) + 5
    assert parser.feed(data[:cut]) == [b"first"]
    assert parser.mid_frame is True
    assert parser.feed(data[cut:]) == [b"second"]
    assert parser.mid_frame is False


def test_parser_uses_its_header_len():
    parser = FrameParser(header_len=4)
    assert parser.feed(b"3   abc0   2   xy") == [b"abc", b"", b"xy"]


def test_parser_refuses_header_len_below_one():
    with pytest.raises(ValueError):
        FrameParser(header_len=0)


def test_parser_raises_message_too_large_from_the_header_alone():
    parser = FrameParser(max_body_len=100)
    header = make_header(10**15)
    assert header == b"1000000000000000"
    # Nothing of the body has been sent: the header alone must be refused.
    with pytest.raises(MessageTooLarge):
        parser.feed(header)


def test_parser_raises_message_too_large_when_header_arrives_in_pieces():
    parser = FrameParser(max_body_len=100)
    assert parser.feed(b"10000000") == []
    with pytest.raises(MessageTooLarge):
        parser.feed(b"00000000")


def test_parser_accepts_a_body_of_exactly_max_body_len():
    parser = FrameParser(max_body_len=10)
    assert parser.feed(frame(b"x" * 10)) == [b"x" * 10]


def test_parser_refuses_a_body_one_byte_over_max_body_len():
    parser = FrameParser(max_body_len=10)
    with pytest.raises(MessageTooLarge):
        parser.feed(make_header(11))


def test_parser_does_not_buffer_body_of_too_large_frame():
    parser = FrameParser(max_body_len=4)
    with pytest.raises(MessageTooLarge):
        parser.feed(make_header(5) + b"abcde")
    # The body must not have been kept (the state is undefined afterwards, but the
    # promise is that nothing of the oversize body is buffered while refusing it).
    assert parser.buffered <= DEFAULT_HEADER_LEN + 5


def test_parser_raises_invalid_header_for_non_decimal_header():
    parser = FrameParser()
    with pytest.raises(InvalidHeader):
        parser.feed(b"+5              hello")


def test_parser_raises_invalid_header_after_valid_frames_by_the_next_feed_at_latest():
    # The frames before the bad header may be handed out first (so that what a peer's
    # bytes mean does not depend on how TCP cut them); the error must follow at once.
    parser = FrameParser()
    try:
        bodies = parser.feed(frame(b"ok") + b"not a header!!!!xx")
    except InvalidHeader:
        return
    assert bodies == [b"ok"]
    with pytest.raises(InvalidHeader):
        parser.feed(b"")


def test_mid_frame_is_false_for_a_fresh_parser():
    assert FrameParser().mid_frame is False


def test_mid_frame_is_true_with_a_partial_header():
    parser = FrameParser()
    parser.feed(b"5  ")
    assert parser.mid_frame is True


def test_mid_frame_is_true_after_header_without_body():
    parser = FrameParser()
    assert parser.feed(make_header(5)) == []
    assert parser.mid_frame is True


def test_mid_frame_is_true_with_a_partial_body():
    parser = FrameParser()
    parser.feed(make_header(5) + b"ab")
    assert parser.mid_frame is True


def test_mid_frame_is_false_after_a_complete_frame():
    parser = FrameParser()
    parser.feed(frame(b"abcde"))
    assert parser.mid_frame is False
    assert parser.buffered == 0


def test_mid_frame_is_false_after_a_complete_empty_frame():
    parser = FrameParser()
    assert parser.feed(make_header(0)) == [b""]
    assert parser.mid_frame is False


# ------------------------------------------------------------------ properties

bodies_st = st.lists(st.binary(max_size=300), max_size=20)
header_len_st = st.sampled_from([4, 5, 8, 16, 20])


def _chunks(data: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@FUZZ
@given(bodies=bodies_st, header_len=header_len_st, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_any_chunking_of_framed_bodies_yields_exactly_the_bodies(bodies, header_len, cuts):
    stream = b"".join(frame(b, header_len) for b in bodies)
    parser = FrameParser(header_len=header_len)
    got: List[bytes] = []
    for chunk in _chunks(stream, cuts):
        got += parser.feed(chunk)
    assert got == bodies
    assert parser.mid_frame is False
    assert parser.buffered == 0


@FUZZ
@given(bodies=bodies_st, header_len=header_len_st)
def test_byte_by_byte_feeding_yields_exactly_the_bodies(bodies, header_len):
    stream = b"".join(frame(b, header_len) for b in bodies)
    parser = FrameParser(header_len=header_len)
    got: List[bytes] = []
    for i in range(len(stream)):
        got += parser.feed(stream[i : i + 1])
    assert got == bodies


@FUZZ
@given(
    chunks=st.lists(st.binary(max_size=64), max_size=20),
    header_len=st.sampled_from([1, 2, 4, 16]),
    max_body_len=st.integers(min_value=0, max_value=1000),
)
def test_random_bytes_only_yield_bodies_or_protocol_errors(chunks, header_len, max_body_len):
    parser = FrameParser(header_len=header_len, max_body_len=max_body_len)
    for chunk in chunks:
        try:
            bodies = parser.feed(chunk)
        except (InvalidHeader, MessageTooLarge):
            return
        assert all(type(b) is bytes and len(b) <= max_body_len for b in bodies)


@FUZZ
@given(
    digits=st.text(alphabet="0123456789 +-_\t\n.x\u0665\uff15\u00b2", min_size=1, max_size=16),
)
def test_parse_header_accepts_exactly_ascii_digits_between_spaces(digits):
    header = digits.encode("utf-8")
    stripped = header.strip(b" ")
    ascii_decimal = bool(stripped) and all(0x30 <= c <= 0x39 for c in stripped)
    if ascii_decimal:
        assert parse_header(header) == int(stripped)
    else:
        with pytest.raises(InvalidHeader):
            parse_header(header)
