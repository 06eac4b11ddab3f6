"""The live stats page of ``hisock-gevent chat --stats-port``, in a real headless Chromium.

What it shows before any poll (the figures served inside the page: the page's polls are
blocked with the DevTools protocol to prove it), how it follows clients and traffic, the
charts of the server's history, and that names chosen by clients stay text.

Chromium and ChromeDriver come from Debian's ``chromium`` and ``chromium-driver`` packages
(``.ci/run`` installs them); selenium drives them.  Without them the test is skipped on a
developer's machine and fails under CI, where it must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from conftest import LOOPBACK, wait_until
from redis_server import redis_server  # noqa: F401  (a fixture)
from test_cli import Program, run  # noqa: F401  (run is a fixture)

import hisock_gevent

# Slow by nature: every test drives a headless Chromium.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless, and nothing that reaches for the network: this machine's network is closed.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
PAGE_WAIT = 15.0


def _browser_missing() -> str:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    return ", ".join(missing)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the stats page test must run under CI, but {missing} is missing")
        pytest.skip(f"needs Debian's chromium and chromium-driver, and selenium: {missing} missing")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _wait_for(driver, what: str, condition) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, PAGE_WAIT, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"the page never showed {what}"
    )


def _table(driver, element_id: str) -> List[List[str]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_element(By.ID, element_id).find_elements(By.TAG_NAME, "tr")
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def _block_polls(driver, blocked: bool = True) -> None:
    """Make the page's fetches of /stats and /history fail (or work again)."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/stats*", "*/history*"] if blocked else []})


def _chart_points(driver, chart_id: str, line: int = 0) -> List[Tuple[float, float]]:
    """The (x, y) points of one line of a chart, as drawn."""
    from selenium.webdriver.common.by import By

    polyline = driver.find_element(By.ID, chart_id).find_elements(By.TAG_NAME, "polyline")[line]
    return [tuple(map(float, pair.split(","))) for pair in (polyline.get_attribute("points") or "").split()]


def _chart_samples(driver, chart_id: str) -> int:
    from selenium.webdriver.common.by import By

    return int(driver.find_element(By.ID, chart_id).get_attribute("data-samples") or 0)


def _get_json(url: str) -> Dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def served() -> Iterator[Callable[..., Tuple[hisock_gevent.ThreadedHiSockServer, str]]]:
    """Factory: a started ThreadedHiSockServer serving its stats page; ``(server, page url)``.
    The servers and every client made with ``served.client`` are closed at teardown."""
    servers: List[hisock_gevent.ThreadedHiSockServer] = []
    clients: List[hisock_gevent.ThreadedHiSockClient] = []

    def factory() -> Tuple[hisock_gevent.ThreadedHiSockServer, str]:
        srv = hisock_gevent.ThreadedHiSockServer((LOOPBACK, 0))
        servers.append(srv)
        srv.start()
        host, port = srv.serve_stats()
        return srv, f"http://{host}:{port}/"

    def client(srv: hisock_gevent.ThreadedHiSockServer, name: str, group: Any = None) -> hisock_gevent.ThreadedHiSockClient:
        joined = hisock_gevent.ThreadedHiSockClient(srv.get_addr(), name=name, group=group)
        clients.append(joined)
        joined.start()
        return joined

    factory.client = client
    yield factory
    for joined in clients:
        joined.close()
    for srv in servers:
        srv.close()


def test_the_page_counts_clients_as_they_connect_chat_and_leave(run, browser):  # noqa: F811
    chat = run("chat", "--port", "0", "--stats-port", "0")
    stats_url = "http://{}:{}/".format(*chat.expect(r"stats at http://([\d.]+):(\d+)/", "stderr").groups())
    addr = chat.address()

    browser.get(stats_url)
    _wait_for(browser, "the live status", lambda d: _text(d, "status").startswith("live"))
    assert _text(browser, "connections") == "0"
    assert _text(browser, "address") == "{}:{}".format(*addr)
    assert _table(browser, "groups") == [["none"]]
    assert _table(browser, "problems") == [["none"]]

    clients = [
        hisock_gevent.ThreadedHiSockClient(addr, name=f"user{i}", group="red" if i < 2 else "blue")
        for i in range(3)
    ]
    try:
        for client in clients:
            client.start()
        _wait_for(browser, "3 connections", lambda d: _text(d, "connections") == "3")
        assert _text(browser, "clients") == "3"
        assert _text(browser, "peak") == "3"
        _wait_for(browser, "both groups", lambda d: _table(d, "groups") == [["red", "2"], ["blue", "1"]])

        # Chat for a while: the rate cards turn positive while messages flow.
        done = {"n": 0}

        def keep_talking(d) -> bool:
            clients[done["n"] % 3].send("say", f"line {done['n']}")
            done["n"] += 1
            return float(_text(d, "rate-in")) > 0 and float(_text(d, "rate-out")) > 0

        _wait_for(browser, "positive message rates", keep_talking)

        clients[2].close()
        _wait_for(browser, "2 connections after one left", lambda d: _text(d, "connections") == "2")
        _wait_for(browser, "the blue group gone", lambda d: _table(d, "groups") == [["red", "2"]])
        assert _text(browser, "peak") == "3"
    finally:
        for client in clients:
            client.close()

    # The page and /stats agree once everyone is gone.
    _wait_for(browser, "0 connections at the end", lambda d: _text(d, "connections") == "0")
    _wait_for(browser, "3 clients left", lambda d: _text(d, "left") == "3")
    assert _text(browser, "accepted") == "3"
    assert _table(browser, "groups") == [["none"]]
    with urllib.request.urlopen(stats_url + "stats", timeout=5) as response:
        final = json.load(response)
    assert final["connections"] == {"now": 0, "peak": 3, "accepted": 3, "refused": {}}
    assert final["clients"]["joins"] == 3 and final["clients"]["left"] == 3
    assert final["messages"]["in"] >= done["n"]


def test_the_page_shows_the_figures_it_was_served_with_before_any_poll(browser, served):
    srv, url = served()
    served.client(srv, "gone", "red").close()
    for name, group in (("r1", "red"), ("r2", "red"), ("loner", None)):
        served.client(srv, name, group)
    wait_until(lambda: srv.stats()["clients"]["joined"] == 3 and srv.stats()["clients"]["left"] == 1)
    # The server has sampled its history a few times (one sample a second).
    wait_until(lambda: _get_json(url + "history")["latest"] >= 2, timeout=10, interval=0.1)
    stats = srv.stats()  # the server is quiet now: these are the figures the page gets

    _block_polls(browser)
    browser.get(url)
    # No poll can have worked: everything here came inside the page.
    assert _text(browser, "address") == stats["address"]
    assert _text(browser, "connections") == "3"
    assert _text(browser, "clients") == "3"
    assert _text(browser, "accepted") == str(stats["connections"]["accepted"]) == "4"
    assert _text(browser, "peak") == str(stats["connections"]["peak"])
    assert _text(browser, "left") == "1"
    assert re.fullmatch(r"\d+ s", _text(browser, "uptime"))
    assert _table(browser, "groups") == [["red", "2"], ["(no group)", "1"]]
    assert _table(browser, "problems") == [["none"]]
    assert _chart_samples(browser, "chart-connections") >= 2
    assert len(_chart_points(browser, "chart-connections")) == _chart_samples(browser, "chart-connections")
    assert _text(browser, "chart-connections-now") == "3"
    # ... and the polls do fail: the figures stay.
    _wait_for(browser, "the failing polls", lambda d: "unreachable" in _text(d, "status"))
    assert _text(browser, "connections") == "3"


def test_the_charts_draw_the_servers_history_as_traffic_flows(browser, served):
    srv, url = served()
    srv.on("say")(lambda client, content: srv.send_all_clients("said", content))
    talkers = [served.client(srv, f"t{i}", "chat") for i in range(2)]
    wait_until(lambda: srv.stats()["clients"]["joined"] == 2)

    browser.get(url)
    _wait_for(browser, "the live status", lambda d: _text(d, "status").startswith("live"))
    assert not browser.find_element("id", "history").get_attribute("hidden")
    first = _chart_samples(browser, "chart-messages")

    def talking(d) -> bool:
        talkers[0].send("say", "hello")
        return _chart_samples(d, "chart-messages") >= first + 3 and float(_text(d, "chart-messages-max").split()[1]) > 0

    _wait_for(browser, "message rates on the chart", talking)
    # The busy seconds are drawn above the chart's floor (y = 60), in and out.
    assert min(y for _, y in _chart_points(browser, "chart-messages", 0)) < 60
    assert min(y for _, y in _chart_points(browser, "chart-messages", 1)) < 60
    assert len(_chart_points(browser, "chart-messages", 0)) == _chart_samples(browser, "chart-messages")
    _wait_for(browser, "2 connections on the chart", lambda d: _text(d, "chart-connections-now") == "2")

    srv.disconnect_client("t1")
    _wait_for(browser, "the drop on the chart", lambda d: _text(d, "chart-drops-max") == "max 1")
    assert ["dropped: kicked", "1"] in _table(browser, "problems")
    _wait_for(browser, "1 connection on the chart", lambda d: _text(d, "chart-connections-now") == "1")


HOSTILE_GROUPS = ["<img src=x onerror=alert(1)>", "</script><script>window.pwned=1</script>"]


def test_group_names_chosen_by_clients_stay_text(browser, served):
    from selenium.common.exceptions import NoAlertPresentException

    srv, url = served()
    served.client(srv, "<b>a</b>", HOSTILE_GROUPS[0])
    served.client(srv, "b", HOSTILE_GROUPS[0])
    served.client(srv, "</script>", HOSTILE_GROUPS[1])
    wait_until(lambda: srv.stats()["clients"]["joined"] == 3)
    expected = [[HOSTILE_GROUPS[0], "2"], [HOSTILE_GROUPS[1], "1"]]

    def harmless(d) -> None:
        assert d.execute_script("return document.images.length") == 0
        assert d.execute_script("return document.scripts.length") == 2
        assert d.execute_script("return window.pwned === undefined")
        with pytest.raises(NoAlertPresentException):
            d.switch_to.alert.text  # noqa: B018

    # As served inside the page (polls blocked) ...
    _block_polls(browser)
    browser.get(url)
    assert _text(browser, "connections") == "3"  # the page's script ran: the data did not end it
    assert _table(browser, "groups") == expected
    harmless(browser)
    # ... and as fetched by the polls.
    _block_polls(browser, blocked=False)
    _wait_for(browser, "the live status", lambda d: _text(d, "status").startswith("live"))
    assert _table(browser, "groups") == expected
    harmless(browser)


def test_the_page_says_so_when_the_server_goes_away(run, browser):  # noqa: F811
    chat = run("chat", "--port", "0", "--stats-port", "0")
    stats_url = "http://{}:{}/".format(*chat.expect(r"stats at http://([\d.]+):(\d+)/", "stderr").groups())
    chat.address()
    browser.get(stats_url)
    _wait_for(browser, "the live status", lambda d: _text(d, "status").startswith("live"))
    chat.proc.terminate()
    assert chat.wait() == 0
    _wait_for(browser, "the unreachable status", lambda d: "unreachable" in _text(d, "status"))



def test_the_page_of_a_cluster_worker_says_so_and_counts_the_others(browser, redis_server):  # noqa: F811
    workers = [hisock_gevent.ThreadedHiSockServer(("127.0.0.1", 0), backplane=redis_server.url) for _ in range(2)]
    clients = []
    try:
        for worker in workers:
            worker.start()
        host, port = workers[0].serve_stats()
        browser.get(f"http://{host}:{port}/")
        _wait_for(browser, "the cluster line", lambda d: "Redis up" in _text(d, "cluster"))
        assert "0 clients on other workers" in _text(browser, "cluster")

        for name in ("far1", "far2"):
            client = hisock_gevent.ThreadedHiSockClient(workers[1].get_addr(), name=name)
            client.start()
            clients.append(client)
        _wait_for(browser, "2 clients elsewhere", lambda d: "2 clients on other workers" in _text(d, "cluster"))
        assert _text(browser, "connections") == "0"
    finally:
        for client in clients:
            client.close()
        for worker in workers:
            worker.close()
