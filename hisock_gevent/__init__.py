"""hisock_gevent: HiSock's server and client API on gevent.

Code written for HiSock 3.x runs by changing ``import hisock`` to ``import hisock_gevent``;
the wire format is HiSock's (see PROTOCOL.md), so HiSock and hisock_gevent peers mix.
"""

from __future__ import annotations

import logging

from . import client, server, utils
from .client import HiSockClient, ThreadedHiSockClient, connect, threaded_connect
from .constants import __version__
from .errors import (
    AuthenticationFailed,
    CallError,
    CallNotSupported,
    CallTimeout,
    ClientDisconnected,
    ClientException,
    ClientNotFound,
    ConnectionRejected,
    ContentTooLarge,
    FrameTimeout,
    FunctionNotFoundException,
    FunctionNotFoundWarning,
    GroupNotFound,
    HandshakeError,
    HiSockError,
    InvalidHeader,
    InvalidName,
    InvalidTypeCast,
    MalformedMessage,
    MalformedPayload,
    MessageTooLarge,
    NoHeaderWarning,
    NoMessageException,
    RemoteProtocolError,
    ServerClosed,
    ServerException,
    ServerNotRunning,
    TLSError,
)
from .server import HiSockServer, ThreadedHiSockServer, start_server, start_threaded_server
from .utils import (
    ClientInfo,
    MessageCacheMember,
    Sendable,
    get_local_ip,
    input_client_config,
    input_server_config,
    ipstr_to_tup,
    iptup_to_str,
    validate_ipv4,
)

logging.getLogger("hisock_gevent").addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "client",
    "server",
    "utils",
    "HiSockServer",
    "ThreadedHiSockServer",
    "start_server",
    "start_threaded_server",
    "HiSockClient",
    "ThreadedHiSockClient",
    "connect",
    "threaded_connect",
    "ClientInfo",
    "MessageCacheMember",
    "Sendable",
    "get_local_ip",
    "input_client_config",
    "input_server_config",
    "ipstr_to_tup",
    "iptup_to_str",
    "validate_ipv4",
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
]
