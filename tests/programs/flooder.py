"""A client that floods a server, in a process of its own (tests/test_promise.py, item 1).

Usage: ``python flooder.py PORT COMMAND READ`` (READ is 1 to read and throw away what the
server sends back, 0 to never read).  It joins as ``flooder``, prints ``JOINED``, then
sends small ``COMMAND`` frames as fast as loopback takes them until stdin closes, and
prints ``SENT <bytes>`` every 0.2 s and once more at the end.  Being its own process, it
takes nothing from the measuring test's threads (no shared GIL).
"""

import json
import socket
import sys
import threading
import time

port, command, read = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"


def frame(body: bytes) -> bytes:
    return str(len(body)).encode().ljust(16) + body


sock = socket.create_connection(("127.0.0.1", port))
sock.sendall(frame(b"$CLTHELLO$" + json.dumps({"name": "flooder", "group": None}).encode()))
header = b""
while len(header) < 16:
    header += sock.recv(16 - len(header))
body = b""
while len(body) < int(header):
    body += sock.recv(int(header) - len(body))
print("JOINED", flush=True)

payload = b"x" * 10
one = frame(b"$CMD$" + command.encode() + b"$MSG$" + b"3".ljust(8) + b"10s" + payload)
blob = one * 20_000
sent = [0]
stop = threading.Event()


def drain() -> None:
    buffer = bytearray(1 << 20)
    try:
        while not stop.is_set() and sock.recv_into(buffer):
            pass
    except OSError:
        pass


def flood() -> None:
    try:
        while not stop.is_set():
            sock.sendall(blob)
            sent[0] += len(blob)
    except OSError:
        pass


def report() -> None:
    while not stop.is_set():
        print("SENT", sent[0], flush=True)
        time.sleep(0.2)


if read:
    threading.Thread(target=drain, daemon=True).start()
threading.Thread(target=flood, daemon=True).start()
threading.Thread(target=report, daemon=True).start()
sys.stdin.read()
stop.set()
print("SENT", sent[0], flush=True)
try:
    sock.shutdown(socket.SHUT_RDWR)
except OSError:
    pass
sock.close()
