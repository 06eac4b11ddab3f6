"""What a client received and has not handled yet: small typed records in a byte-bounded queue.

The client's reader turns each message from the server into a record (:class:`Received`,
:class:`PeerEvent`, :class:`Ended`) and puts it in the :class:`Inbox`; the dispatcher (the
thread that runs ``start()``, or ``recv()`` when nobody does) takes them out in order and
calls the handlers.  When handlers fall behind, the inbox fills and the reader waits:
it stops reading, and TCP pushes back on the server, instead of buffering without limit.
"""

from __future__ import annotations

import collections
from typing import Any, Deque, NamedTuple, Tuple, Union

from gevent.event import Event

from .messages import Command
from .utils import ClientInfo

__all__ = ["Received", "CallRequest", "PeerEvent", "Reconnected", "Ended", "Record", "Inbox"]


class Received(NamedTuple):
    """A command message, its content decoded."""

    command: str
    content: Any
    message: Command


class CallRequest(NamedTuple):
    """The server calls one of our handlers (the ``call`` extension)."""

    call_id: int
    command: str
    content: Any


class PeerEvent(NamedTuple):
    """Another client joined (``client_connect``) or left (``client_disconnect``)."""

    event: str
    info: ClientInfo


class Reconnected(NamedTuple):
    """A reconnecting client joined again."""


class Ended(NamedTuple):
    """The connection is over; ``forced`` when the server disconnected (or refused) us."""

    forced: bool


Record = Union[Received, CallRequest, PeerEvent, Reconnected, Ended]


class Inbox:
    """A FIFO of records bounded by the bytes of the payloads it holds.

    :meth:`put` waits (cooperatively) while more than ``max_bytes`` are held; one record
    always fits, however large, and :meth:`put_now` (the end markers) never waits.  Used
    on one hub only.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: Deque[Tuple[Record, int]] = collections.deque()
        self._bytes = 0
        self._filled = Event()
        self._drained = Event()
        self._drained.set()

    @property
    def held_bytes(self) -> int:
        """Payload bytes waiting to be handled."""
        return self._bytes

    def put(self, record: Record, size: int = 0) -> None:
        while self._bytes and self._bytes + size > self.max_bytes:
            self._drained.clear()
            self._drained.wait()
        self._append(record, size)

    def put_now(self, record: Record) -> None:
        """Add ``record`` without waiting for room."""
        self._append(record, 0)

    def _append(self, record: Record, size: int) -> None:
        self._items.append((record, size))
        self._bytes += size
        self._filled.set()

    def get(self) -> Record:
        while not self._items:
            self._filled.clear()
            self._filled.wait()
        record, size = self._items.popleft()
        self._bytes -= size
        if self._bytes <= self.max_bytes:
            self._drained.set()  # a waiting reader looks again
        return record

    def empty(self) -> bool:
        return not self._items
