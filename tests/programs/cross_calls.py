"""A plain program where a server and a client in the same process call into each other.

A non-threaded server handler calls the ThreadedHiSockClient (``client.send``) while a
non-threaded client handler calls the server (``server.get_all_clients``): each call is
marshalled to the other's hub thread.  Every method is documented as safe from any thread,
so both calls must complete.

Phase 1 makes the two calls cross for certain (events hold each handler until the other
has started); phase 2 lets them cross at random under load.  Prints "OK <details>" and
exits 0, or "FAIL <why>" and exits 1 (without trying to close a server that may be stuck).
"""

import os
import sys
import threading
import time

import hisock_gevent

ROUNDS = 2000
WAIT = 10.0


def main() -> int:
    server = hisock_gevent.ThreadedHiSockServer(("127.0.0.1", 0))
    server.start()
    client = hisock_gevent.ThreadedHiSockClient(server.get_addr(), name="host-player")
    # Writes straight to its socket (never bound to a hub), so it can reach the server
    # while the ThreadedHiSockClient's hub is busy.
    trigger = hisock_gevent.HiSockClient(server.get_addr(), name="trigger")

    phase = {"crossing": True}
    server_in_handler = threading.Event()
    client_in_handler = threading.Event()
    client_call_done = threading.Event()
    tock_arrived = threading.Event()
    counts = {"tick": 0, "ping": 0, "tock": 0}
    all_in = threading.Event()

    @server.on("tick")
    def tick(who, content):
        counts["tick"] += 1
        if phase["crossing"]:
            server_in_handler.set()
            client_in_handler.wait(WAIT)
        client.send("tock", content)  # server's hub thread -> client's hub thread

    @server.on("tock")
    def tock(who, content):
        counts["tock"] += 1
        tock_arrived.set()
        if counts["tock"] == ROUNDS + 1:
            all_in.set()

    @client.on("ping")
    def ping(content):
        counts["ping"] += 1
        if phase["crossing"]:
            client_in_handler.set()
            server_in_handler.wait(WAIT)
        server.get_all_clients()  # client's hub thread -> server's hub thread
        if phase["crossing"]:
            client_call_done.set()

    client.start()

    # Phase 1: the client's handler and the server's handler each call the other at once.
    server.send_all_clients("ping", -1)
    if not client_in_handler.wait(WAIT):
        print("FAIL the client never got the ping", flush=True)
        return 1
    trigger.send("tick", -1)
    if not (client_call_done.wait(WAIT) and tock_arrived.wait(WAIT)):
        print(
            "FAIL deadlock: the server's handler waits in client.send() for the client's hub, "
            "whose handler waits in server.get_all_clients() for the server's hub",
            flush=True,
        )
        return 1
    phase["crossing"] = False

    # Phase 2: both directions at once, many times.
    def ticks() -> None:
        for index in range(ROUNDS):
            client.send("tick", index)

    def pings() -> None:
        for index in range(ROUNDS):
            server.send_all_clients("ping", index)

    spammers = [threading.Thread(target=ticks, daemon=True), threading.Thread(target=pings, daemon=True)]
    for spammer in spammers:
        spammer.start()
    deadline = time.monotonic() + WAIT
    for spammer in spammers:
        spammer.join(max(0.0, deadline - time.monotonic()))
    if any(spammer.is_alive() for spammer in spammers) or not all_in.wait(WAIT):
        print(f"FAIL the cross calls stalled under load: {counts}", flush=True)
        return 1
    trigger.close()
    client.close()
    server.close()
    print(f"OK {counts}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a stuck hub thread must not keep the process alive
