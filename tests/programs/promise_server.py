"""A HiSockServer in a process of its own, for the attack tests (tests/test_promise.py).

Usage: ``python promise_server.py '{"max_queue_bytes": 1048576, ...}'``: the JSON object
holds keyword arguments for :class:`hisock_gevent.HiSockServer` (plus ``"patched": true``
to monkey-patch the process first).  The server binds 127.0.0.1 on a free port, serves
its statistics on another, and prints one line ``READY <port> <stats_port>`` on stdout.
It is alone in its process so that its memory (``/proc/<pid>/status``) and its hub are
measured without the test's own threads in the way.

Handlers: ``ping`` and ``echo`` send the content back to the sender; ``sink`` takes the
content and does nothing; ``blast`` (from any client) sends ``[count, size]`` broadcasts
of ``size`` bytes to everyone; ``feed`` ``[name, count, size]`` sends ``count`` messages of
``size`` bytes to the client ``name`` and prints ``FED <name>``; ``join`` and
``leave`` print ``JOIN <name>`` / ``LEAVE <name>`` on stdout, and a ``leave`` first
yields to the hub (``gevent.sleep``), so a ``leave`` run where it may not block shows up
as an error line.  Errors in handlers are printed as ``ERROR <repr>``.  The process
exits when stdin closes.
"""

import json
import sys

options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
if options.pop("patched", False):
    from gevent import monkey

    monkey.patch_all()

import logging  # noqa: E402
import threading  # noqa: E402

import gevent  # noqa: E402

import hisock_gevent  # noqa: E402

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
out_lock = threading.Lock()


def say(line: str) -> None:
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


server = hisock_gevent.HiSockServer(("127.0.0.1", 0), **options)


@server.on("join")
def on_join(client):
    say(f"JOIN {client.name}")


@server.on("leave")
def on_leave(client):
    gevent.sleep(0.001)  # cooperative I/O in a leave handler must be allowed
    say(f"LEAVE {client.name}")


@server.on("ping")
def on_ping(client, content):
    server.send_client(client, "ping", content)


@server.on("echo")
def on_echo(client, content):
    server.send_client(client, "echo", content)


@server.on("sink")
def on_sink(client, content):
    pass


@server.on("feed")
def on_feed(client, content):
    name, count, size = content
    payload = b"f" * size
    for _ in range(count):
        server.send_client(name, "feed", payload)
        gevent.sleep(0)
    say(f"FED {name}")


@server.on("blast")
def on_blast(client, content):
    count, size = content
    payload = b"x" * size
    for _ in range(count):
        server.send_all_clients("blast", payload)
        gevent.sleep(0)


def on_error(exc):
    say(f"ERROR {exc!r}")


def watch_stdin():
    sys.stdin.read()
    server.close(timeout=1)


stats_host, stats_port = server.serve_stats("127.0.0.1", 0)
threading.Thread(target=watch_stdin, daemon=True).start()
say(f"READY {server.get_addr()[1]} {stats_port}")
server.start(error_handler=on_error)
