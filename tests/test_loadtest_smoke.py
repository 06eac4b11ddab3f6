"""The load-test tooling still runs: ``bench.py --smoke`` and the Locust users.

No performance thresholds here -- only that every scenario runs against both servers and
reports figures, that ``--workers 2`` runs S1 and S2 on one process and on two joined by
Redis (skipped without redis-server or redis-py, except under CI), and that the Locust
users talk to the example servers without failures.
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
from typing import Dict, Iterator, List

import pytest
from redis_server import require_redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "loadtest" / "bench.py"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
SCENARIOS = {"S1", "S2", "S3", "S4", "S5"}
SERVERS = ("hisock", "baseline")


def _output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace"))[-4000:]


@pytest.mark.timeout(180)
def test_bench_smoke_runs_every_scenario_against_both_servers(tmp_path: Path) -> None:
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
    assert results["S5"] and all("speedup" in row for row in results["S5"])
    assert document["meta"]["failures"] == []
    printed = proc.stdout.decode()
    assert "round trips/s" in printed  # the table was printed
    # Every ratio in the table says which way is better.
    ratios = [line.rsplit(" | ", 1)[1].strip() for line in printed.splitlines() if line.count(" | ") == 5]
    figures = [cell for cell in ratios[1:] if re.match(r"[\d.]+x", cell)]
    assert figures and all(re.search(r"\((\w+; )?(higher|lower) is better\)$", cell) for cell in figures), ratios
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


def _stats(prefix: Path) -> Dict[str, Dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def _run_locust(port: int, scenario: str, prefix: Path) -> subprocess.CompletedProcess[bytes]:
    argv: List[str] = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", "5", "-r", "5", "-t", "4s", "--host", f"127.0.0.1:{port}",
        "--hisock-scenario", scenario, "--csv", str(prefix), "--only-summary",
    ]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=90, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@requires_locust
@pytest.mark.timeout(120)
@pytest.mark.parametrize("example_server", ["chat_server.py"], indirect=True)
def test_locust_chat_users_report_says_and_broadcasts(example_server: int, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    proc = _run_locust(example_server, "chat", prefix)
    assert proc.returncode == 0, _output(proc)
    stats = _stats(prefix)
    assert int(stats["connect"]["Request Count"]) == 5
    assert int(stats["say -> said"]["Request Count"]) > 0
    assert int(stats["said (broadcast)"]["Request Count"]) > 0
    assert int(stats["Aggregated"]["Failure Count"]) == 0


@requires_locust
@pytest.mark.timeout(120)
@pytest.mark.parametrize("example_server", ["echo_server.py"], indirect=True)
def test_locust_echo_users_report_round_trips(example_server: int, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    proc = _run_locust(example_server, "echo", prefix)
    assert proc.returncode == 0, _output(proc)
    stats = _stats(prefix)
    assert int(stats["ping -> pong"]["Request Count"]) > 0
    assert int(stats["Aggregated"]["Failure Count"]) == 0
