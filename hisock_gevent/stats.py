"""The counters a server keeps about its traffic, and the names of why clients go.

:class:`Traffic` is shared by every connection of one server and bumped on the hot path,
so it is four plain integers and nothing else.  :class:`ServerStats` adds what happens
less often (joins, drops, rejected frames) and turns it all into the plain dict that
:meth:`HiSockServer.stats() <hisock_gevent.server.HiSockServer.stats>` returns.  Nothing
here touches a socket or a clock other than ``time.monotonic``.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any, Dict

__all__ = [
    "Traffic",
    "ServerStats",
    "rejection_reason",
    "LEFT",
    "CONNECTION_LOST",
    "PROTOCOL_ERROR",
    "SLOW_READER",
    "IDLE_TIMEOUT",
    "KEEPALIVE_TIMEOUT",
    "KICKED",
    "SERVER_CLOSED",
    "MEMORY_LIMIT",
    "TOO_MANY_PENDING",
    "TOO_MANY_FROM_IP",
    "INVALID_NAME",
    "SERVER_FULL",
    "AUTH_FAILED",
    "NO_HELLO",
]

# Why a joined client went: ``stats()["clients"]["left"]`` counts the first, and
# ``stats()["clients"]["dropped"]`` the others by name.
#: It said goodbye (``$USRCLOSE$``) or closed its end cleanly.
LEFT = "left"
#: The connection broke: a reset, a failed write, a close in the middle of a frame.
CONNECTION_LOST = "connection_lost"
#: It sent something the protocol does not allow (see ``rejected``).
PROTOCOL_ERROR = "protocol_error"
#: It left more than ``max_queue_bytes`` unread.
SLOW_READER = "slow_reader"
#: The server held more than ``max_total_queue_bytes`` for slow clients, and this one
#: had one of the largest backlogs.
MEMORY_LIMIT = "memory_limit"
#: It sent nothing for ``idle_timeout`` seconds.
IDLE_TIMEOUT = "idle_timeout"
#: It did not answer a keepalive in time.
KEEPALIVE_TIMEOUT = "keepalive_timeout"
#: The server disconnected it (``disconnect_client``).
KICKED = "kicked"
#: The server disconnected everyone (``disconnect_all_clients`` or ``close``).
SERVER_CLOSED = "server_closed"

# Why a connection never joined (the keys of ``stats()["connections"]["refused"]``).
#: ``max_connections`` were already open.
SERVER_FULL = "server_full"
#: The ``authenticate`` check said no.
AUTH_FAILED = "auth_failed"
#: No hello arrived within ``handshake_timeout``.
NO_HELLO = "no_hello"
#: ``max_pending`` connections were still in their handshake.
TOO_MANY_PENDING = "too_many_pending"
#: ``max_connections_per_ip`` connections were already open from its address.
TOO_MANY_FROM_IP = "too_many_from_ip"
#: Its name or group was too long or not valid text.
INVALID_NAME = "invalid_name"


def rejection_reason(exc: BaseException) -> str:
    """The ``rejected`` key for a protocol error: its class name in snake case.

    ``MessageTooLarge`` -> ``message_too_large``, ``TLSError`` -> ``tls_error``.
    """
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type(exc).__name__).lower()


class Traffic:
    """Frames and bytes through all the connections of one server (or of one client)."""

    __slots__ = ("messages_in", "messages_out", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0


class ServerStats:
    """Everything :meth:`HiSockServer.stats` reports, kept as the server goes."""

    def __init__(self) -> None:
        self.traffic = Traffic()
        self.started = time.monotonic()
        self.peak_connections = 0
        self.accepted = 0
        self.joins = 0
        #: Frames (and handshakes) refused, by :func:`rejection_reason`.
        self.rejected: Counter[str] = Counter()
        #: Joined clients that went, by why (the constants above).
        self.dropped: Counter[str] = Counter()
        #: Connections closed before they joined, by why.
        self.refused: Counter[str] = Counter()

    def connection_opened(self, open_now: int) -> None:
        self.accepted += 1
        if open_now > self.peak_connections:
            self.peak_connections = open_now

    def snapshot(self, open_now: int, joined: int, groups: Dict[str, int]) -> Dict[str, Any]:
        """A JSON-ready dict of the counters, given what only the server knows right now."""
        traffic = self.traffic
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "connections": {
                "now": open_now,
                "peak": self.peak_connections,
                "accepted": self.accepted,
                "refused": dict(self.refused),
            },
            "clients": {
                "joined": joined,
                "joins": self.joins,
                "groups": groups,
                "ungrouped": joined - sum(groups.values()),
                "left": self.dropped[LEFT],
                "dropped": {reason: n for reason, n in self.dropped.items() if reason != LEFT},
            },
            "messages": {"in": traffic.messages_in, "out": traffic.messages_out},
            "bytes": {"in": traffic.bytes_in, "out": traffic.bytes_out},
            "rejected": dict(self.rejected),
        }
