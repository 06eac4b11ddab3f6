"""Who may come in: the server's checks at the door and at the hello, and the count of who is waiting.

At the door, before a byte is read: the server is not closed, ``max_connections`` joined
clients are not reached, fewer than ``max_pending`` connections wait in their handshake,
and the address has fewer than ``max_connections_per_ip`` open.  At the hello: its name
and group (see :class:`~hisock_gevent.protocol.ServerHandshake`), room again, and the
application's ``authenticate`` check.  Nothing here touches a socket; the session acts on
the verdicts.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Dict, Optional

from . import stats
from .config import ServerConfig
from .messages import Hello
from .protocol import AUTH_FAILED_REASON, Refusal, ServerHandshake
from .utils import ClientInfo

__all__ = ["Admission"]

logger = logging.getLogger("hisock_gevent")


class Admission:
    """The door of one server.

    :param joined: how many clients are joined now (the registry's length).
    """

    def __init__(self, config: ServerConfig, joined: Callable[[], int]):
        self.config = config
        self.handshake = ServerHandshake(config.max_name_length)
        self._joined = joined
        # Connections whose hello is not accepted yet (oldest first), and open ones per IP.
        self.pending: Dict[Any, None] = {}
        self._per_ip: Counter[str] = Counter()
        self.closed = False

    # ------------------------------------------------------------------ at the door

    def refusal_at_door(self, ip: str) -> Optional[Refusal]:
        """Why a new connection from ``ip`` is turned away before it says anything, or None."""
        config = self.config
        if self.closed:
            return Refusal("the server is closed", stats.SERVER_CLOSED)
        if config.max_connections and self._joined() >= config.max_connections:
            return Refusal(f"max_connections ({config.max_connections}) reached", stats.SERVER_FULL)
        if len(self.pending) >= config.max_pending:
            return Refusal(
                f"max_pending ({config.max_pending}) connections are still in their handshake", stats.TOO_MANY_PENDING
            )
        if config.max_connections_per_ip and self._per_ip[ip] >= config.max_connections_per_ip:
            return Refusal(f"max_connections_per_ip ({config.max_connections_per_ip}) reached", stats.TOO_MANY_FROM_IP)
        return None

    def came_in(self, conn: Any, ip: str) -> None:
        """A connection passed the door: it waits for its hello to be accepted."""
        self.pending[conn] = None
        self._per_ip[ip] += 1

    def said_hello(self, conn: Any) -> None:
        """Its hello arrived: it no longer counts as waiting (accepted or not)."""
        self.pending.pop(conn, None)

    def went(self, conn: Any, ip: str) -> None:
        """The connection closed, whatever it got to."""
        self.pending.pop(conn, None)
        count = self._per_ip[ip] - 1
        if count > 0:
            self._per_ip[ip] = count
        else:
            del self._per_ip[ip]

    # ------------------------------------------------------------------ at the hello

    def refusal_of(self, hello: Hello, address: Any) -> Optional[Refusal]:
        """Why this hello may not join, or None: its names, room, then the check."""
        refusal = self.handshake.refusal(hello)
        if refusal is not None:
            return refusal
        config = self.config
        if config.max_connections and self._joined() >= config.max_connections:
            return Refusal(f"max_connections ({config.max_connections}) reached", stats.SERVER_FULL)
        if config.authenticate is not None and not self._authenticated(hello, address):
            return Refusal(AUTH_FAILED_REASON, stats.AUTH_FAILED)
        return None

    def _authenticated(self, hello: Hello, address: Any) -> bool:
        assert self.config.authenticate is not None
        candidate = ClientInfo(address, hello.name, hello.group)
        try:
            return bool(self.config.authenticate(candidate, hello.extra.get("auth")))
        except Exception:
            logger.exception("authentication check failed for %s; refusing it", candidate)
            return False
