"""HiSockUser: a Locust user that speaks HiSock and reports what it does to Locust.

Needs the ``load`` extra (``pip install 'hisock_gevent[load]'``); without Locust, importing
this module raises an ImportError that says so.  Importing it imports Locust, which
monkey-patches the process: use it in locustfiles (the ``locust`` command has patched the
process before it reads them), not in a program that must stay unpatched.

Each user holds one :class:`~hisock_gevent.ThreadedHiSockClient`.  In Locust's patched
process that client is a greenlet on Locust's hub, beside the users, so nothing blocks.
What the user does goes to Locust's statistics under these request types:

``connect`` (name ``connect``)
    the TCP connection, the hello and the server's answer to it.
``call`` (name: the command)
    :meth:`HiSockUser.call`, timed from the call to its answer; a :class:`CallError`,
    :class:`CallTimeout`, :class:`ClientDisconnected` (or any other error) is a failure.
``send`` (name: the command)
    :meth:`HiSockUser.send`: fire and forget, so its time is that of queueing the message
    (about 0); its length is the payload's bytes when the content is str, bytes or None.
``recv`` (name: the command)
    every command message the server pushes (whoever handles it, and also when nobody
    does); its length is the payload's bytes as it came on the wire.  Its time is 0, as
    in Locust's own contrib for push protocols (socket.io): a pushed message answers no
    request of ours.  Override :meth:`HiSockUser.recv_response_time` when the content
    says when it was sent.

Answers to :meth:`~hisock_gevent.HiSockClient.call` are not command messages: they are
reported once, in the ``call`` row, not as ``recv``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple

try:
    from locust import User
except ModuleNotFoundError as exc:
    if exc.name != "locust":
        raise  # Locust is there but something it needs is not: its own message says what
    raise ImportError("hisock_gevent.locust needs Locust: pip install 'hisock_gevent[load]'") from exc

from .client import DEFAULT_CALL_TIMEOUT, ThreadedHiSockClient
from .errors import HiSockError
from .inbox import Received, Record
from .utils import Sendable

__all__ = ["HiSockUser", "parse_host"]

#: How a pushed message reports itself to its user: ``(command, content, payload bytes)``.
ReceivedReporter = Callable[[str, Any, int], None]


def parse_host(host: Optional[str]) -> Tuple[str, int]:
    """Locust's ``host`` (``HOST:PORT``, or ``hisock://HOST:PORT``) -> ``(host, port)``.

    :raises ValueError: no host was given, or it is not ``HOST:PORT``.
    """
    if not host:
        raise ValueError("give the server as --host HOST:PORT (or set host on the user class)")
    address = host.split("://", 1)[-1].rstrip("/")
    name, _, port = address.rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"the host must be HOST:PORT, not {host!r}")
    return name, int(port)


def payload_size(content: Any) -> int:
    """The payload bytes ``content`` is sent as, when that is known without encoding it:
    str (UTF-8), bytes-like and None; 0 for anything else."""
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass"))
    if isinstance(content, (bytes, bytearray)):
        return len(content)
    if isinstance(content, memoryview):
        return content.nbytes
    return 0


class _ReportingClient(ThreadedHiSockClient):
    """A ThreadedHiSockClient that tells its user about every command message it dispatches.

    The report is made where the dispatcher takes the message from the inbox, before it is
    given to a handler, a ``recv()`` or the ``*`` handler (or kept for none): so every push
    is reported once, whoever takes it, with the size of its payload as it came.
    """

    def __init__(self, *args: Any, on_received: ReceivedReporter, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._on_received = on_received

    def _handle(self, record: Record) -> bool:
        if type(record) is Received:
            self._on_received(record.command, record.content, len(record.message.payload))
        return super()._handle(record)


class HiSockUser(User):
    """A Locust user with a HiSock connection: connects on start, closes on stop, and
    reports every call, send and pushed message to Locust (see the module's docstring).

    Subclass it, give it tasks, and set, if needed:

    :cvar host: the server as ``HOST:PORT`` (Locust's ``--host`` overrides it).
    :cvar client_name: the name the client goes by (None for none).
    :cvar client_group: the group it joins (None for none).
    :cvar client_options: more keyword arguments for :class:`~hisock_gevent.HiSockClient`
        (``auth``, ``use_msgpack``, ``connect_timeout``, ``cafile``...).

    ``client_name`` and ``client_group`` are not called ``name`` and ``group``: ``group``
    is Locust's own (the greenlet group the user runs in, which Locust uses to stop it),
    so a subclass that sets either raises TypeError.

    :ivar client: the current :class:`~hisock_gevent.ThreadedHiSockClient`, or None
        before the first connection succeeds.

    A connection that failed or ended (the server closed it) is made again by the next
    :meth:`call` or :meth:`send`; handlers registered with :meth:`on` move to it.
    """

    abstract = True
    client_name: Optional[str] = None
    client_group: Optional[str] = None
    client_options: Dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, instead in (("name", "client_name"), ("group", "client_group")):
            if attr in cls.__dict__ and (cls.__dict__[attr] is None or isinstance(cls.__dict__[attr], str)):
                raise TypeError(
                    f"{cls.__name__}.{attr}: set {instead} for the HiSock client's {attr} "
                    f"(User.group is Locust's: the greenlet group it stops the user with)"
                )

    def __init__(self, environment: Any):
        super().__init__(environment)
        self.client: Optional[ThreadedHiSockClient] = None
        # command -> (handler, threaded): registered again on every new connection
        self._handlers: Dict[str, Tuple[Callable[..., Any], bool]] = {}

    # ------------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        """Connect.  A failure is reported (a failed ``connect``) and the user carries on:
        its next :meth:`call` or :meth:`send` tries again."""
        try:
            self.connect()
        except (HiSockError, OSError):
            pass

    def on_stop(self) -> None:
        """Leave and close the connection."""
        self.disconnect()

    def connect(self) -> ThreadedHiSockClient:
        """Connect to ``host`` (closing the current connection first, if any), wait for
        the server's answer, register the :meth:`on` handlers and start receiving.

        Reported as request type ``connect``.

        :raises ValueError: ``host`` is not ``HOST:PORT`` (not reported: a mistake in the
            locustfile, not in the server).
        :raises ServerNotRunning: nothing listens there.  :raises ConnectionRejected: the
            server refused us (full, or its checks said no) or did not answer in time.
        """
        addr = parse_host(self.host)
        self.disconnect()
        started = time.perf_counter()
        try:
            client = _ReportingClient(
                addr, self.client_name, self.client_group, on_received=self._report_received, **self.client_options
            )
            try:
                client.wait_joined()
            except BaseException:
                client.close(emit_leave=False)
                raise
        except Exception as exc:
            self._report("connect", "connect", started, 0, exc)
            raise
        self._report("connect", "connect", started, 0)
        for command, (func, threaded) in self._handlers.items():
            client.on(command, threaded)(func)
        client.start()
        self.client = client
        return client

    def disconnect(self) -> None:
        """Leave and close the connection, if there is one (not reported)."""
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def _live_client(self) -> ThreadedHiSockClient:
        client = self.client
        if client is None or client.closed:
            client = self.connect()
        return client

    # ------------------------------------------------------------------ requests

    def call(self, command: str, content: Sendable = None, timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """Run the server's handler for ``command`` and return what it returns
        (:meth:`HiSockClient.call <hisock_gevent.HiSockClient.call>`), reported as request
        type ``call`` named ``command``, with the round trip's time.

        Its length is the answer's payload bytes when the answer is str or bytes (0
        otherwise).  A failure is reported, then raised, so the task stops there unless
        it catches it.

        :raises CallError: the server's handler raised, or there is none.
        :raises CallTimeout: no answer within ``timeout`` seconds.
        :raises ClientDisconnected: the connection ended before the answer.
        :raises ServerNotRunning: (or another connect error, reported as ``connect``)
            there was no connection and none could be made.
        """
        client = self._live_client()
        started = time.perf_counter()
        try:
            answer = client.call(command, content, timeout)
        except Exception as exc:
            self._report("call", command, started, 0, exc)
            raise
        self._report("call", command, started, payload_size(answer))
        return answer

    def send(self, command: str, content: Sendable = None) -> None:
        """Send ``command`` and ``content`` to the server without waiting for anything,
        reported as request type ``send`` named ``command``.

        Its time is that of queueing the message (about 0); its length the payload's bytes
        for str, bytes or None content (0 for other content: knowing it would mean
        encoding it twice).  A failure is reported, then raised.

        :raises ClientDisconnected: the connection is closed.  :raises InvalidTypeCast:
            the content cannot be sent.  :raises ServerNotRunning: (or another connect
            error) there was no connection and none could be made.
        """
        client = self._live_client()
        started = time.perf_counter()
        try:
            client.send(command, content)
        except Exception as exc:
            self._report("send", command, started, 0, exc)
            raise
        self._report("send", command, started, payload_size(content))

    def on(self, command: str, threaded: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function for ``command`` (or a reserved event such as
        ``client_connect``) on this user's connection, and on every later one.

        Messages stay reported as ``recv`` whether or not a handler takes them.  Register
        before connecting (in ``on_start``, before ``super().on_start()``) to see the
        first messages too.  Handlers run on the client's dispatcher greenlet (``threaded``:
        a greenlet of their own).
        """

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            self._handlers[command] = (func, threaded)
            if self.client is not None and not self.client.closed:
                self.client.on(command, threaded, override=True)(func)
            return func

        return decorator

    def recv_response_time(self, command: str, content: Any) -> float:
        """The response time (ms) to report for a pushed message: 0, as a push answers
        nothing we sent.  Override it when the content says when it was sent (for
        example ``(time.time() - content["sent"]) * 1000`` for a fan-out's latency).
        What it raises makes that ``recv`` a failure."""
        return 0.0

    # ------------------------------------------------------------------ reporting

    def _report_received(self, command: str, content: Any, size: int) -> None:
        try:
            response_time = self.recv_response_time(command, content)
        except Exception as exc:
            self._fire("recv", command, 0.0, size, exc)
        else:
            self._fire("recv", command, response_time, size, None)

    def _report(self, request_type: str, name: str, started: float, length: int, exception: Optional[BaseException] = None) -> None:
        self._fire(request_type, name, (time.perf_counter() - started) * 1000.0, length, exception)

    def _fire(self, request_type: str, name: str, response_time: float, length: int, exception: Optional[BaseException]) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=response_time,
            response_length=length,
            exception=exception,
            context=self.context(),
        )
