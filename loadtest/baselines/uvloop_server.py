"""Baseline: the benchmark's HiSock server written by hand as an asyncio ``Protocol`` on uvloop.

The second reference next to ``gevent_server.py``, and a copy of its wire work in asyncio's
terms: frames, the ``$CLTHELLO$`` handshake, ``$CLTCONN$``/``$CLTDISCONN$`` announced to
every client, command parsing and content decoding, ``ping`` -> ``pong``, ``broadcast`` ->
every client (the sender too), ``bulk`` -> ``ack`` with the length, ``$USRCLOSE$`` or a bad
frame -> the connection is dropped.  Nothing else: no handler table, no registry indexes,
no limits, no keepalive, no threads.  It answers a different question from the gevent
baseline: what the same protocol costs on a callback event loop written in C (uvloop,
built on libuv), where no greenlet switch happens per connection.

Writes are coalesced by hand as in the gevent baseline: a message is appended to its
connection's list, and one callback per loop iteration hands each connection's list to
its transport as one write.  (Neither uvloop nor asyncio's own loop does this: both try
a ``send`` on every ``transport.write`` while their buffer is empty.)  The transports
buffer what the kernel does not take; like the gevent baseline, nothing bounds that.

Without uvloop (not installed, or ``--loop asyncio``) the same code runs on asyncio's
default loop; the ``PORT`` line says which loop runs, and ``bench.py`` labels its column
after it.

Run: ``python loadtest/baselines/uvloop_server.py --port 0`` prints
``PORT <n> (uvloop <version>)`` or ``PORT <n> (asyncio default loop; <why>)`` once
listening; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wire

HEADER_LEN = wire.HEADER_LEN
MAX_BODY = 16 * 1024 * 1024
BACKLOG = 4096

#: ``--loop`` choices: ``auto`` is uvloop when it can be imported, else asyncio's own loop.
LOOPS = ("auto", "uvloop", "asyncio")


class Conn(asyncio.Protocol):
    """One client: its transport, its unparsed input and its pending output.

    The parsing loop is the gevent baseline's, run on every ``data_received``.
    """

    __slots__ = ("server", "transport", "addr", "buffer", "joined", "info", "out", "dirty", "closed")

    def __init__(self, server: BaselineServer):
        self.server = server
        self.transport: Any = None
        self.addr: Tuple[str, int] = ("", 0)
        self.buffer = bytearray()
        self.joined = False
        self.info = b""
        self.out: List[bytes] = []
        self.dirty = False
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # both loops do it too; say so
        host, port = transport.get_extra_info("peername")[:2]
        self.addr = (host, port)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buffer = self.buffer
        buffer += data
        pos = 0
        end = len(buffer)
        try:
            while end - pos >= HEADER_LEN:
                body_len = int(buffer[pos : pos + HEADER_LEN])
                if body_len > MAX_BODY:
                    self.server.drop(self)
                    return
                start = pos + HEADER_LEN
                if end - start < body_len:
                    break
                body = bytes(buffer[start : start + body_len])
                pos = start + body_len
                if not self.joined:
                    if not body.startswith(wire.HELLO):
                        self.server.drop(self)
                        return
                    self.server.join(self, body[len(wire.HELLO) :])
                    self.joined = True
                elif body.startswith(wire.CMD):
                    command, fmt, payload = wire.parse_command(body)
                    handler = self.server.commands.get(command)
                    if handler is not None:
                        handler(self, wire.decode_content(fmt, payload))
                elif body.startswith(wire.USRCLOSE):
                    self.server.drop(self)
                    return
        except ValueError:
            self.server.drop(self)  # bad frame from this peer: drop it, nobody else is affected
            return
        if pos:
            del buffer[:pos]

    def eof_received(self) -> None:
        self.server.drop(self, close=False)  # returning None: the transport closes itself

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.server.drop(self, close=False)


class BaselineServer:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.conns: Dict[Tuple[str, int], Conn] = {}
        self.dirty: List[Conn] = []
        self.flush_scheduled = False
        self.commands: Dict[str, Callable[[Conn, Any], None]] = {
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
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Once per loop iteration: one ``transport.write`` per connection written to."""
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.dirty = False
            if conn.closed or not conn.out:
                continue
            out = conn.out
            conn.out = []
            conn.transport.write(out[0] if len(out) == 1 else b"".join(out))

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

    def join(self, conn: Conn, hello: bytes) -> None:
        """Register ``conn`` and announce it to everyone, itself last.

        :raises ValueError: the hello is not a JSON object.
        """
        obj = json.loads(hello)
        if not isinstance(obj, dict):
            raise ValueError("the hello is not a JSON object")
        host, port = conn.addr
        info = {"ip": [host, port], "name": obj.get("name"), "group": obj.get("group"), "ipstr": f"{host}:{port}"}
        conn.info = json.dumps(info, separators=(",", ":")).encode()
        self.conns[conn.addr] = conn
        announcement = wire.frame(wire.CLTCONN + conn.info)
        self.send_all(announcement, exclude=conn)
        self.send(conn, announcement)

    def drop(self, conn: Conn, close: bool = True) -> None:
        """Forget ``conn`` (announcing its departure if it had joined) and, with ``close``,
        close its transport.  Pending output not yet handed to the transport is dropped."""
        if conn.closed:
            return
        conn.closed = True
        conn.out = []
        if conn.joined and self.conns.pop(conn.addr, None) is conn:
            self.send_all(wire.frame(wire.CLTDISCONN + conn.info))
        if close and conn.transport is not None:
            conn.transport.close()

    async def serve(self, port: int, banner: str) -> None:
        server = await self.loop.create_server(lambda: Conn(self), "127.0.0.1", port, backlog=BACKLOG)
        print(f"PORT {server.sockets[0].getsockname()[1]} ({banner})", flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        server.close()


def new_loop(choice: str) -> Tuple[asyncio.AbstractEventLoop, str]:
    """The event loop ``--loop choice`` asks for, and a few words saying which it is.

    :raises ImportError: ``choice`` is ``uvloop`` and uvloop cannot be imported.
    """
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if choice == "uvloop":
                raise
            print(f"uvloop_server.py: cannot import uvloop: {exc}", file=sys.stderr, flush=True)
            return asyncio.new_event_loop(), "asyncio default loop; uvloop is not installed"
        return uvloop.new_event_loop(), f"uvloop {uvloop.__version__}"
    return asyncio.new_event_loop(), "asyncio default loop; --loop asyncio"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=LOOPS, default="auto", help="auto (default): uvloop if installed, else asyncio's own loop")
    args = parser.parse_args()
    wire.raise_nofile()
    loop, banner = new_loop(args.loop)
    if not banner.startswith("uvloop"):
        print(f"uvloop_server.py: running on the {banner}", file=sys.stderr, flush=True)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(BaselineServer(loop).serve(args.port, banner))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
