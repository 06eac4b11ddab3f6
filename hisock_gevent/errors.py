"""Every exception and warning hisock_gevent raises.

HiSock's public names are kept so ``except hisock.ClientNotFound`` keeps working after the
import is changed.  Two families are kept apart, as h11 does:

* :class:`RemoteProtocolError` and its subclasses: the *peer* sent something that breaks
  the protocol.  The library catches these itself, closes that one connection and logs
  why; user code only sees them from the pure protocol functions.
* Everything else: *our caller* misused the API (a wrong client format, a command that is
  reserved, content that cannot be sent), or a documented condition such as a client that
  does not exist.
"""

from __future__ import annotations

__all__ = [
    "HiSockError",
    "ClientException",
    "ServerException",
    "ServerClosed",
    "ClientNotFound",
    "GroupNotFound",
    "FunctionNotFoundException",
    "InvalidTypeCast",
    "ServerNotRunning",
    "ClientDisconnected",
    "NoMessageException",
    "ConnectionRejected",
    "RemoteProtocolError",
    "InvalidHeader",
    "MessageTooLarge",
    "MalformedMessage",
    "MalformedPayload",
    "FrameTimeout",
    "InvalidName",
    "ContentTooLarge",
    "CallError",
    "CallNotSupported",
    "CallTimeout",
    "HandshakeError",
    "TLSError",
    "AuthenticationFailed",
    "NoHeaderWarning",
    "FunctionNotFoundWarning",
    "MalformedClusterMessage",
    "BackplaneUnreachable",
    "TextMessageRefused",
    "WebSocketProtocolError",
]


class HiSockError(Exception):
    """Base class of every hisock_gevent exception."""


class ClientException(HiSockError):
    """A client-side operation failed (HiSock's name)."""


class ServerException(HiSockError):
    """A server-side operation failed (HiSock's name)."""


class ServerClosed(ServerException):
    """The server is closed: a call from another thread (a handler still running on a
    worker thread, say) cannot be carried out any more."""


class ClientNotFound(HiSockError):
    """No connected client matches the given name, address or ClientInfo."""


class GroupNotFound(HiSockError, TypeError):
    """No connected client is in the given group.

    Also a TypeError, because HiSock documents ``send_group`` as raising TypeError here.
    """


class FunctionNotFoundException(HiSockError):
    """A handler was looked up that was never registered with ``on()``."""


class InvalidTypeCast(HiSockError, TypeError):
    """Content cannot be encoded for this peer (not Sendable, or needs an extension the peer lacks)."""


class ServerNotRunning(HiSockError):
    """Nothing accepted the connection at the server's address."""


class ClientDisconnected(HiSockError, ConnectionError):
    """The connection is closed: the operation cannot be carried out.

    Also a :class:`ConnectionError` (an OSError), as HiSock programs catch those around
    sends.
    """


class NoMessageException(HiSockError):
    """No message is available (HiSock's name)."""


class ConnectionRejected(ClientException):
    """The server answered our hello with ``$DISCONN$`` (full, or refused us)."""


class RemoteProtocolError(HiSockError):
    """The peer broke the wire protocol; the connection it came from must be closed."""


class InvalidHeader(RemoteProtocolError):
    """A frame header is not a decimal length padded with spaces."""


class MessageTooLarge(RemoteProtocolError):
    """A frame header announces a body longer than the configured maximum."""


class MalformedMessage(RemoteProtocolError):
    """A frame body is neither a known reserved message nor a command message."""


class MalformedPayload(RemoteProtocolError):
    """A command message's fmt string or payload cannot be decoded."""


class FrameTimeout(RemoteProtocolError):
    """A frame that had started did not finish within the frame timeout (a trickle or a stall)."""


class InvalidName(RemoteProtocolError):
    """A name or group sent by the peer is too long or not valid text."""


class ContentTooLarge(HiSockError, ValueError):
    """What we were asked to send makes a frame larger than the peer accepts."""


class CallError(HiSockError):
    """The handler on the other side of a :meth:`call` raised (or there was none).

    :ivar remote_type: the name of the exception's class there (``"ValueError"``, or
        ``"FunctionNotFoundException"`` when nobody handles the command).
    :ivar remote_message: its message.
    """

    def __init__(self, remote_type: str, remote_message: str):
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message


class CallNotSupported(CallError):
    """The peer cannot answer calls: it did not negotiate the ``call`` extension (a plain
    HiSock peer, or one that did not offer it)."""

    def __init__(self, message: str):
        super().__init__("CallNotSupported", message)


class CallTimeout(HiSockError, TimeoutError):
    """No answer to a :meth:`call` within its timeout."""


class HandshakeError(RemoteProtocolError):
    """The peer's hello is missing, late, repeated or not what the protocol says."""


class TLSError(HandshakeError):
    """The TLS handshake failed or TLS records were corrupt (e.g. a plain client on a TLS port)."""


class AuthenticationFailed(ConnectionRejected):
    """The server's authentication check refused our hello."""


class MalformedClusterMessage(HiSockError, ValueError):
    """Bytes on a cluster channel (or in the shared table) that are not one of our
    messages: someone else's data in our Redis namespace.  Counted and skipped."""


class BackplaneUnreachable(HiSockError, ConnectionError):
    """The backplane's Redis could not be reached (at start, when it was required)."""


class TextMessageRefused(RemoteProtocolError):
    """A WebSocket peer sent a text message: HiSock bodies travel in binary messages only."""


class WebSocketProtocolError(RemoteProtocolError):
    """A WebSocket peer broke RFC 6455 itself (an unmasked frame, a bad opcode, a control
    frame too long, invalid UTF-8 in a close reason...).

    :ivar code: the close code the connection is closed with (1002, or 1007 for bad text).
    """

    def __init__(self, message: str, code: int = 1002):
        super().__init__(message)
        self.code = code


class NoHeaderWarning(Warning):
    """HiSock's warning for a message without a header."""


class FunctionNotFoundWarning(Warning):
    """HiSock's warning for a command that has no handler."""
