"""A Locust load test of ``examples/echo_server.py``, built on :class:`hisock_gevent.locust.HiSockUser`.

Each user calls ``echo`` (a request and its answer: Locust's ``call echo`` row, timed from
the call to the answer) and sends ``ping`` (fire and forget: ``send ping``); the server
pushes a ``pong`` back (``recv pong``), timed here from the send time the ping carries.
HiSockUser also reports each connection (``connect connect``).

Headless run, from the project root (see the README, "Performance and load testing")::

    python examples/echo_server.py --port 7001 &
    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 20s \\
        --host 127.0.0.1:7001 --csv loadtest/results/locust
"""

from __future__ import annotations

import time
from typing import Any

from locust import between, task

from hisock_gevent.locust import HiSockUser


class EchoUser(HiSockUser):
    host = "127.0.0.1:6969"  # examples/echo_server.py's default; --host overrides it
    wait_time = between(0.5, 1.5)
    client_name = "locust"

    @task(3)
    def echo(self) -> None:
        text = f"hello {time.time():.6f}"
        assert self.call("echo", text) == text

    @task
    def ping(self) -> None:
        self.send("ping", f"{time.time():.6f}")

    def recv_response_time(self, command: str, content: Any) -> float:
        # A pong carries the time its ping was sent: report the round trip.
        if command == "pong" and isinstance(content, str):
            return (time.time() - float(content)) * 1000.0
        return 0.0
