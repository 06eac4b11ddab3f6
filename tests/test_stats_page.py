"""The live stats page of ``hisock-gevent chat --stats-port``, in a real headless Chromium.

Chromium and ChromeDriver come from Debian's ``chromium`` and ``chromium-driver`` packages
(``.ci/run`` installs them); selenium drives them.  Without them the test is skipped on a
developer's machine and fails under CI, where it must run.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Iterator, List

import pytest
from redis_server import redis_server  # noqa: F401  (a fixture)
from test_cli import Program, run  # noqa: F401  (run is a fixture)

import hisock_gevent

pytestmark = pytest.mark.timeout(90)

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


def test_the_page_counts_clients_as_they_connect_chat_and_leave(run, browser):  # noqa: F811
    chat = run("chat", "--port", "0", "--stats-port", "0")
    stats_url = "http://{}:{}/".format(*chat.expect(r"stats at http://([\d.]+):(\d+)/", "stderr").groups())
    addr = chat.address()

    browser.get(stats_url)
    _wait_for(browser, "0 connections", lambda d: _text(d, "connections") == "0")
    assert _text(browser, "status").startswith("live")
    assert _text(browser, "address") == "{}:{}".format(*addr)
    assert _table(browser, "groups") == []

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
    with urllib.request.urlopen(stats_url + "stats", timeout=5) as response:
        final = json.load(response)
    assert final["connections"] == {"now": 0, "peak": 3, "accepted": 3, "refused": {}}
    assert final["clients"]["joins"] == 3 and final["clients"]["left"] == 3
    assert final["messages"]["in"] >= done["n"]


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
