"""HiSock's public helpers under HiSock's names: ClientInfo, MessageCacheMember and address utilities.

Nothing here touches gevent; the input_* helpers use the built-in ``input()``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

# HiSock kept its exceptions in utils; code importing them from there keeps working.
from .errors import (  # noqa: F401
    ClientDisconnected,
    ClientException,
    ClientNotFound,
    FunctionNotFoundException,
    FunctionNotFoundWarning,
    GroupNotFound,
    InvalidTypeCast,
    NoHeaderWarning,
    NoMessageException,
    ServerException,
    ServerNotRunning,
)

__all__ = [
    "ClientInfo",
    "MessageCacheMember",
    "Sendable",
    "Client",
    "ipstr_to_tup",
    "iptup_to_str",
    "validate_ipv4",
    "get_local_ip",
    "input_server_config",
    "input_client_config",
    "make_header",
    "receive_message",
    "validate_command_not_reserved",
    "SendableTypes",
    "RECV_BUFFERSIZE",
]

#: Bytes HiSock asks of a socket per read (``HiSockServer.RECV_BUFFERSIZE``); kept for
#: programs that use it with :func:`receive_message`.
RECV_BUFFERSIZE = 8192
_RESERVED_FORM = re.compile(r"\$.+\$")

#: What the send methods accept (HiSock's ``Sendable``); containers nest freely.
Sendable = Union[bytes, str, int, float, None, "ClientInfo", List[Any], Tuple[Any, ...], Dict[Any, Any]]
#: HiSock's name for the type of a Sendable value (for type hints).
SendableTypes = Type[Sendable]
#: The ways a caller can name one client: ``(ip, port)``, ``"ip:port"``, a name, or a ClientInfo.
Client = Union[Tuple[str, int], str, "ClientInfo"]


def make_header(header_message: Union[str, bytes], header_len: int, encode: bool = True) -> Union[str, bytes]:
    """HiSock's helper: the header announcing ``header_message``'s length, padded with
    spaces to ``header_len`` characters; bytes unless ``encode`` is False."""
    digits = str(len(header_message))
    header = digits + " " * (header_len - len(digits))
    return header.encode() if encode else header


def receive_message(
    connection: socket.socket, header_len: int, buffer_size: int = RECV_BUFFERSIZE
) -> Union[Dict[str, Optional[bytes]], bool]:
    """HiSock's helper: read one frame from a blocking socket.

    :returns: ``{"header": <header bytes>, "data": <body, or None if the connection ended
        in the middle>}``, or False when the connection ended (or was reset) first.
    """

    def read_exactly(count: int, chunk: int) -> Optional[bytes]:
        parts = []
        left = count
        while left > 0:
            part = connection.recv(min(left, chunk))
            if not part:
                return None
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    try:
        header = read_exactly(header_len, header_len)
        if header is None:
            return False
        return {"header": header, "data": read_exactly(int(header), buffer_size)}
    except ConnectionResetError:
        return False


def validate_command_not_reserved(command: str) -> None:
    """HiSock's helper: refuse a command of the ``$...$`` form HiSock keeps for itself.

    :raises ValueError: the command is reserved.
    """
    if _RESERVED_FORM.search(command):
        raise ValueError('The format "$command$" is used for reserved functions - consider using a different format.')


def iptup_to_str(formatted_tuple: Tuple[str, int]) -> str:
    """Return ``"ip:port"`` for an ``(ip, port)`` tuple."""
    return f"{formatted_tuple[0]}:{formatted_tuple[1]}"


def ipstr_to_tup(formatted_ip: str) -> Tuple[str, int]:
    """Return ``(ip, port)`` for an ``"ip:port"`` string.

    :raises ValueError: if the string is not ``ip:port`` with a numeric port.
    """
    ip, sep, port = formatted_ip.rpartition(":")
    if not sep or not ip or not port.isdigit():
        raise ValueError(f"{formatted_ip!r} is not in the form 'ip:port'")
    return ip, int(port)


def validate_ipv4(
    ip: Union[str, Tuple[str, int]], require_ip: bool = True, require_port: bool = True
) -> bool:
    """Check an IPv4 address given as ``"ip:port"``, ``"ip"``, ``":port"`` or ``(ip, port)``.

    :param require_ip: the IP part must be present.
    :param require_port: the port part must be present.
    :returns: True when valid.
    :raises ValueError: naming what is wrong, when not.
    """
    if isinstance(ip, tuple):
        if len(ip) != 2:
            raise ValueError(f"an address tuple has two items (ip, port), not {ip!r}")
        host, port_text = str(ip[0]), str(ip[1])
    elif isinstance(ip, str):
        host, _, port_text = ip.partition(":")
    else:
        raise ValueError(f"{ip!r} is not an IPv4 address")
    if require_ip or host:
        if not host:
            raise ValueError(f"{ip!r} has no IP address")
        try:
            ipaddress.IPv4Address(host)
        except ipaddress.AddressValueError as exc:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from exc
    if require_port or port_text:
        if not port_text.isdigit():
            raise ValueError(f"{ip!r} has no valid port")
        if not 0 <= int(port_text) <= 65535:
            raise ValueError(f"{port_text} is not a valid port (0-65535)")
    return True


def get_local_ip(all_ips: bool = False) -> Union[str, List[str]]:
    """This machine's IP address as HiSock finds it: its host name resolved
    (``socket.gethostbyname``); with ``all_ips``, every address the name resolves to.

    :raises OSError: the host name does not resolve (as with HiSock).
    """
    if all_ips:
        return list(socket.gethostbyname_ex(socket.gethostname())[2])
    return socket.gethostbyname(socket.gethostname())


def _ask(prompt: str, parse: Callable[[str], Any], error: str) -> Any:
    """Ask with ``input()`` until ``parse`` accepts the answer (it raises ValueError if not)."""
    answer = input(prompt)
    while True:
        try:
            return parse(answer.strip())
        except ValueError:
            answer = input(f"{error}\n{prompt}")


def _parse_ip(text: str) -> str:
    validate_ipv4(text, require_port=False)
    return text


def _parse_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ValueError(text)
    return int(text)


def _parse_nonempty(text: str) -> str:
    if not text:
        raise ValueError(text)
    return text


def input_server_config(
    ip_prompt: str = "Enter the IP of where to host the server: ",
    port_prompt: str = "Enter the Port of where to host the server: ",
) -> Tuple[str, int]:
    """Ask on the terminal for the address to host a server at, until it is valid."""
    ip = _ask(ip_prompt, _parse_ip, "E: Invalid IP")
    port = _ask(port_prompt, _parse_port, "E: Invalid Port")
    return ip, port


def input_client_config(
    ip_prompt: str = "Enter the IP of the server: ",
    port_prompt: str = "Enter the Port of the server: ",
    name_prompt: Optional[str] = "Enter name to connect as: ",
    group_prompt: Optional[str] = "Enter group to connect to: ",
) -> Tuple[Any, ...]:
    """Ask on the terminal for a server address and, unless its prompt is None, a name and group.

    :returns: ``(ip, port)``, followed by the name and the group when they were asked for.
    """
    answers: List[Any] = list(input_server_config(ip_prompt, port_prompt))
    if name_prompt is not None:
        answers.append(_ask(name_prompt, _parse_nonempty, "E: a name is required"))
    if group_prompt is not None:
        answers.append(_ask(group_prompt, _parse_nonempty, "E: a group is required"))
    return tuple(answers)


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of one client: its address, name and group.

    Immutable and hashable, so it can key ``clients_rev``; a name or group change makes a
    new ClientInfo.  ``info["name"]`` works as well as ``info.name``, as in HiSock.

    It prints one way: ``str(info)`` and ``repr(info)`` both give HiSock's
    ``<ClientInfo: IP: 10.0.0.1:80, Name: alice, Group: red>``, so a list of clients (or an
    error message naming one) reads like ``print(info)``.  HiSock 3.0 showed the dataclass
    form ``ClientInfo(ip=..., ...)`` inside containers; that second form is gone on purpose.
    A missing name or group prints as ``None``: read the fields (or :meth:`as_dict`) to tell
    it from a client really named ``"None"``.
    """

    ip: Tuple[str, int]
    name: Optional[str] = None
    group: Optional[str] = None
    ipstr: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        ip = self.ip
        if not (isinstance(ip, tuple) and len(ip) == 2):
            # JSON brings the address back as a list; keep the documented tuple form.
            ip = (str(ip[0]), int(ip[1])) if isinstance(ip, (list, tuple)) and len(ip) == 2 else ip
            object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "ipstr", iptup_to_str(ip))

    def __getitem__(self, key: str) -> Any:
        if key not in ("ip", "name", "group", "ipstr"):
            raise KeyError(key)
        return getattr(self, key)

    def __str__(self) -> str:
        return f"<ClientInfo: IP: {self.ipstr}, Name: {self.name}, Group: {self.group}>"

    # The one printed form (see the class docstring); the dataclass keeps a __repr__ it finds.
    __repr__ = __str__

    def as_dict(self) -> Dict[str, Any]:
        """The info as the wire's JSON object: ``ip`` (list form there), ``name``, ``group``, ``ipstr``."""
        return {"ip": self.ip, "name": self.name, "group": self.group, "ipstr": self.ipstr}

    def copy(self) -> ClientInfo:
        return ClientInfo(self.ip, self.name, self.group)

    @classmethod
    def from_dict(cls, dict_: Dict[str, Any]) -> ClientInfo:
        """Build from a dict with ``ip`` (tuple, list or ``"ip:port"``) and optional ``name``/``group``."""
        ip = dict_["ip"]
        if isinstance(ip, str):
            ip = ipstr_to_tup(ip)
        return cls((str(ip[0]), int(ip[1])), dict_.get("name"), dict_.get("group"))


class MessageCacheMember:
    """One entry of a message cache: the frame's ``header`` (body length), ``content``,
    ``called`` (whether a handler ran for it) and ``command``."""

    __slots__ = ("header", "content", "called", "command")

    def __init__(self, message_dict: Optional[Dict[str, Any]] = None, **fields: Any) -> None:
        values = dict(message_dict or {}, **fields)
        self.header: Optional[int] = values.get("header")
        self.content: Any = values.get("content")
        self.called: bool = bool(values.get("called", False))
        self.command: Optional[str] = values.get("command")

    def __repr__(self) -> str:
        return (
            f"MessageCacheMember(header={self.header!r}, content={self.content!r}, "
            f"called={self.called!r}, command={self.command!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MessageCacheMember):
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in self.__slots__)


def remember(cache: List[MessageCacheMember], cache_size: int, member: MessageCacheMember) -> None:
    """Add ``member`` to a HiSock message cache of ``cache_size`` (-1 or below: none kept,
    0: no limit, N: the last N), dropping the oldest entry when it is full.

    Not part of HiSock's API: the server and the client keep their ``cache`` with it.
    """
    if cache_size < 0:
        return
    cache.append(member)
    if 0 < cache_size < len(cache):
        del cache[0]
