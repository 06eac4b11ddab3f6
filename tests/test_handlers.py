"""HandlerTable (hisock_gevent.handlers): what ``on()`` accepts, and what it says when it refuses.

Pure tests: a table and plain functions, no sockets and no hub.
"""

from __future__ import annotations

import re

import pytest

from hisock_gevent.handlers import (
    CLIENT_RESERVED,
    CLIENT_UNRESERVED_ARGS,
    SERVER_RESERVED,
    SERVER_UNRESERVED_ARGS,
    HandlerTable,
)

pytestmark = pytest.mark.timeout(10)


def server_table() -> HandlerTable:
    return HandlerTable(SERVER_RESERVED, SERVER_UNRESERVED_ARGS)


def client_table() -> HandlerTable:
    return HandlerTable(CLIENT_RESERVED, CLIENT_UNRESERVED_ARGS)


def refusal(table: HandlerTable, command: str, func) -> str:
    with pytest.raises(TypeError) as refused:
        table.register(command, func, threaded=False, override=False)
    assert command not in table.funcs
    return str(refused.value)


def three(a, b, c):
    pass


def nothing():
    pass


@pytest.mark.parametrize(
    ("make_table", "command", "func", "expected"),
    [
        (server_table, "custom", three, "must take 0, 1 or 2 positional arguments"),
        (server_table, "message", nothing, "must take 2 or 3 positional arguments"),
        (server_table, "join", nothing, "must take 1 positional argument"),
        (server_table, "name_change", nothing, "must take 3 positional arguments"),
        (client_table, "custom", three, "must take 0 or 1 positional arguments"),
        (client_table, "force_disconnect", three, "must take 0 positional arguments"),
    ],
    ids=["server-command", "server-message", "server-join", "server-name_change", "client-command", "client-force_disconnect"],
)
def test_a_handler_with_the_wrong_arity_is_refused_with_the_counts_in_words(make_table, command, func, expected):
    message = refusal(make_table(), command, func)
    assert message.endswith(expected), message
    assert "(s)" not in message


def test_the_refusal_names_the_handler_and_what_it_was_for():
    assert re.fullmatch(
        r"handler 'three' for command 'custom' must take .*", refusal(server_table(), "custom", three)
    )
    assert re.fullmatch(
        r"handler 'nothing' for reserved event 'join' must take .*", refusal(server_table(), "join", nothing)
    )


def test_a_handler_that_fits_is_registered_with_the_most_arguments_it_takes():
    table = server_table()

    def optional(client, content=None):
        pass

    table.register("custom", optional, threaded=False, override=False)
    assert table.command_handler("custom")["num_args"] == 2
