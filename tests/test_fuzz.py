"""Fuzzing: whatever bytes a peer sends, only protocol errors come out, and a server keeps serving.

Two levels:

* Pure (hypothesis): random and mutated frames (valid frames with bytes flipped,
  truncated, duplicated, concatenated, spliced) go through the receiving pipeline --
  :class:`FrameParser`, then :func:`parse_client_body` / :func:`parse_server_body`, then
  :func:`typecast.decode` -- and nothing but the RemoteProtocolError family escapes.
* Sockets: a bounded set of random and mutated blobs, each on a fresh raw connection to one
  server, while a good client plays ping/pong without pause: the server stays up, the good
  client never misses a pong, and handlers see only what well-formed messages carried.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
import pytest
from conftest import LOOPBACK, wait_until
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hisock_gevent
from hisock_gevent import ClientDisconnected, ClientInfo, HiSockClient, typecast
from hisock_gevent.errors import (
    HandshakeError,
    InvalidHeader,
    InvalidTypeCast,
    MalformedMessage,
    MalformedPayload,
    MessageTooLarge,
)
from hisock_gevent.frames import FrameParser, frame
from hisock_gevent.messages import (
    ChangeGroup,
    ChangeName,
    Command,
    Disconnect,
    GetClient,
    Hello,
    KeepAck,
    KeepAlive,
    PeerJoined,
    PeerLeft,
    UserClose,
    command_body,
    parse_client_body,
    parse_server_body,
)

pytestmark = pytest.mark.timeout(60)

#: The only exceptions bytes from a peer may turn into.
PROTOCOL_ERRORS = (InvalidHeader, MessageTooLarge, MalformedMessage, MalformedPayload, HandshakeError)

FUZZ = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ------------------------------------------------------------------ strategies: valid material


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.binary(max_size=12),
)
hashables = st.one_of(st.integers(min_value=-1000, max_value=1000), st.text(max_size=6), st.binary(max_size=6))
sendables = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashables, inner, max_size=4),
    ),
    max_leaves=12,
)
command_names = st.one_of(st.sampled_from(["ping", "x", "CMD", "$MSG$", "Dollar$", "ünï"]), st.text(max_size=8))
names = st.one_of(st.none(), st.text(max_size=10))


@st.composite
def command_bodies(draw: Any) -> bytes:
    value = draw(sendables)
    msgpack_ok = draw(st.booleans())
    try:
        fmt, payload = typecast.encode(value, msgpack_ok=msgpack_ok)
    except InvalidTypeCast:
        fmt, payload = typecast.encode(value, msgpack_ok=True)
    return command_body(draw(command_names).encode("utf-8", "surrogatepass"), fmt, payload)


@st.composite
def client_bodies(draw: Any) -> bytes:
    kind = draw(st.integers(min_value=0, max_value=6))
    if kind == 0:
        extra: Dict[str, Any] = draw(
            st.fixed_dictionaries({}, optional={"caps": st.lists(st.sampled_from(["msgpack", "x"]), max_size=2), "auth": st.text(max_size=8)})
        )
        return Hello(draw(names), draw(names), extra).to_body()
    if kind == 1:
        return UserClose().to_body()
    if kind == 2:
        return ChangeName(draw(st.text(max_size=8))).to_body()
    if kind == 3:
        return ChangeGroup(draw(st.text(max_size=8))).to_body()
    if kind == 4:
        return KeepAck().to_body()
    if kind == 5:
        return GetClient(draw(st.sampled_from(["127.0.0.1:1", "name", ""]))).to_body()
    return draw(command_bodies())


@st.composite
def server_bodies(draw: Any) -> bytes:
    kind = draw(st.integers(min_value=0, max_value=4))
    info = {"ip": ["127.0.0.1", draw(st.integers(0, 65535))], "name": draw(names), "group": draw(names)}
    info["ipstr"] = f"127.0.0.1:{info['ip'][1]}"
    if kind == 0:
        return PeerJoined(info).to_body()
    if kind == 1:
        return PeerLeft(info).to_body()
    if kind == 2:
        return Disconnect(draw(st.sampled_from([None, {"reason": "authentication failed"}, {"reason": 3}]))).to_body()
    if kind == 3:
        return KeepAlive().to_body()
    return draw(command_bodies())


# ------------------------------------------------------------------ strategies: mutations


GRAMMAR_BYTES = b"0123456789 $[]{}()slmtdibf\x00\xff"


def mutate(data: bytes, ops: List[Tuple[int, int, int, bytes]], others: List[bytes]) -> bytes:
    """Apply mutations: flip, set, insert, delete, truncate, duplicate a slice, splice another blob."""
    buf = bytearray(data)
    for op, a, b, extra in ops:
        n = len(buf)
        i = a % (n + 1)
        j = min(n, i + b % 64)
        if op == 0 and n:  # flip a bit
            buf[a % n] ^= 1 << (b % 8)
        elif op == 1 and n:  # set a byte (often a grammar character)
            buf[a % n] = GRAMMAR_BYTES[b % len(GRAMMAR_BYTES)]
        elif op == 2:  # insert bytes
            buf[i:i] = extra
        elif op == 3:  # delete a range
            del buf[i:j]
        elif op == 4:  # truncate
            del buf[i:]
        elif op == 5:  # duplicate a slice in place
            buf[j:j] = buf[i:j]
        elif op == 6 and others:  # concatenate another blob
            buf += others[a % len(others)]
        elif op == 7 and others:  # splice another blob's tail in
            other = others[a % len(others)]
            buf[i:] = other[b % (len(other) + 1) :]
    return bytes(buf)


mutation_ops = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 2**16), st.integers(0, 2**16), st.binary(max_size=8)), max_size=6
)


def streams_of(bodies: Any, header_len: int = 16) -> Any:
    """A byte stream of valid frames (of ``bodies``), then mutated; or plain random bytes."""

    @st.composite
    def build(draw: Any) -> bytes:
        if draw(st.integers(0, 9)) == 0:
            return draw(st.binary(max_size=300))
        frames = [frame(body, header_len) for body in draw(st.lists(bodies, min_size=1, max_size=5))]
        stream = b"".join(frames)
        return mutate(stream, draw(mutation_ops), frames)

    return build()


def chunked(data: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


# ------------------------------------------------------------------ the pipeline under test


SENDABLE_SCALARS = (str, bytes, int, float, bool, type(None), ClientInfo)


def assert_sendable(value: Any, depth: int = 0) -> None:
    """Whatever decode returns is built of Sendable types only."""
    assert depth < 100
    if isinstance(value, (list, tuple)):
        for item in value:
            assert_sendable(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_sendable(key, depth + 1)
            assert_sendable(item, depth + 1)
    else:
        assert type(value) in SENDABLE_SCALARS, type(value)


def run_pipeline(
    chunks: List[bytes], parse: Callable[[bytes], Any], header_len: int = 16, max_body_len: int = 4096,
    max_depth: int = typecast.DEFAULT_MAX_DEPTH, max_items: int = typecast.DEFAULT_MAX_ITEMS,
) -> List[Any]:
    """Feed chunks as a connection would; return what handlers would get.  Raises only protocol errors
    (the caller checks that)."""
    parser = FrameParser(header_len, max_body_len)
    delivered: List[Any] = []
    for chunk in chunks:
        for body in parser.feed(chunk):
            assert len(body) <= max_body_len
            message = parse(body)
            if isinstance(message, Command):
                assert isinstance(message.command, str)
                content = typecast.decode(message.fmt, message.payload, max_depth=max_depth, max_items=max_items)
                assert_sendable(content)
                delivered.append((message.command, content))
            elif isinstance(message, Hello):
                assert message.name is None or isinstance(message.name, str)
                assert message.group is None or isinstance(message.group, str)
                assert all(isinstance(cap, str) for cap in message.capabilities)
                delivered.append(message)
            elif isinstance(message, Disconnect):
                assert message.reason is None or isinstance(message.reason, str)
                delivered.append(message)
            else:
                delivered.append(message)
        if parser.failed:
            parser.feed(b"")
    return delivered


def only_protocol_errors(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except PROTOCOL_ERRORS:
        return None
    # Anything else propagates and fails the test with its own traceback.


# ------------------------------------------------------------------ pure fuzz


@FUZZ
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=10), header_len=st.integers(1, 20),
       max_body_len=st.integers(0, 500))
def test_frame_parser_on_random_bytes_raises_only_header_errors(data, cuts, header_len, max_body_len):
    parser = FrameParser(header_len, max_body_len)
    got: List[bytes] = []
    try:
        for piece in chunked(data, cuts):
            got += parser.feed(piece)
        if parser.failed:
            parser.feed(b"")
    except (InvalidHeader, MessageTooLarge):
        # Once failed, it stays failed.
        with pytest.raises((InvalidHeader, MessageTooLarge)):
            parser.feed(b"")
    # The bodies are the stream's own bytes, framed as announced, and within the limit.
    consumed = 0
    for body in got:
        assert len(body) <= max_body_len
        header = data[consumed : consumed + header_len]
        assert int(header.strip(b" ")) == len(body)
        assert data[consumed + header_len : consumed + header_len + len(body)] == body
        consumed += header_len + len(body)


@FUZZ
@given(stream=streams_of(client_bodies()), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_chunking_does_not_change_what_the_parser_finds(stream, cuts):
    def run(pieces: List[bytes]) -> Tuple[List[bytes], Optional[type]]:
        parser = FrameParser(16, 4096)
        found: List[bytes] = []
        try:
            for piece in pieces:
                found += parser.feed(piece)
            if parser.failed:
                parser.feed(b"")
        except (InvalidHeader, MessageTooLarge) as exc:
            return found, type(exc)
        return found, None

    whole = run([stream])
    pieces = run(chunked(stream, cuts))
    assert pieces[0] == whole[0]
    assert pieces[1] == whole[1]


@pytest.mark.slow
@FUZZ
@given(stream=streams_of(client_bodies()), cuts=st.lists(st.integers(min_value=0), max_size=8),
       max_depth=st.integers(0, 40), max_items=st.integers(0, 200))
def test_client_to_server_pipeline_raises_only_protocol_errors(stream, cuts, max_depth, max_items):
    only_protocol_errors(lambda: run_pipeline(chunked(stream, cuts), parse_client_body, max_depth=max_depth, max_items=max_items))


@pytest.mark.slow
@FUZZ
@given(stream=streams_of(server_bodies()), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_server_to_client_pipeline_raises_only_protocol_errors(stream, cuts):
    only_protocol_errors(lambda: run_pipeline(chunked(stream, cuts), parse_server_body))


@FUZZ
@given(body=st.one_of(client_bodies(), server_bodies()), ops=mutation_ops, others=st.lists(client_bodies(), max_size=2))
def test_mutated_bodies_parse_or_raise_protocol_errors_on_both_sides(body, ops, others):
    mutated = mutate(body, ops, others)
    for parse in (parse_client_body, parse_server_body):
        message = only_protocol_errors(lambda parse=parse: parse(mutated))
        if isinstance(message, Command):
            only_protocol_errors(lambda message=message: assert_sendable(typecast.decode(message.fmt, message.payload)))


@FUZZ
@given(tag=st.sampled_from([b"$CLTCONN$", b"$CLTDISCONN$"]), payload=st.one_of(
    st.binary(max_size=60),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10), st.floats(allow_nan=False)),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["ip", "name", "group", "ipstr", "x"]), inner, max_size=4)),
        max_leaves=8,
    ).map(lambda obj: json.dumps(obj).encode()),
    st.fixed_dictionaries({"ip": st.one_of(st.integers(), st.text(max_size=12), st.lists(st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=3))},
                          optional={"name": st.one_of(st.none(), st.integers(), st.text(max_size=5)), "group": st.one_of(st.none(), st.lists(st.integers(), max_size=2))}).map(lambda obj: json.dumps(obj).encode()),
))
def test_peer_info_the_server_sends_is_either_refused_or_usable_as_client_info(tag, payload):
    """A $CLTCONN$/$CLTDISCONN$ that parses must become a ClientInfo (the client builds one at once).

    Otherwise a malformed announcement escapes the protocol layer as a TypeError/ValueError
    in the client's reader (or in the caller's recv(), when it came with the hello answer).
    """
    message = only_protocol_errors(lambda: parse_server_body(tag + payload))
    if message is not None:
        info = ClientInfo.from_dict(message.info)
        assert isinstance(info.ip[0], str) and isinstance(info.ip[1], int)
        assert info.name is None or isinstance(info.name, str)
        assert info.group is None or isinstance(info.group, str)


@FUZZ
@given(
    fmt=st.one_of(
        st.text(alphabet="0123456789sibfltdm[](){}-", max_size=40).map(str.encode),
        st.binary(max_size=20),
    ),
    payload=st.binary(max_size=60),
    max_depth=st.integers(0, 40),
    max_items=st.integers(0, 100),
)
def test_decode_of_random_fmt_and_payload_raises_only_malformed_payload(fmt, payload, max_depth, max_items):
    try:
        value = typecast.decode(fmt, payload, max_depth=max_depth, max_items=max_items)
    except MalformedPayload:
        return
    assert_sendable(value)


@pytest.mark.slow
@FUZZ
@given(value=sendables, msgpack_ok=st.booleans(), fmt_ops=mutation_ops, payload_ops=mutation_ops)
def test_decode_of_mutated_encodings_raises_only_malformed_payload(value, msgpack_ok, fmt_ops, payload_ops):
    try:
        fmt, payload = typecast.encode(value, msgpack_ok=msgpack_ok)
    except InvalidTypeCast:
        assume(False)
    fmt = mutate(fmt, fmt_ops, [fmt])
    payload = mutate(payload, payload_ops, [payload])
    try:
        decoded = typecast.decode(fmt, payload, max_depth=8, max_items=64)
    except MalformedPayload:
        return
    assert_sendable(decoded)


@pytest.mark.slow
@FUZZ
@given(value=sendables, msgpack_ok=st.booleans())
def test_unmutated_encodings_still_decode_exactly(value, msgpack_ok):
    """Control for the mutation tests: the material they start from is valid."""
    try:
        fmt, payload = typecast.encode(value, msgpack_ok=msgpack_ok)
    except InvalidTypeCast:
        assume(False)
    decoded = typecast.decode(fmt, payload)
    if msgpack_ok:
        assert repr(decoded) == repr(value)


# ------------------------------------------------------------------ socket-level fuzz


HEADER_LEN = 16
BLOB_COUNT = 200
SEED = int(os.environ.get("HISOCK_FUZZ_SEED", "20241125"))


def _cmd(command: str, fmt: bytes, payload: bytes) -> bytes:
    return command_body(command.encode(), fmt, payload)


def _templates() -> List[bytes]:
    """Valid frame sequences of a HiSock peer that the blobs are mutated from."""
    hello = frame(Hello("fuzz", "fz", {}).to_body())
    hello_caps = frame(Hello("fuzz", None, {"caps": ["msgpack"]}).to_body())
    ping_native = frame(_cmd("ping", *typecast.encode(["fuzz", 1, b"\x00"], msgpack_ok=False)))
    ping_msgpack = frame(_cmd("ping", *typecast.encode({"fuzz": (1, None, True)}, msgpack_ok=True)))
    other = frame(_cmd("other", b"3s", b"abc"))
    return [
        hello,
        hello + ping_native,
        hello_caps + ping_msgpack + other,
        hello + frame(ChangeName("fuzz2").to_body()) + ping_native,
        hello + frame(GetClient("good").to_body()) + frame(KeepAck().to_body()) + ping_native,
        hello + frame(UserClose().to_body()),
        hello_caps + ping_native + ping_msgpack + frame(ChangeGroup("g").to_body()),
    ]


SPECIAL_BLOBS = [
    b"",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # the start of a TLS ClientHello
    b"%-16d" % (10**15),  # announces a petabyte
    b"-1              ",
    b"+5              hello",
    b"0" * 16,  # an empty body as the hello
    frame(b"$CLTHELLO$[]"),
    frame(b"$CLTHELLO$" + b"[" * 100_000),
    frame(b"$CLTHELLO$" + b'{"name": 5}'),
    frame(Hello("fuzz", None, {}).to_body()) * 2,
    frame(Hello("fuzz", None, {}).to_body()) + frame(_cmd("ping", b"l" + b"0[" * 5000 + b"]" * 5000, b"")),
    frame(Hello("fuzz", None, {"caps": ["msgpack"]}).to_body()) + frame(_cmd("ping", b"m", b"\x91" * 50_000 + b"\xc0")),
    frame(Hello("fuzz", None, {}).to_body()) + frame(_cmd("ping", b"99999999999999999999s", b"x")),
    frame(Hello("fuzz", None, {}).to_body()) + frame(b"$CMD$ping$MSG$" + b"9" * 8),
]


def make_blobs(count: int, seed: int) -> List[bytes]:
    rng = random.Random(seed)
    templates = _templates()
    blobs = list(SPECIAL_BLOBS)
    while len(blobs) < count:
        roll = rng.random()
        if roll < 0.15:
            blobs.append(rng.randbytes(rng.randrange(0, 200)))
        elif roll < 0.25:
            # A valid header, then random bytes.
            body = rng.randbytes(rng.randrange(0, 120))
            blobs.append(frame(body) + rng.randbytes(rng.randrange(0, 20)))
        else:
            base = rng.choice(templates)
            ops = [
                (rng.randrange(8), rng.randrange(2**16), rng.randrange(2**16), rng.randbytes(rng.randrange(0, 8)))
                for _ in range(rng.randrange(1, 5))
            ]
            blobs.append(mutate(base, ops, templates))
    return blobs[:count]


def expected_calls(blob: bytes, max_body_len: int) -> List[Tuple[str, Any]]:
    """What a correct server hands the ``ping`` handler for this blob: (name, content) pairs, in order.

    The oracle is the pure protocol layer; the socket layer must add nothing to it.
    """
    parser = FrameParser(HEADER_LEN, max_body_len)
    calls: List[Tuple[str, Any]] = []
    name: Optional[str] = None
    connect_name: Optional[str] = None
    joined = False
    try:
        # Bodies before a bad header are handled; the error behind them only ends the connection.
        for body in parser.feed(blob):
            message = parse_client_body(body)
            if not joined:
                if not isinstance(message, Hello):
                    return calls
                joined = True
                name = connect_name = message.name
                continue
            if isinstance(message, Hello) or isinstance(message, UserClose):
                return calls
            if isinstance(message, ChangeName):
                name = message.name or connect_name
            elif isinstance(message, Command):
                content = typecast.decode(message.fmt, message.payload)
                if message.command == "ping":
                    calls.append((name, content))
    except PROTOCOL_ERRORS:
        pass
    return calls


class GoodClient(threading.Thread):
    """Plays ping/pong with the server until told to stop, recording any miss."""

    def __init__(self, addr: Tuple[str, int]):
        super().__init__(daemon=True)
        self.addr = addr
        self.sent: List[Any] = []
        self.pongs = 0
        self.misses: List[str] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.client: Optional[HiSockClient] = None
        self.port = 0

    def run(self) -> None:
        try:
            self.client = HiSockClient(self.addr, "good", "goodies")
            self.port = self.client.get_client_addr()[1]
        except Exception as exc:
            self.misses.append(f"connect: {exc!r}")
            self.ready.set()
            return
        self.ready.set()
        try:
            for index in range(1_000_000):  # bounded; stops long before
                if self.stop.is_set():
                    break
                content = ["good", index, b"\x01" * (index % 50)]
                try:
                    self.client.send("ping", content)
                    self.sent.append(content)
                    answer = self.client.recv("pong", timeout=5)
                except BaseException as exc:
                    self.misses.append(f"ping {index}: {exc!r}")
                    break
                if answer != content:
                    self.misses.append(f"ping {index}: answer {answer!r}")
                    break
                self.pongs += 1
        finally:
            self.client.close()


def send_blob(addr: Tuple[str, int], blob: bytes) -> Tuple[int, bool]:
    """Send one blob on a fresh connection, half-close, and read until the server closes.

    Returns our local port and whether the server closed within the timeout.
    """
    sock = socket.create_connection(addr, timeout=5)
    try:
        port = sock.getsockname()[1]
        try:
            sock.sendall(blob)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return port, True  # the server already hung up: fine
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not sock.recv(65536):
                    return port, True
            except (ConnectionResetError, BrokenPipeError):
                return port, True
            except socket.timeout:
                break
        return port, False
    finally:
        sock.close()


def test_make_blobs_is_deterministic_and_bounded():
    blobs = make_blobs(BLOB_COUNT, SEED)
    assert len(blobs) == BLOB_COUNT
    assert blobs == make_blobs(BLOB_COUNT, SEED)
    assert all(len(blob) < 1_000_000 for blob in blobs)


def test_server_survives_fuzzed_connections_while_a_good_client_plays_ping_pong(make_server, caplog):
    caplog.set_level(logging.WARNING, logger="hisock_gevent")
    max_body_len = 64 * 1024
    srv = make_server(max_message_size=max_body_len, handshake_timeout=2.0)
    calls: List[Tuple[Tuple[str, int], Optional[str], Any]] = []
    other_calls: List[Tuple[Any, ...]] = []
    lock = threading.Lock()

    @srv.on("ping")
    def ping(client: ClientInfo, content: Any) -> None:
        with lock:
            calls.append((client.ip, client.name, content))
        if client.name == "good" and isinstance(content, list) and content[:1] == ["good"]:
            srv.send_client(client, "pong", content)

    @srv.on("*")
    def anything(client: ClientInfo, command: str, content: Any) -> None:
        with lock:
            other_calls.append((client.ip, client.name, command, content))

    srv.start()
    good = GoodClient(srv.get_addr())
    good.start()
    assert good.ready.wait(10)
    blobs = make_blobs(BLOB_COUNT, SEED)
    ports: Dict[int, bytes] = {}
    not_closed: List[int] = []
    try:
        for index, blob in enumerate(blobs):
            port, closed = send_blob(srv.get_addr(), blob)
            ports[port] = blob
            if not closed:
                not_closed.append(index)
            assert not good.misses, good.misses
    finally:
        good.stop.set()
        good.join(15)
    assert not good.is_alive()
    assert not good.misses, good.misses
    assert good.pongs >= 1 and good.pongs == len(good.sent)
    # Every connection was closed by the server once we half-closed ours.
    assert not_closed == []
    # The server still serves, and only the good client is left.
    wait_until(lambda: srv.get_all_clients("name") == ["good"] or srv.get_all_clients() == [])
    after = HiSockClient(srv.get_addr(), "after")
    try:
        after.send("ping", "after")
        wait_until(lambda: any(name == "after" for _, name, _ in calls))
    finally:
        after.close()
    # Handlers saw the good client's pings exactly, in order, and from the fuzz connections
    # only what their well-formed frames said (a prefix: the connection may be cut early).
    good_port = good.port
    good_calls = [content for ip, _, content in calls if ip[1] == good_port]
    assert good_calls == good.sent
    by_port: Dict[int, List[Tuple[Optional[str], Any]]] = {}
    for ip, name, content in calls:
        if ip[1] == good_port or name == "after":
            continue
        by_port.setdefault(ip[1], []).append((name, content))
    for port, seen in by_port.items():
        assert port in ports, f"a handler call from an unknown connection {port}: {seen!r}"
        expected = expected_calls(ports[port], max_body_len)
        assert seen == expected[: len(seen)], (ports[port], seen, expected)
    for ip, name, command, content in other_calls:
        assert ip[1] in ports, f"'*' called for an unknown connection: {(ip, name, command, content)!r}"
    assert not [r for r in caplog.records if r.exc_info], "a fuzzed connection produced a logged traceback"


# ------------------------------------------------------------------ a misbehaving server against the client


class FakeServer:
    """A hand-made 'server' that answers the hello with chosen bodies (plain sockets)."""

    def __init__(self, answers: List[bytes], after_bind: Optional[List[bytes]] = None, raw_after: bytes = b"",
                 close_after: bool = False):
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(10)
        self.answers = answers
        self.after_bind = after_bind or []
        self.raw_after = raw_after
        self.close_after = close_after
        self.go = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def addr(self) -> Tuple[str, int]:
        return self.listener.getsockname()[:2]

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                conn.recv(65536)  # the hello
                conn.sendall(b"".join(frame(body) for body in self.answers))
                if self.after_bind or self.raw_after:
                    self.go.wait(10)
                    conn.sendall(b"".join(frame(body) for body in self.after_bind) + self.raw_after)
                if not self.close_after:
                    self.done.wait(10)
            except OSError:
                pass

    def close(self) -> None:
        self.go.set()
        self.done.set()
        self.thread.join(5)
        self.listener.close()


def good_info(name: str = "me") -> bytes:
    return json.dumps({"ip": ["127.0.0.1", 1], "name": name, "group": None, "ipstr": "127.0.0.1:1"}).encode()


@pytest.mark.parametrize(
    "answer",
    [b'$CLTCONN${"ip": "nonsense"}', b'$CLTCONN${"ip": 5}', b'$CLTCONN${"ip": ["h"]}', b'$CLTCONN${"ip": ["h", "port"]}'],
    ids=["ip-not-host-port", "ip-int", "ip-short-list", "port-not-int"],
)
def test_malformed_hello_answer_is_a_rejection_not_a_stray_exception(answer):
    fake = FakeServer([answer])
    client = None
    try:
        try:
            client = HiSockClient(fake.addr, "me", answer_timeout=5)
        except hisock_gevent.ConnectionRejected:
            return
        # Accepted the answer: then the first receive must not blow up with a non-HiSock error.
        with pytest.raises(ClientDisconnected):
            client.recv(timeout=3)
    finally:
        if client is not None:
            client.close()
        fake.close()


def test_malformed_peer_announcement_later_closes_the_client_cleanly(caplog):
    caplog.set_level(logging.DEBUG, logger="hisock_gevent")
    fake = FakeServer([b"$CLTCONN$" + good_info()], after_bind=[b'$CLTCONN${"ip": 5}'])
    client = HiSockClient(fake.addr, "me", answer_timeout=5)
    try:
        sync_seen: List[Any] = []
        client.on("client_connect")(lambda info: sync_seen.append(info))
        fake.go.set()
        with pytest.raises(ClientDisconnected):
            client.recv(timeout=5)
        assert [info.name for info in sync_seen] == ["me"]
        # The protocol layer said why, as for any other bad input from the server.
        assert any(r.levelno == logging.WARNING and "closing" in r.getMessage() for r in caplog.records)
    finally:
        client.close()
        fake.close()


@pytest.fixture
def hub_errors(monkeypatch: Any) -> List[Tuple[Any, type]]:
    """Exceptions that escape a greenlet on this thread's hub (gevent would only print them)."""
    errors: List[Tuple[Any, type]] = []
    hub = gevent.get_hub()
    original = hub.handle_error

    def handle_error(context: Any, kind: type, value: BaseException, tb: Any) -> None:
        errors.append((context, kind))
        original(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", handle_error)
    return errors


def server_streams(count: int, seed: int) -> List[bytes]:
    """Random and mutated byte streams a misbehaving server might send after the hello answer."""
    rng = random.Random(seed)
    info = good_info("other")
    templates = [
        frame(b"$CLTCONN$" + info),
        frame(b"$CLTDISCONN$" + info),
        frame(KeepAlive().to_body()),
        frame(_cmd("x", *typecast.encode([1, "a", b"b", 2.5], msgpack_ok=False))),
        frame(_cmd("x", *typecast.encode({"k": (None, True)}, msgpack_ok=True))),
        frame(Disconnect({"reason": "bye"}).to_body()),
    ]
    streams = [
        frame(b'$CLTCONN${"ip": 5}'),
        frame(b'$CLTDISCONN${"ip": ["h"]}'),
        frame(b'$CLTCONN${"ip": ["h", 1], "name": 7}'),
        frame(b"$CMD$x$MSG$" + b"9" * 8),
        frame(_cmd("x", b"m", b"\x91" * 50_000 + b"\xc0")),
        b"%-16d" % (10**15),
    ]
    while len(streams) < count:
        base = b"".join(rng.choice(templates) for _ in range(rng.randrange(1, 4)))
        ops = [(rng.randrange(8), rng.randrange(2**16), rng.randrange(2**16), rng.randbytes(rng.randrange(0, 6)))
               for _ in range(rng.randrange(1, 4))]
        streams.append(mutate(base, ops, templates))
    return streams[:count]


def test_client_fed_random_server_streams_ends_cleanly(hub_errors):
    """Whatever the server sends, the client hands out Sendable content, then ClientDisconnected
    once the server closes; no other exception reaches the caller or escapes a greenlet."""
    for index, stream in enumerate(server_streams(40, SEED)):
        fake = FakeServer([b"$CLTCONN$" + good_info()], raw_after=stream, close_after=True)
        try:
            client = HiSockClient(fake.addr, "me", answer_timeout=5, max_message_size=64 * 1024)
        except hisock_gevent.ConnectionRejected:
            fake.close()
            continue
        try:
            client.on("client_connect")(lambda info: None)
            client.on("client_disconnect")(lambda info: None)
            fake.go.set()
            for _ in range(20):  # bounded: a stream holds a handful of messages at most
                try:
                    assert_sendable(client.recv(timeout=5))
                except ClientDisconnected:
                    break
            else:
                pytest.fail(f"stream {index} {stream!r}: the client never saw the server close")
        finally:
            client.close()
            fake.close()
        assert not hub_errors, (index, stream, hub_errors)
