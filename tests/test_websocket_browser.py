"""The browser client (hisock_gevent/static/hisock.js) in a real headless Chromium, over
the server's WebSocket listener, talking to Python clients over TCP.

A page served by the WebSocket port itself imports ``/hisock.js`` from there, joins,
exchanges every type with a Python client both ways, changes its name and group where
the others see it, and leaves.  The chat page of ``hisock-gevent chat --websocket-port``
talks to a terminal-style client, and reconnects by itself when the server process is
killed and started again on the same ports (and after a graceful stop, whose
``$DISCONN$`` says "server closing").

Chromium and ChromeDriver come from Debian's ``chromium`` and ``chromium-driver`` packages
(``.ci/run`` installs them), as for tests/test_stats_page.py, whose browser fixture this
file shares: skipped on a developer's machine without them, failed under CI.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Dict, List

import pytest
from cliprogram import Program
from conftest import LOOPBACK, Recorder, wait_until
from test_stats_page import _text, _wait_for, browser  # noqa: F401  (browser is a fixture)

import hisock_gevent
from hisock_gevent.chat import chat_page

pytestmark = pytest.mark.timeout(120)

PAGE_WAIT = 20.0

#: A page that exposes a HiSock client to the test: ``window.start(name, group)``, what
#: arrived (described with its JavaScript type) in ``window.got``, and ``window.sendAll()``.
TEST_PAGE = b"""<!doctype html><meta charset="utf-8"><title>hisock.js test</title>
<link rel="icon" href="data:,">
<pre id="state">loading</pre>
<script type="module">
import { HiSockClient, Tuple } from "/hisock.js";

function describe(v) {
    if (v === null) return { t: "none" };
    if (typeof v === "boolean") return { t: "bool", v };
    if (typeof v === "bigint") return { t: "bigint", v: v.toString() };
    if (typeof v === "number") return { t: "number", v: Object.is(v, -0) ? "-0" : String(v) };
    if (typeof v === "string") return { t: "str", v };
    if (v instanceof Uint8Array) return { t: "bytes", v: Array.from(v) };
    if (v instanceof Tuple) return { t: "tuple", v: v.map(describe) };
    if (Array.isArray(v)) return { t: "list", v: v.map(describe) };
    if (v instanceof Map) return { t: "map", v: [...v].map(([k, x]) => [describe(k), describe(x)]) };
    if (typeof v === "object") return { t: "dict", v: Object.fromEntries(Object.entries(v).map(([k, x]) => [k, describe(x)])) };
    return { t: typeof v };
}

window.got = [];
window.events = [];
window.start = async (name, group) => {
    const client = new HiSockClient(`ws://${location.host}/hisock`, { name, group, reconnect: false });
    client.on("to_web", (content) => window.got.push(describe(content)));
    client.on("group_news", (content) => window.events.push(["group_news", content]));
    client.on("client_connect", (info) => window.events.push(["client_connect", info.name, info.group]));
    client.on("client_disconnect", (info) => window.events.push(["client_disconnect", info.name]));
    window.client = client;
    await client.connect();
    document.getElementById("state").textContent = "joined";
    return client.info.name;
};
window.sendAll = () => {
    const c = window.client;
    c.send("to_py", "text with \\u00e9 and \\u{1F600}");
    c.send("to_py", 2n ** 64n + 12345n);
    c.send("to_py", -(2n ** 53n) - 7n);
    c.send("to_py", 42);
    c.send("to_py", 1.5);
    c.send("to_py", new Uint8Array([0, 1, 254, 255]));
    c.send("to_py", [1, "two", [3.25, null], true]);
    c.send("to_py", { a: 1, nested: { b: [false, null] }, big: 2n ** 60n });
    c.send("to_py", null);
    c.send("to_py", true);
    c.send("to_py", false);
    c.send("to_py", Tuple.of(1, "x"));
    c.send("done");
};
document.getElementById("state").textContent = "ready";
</script>
"""

#: What the page sends, as the Python client receives it.
FROM_WEB: List[Any] = [
    "text with \u00e9 and \U0001F600",
    2**64 + 12345,
    -(2**53) - 7,
    42,
    1.5,
    b"\x00\x01\xfe\xff",
    [1, "two", [3.25, None], True],
    {"a": 1, "nested": {"b": [False, None]}, "big": 2**60},
    None,
    True,
    False,
    (1, "x"),
]

#: What the Python client sends, and how the page describes what it got.
TO_WEB: List[Any] = [
    ("caf\u00e9 \U0001F600", {"t": "str", "v": "caf\u00e9 \U0001F600"}),
    (2**63 + 1, {"t": "bigint", "v": str(2**63 + 1)}),
    (2**53 + 1, {"t": "bigint", "v": str(2**53 + 1)}),
    (-(2**100), {"t": "bigint", "v": str(-(2**100))}),
    (7, {"t": "number", "v": "7"}),
    (0.1, {"t": "number", "v": "0.1"}),
    (-2.5e300, {"t": "number", "v": "-2.5e+300"}),
    (b"\x00\xffbin", {"t": "bytes", "v": [0, 255, 98, 105, 110]}),
    ([1, "a", None, [2.5]], {"t": "list", "v": [{"t": "number", "v": "1"}, {"t": "str", "v": "a"}, {"t": "none"}, {"t": "list", "v": [{"t": "number", "v": "2.5"}]}]}),
    ({"k": True, "n": None}, {"t": "dict", "v": {"k": {"t": "bool", "v": True}, "n": {"t": "none"}}}),
    ({1: "one"}, {"t": "map", "v": [[{"t": "number", "v": "1"}, {"t": "str", "v": "one"}]]}),
    (None, {"t": "none"}),
    (True, {"t": "bool", "v": True}),
    (False, {"t": "bool", "v": False}),
    ((1, 2), {"t": "tuple", "v": [{"t": "number", "v": "1"}, {"t": "number", "v": "2"}]}),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@pytest.fixture
def relay_server() -> Any:
    """A server whose handlers carry ``to_web`` to the page and ``to_py`` to the Python client."""
    srv = hisock_gevent.ThreadedHiSockServer(
        (LOOPBACK, 0), websocket=(LOOPBACK, 0), websocket_pages={"/": ("text/html; charset=utf-8", TEST_PAGE)}
    )
    srv.changes = Recorder()  # type: ignore[attr-defined]
    srv.left = Recorder()  # type: ignore[attr-defined]

    @srv.on("to_web")
    def to_web(client: Any, content: Any) -> None:
        srv.send_client("web", "to_web", content)

    @srv.on("to_py")
    def to_py(client: Any, content: Any) -> None:
        srv.send_client("py", "from_web", content)

    @srv.on("done")
    def done(client: Any) -> None:
        srv.send_client("py", "done")

    @srv.on("news")
    def news(client: Any, content: Any) -> None:
        srv.send_group(client, "group_news", content)

    srv.on("name_change")(lambda client, old, new: srv.changes("name", old, new))
    srv.on("group_change")(lambda client, old, new: srv.changes("group", old, new))
    srv.on("leave")(lambda client: srv.left(client.name))
    srv.start()
    yield srv
    srv.close()


def _js(driver: Any, script: str, *args: Any) -> Any:
    """Run an async snippet in the page: ``done(value)`` is its last argument."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"Promise.resolve().then(async () => {{ {script} }}).then(done, (e) => done({{error: String(e)}}));",
        *args,
    )


def test_a_page_joins_exchanges_every_type_changes_name_and_group_and_leaves(browser, relay_server):  # noqa: F811
    srv = relay_server
    browser.set_script_timeout(PAGE_WAIT)
    py = hisock_gevent.ThreadedHiSockClient(srv.get_addr(), "py", "lobby")
    seen: Dict[str, List[Any]] = {"connect": [], "disconnect": []}
    py.on("client_connect")(lambda info: seen["connect"].append((info.name, info.group)))
    py.on("client_disconnect")(lambda info: seen["disconnect"].append(info.name))
    received = Recorder()
    py.on("from_web")(received)
    finished = Recorder()
    py.on("done")(lambda: finished("done"))
    py.start()
    try:
        host, port = srv.websocket_addr
        browser.get(f"http://{host}:{port}/")
        _wait_for(browser, "the page's script", lambda d: _text(d, "state") == "ready")
        assert _js(browser, "return await window.start(arguments[0], arguments[1]);", "web", "lobby") == "web"
        wait_until(lambda: ("web", "lobby") in seen["connect"])
        assert srv.get_client("web").group == "lobby"

        # Every type, page -> Python.
        _js(browser, "window.sendAll(); return true;")
        finished.wait_for(1, timeout=PAGE_WAIT)
        got = received.wait_for(len(FROM_WEB))
        assert got == FROM_WEB
        assert [type(value) for value in got] == [type(value) for value in FROM_WEB]

        # Every type, Python -> page.
        for value, _ in TO_WEB:
            py.send("to_web", value)
        _wait_for(browser, "every value from Python", lambda d: len(d.execute_script("return window.got")) >= len(TO_WEB))
        assert browser.execute_script("return window.got") == [json.loads(json.dumps(description)) for _, description in TO_WEB]

        # A new name and group: the server's handlers run, and the others find it there.
        _js(browser, "window.client.changeName('webby'); window.client.changeGroup('room2'); return true;")
        assert srv.changes.wait_for(2) == [("name", "web", "webby"), ("group", "lobby", "room2")]
        assert srv.get_client("webby").group == "room2"
        other = hisock_gevent.ThreadedHiSockClient(srv.get_addr(), "other", "room2")
        other.start()
        other.wait_joined()
        _wait_for(browser, "the other client joining", lambda d: ["client_connect", "other", "room2"] in d.execute_script("return window.events"))
        other.send("news", "for room2 only")
        _wait_for(browser, "the group's news", lambda d: ["group_news", "for room2 only"] in d.execute_script("return window.events"))
        assert py.get_client("webby").group == "room2"  # $GETCLT$ from a TCP client
        other.close()

        # Leaving: the server's leave runs, the others hear of it.
        _js(browser, "window.client.close(); return true;")
        assert srv.left.wait_for(2)[-1] == "webby"
        wait_until(lambda: "webby" in seen["disconnect"])
        assert [info.name for info in srv.get_all_clients()] == ["py"]
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        py.close()


def test_the_chat_page_talks_to_terminal_clients_and_reconnects_after_a_restart(run_chat, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    tcp_port, ws_port = _free_port(), _free_port()
    chat = run_chat(tcp_port, ws_port)
    browser.get(f"http://{LOOPBACK}:{ws_port}/?name=browser&room=lobby")
    _wait_for(browser, "the connected status", lambda d: _text(d, "status") == "connected")

    terminal = hisock_gevent.ThreadedHiSockClient((LOOPBACK, tcp_port), "terminal", "lobby")
    terminal.start()
    terminal.wait_joined()
    terminal.send("say", "hello from the terminal <b>")
    _wait_for(browser, "the terminal's line", lambda d: "terminal:hello from the terminal <b>" in _log(d))
    browser.find_element(By.ID, "text").send_keys("hello from the browser")
    browser.find_element(By.ID, "send").click()
    said = terminal.recv("said", timeout=PAGE_WAIT)
    while said["from"] != "browser":
        said = terminal.recv("said", timeout=PAGE_WAIT)
    assert said == {"from": "browser", "room": "lobby", "text": "hello from the browser"}
    _wait_for(browser, "both in the room list", lambda d: _names(d) == ["browser", "terminal"])
    terminal.close()

    chat.kill()  # SIGKILL: no $DISCONN$, no close frame; the page must find out and retry
    _wait_for(browser, "the reconnecting status", lambda d: _text(d, "status").startswith("reconnecting"))
    time.sleep(1.0)  # a failed attempt or two, with backoff
    restarted = run_chat(tcp_port, ws_port)
    _wait_for(browser, "the page back", lambda d: _text(d, "status") == "connected" and "reconnected" in _log(d))
    back = hisock_gevent.HiSockClient((LOOPBACK, tcp_port), "checker", None)
    back.send("who")
    assert "browser" in back.recv("who", timeout=PAGE_WAIT)["names"]
    back.close()
    browser.find_element(By.ID, "text").send_keys("still here")
    browser.find_element(By.ID, "send").click()
    _wait_for(browser, "its own line after the restart", lambda d: "browser:still here" in _log(d))

    # A graceful stop ($DISCONN$ "server closing", close code 1001) is a lost connection too.
    restarted.proc.terminate()
    assert restarted.wait() == 0
    _wait_for(browser, "the reconnecting status after a graceful stop", lambda d: _text(d, "status").startswith("reconnecting"))
    run_chat(tcp_port, ws_port)
    _wait_for(browser, "the page back again", lambda d: _text(d, "status") == "connected" and _log(d).count("reconnected") >= 2)


def _log(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return "\n".join(item.text for item in driver.find_elements(By.CSS_SELECTOR, "#log li"))


def _names(driver: Any) -> List[str]:
    from selenium.webdriver.common.by import By

    return [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#who li")]


@pytest.fixture
def run_chat() -> Any:
    """Start ``hisock-gevent chat`` on fixed ports (again after a kill); killed at the end."""
    started: List[Program] = []

    def start(tcp_port: int, ws_port: int) -> Program:
        deadline = time.monotonic() + 10
        while True:
            program = Program(["chat", "--port", str(tcp_port), "--websocket-port", str(ws_port)])
            started.append(program)
            try:
                program.expect(r"serving on", "stderr", timeout=10)
                return program
            except AssertionError:
                program.kill()
                if time.monotonic() > deadline:  # the ports stayed busy
                    raise
                time.sleep(0.2)

    yield start
    for program in started:
        program.kill()


def test_the_chat_page_is_in_the_package() -> None:
    page = chat_page()
    assert b'from "/hisock.js"' in page and b"/hisock" in page
    assert b"innerHTML" not in page  # what others say goes in as text only
