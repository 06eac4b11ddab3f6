"""Locust users for HiSock servers, built on hisock_gevent's own client.

Locust runs every user as a greenlet in one monkey-patched process, so this is also a test
that :class:`hisock_gevent.ThreadedHiSockClient` is a good gevent citizen: in a patched
program it connects with gevent sockets and receives in a greenlet, never blocking the hub.

Two scenarios, chosen with ``--hisock-scenario`` (default ``chat``):

* ``chat`` (against ``examples/chat_server.py``): each user ``say``\\ s a line carrying its
  send time; the server broadcasts it to everyone in the lobby as ``said``.  Reported to
  Locust: ``say -> said`` (the speaker's own round trip, as response time),
  ``said (broadcast)`` (every line from *another* user, with the time since it was sent,
  so the fan-out latency) and ``connect`` (TCP connect + hello + our ``$CLTCONN$``).
* ``echo`` (against ``examples/echo_server.py``): ``ping`` -> ``pong`` round trips.

Headless run, from the project root (see loadtest/README.md)::

    python examples/chat_server.py --port 7001 &
    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 20s \\
        --host 127.0.0.1:7001 --csv loadtest/results/locust
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Dict, Optional, Tuple

import gevent
from gevent.event import AsyncResult
from locust import User, between, events, task
from locust.exception import StopUser

import hisock_gevent

#: Seconds a user waits for the answer to its own request.
ANSWER_TIMEOUT = 10.0
#: Prefix of every line our users say, so lines from other programs are ignored.
TAG = "locust"

_user_ids = itertools.count(1)


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--hisock-scenario",
        choices=["chat", "echo"],
        default="chat",
        help="chat: say/said against examples/chat_server.py; echo: ping/pong against examples/echo_server.py",
    )


def parse_host(host: Optional[str]) -> Tuple[str, int]:
    """``HOST:PORT`` (optionally ``hisock://HOST:PORT``) -> ``(host, port)``."""
    if not host:
        raise ValueError("give the server as --host HOST:PORT")
    host = host.split("://", 1)[-1].rstrip("/")
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"--host must be HOST:PORT, not {host!r}")
    return name, int(port)


class HiSockUser(User):
    """One HiSock client per Locust user; requests and broadcasts go to Locust's statistics."""

    wait_time = between(0.5, 1.5)

    def __init__(self, environment: Any):
        super().__init__(environment)
        self.user_id = next(_user_ids)
        self.name = f"{TAG}-{self.user_id}"
        self.client: Optional[hisock_gevent.ThreadedHiSockClient] = None
        self.waiting: Dict[str, AsyncResult] = {}
        self.seq = itertools.count(1)
        options = getattr(environment, "parsed_options", None)
        self.scenario = getattr(options, "hisock_scenario", "chat") if options is not None else "chat"

    # ------------------------------------------------------------ reporting

    def report(self, name: str, started: float, length: int = 0, exception: Optional[BaseException] = None) -> None:
        self.report_ms(name, (time.time() - started) * 1000.0, length, exception)

    def report_ms(self, name: str, response_ms: float, length: int = 0, exception: Optional[BaseException] = None) -> None:
        self.environment.events.request.fire(
            request_type="hisock",
            name=name,
            response_time=response_ms,
            response_length=length,
            exception=exception,
            context={},
        )

    # ------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        self.connect()

    def on_stop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def connect(self) -> None:
        started = time.time()
        try:
            client = hisock_gevent.threaded_connect(parse_host(self.host), name=self.name)
        except (hisock_gevent.HiSockError, OSError, ValueError) as exc:
            self.report("connect", started, exception=exc)
            raise StopUser() from exc
        self.report("connect", started)
        client.on("said")(self.on_said)
        client.on("pong")(self.on_pong)
        client.on("error")(self.on_error)
        client.start()
        self.client = client

    # ------------------------------------------------------------ what arrives

    def on_said(self, content: Any) -> None:
        """A chat line: ours resolves a waiting ``say``; another user's is a broadcast delivery."""
        if not isinstance(content, dict):
            return
        text = content.get("text")
        if not isinstance(text, str) or not text.startswith(TAG + " "):
            return
        parts = text.split(" ")
        if len(parts) < 4:
            return
        key, sent = f"{parts[1]}/{parts[2]}", parts[3]
        waiter = self.waiting.pop(key, None)
        if waiter is not None:
            waiter.set(len(text))
        elif parts[1] != str(self.user_id):
            try:
                self.report_ms("said (broadcast)", (time.time() - float(sent)) * 1000.0, len(text))
            except ValueError:
                pass

    def on_pong(self, content: Any) -> None:
        if isinstance(content, str):
            waiter = self.waiting.pop(content.split(" ")[0], None)
            if waiter is not None:
                waiter.set(len(content))

    def on_error(self, content: Any) -> None:
        self.report_ms("server error", 0.0, exception=RuntimeError(f"server said: {content!r}"))

    # ------------------------------------------------------------ tasks

    def request(self, name: str, key: str, command: str, content: str) -> None:
        """Send one message and wait for the answer that carries ``key``."""
        if self.client is None or self.client.closed:
            self.on_stop()
            self.connect()
        assert self.client is not None
        waiter = AsyncResult()
        self.waiting[key] = waiter
        started = time.time()
        try:
            self.client.send(command, content)
            length = waiter.get(timeout=ANSWER_TIMEOUT)
        except gevent.Timeout:
            self.waiting.pop(key, None)
            self.report(name, started, exception=TimeoutError(f"no answer within {ANSWER_TIMEOUT} s"))
            return
        except hisock_gevent.HiSockError as exc:
            self.waiting.pop(key, None)
            self.report(name, started, exception=exc)
            return
        self.report(name, started, length)

    @task
    def exchange(self) -> None:
        seq = next(self.seq)
        if self.scenario == "echo":
            key = f"{self.user_id}/{seq}"
            self.request("ping -> pong", key, "ping", f"{key} {time.time():.6f}")
        else:
            key = f"{self.user_id}/{seq}"
            text = f"{TAG} {self.user_id} {seq} {time.time():.6f} hello from a locust user"
            self.request("say -> said", key, "say", text)
