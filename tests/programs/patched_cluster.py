"""Two workers joined by Redis inside one monkey-patched program (greenlets, not threads).

    python tests/programs/patched_cluster.py redis://127.0.0.1:6379/0

The backplane then runs its Redis I/O in greenlets.  Checks that a client on one worker
reaches a client on the other and that a broadcast reaches both; prints "OK" and exits 0,
or prints "FAIL <why>" and exits 1.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402
import time  # noqa: E402

import hisock_gevent  # noqa: E402

WAIT = 10.0


def main(url: str) -> int:
    servers = [hisock_gevent.ThreadedHiSockServer(("127.0.0.1", 0), backplane=url) for _ in range(2)]
    for server in servers:
        server.on("relay")(lambda client, content, server=server: server.send_client(content["to"], "msg", content["text"]))
        server.on("shout")(lambda client, content, server=server: server.send_all_clients("shout", content))
        server.start()
    got = {"alice": [], "bob": []}
    clients = {}
    for name, server in zip(got, servers):
        client = hisock_gevent.ThreadedHiSockClient(server.get_addr(), name=name)
        client.on("msg")(lambda content, name=name: got[name].append(("msg", content)))
        client.on("shout")(lambda content, name=name: got[name].append(("shout", content)))
        client.start()
        clients[name] = client
    try:
        deadline = time.monotonic() + WAIT
        # The other worker learns of bob asynchronously: retry until the relay arrives.
        while ("msg", "hi bob") not in got["bob"]:
            if time.monotonic() > deadline:
                print(f"FAIL the relay never reached bob; {got!r}; {servers[0].stats().get('cluster')!r}", flush=True)
                return 1
            clients["alice"].send("relay", {"to": "bob", "text": "hi bob"})
            time.sleep(0.1)
        clients["bob"].send("shout", "everyone")
        while not all(("shout", "everyone") in events for events in got.values()):
            if time.monotonic() > deadline:
                print(f"FAIL the broadcast did not reach everyone; {got!r}", flush=True)
                return 1
            time.sleep(0.01)
        print("OK", flush=True)
        return 0
    finally:
        for client in clients.values():
            client.close()
        for server in servers:
            server.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
