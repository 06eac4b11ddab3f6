"""Hand-written HiSock framing for the load generator and the baseline server.

Deliberately *not* hisock_gevent: the generator must cost as little CPU per message as
possible, and the baseline server must show what the same wire work costs without any of
the library.  Only what the benchmark needs is here (PROTOCOL.md sections 1 and 2, and
the ``s``/``i``/``b`` letters of section 3); nothing here imports gevent.
"""

from __future__ import annotations

import json
import resource
from typing import Any, List, Optional, Tuple

#: The open-file limit :func:`raise_nofile` sets when the hard limit is "unlimited"
#: (Linux's default ``fs.nr_open``).
NOFILE_CEILING = 1 << 20
#: Frame header width both sides use (HiSock's default).
HEADER_LEN = 16
#: Width of the fmt-length field of a command message.
FMT_LEN_WIDTH = 8

CMD = b"$CMD$"
MSG = b"$MSG$"
HELLO = b"$CLTHELLO$"
CLTCONN = b"$CLTCONN$"
CLTDISCONN = b"$CLTDISCONN$"
USRCLOSE = b"$USRCLOSE$"
DISCONN = b"$DISCONN$"

#: Commands the benchmark servers understand (both of them, identically).
PING, PONG = "ping", "pong"
BROADCAST = "broadcast"
BULK, ACK = "bulk", "ack"


def header(body_len: int) -> bytes:
    """The ``HEADER_LEN``-byte header announcing ``body_len`` bytes."""
    return b"%-16d" % body_len


def frame(body: bytes) -> bytes:
    """``body`` with its header in front."""
    return b"%-16d" % len(body) + body


def encode_content(content: Any) -> Tuple[bytes, bytes]:
    """``(fmt, payload)`` for the top-level types the benchmark sends (None, str, int, bytes)."""
    kind = type(content)
    if kind is str:
        data = content.encode()
        return b"%ds" % len(data), data
    if kind is bytes:
        return b"%db" % len(content), content
    if kind is int:
        data = b"%d" % content
        return b"%di" % len(data), data
    if content is None:
        return b"", b""
    raise TypeError(f"the benchmark framing does not carry {kind.__name__}")


def decode_content(fmt: bytes, payload: bytes) -> Any:
    """Inverse of :func:`encode_content` for a single top-level value.

    :raises ValueError: the fmt is not one of ``""``, ``<n>s``, ``<n>i``, ``<n>b``, or
        its length does not match the payload.
    """
    if not fmt:
        if payload:
            raise ValueError("None with a payload")
        return None
    letter = fmt[-1:]
    if int(fmt[:-1]) != len(payload):
        raise ValueError("fmt length does not match the payload")
    if letter == b"s":
        return payload.decode()
    if letter == b"b":
        return payload
    if letter == b"i":
        return int(payload)
    raise ValueError(f"unsupported fmt {fmt[:20]!r}")


def command_body(command: str, content: Any = None) -> bytes:
    """A command message body: ``$CMD$<command>$MSG$<fmt len, 8 wide><fmt><payload>``."""
    fmt, payload = encode_content(content)
    return b"".join((CMD, command.encode(), MSG, b"%-8d" % len(fmt), fmt, payload))


def command_frame(command: str, content: Any = None) -> bytes:
    """A complete frame carrying a command message."""
    return frame(command_body(command, content))


def command_prefix(command: str) -> bytes:
    """The bytes every body of ``command`` starts with (for cheap matching)."""
    return CMD + command.encode() + MSG


def parse_command(body: bytes) -> Tuple[str, bytes, bytes]:
    """``(command, fmt, payload)`` of a command message body.

    :raises ValueError: the body is not a well-formed command message.
    """
    split = body.find(MSG, len(CMD))
    if not body.startswith(CMD) or split < 0:
        raise ValueError("not a command message")
    fmt_start = split + len(MSG) + FMT_LEN_WIDTH
    fmt_end = fmt_start + int(body[split + len(MSG) : fmt_start])
    if fmt_end > len(body):
        raise ValueError("fmt runs past the body")
    return body[len(CMD) : split].decode(), body[fmt_start:fmt_end], body[fmt_end:]


def hello_frame(name: Optional[str] = None, group: Optional[str] = None) -> bytes:
    """The ``$CLTHELLO$`` frame a plain HiSock 3.x client sends (no capabilities)."""
    return frame(HELLO + json.dumps({"name": name, "group": group}, separators=(",", ":")).encode())


def own_conn_marker(local_port: int) -> bytes:
    """Bytes found in the ``$CLTCONN$`` JSON that announces the client at ``local_port``."""
    return b'"ipstr":"127.0.0.1:%d"' % local_port


def split_frames(buffer: bytearray) -> List[bytes]:
    """Remove and return every complete body at the front of ``buffer``."""
    bodies: List[bytes] = []
    pos = 0
    end = len(buffer)
    while end - pos >= HEADER_LEN:
        body_len = int(buffer[pos : pos + HEADER_LEN])
        start = pos + HEADER_LEN
        if end - start < body_len:
            break
        bodies.append(bytes(buffer[start : start + body_len]))
        pos = start + body_len
    if pos:
        del buffer[:pos]
    return bodies


def raise_nofile(wanted: Optional[int] = None) -> int:
    """Raise this process's open-file limit (soft) as far as ``wanted`` and the hard limit
    allow, the hard limit itself by default; return the soft limit now in force.

    Only root with CAP_SYS_RESOURCE may raise the hard limit, so it is left alone: S6 of
    bench.py reports it, since a server holds one descriptor per client.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    target = ceiling if wanted is None else min(wanted, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
