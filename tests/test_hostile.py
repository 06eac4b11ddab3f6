"""Hostile clients: malformed input, huge claims, silence, slowness and non-readers.

Every test runs a real ThreadedHiSockServer (its own OS thread and hub; this process is
not monkey-patched) with two well-behaved ThreadedHiSockClients, ``good-a`` and
``good-b``, relaying sequence-numbered notes to each other through the server while raw
stdlib sockets on the same server misbehave.  What each test asserts is the hardening
promise of PROTOCOL.md and the server's docstring:

* the offending connection, and only it, is closed by the server (we see EOF or a reset);
* exactly one WARNING line of the ``hisock_gevent`` logger names it and says why;
* a client that had joined gets ``leave`` exactly once and vanishes from
  ``clients``/``clients_rev``; one that had not joined reaches no handler at all;
* the good clients lose nothing (every sequence number, once, in order) and see no
  command they did not expect; user handlers only ever see the good clients' notes;
* claimed sizes are never allocated (the process's VmRSS barely moves), and after the
  hostile connections are gone the process holds no more file descriptors or live
  greenlets than before them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import greenlet
import msgpack
import pytest
from conftest import Recorder, wait_until
from rawpeer import RawPeer

import hisock_gevent
from hisock_gevent import typecast
from hisock_gevent.frames import DEFAULT_MAX_MESSAGE_SIZE, frame
from hisock_gevent.messages import Hello, command_body
from hisock_gevent.server import DEFAULT_MAX_HELLO_SIZE

pytestmark = pytest.mark.timeout(90)

WAIT = 10.0
#: The limits of the server under attack (the scene); tests override some of them.
LIMITS: Dict[str, Any] = dict(
    max_message_size=1 << 20,
    handshake_timeout=0.5,
    max_queue_bytes=256 * 1024,
    max_nesting=8,
    max_items=10_000,
)
#: File descriptors and greenlets the process may hold above its baseline afterwards.
FD_SLACK = 3
GREENLET_SLACK = 3
#: How much the process's resident memory may grow while hostile peers claim huge bodies.
RSS_SLACK = 50 * 1024 * 1024
#: Seconds between two notes of the good traffic (deliberate pacing, not synchronisation).
TRAFFIC_PACE = 0.002


# ---------------------------------------------------------------- process accounting


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def live_greenlets() -> int:
    # Dead greenlets waiting for the cycle collector are filtered out, so no gc.collect().
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet) and not obj.dead)


def settle(measure: Callable[[], int], limit: int, what: str, timeout: float = WAIT) -> None:
    """Wait until ``measure()`` is at most ``limit`` (closing is asynchronous on the server's thread)."""
    wait_until(
        lambda: measure() <= limit, timeout, interval=0.02,
        message=lambda: f"{what}: {measure()} after the hostile peers left, at most {limit} expected",
    )


# ---------------------------------------------------------------- the server's log


class LogWatch(logging.Handler):
    """Collects the ``hisock_gevent`` logger's records from every thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def snapshot(self) -> List[logging.LogRecord]:
        with self._lock_records:
            return list(self.records)

    def warnings_about(self, port: int) -> List[str]:
        """WARNING-or-worse lines that name the connection from ``port``."""
        pattern = re.compile(rf"127\.0\.0\.1:{port}(?!\d)")
        return [
            record.getMessage()
            for record in self.snapshot()
            if record.levelno >= logging.WARNING and pattern.search(record.getMessage())
        ]

    def errors(self) -> List[str]:
        return [r.getMessage() for r in self.snapshot() if r.levelno >= logging.ERROR]


@pytest.fixture
def logwatch() -> Iterator[LogWatch]:
    logger = logging.getLogger("hisock_gevent")
    watch = LogWatch()
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(old_level)


# ---------------------------------------------------------------- the well-behaved side


class GoodClient:
    """A ThreadedHiSockClient that records everything it is handed."""

    def __init__(self, make_client: Callable[..., Any], addr: Tuple[str, int], name: str):
        self.name = name
        self.relays = Recorder()
        self.blasts = Recorder()
        self.odd = Recorder()  # anything a good client must never see
        self.peers = Recorder()  # ("connect" | "disconnect", ClientInfo)
        client = make_client(addr, name, "goods", threaded=True)
        self.client: hisock_gevent.ThreadedHiSockClient = client  # type: ignore[assignment]
        self.port = client.get_client_addr()[1]

        @client.on("relay")
        def relay(content: Any) -> None:
            self.relays(content)

        @client.on("blast")
        def blast(content: Any) -> None:
            # Keep the order and the size, not the megabytes.
            if isinstance(content, dict) and isinstance(content.get("data"), bytes):
                self.blasts((content.get("seq"), len(content["data"])))
            else:
                self.odd(("blast", content))

        @client.on("*")
        def anything(command: str, content: Any) -> None:
            self.odd((command, content))

        @client.on("force_disconnect")
        def forced() -> None:
            self.odd(("force_disconnect", None))

        @client.on("client_connect")
        def connected(info: Any) -> None:
            self.peers(("connect", info))

        @client.on("client_disconnect")
        def disconnected(info: Any) -> None:
            self.peers(("disconnect", info))

        client.start()


class GoodTraffic:
    """good-a and good-b send each other numbered notes through the server, in a thread."""

    def __init__(self, goods: List[GoodClient], min_messages: int = 30, max_messages: int = 20_000):
        self.goods = goods
        self.min_messages = min_messages
        self.max_messages = max_messages
        self.sent = 0
        self.errors: List[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)

    def start(self) -> GoodTraffic:
        self._thread.start()
        return self

    def _run(self) -> None:
        a, b = self.goods
        try:
            while self.sent < self.max_messages and (self.sent < self.min_messages or not self._stop.is_set()):
                a.client.send("note", {"to": b.name, "seq": self.sent})
                b.client.send("note", {"to": a.name, "seq": self.sent})
                self.sent += 1
                self._stop.wait(TRAFFIC_PACE)
        except BaseException as exc:  # reported by finish()
            self.errors.append(exc)

    def finish(self, timeout: float = WAIT) -> int:
        """Stop sending; check every note arrived at its receiver exactly once, in order."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the good traffic did not stop"
        assert self.errors == [], f"a good client failed to send: {self.errors!r}"
        a, b = self.goods
        for receiver, sender in ((b, a), (a, b)):
            got = receiver.relays.wait_for(self.sent, timeout)
            expected = [{"from": sender.name, "seq": seq} for seq in range(self.sent)]
            assert got == expected, f"{receiver.name} got the notes of {sender.name} wrong"
        return self.sent


# ---------------------------------------------------------------- the server under attack


@dataclass
class Call:
    event: str
    client: Any
    args: Tuple[Any, ...]


class Scene:
    """A server with tight limits, handlers that record every call, and two good clients."""

    def __init__(self, make_server: Callable[..., Any], make_client: Callable[..., Any], watch: LogWatch, **overrides: Any):
        gc.collect()
        self.fds_before_server = fd_count()
        self.greenlets_before_server = live_greenlets()
        self.watch = watch
        self.calls: List[Call] = []
        self._calls_lock = threading.Lock()
        limits = dict(LIMITS, **overrides)
        self.server: hisock_gevent.ThreadedHiSockServer = make_server(**limits)
        self._register()
        self.server.start()
        self.addr = self.server.get_addr()
        self.goods = [GoodClient(make_client, self.addr, "good-a"), GoodClient(make_client, self.addr, "good-b")]
        wait_until(lambda: len(self.server.get_all_clients()) == 2)
        # good-a hears both joins (its own, then good-b's); good-b only its own.
        self.goods[0].peers.wait_for(2)
        self.goods[1].peers.wait_for(1)
        self.good_ports = {good.port for good in self.goods}

    # -- handlers

    def _record(self, event: str, client: Any, *args: Any) -> None:
        with self._calls_lock:
            self.calls.append(Call(event, client, args))

    def _register(self) -> None:
        srv = self.server

        @srv.on("join")
        def join(client: Any) -> None:
            self._record("join", client)

        @srv.on("leave")
        def leave(client: Any) -> None:
            self._record("leave", client)

        @srv.on("name_change")
        def name_change(client: Any, old: Any, new: Any) -> None:
            self._record("name_change", client, old, new)

        @srv.on("group_change")
        def group_change(client: Any, old: Any, new: Any) -> None:
            self._record("group_change", client, old, new)

        @srv.on("message")
        def message(client: Any, command: Any, content: Any) -> None:
            self._record("message", client, command, content)

        @srv.on("*")
        def anything(client: Any, command: Any, content: Any) -> None:
            self._record("*", client, command, content)

        @srv.on("note")
        def note(client: Any, content: Any) -> None:
            self._record("note", client, content)
            if isinstance(content, dict) and isinstance(content.get("to"), str):
                srv.send_client(content["to"], "relay", {"from": client.name, "seq": content.get("seq")})

    def calls_for(self, port: int, event: Optional[str] = None) -> List[Call]:
        with self._calls_lock:
            return [c for c in self.calls if c.client.ip[1] == port and (event is None or c.event == event)]

    # -- traffic

    def traffic(self, **kwargs: Any) -> GoodTraffic:
        return GoodTraffic(self.goods, **kwargs).start()

    def blast_until(self, done: Callable[[], bool], size: int = 64 * 1024, max_blasts: int = 400, window: int = 4) -> int:
        """Broadcast numbered blobs until ``done()``; good clients are kept at most
        ``window`` blasts behind, so only a peer that does not read falls behind."""
        data = os.urandom(size)
        sent = 0
        while not done() and sent < max_blasts:
            self.server.send_all_clients("blast", {"seq": sent, "data": data})
            sent += 1
            for good in self.goods:
                good.blasts.wait_for(sent - window, WAIT)
        assert done(), f"the condition did not hold after {sent} blasts of {size} bytes"
        return sent

    # -- checks

    def expect_closed_with_reason(self, port: int, reason: str, timeout: float = 2.0) -> List[str]:
        """Exactly one WARNING line names the connection, and it says ``reason`` (a regex).

        The server logs before it closes, so once the peer has seen the close the line is
        there; the timeout only covers peers that went away themselves (reset)."""
        def quiet() -> List[str]:
            return [r.getMessage() for r in self.watch.snapshot() if re.search(rf":{port}(?!\d)", r.getMessage())]

        lines = wait_until(
            lambda: self.watch.warnings_about(port), timeout, interval=0.01,
            message=lambda: f"no WARNING line about 127.0.0.1:{port}; lines mentioning it: {quiet()!r}",
        )
        assert len(lines) == 1, f"more than one WARNING line about 127.0.0.1:{port}: {lines!r}"
        assert re.search(reason, lines[0]), f"the WARNING line {lines[0]!r} does not say {reason!r}"
        return lines

    def expect_left_once(self, port: int) -> None:
        wait_until(lambda: self.calls_for(port, "leave"), timeout=WAIT)
        assert len(self.calls_for(port, "join")) == 1
        assert len(self.calls_for(port, "leave")) == 1
        assert all(info.ip[1] != port for info in dict(self.server.clients).values())
        assert all(info.ip[1] != port for info in dict(self.server.clients_rev))
        assert all(info.ip[1] != port for info in self.server.get_all_clients())

    def check_handlers(self, joined: Set[int], sent: int, allowed_extra: Set[int] = frozenset()) -> None:
        """User handlers saw the good clients' notes, the joins of everyone who joined and
        the leaves of joined hostiles; nothing else, and never garbage."""
        with self._calls_lock:
            calls = list(self.calls)
        a, b = self.goods
        for good, other in ((a, b), (b, a)):
            mine = [c for c in calls if c.client.ip[1] == good.port]
            assert [c.event for c in mine if c.event == "join"] == ["join"]
            notes = [c.args[0] for c in mine if c.event == "note"]
            assert notes == [{"to": other.name, "seq": seq} for seq in range(sent)]
            # "message" runs after the note's own handler, which already sent the relay.
            wait_until(lambda good=good: len(self.calls_for(good.port, "message")) == sent)
            mine = self.calls_for(good.port)
            messages = [c.args for c in mine if c.event == "message"]
            assert messages == [("note", note) for note in notes]
            assert {c.event for c in mine} <= {"join", "note", "message"}, [c for c in mine if c.event not in ("join", "note", "message")]
        for call in calls:
            port = call.client.ip[1]
            if port in self.good_ports or port in allowed_extra:
                continue
            assert port in joined, f"a handler ran for a hostile peer that never joined: {call!r}"
            assert call.event in ("join", "leave"), f"a hostile peer reached a user handler: {call!r}"
        for port in joined:
            assert [c.event for c in calls if c.client.ip[1] == port] == ["join", "leave"]
        for good in self.goods:
            assert good.odd.items == [], f"{good.name} saw something it should not: {good.odd.items!r}"
            for kind, info in good.peers.items:
                port = info.ip[1]
                assert port in self.good_ports or port in joined or port in allowed_extra, (kind, info)
        assert self.watch.errors() == [], f"the server logged errors: {self.watch.errors()!r}"

    def expect_serving(self) -> None:
        """Nothing escaped start(): the server's thread runs, and the good clients are still its clients."""
        thread = self.server._home._thread
        assert thread is not None and thread.is_alive(), "the server's thread died"
        assert not self.server.closed
        assert {info.ip[1] for info in self.server.get_all_clients()} == self.good_ports
        assert {info.ip[1] for info in dict(self.server.clients).values()} == self.good_ports
        assert {info.ip[1] for info in dict(self.server.clients_rev)} == self.good_ports

    def expect_alive(self) -> None:
        """The server still serves: its thread runs and a new client round-trips a note."""
        self.expect_serving()
        relays = Recorder()
        probe = hisock_gevent.ThreadedHiSockClient(self.addr, "probe", None)
        probe.on("relay")(relays)
        probe.start()
        try:
            probe.send("note", {"to": "probe", "seq": -1})
            assert relays.wait_for(1, WAIT) == [{"from": "probe", "seq": -1}]
        finally:
            probe.close()
        port = probe.get_client_addr()[1]
        wait_until(lambda: self.calls_for(port, "leave"))

    def close_all(self) -> None:
        for good in self.goods:
            good.client.close()
        self.server.close()


@pytest.fixture
def make_scene(make_server, make_client, logwatch) -> Callable[..., Scene]:
    def factory(**overrides: Any) -> Scene:
        return Scene(make_server, make_client, logwatch, **overrides)

    return factory


# ---------------------------------------------------------------- the hostile side


@pytest.fixture
def hostiles(raw: Callable[..., RawPeer]) -> Callable[..., RawPeer]:
    """Factory: ``hostiles(addr, rcvbuf=None)`` -> a raw socket that speaks as much HiSock
    as it likes, and no more (a RawPeer with this file's patience); closed at teardown."""
    return lambda addr, **kwargs: raw(addr, timeout=WAIT, **kwargs)


# ---------------------------------------------------------------- the malformed inputs


def cmd(command: bytes, fmt: bytes, payload: bytes) -> bytes:
    return frame(command_body(command, fmt, payload))


def native(content: Any) -> bytes:
    fmt, payload = typecast.encode(content, msgpack_ok=False)
    return cmd(b"note", fmt, payload)


def packed(document: bytes) -> bytes:
    return cmd(b"note", b"m", document)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@dataclass(frozen=True)
class Case:
    id: str
    joined: bool  # the hostile says a proper hello (and is announced) before misbehaving
    payload: bytes
    reason: str  # regex the one WARNING line must match
    close: str = "keep"  # "keep": wait for the server; "shutdown": send FIN after; "abort": RST after
    pipelined: bool = False  # a joined case that sends its hello and the bad input in one write


def _hello_frame(obj: Any) -> bytes:
    return frame(b"$CLTHELLO$" + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()))


_TOO_BIG = 10**15
_HEADER_GARBAGE = "is not a decimal length"
_PAYLOAD = r"malformed payload|payload cannot be decoded"
_BAD_HELLO_FIRST = r"first message was \w+, not a hello"
_TRUNCATED = "middle of a frame"

CASES: List[Case] = [
    # -- headers
    Case("header_not_a_number", True, b"abcdefghijklmnop" + b"x" * 40, _HEADER_GARBAGE),
    Case("header_only_spaces", True, b" " * 16, _HEADER_GARBAGE),
    Case("header_plus_sign", True, b"+5".ljust(16) + b"$KEEPACK$"[:5], _HEADER_GARBAGE),
    Case("header_nul_bytes", True, b"\x00" * 16, _HEADER_GARBAGE),
    Case("header_fullwidth_digits", True, "１２".encode().ljust(16), _HEADER_GARBAGE),
    Case("header_negative_length", True, b"-5".ljust(16) + b"hello", _HEADER_GARBAGE),
    Case("header_tls_client_hello", False, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, _HEADER_GARBAGE),
    Case("header_not_a_number_before_hello", False, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", _HEADER_GARBAGE),
    Case("header_negative_before_hello", False, b"-1".ljust(16), _HEADER_GARBAGE),
    # -- sizes (nothing of the claimed body may be read or allocated)
    Case("claims_1e15_bytes", True, b"%d" % _TOO_BIG, r"more than the \d+-byte limit"),
    Case("claims_1e15_bytes_before_hello", False, (b"%d" % _TOO_BIG).ljust(16) + b"x" * 100, r"more than the \d+-byte limit"),
    Case("claims_largest_header", True, b"9" * 16, r"more than the \d+-byte limit"),
    Case("claims_one_byte_over_the_limit", True, (b"%d" % (LIMITS["max_message_size"] + 1)).ljust(16) + b"x" * 1000, r"more than the 1048576-byte limit"),
    # -- bodies that are not messages
    Case("body_unknown_reserved", True, frame(b"$BOGUS$payload"), "unknown reserved message"),
    Case("body_plain_text", True, frame(b"just some text"), "neither a reserved nor a command message"),
    Case("body_empty", True, frame(b""), "neither a reserved nor a command message"),
    Case("body_lone_dollar", True, frame(b"$"), "neither a reserved nor a command message"),
    Case("body_server_only_message", True, frame(b"$DISCONN$"), "unknown reserved message"),
    Case("command_without_msg", True, frame(b"$CMD$note no separator"), r"command message without \$MSG\$"),
    Case("command_not_utf8", True, frame(b"$CMD$\xff\xfenote$MSG$0       "), "command is not utf-8"),
    Case("command_fmt_length_not_a_number", True, frame(b"$CMD$note$MSG$abcdefgh2shi"), "no valid fmt length"),
    Case("command_fmt_length_truncated", True, frame(b"$CMD$note$MSG$3"), "no valid fmt length"),
    Case("command_fmt_length_past_end", True, frame(b"$CMD$note$MSG$99      2shi"), "fmt length runs past"),
    Case("change_name_not_utf8", True, frame(b"$CHNAME$\xff\xfe"), "name is not utf-8"),
    Case("change_group_not_utf8", True, frame(b"$CHGROUP$\xc3"), "group is not utf-8"),
    Case("get_client_not_utf8", True, frame(b"$GETCLT$\x80"), "client query is not utf-8"),
    # -- fmt strings that do not parse or do not match the payload
    Case("fmt_unknown_letter", True, cmd(b"note", b"2q", b"hi"), _PAYLOAD),
    Case("fmt_len_longer_than_payload", True, cmd(b"note", b"5s", b"hi"), _PAYLOAD),
    Case("fmt_len_shorter_than_payload", True, cmd(b"note", b"1s", b"hi"), _PAYLOAD),
    Case("fmt_none_with_payload", True, cmd(b"note", b"", b"hi"), _PAYLOAD),
    Case("fmt_unclosed_container", True, cmd(b"note", b"l2[1i1i", b"12"), _PAYLOAD),
    Case("fmt_container_len_wrong", True, cmd(b"note", b"l9[1i1i]", b"12"), _PAYLOAD),
    Case("fmt_not_ascii", True, cmd(b"note", "2ş".encode(), b"hi"), _PAYLOAD),
    Case("fmt_huge_len", True, cmd(b"note", b"99999999999999999999999s", b"hi"), _PAYLOAD),
    Case("fmt_dict_key_without_value", True, cmd(b"note", b"d1s", b"k"), _PAYLOAD),
    Case("int_not_decimal", True, cmd(b"note", b"2i", b"ab"), _PAYLOAD),
    Case("int_too_many_digits", True, cmd(b"note", b"5000i", b"7" * 5000), _PAYLOAD),
    Case("float_of_three_bytes", True, cmd(b"note", b"3f", b"abc"), _PAYLOAD),
    Case("str_not_utf8", True, cmd(b"note", b"2s", b"\xff\xfe"), _PAYLOAD),
    Case("nesting_over_max_native", True, native(nested(12)), "nest deeper than 8"),
    Case("nesting_over_max_msgpack", True, packed(msgpack.packb(nested(12))), "nest deeper than 8|payload cannot be decoded"),
    Case("nesting_100000_msgpack", True, packed(b"\x91" * 100_000 + b"\xc0"), _PAYLOAD),
    Case("items_over_max_native", True, native(list(range(20_000))), "more than 10000 values"),
    Case("items_over_max_msgpack", True, packed(msgpack.packb([0] * 20_000)), "more than 10000|payload cannot be decoded"),
    Case("msgpack_invalid_byte", True, packed(b"\xc1"), _PAYLOAD),
    Case("msgpack_array_claims_4g_items", True, packed(b"\xdd\xff\xff\xff\xff"), _PAYLOAD),
    Case("msgpack_bin_claims_4g_bytes", True, packed(b"\xc6\xff\xff\xff\xff" + b"x" * 10), _PAYLOAD),
    Case("msgpack_trailing_bytes", True, packed(msgpack.packb(1) + b"\x01"), _PAYLOAD),
    Case("msgpack_unknown_ext", True, packed(msgpack.packb(msgpack.ExtType(99, b"x"))), _PAYLOAD),
    Case("dict_keys_sharing_one_hash", True, native({k * (2**61 - 1): 1 for k in range(100)}), _PAYLOAD),
    # -- hellos
    Case("hello_not_json", False, _hello_frame(b"{nope"), "hello is not JSON"),
    Case("hello_not_utf8", False, _hello_frame(b'{"name": "\xff"}'), "hello is not JSON"),
    Case("hello_deeply_nested_json", False, _hello_frame(b"[" * 60_000), "hello is not JSON"),
    Case("hello_not_an_object", False, _hello_frame(["name", "x"]), "hello is not a JSON object"),
    Case("hello_is_a_string", False, _hello_frame("hi"), "hello is not a JSON object"),
    Case("hello_name_not_a_string", False, _hello_frame({"name": 5, "group": None}), "hello name is not a string"),
    Case("hello_group_not_a_string", False, _hello_frame({"name": "x", "group": ["g"]}), "hello group is not a string"),
    Case("second_hello", True, frame(Hello("again", None).to_body()), "a second hello"),
    # -- frames before the hello
    Case("command_before_hello", False, cmd(b"note", b"2s", b"hi"), _BAD_HELLO_FIRST),
    Case("usrclose_before_hello", False, frame(b"$USRCLOSE$"), _BAD_HELLO_FIRST),
    Case("change_name_before_hello", False, frame(b"$CHNAME$sneaky"), _BAD_HELLO_FIRST),
    Case("keepack_before_hello", False, frame(b"$KEEPACK$"), _BAD_HELLO_FIRST),
    Case("get_client_before_hello", False, frame(b"$GETCLT$good-a"), _BAD_HELLO_FIRST),
    Case("empty_frame_before_hello", False, frame(b""), "neither a reserved nor a command message"),
    # -- connections that end in the middle of a frame
    Case("hello_and_bad_header_in_one_write", True, b"zz".ljust(16), _HEADER_GARBAGE, pipelined=True),
    Case("hello_and_1e15_claim_in_one_write", True, b"%d" % _TOO_BIG, r"more than the \d+-byte limit", pipelined=True),
    Case("closes_mid_header", True, b"12", _TRUNCATED, close="shutdown"),
    Case("closes_mid_body", True, b"100".ljust(16) + b"$CMD$note", _TRUNCATED, close="shutdown"),
    Case("resets_mid_body", True, b"100".ljust(16) + b"$CMD$note", _TRUNCATED + "|reset", close="abort"),
    Case("closes_mid_header_before_hello", False, b"12", _TRUNCATED, close="shutdown"),
    Case("closes_mid_hello_body", False, frame(Hello("x", None).to_body())[:-3], _TRUNCATED, close="shutdown"),
]


def run_case(case: Case, addr: Tuple[str, int], make_hostile: Callable[..., RawPeer]) -> RawPeer:
    """Carry out one hostile case; return the peer once the server has closed it."""
    peer = make_hostile(addr)
    if case.pipelined:
        peer.try_send(frame(Hello(f"hostile-{case.id}", None).to_body()) + case.payload)
    else:
        if case.joined:
            peer.hello(f"hostile-{case.id}")
        peer.try_send(case.payload)
    if case.close == "shutdown":
        peer.shutdown_write()
    elif case.close == "abort":
        peer.abort()
    peer.wait_closed_how()
    return peer


# ---------------------------------------------------------------- one test per kind


#: The cases the fast tier (``-m "not slow"``) runs, one of each kind; the full suite runs them all.
FAST_CASES = {"header_not_a_number", "hello_not_json", "fmt_unknown_letter", "resets_mid_body"}


def slow_unless(fast: bool) -> Any:
    return () if fast else pytest.mark.slow


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=slow_unless(case.id in FAST_CASES)) for case in CASES])
def test_malformed_input_closes_only_the_offending_connection(case: Case, make_scene, hostiles, capfd):
    scene = make_scene()
    fds_before = fd_count()
    greenlets_before = live_greenlets()
    rss_before = rss_bytes()
    traffic = scene.traffic()

    peer = run_case(case, scene.addr, hostiles)

    if case.joined:
        scene.expect_left_once(peer.port)
    scene.expect_closed_with_reason(peer.port, case.reason)
    sent = traffic.finish()
    scene.check_handlers({peer.port} if case.joined else set(), sent)
    scene.expect_serving()
    assert "Traceback" not in capfd.readouterr().err
    assert rss_bytes() - rss_before < RSS_SLACK
    peer.close()
    settle(fd_count, fds_before + FD_SLACK, "open file descriptors")
    settle(live_greenlets, greenlets_before + GREENLET_SLACK, "live greenlets")
    scene.close_all()
    settle(fd_count, scene.fds_before_server + FD_SLACK, "open file descriptors after the server closed")


# ---------------------------------------------------------------- size claims and memory


@pytest.mark.parametrize(
    "claim",
    [
        pytest.param(_TOO_BIG, id="1e15"),
        pytest.param(10**16 - 1, id="1e16-1", marks=pytest.mark.slow),
        pytest.param(DEFAULT_MAX_MESSAGE_SIZE + 1, id="default_limit+1", marks=pytest.mark.slow),
    ],
)
def test_huge_claims_are_refused_without_allocating(claim: int, make_scene, hostiles):
    # The server's default max_message_size (16 MiB) here, not the scene's 1 MiB.
    scene = make_scene(max_message_size=DEFAULT_MAX_MESSAGE_SIZE)
    traffic = scene.traffic()
    gc.collect()
    rss_before = rss_bytes()
    peers = []
    for index in range(20):
        peer = hostiles(scene.addr)
        if index % 2:
            peer.hello(f"claimer-{index}")
        # The header, then a little of the "body", then silence: nothing to wait for.
        peer.try_send((b"%d" % claim).ljust(16) + os.urandom(4096))
        peers.append(peer)
    for index, peer in enumerate(peers):
        peer.wait_closed_how()
        # Before its hello is accepted a connection gets the much smaller hello limit.
        limit = DEFAULT_MAX_MESSAGE_SIZE if index % 2 else DEFAULT_MAX_HELLO_SIZE
        scene.expect_closed_with_reason(peer.port, rf"more than the {limit}-byte limit")
    joined = {peer.port for index, peer in enumerate(peers) if index % 2}
    for port in joined:
        scene.expect_left_once(port)
    growth = rss_bytes() - rss_before
    assert growth < RSS_SLACK, f"resident memory grew by {growth} bytes while peers claimed {claim}-byte bodies"
    sent = traffic.finish()
    scene.check_handlers(joined, sent)
    scene.expect_serving()


# ---------------------------------------------------------------- silence and slowness


@pytest.mark.slow
def test_silent_connection_is_closed_after_the_handshake_timeout(make_scene, hostiles):
    scene = make_scene(handshake_timeout=0.5)
    traffic = scene.traffic()
    fds_before = fd_count()
    started = time.monotonic()
    peers = [hostiles(scene.addr) for _ in range(5)]
    for peer in peers:
        assert peer.wait_closed_how(timeout=5.0) == "eof"
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 4.0, f"silent peers were closed after {elapsed:.2f} s with handshake_timeout=0.5"
    for peer in peers:
        scene.expect_closed_with_reason(peer.port, r"no hello within 0\.5 s")
    sent = traffic.finish()
    scene.check_handlers(set(), sent)
    scene.expect_serving()
    for peer in peers:
        peer.close()
    settle(fd_count, fds_before + FD_SLACK, "open file descriptors")


@pytest.mark.slow
def test_header_sent_one_byte_at_a_time_is_cut_off_by_the_handshake_timeout(make_scene, hostiles):
    scene = make_scene(handshake_timeout=0.5)
    traffic = scene.traffic()
    peer = hostiles(scene.addr)
    hello = frame(Hello("slowloris", None).to_body())
    started = time.monotonic()
    sent_bytes = 0
    # Bounded: at most the whole hello, one byte every 0.2 s, and never past 5 s.
    while sent_bytes < len(hello) and time.monotonic() - started < 5.0:
        if peer.is_closed_by_server() or not peer.try_send(hello[sent_bytes : sent_bytes + 1]):
            break
        sent_bytes += 1
        time.sleep(0.2)  # the deliberate slowness of this hostile client
    peer.wait_closed_how(timeout=3.0)
    elapsed = time.monotonic() - started
    assert sent_bytes < 16, f"the server let a slow peer send {sent_bytes} bytes of its header"
    assert elapsed < 4.0, f"the slow peer was closed after {elapsed:.2f} s with handshake_timeout=0.5"
    scene.expect_closed_with_reason(peer.port, r"no hello within 0\.5 s")
    sent = traffic.finish()
    scene.check_handlers(set(), sent)
    scene.expect_serving()


@pytest.mark.slow
def test_joined_client_that_says_nothing_is_dropped_after_the_idle_timeout(make_scene, hostiles):
    scene = make_scene(idle_timeout=1.5)
    # The good clients keep talking (so they are never idle) until the silent one is gone.
    traffic = scene.traffic(min_messages=10)
    peer = hostiles(scene.addr)
    peer.hello("hostile-idle")
    joined_at = time.monotonic()
    peer.wait_closed_how(timeout=6.0)
    elapsed = time.monotonic() - joined_at
    assert 1.2 < elapsed < 5.0, f"an idle client was dropped after {elapsed:.2f} s with idle_timeout=1.5"
    scene.expect_closed_with_reason(peer.port, r"nothing received for 1\.5 s")
    scene.expect_left_once(peer.port)
    # Checked while the good clients still talk: once they stop, they too become idle.
    scene.expect_serving()
    sent = traffic.finish()
    scene.check_handlers({peer.port}, sent)


@pytest.mark.slow
def test_client_that_stops_reading_a_broadcast_is_dropped_with_leave(make_scene, hostiles):
    scene = make_scene(max_queue_bytes=256 * 1024)
    traffic = scene.traffic()
    fds_before = fd_count()
    greenlets_before = live_greenlets()
    rss_before = rss_bytes()
    peer = hostiles(scene.addr, rcvbuf=4096)
    peer.hello("hostile-nonreader")  # ...and never reads again

    blasts = scene.blast_until(lambda: bool(scene.calls_for(peer.port, "leave")))

    scene.expect_left_once(peer.port)
    scene.expect_closed_with_reason(peer.port, r"not read \(max_queue_bytes=262144\)")
    for good in scene.goods:
        assert good.blasts.wait_for(blasts, WAIT) == [(seq, 64 * 1024) for seq in range(blasts)]
    peer.wait_closed_how(timeout=WAIT)
    sent = traffic.finish()
    scene.check_handlers({peer.port}, sent)
    scene.expect_serving()
    disconnects = [info.ip[1] for good in scene.goods for kind, info in good.peers.items if kind == "disconnect"]
    assert disconnects == [peer.port, peer.port], "each good client hears once that the non-reader left"
    assert rss_bytes() - rss_before < RSS_SLACK
    peer.close()
    settle(fd_count, fds_before + FD_SLACK, "open file descriptors")
    settle(live_greenlets, greenlets_before + GREENLET_SLACK, "live greenlets")


def test_reset_in_the_middle_of_a_frame_is_logged_even_with_output_queued(make_scene, hostiles):
    # Default max_queue_bytes here: the peer must not be dropped for not reading.
    scene = make_scene(max_queue_bytes=64 * 1024 * 1024)
    traffic = scene.traffic()
    peer = hostiles(scene.addr, rcvbuf=4096)
    peer.hello("hostile-reset-with-output")
    # The server now has megabytes queued for this peer, which it will never read...
    scene.server.send_client("hostile-reset-with-output", "blob", b"x" * (8 << 20))
    assert peer.try_send(b"100".ljust(16) + b"$CMD$note")  # ...then half a frame,
    peer.abort()  # ...then a TCP reset instead of the rest.

    scene.expect_left_once(peer.port)
    scene.expect_closed_with_reason(peer.port, _TRUNCATED + "|reset")
    sent = traffic.finish()
    scene.check_handlers({peer.port}, sent)
    scene.expect_serving()


def test_frames_sent_just_before_a_reset_are_handled_even_if_a_write_fails_first(make_server, logwatch, hostiles):
    # HiSockClient.close() sends its last frames and $USRCLOSE$ and closes; when it has
    # unread data the kernel ends the connection with a reset.  Frames that arrived
    # before the reset are in the server's receive buffer and must still be handled,
    # even when the server happens to write to that client first (and the write fails).
    server = make_server()
    notes = Recorder()
    leaves = Recorder()
    stalled = threading.Event()
    release = threading.Event()
    server.on("note")(lambda client, content: notes((client.name, content)))
    server.on("leave")(lambda client: leaves(client.name))

    @server.on("stall")
    def stall(client: Any) -> None:
        # Holds the server's hub (a blocking handler) until the closer has gone, then
        # writes to it: the write is what finds the reset.
        stalled.set()
        release.wait(WAIT)
        server.send_client("closer", "ping")

    server.start()
    closer = hostiles(server.get_addr())
    closer.hello("closer")
    staller = hostiles(server.get_addr())
    staller.hello("staller")  # announced to the closer, which never reads it: unread data
    assert staller.try_send(cmd(b"stall", b"", b""))
    assert stalled.wait(WAIT)
    assert closer.try_send(cmd(b"note", b"3s", b"bye") + frame(b"$USRCLOSE$"))
    closer.sock.close()  # unread data: the kernel sends RST right after our frames
    release.set()

    assert leaves.wait_for(1) == ["closer"]
    assert notes.wait_for(1, timeout=2.0) == [("closer", "bye")], "the frames sent before the reset were dropped"


def test_commands_named_like_reserved_events_reach_only_the_catch_all(make_server, logwatch, hostiles):
    # A command message named "leave" is a command, not the leave event: the user's leave
    # handler must not be called with a peer's content as its arguments.
    server = make_server()
    events = Recorder()
    for event in ("join", "leave", "name_change", "group_change"):
        server.on(event)(lambda *args, event=event: events((event,) + args))
    server.on("*")(lambda client, command, content: events(("*", client, command, content)))
    server.start()
    peer = hostiles(server.get_addr())
    peer.hello("pretender")
    names = ["join", "leave", "name_change", "group_change", "message", "*"]
    for name in names:
        fmt, payload = typecast.encode(["not", "a", "client"])
        assert peer.try_send(cmd(name.encode(), fmt, payload))
    assert peer.try_send(frame(b"$USRCLOSE$"))
    got = events.wait_for(2 + len(names))
    assert [item[0] for item in got] == ["join"] + ["*"] * len(names) + ["leave"]
    assert [item[2] for item in got[1:-1]] == names
    assert all(item[3] == ["not", "a", "client"] for item in got[1:-1])
    assert got[-1][1].name == "pretender"
    assert logwatch.warnings_about(peer.port) == []


@pytest.mark.slow
def test_joined_client_that_ignores_keepalives_is_dropped_with_leave(make_scene, hostiles):
    scene = make_scene(keepalive=True, keepalive_interval=0.3, keepalive_timeout=0.3)
    traffic = scene.traffic()
    peer = hostiles(scene.addr)
    peer.hello("hostile-deaf")  # reads its join, then never answers $KEEPALIVE$
    peer.wait_closed_how(timeout=5.0)
    scene.expect_left_once(peer.port)
    scene.expect_closed_with_reason(peer.port, "no keepalive answer")
    scene.expect_serving()  # the good clients answered theirs
    sent = traffic.finish()
    scene.check_handlers({peer.port}, sent)


@pytest.mark.slow
def test_server_close_is_not_held_up_by_a_client_that_does_not_read(make_scene, hostiles):
    # max_queue_bytes large enough that the non-reader is not dropped before the close.
    scene = make_scene(max_queue_bytes=64 * 1024 * 1024)
    peer = hostiles(scene.addr, rcvbuf=4096)
    peer.hello("hostile-stuck")
    scene.server.send_client("hostile-stuck", "blob", b"x" * ((16 << 20) - 1024))  # just under what a client accepts
    for good in scene.goods:
        good.client.close()
    started = time.monotonic()
    scene.server.close(timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"close(timeout=1.0) took {elapsed:.2f} s with a client that does not read"
    assert peer.wait_closed_how(timeout=WAIT) in ("eof", "reset")
    peer.close()
    settle(fd_count, scene.fds_before_server + FD_SLACK, "open file descriptors after the server closed")
    settle(live_greenlets, scene.greenlets_before_server + GREENLET_SLACK, "live greenlets after the server closed")


# ---------------------------------------------------------------- everything at once


@pytest.mark.slow
def test_every_hostile_at_once_while_good_clients_talk(make_scene, hostiles, capfd):
    scene = make_scene()
    gc.collect()
    fds_before = fd_count()
    greenlets_before = live_greenlets()
    rss_before = rss_bytes()
    traffic = scene.traffic(min_messages=200)

    # (peer, reason, joined) for every hostile; filled in by the threads below.
    outcomes: List[Tuple[RawPeer, str, bool]] = []
    failures: List[str] = []
    lock = threading.Lock()

    def attempt(label: str, action: Callable[[], Tuple[RawPeer, str, bool]]) -> None:
        try:
            result = action()
        except BaseException as exc:
            with lock:
                failures.append(f"{label}: {exc!r}")
        else:
            with lock:
                outcomes.append(result)

    def malformed(case: Case) -> Callable[[], Tuple[RawPeer, str, bool]]:
        return lambda: (run_case(case, scene.addr, hostiles), case.reason, case.joined)

    def claimer(index: int) -> Tuple[RawPeer, str, bool]:
        peer = hostiles(scene.addr)
        if index % 2:
            peer.hello(f"claimer-{index}")
        peer.try_send(b"%d" % _TOO_BIG + b" " + os.urandom(1024))
        peer.wait_closed_how()
        return peer, r"more than the \d+-byte limit", bool(index % 2)

    def silent() -> Tuple[RawPeer, str, bool]:
        peer = hostiles(scene.addr)
        peer.wait_closed_how(timeout=5.0)
        return peer, "no hello within", False

    def slow() -> Tuple[RawPeer, str, bool]:
        peer = hostiles(scene.addr)
        hello = frame(Hello("slowloris", None).to_body())
        started = time.monotonic()
        for index in range(len(hello)):
            if time.monotonic() - started > 5.0 or peer.is_closed_by_server() or not peer.try_send(hello[index : index + 1]):
                break
            time.sleep(0.2)  # the deliberate slowness of this hostile client
        peer.wait_closed_how(timeout=3.0)
        return peer, "no hello within", False

    non_readers = [hostiles(scene.addr, rcvbuf=4096) for _ in range(2)]
    for index, peer in enumerate(non_readers):
        peer.hello(f"nonreader-{index}")

    threads = [threading.Thread(target=attempt, args=(case.id, malformed(case)), daemon=True) for case in CASES]
    threads += [threading.Thread(target=attempt, args=(f"claimer-{i}", lambda i=i: claimer(i)), daemon=True) for i in range(10)]
    threads += [threading.Thread(target=attempt, args=(f"silent-{i}", silent), daemon=True) for i in range(5)]
    threads += [threading.Thread(target=attempt, args=(f"slow-{i}", slow), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()

    # Meanwhile: broadcasts that the good clients read and the non-readers do not.
    blasts = scene.blast_until(lambda: all(scene.calls_for(p.port, "leave") for p in non_readers))
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a hostile thread is stuck"
    for peer in non_readers:
        peer.wait_closed_how()
        outcomes.append((peer, r"not read \(max_queue_bytes", True))

    assert failures == [], failures
    assert len(outcomes) == len(CASES) + 10 + 5 + 2 + 2
    joined = {peer.port for peer, _, was_joined in outcomes if was_joined}

    # The good side first: nothing lost, nothing odd, the server alive and well.
    sent = traffic.finish()
    for good in scene.goods:
        assert good.blasts.wait_for(blasts, WAIT) == [(seq, 64 * 1024) for seq in range(blasts)]
    for port in joined:
        scene.expect_left_once(port)
    scene.check_handlers(joined, sent)
    scene.expect_alive()
    assert "Traceback" not in capfd.readouterr().err
    assert rss_bytes() - rss_before < RSS_SLACK
    for peer, _, _ in outcomes:
        peer.close()
    settle(fd_count, fds_before + FD_SLACK, "open file descriptors")
    settle(live_greenlets, greenlets_before + GREENLET_SLACK, "live greenlets")

    # Then the log: one WARNING line per hostile connection, saying why.
    problems = []
    for peer, reason, _ in outcomes:
        try:
            scene.expect_closed_with_reason(peer.port, reason, timeout=0.5)
        except AssertionError as exc:
            problems.append(str(exc))
    scene.close_all()
    settle(fd_count, scene.fds_before_server + FD_SLACK, "open file descriptors after the server closed")
    settle(live_greenlets, scene.greenlets_before_server + GREENLET_SLACK, "live greenlets after the server closed")
    assert problems == [], "\n".join(problems)
