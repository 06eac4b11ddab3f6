"""``hisock-gevent serve --backplane``: a wrong backplane is refused at start, an optional one is watched.

Real programs, as a user runs them.  A malformed URL never gets as far as a server; an
unreachable Redis fails the command (exit status 2, naming the address) unless
``--backplane-optional`` is given, and then the stats page and ``/metrics`` say that the
worker is serving without its backplane until Redis answers.
"""

from __future__ import annotations

import json
import textwrap
import urllib.request
from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import wait_until
from redis_server import RedisServer, free_port, require_redis
from test_cli import WAIT, one_shot, run  # noqa: F401  (run is a fixture)

# Slow by nature: the command runs as a subprocess, with a Redis server.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

APP = """
import hisock_gevent


def make_server(host="127.0.0.1", port=6969, reuse_port=False, listener=None, backplane=None):
    return hisock_gevent.HiSockServer((host, port), reuse_port=reuse_port, listener=listener, backplane=backplane)
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "bp_app.py").write_text(textwrap.dedent(APP))
    return tmp_path


def one_line_error(result: Any) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one process", "two workers"])
@pytest.mark.parametrize("url", ["http://x", "redis://127.0.0.1:notaport/0", "redis://127.0.0.1:6379/zero"])
def test_a_malformed_backplane_url_is_refused_at_once_with_one_line(app_dir, url, workers) -> None:
    result = one_shot("serve", "bp_app:make_server", "--port", "0", "--backplane", url, *workers, cwd=app_dir, timeout=WAIT)

    line = one_line_error(result)
    assert "--backplane" in line and url in line


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one process", "two workers"])
def test_an_unreachable_backplane_fails_the_command_naming_its_address(app_dir, workers) -> None:
    require_redis()
    port = free_port()  # nobody listens there

    result = one_shot(
        "serve", "bp_app:make_server", "--port", "0", "--backplane", f"redis://127.0.0.1:{port}/0", *workers,
        cwd=app_dir, timeout=30,
    )

    line = one_line_error(result)
    assert f"127.0.0.1:{port}" in line and "--backplane-optional" in line
    assert "[worker" not in result.stderr  # the supervisor did not start any


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        return response.read().decode()


def _cluster_stats(stats_url: str) -> Dict[str, Any]:
    return json.loads(_get(stats_url + "/stats"))["cluster"]


def _wait_for_stats(stats_url: str, predicate: Any, what: str, timeout: float = 20.0) -> Dict[str, Any]:
    last: Dict[str, Any] = {}

    def ready() -> bool:
        last.clear()
        last.update(_cluster_stats(stats_url))
        return predicate(last)

    wait_until(ready, timeout, interval=0.1, message=lambda: f"never {what}: {last}")
    return dict(last)


def test_an_optional_backplane_that_is_away_shows_in_stats_and_metrics_until_redis_answers(run, app_dir, tmp_path) -> None:  # noqa: F811
    from prometheus_client.parser import text_string_to_metric_families

    require_redis()
    port = free_port()
    server = run(
        "serve", "bp_app:make_server", "--port", "0", "--stats-port", "0",
        "--backplane", f"redis://127.0.0.1:{port}/0", "--backplane-optional", cwd=app_dir,
    )
    warning = server.expect(rf"WARNING .*127\.0\.0\.1:{port}.*--backplane-optional", "stderr")
    assert "serving without the other workers" in warning.string
    stats_url = "http://{}:{}".format(*server.expect(r"stats at http://([\d.]+):(\d+)/", "stderr").groups())
    server.address()

    away = _wait_for_stats(stats_url, lambda stats: stats["redis"] == "down" and stats["down_s"] > 0, "down for a while")
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(_get(stats_url + "/metrics"))
        for sample in family.samples
    }
    assert samples["hisock_backplane_up"] == 0
    assert samples["hisock_backplane_down_seconds"] >= away["down_s"] > 0

    redis = RedisServer(tmp_path, port=port)
    redis.start()
    try:
        _wait_for_stats(stats_url, lambda stats: stats["redis"] == "up" and stats["down_s"] == 0, "up again")
    finally:
        server.kill()
        redis.stop()
