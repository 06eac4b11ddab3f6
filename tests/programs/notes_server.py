"""A server that writes down what it hears, for the reconnecting client tests.

Usage: ``python notes_server.py PORT``.  Prints ``READY`` once serving; ``JOIN <name>
<group>`` for each join; ``NOTE <name> <group> <content>`` for each ``note`` command.
``disconnect`` (content: a name) disconnects that client.  Ends when stdin closes (a
graceful close) or when killed.
"""

import sys
import threading

import hisock_gevent

port = int(sys.argv[1])
out = threading.Lock()


def say(line: str) -> None:
    with out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


server = hisock_gevent.HiSockServer(("127.0.0.1", port))


@server.on("join")
def join(client):
    say(f"JOIN {client.name} {client.group}")


@server.on("note")
def note(client, content):
    say(f"NOTE {client.name} {client.group} {content}")


@server.on("kick")
def kick(client, content):
    server.disconnect_client(content)


def watch_stdin():
    sys.stdin.read()
    server.close(timeout=1)


threading.Thread(target=watch_stdin, daemon=True).start()
say("READY")
server.start()
