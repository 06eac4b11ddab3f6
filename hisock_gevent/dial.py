"""Opening a client's connection: TCP to the server, then TLS when asked.

Both steps either succeed or raise the client's own errors (:class:`ServerNotRunning`,
:class:`TLSError`) with the address in the message.  They block the calling thread, or
only the calling greenlet when ``cooperative`` (a reconnecting client dials from its hub,
which must keep serving its dispatcher and a ``close()`` from another thread meanwhile).
"""

from __future__ import annotations

import socket as _stdlib_socket
import ssl
from typing import Tuple

from gevent import socket as gsocket

from .connection import set_nodelay
from .errors import ServerNotRunning, TLSError
from .tls import TLSLayer, perform_handshake
from .utils import iptup_to_str

__all__ = ["dial", "tls_handshake"]


def dial(addr: Tuple[str, int], timeout: float, cooperative: bool = False) -> _stdlib_socket.socket:
    """A connected, blocking, no-delay standard socket to ``addr``.

    :raises ValueError: ``addr`` is IPv6 (HiSock is IPv4 only).
    :raises ServerNotRunning: nothing accepts connections there, or the connection failed.
    """
    if ":" in str(addr[0]):
        raise ValueError(f"IPv6 addresses are not supported (HiSock is IPv4 only): {addr[0]!r}")
    where = iptup_to_str(addr)
    try:
        if cooperative:
            sock = _stdlib_socket.socket(fileno=gsocket.create_connection(addr, timeout=timeout).detach())
        else:
            sock = _stdlib_socket.create_connection(addr, timeout=timeout)
    except (ConnectionRefusedError, _stdlib_socket.timeout) as exc:
        raise ServerNotRunning(f"no HiSock server is accepting connections at {where}: {exc}") from exc
    except OSError as exc:
        raise ServerNotRunning(f"cannot connect to {where}: {exc}") from exc
    set_nodelay(sock)
    sock.settimeout(None)
    return sock


def tls_handshake(
    sock: _stdlib_socket.socket, context: ssl.SSLContext, hostname: str, timeout: float, cooperative: bool = False
) -> TLSLayer:
    """Run the client's side of the TLS handshake on ``sock`` (at most ``timeout`` seconds
    per read) and return the layer that encrypts from then on.

    :raises TLSError: the server did not answer in time, broke the connection, or its
        certificate was refused.
    """
    layer = TLSLayer(context, server_side=False, server_hostname=hostname)
    sock.settimeout(timeout)
    try:
        if cooperative:
            waiting = gsocket.socket(fileno=sock.fileno())
            try:
                perform_handshake(layer, waiting.recv, waiting.sendall)
            finally:
                waiting.detach()
        else:
            perform_handshake(layer, sock.recv, sock.sendall)
    except _stdlib_socket.timeout as exc:
        raise TLSError(f"no TLS handshake answer within {timeout} s") from exc
    except OSError as exc:
        raise TLSError(f"the connection failed during the TLS handshake: {exc}") from exc
    finally:
        sock.settimeout(None)
    return layer
