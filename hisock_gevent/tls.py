"""TLS as a layer over memory buffers (``ssl.MemoryBIO``): ciphertext in and out, no socket.

Keeping TLS state out of the socket lets a connection change hands: a client does its
handshake on a plain blocking socket in whatever thread constructs it, and the same TLS
session carries on once a gevent hub adopts the socket (see client.py).  All socket I/O
stays gevent's; the ``ssl`` module only transforms bytes, so it never blocks the hub.
"""

from __future__ import annotations

import ssl
from typing import Callable, List, Optional, Tuple

from .errors import TLSError

__all__ = ["TLSLayer", "perform_handshake", "server_context", "client_context"]

_READ_CHUNK = 256 * 1024


def server_context(certfile: str, keyfile: Optional[str] = None) -> ssl.SSLContext:
    """A server-side context with modern defaults and the given certificate chain."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def client_context(
    cafile: Optional[str] = None, certfile: Optional[str] = None, keyfile: Optional[str] = None
) -> ssl.SSLContext:
    """A client-side context that verifies the server (against ``cafile`` if given)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


class TLSLayer:
    """One TLS session on memory buffers.

    :param context: the SSLContext to use.
    :param server_side: True on the server.
    :param server_hostname: the name (or IP) the server's certificate must match.
    """

    __slots__ = ("_incoming", "_outgoing", "_obj", "handshake_done", "closed_by_peer")

    def __init__(self, context: ssl.SSLContext, server_side: bool, server_hostname: Optional[str] = None):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.handshake_done = False
        self.closed_by_peer = False

    def handshake_step(self, ciphertext: bytes = b"") -> bytes:
        """Feed what the peer sent; return what to send it.  Sets :attr:`handshake_done`.

        :raises TLSError: the handshake failed (not TLS, bad certificate, ...).
        """
        if ciphertext:
            self._incoming.write(ciphertext)
        try:
            self._obj.do_handshake()
            self.handshake_done = True
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, ValueError) as exc:
            raise TLSError(f"TLS handshake failed: {exc}") from exc
        return self._outgoing.read()

    def receive(self, ciphertext: bytes) -> Tuple[bytes, bytes]:
        """Decrypt what arrived; return ``(plaintext, bytes to send back)``.

        The reply is non-empty only for TLS's own messages (e.g. a key update).  After the
        peer's close_notify :attr:`closed_by_peer` is True.

        :raises TLSError: the records are corrupt.
        """
        if ciphertext:
            self._incoming.write(ciphertext)
        pieces: List[bytes] = []
        read = self._obj.read
        try:
            while True:
                piece = read(_READ_CHUNK)
                if not piece:
                    break
                pieces.append(piece)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.closed_by_peer = True
        except ssl.SSLError as exc:
            raise TLSError(f"TLS record error: {exc}") from exc
        plaintext = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return plaintext, self._outgoing.read()

    def encrypt(self, plaintext: bytes) -> bytes:
        """Return the ciphertext that carries ``plaintext``."""
        self._obj.write(plaintext)
        return self._outgoing.read()


def perform_handshake(layer: TLSLayer, recv: Callable[[int], bytes], sendall: Callable[[bytes], object]) -> None:
    """Run a whole handshake over any blocking ``recv``/``sendall`` pair (timeouts are the caller's).

    :raises TLSError: the handshake failed or the peer closed during it.
    """
    reply = layer.handshake_step()
    while True:
        if reply:
            sendall(reply)
        if layer.handshake_done:
            return
        data = recv(_READ_CHUNK)
        if not data:
            raise TLSError("the peer closed the connection during the TLS handshake")
        reply = layer.handshake_step(data)
