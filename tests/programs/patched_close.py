"""A monkey-patched program whose server closes while ``threaded=True`` handlers sleep.

Run by tests/test_promise.py (item 13).  Three handlers are asleep in ``time.sleep`` (a
greenlet each, the program being patched) when ``close(1)`` is called; afterwards none of
the server's greenlets may be left, and none of the handlers may send anything.  Prints
one JSON line: ``close_took`` (seconds), ``greenlets_left`` (live greenlets spawned since
the program began) and ``late_sends`` (sends the sleeping handlers made after close).
"""

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

import hisock_gevent  # noqa: E402


def live_greenlets() -> int:
    """Greenlets spawned on this thread's hub that have not ended (gevent's own thread
    pool workers, which the resolver may have started, are not ours to count)."""
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, gevent.Greenlet) and not obj.dead and type(obj).__name__ != "ThreadPoolWorker"
    )


def main() -> None:
    before = live_greenlets()
    server = hisock_gevent.ThreadedHiSockServer(("127.0.0.1", 0))
    late = []
    asleep = []

    @server.on("nap", threaded=True)
    def nap(client):
        asleep.append(client.name)
        time.sleep(5)
        server.send_client(client, "late", 1)
        late.append(client.name)

    server.start()
    clients = [hisock_gevent.ThreadedHiSockClient(server.get_addr(), f"c{index}") for index in range(3)]
    for client in clients:
        client.start()
        client.send("nap")
    deadline = time.monotonic() + 10
    while len(asleep) < 3 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    for client in clients:
        client.close()
    began = time.monotonic()
    server.close(1)
    took = time.monotonic() - began
    left = live_greenlets() - before
    gevent.sleep(6)  # long enough for the naps to have ended, had they survived
    print(json.dumps({"close_took": took, "greenlets_left": left, "late_sends": len(late), "asleep": len(asleep)}))


if __name__ == "__main__":
    main()
