"""Several server processes acting as one HiSock server, joined by Redis (redis-py).

:class:`RedisBackplane` is the cluster logic of :mod:`hisock_gevent.cluster` on the Redis
transport of :mod:`hisock_gevent.redis_bus`: give it to a server as ``backplane=`` and
the server never learns that some receivers are held by other processes ("workers").

How the pieces share the work:

* :mod:`~hisock_gevent.cluster_messages`: what workers tell each other, as frozen
  classes with ``to_wire``/``from_wire`` (no I/O).
* :mod:`~hisock_gevent.cluster_mirror` and :mod:`~hisock_gevent.cluster`: every worker
  keeps a mirror of the other workers' clients, so the getters and the "who is bob?" of
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
from typing import Optional

from .cluster import ClusterDelivery
from .redis_bus import RedisBus

__all__ = ["RedisBackplane", "DEFAULT_HEARTBEAT_INTERVAL", "DEFAULT_WORKER_TTL"]

#: Seconds between two heartbeats of a worker (and checks of the others').
DEFAULT_HEARTBEAT_INTERVAL = 1.0
#: Seconds a worker may stay silent before the others count it dead and its clients go.
DEFAULT_WORKER_TTL = 5.0


class RedisBackplane(ClusterDelivery):
    """Deliver to the clients of every worker sharing one Redis.

    :param url: ``redis://host:port/db`` (anything ``redis.Redis.from_url`` takes).
    :param namespace: prefix of every key and channel; workers with the same namespace
        and Redis form one server.
    :param heartbeat_interval: seconds between refreshes of this worker's heartbeat.
    :param worker_ttl: seconds after its last heartbeat that a silent worker counts as
        dead and its clients leave.
    :param worker_id: this worker's name in Redis (default ``host:pid:random``).
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
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("the Redis backplane needs redis-py: pip install 'hisock_gevent[redis]'") from exc
        if worker_ttl <= heartbeat_interval:
            raise ValueError("worker_ttl must be longer than heartbeat_interval")
        self.url = url
        self.namespace = namespace
        self.heartbeat_interval = heartbeat_interval
        self.worker_ttl = worker_ttl
        worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.redis_bus = RedisBus(redis, url, namespace, worker_id, heartbeat_interval, worker_ttl)
        super().__init__(self.redis_bus)

    def __repr__(self) -> str:
        return f"<RedisBackplane {self.url} ns={self.namespace} worker={self.worker_id}>"
