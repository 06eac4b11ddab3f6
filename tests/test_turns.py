"""Turns: a reader leaves the loop after FRAMES_PER_TURN frames only when it held the loop.

A flooder (its bytes are always there, so ``recv`` never waits) must be made to yield,
every turn; a client that is merely busy, waiting for its answers between bursts, let
the loop go round on its own and must not pay for a timer, an extra loop pass and its
socket taken out of epoll and put back.
"""

from __future__ import annotations

from typing import Any, List

import pytest
from rawpeer import cmd_body, install_echo, wire_frame

from hisock_gevent import connection
from hisock_gevent.connection import FRAMES_PER_TURN, end_turn, loop_pass

pytestmark = pytest.mark.timeout(30)


class CountingLoop:
    """A loop that says how many passes it made (as libev does)."""

    def __init__(self, passes: int) -> None:
        self.iteration = passes


class PlainLoop:
    """A loop that keeps no count (as gevent's libuv loop)."""


@pytest.fixture
def yields(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Every yield_to_loop() made through end_turn, counted instead of done."""
    made: List[int] = []
    monkeypatch.setattr(connection, "yield_to_loop", lambda: made.append(1))
    return made


def test_a_turn_in_which_the_loop_went_round_ends_without_yielding(yields: List[int]) -> None:
    assert end_turn(CountingLoop(8), began=7) == 8
    assert yields == []


def test_a_turn_that_held_the_loop_ends_with_a_yield(yields: List[int]) -> None:
    end_turn(CountingLoop(7), began=7)
    assert yields == [1]


def test_a_loop_that_keeps_no_count_is_always_yielded_to(yields: List[int]) -> None:
    assert loop_pass(PlainLoop()) is None
    end_turn(PlainLoop(), began=None)
    end_turn(PlainLoop(), began=None)
    assert yields == [1, 1]


def echo_frame(text: str) -> bytes:
    data = text.encode()
    return wire_frame(cmd_body("echo", b"%ds" % len(data), data))


def test_a_client_waiting_between_bursts_never_makes_the_server_yield(server: Any, raw: Any, yields: List[int], figure: Any) -> None:
    """40 bursts of 50 frames (31 turns' worth in all), each answered before the next is
    sent: the server waited for every burst, so no turn held the loop."""
    install_echo(server)
    peer = raw(server, "busy")
    peer.read_frame()  # our own $CLTCONN$
    burst = 50
    for round_ in range(40):
        peer.send_raw(b"".join(echo_frame(f"{round_}.{i}") for i in range(burst)))
        for i in range(burst):
            assert peer.read_command() == ("echo", f"{round_}.{i}")
    figure("yields for 40 answered bursts of 50 frames", str(len(yields)))
    assert yields == []


def test_a_flooder_is_still_made_to_yield(server: Any, raw: Any, yields: List[int], figure: Any) -> None:
    """20,000 frames sent without waiting for answers (more than the server reads in one
    pass): the server breaks off to let the loop go round at least every two turns."""
    install_echo(server)
    peer = raw(server, "flood")
    peer.read_frame()
    frames = 20_000
    peer.send_raw(b"".join(echo_frame(str(i)) for i in range(frames)))
    for i in range(frames):
        assert peer.read_command() == ("echo", str(i))
    figure("yields for 20,000 frames sent at once", str(len(yields)))
    assert len(yields) >= frames // (2 * FRAMES_PER_TURN)
