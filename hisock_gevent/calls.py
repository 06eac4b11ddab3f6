"""Calls waiting for their answer, on either side of a connection.

A :class:`PendingCalls` gives each outgoing call (``$CALL$``) an id and an
:class:`~gevent.event.AsyncResult` to wait on.  The reader hands it the answer
(``$REPLY$`` or ``$CALLERR$``) by id; an answer to a call nobody waits for any more (it
timed out) finds nothing and is dropped.  When the connection ends, every waiting call
fails at once, so nobody waits out a timeout and nothing is left behind.  The client's
link and the server's peer both keep one.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from gevent.event import AsyncResult

__all__ = ["PendingCalls"]


class PendingCalls:
    """The calls of one connection that wait for an answer (see the module's docstring)."""

    __slots__ = ("_waiting", "_last_id")

    def __init__(self) -> None:
        self._waiting: Dict[int, AsyncResult] = {}
        self._last_id = 0

    def open(self) -> Tuple[int, AsyncResult]:
        """A new call: its id (1, 2, ...) and what its answer will be set on."""
        self._last_id += 1
        result = AsyncResult()
        self._waiting[self._last_id] = result
        return self._last_id, result

    def take(self, call_id: int) -> Optional[AsyncResult]:
        """The result waiting for ``call_id``'s answer, no longer pending; None when nobody
        waits for it (it timed out, or the id was never ours)."""
        return self._waiting.pop(call_id, None)

    def fail_all(self, exc: BaseException) -> None:
        """The connection ended: every waiting call raises ``exc`` at once."""
        waiting, self._waiting = self._waiting, {}
        for result in waiting.values():
            result.set_exception(exc)

    def __len__(self) -> int:
        return len(self._waiting)
