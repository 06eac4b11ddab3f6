"""The unsent bytes of a whole server, each shared frame counted once, and who goes when there are too many.

``max_queue_bytes`` bounds what one peer may leave unread; this bounds what all of them
together hold.  Only *backlogged* connections count: the ones whose kernel buffer was
full, so that frames wait in our memory for them.  A broadcast frame that a thousand
slow peers hold is one object, so it is counted once, by identity, for as long as any of
them holds it.  Frames that the kernel takes in the pass of the event loop that queued
them never count: they are gone before anyone could pile them up.

Nothing here touches a socket: a holder is any object with ``queued_bytes`` and
``overflow(reason)`` (a :class:`~hisock_gevent.connection.Connection`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Set

__all__ = ["SendBudget", "default_total_queue_bytes"]

#: The most a server holds for all its peers together unless told otherwise.
MAX_DEFAULT_TOTAL = 1024 * 1024 * 1024
#: ... and at most this share of the machine's memory.
_MEMORY_SHARE = 4


def default_total_queue_bytes() -> int:
    """1 GiB, or a quarter of the machine's physical memory when that is less."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return MAX_DEFAULT_TOTAL
    if physical <= 0:
        return MAX_DEFAULT_TOTAL
    return min(MAX_DEFAULT_TOTAL, physical // _MEMORY_SHARE)


class SendBudget:
    """Unsent bytes held for backlogged connections, with a limit for the whole process.

    :param limit: the most bytes held at once; when passed, :meth:`over` is true and the
        owner calls :meth:`shed`.
    :param on_exceeded: called (once until :meth:`shed` ran) when a hold passes the limit;
        the owner schedules :meth:`shed` outside the sender's stack.
    """

    __slots__ = ("limit", "held", "_frames", "_holders", "_on_exceeded", "_shedding")

    def __init__(self, limit: int, on_exceeded: Optional[Callable[[], Any]] = None):
        if limit <= 0:
            raise ValueError("the total queue limit must be positive")
        self.limit = limit
        #: Bytes of distinct frames held right now.
        self.held = 0
        # id(frame) -> [frame length, how many holders hold it]; the holders keep the
        # frame alive, so its id cannot be reused while it is here.
        self._frames: Dict[int, List[int]] = {}
        self._holders: Set[Any] = set()
        self._on_exceeded = on_exceeded
        self._shedding = False

    @property
    def backlogged(self) -> int:
        """How many connections hold frames here now."""
        return len(self._holders)

    def enter(self, holder: Any, frames: Any) -> None:
        """``holder`` became backlogged holding ``frames``."""
        self._holders.add(holder)
        for data in frames:
            self.hold(data)

    def leave(self, holder: Any, frames: Any) -> None:
        """``holder`` no longer holds anything here (drained, closed or dropped)."""
        self._holders.discard(holder)
        for data in frames:
            self.release(data)

    def hold(self, data: Any) -> None:
        """A backlogged holder keeps one more reference to ``data``."""
        key = id(data)
        entry = self._frames.get(key)
        if entry is not None:
            entry[1] += 1
            return
        self._frames[key] = [len(data), 1]
        self.held += len(data)
        if self.held > self.limit and not self._shedding:
            self._shedding = True
            if self._on_exceeded is not None:
                self._on_exceeded()

    def release(self, data: Any) -> None:
        """A backlogged holder let go of (sent or dropped) one reference to ``data``."""
        key = id(data)
        entry = self._frames.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._frames[key]
            self.held -= entry[0]

    @property
    def over(self) -> bool:
        return self.held > self.limit

    def shed(self) -> List[Any]:
        """Overflow the holders with the largest backlogs until the total is within the limit.

        Returns the holders told to go, largest first.  A frame shared by several holders
        is only freed when the last of them goes, so more than one may have to.
        """
        dropped: List[Any] = []
        try:
            for holder in sorted(self._holders, key=lambda h: h.queued_bytes, reverse=True):
                if self.held <= self.limit:
                    break
                dropped.append(holder)
                holder.overflow("total")
        finally:
            self._shedding = False
        return dropped
