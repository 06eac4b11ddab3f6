"""The chat server behind ``hisock-gevent chat``: names, rooms (groups), broadcasts, whispers.

It ships inside the package so that ``hisock-gevent chat`` works from any install, and
``examples/chat_server.py`` runs the same rules as a stand-alone program.
:func:`make_server` is an ordinary server factory, so ``hisock-gevent serve
hisock_gevent.chat:make_server`` serves it too.

The rules, as the clients see them:

* ``join`` / ``leave`` are announced to everyone (``send_all_clients``);
* ``say TEXT`` goes to the speaker's room with ``send_group``, or to everyone when the
  speaker is in no room;
* ``whisper {"to": name, "text": ...}`` goes to one client with ``send_client``; an
  unknown name (``ClientNotFound``) is answered with an ``error`` message;
* clients change rooms with ``change_group`` and nicknames with ``change_name``; the
  server's ``group_change`` / ``name_change`` events announce them;
* ``who`` answers with the names in the asker's room (``get_group``), or of everyone when
  the asker is in no room (``get_all_clients``);
* every handler checks the type of what it was sent: a client sending the wrong thing
  gets an ``error`` message and nothing else happens.

What the server sends (command: content), made of str, list and dict only, so that
plain HiSock 3.x clients can read it too:

* ``system``: ``{"event": "join" | "leave" | "nick" | "room", "name": str, "text": str, ...}``
* ``said``: ``{"from": str, "room": str ("" when in no room), "text": str}``
* ``whisper``: ``{"from": str, "text": str}``
* ``who``: ``{"room": str ("" when in no room), "names": [str, ...]}``
* ``error``: str, the reason
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any, Dict, Optional

from .errors import ClientNotFound, GroupNotFound
from .server import HiSockServer
from .utils import ClientInfo

__all__ = ["MAX_NAME", "MAX_TEXT", "ChatServer", "chat_page", "clean_text", "display_name", "make_server"]

log = logging.getLogger("hisock_gevent.chat")

#: Longest chat line accepted, in characters.
MAX_TEXT = 2000
#: Longest name or room name accepted, in characters.
MAX_NAME = 64
#: Where ``hisock-gevent chat`` and the example serve by default.
DEFAULT_ADDR = ("127.0.0.1", 6969)


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
    """The chat rules, registered as handlers on ``server`` (which the caller starts)."""

    def __init__(self, server: HiSockServer):
        self.server = server
        on = server.on
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
        except ClientNotFound:
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
            except GroupNotFound:
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
        except (ClientNotFound, ValueError):
            self.reply(client, "error", f"no one is called {target!r}")

    def on_who(self, client: ClientInfo) -> None:
        if client.group:
            try:
                members = self.server.get_group(client.group)
            except GroupNotFound:
                members = []
        else:
            members = self.server.get_all_clients()
        names = sorted(display_name(member) for member in members)
        self.reply(client, "who", {"room": client.group or "", "names": names})

    def on_unknown(self, client: ClientInfo, command: str, content: Any) -> None:
        self.reply(client, "error", f"unknown command {command[:MAX_NAME]!r}")


def chat_page() -> bytes:
    """The chat page for browsers (``static/chat.html``: one file, no build step, using
    ``/hisock.js``), served at ``/`` of the WebSocket port."""
    return resources.files("hisock_gevent").joinpath("static", "chat.html").read_bytes()


def make_server(host: str = DEFAULT_ADDR[0], port: int = DEFAULT_ADDR[1], **options: Any) -> HiSockServer:
    """A HiSockServer on ``(host, port)`` with the chat rules registered, not yet started.

    With ``websocket=(host, port)``, browsers chat too: the chat page is served at ``/`` of
    that port (unless ``websocket_pages`` says otherwise).

    :param options: passed on to :class:`~hisock_gevent.HiSockServer` (``max_connections``,
        ``keepalive``, ``certfile``, ``websocket``, ...).
    :raises OSError: the address cannot be bound.
    """
    if options.get("websocket") is not None and options.get("websocket_pages") is None:
        options["websocket_pages"] = {"/": ("text/html; charset=utf-8", chat_page())}
    server = HiSockServer((host, port), **options)
    ChatServer(server)
    return server
