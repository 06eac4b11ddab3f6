"""What a reconnecting client does between losing its connection and joining again.

:class:`Reconnector` waits (exponential backoff with jitter), makes a new
:class:`~hisock_gevent.client_link.ClientLink` on the same hub (which carries on with the
same inbox, so the dispatcher and the handlers never notice), and once the server has
accepted it hands it over; meanwhile it keeps the client's sends, in order and within a
byte bound, and writes them to the new link before anything else.  It gives up where
retrying cannot help (the server's authentication check said no) or after the attempts
it was allowed.  Everything here runs on the client's hub.
"""

from __future__ import annotations

import collections
import logging
import random
from typing import Any, Callable, Deque, Optional

import gevent

from .errors import AuthenticationFailed, ClientDisconnected, HiSockError

__all__ = ["Reconnector", "backoff"]

logger = logging.getLogger("hisock_gevent")


def backoff(attempt: int, first: float, most: float, rand: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait before attempt ``attempt`` (1, 2, ...): between half and all of
    ``first`` doubled ``attempt - 1`` times, but at most ``most``."""
    ceiling = min(first * (2 ** (attempt - 1)), most)
    return rand(ceiling / 2, ceiling)


class Reconnector:
    """Reconnects one client (see the module's docstring).

    :param make_link: makes a new link (connected, hello sent, bound to the hub with the
        client's inbox); raises OSError/HiSockError when it cannot.
    :param joined: called with the new link once the server accepted it.
    :param gave_up: called when there is no point trying again (or no attempt left).
    :param attempts: how many attempts, 0 for no limit.
    :param max_bytes: the most the kept sends may hold.
    """

    def __init__(
        self,
        make_link: Callable[[], Any],
        joined: Callable[[Any], None],
        gave_up: Callable[[BaseException], None],
        delay: float,
        delay_max: float,
        attempts: int,
        max_bytes: int,
    ):
        self.make_link = make_link
        self.joined = joined
        self.gave_up = gave_up
        self.delay = delay
        self.delay_max = delay_max
        self.attempts = attempts
        self.max_bytes = max_bytes
        self._kept: Deque[bytes] = collections.deque()
        self._kept_bytes = 0
        self._greenlet: Optional[gevent.Greenlet] = None

    @property
    def active(self) -> bool:
        """True while the client is between connections."""
        return self._greenlet is not None

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop at once (the client is closing); what was kept is dropped."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None and greenlet is not gevent.getcurrent():
            greenlet.kill(block=False)
        self._kept.clear()
        self._kept_bytes = 0

    def keep(self, data: bytes) -> None:
        """Keep a frame to send once joined again.

        :raises ClientDisconnected: more than ``max_bytes`` would be kept.
        """
        if self._kept_bytes + len(data) > self.max_bytes:
            raise ClientDisconnected(
                f"reconnecting, and {self._kept_bytes} bytes already wait to be sent (max_queue_bytes={self.max_bytes})"
            )
        self._kept.append(data)
        self._kept_bytes += len(data)

    def _run(self) -> None:
        attempt = 0
        failure: BaseException = ClientDisconnected("the connection to the server was lost")
        while not self.attempts or attempt < self.attempts:
            attempt += 1
            gevent.sleep(backoff(attempt, self.delay, self.delay_max))
            link = None
            try:
                link = self.make_link()
                link.wait_joined()
            except AuthenticationFailed as exc:
                logger.warning("reconnecting: the server's authentication check refused us; giving up")
                failure = exc
                if link is not None:
                    link.close(emit_leave=False)
                break
            except (OSError, HiSockError) as exc:  # not running, full, refused: try again
                logger.info("reconnecting, attempt %d failed: %s", attempt, exc)
                failure = exc
                if link is not None:
                    link.close(emit_leave=False)
                continue
            for data in self._kept:
                link.write(data)
            self._kept.clear()
            self._kept_bytes = 0
            self._greenlet = None
            logger.info("reconnected after %d attempt(s)", attempt)
            self.joined(link)
            return
        self._greenlet = None
        self.gave_up(failure)

