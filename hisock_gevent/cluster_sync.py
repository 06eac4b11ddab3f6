"""Keeping this worker's mirror in step with the other workers, and telling its clients once.

No I/O: :class:`MirrorSync` takes the membership news of the cluster (the
:mod:`~hisock_gevent.cluster_messages` ``Joined``, ``Changed``, ``Left``, ``Here`` and
``Reaped``, and snapshots of the shared table) and applies it to a
:class:`~hisock_gevent.cluster_mirror.Mirror`.  Whenever a client is added to the mirror
or removed from it, whatever the reason (a join or a leave, a dead worker reaped, a worker
writing its clients back after the others reaped it, a resynchronisation after this worker
lost Redis), it calls ``announce(PeerJoined or PeerLeft, info)`` exactly once, so this
worker's clients see the same comings and goings as the mirror; and whenever a client it
knows changes its name or group (a ``Changed``, or a newer entry in a ``Here`` or a
snapshot), it calls ``on_change(old info, new info)``, so a group change can be announced
where the announcement scope says.  The first snapshot, taken before anyone of ours joined,
is silent.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from .cluster_messages import Changed, ClientEntry, Here, Joined, Left, Reaped
from .cluster_mirror import Mirror
from .messages import PeerJoined, PeerLeft
from .utils import ClientInfo

__all__ = ["MirrorSync", "DEFAULT_RESYNC_GRACE"]

logger = logging.getLogger("hisock_gevent")

#: Seconds a worker missing from a fresh snapshot keeps its clients in the mirror, waiting
#: for it to write them back (Redis restarted empty); then they leave.
DEFAULT_RESYNC_GRACE = 5.0
# How many kicked clients' ids are remembered until their worker says they left.
_KICKED_MAX = 4096

#: ``announce(PeerJoined or PeerLeft, info)``: tell our clients.
Announce = Callable[[Any, ClientInfo], None]
#: ``on_change(old, new)``: a known client's name or group changed.
OnChange = Callable[[ClientInfo, ClientInfo], None]


class MirrorSync:
    """Apply the others' membership news to ``mirror``; see the module docstring.

    :param worker_id: this worker: news about it is not for the mirror.
    :param resync_grace: see :data:`DEFAULT_RESYNC_GRACE`.
    :param on_change: called with the old and the new info of a known client that changed.
    """

    def __init__(
        self,
        mirror: Mirror,
        worker_id: str,
        announce: Announce,
        resync_grace: float = DEFAULT_RESYNC_GRACE,
        on_change: Optional[OnChange] = None,
    ):
        self.mirror = mirror
        self.worker_id = worker_id
        self.resync_grace = resync_grace
        self._announce = announce
        self._on_change = on_change
        # Ids of other workers' clients forgotten when we asked their worker to disconnect
        # them: their ``Left`` is still announced here.
        self._kicked: Dict[str, None] = collections.OrderedDict()
        # A worker's complete list arriving in several Here messages: the ids so far.
        self._here_ids: Dict[str, Set[str]] = {}
        # Workers missing from the last snapshot: when their clients leave unless they
        # write them back first (time.monotonic()).
        self._unconfirmed: Dict[str, float] = {}
        self._snapshots = 0

    # ------------------------------------------------------------------ messages

    def joined(self, message: Joined) -> None:
        self._add(message.entry)

    def changed(self, message: Changed) -> None:
        if self.mirror.get(message.entry.client_id) is not None:
            self._add(message.entry)

    def left(self, message: Left) -> None:
        entry = message.entry
        known = self._remove(entry.client_id, announce=False)
        kicked = self._kicked.pop(entry.client_id, 0) is None
        if known or kicked:
            self._announce(PeerLeft, entry.info)

    def here(self, message: Here) -> None:
        """A worker wrote its clients back: with its last part, the mirror holds exactly
        them (whoever is new is announced, whoever is missing has left)."""
        ids = self._here_ids.setdefault(message.origin, set())
        for entry in message.entries:
            ids.add(entry.client_id)
            self._add(entry)
        if message.complete:
            del self._here_ids[message.origin]
            self._keep_only(message.origin, ids, announce=True)

    def reaped(self, message: Reaped) -> None:
        """``message.worker`` was found dead: its clients leave (the ones listed, and
        whatever else the mirror held of it: the table is the truth)."""
        if message.worker == self.worker_id:
            return  # about us: news for the bus, which writes our clients back
        for entry in message.entries:
            self._remove(entry.client_id)
        self._drop_worker(message.worker, announce=True)

    def kicked(self, client_id: str) -> None:
        """We asked the worker of this client to disconnect it: forget it now, and still
        announce its ``Left`` when it comes."""
        self._remove(client_id, announce=False)
        self._kicked[client_id] = None
        while len(self._kicked) > _KICKED_MAX:
            self._kicked.pop(next(iter(self._kicked)))

    # ------------------------------------------------------------------ snapshots

    def load_snapshot(self, workers: Iterable[str], entries: Iterable[ClientEntry]) -> None:
        """The shared table as read just after (re)subscribing: the live ``workers`` and
        their clients.

        Each listed worker's clients in the mirror become exactly these (our clients hear
        the differences, except on the first snapshot).  A worker the mirror knows but the
        snapshot does not list keeps its clients for :attr:`resync_grace` seconds: if Redis
        restarted empty it writes them back (a ``Here``); if it died meanwhile, they leave.
        """
        first = self._snapshots == 0
        self._snapshots += 1
        listed = {worker for worker in workers if worker != self.worker_id}
        by_worker: Dict[str, List[ClientEntry]] = {worker: [] for worker in listed}
        for entry in entries:
            if entry.worker in listed:
                by_worker[entry.worker].append(entry)
        for worker, found in by_worker.items():
            for entry in found:
                self._add(entry, announce=not first)
            self._keep_only(worker, {entry.client_id for entry in found}, announce=not first)
        for worker in self.mirror.workers():
            if worker in listed or worker == self.worker_id:
                continue
            if first:
                self._drop_worker(worker, announce=False)
            else:
                self._unconfirmed.setdefault(worker, time.monotonic() + self.resync_grace)

    def tick(self, now: Optional[float] = None) -> None:
        """Called now and then (each heartbeat): workers that never wrote their clients
        back after a snapshot missed them are gone, and so are their clients."""
        now = time.monotonic() if now is None else now
        for worker, deadline in list(self._unconfirmed.items()):
            if deadline <= now:
                logger.warning("backplane: worker %s did not come back; its clients leave", worker)
                self._drop_worker(worker, announce=True)

    # ------------------------------------------------------------------ the mirror, announced

    def _keep_only(self, worker: str, ids: Set[str], announce: bool) -> None:
        """``worker``'s clients in the mirror are only ``ids`` now; it is confirmed alive."""
        for client in self.mirror.of_worker(worker):
            if client.client_id not in ids:
                self._remove(client.client_id, announce)
        self._unconfirmed.pop(worker, None)

    def _drop_worker(self, worker: str, announce: bool) -> None:
        for client in self.mirror.of_worker(worker):
            self._remove(client.client_id, announce)
        self._unconfirmed.pop(worker, None)
        self._here_ids.pop(worker, None)

    def _add(self, entry: ClientEntry, announce: bool = True) -> None:
        known = self.mirror.get(entry.client_id)
        before = known.info if known is not None else None
        client, new = self.mirror.put(entry)
        if not announce:
            return
        if new:
            self._announce(PeerJoined, entry.info)
        elif before is not None and before != client.info and self._on_change is not None:
            self._on_change(before, client.info)

    def _remove(self, client_id: str, announce: bool = True) -> bool:
        client = self.mirror.remove(client_id)
        if client is not None and announce:
            self._announce(PeerLeft, client.info)
        return client is not None
