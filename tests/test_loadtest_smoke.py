"""The load-test tooling still runs: ``bench.py --smoke``, its baselines and the Locust users.

No performance thresholds here -- only that every scenario runs against hisock_gevent and
both baselines and reports figures with a ratio to each baseline, that the two baselines
(gevent, and asyncio on uvloop or on asyncio's own loop) put the same bytes on the wire,
that ``before_after.py`` measures two trees in both modes, that ``--workers 2`` runs S1 and S2 on one process and on two joined by Redis (skipped
without redis-server or redis-py, except under CI), that ``--join-storm`` runs the same
joins under each announcement scope, and that the example Locust users
(loadtest/locustfile.py) talk to the echo server without failures.
Everything runs in subprocesses: bench.py starts its own server and generator processes,
and importing locust would monkey-patch this (deliberately unpatched) pytest process.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from rawpeer import RawPeer, cmd_body, wire_frame
from redis_server import require_redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "loadtest" / "bench.py"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
BASELINES = ROOT / "loadtest" / "baselines"
SCENARIOS = {"S1", "S2", "S3", "S4", "S5"}
SERVERS = ("hisock", "baseline", "uvloop")
#: find_spec, not import: the asyncio baseline falls back to asyncio's own loop without it.
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

# Slow by nature: bench.py, its baselines and the Locust users run as subprocesses.
pytestmark = pytest.mark.slow


def _output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace"))[-4000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["ping", "broadcast"])
def test_before_after_compares_two_trees_by_cpu_per_message(mode: str) -> None:
    """This tree against itself, one pair of tiny runs: a figure for each and their ratio."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "before_after.py"), str(ROOT), str(ROOT),
         "--mode", mode, "--pairs", "1", "--clients", "3", "--rounds", "20", "--window", "2", "--timeout", "60"],
        capture_output=True, timeout=100,
    )
    out = _output(proc)
    assert proc.returncode == 0, out
    assert re.search(r"pair 1: old \d+\.\d us, new \d+\.\d us per unit", out), out
    assert re.search(rf"{mode}, 3 clients(, window 2)?: median CPU per unit .* new/old \d+\.\d{{3}}", out), out


@pytest.mark.timeout(180)
def test_bench_smoke_runs_every_scenario_against_hisock_and_both_baselines(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, _output(proc)
    document = json.loads(out.read_text())
    results = document["results"]
    assert set(results) == SCENARIOS
    for scenario in ("S1", "S2", "S3", "S4"):
        assert results[scenario], scenario
        for row in results[scenario]:
            for server in SERVERS:
                assert "error" not in row[server], (scenario, server, row[server])
                assert "limit" not in row[server], (scenario, server, row[server])
            # The uvloop baseline answered: every ratio to it is a number, like the gevent one's.
            for baseline in ("baseline", "uvloop"):
                ratios = row["ratios"][baseline]
                assert ratios and all(isinstance(x, float) and x > 0 for x in ratios.values()), (scenario, baseline, ratios)
            expected_loop = "uvloop " if HAVE_UVLOOP else "asyncio default loop"
            assert row["uvloop"]["loop"].startswith(expected_loop), row["uvloop"]
    assert results["S5"] and all("speedup" in row for row in results["S5"])
    assert document["meta"]["failures"] == []
    assert set(document["meta"]["ratio_better"].values()) == {"higher", "lower"}
    printed = proc.stdout.decode()
    assert "round trips/s" in printed  # the table was printed
    # Two ratio columns, labelled after the loop the second baseline ran on.
    header = next(line for line in printed.splitlines() if line.startswith("scenario "))
    assert [cell.strip() for cell in header.split(" | ")][-2:] == (
        ["ratio h/gevent", "ratio h/uvloop"] if HAVE_UVLOOP else ["ratio h/gevent", "ratio h/asyncio"]
    ), header
    # Every ratio in the table, to either baseline, says which way is better.
    table = [line.split(" | ") for line in printed.splitlines() if line.count(" | ") == 7]
    for column in (-2, -1):
        cells = [cells[column].strip() for cells in table[1:]]
        figures = [cell for cell in cells if re.match(r"[\d.]+x", cell)]
        assert figures and all(re.search(r"\((\w+; )?(higher|lower) is better\)$", cell) for cell in figures), cells
    # Targets its tiny cases cannot reach are not judged (S3 wants 10,000 clients).
    assert "Targets (informative" in printed and "from the issue" not in printed
    assert document["targets"] and not [line for line in document["targets"] if line.startswith(("S2", "S3"))]
    assert [line.split()[0] for line in document["targets_out_of_reach"]] == ["S2", "S3"]
    assert "10,000 clients held" not in printed


@pytest.mark.timeout(180)
def test_bench_smoke_workers_compares_one_process_with_two_joined_by_redis(tmp_path: Path) -> None:
    require_redis()
    out = tmp_path / "bench-workers.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--workers", "2", "--scenarios", "S1,S2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, _output(proc)
    document = json.loads(out.read_text())
    results = document["results"]
    assert set(results) == {"S1", "S2"}
    for scenario in ("S1", "S2"):
        assert results[scenario], scenario
        for row in results[scenario]:
            for kind in ("hisock", "hisock x2"):
                assert kind in row, (scenario, kind)
                assert "error" not in row[kind], (scenario, kind, row[kind])
                assert "limit" not in row[kind], (scenario, kind, row[kind])
            assert row["hisock x2"]["workers"] == 2
    assert document["meta"]["failures"] == []
    assert "hisock x2" in proc.stdout.decode()  # the table was printed


@pytest.mark.timeout(120)
def test_bench_smoke_join_storm_runs_the_same_joins_under_each_announcement_scope(tmp_path: Path) -> None:
    out = tmp_path / "bench-joinstorm.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--join-storm", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        timeout=90,
    )
    assert proc.returncode == 0, _output(proc)
    document = json.loads(out.read_text())
    (row,) = document["results"]["join_storm"]
    assert document["meta"]["failures"] == [] and document["meta"]["scopes"] == ["all", "group", "none"]
    for scope in ("all", "group", "none"):
        result = row[scope]
        assert "error" not in result and "limit" not in result, (scope, result)
        assert result["scope"] == scope and result["held"] == result["clients"] == row["clients"]
        assert result["ramp_s"] > 0 and result["server_cpu_s"] >= 0 and 0 < result["gen_cpu_share"] < 1
    # Not a performance threshold: what the scopes announce.  100 clients in two groups of
    # 50 hear about half as much under "group" as under "all", and nothing under "none".
    announced = [row[scope]["announce_mb"] for scope in ("all", "group", "none")]
    assert announced[0] > announced[1] * 1.5 > 0 and announced[2] == 0, announced
    assert set(row["ratios"]["ramp_s"]) == {"group", "none"}
    assert "ratio group/all" in proc.stdout.decode()  # the table was printed


@pytest.mark.timeout(150)
def test_bench_smoke_websocket_compares_tcp_with_websocket_on_one_server(tmp_path: Path) -> None:
    out = tmp_path / "bench-websocket.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--websocket", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, _output(proc)
    document = json.loads(out.read_text())
    results = document["results"]
    assert set(results) == {"S1", "S2"}
    for scenario in ("S1", "S2"):
        assert results[scenario], scenario
        for row in results[scenario]:
            for transport in ("tcp", "websocket"):
                assert "error" not in row[transport] and "limit" not in row[transport], (scenario, transport, row[transport])
            key = "rt_per_s" if scenario == "S1" else "median_ms"
            assert row[transport][key] > 0 and row["ratio_websocket_to_tcp"][key] > 0
    assert document["meta"]["failures"] == []
    assert "hisock over WebSocket" in proc.stdout.decode()  # the table was printed


@pytest.mark.timeout(180)
def test_bench_smoke_s100k_holds_clients_from_several_generators_and_source_addresses(tmp_path: Path) -> None:
    out = tmp_path / "bench-s6.json"
    proc = subprocess.run(
        [
            sys.executable, str(BENCH), "--smoke", "--s100k", "--servers", "hisock,baseline",
            "--s6-clients", "600", "--s6-per-source", "250", "--s6-per-gen", "400", "--json", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, _output(proc)
    document = json.loads(out.read_text())
    assert set(document["results"]) == {"S6"}  # --s100k runs S6 alone
    (row,) = document["results"]["S6"]
    plan = row["plan"]
    assert plan["clients"] == 600 and plan["gen_counts"] == [300, 300]
    assert plan["sources"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert plan["nofile_hard"] >= plan["nofile_soft"] > 0
    for server in ("hisock", "baseline"):
        result = row[server]
        assert "error" not in result and "limit" not in result, (server, result)
        assert result["held"] == 600 and result["gen_procs"] == 2, (server, result)
        assert result["rss_per_conn_kib"] > 0 and result["median_ms"] > 0 and result["joins_per_s"] > 0
        assert 0 < result["gen_cpu_share"] < 1
    assert row["ratios"]["baseline"]["rss_per_conn_kib"] > 0
    # 600 of 100,000: the target is named as not judged, with the reason.
    assert [line.split()[0] for line in document["targets_out_of_reach"]] == ["S6"]
    assert "S6 held at scale" in proc.stdout.decode()


# ---------------------------------------------------------------- the baselines' bytes

#: The hand-written baselines, as argv after the interpreter: the uvloop one runs twice
#: when uvloop is installed (once forced onto asyncio's own loop, its fallback).
BASELINE_ARGVS = {
    "gevent": [str(BASELINES / "gevent_server.py")],
    "asyncio": [str(BASELINES / "uvloop_server.py"), "--loop", "asyncio"],
    **({"uvloop": [str(BASELINES / "uvloop_server.py"), "--loop", "uvloop"]} if HAVE_UVLOOP else {}),
}


def _ping(content: bytes, fmt: bytes) -> bytes:
    return wire_frame(cmd_body("ping", fmt, content))


def _baseline_transcript(argv: List[str]) -> List[Tuple[str, bytes]]:
    """Play one script of clients against a baseline; return what each client received,
    in order, with the clients' port numbers replaced by their names."""
    proc = subprocess.Popen([sys.executable, *argv, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peers: List[RawPeer] = []
    names: Dict[int, bytes] = {}
    seen: List[Tuple[str, bytes]] = []

    def connect(name: str) -> RawPeer:
        peer = RawPeer(addr)
        peers.append(peer)
        names[peer.addr[1]] = name.encode()
        return peer

    def note(name: str, body: bytes) -> None:
        for port, who in names.items():
            body = body.replace(b"127.0.0.1:%d" % port, b"127.0.0.1:" + who).replace(b'"127.0.0.1",%d]' % port, b'"127.0.0.1",' + who + b"]")
        seen.append((name, body))

    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), (line, proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else "")
        addr = ("127.0.0.1", int(line.split()[1]))

        a = connect("A")
        note("A", a.hello("a"))
        b = connect("B")
        note("B", b.hello("b", group="g"))
        note("A", a.read_frame())  # B's arrival
        # One request per frame, then three in one segment: each is answered in order.
        for content, fmt in ((b"hi", b"2s"), (b"7", b"1i"), (b"\x00raw", b"4b"), (b"", b"")):
            a.send_raw(_ping(content, fmt))
            note("A", a.read_frame())
        a.send_raw(_ping(b"1", b"1s") + _ping(b"22", b"2s") + _ping(b"333", b"3s"))
        for _ in range(3):
            note("A", a.read_frame())
        b.send_frame(cmd_body("broadcast", b"5s", b"hello"))  # to everyone, the sender too
        note("A", a.read_frame())
        note("B", b.read_frame())
        a.send_frame(cmd_body("bulk", b"5b", b"12345"))
        note("A", a.read_frame())
        a.send_frame(cmd_body("nobody-handles-this", b"1s", b"x"))  # ignored
        a.send_raw(_ping(b"after", b"5s"))
        note("A", a.read_frame())
        # Bad peers are dropped without a word, and nobody hears of them.
        for name, data in (
            ("C", b"not a number!!!!"),  # a header that is not a length
            ("D", _ping(b"x", b"1s")),  # a command before the hello
            ("E", wire_frame(b"$CLTHELLO${not json")),
            ("F", b"%-16d" % (17 * 1024 * 1024)),  # longer than the baselines take
        ):
            peer = connect(name)
            peer.send_raw(data)
            note(name, peer.read_until_eof())
        a.send_frame(b"$USRCLOSE$")
        note("A", a.read_until_eof())
        note("B", b.read_frame())  # A's departure
        b.send_raw(_ping(b"last", b"4s"))
        note("B", b.read_frame())  # nothing else came first
    finally:
        for peer in peers:
            peer.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return seen


@pytest.mark.timeout(60)
def test_baselines_put_the_same_bytes_on_the_wire() -> None:
    transcripts = {name: _baseline_transcript(argv) for name, argv in BASELINE_ARGVS.items()}
    expected = transcripts.pop("gevent")
    for name, transcript in transcripts.items():
        assert transcript == expected, name
    bodies = dict(enumerate(body for _, body in expected))
    assert bodies[0] == b'$CLTCONN${"ip":["127.0.0.1",A],"name":"a","group":null,"ipstr":"127.0.0.1:A"}'
    assert bodies[3] == b"$CMD$pong$MSG$2       2shi"
    assert bodies[12] == b"$CMD$ack$MSG$2       1i5"
    assert [who for who, body in expected if body == b""] == ["C", "D", "E", "F", "A"]
    assert expected[-2] == ("B", b'$CLTDISCONN${"ip":["127.0.0.1",A],"name":"a","group":null,"ipstr":"127.0.0.1:A"}')


# ---------------------------------------------------------------- Locust

requires_locust = pytest.mark.skipif(
    # find_spec, not import: importing locust would monkey-patch this process.
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (pip install -e '.[load]')",
)


@pytest.fixture
def example_server(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run examples/<name>.py on a free port; yield the port."""
    script = ROOT / "examples" / request.param
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        port = None
        deadline = time.monotonic() + 15
        assert proc.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            match = re.search(r"serving on [\d.]+:(\d+)", line)
            if match:
                port = int(match.group(1))
        assert port is not None, f"{script.name} did not say where it serves"
        # Keep reading its log so a full pipe never blocks the server.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _stats(prefix: Path) -> Dict[Tuple[str, str], Dict[str, str]]:
    """Locust's ``PREFIX_stats.csv`` as ``{(type, name): row}``."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


@requires_locust
@pytest.mark.timeout(120)
@pytest.mark.parametrize("example_server", ["echo_server.py"], indirect=True)
def test_locust_example_users_call_send_and_receive_without_failures(example_server: int, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    argv: List[str] = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", "5", "-r", "5", "-t", "4s", "--host", f"127.0.0.1:{example_server}",
        "--csv", str(prefix), "--only-summary",
    ]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=90, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, _output(proc)
    stats = _stats(prefix)
    assert int(stats["connect", "connect"]["Request Count"]) == 5
    assert int(stats["call", "echo"]["Request Count"]) > 0
    assert int(stats["send", "ping"]["Request Count"]) > 0
    assert int(stats["recv", "pong"]["Request Count"]) > 0
    assert float(stats["recv", "pong"]["Average Response Time"]) > 0  # the example's round trip, not 0
    assert int(stats["", "Aggregated"]["Failure Count"]) == 0
