"""HiSock frames: a fixed-width decimal header followed by a body; no sockets here.

A frame is ``header`` (``header_len`` bytes: the body length in ASCII decimal, padded on
the right with spaces) followed by the body.  :class:`FrameParser` is fed whatever bytes
arrive and hands back complete bodies; it checks a header's length against the limit
*before* any of the body is buffered, so a peer claiming a huge body costs nothing.
"""

from __future__ import annotations

from typing import List, Optional

from .errors import InvalidHeader, MessageTooLarge, RemoteProtocolError

__all__ = [
    "DEFAULT_HEADER_LEN",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "make_header",
    "frame",
    "parse_header",
    "FrameParser",
]

#: HiSock's default header width: lengths up to 10**16 - 1 bytes.
DEFAULT_HEADER_LEN = 16
#: Largest body accepted from a peer unless configured otherwise (16 MiB).
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

_SPACE = b" "
# A TLS handshake record starts with content type 22 and major version 3.
_TLS_RECORD = b"\x16\x03"


def make_header(body_len: int, header_len: int = DEFAULT_HEADER_LEN) -> bytes:
    """Return the header announcing a body of ``body_len`` bytes.

    :raises ValueError: if the length does not fit in ``header_len`` digits.
    """
    digits = b"%d" % body_len
    if len(digits) > header_len:
        raise ValueError(f"a body of {body_len} bytes does not fit a {header_len}-byte header")
    return digits.ljust(header_len, _SPACE)


def frame(body: bytes, header_len: int = DEFAULT_HEADER_LEN) -> bytes:
    """Return ``body`` with its header in front, ready for the wire."""
    return make_header(len(body), header_len) + body


def parse_header(header: bytes) -> int:
    """Return the body length a header announces.

    Surrounding spaces are tolerated (upstream HiSock parsed with ``int()``); anything but
    ASCII digits inside is not.

    :raises InvalidHeader: if the header is not a decimal number.
    """
    digits = header.strip(_SPACE)
    # bytes.isdigit() is ASCII-only, unlike int(), which also takes "+", "_" and tabs.
    if not digits.isdigit():
        hint = " (it looks like TLS: is the peer using TLS and we are not?)" if header[:2] == _TLS_RECORD else ""
        raise InvalidHeader(f"frame header {bytes(header)[:32]!r} is not a decimal length{hint}")
    return int(digits)


class FrameParser:
    """Incremental frame parser: :meth:`feed` bytes in, get complete bodies out.

    :param header_len: the header width both peers agreed on.
    :param max_body_len: the largest body accepted; a header announcing more raises
        :class:`MessageTooLarge` before anything of that body is kept.
    """

    __slots__ = ("header_len", "max_body_len", "_buffer", "_body_len", "_error")

    def __init__(self, header_len: int = DEFAULT_HEADER_LEN, max_body_len: int = DEFAULT_MAX_MESSAGE_SIZE):
        if header_len < 1:
            raise ValueError("header_len must be at least 1")
        self.header_len = header_len
        self.max_body_len = max_body_len
        self._buffer = bytearray()
        # Length of the body whose header was already consumed, or -1 between frames.
        self._body_len = -1
        # A protocol error found behind complete bodies: raised by the next feed().
        self._error: Optional[RemoteProtocolError] = None

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return len(self._buffer)

    @property
    def failed(self) -> bool:
        """True when an error is waiting: the next :meth:`feed` (even of ``b""``) raises it."""
        return self._error is not None

    @property
    def mid_frame(self) -> bool:
        """True when a frame has started but not finished (a close now truncates it)."""
        return self._body_len >= 0 or bool(self._buffer)

    def feed(self, data: bytes) -> List[bytes]:
        """Add received bytes; return every body completed by them, in order.

        :raises InvalidHeader: a header is not a decimal number.
        :raises MessageTooLarge: a header announces more than ``max_body_len``.
        Bodies completed before the bad header are returned first; the error is then
        raised by the next call (see :attr:`failed`).  After it, close the connection.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffer += data
        bodies: List[bytes] = []
        header_len = self.header_len
        body_len = self._body_len
        pos = 0
        end = len(buffer)
        while True:
            if body_len < 0:
                if end - pos < header_len:
                    break
                try:
                    body_len = self._read_header(buffer[pos : pos + header_len])
                except RemoteProtocolError as exc:
                    if not bodies:
                        raise
                    self._error = exc
                    body_len = -1
                    break
                pos += header_len
            if end - pos < body_len:
                break
            bodies.append(bytes(buffer[pos : pos + body_len]))
            pos += body_len
            body_len = -1
        if pos:
            del buffer[:pos]
        self._body_len = body_len
        return bodies

    def _read_header(self, header: bytes) -> int:
        body_len = parse_header(header)
        if body_len > self.max_body_len:
            raise MessageTooLarge(f"frame announces {body_len} bytes, more than the {self.max_body_len}-byte limit")
        return body_len
