"""Soak clients: a few hundred HiSockClients in the greenlets of one monkey-patched process.

Run by tests/test_soak.py against a server in the test process.  Each worker, with its
own seeded random generator, joins, then until the deadline sends numbered notes to other
clients (by name) and to groups, changes its name and group, asks the server about other
clients, and now and then leaves and joins again as a new connection.  Afterwards each
live worker sends ``fin``; the controller connection (``__ctl__``) tells the server
``allfin`` with the live connections; the server answers every client with ``finack``
once it has handled every ``fin`` (so everything meant for a client is in its stream
before the ``finack``).  The workers then stop, the report is written to ``--report``
(JSON), the controller says ``reported``, and on the server's ``closeall`` every client
leaves and the program exits 0.  Every wait is bounded; on a failure it still writes a
report (with ``errors``) and exits 1.

The server's side of the protocol: on ``join`` it sends the new connection ``welcome``
with an id for it; notes ``{"to": name}`` / ``{"group": g}`` with ``"n"`` are forwarded
as ``msg`` ``[sender id, n]``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

import hisock_gevent  # noqa: E402

GROUPS = [f"g{index}" for index in range(8)]
CONTROLLER = "__ctl__"
STEP_WAIT = 60.0  # seconds any one phase may take after the soak itself


class Record:
    """What one connection did and received."""

    def __init__(self, name: str, group: Optional[str]):
        self.conn_id: Optional[str] = None
        self.ipstr = ""
        self.name = name
        self.group = group
        self.sent: List[int] = []
        self.received: List[List[Any]] = []
        self.name_changes = 0
        self.group_changes = 0
        self.lookups = 0
        self.left = False
        self.odd: List[Any] = []
        self.welcome = Event()
        self.finack = Event()

    def report(self) -> Dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "ipstr": self.ipstr,
            "name": self.name,
            "group": self.group,
            "sent": self.sent,
            "received": self.received,
            "name_changes": self.name_changes,
            "group_changes": self.group_changes,
            "lookups": self.lookups,
            "left": self.left,
            "odd": self.odd,
        }


class Worker:
    def __init__(self, index: int, addr: Any, seed: int, deadline: float, live_names: Dict[int, str], errors: List[str]):
        self.index = index
        self.addr = addr
        self.rng = random.Random(seed * 1_000_003 + index)
        self.deadline = deadline
        self.live_names = live_names
        self.errors = errors
        self.records: List[Record] = []
        self.client: Optional[hisock_gevent.ThreadedHiSockClient] = None
        self.record: Optional[Record] = None
        self.generation = 0
        self.renames = 0
        self.fin_sent = Event()
        self.done = Event()

    def _new_name(self) -> str:
        self.renames += 1
        return f"c{self.index}.{self.generation}.{self.renames}"

    def join(self) -> None:
        self.generation += 1
        name = self._new_name()
        group = self.rng.choice(GROUPS + [None])
        record = Record(name, group)
        client = hisock_gevent.ThreadedHiSockClient(self.addr, name, group, answer_timeout=STEP_WAIT)
        record.ipstr = "{}:{}".format(*client.get_client_addr())

        @client.on("welcome")
        def welcome(conn_id: Any) -> None:
            record.conn_id = conn_id
            record.welcome.set()

        @client.on("msg")
        def msg(item: Any) -> None:
            record.received.append(item)

        @client.on("finack")
        def finack() -> None:
            record.finack.set()

        @client.on("*")
        def anything(command: str, content: Any) -> None:
            record.odd.append([command, repr(content)])

        @client.on("force_disconnect")
        def forced() -> None:
            record.odd.append(["force_disconnect", None])

        client.start()
        if not record.welcome.wait(STEP_WAIT):
            raise RuntimeError(f"{name}: no welcome from the server")
        self.client, self.record = client, record
        self.records.append(record)
        self.live_names[self.index] = name

    def leave(self) -> None:
        assert self.client is not None and self.record is not None
        self.live_names.pop(self.index, None)
        self.client.close()
        self.record.left = True
        self.client = self.record = None

    def step(self) -> None:
        client, record, rng = self.client, self.record, self.rng
        assert client is not None and record is not None
        roll = rng.random()
        if roll < 0.70:
            names = list(self.live_names.values())
            n = len(record.sent)
            record.sent.append(n)
            client.send("note", {"to": rng.choice(names), "n": n})
        elif roll < 0.78:
            n = len(record.sent)
            record.sent.append(n)
            client.send("note", {"group": rng.choice(GROUPS), "n": n})
        elif roll < 0.85:
            name = self._new_name()
            client.change_name(name)
            record.name_changes += 1
            record.name = client.name
            self.live_names[self.index] = name
        elif roll < 0.92:
            client.change_group(rng.choice(GROUPS + [None]))
            record.group_changes += 1
            record.group = client.group
        elif roll < 0.99:
            record.lookups += 1
            try:
                info = client.get_client(rng.choice(list(self.live_names.values())))
            except hisock_gevent.ClientNotFound:
                pass  # renamed or gone meanwhile
            else:
                if not isinstance(info, hisock_gevent.ClientInfo):
                    record.odd.append(["get_client", repr(info)])
        else:
            self.leave()
            self.join()

    def run(self) -> None:
        try:
            self.join()
            while time.monotonic() < self.deadline:
                self.step()
                gevent.sleep(self.rng.uniform(0.05, 0.25))
            assert self.client is not None and self.record is not None
            self.client.send("fin", len(self.record.sent))
            self.fin_sent.set()
            if not self.record.finack.wait(STEP_WAIT):
                raise RuntimeError(f"worker {self.index}: no finack")
        except BaseException:
            self.errors.append(f"worker {self.index}: {traceback.format_exc()}")
        finally:
            self.fin_sent.set()
            self.done.set()


def wait_all(events: List[Event], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for event in events:
        if not event.wait(max(0.0, deadline - time.monotonic())):
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=250)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    addr = ("127.0.0.1", args.port)
    errors: List[str] = []
    live_names: Dict[int, str] = {}
    closeall = Event()

    ctl = hisock_gevent.ThreadedHiSockClient(addr, CONTROLLER, None, answer_timeout=STEP_WAIT)
    ctl.on("closeall")(lambda: closeall.set())
    ctl.start()

    deadline = time.monotonic() + args.ramp + args.seconds
    workers = [Worker(index, addr, args.seed, deadline, live_names, errors) for index in range(args.clients)]
    greenlets = [gevent.spawn_later(args.ramp * index / args.clients, worker.run) for index, worker in enumerate(workers)]

    if not wait_all([w.fin_sent for w in workers], args.ramp + args.seconds + STEP_WAIT):
        errors.append("not every worker sent fin in time")
    live = [w.record.conn_id for w in workers if w.record is not None and w.client is not None]
    ctl.send("allfin", live)
    if not wait_all([w.done for w in workers], STEP_WAIT):
        errors.append("not every worker got its finack in time")
    records = [record.report() for w in workers for record in w.records]
    with open(args.report, "w") as out:
        json.dump({"errors": errors, "live": live, "records": records, "clients": args.clients}, out)
    ctl.send("reported")

    if not closeall.wait(STEP_WAIT * 2):
        errors.append("no closeall from the server")
    closers = [gevent.spawn(w.client.close) for w in workers if w.client is not None]
    gevent.joinall(closers, timeout=STEP_WAIT)
    gevent.joinall(greenlets, timeout=STEP_WAIT)
    ctl.close()
    if errors:
        print("FAIL", *errors, sep="\n", flush=True)
        return 1
    print("OK", len(records), "connections", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
