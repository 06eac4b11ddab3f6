"""OutgoingCommand builds its frame with the header and fmt-length tables inlined (a hot
path): the bytes must be exactly what frames.make_header and messages.fmt_length_field
give, on both sides of each table's edge."""

from __future__ import annotations

import pytest

from hisock_gevent import typecast
from hisock_gevent.frames import make_header
from hisock_gevent.messages import command_prefix, fmt_length_field
from hisock_gevent.outgoing import OutgoingCommand

pytestmark = pytest.mark.timeout(30)


def reference(command: str, content, header_len: int, msgpack_ok: bool) -> bytes:
    fmt, payload = typecast.encode(content, msgpack_ok=msgpack_ok)
    body = command_prefix(command.encode()) + fmt_length_field(len(fmt)) + fmt + payload
    return make_header(len(body), header_len) + body


@pytest.mark.parametrize("header_len", [16, 12, 32])
@pytest.mark.parametrize("size", [0, 1, 4050, 4060, 4070, 4100, 70_000])
@pytest.mark.parametrize("msgpack_ok", [False, True])
def test_the_inlined_frame_is_the_reference_frame(header_len, size, msgpack_ok):
    content = b"x" * size
    assert OutgoingCommand("cmd", content, header_len).frame_for(msgpack_ok) == reference("cmd", content, header_len, msgpack_ok)


@pytest.mark.parametrize("items", [1, 60, 90, 300])
def test_long_fmts_get_the_same_fmt_length_field(items):
    content = list(range(items))  # native letters: the fmt grows with the items
    assert OutgoingCommand("c", content, 16).frame_for(False) == reference("c", content, 16, False)
