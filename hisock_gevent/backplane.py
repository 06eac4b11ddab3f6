"""Several server processes acting as one HiSock server, joined by Redis (redis-py).

:class:`RedisBackplane` is the cluster logic of :mod:`hisock_gevent.cluster` on the Redis
transport of :mod:`hisock_gevent.redis_bus`: give it to a server as ``backplane=`` and
the server never learns that some receivers are held by other processes ("workers").

How the pieces share the work:

* :mod:`~hisock_gevent.cluster_messages`: what workers tell each other, as frozen
  classes with ``to_wire``/``from_wire`` (no I/O).
* :mod:`~hisock_gevent.cluster_mirror`, :mod:`~hisock_gevent.cluster_sync` and
  :mod:`~hisock_gevent.cluster`: every worker keeps a mirror of the other workers' clients
  (each known by a cluster-unique id), so the getters and the "who is bob?" of
  ``send_client("bob")`` are answered from memory, on the hub; sends to another worker's
  client become messages on the bus (no I/O either: the unit tests use a bus in memory).
* :mod:`~hisock_gevent.redis_store` and :mod:`~hisock_gevent.redis_bus`: the keys and
  channels in Redis, and the two loops (threads, or greenlets in a monkey-patched
  program) that publish, subscribe, beat the heartbeat and reap dead workers.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Optional

from .cluster import ClusterDelivery
from .errors import BackplaneUnreachable
from .redis_bus import BACKOFF_MAX, RedisBus

__all__ = ["RedisBackplane", "DEFAULT_HEARTBEAT_INTERVAL", "DEFAULT_WORKER_TTL", "check_url", "check_reachable"]

#: Seconds between two heartbeats of a worker (and checks of the others').
DEFAULT_HEARTBEAT_INTERVAL = 1.0
#: Seconds a worker may stay silent before the others count it dead and its clients go.
DEFAULT_WORKER_TTL = 5.0
#: Seconds :func:`check_reachable` waits for Redis to answer.
DEFAULT_CHECK_TIMEOUT = 3.0


def _redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the Redis backplane needs redis-py: pip install 'hisock_gevent[redis]'") from exc
    return redis


def check_url(url: str) -> str:
    """Check a backplane URL without connecting; returns where it points, for messages
    (``host:port`` or a socket path; never the password).

    :raises ValueError: not a ``redis://``, ``rediss://`` or ``unix://`` URL redis-py can
        use, or a database that is not a number.
    """
    from redis.connection import parse_url

    _redis_module()
    if not isinstance(url, str):
        raise ValueError(f"a backplane is a redis:// URL, not {type(url).__name__}")
    try:
        parts = parse_url(url)
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a Redis URL: {exc}") from None
    if "path" in parts:
        return str(parts["path"])
    database = url.split("?", 1)[0].partition("://")[2].partition("/")[2]
    if database and not database.isdigit():
        raise ValueError(f"{url!r} is not a Redis URL: the database {database!r} is not a number")
    return f"{parts.get('host') or 'localhost'}:{parts.get('port') or 6379}"


def check_reachable(url: str, timeout: float = DEFAULT_CHECK_TIMEOUT) -> None:
    """Ask the Redis at ``url`` for a PING, once.

    :raises ValueError: a malformed URL (see :func:`check_url`).
    :raises BackplaneUnreachable: no answer within ``timeout`` seconds, or an error (a
        wrong password, a refused connection), naming the address.
    """
    where = check_url(url)
    redis = _redis_module()
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise BackplaneUnreachable(f"cannot reach the backplane's Redis at {where}: {exc}") from None
    finally:
        client.close()


class RedisBackplane(ClusterDelivery):
    """Deliver to the clients of every worker sharing one Redis.

    :param url: ``redis://host:port/db`` (anything ``redis.Redis.from_url`` takes).
    :param namespace: prefix of every key and channel; workers with the same namespace
        and Redis form one server.
    :param heartbeat_interval: seconds between refreshes of this worker's heartbeat.
    :param worker_ttl: seconds after its last heartbeat that a silent worker counts as
        dead and its clients leave.
    :param worker_id: this worker's name in Redis (default ``host:pid:random``).
    :raises ValueError: a malformed URL (see :func:`check_url`); nothing is connected yet.

    The server starts it; if Redis cannot be reached then, the worker serves its own
    clients alone and keeps trying (``stats()["cluster"]`` says ``"redis": "down"`` and for
    how long).  Call :meth:`check_reachable` first to refuse to start without it, as
    ``hisock-gevent serve --backplane`` does unless given ``--backplane-optional``.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "hisock",
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        worker_ttl: float = DEFAULT_WORKER_TTL,
        worker_id: Optional[str] = None,
    ):
        redis = _redis_module()
        if worker_ttl <= heartbeat_interval:
            raise ValueError("worker_ttl must be longer than heartbeat_interval")
        #: Where the URL points (``host:port``), for messages; never the password.
        self.address = check_url(url)
        self.url = url
        self.namespace = namespace
        self.heartbeat_interval = heartbeat_interval
        self.worker_ttl = worker_ttl
        worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.redis_bus = RedisBus(redis, url, self.address, namespace, worker_id, heartbeat_interval, worker_ttl)
        # After Redis restarts empty, a worker writes its clients back within its backoff
        # and a heartbeat; one that has not by then is gone.
        super().__init__(self.redis_bus, resync_grace=worker_ttl + 2 * BACKOFF_MAX)

    def __repr__(self) -> str:
        return f"<RedisBackplane {self.address} ns={self.namespace} worker={self.worker_id}>"

    def check_reachable(self, timeout: float = DEFAULT_CHECK_TIMEOUT) -> None:
        """:func:`check_reachable` for this backplane's Redis.

        :raises BackplaneUnreachable: it does not answer.
        """
        check_reachable(self.url, timeout)
