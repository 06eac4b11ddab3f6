"""This worker's picture of the other workers' clients, indexed for the lookups HiSock needs.

No sockets and no Redis: :class:`Mirror` is filled from
:class:`~hisock_gevent.cluster_messages.ClientEntry` values and answers "who is at this
address / has this name / is in this group" from memory, on the hub.  It is keyed by the
cluster identity of each client, never by its address: two clients on two workers may
share an ``ip:port`` (a proxy in front of several hosts reuses source ports), and both are
kept.  For every group it also keeps which workers hold members and in which dialects, so
a group send is handed only to those workers.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .cluster_messages import ClientEntry

__all__ = ["RemoteClient", "Mirror"]

#: What a remote client's ``send`` calls: ``(client, frame)``.
Sender = Callable[["RemoteClient", bytes], None]


class RemoteClient:
    """A client held by another worker: a :class:`~hisock_gevent.registry.Peer` whose
    ``send`` goes through the cluster to its worker."""

    __slots__ = ("client_id", "info", "sock", "msgpack_ok", "worker", "joined_at", "_sender")

    def __init__(self, entry: ClientEntry, sender: Sender):
        self.client_id = entry.client_id
        self.info = entry.info
        # HiSock's ``clients`` is keyed by socket; a remote client's stand-in is its id.
        self.sock = entry.client_id
        self.msgpack_ok = entry.msgpack_ok
        self.worker = entry.worker
        self.joined_at = entry.joined_at
        self._sender = sender

    def __repr__(self) -> str:
        return f"<RemoteClient {self.client_id} {self.info}>"

    def send(self, frame: bytes) -> None:
        self._sender(self, frame)

    def entry(self) -> ClientEntry:
        info = self.info
        return ClientEntry(self.client_id, self.worker, info.ip, info.name, info.group, self.msgpack_ok, self.joined_at)


def _add(index: Dict, key: object, client: RemoteClient) -> None:
    if key is not None:
        index.setdefault(key, {})[client] = None


def _discard(index: Dict, key: object, client: RemoteClient) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(client, None)
        if not members:
            del index[key]


class Mirror:
    """The other workers' clients, by id, address, name, group and worker.

    Every list comes back in the order the clients were added (join order, as far as
    this worker saw it).
    """

    def __init__(self, sender: Sender):
        self._sender = sender
        self._by_id: Dict[str, RemoteClient] = {}
        # key -> clients, a dict used as an ordered set
        self._by_address: Dict[Tuple[str, int], Dict[RemoteClient, None]] = {}
        self._by_name: Dict[str, Dict[RemoteClient, None]] = {}
        self._by_group: Dict[str, Dict[RemoteClient, None]] = {}
        self._by_worker: Dict[str, Dict[RemoteClient, None]] = {}
        # group -> worker -> [plain members, extended members]
        self._group_workers: Dict[str, Dict[str, List[int]]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[RemoteClient]:
        return iter(list(self._by_id.values()))

    def get(self, client_id: str) -> Optional[RemoteClient]:
        return self._by_id.get(client_id)

    # ------------------------------------------------------------- changes

    def put(self, entry: ClientEntry) -> Tuple[RemoteClient, bool]:
        """Add a client or bring a known one up to date; returns it and whether it is new."""
        client = self._by_id.get(entry.client_id)
        if client is None:
            client = RemoteClient(entry, self._sender)
            self._by_id[entry.client_id] = client
            self._index(client)
            return client, True
        if client.entry() != entry:
            self._unindex(client)
            client.info = entry.info if entry.info != client.info else client.info
            client.msgpack_ok = entry.msgpack_ok
            client.worker = entry.worker
            client.joined_at = entry.joined_at
            self._index(client)
        return client, False

    def remove(self, client_id: str) -> Optional[RemoteClient]:
        """Forget a client; returns it, or None when it was not here."""
        client = self._by_id.pop(client_id, None)
        if client is not None:
            self._unindex(client)
        return client

    def _index(self, client: RemoteClient) -> None:
        info = client.info
        _add(self._by_address, info.ip, client)
        _add(self._by_name, info.name, client)
        _add(self._by_group, info.group, client)
        _add(self._by_worker, client.worker, client)
        if info.group is not None:
            counts = self._group_workers.setdefault(info.group, {}).setdefault(client.worker, [0, 0])
            counts[1 if client.msgpack_ok else 0] += 1

    def _unindex(self, client: RemoteClient) -> None:
        info = client.info
        _discard(self._by_address, info.ip, client)
        _discard(self._by_name, info.name, client)
        _discard(self._by_group, info.group, client)
        _discard(self._by_worker, client.worker, client)
        if info.group is not None:
            workers = self._group_workers.get(info.group, {})
            counts = workers.get(client.worker)
            if counts is not None:
                counts[1 if client.msgpack_ok else 0] -= 1
                if counts == [0, 0]:
                    del workers[client.worker]
                if not workers:
                    self._group_workers.pop(info.group, None)

    # ------------------------------------------------------------- lookups

    def at(self, address: Tuple[str, int]) -> List[RemoteClient]:
        """The clients at ``address`` (usually none or one)."""
        return list(self._by_address.get(address, ()))

    def named(self, name: str) -> List[RemoteClient]:
        return list(self._by_name.get(name, ()))

    def group(self, group: str) -> List[RemoteClient]:
        return list(self._by_group.get(group, ()))

    def of_worker(self, worker: str) -> List[RemoteClient]:
        return list(self._by_worker.get(worker, ()))

    def workers(self) -> List[str]:
        """Every worker that holds at least one client."""
        return list(self._by_worker)

    def group_workers(self, group: str) -> Dict[str, Tuple[bool, bool]]:
        """worker -> (has plain members, has extended members), for the workers holding
        members of ``group``."""
        return {worker: (counts[0] > 0, counts[1] > 0) for worker, counts in self._group_workers.get(group, {}).items()}
