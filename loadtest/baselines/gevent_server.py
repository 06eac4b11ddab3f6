"""Baseline: the benchmark's HiSock server written by hand on a bare gevent StreamServer.

It does the same wire work as ``loadtest/hisock_server.py`` -- frames, the ``$CLTHELLO$``
handshake, ``$CLTCONN$``/``$CLTDISCONN$`` announced to every client, command parsing and
content decoding, ``ping`` -> ``pong``, ``broadcast`` -> every client, ``bulk`` -> ``ack``
-- and nothing else: no handler table, no registry indexes, no type codec beyond the
three letters the benchmark sends, no limits, no keepalive, no threads.  It is the ceiling
a Python server on gevent can reach for this protocol, so ``bench.py`` reports the
library's figures as a ratio to it.

Writes go through a per-connection list that one hub callback per loop iteration flushes
with a non-blocking ``send`` (a greenlet is only spawned for a socket whose kernel buffer
is full), so a burst of messages to one client costs one system call.

Run: ``python loadtest/baselines/gevent_server.py --port 0`` prints ``PORT <n>`` once
listening; SIGTERM or SIGINT stops it.  ``--announce none`` announces joins and
departures to nobody (the joining client still gets its own ``$CLTCONN$``), as
hisock_gevent's ``announce="none"``; bench.py's S6 runs both servers so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Tuple

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.server import StreamServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wire

HEADER_LEN = wire.HEADER_LEN
RECV_CHUNK = 256 * 1024
MAX_BODY = 16 * 1024 * 1024
BACKLOG = 4096


class Conn:
    """One client: its socket and its pending output."""

    __slots__ = ("sock", "raw", "addr", "out", "dirty", "draining", "closed", "info")

    def __init__(self, sock: Any, addr: Tuple[str, int]):
        self.sock = sock
        self.raw = sock._sock  # the non-blocking OS socket under gevent's wrapper
        self.addr = addr
        self.out: List[bytes] = []
        self.dirty = False
        self.draining = False
        self.closed = False
        self.info: bytes = b""


class BaselineServer:
    def __init__(self, port: int, announce: bool = True):
        self.announce = announce
        self.conns: Dict[Tuple[str, int], Conn] = {}
        self.dirty: List[Conn] = []
        self.flush_scheduled = False
        self.loop = gevent.get_hub().loop
        self.server = StreamServer(("127.0.0.1", port), self.handle, backlog=BACKLOG)
        self.server.init_socket()
        self.commands = {
            wire.PING: self.on_ping,
            wire.BROADCAST: self.on_broadcast,
            wire.BULK: self.on_bulk,
        }

    # ------------------------------------------------------------ output

    def send(self, conn: Conn, data: bytes) -> None:
        if conn.closed:
            return
        conn.out.append(data)
        if not conn.dirty:
            conn.dirty = True
            self.dirty.append(conn)
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.run_callback(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.dirty = False
            if conn.draining or conn.closed or not conn.out:
                continue
            out = conn.out
            data = out[0] if len(out) == 1 else b"".join(out)
            conn.out = []
            try:
                sent = conn.raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close(conn)
                continue
            if sent < len(data):
                conn.out.insert(0, data[sent:])
                conn.draining = True
                gevent.spawn(self.drain, conn)

    def drain(self, conn: Conn) -> None:
        """Kernel buffer full: wait for room, blocking only this greenlet."""
        try:
            while conn.out and not conn.closed:
                out, conn.out = conn.out, []
                conn.sock.sendall(b"".join(out))
        except OSError:
            self.close(conn)
        finally:
            conn.draining = False

    def send_all(self, data: bytes, exclude: Optional[Conn] = None) -> None:
        send = self.send
        for conn in list(self.conns.values()):
            if conn is not exclude:
                send(conn, data)

    # ------------------------------------------------------------ commands

    def on_ping(self, conn: Conn, content: Any) -> None:
        self.send(conn, wire.command_frame(wire.PONG, content))

    def on_broadcast(self, conn: Conn, content: Any) -> None:
        self.send_all(wire.command_frame(wire.BROADCAST, content))  # built once

    def on_bulk(self, conn: Conn, content: Any) -> None:
        self.send(conn, wire.command_frame(wire.ACK, len(content)))

    # ------------------------------------------------------------ connections

    def handle(self, sock: Any, addr: Tuple[str, int]) -> None:
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        conn = Conn(sock, (addr[0], addr[1]))
        buffer = bytearray()
        joined = False
        recv = sock.recv
        commands = self.commands
        try:
            while True:
                try:
                    data = recv(RECV_CHUNK)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                pos = 0
                end = len(buffer)
                while end - pos >= HEADER_LEN:
                    body_len = int(buffer[pos : pos + HEADER_LEN])
                    if body_len > MAX_BODY:
                        return
                    start = pos + HEADER_LEN
                    if end - start < body_len:
                        break
                    body = bytes(buffer[start : start + body_len])
                    pos = start + body_len
                    if not joined:
                        if not body.startswith(wire.HELLO):
                            return
                        self.join(conn, body[len(wire.HELLO) :])
                        joined = True
                    elif body.startswith(wire.CMD):
                        command, fmt, payload = wire.parse_command(body)
                        handler = commands.get(command)
                        if handler is not None:
                            handler(conn, wire.decode_content(fmt, payload))
                    elif body.startswith(wire.USRCLOSE):
                        return
                if pos:
                    del buffer[:pos]
        except ValueError:
            return  # bad frame from this peer: drop it, nobody else is affected
        finally:
            if joined:
                self.leave(conn)
            conn.closed = True
            try:
                sock.close()
            except OSError:
                pass

    def join(self, conn: Conn, hello: bytes) -> None:
        obj = json.loads(hello)
        host, port = conn.addr
        info = {"ip": [host, port], "name": obj.get("name"), "group": obj.get("group"), "ipstr": f"{host}:{port}"}
        conn.info = json.dumps(info, separators=(",", ":")).encode()
        self.conns[conn.addr] = conn
        announcement = wire.frame(wire.CLTCONN + conn.info)
        if self.announce:
            self.send_all(announcement, exclude=conn)
        self.send(conn, announcement)

    def leave(self, conn: Conn) -> None:
        if self.conns.pop(conn.addr, None) is conn and self.announce:
            self.send_all(wire.frame(wire.CLTDISCONN + conn.info))

    def close(self, conn: Conn) -> None:
        conn.closed = True
        try:
            conn.sock.shutdown(gsocket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        self.server.start()
        print(f"PORT {self.server.server_port}", flush=True)
        stop = Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, stop.set)
        stop.wait()
        self.server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--announce", choices=("all", "none"), default="all", help="who hears of joins and departures")
    args = parser.parse_args()
    wire.raise_nofile()
    BaselineServer(args.port, announce=args.announce == "all").serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
