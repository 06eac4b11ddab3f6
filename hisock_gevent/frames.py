"""HiSock frames (PROTOCOL.md section 1): a fixed-width decimal header followed by a body; no sockets here.

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
# Headers of the default width for the common small bodies, made once.
_CACHED_HEADERS = 4096
_DEFAULT_HEADERS = [(b"%d" % n).ljust(DEFAULT_HEADER_LEN, b" ") for n in range(_CACHED_HEADERS)]
# A TLS handshake record starts with content type 22 and major version 3.
_TLS_RECORD = b"\x16\x03"


def make_header(body_len: int, header_len: int = DEFAULT_HEADER_LEN) -> bytes:
    """Return the header announcing a body of ``body_len`` bytes.

    :raises ValueError: if the length does not fit in ``header_len`` digits.
    """
    if header_len == DEFAULT_HEADER_LEN and body_len < _CACHED_HEADERS:
        return _DEFAULT_HEADERS[body_len]
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

    Whole frames that arrive in one piece are sliced straight out of the received bytes.
    Only an incomplete frame is kept, in one ``bytearray`` that grows as its bytes come:
    a peer trickling a frame byte by byte costs about the frame's own size in memory and
    linear time, not an object per read.  A header announcing too much is refused before
    any of its body is kept.

    :param header_len: the header width both peers agreed on.
    :param max_body_len: the largest body accepted; a header announcing more raises
        :class:`MessageTooLarge` before anything of that body is kept.
    :param first_body_limit: a smaller limit for the first body only (a server's limit on
        the hello of a connection it knows nothing about yet); later bodies get
        ``max_body_len``.
    """

    __slots__ = ("header_len", "max_body_len", "failed", "mid_frame", "_buf", "_body_len", "_error", "_first_limit")

    def __init__(
        self,
        header_len: int = DEFAULT_HEADER_LEN,
        max_body_len: int = DEFAULT_MAX_MESSAGE_SIZE,
        first_body_limit: Optional[int] = None,
    ):
        if header_len < 1:
            raise ValueError("header_len must be at least 1")
        self.header_len = header_len
        self.max_body_len = max_body_len
        # Received bytes that are not yet a complete frame (the header too, until the
        # body is complete).
        self._buf = bytearray()
        # Length of the body whose header was already read, or -1 between frames.
        self._body_len = -1
        # A protocol error found behind complete bodies: raised by the next feed().
        self._error: Optional[RemoteProtocolError] = None
        self._first_limit = first_body_limit
        # Plain attributes, not properties: a reader checks both after every read.
        #: True when an error is waiting: the next :meth:`feed` (even of ``b""``) raises it.
        self.failed = False
        #: True when a frame has started but not finished (a close now truncates it).
        self.mid_frame = False

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> List[bytes]:
        """Add received bytes; return every body completed by them, in order.

        :raises InvalidHeader: a header is not a decimal number.
        :raises MessageTooLarge: a header announces more than the limit.
        Bodies completed before the bad header are returned first; the error is then
        raised by the next call (see :attr:`failed`).  After it, close the connection.
        """
        if self._error is not None:
            raise self._error
        if not self._buf and type(data) is bytes and self._first_limit is None:
            return self._feed_at_boundary(data)
        buf = self._buf
        if data:
            buf += data
        bodies: List[bytes] = []
        header_len = self.header_len
        while True:
            body_len = self._body_len
            if body_len >= 0:
                end = header_len + body_len
                if len(buf) < end:
                    self.mid_frame = True
                    return bodies
                # One copy out of the buffer, then the buffer forgets the frame.
                with memoryview(buf) as view:
                    bodies.append(view[header_len:end].tobytes())
                del buf[:end]
                self._body_len = -1
                self._first_limit = None
                continue
            if len(buf) < header_len:
                self.mid_frame = len(buf) > 0
                return bodies
            try:
                self._body_len = self._read_header(bytes(buf[:header_len]))
            except RemoteProtocolError as exc:
                # Once failed, always failed: every later feed() raises the same error,
                # and nothing behind the bad header is kept.
                self._error = exc
                self.failed = True
                del buf[:]
                self.mid_frame = False
                if not bodies:
                    raise
                return bodies

    def _feed_at_boundary(self, data: bytes) -> List[bytes]:
        """:meth:`feed` when nothing is pending: parse ``data`` in place (the common case).

        Whole frames are sliced straight out of ``data``; only an incomplete last frame
        is kept for the next call.
        """
        bodies: List[bytes] = []
        header_len = self.header_len
        max_body_len = self.max_body_len
        end = len(data)
        pos = 0
        while end - pos >= header_len:
            header = data[pos : pos + header_len]
            digits = header.strip(_SPACE)
            body_len = int(digits) if digits.isdigit() else -1
            if not 0 <= body_len <= max_body_len:
                try:
                    self._read_header(header)
                except RemoteProtocolError as exc:
                    self._error = exc
                    self.failed = True
                    if not bodies:
                        raise
                    return bodies
            if end - pos - header_len < body_len:
                # The header is checked; the frame waits (header included) in the buffer.
                self._body_len = body_len
                break
            pos += header_len
            bodies.append(data[pos : pos + body_len])
            pos += body_len
        if pos < end:
            self._buf += memoryview(data)[pos:] if pos else data
            self.mid_frame = True
        return bodies

    def _read_header(self, header: bytes) -> int:
        body_len = parse_header(header)
        limit = self.max_body_len if self._first_limit is None else self._first_limit
        if body_len > limit:
            raise MessageTooLarge(f"frame announces {body_len} bytes, more than the {limit}-byte limit")
        return body_len
