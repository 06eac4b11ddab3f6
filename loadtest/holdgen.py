"""Load generator for bench.py's S6: tens of thousands of held HiSock clients, one epoll.

S6 asks one server process to hold as many joined clients as the machine allows (100,000
where it allows that many), so the generator must cost far less per client than the
server it measures.  Here a client is a non-blocking stdlib socket and a small slotted
record; one thread waits on one ``epoll`` for all of them (no gevent, no greenlets, no
library client).  Every client says a plain ``$CLTHELLO$`` and counts as joined only once
its own ``$CLTCONN$`` arrived.

One process holds at most ``RLIMIT_NOFILE`` sockets, so bench.py starts several.  One
source address gives at most one connection per ephemeral port to the server's
``(ip, port)``, so client ``i`` of the whole run (``first + k`` in this process) binds to
``sources[i // per_source]`` before it connects, with ``IP_BIND_ADDRESS_NO_PORT`` so that
the port is chosen at ``connect`` by the 4-tuple, not reserved at ``bind``.  Traffic goes
only to 127.0.0.x.

Driven by bench.py like ``loadgen.py``: JSON lines out (``progress`` about every second
of the ramp, ``ready``, ``held``, ``sent``, ``got``), commands in (``check``, ``send SEQ``,
``quit``; end of stdin means quit).

    python loadtest/holdgen.py --port PORT --params '{"clients": 5000, "first": 0,
        "per_source": 10000, "sources": ["127.0.0.2", "127.0.0.3"], "sender": true}'
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire

HEADER_LEN = wire.HEADER_LEN
RECV_CHUNK = 64 * 1024
#: Linux's IP_BIND_ADDRESS_NO_PORT (Python has the name from 3.12 on).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: Connections being opened and hand-shaken at once by one process (the server refuses
#: connections beyond its ``max_pending``, 4096 by default, for all generators together).
DEFAULT_CONCURRENCY = 500
#: Seconds between two ``progress`` lines during the ramp (joins/s early and late in it).
PROGRESS_EVERY = 0.25

CONNECTING, HANDSHAKE, JOINED = 0, 1, 2
#: The command of the message each client sends after joining with ``say_bytes``.
SAY_COMMAND = "said"

now = time.monotonic


def emit(ev: str, **fields: Any) -> None:
    fields["ev"] = ev
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Client:
    """One held connection: its socket, where it is in the handshake, unparsed bytes."""

    __slots__ = ("sock", "state", "buffer", "marker", "started")

    def __init__(self, sock: socket.socket, started: float):
        self.sock = sock
        self.state = CONNECTING
        self.buffer = b""
        self.marker = b""
        self.started = started


def split_bodies(data: bytes) -> Tuple[List[bytes], bytes]:
    """The complete bodies at the front of ``data`` and the bytes left over.

    :raises ValueError: a header that is not a decimal number.
    """
    bodies: List[bytes] = []
    pos, end = 0, len(data)
    while end - pos >= HEADER_LEN:
        start = pos + HEADER_LEN
        stop = start + int(data[pos:start])
        if stop > end:
            break
        bodies.append(data[start:stop])
        pos = stop
    return bodies, data[pos:]


class HoldGenerator:
    """Opens ``count`` clients (``concurrency`` at a time), holds them, times broadcasts."""

    def __init__(self, addr: Tuple[str, int], params: Dict[str, Any]):
        self.addr = addr
        self.count: int = params["clients"]
        self.first: int = params.get("first", 0)
        self.sources: List[str] = params.get("sources") or ["127.0.0.1"]
        self.per_source: int = params.get("per_source", 10_000)
        self.concurrency: int = params.get("concurrency", DEFAULT_CONCURRENCY)
        self.connect_timeout: float = params.get("connect_timeout", 30.0)
        self.ramp_deadline = now() + params.get("ramp_timeout", 300.0)
        self.sender: bool = bool(params.get("sender"))
        self.padding: int = params.get("size", 64)
        # Each client sends one message of this many bytes as soon as it has joined (a
        # command nobody handles), so the server holds clients that have spoken once.
        say = params.get("say_bytes", 0)
        self.say = wire.command_frame(SAY_COMMAND, b"x" * say) if say else b""
        self.epoll = select.epoll()
        self.clients: Dict[int, Client] = {}
        self.pending: Dict[int, Client] = {}  # fd -> client still connecting or hand-shaking
        self.started = 0
        self.joined = 0
        self.alive = 0
        self.errors: Counter[str] = Counter()
        self.ramping = True
        self.quit = False
        self.first_joined: Optional[int] = None  # fd of a joined client (the broadcast sender)
        self.got: Dict[int, List[Any]] = {}  # seq -> [count, first, last, expected]
        self.prefix = wire.command_prefix(wire.BROADCAST)
        self.hello = wire.hello_frame()
        self.stdin = sys.stdin.buffer.raw  # type: ignore[attr-defined]
        self.stdin_buffer = b""
        os.set_blocking(self.stdin.fileno(), False)
        self.epoll.register(self.stdin.fileno(), select.EPOLLIN)

    # ------------------------------------------------------------ the ramp

    def source_of(self, k: int) -> str:
        return self.sources[min(len(self.sources) - 1, (self.first + k) // self.per_source)]

    def open_one(self) -> bool:
        """Start one connection; False when this process cannot open more (no fd, no port)."""
        source = self.source_of(self.started)
        self.started += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self.errors[errno.errorcode.get(exc.errno or 0, type(exc).__name__)] += 1
            return False
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            err = sock.connect_ex(self.addr)
        except OSError as exc:
            sock.close()
            self.errors[errno.errorcode.get(exc.errno or 0, type(exc).__name__)] += 1
            return exc.errno not in (errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.errors[errno.errorcode.get(err, str(err))] += 1
            return err not in (errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE)
        client = Client(sock, now())
        fd = sock.fileno()
        self.clients[fd] = client
        self.pending[fd] = client
        self.epoll.register(fd, select.EPOLLOUT)
        return True

    def connected(self, fd: int, client: Client) -> None:
        sock = client.sock
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(fd, client, errno.errorcode.get(err, str(err)))
            return
        host, port = sock.getsockname()[:2]
        client.marker = b'"ipstr":"%s:%d"' % (host.encode(), port)
        client.state = HANDSHAKE
        try:
            sock.send(self.hello)  # a few dozen bytes into an empty buffer
        except OSError as exc:
            self.fail(fd, client, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            return
        self.epoll.modify(fd, select.EPOLLIN)

    def handshake(self, fd: int, client: Client, data: bytes) -> None:
        try:
            bodies, client.buffer = split_bodies(client.buffer + data)
        except ValueError:
            self.fail(fd, client, "bad_header")
            return
        for i, body in enumerate(bodies):
            if body.startswith(wire.DISCONN):
                self.fail(fd, client, "refused")
                return
            if body.startswith(wire.CLTCONN) and client.marker in body:
                client.state = JOINED
                del self.pending[fd]
                self.joined += 1
                self.alive += 1
                if self.first_joined is None:
                    self.first_joined = fd
                if self.say:
                    try:
                        client.sock.sendall(self.say)
                    except OSError as exc:
                        self.fail(fd, client, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
                        return
                rest = bodies[i + 1 :]
                if rest:
                    self.on_bodies(rest)
                return

    def fail(self, fd: int, client: Client, why: str) -> None:
        self.errors[why] += 1
        self.forget(fd, client)

    def forget(self, fd: int, client: Client) -> None:
        if client.state == JOINED:
            self.alive -= 1
        self.pending.pop(fd, None)
        self.clients.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass
        client.sock.close()

    def expire(self) -> None:
        """Give up on connections that did not join within ``connect_timeout``."""
        limit = now() - self.connect_timeout
        for fd, client in [item for item in self.pending.items() if item[1].started < limit]:
            self.fail(fd, client, "handshake_timeout")

    # ------------------------------------------------------------ held clients

    def on_bodies(self, bodies: List[bytes]) -> None:
        prefix = self.prefix
        for body in bodies:
            if body.startswith(prefix):
                at = now()
                _, _, payload = wire.parse_command(body)
                self.on_broadcast(int(payload.split(b":", 1)[0]), at)

    def on_broadcast(self, seq: int, at: float) -> None:
        entry = self.got.get(seq)
        if entry is None:
            entry = self.got[seq] = [0, at, at, self.alive]
        entry[0] += 1
        entry[2] = at
        if entry[0] == entry[3]:
            emit("got", seq=seq, first=entry[1], last=entry[2], count=entry[0], cpu=cpu_seconds())

    def readable(self, fd: int, client: Client) -> None:
        try:
            data = client.sock.recv(RECV_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(fd, client, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            return
        if not data:
            self.fail(fd, client, "closed_by_server" if client.state == JOINED else "closed_in_handshake")
            return
        if client.state == HANDSHAKE:
            self.handshake(fd, client, data)
            return
        buffer = client.buffer
        if not buffer and len(data) >= HEADER_LEN and int(data[:HEADER_LEN]) == len(data) - HEADER_LEN:
            self.on_bodies([data[HEADER_LEN:]])  # the usual case: exactly one frame
            return
        try:
            bodies, client.buffer = split_bodies(buffer + data)
        except ValueError:
            self.fail(fd, client, "bad_header")
            return
        self.on_bodies(bodies)

    # ------------------------------------------------------------ commands

    def command(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        if words[0] == "quit":
            self.quit = True
        elif words[0] == "check":
            emit("held", alive=self.alive, joined=self.joined, errors=dict(self.errors))
        elif words[0] == "send" and self.sender and self.first_joined is not None:
            content = (words[1] + ":").ljust(self.padding, "x")
            data = wire.command_frame(wire.BROADCAST, content)
            t = now()
            self.clients[self.first_joined].sock.send(data)
            emit("sent", seq=int(words[1]), t=t)

    def read_stdin(self) -> None:
        try:
            data = self.stdin.read(4096)
        except BlockingIOError:
            return
        if data is None:  # nothing to read after all (non-blocking)
            return
        if not data:
            self.quit = True
            return
        self.stdin_buffer += data
        *lines, self.stdin_buffer = self.stdin_buffer.split(b"\n")
        for line in lines:
            self.command(line.decode(errors="replace"))

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        t0 = now()
        cpu0 = cpu_seconds()
        next_progress = t0 + PROGRESS_EVERY
        next_expiry = t0 + 1.0
        stdin_fd = self.stdin.fileno()
        poll = self.epoll.poll
        clients = self.clients
        while not self.quit:
            if self.ramping:
                while len(self.pending) < self.concurrency and self.started < self.count:
                    if not self.open_one():
                        self.errors["not_started"] += self.count - self.started
                        self.started = self.count
                        break
                t = now()
                if t >= next_expiry:
                    self.expire()
                    next_expiry = t + 1.0
                if t >= next_progress:
                    emit("progress", t=t, joined=self.joined, cpu=cpu_seconds() - cpu0)
                    next_progress = t + PROGRESS_EVERY
                if (self.started >= self.count and not self.pending) or t > self.ramp_deadline:
                    self.ramping = False
                    if self.pending:
                        self.errors["ramp_deadline"] += len(self.pending)
                        for fd, client in list(self.pending.items()):
                            self.forget(fd, client)
                    if self.started < self.count:
                        self.errors["ramp_deadline"] += self.count - self.started
                    emit("progress", t=t, joined=self.joined, cpu=cpu_seconds() - cpu0)
                    emit("ready", connected=self.joined, errors=dict(self.errors), ramp_s=t - t0, cpu_s=cpu_seconds() - cpu0)
            for fd, _events in poll(0.2 if self.ramping else 1.0):
                if fd == stdin_fd:
                    self.read_stdin()
                    continue
                client = clients.get(fd)
                if client is None:
                    continue
                if client.state == CONNECTING:
                    self.connected(fd, client)
                else:
                    self.readable(fd, client)
        self.close_all()

    def close_all(self) -> None:
        """Close with RST (linger 0) so tens of thousands of sockets leave no TIME_WAIT."""
        linger = struct.pack("ii", 1, 0)
        for client in self.clients.values():
            try:
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                client.sock.close()
            except OSError:
                pass
        self.clients.clear()
        self.epoll.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="held-connections load generator (driven by bench.py, S6)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (127.0.0.x only)")
    parser.add_argument("--params", default="{}", help="JSON object: clients, first, sources, per_source, ...")
    args = parser.parse_args()
    if not args.host.startswith("127."):
        parser.error("the generator connects to 127.0.0.x only")
    params = json.loads(args.params)
    sources = params.get("sources") or []
    if any(not s.startswith("127.") for s in sources):
        parser.error("source addresses must be 127.0.0.x")
    wire.raise_nofile(params["clients"] + 64)
    try:
        HoldGenerator((args.host, args.port), params).run()
    except Exception as exc:  # reported to bench.py, which records the case as failed
        emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
