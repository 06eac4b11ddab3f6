"""A plain program where a server and a client in the same process call into each other.

A non-threaded server handler calls the ThreadedHiSockClient (``client.send``) while a
non-threaded client handler calls the server (``server.get_all_clients``): each call is
marshalled to the other's hub thread.  Every method is documented as safe from any thread,
so the traffic must all get through.  Prints "OK <details>" and exits 0, or "FAIL <why>"
and exits 1 (without trying to close a server that may be stuck).
"""

import os
import sys
import threading
import time

import hisock_gevent

ROUNDS = 5000
WAIT = 15.0


def main() -> int:
    server = hisock_gevent.ThreadedHiSockServer(("127.0.0.1", 0))
    server.start()
    client = hisock_gevent.ThreadedHiSockClient(server.get_addr(), name="host-player")
    counts = {"tick": 0, "ping": 0, "tock": 0}
    all_in = threading.Event()

    @server.on("tick")
    def tick(who, content):
        counts["tick"] += 1
        client.send("tock", content)  # server's hub thread -> client's hub thread

    @server.on("tock")
    def tock(who, content):
        counts["tock"] += 1
        if counts["tock"] == ROUNDS:
            all_in.set()

    @client.on("ping")
    def ping(content):
        counts["ping"] += 1
        server.get_all_clients()  # client's hub thread -> server's hub thread

    client.start()

    def ticks() -> None:
        for index in range(ROUNDS):
            client.send("tick", index)

    def pings() -> None:
        for index in range(ROUNDS):
            server.send_all_clients("ping", index)

    # Both directions at once, so the two handlers' calls keep crossing.
    spammers = [threading.Thread(target=ticks, daemon=True), threading.Thread(target=pings, daemon=True)]
    for spammer in spammers:
        spammer.start()
    deadline = time.monotonic() + WAIT
    for spammer in spammers:
        spammer.join(max(0.0, deadline - time.monotonic()))
    if any(spammer.is_alive() for spammer in spammers) or not all_in.wait(WAIT):
        print(f"FAIL the cross calls stalled: {counts}", flush=True)
        return 1
    client.close()
    server.close()
    print(f"OK {counts}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a stuck hub thread must not keep the process alive
