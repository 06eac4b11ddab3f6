"""A command message encoded and framed once, shared by every receiver that speaks the same dialect.

A broadcast to a thousand clients builds its frame once (twice at most: once for peers
that understand the msgpack extension and once for plain HiSock 3.x peers) and queues
the same ``bytes`` object to each of them.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from . import typecast
from .errors import ContentTooLarge
from .frames import _DEFAULT_HEADERS, DEFAULT_HEADER_LEN, make_header
from .messages import _FMT_LEN_FIELDS as _FMT_FIELDS
from .messages import command_prefix, fmt_length_field, is_reserved_command

__all__ = ["OutgoingCommand", "check_command"]


# Commands already checked -> their "$CMD$<command>$MSG$" prefix (programs use a handful).
_CHECKED: Dict[str, bytes] = {}
_CHECKED_MAX = 4096


def check_command(command: str) -> bytes:
    """Return the command's ``$CMD$<command>$MSG$`` prefix.

    :raises TypeError: the command is not a str.
    :raises ValueError: it has the ``$...$`` form HiSock reserves.
    """
    encoded = _CHECKED.get(command) if type(command) is str else None
    if encoded is not None:
        return encoded
    if not isinstance(command, str):
        raise TypeError(f"command must be a str, not {type(command).__name__}")
    if is_reserved_command(command):
        raise ValueError(f'commands of the form "$command$" are reserved for HiSock: {command!r}')
    encoded = command_prefix(command.encode())
    if len(_CHECKED) < _CHECKED_MAX and type(command) is str:
        _CHECKED[command] = encoded
    return encoded


class OutgoingCommand:
    """``command`` + ``content``, encoded lazily and at most once per dialect.

    :param reserved_ok: allow a ``$...$`` command (the server's own ``$GETCLT$`` answer).
    :param max_body: the largest body the receivers accept; None for no limit.
    :raises InvalidTypeCast: the content is not Sendable at all.
    """

    __slots__ = ("command", "content", "header_len", "max_body", "_prefix", "_native", "_extended")

    def __init__(self, command: str, content: Any, header_len: int, reserved_ok: bool = False, max_body: Optional[int] = None):
        prefix = _CHECKED.get(command) if type(command) is str and not reserved_ok else None
        if prefix is None:
            prefix = command_prefix(command.encode()) if reserved_ok else check_command(command)
        self._prefix = prefix
        self.command = command
        self.content = content
        self.header_len = header_len
        self.max_body = max_body
        self._native: Optional[bytes] = None
        self._extended: Optional[bytes] = None

    def frame_for(self, msgpack_ok: bool) -> bytes:
        """The complete frame for a peer that does (True) or does not support ``m``.

        :raises InvalidTypeCast: a plain peer cannot receive this content.
        :raises ContentTooLarge: the body would be longer than ``max_body``.
        """
        if msgpack_ok:
            if self._extended is None:
                self._extended = self._build(True)
            return self._extended
        if self._native is None:
            self._native = self._build(False)
        return self._native

    def _build(self, msgpack_ok: bool) -> bytes:
        fmt, payload = typecast.encode(self.content, msgpack_ok=msgpack_ok)
        prefix = self._prefix
        fmt_len = len(fmt)
        # fmt_length_field() and make_header(), inlined for short fmts and the default
        # header width (tests/test_outgoing.py checks both ways give the same bytes).
        fmt_field = _FMT_FIELDS[fmt_len] if fmt_len < len(_FMT_FIELDS) else fmt_length_field(fmt_len)
        body_len = len(prefix) + 8 + fmt_len + len(payload)
        if self.max_body is not None and body_len > self.max_body:
            raise ContentTooLarge(
                f"{self.command!r} with this content is a {body_len}-byte message, more than "
                f"the {self.max_body}-byte limit the receiving side accepts"
            )
        if self.header_len == DEFAULT_HEADER_LEN and body_len < len(_DEFAULT_HEADERS):
            header = _DEFAULT_HEADERS[body_len]
        else:
            header = make_header(body_len, self.header_len)
        # Header and body in one join: a large payload is copied once, not twice.
        return b"".join((header, prefix, fmt_field, fmt, payload))
