"""A monkey-patched program: ThreadedHiSockServer and ThreadedHiSockClient run as greenlets.

Checks a ping/pong, a broadcast, and that a second client's round trip completes while a
``threaded=True`` handler sleeps (time.sleep is patched, so it yields).  Prints
"OK <details>" and exits 0 on success; prints "FAIL <why>" and exits 1 otherwise.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

import hisock_gevent  # noqa: E402

WAIT = 10.0
_real_get_ident = monkey.get_original("_thread", "get_ident")
_real_enumerate = monkey.get_original("threading", "enumerate")


def fail(why: str) -> None:
    print(f"FAIL {why}", flush=True)
    sys.exit(1)


def check(condition: bool, why: str) -> None:
    if not condition:
        fail(why)


def main() -> None:
    main_hub = gevent.get_hub()
    main_thread = _real_get_ident()
    threads_before = len(_real_enumerate())
    handler_places = []
    slow_started = threading.Event()
    slow_finished = threading.Event()

    server = hisock_gevent.ThreadedHiSockServer(("127.0.0.1", 0))

    @server.on("ping")
    def ping(client, content):
        handler_places.append((_real_get_ident(), gevent.get_hub()))
        server.send_client(client, "pong", content)

    @server.on("slow", threaded=True)
    def slow(client, content):
        handler_places.append((_real_get_ident(), gevent.get_hub()))
        slow_started.set()
        time.sleep(1.0)  # patched: yields to the other greenlets
        slow_finished.set()
        server.send_client(client, "slow-done", content)

    server.start()
    check(server.get_addr()[1] != 0, "server has no port")

    got = {"first": [], "second": []}
    events = {"first": threading.Event(), "second": threading.Event()}
    clients = {}
    for label in ("first", "second"):
        client = hisock_gevent.ThreadedHiSockClient(server.get_addr(), name=label)

        def record(command, content, label=label):
            got[label].append((command, content))
            events[label].set()

        client.on("*")(record)
        client.start()
        clients[label] = client

    deadline = time.monotonic() + WAIT
    while len(server.get_all_clients()) < 2:
        check(time.monotonic() < deadline, "clients did not join")
        gevent.sleep(0.01)
    # In a patched program nothing gets its own OS thread.
    check(len(_real_enumerate()) == threads_before, f"extra OS threads: {_real_enumerate()}")

    def wait_for(label, item):
        deadline = time.monotonic() + WAIT
        while item not in got[label]:
            remaining = deadline - time.monotonic()
            check(remaining > 0, f"{label} never got {item!r}; got {got[label]!r}")
            events[label].clear()
            if item not in got[label]:
                events[label].wait(remaining)

    # Ping/pong.
    clients["first"].send("ping", 1)
    wait_for("first", ("pong", 1))

    # Broadcast reaches both.
    server.send_all_clients("news", "hello all")
    wait_for("first", ("news", "hello all"))
    wait_for("second", ("news", "hello all"))

    # A second client's round trip while a threaded handler sleeps.
    clients["first"].send("slow", "zzz")
    check(slow_started.wait(WAIT), "slow handler never started")
    started = time.monotonic()
    clients["second"].send("ping", 2)
    wait_for("second", ("pong", 2))
    overlap = time.monotonic() - started
    check(not slow_finished.is_set(), "the second client's pong waited for the sleeping handler")
    wait_for("first", ("slow-done", "zzz"))

    for ident, hub in handler_places:
        check(ident == main_thread, "a handler ran on another OS thread")
        check(hub is main_hub, "a handler ran on another hub")

    for client in clients.values():
        client.close()
    server.close()
    deadline = time.monotonic() + WAIT
    while server.get_all_clients():
        check(time.monotonic() < deadline, "clients still listed after close")
        gevent.sleep(0.01)
    print(
        f"OK patched=True handlers={len(handler_places)} pong_during_sleep={overlap:.3f}s "
        f"first={len(got['first'])} second={len(got['second'])}",
        flush=True,
    )


if __name__ == "__main__":
    with gevent.Timeout(50, RuntimeError("patched_roundtrip.py timed out")):
        main()
    sys.exit(0)
