"""A plain (not monkey-patched) program shaped like a Tkinter/pygame app.

The main thread runs a "frame loop": each frame it drains a queue.Queue that the client's
handlers fill, and now and then sends an "input" to the server, like a key press.  The
server (ThreadedHiSockServer) answers every input with a "state" update; the client comes
from threaded_connect.  The loop stops after N updates.  Prints "OK <details>" and exits 0,
or "FAIL <why>" and exits 1.
"""

import queue
import sys
import threading
import time

import hisock_gevent

UPDATES = 100
FRAME_SECONDS = 0.002
DEADLINE_SECONDS = 30.0


def main() -> int:
    main_ident = threading.get_ident()
    server = hisock_gevent.ThreadedHiSockServer(("127.0.0.1", 0))
    handler_threads = set()

    @server.on("input")
    def on_input(client, content):
        handler_threads.add(threading.get_ident())
        server.send_client(client, "state", {"frame": content, "square": content * content})

    server.start()
    client = hisock_gevent.threaded_connect(server.get_addr(), name="gui")
    inbox: queue.Queue = queue.Queue()

    @client.on("state")
    def on_state(content):
        handler_threads.add(threading.get_ident())
        inbox.put(content)

    client.start()

    frames = 0
    sent = 0
    seen = []
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        while len(seen) < UPDATES:
            if time.monotonic() > deadline:
                print(f"FAIL only {len(seen)} of {UPDATES} updates after {frames} frames", flush=True)
                return 1
            frames += 1
            # "Input": one key press every other frame, never more than UPDATES.
            if frames % 2 == 0 and sent < UPDATES:
                client.send("input", sent)
                sent += 1
            # "Render": take whatever the network delivered, without blocking.
            while True:
                try:
                    seen.append(inbox.get_nowait())
                except queue.Empty:
                    break
            time.sleep(FRAME_SECONDS)  # the frame rate, as a GUI loop would
    finally:
        client.close()
        server.close()

    expected = [{"frame": n, "square": n * n} for n in range(UPDATES)]
    if seen != expected:
        print(f"FAIL updates out of order or wrong: {seen[:5]!r}...", flush=True)
        return 1
    if main_ident in handler_threads:
        print("FAIL a handler ran on the main thread", flush=True)
        return 1
    leftovers = [t.name for t in threading.enumerate() if t.name in ("hisock-server", "hisock-client")]
    if leftovers:
        print(f"FAIL threads still running after close: {leftovers}", flush=True)
        return 1
    print(f"OK updates={len(seen)} frames={frames} handler_threads={len(handler_threads)}", flush=True)
    return 0


if __name__ == "__main__":
    watchdog = threading.Timer(50, lambda: (print("FAIL watchdog", flush=True), __import__("os")._exit(2)))
    watchdog.daemon = True
    watchdog.start()
    code = main()
    watchdog.cancel()
    sys.exit(code)
