"""What a line typed into ``hisock-gevent client`` means, and the payload rule ``send`` shares.

No sockets and no terminal here: a line goes in, a :class:`Send` or a :class:`Local`
comes out (or :class:`LineError`), so every rule is tested with strings alone.

The payload rule
----------------

A line is ``command [payload]``.  The payload is what follows the first run of spaces,
with surrounding spaces removed.

* **Text mode** (the default): the payload is sent as a ``str``, exactly as typed, so
  ``say 42`` sends the text ``"42"`` and ``say true`` the text ``"true"``.  The one
  exception: a payload that is a JSON object or array (it starts with ``{`` or ``[`` and
  parses as JSON) is sent as that dict or list, so ``whisper {"to": "bob", "text": "hi"}``
  works as written.  A payload starting with ``{`` or ``[`` that is not valid JSON is sent
  as text.
* **JSON mode** (``/json`` in the client, ``--json`` for both commands): the payload must
  be JSON and is sent as the value it spells: ``42`` is an int, ``"42"`` a str, ``null``
  None, ``[1, 2]`` a list.  A payload that is not JSON is refused (:class:`LineError`)
  and nothing is sent.

A line with no payload sends None.

Local commands
--------------

Lines starting with ``/`` are for the client itself and never reach the server (see
:data:`LOCAL_COMMANDS`); ``//cmd ...`` sends the command ``/cmd``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

__all__ = [
    "LOCAL_COMMANDS",
    "LOCAL_PREFIX",
    "LineError",
    "Local",
    "Send",
    "describe_type",
    "format_content",
    "help_text",
    "parse_line",
    "parse_payload",
    "visible",
]

#: What starts a line meant for the client itself.
LOCAL_PREFIX = "/"

#: Local commands: name -> (argument, what it does).
LOCAL_COMMANDS: Dict[str, tuple] = {
    "help": ("", "show this help"),
    "name": ("[NAME]", "change your name (alone: back to the name you connected with)"),
    "group": ("[GROUP]", "move to another group (alone: back to the group you connected with)"),
    "json": ("", "switch JSON mode on or off (see the payload rule)"),
    "quit": ("", "leave (Ctrl-D does the same)"),
}

#: Characters that make a text-mode payload a candidate for a JSON object or array.
_JSON_CONTAINER_STARTS = ("{", "[")


class LineError(ValueError):
    """A typed line that cannot be acted on; the message says why, for the user."""


@dataclass(frozen=True)
class Send:
    """Send ``command`` with ``content`` to the server."""

    command: str
    content: Any


@dataclass(frozen=True)
class Local:
    """Run the local command ``name`` (a key of :data:`LOCAL_COMMANDS`) with ``argument``."""

    name: str
    argument: str


def parse_payload(text: Optional[str], json_mode: bool = False) -> Any:
    """The content a typed payload stands for (see the module docstring).

    :param text: the payload as typed; None or blank for no payload (content None).
    :param json_mode: parse it as JSON, whatever it looks like.
    :raises LineError: ``json_mode`` and the payload is not JSON.
    """
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    if json_mode:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise LineError(f"not JSON ({exc}); as JSON, a text is written in quotes: \"like this\"") from exc
    if text.startswith(_JSON_CONTAINER_STARTS):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, (dict, list)):
            return value
    return text


def parse_line(line: str, json_mode: bool = False) -> Union[Send, Local, None]:
    """What a typed line asks for; None for a blank line.

    :raises LineError: an unknown local command, or a payload JSON mode refuses.
    """
    line = line.strip()
    if not line:
        return None
    if line.startswith(LOCAL_PREFIX) and not line.startswith(LOCAL_PREFIX * 2):
        name, _, argument = line[len(LOCAL_PREFIX):].partition(" ")
        if name not in LOCAL_COMMANDS:
            raise LineError(f"no local command {LOCAL_PREFIX}{name}; {LOCAL_PREFIX}help lists them")
        return Local(name, argument.strip())
    if line.startswith(LOCAL_PREFIX * 2):
        line = line[len(LOCAL_PREFIX):]
    command, _, rest = line.partition(" ")
    return Send(command, parse_payload(rest, json_mode))


def describe_type(content: Any) -> str:
    """How the client names the type of what it sent: "text", "a JSON object", "an int"..."""
    if content is None:
        return "no content"
    if isinstance(content, str):
        return "text"
    if isinstance(content, dict):
        return "a JSON object (dict)"
    if isinstance(content, list):
        return "a JSON array (list)"
    if isinstance(content, bool):
        return "a bool"
    if isinstance(content, int):
        return "an int"
    if isinstance(content, float):
        return "a float"
    return f"a {type(content).__name__}"


def format_content(content: Any) -> str:
    """Content as JSON when JSON can carry it, else its repr (control characters escaped either way)."""
    try:
        return json.dumps(content, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(content)


def visible(text: str) -> str:
    """``text`` with control characters shown as escapes, so a peer cannot drive our terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def help_text(json_mode: bool) -> str:
    """The text ``/help`` shows."""
    width = max(len(f"{LOCAL_PREFIX}{name} {arg}".rstrip()) for name, (arg, _) in LOCAL_COMMANDS.items())
    local = "\n".join(
        f"  {f'{LOCAL_PREFIX}{name} {arg}'.rstrip():<{width}}  {what}" for name, (arg, what) in LOCAL_COMMANDS.items()
    )
    mode = "on" if json_mode else "off"
    return (
        "Type `command [payload]` to send a command to the server, e.g. `say hello`.\n"
        "Lines starting with / are for this client and are not sent:\n"
        f"{local}\n"
        f"  (//cmd sends the command /cmd.)\n"
        "Payloads: in text mode `say 42` sends the text \"42\"; a JSON object or array\n"
        "({...} or [...]) is sent as one: whisper {\"to\": \"bob\", \"text\": \"hi\"}.\n"
        "In JSON mode every payload is JSON: 42 is a number, \"42\" a text, null nothing.\n"
        f"JSON mode is {mode}.  Up/down recall earlier lines; Ctrl-D leaves."
    )
