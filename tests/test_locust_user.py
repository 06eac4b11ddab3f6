"""HiSockUser (``hisock_gevent.locust``): a Locust user that reports calls, sends and pushes.

Locust runs headless in a subprocess against a real server on 127.0.0.1 (a
ThreadedHiSockServer in this process): importing Locust here would monkey-patch this
(deliberately unpatched) pytest process.  Skipped without Locust; the test extra has it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from conftest import LOOPBACK, wait_until

import hisock_gevent
from hisock_gevent import ClientInfo

ROOT = Path(__file__).resolve().parent.parent

requires_locust = pytest.mark.skipif(
    # find_spec, not import: importing locust would monkey-patch this process.
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (pip install -e '.[test]')",
)

USERS = 4
#: Seconds Locust runs its users; the subprocess is given RUN_SECONDS + 60 in all.
RUN_SECONDS = 5
#: What the server pushes as ``news``: a dict, so it travels as msgpack.
NEWS = {"headline": "hello", "numbers": [1, 2, 3]}

LOCUSTFILE = textwrap.dedent(
    """
    from locust import constant, task

    from hisock_gevent import CallError, CallTimeout, ClientDisconnected
    from hisock_gevent.locust import HiSockUser


    class Tester(HiSockUser):
        wait_time = constant(0.05)
        client_name = "locust-tester"
        client_group = "testers"

        def on_start(self):
            self.pongs = 0
            self.on("pong")(self.count_pong)
            super().on_start()

        def count_pong(self, content):
            self.pongs += 1

        @task(6)
        def echo(self):
            assert self.call("echo", "hello") == "hello"

        @task(6)
        def ping(self):
            self.send("ping", b"12345")
            self.send("news")

        @task(2)
        def boom(self):
            try:
                self.call("boom")
            except CallError:
                pass

        @task(2)
        def nap(self):
            try:
                self.call("nap", 0.3, timeout=0.05)
            except CallTimeout:
                pass

        @task(1)
        def kick(self):
            try:
                self.call("kick")
            except ClientDisconnected:
                pass
    """
)


@pytest.fixture
def target(make_server: Any) -> Tuple[hisock_gevent.ThreadedHiSockServer, List[ClientInfo]]:
    """A started server with the handlers the locustfile uses; and the clients it saw join."""
    server = make_server()
    joined: List[ClientInfo] = []

    @server.on("join")
    def on_join(client: ClientInfo) -> None:
        joined.append(client)

    @server.on("echo")
    def echo(client: ClientInfo, content: Any) -> Any:
        return content

    @server.on("boom")
    def boom(client: ClientInfo, content: Any) -> None:
        raise ValueError("nope")

    @server.on("nap", threaded=True)
    def nap(client: ClientInfo, content: float) -> float:
        time.sleep(content)
        return content

    @server.on("kick")
    def kick(client: ClientInfo, content: Any) -> None:
        server.disconnect_client(client)

    @server.on("ping")
    def ping(client: ClientInfo, content: Any) -> None:
        server.send_client(client, "pong", content)

    @server.on("news")
    def news(client: ClientInfo, content: Any) -> None:
        server.send_client(client, "news", NEWS)

    server.start()
    return server, joined


def _csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace"))[-4000:]


@requires_locust
@pytest.mark.slow
@pytest.mark.timeout(RUN_SECONDS + 90)
def test_locust_reports_calls_sends_and_pushes_against_a_real_server(target: Any, tmp_path: Path) -> None:
    server, joined = target
    (tmp_path / "locustfile.py").write_text(LOCUSTFILE)
    prefix = tmp_path / "run"
    port = server.get_addr()[1]
    argv = [
        sys.executable, "-m", "locust", "-f", str(tmp_path / "locustfile.py"), "--headless",
        "-u", str(USERS), "-r", str(USERS), "-t", f"{RUN_SECONDS}s", "--host", f"{LOOPBACK}:{port}",
        "--csv", str(prefix), "--only-summary",
        # Failures are expected here (boom, nap, kick); the CSV files are what is checked.
        "--exit-code-on-error", "0",
    ]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=RUN_SECONDS + 60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, _output(proc)
    rows = {(row["Type"], row["Name"]): row for row in _csv(f"{prefix}_stats.csv")}

    def count(kind: str, name: str, column: str = "Request Count") -> int:
        return int(rows[kind, name][column])

    def figure(kind: str, name: str, column: str) -> float:
        return float(rows[kind, name][column])

    # call: real round trips, answered without failures; length = the answer's bytes
    assert count("call", "echo") > 0 and count("call", "echo", "Failure Count") == 0
    assert figure("call", "echo", "Average Response Time") > 0
    assert figure("call", "echo", "Average Content Size") == len("hello")
    # ... and every CallError, CallTimeout and ClientDisconnected a failed call
    for name in ("boom", "nap", "kick"):
        assert count("call", name) > 0 and count("call", name, "Failure Count") == count("call", name), name
    # send: fire and forget, length = the payload's bytes (str/bytes/None)
    assert count("send", "ping") > 0 and count("send", "ping", "Failure Count") == 0
    assert figure("send", "ping", "Average Content Size") == 5
    assert figure("send", "news", "Average Content Size") == 0
    # recv: every push, whether a handler took it (pong) or not (news); time 0;
    # length = the payload's bytes as they came (news: a msgpack document)
    assert count("recv", "pong") > 0 and count("recv", "news") > 0
    assert figure("recv", "pong", "Average Content Size") == 5
    assert 5 < figure("recv", "news", "Average Content Size") < 100
    for name in ("pong", "news"):
        assert figure("recv", name, "Max Response Time") == 0, name
    # connect: once per user, then once after each kick (on the next call or send)
    assert count("connect", "connect", "Failure Count") == 0
    assert USERS < count("connect", "connect") <= USERS + count("call", "kick")
    # nothing failed but what should, and no task raised
    expected = sum(count("call", name, "Failure Count") for name in ("boom", "nap", "kick"))
    assert count("", "Aggregated", "Failure Count") == expected
    failures = {(row["Name"], row["Error"].split("(")[0]) for row in _csv(f"{prefix}_failures.csv")}
    assert failures == {("boom", "CallError"), ("nap", "CallTimeout"), ("kick", "ClientDisconnected")}, failures
    assert _csv(f"{prefix}_exceptions.csv") == []
    # the server saw our name and group, and every user left when Locust stopped
    assert joined and {(info.name, info.group) for info in joined} == {("locust-tester", "testers")}
    wait_until(lambda: not server.get_all_clients(), timeout=10)


# ---------------------------------------------------------------- the module itself

def test_importing_it_without_locust_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "locust", None)  # import locust -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "hisock_gevent.locust", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'hisock_gevent\[load\]'"):
        importlib.import_module("hisock_gevent.locust")
    assert "hisock_gevent.locust" not in sys.modules


CHECKS = textwrap.dedent(
    """
    import json
    from hisock_gevent.locust import HiSockUser, parse_host

    refused = []
    for attr in ("name", "group"):
        try:
            type("U", (HiSockUser,), {attr: "x"})
        except TypeError as exc:
            refused.append(str(exc))
    hosts = [parse_host(h) for h in ("127.0.0.1:7001", "hisock://localhost:80/")]
    bad = []
    for h in (None, "", "127.0.0.1", "host:port"):
        try:
            parse_host(h)
        except ValueError as exc:
            bad.append(str(exc))
    print(json.dumps({"refused": refused, "hosts": hosts, "bad": len(bad), "abstract": HiSockUser.abstract}))
    """
)


@requires_locust
@pytest.mark.timeout(60)
def test_user_classes_use_client_name_and_client_group_and_hosts_are_host_colon_port() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECKS], cwd=ROOT, capture_output=True, timeout=45)
    assert proc.returncode == 0, _output(proc)
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    # ``group`` is Locust's (the greenlet group it stops users with): a str there would break it
    assert len(result["refused"]) == 2
    assert "client_name" in result["refused"][0] and "client_group" in result["refused"][1]
    assert result["hosts"] == [["127.0.0.1", 7001], ["localhost", 80]]
    assert result["bad"] == 4 and result["abstract"] is True
