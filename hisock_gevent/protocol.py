"""The opening handshake of a HiSock connection, both ends, as plain objects: messages in, a verdict out.

No sockets and no gevent here (as websockets does for its opening handshake): the server
session and the client feed these objects what arrives and act on the verdict, and the
rules themselves are tested with bytes alone.

* :class:`ServerHandshake` takes the first body a new connection sends and says whether
  it is an acceptable hello (a :class:`~hisock_gevent.messages.Hello` whose name and
  group pass :func:`~hisock_gevent.messages.name_problem`) or why not.  What only the
  server knows (room left, the authentication check) stays with the server.
* :class:`ClientHandshake` makes the client's hello, then takes what the server sends
  until the server's answer: our own ``$CLTCONN$`` (joined, with the capabilities the
  server accepted) or ``$DISCONN$`` (refused, with the reason when one came).  Anything
  that arrives before the answer is kept, within bounds, to be handled after it.

PROTOCOL.md section 4 describes the handshake on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .errors import AuthenticationFailed, ConnectionRejected, HandshakeError, RemoteProtocolError
from .frames import DEFAULT_HEADER_LEN, DEFAULT_MAX_MESSAGE_SIZE, FrameParser
from .messages import (
    CAPABILITY_MSGPACK,
    Disconnect,
    Hello,
    PeerJoined,
    ServerMessage,
    name_problem,
    parse_client_body,
    parse_server_body,
)

__all__ = [
    "ServerHandshake",
    "Refusal",
    "ClientHandshake",
    "Answer",
    "AUTH_FAILED_REASON",
    "CLOSING_REASON",
    "KICKED_REASON",
    "MAX_EARLY_MESSAGES",
    "MAX_EARLY_BYTES",
]

#: The reason a server gives a hisock_gevent client its authentication check refused.
AUTH_FAILED_REASON = "authentication failed"
#: The reason given with ``$DISCONN$`` when the server closes (a reconnecting client
#: comes back), and when ``disconnect_client`` sends a client away (it does not).
CLOSING_REASON = "server closing"
KICKED_REASON = "disconnected by the server"
#: What a client keeps of what arrives before the server's answer, at most.
MAX_EARLY_MESSAGES = 1024
MAX_EARLY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Refusal:
    """Why a server refuses a hello: ``text`` for the log and the peer, ``reason`` for stats."""

    text: str
    reason: str


class ServerHandshake:
    """The server's side: is the first body of a connection a hello it can accept?

    :param max_name_length: the longest name or group accepted, in characters.
    """

    __slots__ = ("max_name_length",)

    def __init__(self, max_name_length: int):
        self.max_name_length = max_name_length

    def receive_hello(self, body: bytes) -> Hello:
        """The hello in the first body a connection sent.

        :raises HandshakeError: the body is a message, but not a hello.
        :raises RemoteProtocolError: the body is not a message at all, or a bad hello.
        """
        message = parse_client_body(body)
        if not isinstance(message, Hello):
            raise HandshakeError(f"first message was {type(message).__name__}, not a hello")
        return message

    def refusal(self, hello: Hello) -> Optional[Refusal]:
        """Why this hello cannot join whatever the server's state, or None."""
        for what, value in (("name", hello.name), ("group", hello.group)):
            problem = name_problem(value, what, self.max_name_length)
            if problem is not None:
                return Refusal(problem, "invalid_name")
        return None

    @staticmethod
    def tells_reasons(hello: Hello) -> bool:
        """True when the peer understands a reason after ``$DISCONN$`` (it offered
        capabilities, so it is a hisock_gevent client); plain HiSock peers get none."""
        return CAPABILITY_MSGPACK in hello.capabilities


@dataclass(frozen=True)
class Answer:
    """The server accepted our hello.

    :ivar caps: the capabilities the server accepted (empty for a plain HiSock server).
    :ivar early: the messages that came before the answer or with it (the answer itself
        included, as the first ``$CLTCONN$``), in order, to be handled now.
    """

    caps: Tuple[str, ...]
    early: List[ServerMessage] = field(default_factory=list)
    #: The largest message body the server accepts, when it said (hisock_gevent does).
    max_message_size: Optional[int] = None

    def accepts(self, capability: str) -> bool:
        return capability in self.caps


class ClientHandshake:
    """The client's side: the hello to send, then the server's answer.

    Feed it either raw bytes (:meth:`receive_data`, which frames them with ``parser``) or
    messages already parsed (:meth:`receive_message`); :attr:`answer` is set once the
    server has answered.

    :param offer: the capabilities we offer (``("msgpack",)`` or none, for a plain HiSock
        hello).
    :param auth: credentials for the server's authentication check, or None.
    :raises ConnectionRejected: (from the receive methods) the server refused us, broke
        the protocol, or sent too much before answering.
    :raises AuthenticationFailed: (a ConnectionRejected) its authentication check said no.
    """

    def __init__(
        self,
        name: Optional[str],
        group: Optional[str],
        offer: Tuple[str, ...] = (CAPABILITY_MSGPACK,),
        auth: Any = None,
        header_len: int = DEFAULT_HEADER_LEN,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ):
        self.name = name
        self.group = group
        self.offer = tuple(offer)
        self.auth = auth
        #: Frames what :meth:`receive_data` is given; the connection carries on with it.
        self.parser = FrameParser(header_len, max_message_size)
        self.answer: Optional[Answer] = None
        #: The reason the server gave with its refusal, if any.
        self.refused_reason: Optional[str] = None
        self._early: List[ServerMessage] = []
        self._early_bytes = 0

    def hello_body(self) -> bytes:
        """The body of our ``$CLTHELLO$``."""
        extra: Dict[str, Any] = {"caps": list(self.offer)} if self.offer else {}
        if self.offer:
            # What we accept, so that the server knows too (an extension: a plain HiSock
            # hello has no such key).
            extra["max_message_size"] = self.parser.max_body_len
        if self.auth is not None:
            extra["auth"] = self.auth
        return Hello(self.name, self.group, extra).to_body()

    def receive_data(self, data: bytes) -> Optional[Answer]:
        """Take bytes from the server; the answer once it has come, else None."""
        try:
            bodies = self.parser.feed(data)
            for body in bodies:
                self.receive_message(parse_server_body(body), len(body))
        except RemoteProtocolError as exc:
            raise ConnectionRejected(f"the server's answer broke the protocol: {exc}") from exc
        return self.answer

    def receive_message(self, message: ServerMessage, size: int = 0) -> Optional[Answer]:
        """Take one message from the server; the answer once it has come, else None."""
        if self.answer is not None:
            # Came with the answer, in the same read: at most one read's worth.
            self.answer.early.append(message)
            return self.answer
        self._early_bytes += size
        if len(self._early) >= MAX_EARLY_MESSAGES or self._early_bytes > MAX_EARLY_BYTES:
            raise ConnectionRejected(
                f"the server sent more than {MAX_EARLY_MESSAGES} messages or {MAX_EARLY_BYTES} bytes "
                "before answering our hello"
            )
        if isinstance(message, Disconnect):
            self.refused_reason = message.reason
            if message.reason == AUTH_FAILED_REASON:
                raise AuthenticationFailed("the server's authentication check refused us")
            why = f": {message.reason}" if message.reason else ""
            raise ConnectionRejected(f"the server refused the connection ($DISCONN$){why}")
        self._early.append(message)
        if isinstance(message, PeerJoined):
            # The first $CLTCONN$ after our hello announces us.
            caps = message.info.get("caps")
            accepted = tuple(c for c in caps if isinstance(c, str) and c in self.offer) if isinstance(caps, list) else ()
            limit = message.info.get("max_message_size")
            limit = limit if type(limit) is int and limit > 0 else None
            self.answer = Answer(accepted, self._early, limit)
        return self.answer
