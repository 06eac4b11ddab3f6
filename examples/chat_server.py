"""Chat server: names, rooms (HiSock groups), broadcasts and whispers.

Shows the server side of a real application on hisock_gevent:

* ``join`` / ``leave`` announce arrivals and departures to everyone (``send_all_clients``);
* ``say`` goes to the speaker's room with ``send_group``, or to everyone when the speaker
  is in no room;
* ``whisper`` ``{"to": name, "text": ...}`` goes to one client with ``send_client``; an
  unknown name (``ClientNotFound``) is answered with an ``error`` message;
* rooms are changed by the *client* with ``change_group`` and nicknames with
  ``change_name``; the server's ``group_change`` / ``name_change`` events announce them;
* ``who`` answers with the names in the asker's room (``get_group``), or of everyone
  when the asker is in no room (``get_all_clients``);
* every handler checks the types of what it was sent, so a misbehaving client gets an
  ``error`` message instead of breaking anything.

Messages the server sends (command: content), all made of str, list and dict only so
that plain HiSock 3.x clients can receive them too:

* ``system``: ``{"event": "join" | "leave" | "nick" | "room", "name": str, "text": str, ...}``
* ``said``: ``{"from": str, "room": str ("" when in no room), "text": str}``
* ``whisper``: ``{"from": str, "text": str}``
* ``who``: ``{"room": str ("" when in no room), "names": [str, ...]}``
* ``error``: str

Run it (from the project root, with the package installed: ``pip install -e .``)::

    python examples/chat_server.py                  # serves on 127.0.0.1:6969
    python examples/chat_server.py --port 0         # any free port; the log line says which

Once it is listening it logs ``serving on HOST:PORT``.  Then, in other terminals::

    python examples/chat_client.py --name alice
    python examples/chat_client.py --name bob --room games

Stop it with Ctrl-C (or ``kill <pid>``): the clients are disconnected and the listening
socket is closed before the program exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any, Dict, List, Optional

import gevent

import hisock_gevent
from hisock_gevent import ClientInfo

log = logging.getLogger("chat_server")

#: Longest chat line accepted, in characters.
MAX_TEXT = 2000
#: Longest name or room name accepted, in characters.
MAX_NAME = 64


def display_name(client: ClientInfo) -> str:
    """How a client is shown to others: its name, or its address when it has none."""
    return client.name if client.name else client.ipstr


def room_label(room: Optional[str]) -> str:
    return f"room {room!r}" if room else "the lobby"


def clean_text(content: Any) -> Optional[str]:
    """The chat text in ``content``, or None when it is not usable text."""
    if isinstance(content, bytes):
        try:
            content = content.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(content, str):
        return None
    text = content.strip()
    if not text or len(text) > MAX_TEXT:
        return None
    return text


class ChatServer:
    """The chat rules, wired onto a HiSockServer."""

    def __init__(self, host: str, port: int, **server_options: Any):
        self.server = hisock_gevent.start_server((host, port), **server_options)
        on = self.server.on
        on("join")(self.on_join)
        on("leave")(self.on_leave)
        on("name_change")(self.on_name_change)
        on("group_change")(self.on_group_change)
        on("say")(self.on_say)
        on("whisper")(self.on_whisper)
        on("who")(self.on_who)
        on("*")(self.on_unknown)

    # ---------------------------------------------------------------- helpers

    def reply(self, client: ClientInfo, command: str, content: Any) -> None:
        """Send to one client, ignoring that it may have left meanwhile."""
        try:
            self.server.send_client(client, command, content)
        except hisock_gevent.ClientNotFound:
            pass

    def announce(self, event: str, client: ClientInfo, text: str, **extra: str) -> None:
        """A ``system`` message to everyone."""
        log.info("%s", text)
        message: Dict[str, str] = {"event": event, "name": display_name(client), "text": text}
        message.update(extra)
        self.server.send_all_clients("system", message)

    # ---------------------------------------------------------------- reserved events

    def on_join(self, client: ClientInfo) -> None:
        where = f" in {room_label(client.group)}" if client.group else ""
        self.announce("join", client, f"{display_name(client)} joined{where}", room=client.group or "")

    def on_leave(self, client: ClientInfo) -> None:
        # The client is already gone from the server's lists, so it is not sent this.
        self.announce("leave", client, f"{display_name(client)} left", room=client.group or "")

    def on_name_change(self, client: ClientInfo, old: Optional[str], new: Optional[str]) -> None:
        old_label = old if old else client.ipstr
        new_label = new if new else client.ipstr
        self.announce("nick", client, f"{old_label} is now known as {new_label}", old=old_label, new=new_label)
        if new and len(self.server.get_all_clients(lambda other: other.name == new)) > 1:
            self.reply(client, "error", f"another client is also called {new!r}; whispers to that name reach only one of you")

    def on_group_change(self, client: ClientInfo, old: Optional[str], new: Optional[str]) -> None:
        self.announce(
            "room",
            client,
            f"{display_name(client)} moved from {room_label(old)} to {room_label(new)}",
            old=old or "",
            new=new or "",
        )

    # ---------------------------------------------------------------- commands

    def on_say(self, client: ClientInfo, content: Any) -> None:
        text = clean_text(content)
        if text is None:
            self.reply(client, "error", f"say needs a non-empty text of at most {MAX_TEXT} characters")
            return
        message = {"from": display_name(client), "room": client.group or "", "text": text}
        if client.group:
            try:
                self.server.send_group(client.group, "said", message)
            except hisock_gevent.GroupNotFound:
                pass  # the speaker left the room (or the server) in between
        else:
            self.server.send_all_clients("said", message)

    def on_whisper(self, client: ClientInfo, content: Any) -> None:
        if not isinstance(content, dict):
            self.reply(client, "error", 'whisper needs {"to": name, "text": text}')
            return
        target = content.get("to")
        text = clean_text(content.get("text"))
        if not isinstance(target, str) or not target or len(target) > MAX_NAME or text is None:
            self.reply(client, "error", 'whisper needs {"to": name, "text": text}')
            return
        try:
            self.server.send_client(target, "whisper", {"from": display_name(client), "text": text})
        except (hisock_gevent.ClientNotFound, ValueError):
            self.reply(client, "error", f"no one is called {target!r}")

    def on_who(self, client: ClientInfo) -> None:
        if client.group:
            try:
                members = self.server.get_group(client.group)
            except hisock_gevent.GroupNotFound:
                members = []
        else:
            members = self.server.get_all_clients()
        names = sorted(display_name(member) for member in members)
        self.reply(client, "who", {"room": client.group or "", "names": names})

    def on_unknown(self, client: ClientInfo, command: str, content: Any) -> None:
        self.reply(client, "error", f"unknown command {command[:MAX_NAME]!r}")

    # ---------------------------------------------------------------- running

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (or :meth:`close`)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Runs in a new greenlet on this hub, where close() may block while it drains.
            gevent.signal_handler(signum, self.server.close)
        host, port = self.server.get_addr()
        log.info("serving on %s:%s", host, port)
        try:
            self.server.start()
        except KeyboardInterrupt:
            self.server.close()
        log.info("stopped")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="hisock_gevent chat server with rooms and whispers")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve at (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=6969, help="port to serve at; 0 picks a free one (default 6969)")
    parser.add_argument("--max-connections", type=int, default=0, help="clients accepted at once; 0 = no limit")
    parser.add_argument("--keepalive", action="store_true", help="drop clients that stop answering keepalives")
    parser.add_argument("--verbose", "-v", action="store_true", help="log the library's debug messages too")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        chat = ChatServer(args.host, args.port, max_connections=args.max_connections, keepalive=args.keepalive)
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        return 1
    chat.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
