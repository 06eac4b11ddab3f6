"""Load generator for ``bench.py --websocket``: S1 and S2 over WebSocket (PROTOCOL.md section 10).

The same clients as ``loadgen.py`` (and the same pipe protocol with bench.py: JSON events
on stdout, ``go``/``send``/``quit`` on stdin), but each one upgrades to a WebSocket at
``/hisock`` and carries one HiSock body per binary message.  What a client sends is
framed by wsproto (masked, as RFC 6455 wants from clients); a frame that is sent again
and again (S1's ping) is framed once.  What arrives is read by hand: the server's frames
are unmasked, and a few lines that find message boundaries in a bytearray cost the
generator about what ``loadgen.py``'s header parsing costs it, so the two transports are
measured with generators of similar weight.

    python loadtest/wsload.py --port WS_PORT --scenario s1 --params '{"clients": 50, ...}'
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
import wire
from gevent import socket as gsocket
from loadgen import (
    DEFAULT_CONNECT_CONCURRENCY,
    MAX_LATENCY_SAMPLES,
    RECV_CHUNK,
    Client,
    Control,
    S1State,
    close_all,
    cpu_seconds,
    emit,
    open_clients,
    percentile,
    watch,
)
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage
from wsproto.utilities import generate_accept_token

#: The server's WebSocket path.
PATH = "/hisock"
#: Opcode of a binary frame (the only data frames a HiSock server sends).
BINARY = 0x2

now = time.monotonic
_framer = Connection(ConnectionType.CLIENT)


def message(body: bytes) -> bytes:
    """One masked binary frame carrying ``body`` (a client's frame, made by wsproto)."""
    return bytes(_framer.send(BytesMessage(data=body)))


def split_messages(buffer: bytearray) -> Tuple[List[Tuple[int, int, int]], int]:
    """``([(opcode, start, end), ...], consumed)``: the whole frames at the front of
    ``buffer`` (server frames: unmasked, never fragmented by hisock_gevent)."""
    found: List[Tuple[int, int, int]] = []
    pos, end = 0, len(buffer)
    while end - pos >= 2:
        length = buffer[pos + 1] & 0x7F
        start = pos + 2
        if length == 126:
            if end - pos < 4:
                break
            length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
            start = pos + 4
        elif length == 127:
            if end - pos < 10:
                break
            length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
            start = pos + 10
        stop = start + length
        if stop > end:
            break
        found.append((buffer[pos] & 0x0F, start, stop))
        pos = stop
    return found, pos


def open_ws_client(addr: Tuple[str, int], timeout: float, name: Optional[str] = None) -> Client:
    """Connect, upgrade, say hello and read until our own ``$CLTCONN$``; later bytes stay buffered.

    :raises OSError, gevent.Timeout, ConnectionError: the handshake failed.
    """
    sock = gsocket.create_connection(addr, timeout=timeout)
    try:
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        port = sock.getsockname()[1]
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n" % (addr[0].encode(), addr[1], key)
        )
        hello = wire.hello_frame(name)[wire.HEADER_LEN :]
        marker = wire.own_conn_marker(port)
        buffer = bytearray()
        upgraded = False
        with gevent.Timeout(timeout):
            while True:
                data = sock.recv(RECV_CHUNK)
                if not data:
                    raise ConnectionError("closed during the handshake")
                buffer += data
                if not upgraded:
                    head_end = buffer.find(b"\r\n\r\n")
                    if head_end < 0:
                        continue
                    head = bytes(buffer[:head_end])
                    if not head.startswith(b"HTTP/1.1 101") or generate_accept_token(key) not in head:
                        raise ConnectionError(f"upgrade refused: {head[:60]!r}")
                    del buffer[: head_end + 4]
                    upgraded = True
                    sock.sendall(message(hello))
                frames, consumed = split_messages(buffer)
                for opcode, start, stop in frames:
                    if opcode == 0x8:
                        raise ConnectionError("closed by the server")
                    if buffer.startswith(wire.DISCONN, start):
                        raise ConnectionError("refused ($DISCONN$)")
                    if buffer.startswith(wire.CLTCONN, start) and buffer.find(marker, start, stop) >= 0:
                        del buffer[:stop]
                        sock.settimeout(None)
                        return Client(sock, buffer, port)
                del buffer[:consumed]
    except BaseException:
        sock.close()
        raise


def frame_skipper(client: Client) -> Any:
    """Read and drop whole messages (keeping the buffer on a frame boundary) until stopped."""
    buffer = client.buffer

    def on_data(data: bytes) -> None:
        buffer.extend(data)
        _, consumed = split_messages(buffer)
        if consumed:
            del buffer[:consumed]

    return watch(client, on_data, lambda: None)


# ---------------------------------------------------------------- S1 ping-pong


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
            replies = 0
            frames, consumed = split_messages(buffer)
            for opcode, start, _ in frames:
                if opcode == BINARY and buffer.startswith(prefix, start):
                    replies += 1
            if consumed:
                del buffer[:consumed]
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


def _open_all(addr: Tuple[str, int], params: Dict[str, Any], on_open: Callable[[Client], Any]) -> Tuple[List[Client], Dict[str, int]]:
    return open_clients(
        addr, params["clients"], params.get("connect_timeout", 30.0), now() + params.get("ramp_timeout", 120.0),
        DEFAULT_CONNECT_CONCURRENCY, on_open, opener=open_ws_client,
    )


def run_s1(addr: Tuple[str, int], params: Dict[str, Any], control: Control) -> None:
    skippers: Dict[int, Any] = {}
    clients, errors = _open_all(addr, params, lambda client: skippers.__setitem__(id(client), frame_skipper(client)))
    emit("ready", connected=len(clients), errors=errors)
    control.go.wait()
    for watcher in skippers.values():
        watcher.stop()
    if control.quit.is_set():
        return
    window = params["window"]
    ping = message(wire.command_body(wire.PING, params.get("content", "hello, server")))
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
        "result", connected=len(clients), round_trips=count, elapsed=elapsed, cpu=(cpu1 - cpu0) / elapsed,
        errors=state.errors, p50_ms=_ms(percentile(latencies, 0.50)), p99_ms=_ms(percentile(latencies, 0.99)),
    )
    close_all(clients)


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000.0


# ---------------------------------------------------------------- S2 fan-out


def s2_receiver(client: Client, prefix: bytes, on_broadcast: Any) -> Any:
    buffer = client.buffer

    def on_data(data: bytes) -> None:
        buffer.extend(data)
        frames, consumed = split_messages(buffer)
        for opcode, start, stop in frames:
            if opcode == BINARY and buffer.startswith(prefix, start):
                at = now()
                _, _, payload = wire.parse_command(bytes(buffer[start:stop]))
                on_broadcast(int(payload.split(b":", 1)[0]), at)
        if consumed:
            del buffer[:consumed]

    on_data(b"")  # the handshake may have left whole messages in the buffer
    return watch(client, on_data, lambda: None)


def run_s2(addr: Tuple[str, int], params: Dict[str, Any], control: Control) -> None:
    got: Dict[int, List[float]] = {}
    local = [0]

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
    clients, errors = _open_all(addr, params, lambda client: watchers.append(s2_receiver(client, prefix, on_broadcast)))
    ramp = now() - t_ramp
    local[0] = len(clients)
    padding = params.get("size", 64)

    def send(seq: str) -> None:
        content = (seq + ":").ljust(padding, "x")
        data = message(wire.command_body(wire.BROADCAST, content))
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


SCENARIOS = {"s1": run_s1, "s2": run_s2}


def main() -> int:
    parser = argparse.ArgumentParser(description="HiSock-over-WebSocket load generator (driven by bench.py --websocket)")
    parser.add_argument("--port", type=int, required=True, help="the server's WebSocket port")
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
