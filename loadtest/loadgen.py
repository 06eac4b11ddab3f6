"""Load generator for bench.py: many HiSock clients in one process, raw gevent sockets.

Not the library's client: a client here is a gevent socket, a bytearray and a few lines
of framing (``wire.py``), so that the generator costs far less CPU per message than the
server it measures.  Every client says ``$CLTHELLO$`` and counts as connected only once
its own ``$CLTCONN$`` arrived.

It is driven by ``bench.py`` through pipes: it writes one JSON object per line on stdout
(``{"ev": "ready", ...}``, ``"start"``, ``"end"``, ``"result"``, ...) and reads commands on
stdin (``go``, ``send <seq>``, ``check``, ``quit``).  End of stdin means quit.

    python loadtest/loadgen.py --port PORT --scenario s1 --params '{"clients": 50, ...}'
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import socket as _stdlib_socket
import struct
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
import wire
from gevent import socket as gsocket
from gevent.event import Event
from gevent.fileobject import FileObjectPosix
from gevent.lock import Semaphore
from gevent.pool import Pool

HEADER_LEN = wire.HEADER_LEN
RECV_CHUNK = 256 * 1024
#: Connections being opened and hand-shaken at once.
DEFAULT_CONNECT_CONCURRENCY = 200
#: Latency samples kept for percentiles (a uniform subsample beyond this).
MAX_LATENCY_SAMPLES = 50_000

now = time.monotonic


def emit(ev: str, **fields: Any) -> None:
    fields["ev"] = ev
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Control:
    """Commands from bench.py on stdin, read by one greenlet."""

    def __init__(self) -> None:
        self.go = Event()
        self.quit = Event()
        self.handlers: Dict[str, Any] = {}
        self._stdin = FileObjectPosix(sys.stdin.fileno(), "rb", closefd=False)
        gevent.spawn(self._read)

    def _read(self) -> None:
        try:
            for line in self._stdin:
                words = line.decode().split()
                if not words:
                    continue
                if words[0] == "go":
                    self.go.set()
                elif words[0] == "quit":
                    break
                elif words[0] in self.handlers:
                    self.handlers[words[0]](*words[1:])
        finally:
            self.quit.set()
            self.go.set()


# ---------------------------------------------------------------- connecting


class Client:
    __slots__ = ("sock", "buffer", "port")

    def __init__(self, sock: Any, buffer: bytearray, port: int):
        self.sock = sock
        self.buffer = buffer
        self.port = port


def open_client(addr: Tuple[str, int], timeout: float, name: Optional[str] = None, group: Optional[str] = None) -> Client:
    """Connect, say hello (with ``name`` and ``group``) and read until our own
    ``$CLTCONN$``; later bytes stay buffered.

    :raises OSError, gevent.Timeout, ConnectionError: the handshake failed.
    """
    sock = gsocket.create_connection(addr, timeout=timeout)
    try:
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        port = sock.getsockname()[1]
        marker = wire.own_conn_marker(port)
        sock.sendall(wire.hello_frame(name, group))
        buffer = bytearray()
        with gevent.Timeout(timeout):
            while True:
                data = sock.recv(RECV_CHUNK)
                if not data:
                    raise ConnectionError("closed during the handshake")
                buffer += data
                pos, end = 0, len(buffer)
                while end - pos >= HEADER_LEN:
                    body_len = int(buffer[pos : pos + HEADER_LEN])
                    start = pos + HEADER_LEN
                    if end - start < body_len:
                        break
                    pos = start + body_len
                    if buffer.startswith(wire.DISCONN, start):
                        raise ConnectionError("refused ($DISCONN$)")
                    if buffer.startswith(wire.CLTCONN, start) and buffer.find(marker, start, pos) >= 0:
                        del buffer[:pos]
                        sock.settimeout(None)
                        return Client(sock, buffer, port)
                del buffer[:pos]
    except BaseException:
        sock.close()
        raise


def open_clients(
    addr: Tuple[str, int],
    count: int,
    timeout: float,
    deadline: float,
    concurrency: int,
    on_open: Optional[Callable[[Client], Any]] = None,
    group_of: Optional[Callable[[int], Optional[str]]] = None,
    opener: Optional[Callable[..., Client]] = None,
) -> Tuple[List[Client], Dict[str, int]]:
    """Open ``count`` clients, ``concurrency`` at a time, stopping at ``deadline``
    (with ``opener(addr, timeout)``, :func:`open_client` by default; ``wsload.py`` lends
    its WebSocket one).

    ``on_open(client)`` runs as soon as each one is connected: a client must start reading
    at once, or the ``$CLTCONN$`` announcements of those joining after it pile up in the
    server's buffers (every join is announced to every client).  ``group_of(i)`` is the
    group the ``i``-th client says hello with (default: none).
    """
    clients: List[Client] = []
    errors: Dict[str, int] = collections.Counter()
    pool = Pool(concurrency)

    def one(index: int) -> None:
        try:
            group = group_of(index) if group_of is not None else None
            timeout_left = max(0.5, min(timeout, deadline - now()))
            client = opener(addr, timeout_left) if opener is not None else open_client(addr, timeout_left, group=group)
        except (OSError, ConnectionError, gevent.Timeout) as exc:
            errors[type(exc).__name__] += 1
            return
        clients.append(client)
        if on_open is not None:
            on_open(client)

    for index in range(count):
        if now() > deadline:
            errors["ramp_deadline"] += count - len(clients) - sum(errors.values())
            break
        pool.spawn(one, index)
    pool.join(timeout=max(0.0, deadline - now()) + timeout)
    pool.kill(block=True, timeout=1)
    return clients, dict(errors)


def close_all(clients: List[Client]) -> None:
    """Close with RST (linger 0) so thousands of sockets leave no TIME_WAIT behind."""
    linger = struct.pack("ii", 1, 0)
    for client in clients:
        try:
            client.sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_LINGER, linger)
            client.sock.close()
        except OSError:
            pass


def percentile(sorted_values: List[float], q: float) -> Optional[float]:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ---------------------------------------------------------------- S1 ping-pong


class S1State:
    def __init__(self) -> None:
        self.sending = True
        self.measuring = False
        self.count = 0
        self.latencies: List[float] = []
        self.errors = 0


def s1_loop(client: Client, window: int, ping: bytes, prefix: bytes, state: S1State) -> None:
    sock, buffer = client.sock, client.buffer
    recv, sendall = sock.recv, sock.sendall
    sent_at: collections.deque = collections.deque()
    t = now()
    sendall(ping * window)
    sent_at.extend([t] * window)
    outstanding = window
    try:
        while outstanding:
            data = recv(RECV_CHUNK)
            if not data:
                state.errors += 1
                return
            buffer += data
            replies, pos, end = 0, 0, len(buffer)
            while end - pos >= HEADER_LEN:
                start = pos + HEADER_LEN
                body_end = start + int(buffer[pos:start])
                if body_end > end:
                    break
                if buffer.startswith(prefix, start):
                    replies += 1
                pos = body_end
            if pos:
                del buffer[:pos]
            if not replies:
                continue
            t = now()
            outstanding -= replies
            popleft = sent_at.popleft
            if state.measuring:
                state.count += replies
                latencies = state.latencies
                for _ in range(replies):
                    latencies.append(t - popleft())
            else:
                for _ in range(replies):
                    popleft()
            if state.sending:
                sendall(ping if replies == 1 else ping * replies)
                sent_at.extend([t] * replies)
                outstanding += replies
    except OSError:
        state.errors += 1


def run_s1(addr: Tuple[str, int], params: Dict[str, Any], control: Control) -> None:
    skippers: Dict[int, Any] = {}

    def on_open(client: Client) -> None:
        skippers[id(client)] = frame_skipper(client)

    clients, errors = open_clients(addr, params["clients"], params.get("connect_timeout", 20.0), now() + params.get("ramp_timeout", 60.0), DEFAULT_CONNECT_CONCURRENCY, on_open)
    emit("ready", connected=len(clients), errors=errors)
    control.go.wait()
    for watcher in skippers.values():
        watcher.stop()
    if control.quit.is_set():
        return
    window = params["window"]
    ping = wire.command_frame(wire.PING, params.get("content", "hello, server"))
    prefix = wire.command_prefix(wire.PONG)
    state = S1State()
    loops = [gevent.spawn(s1_loop, client, window, ping, prefix, state) for client in clients]
    gevent.sleep(params["warmup"])
    cpu0, t0 = cpu_seconds(), now()
    state.count = 0
    state.measuring = True
    emit("start")
    gevent.sleep(params["duration"])
    state.measuring = False
    t1, cpu1 = now(), cpu_seconds()
    count = state.count
    emit("end")
    state.sending = False
    gevent.joinall(loops, timeout=5)
    gevent.killall(loops, block=True, timeout=1)
    latencies = state.latencies
    if len(latencies) > MAX_LATENCY_SAMPLES:
        latencies = random.sample(latencies, MAX_LATENCY_SAMPLES)
    latencies.sort()
    elapsed = t1 - t0
    emit(
        "result",
        connected=len(clients),
        round_trips=count,
        elapsed=elapsed,
        cpu=(cpu1 - cpu0) / elapsed,
        errors=state.errors,
        p50_ms=_ms(percentile(latencies, 0.50)),
        p99_ms=_ms(percentile(latencies, 0.99)),
        samples_ms=[round(x * 1000, 4) for x in latencies[:: max(1, len(latencies) // 5000)]],
    )
    close_all(clients)


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000.0


# ---------------------------------------------------------------- S2 fan-out


def watch(client: Client, on_data: Any, on_close: Any) -> Any:
    """Call ``on_data(bytes)`` from the hub whenever the client's socket has data.

    A libev io watcher with a callback instead of a greenlet blocked in ``recv``: one
    system call per wake-up and no greenlet switch, so thousands of receiving clients cost
    the generator as little as possible.  Returns the watcher (keep a reference).
    """
    raw = client.sock._sock  # the non-blocking socket under gevent's wrapper
    recv = raw.recv
    watcher = gevent.get_hub().loop.io(raw.fileno(), 1)

    def readable() -> None:
        try:
            data = recv(RECV_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            on_data(data)
        else:
            watcher.stop()
            on_close()

    watcher.start(readable)
    return watcher


def frame_skipper(client: Client) -> Any:
    """Read and drop whole frames (keeping the buffer on a frame boundary) until stopped."""
    buffer = client.buffer

    def on_data(data: bytes) -> None:
        buffer.extend(data)
        pos, end = 0, len(buffer)
        while end - pos >= HEADER_LEN:
            body_end = pos + HEADER_LEN + int(buffer[pos : pos + HEADER_LEN])
            if body_end > end:
                break
            pos = body_end
        if pos:
            del buffer[:pos]

    return watch(client, on_data, lambda: None)


def s2_receiver(client: Client, prefix: bytes, on_broadcast: Any) -> Any:
    buffer = client.buffer

    def on_data(data: bytes) -> None:
        buffer.extend(data)
        pos, end = 0, len(buffer)
        while end - pos >= HEADER_LEN:
            start = pos + HEADER_LEN
            body_end = start + int(buffer[pos:start])
            if body_end > end:
                break
            if buffer.startswith(prefix, start):
                at = now()
                _, _, payload = wire.parse_command(bytes(buffer[start:body_end]))
                on_broadcast(int(payload.split(b":", 1)[0]), at)
            pos = body_end
        if pos:
            del buffer[:pos]

    on_data(b"")  # the handshake may have left whole frames in the buffer
    return watch(client, on_data, lambda: None)


def run_s2(addr: Tuple[str, int], params: Dict[str, Any], control: Control) -> None:
    got: Dict[int, List[float]] = {}
    local = [0]  # clients in this process, known once the ramp is over

    def on_broadcast(seq: int, at: float) -> None:
        entry = got.get(seq)
        if entry is None:
            entry = got[seq] = [0, at, at]
        entry[0] += 1
        entry[2] = at
        if entry[0] == local[0]:
            emit("got", seq=seq, first=entry[1], last=entry[2], count=local[0])

    prefix = wire.command_prefix(wire.BROADCAST)
    watchers: List[Any] = []
    t_ramp = now()
    clients, errors = open_clients(
        addr, params["clients"], params.get("connect_timeout", 30.0), now() + params.get("ramp_timeout", 120.0),
        DEFAULT_CONNECT_CONCURRENCY, lambda client: watchers.append(s2_receiver(client, prefix, on_broadcast)),
    )
    ramp = now() - t_ramp
    local[0] = len(clients)
    padding = params.get("size", 64)

    def send(seq: str) -> None:
        content = (seq + ":").ljust(padding, "x")
        data = wire.command_frame(wire.BROADCAST, content)
        t = now()
        clients[0].sock.sendall(data)
        emit("sent", seq=int(seq), t=t)

    if params.get("sender") and clients:
        control.handlers["send"] = send
    emit("ready", connected=local[0], errors=errors, ramp_s=ramp)
    control.quit.wait()
    for watcher in watchers:
        watcher.stop()
    close_all(clients)


# ---------------------------------------------------------------- S3 connections


def run_s3(addr: Tuple[str, int], params: Dict[str, Any], control: Control) -> None:
    """Open and hold ``clients``; ``group_size`` N puts them in groups of N, named
    ``<group_prefix><i // N>`` (the join storm: ``bench.py --join-storm``).  ``check``
    answers how many are still open, how many bytes they received after their own answer,
    and the CPU this process used since the ramp began."""
    alive = [0]
    received = [0]
    sink = bytearray(RECV_CHUNK)  # what arrives is counted, not kept

    def drainer(client: Client) -> Any:
        raw = client.sock._sock
        watcher = gevent.get_hub().loop.io(raw.fileno(), 1)

        def readable() -> None:
            try:
                count = raw.recv_into(sink)
                if count:
                    received[0] += count
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            watcher.stop()
            alive[0] -= 1

        alive[0] += 1
        watcher.start(readable)
        return watcher

    group_size = params.get("group_size")
    prefix = params.get("group_prefix", "g")
    group_of = (lambda index: f"{prefix}{index // group_size}") if group_size else None
    watchers: List[Any] = []
    t_ramp, cpu_ramp = now(), cpu_seconds()
    clients, errors = open_clients(
        addr, params["clients"], params.get("connect_timeout", 30.0), now() + params.get("ramp_timeout", 120.0),
        DEFAULT_CONNECT_CONCURRENCY, lambda client: watchers.append(drainer(client)), group_of,
    )
    ramp = now() - t_ramp

    def check() -> None:
        # cpu_s: this process's CPU since its ramp began (not its start-up).
        emit("held", alive=alive[0], bytes=received[0] + sum(len(c.buffer) for c in clients), cpu_s=cpu_seconds() - cpu_ramp)

    control.handlers["check"] = check
    emit("ready", connected=len(clients), errors=errors, ramp_s=ramp)
    control.quit.wait()
    for watcher in watchers:
        watcher.stop()
    close_all(clients)


# ---------------------------------------------------------------- S4 bulk


def run_s4(addr: Tuple[str, int], params: Dict[str, Any], control: Control) -> None:
    clients, errors = open_clients(addr, 1, 10.0, now() + 20.0, 1)
    emit("ready", connected=len(clients), errors=errors)
    control.go.wait()
    if not clients or control.quit.is_set():
        return
    client = clients[0]
    size = params.get("size", 1 << 20)
    window = params.get("window", 2)
    data = wire.command_frame(wire.BULK, os.urandom(size))
    prefix = wire.command_prefix(wire.ACK)
    credit = Semaphore(window)
    state = {"measuring": False, "bytes": 0, "sending": True, "acks": 0, "errors": 0}

    def sender() -> None:
        try:
            while state["sending"]:
                credit.acquire()
                if not state["sending"]:
                    return
                client.sock.sendall(data)
        except OSError:
            state["errors"] += 1

    def receiver() -> None:
        buffer = client.buffer
        try:
            while True:
                chunk = client.sock.recv(RECV_CHUNK)
                if not chunk:
                    return
                buffer += chunk
                for body in wire.split_frames(buffer):
                    if body.startswith(prefix):
                        _, fmt, payload = wire.parse_command(body)
                        if state["measuring"]:
                            state["bytes"] += wire.decode_content(fmt, payload)
                            state["acks"] += 1
                        credit.release()
        except OSError:
            state["errors"] += 1

    greenlets = [gevent.spawn(sender), gevent.spawn(receiver)]
    gevent.sleep(params["warmup"])
    cpu0, t0 = cpu_seconds(), now()
    state["measuring"] = True
    emit("start")
    gevent.sleep(params["duration"])
    state["measuring"] = False
    t1, cpu1 = now(), cpu_seconds()
    emit("end")
    state["sending"] = False
    credit.release()
    gevent.sleep(0.2)
    gevent.killall(greenlets, block=True, timeout=1)
    elapsed = t1 - t0
    emit("result", bytes=state["bytes"], acks=state["acks"], elapsed=elapsed, cpu=(cpu1 - cpu0) / elapsed, errors=state["errors"])
    close_all(clients)


SCENARIOS = {"s1": run_s1, "s2": run_s2, "s3": run_s3, "s4": run_s4}


def main() -> int:
    parser = argparse.ArgumentParser(description="HiSock load generator (driven by bench.py)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--params", default="{}", help="JSON object of scenario parameters")
    args = parser.parse_args()
    wire.raise_nofile()
    control = Control()
    try:
        SCENARIOS[args.scenario](("127.0.0.1", args.port), json.loads(args.params), control)
    except Exception as exc:  # reported to bench.py, which records the case as failed
        emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
