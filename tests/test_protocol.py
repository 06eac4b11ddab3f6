"""The opening handshake (hisock_gevent.protocol), with bytes and messages only: no sockets."""

from __future__ import annotations

import json

import pytest

from hisock_gevent.errors import (
    AuthenticationFailed,
    ConnectionRejected,
    HandshakeError,
    MalformedMessage,
)
from hisock_gevent.frames import frame
from hisock_gevent.messages import Command, Hello, KeepAlive, PeerJoined
from hisock_gevent.protocol import MAX_EARLY_MESSAGES, ClientHandshake, ServerHandshake

pytestmark = pytest.mark.timeout(30)


def conn_frame(info: dict) -> bytes:
    return frame(b"$CLTCONN$" + json.dumps(info).encode())


ME = {"ip": ["127.0.0.1", 5000], "name": "me", "group": None}


# ---------------------------------------------------------------- server side


def test_server_takes_a_hello_and_refuses_anything_else_first():
    shake = ServerHandshake(max_name_length=256)
    hello = shake.receive_hello(b'$CLTHELLO${"name": "a", "group": "g", "caps": ["msgpack"]}')
    assert (hello.name, hello.group, hello.capabilities) == ("a", "g", ("msgpack",))
    assert shake.refusal(hello) is None
    assert ServerHandshake.tells_reasons(hello)
    with pytest.raises(HandshakeError, match="not a hello"):
        shake.receive_hello(b"$USRCLOSE$")
    with pytest.raises(MalformedMessage):
        shake.receive_hello(b"junk")


@pytest.mark.parametrize(
    "name, group, problem",
    [
        ("n" * 11, None, "name is 11 characters long, more than the 10 allowed"),
        (None, "g" * 11, "group is 11 characters long"),
        ("\ud800", None, "name is not valid text"),
    ],
)
def test_server_refuses_names_too_long_or_not_text(name, group, problem):
    refusal = ServerHandshake(max_name_length=10).refusal(Hello(name, group))
    assert refusal is not None and problem in refusal.text and refusal.reason == "invalid_name"


def test_a_plain_hisock_hello_is_not_told_reasons():
    assert not ServerHandshake.tells_reasons(Hello("a", None))


# ---------------------------------------------------------------- client side


def test_client_hello_offers_its_capabilities_and_credentials():
    shake = ClientHandshake("me", "g", auth={"token": "t"})
    body = shake.hello_body()
    assert body.startswith(b"$CLTHELLO$")
    assert json.loads(body[len(b"$CLTHELLO$") :]) == {
        "name": "me", "group": "g", "caps": ["msgpack"], "auth": {"token": "t"}, "max_message_size": 16 * 1024 * 1024,
    }
    plain = json.loads(ClientHandshake("me", None, offer=()).hello_body()[len(b"$CLTHELLO$") :])
    assert plain == {"name": "me", "group": None}


def test_client_answer_is_its_own_join_with_the_accepted_capabilities():
    shake = ClientHandshake("me", None)
    assert shake.receive_data(frame(b"$KEEPALIVE$")) is None
    answer = shake.receive_data(conn_frame(dict(ME, caps=["msgpack", "something-new"])) + frame(b"$KEEPALIVE$"))
    assert answer is not None and answer.caps == ("msgpack",) and answer.accepts("msgpack")
    assert [type(message) for message in answer.early] == [KeepAlive, PeerJoined, KeepAlive]


def test_client_answer_from_a_plain_hisock_server_has_no_capabilities():
    answer = ClientHandshake("me", None).receive_data(conn_frame(ME))
    assert answer is not None and answer.caps == () and not answer.accepts("msgpack")


def test_client_answer_split_anywhere_is_the_same():
    data = frame(b"$KEEPALIVE$") + conn_frame(dict(ME, caps=["msgpack"]))
    for cut in range(len(data)):
        shake = ClientHandshake("me", None)
        assert shake.receive_data(data[:cut]) is None or cut == len(data)
        answer = shake.receive_data(data[cut:])
        assert answer is not None and answer.caps == ("msgpack",)


def test_client_refused_with_and_without_a_reason():
    with pytest.raises(ConnectionRejected, match=r"\(\$DISCONN\$\)$"):
        ClientHandshake("me", None).receive_data(frame(b"$DISCONN$"))
    with pytest.raises(ConnectionRejected, match="server full"):
        ClientHandshake("me", None).receive_data(frame(b'$DISCONN${"reason": "server full"}'))
    with pytest.raises(AuthenticationFailed):
        ClientHandshake("me", None).receive_data(frame(b'$DISCONN${"reason": "authentication failed"}'))


def test_client_refuses_a_server_that_breaks_the_protocol_before_answering():
    with pytest.raises(ConnectionRejected, match="broke the protocol"):
        ClientHandshake("me", None).receive_data(b"not a header....")


def test_client_bounds_what_it_keeps_before_the_answer():
    shake = ClientHandshake("me", None)
    with pytest.raises(ConnectionRejected, match="before answering our hello"):
        shake.receive_data(frame(b"$KEEPALIVE$") * (MAX_EARLY_MESSAGES + 1))
    big = ClientHandshake("me", None)
    body = Command("x", b"%db" % 600_000, b"x" * 600_000).to_body()
    with pytest.raises(ConnectionRejected, match="before answering our hello"):
        big.receive_data(frame(body) * 2)
