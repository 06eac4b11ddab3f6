"""What a typed line means (hisock_gevent.lines): strings in, actions out, no sockets."""

from __future__ import annotations

import pytest

from hisock_gevent.lines import (
    LOCAL_COMMANDS,
    LineError,
    Local,
    Send,
    describe_type,
    format_content,
    help_text,
    parse_line,
    parse_payload,
    visible,
)


@pytest.mark.parametrize("typed", ["42", "3.5", "true", "null", '"quoted"', "hello world", "-1"])
def test_text_mode_sends_scalars_as_the_text_typed(typed):
    assert parse_payload(typed) == typed


@pytest.mark.parametrize(
    "typed, content",
    [('{"to": "bob", "text": "hi"}', {"to": "bob", "text": "hi"}), ("[1, 2, 3]", [1, 2, 3]), ("{}", {})],
)
def test_text_mode_sends_a_json_object_or_array_as_a_dict_or_list(typed, content):
    assert parse_payload(typed) == content


@pytest.mark.parametrize("typed", ["[afk] back soon", "{not json", "[1, 2"])
def test_text_mode_sends_brackets_that_are_not_json_as_text(typed):
    assert parse_payload(typed) == typed


@pytest.mark.parametrize(
    "typed, content",
    [("42", 42), ("3.5", 3.5), ('"42"', "42"), ("true", True), ("null", None), ("[1]", [1]), ('{"a": 1}', {"a": 1})],
)
def test_json_mode_sends_the_value_the_json_spells(typed, content):
    value = parse_payload(typed, json_mode=True)

    assert value == content and type(value) is type(content)


def test_json_mode_refuses_a_payload_that_is_not_json():
    with pytest.raises(LineError, match="not JSON"):
        parse_payload("hello", json_mode=True)


@pytest.mark.parametrize("typed", [None, "", "   "])
def test_no_payload_is_none_in_both_modes(typed):
    assert parse_payload(typed) is None
    assert parse_payload(typed, json_mode=True) is None


def test_a_line_is_a_command_and_the_payload_after_the_first_spaces():
    assert parse_line("  say   hello   there  ") == Send("say", "hello   there")
    assert parse_line("who") == Send("who", None)
    assert parse_line("say 42") == Send("say", "42")
    assert parse_line("say 42", json_mode=True) == Send("say", 42)


def test_a_blank_line_does_nothing():
    assert parse_line("   ") is None


@pytest.mark.parametrize(
    "typed, action",
    [
        ("/help", Local("help", "")),
        ("/name bob", Local("name", "bob")),
        ("/name", Local("name", "")),
        ("/group  room 2 ", Local("group", "room 2")),
        ("/json", Local("json", "")),
        ("/quit", Local("quit", "")),
    ],
)
def test_slash_lines_are_local_commands(typed, action):
    assert parse_line(typed) == action


def test_a_double_slash_sends_a_command_starting_with_a_slash():
    assert parse_line("//me waves") == Send("/me", "waves")


def test_an_unknown_local_command_is_refused_not_sent():
    with pytest.raises(LineError, match="/help"):
        parse_line("/frobnicate now")


def test_help_lists_every_local_command_and_the_payload_rule():
    text = help_text(json_mode=False)

    for name in LOCAL_COMMANDS:
        assert f"/{name}" in text
    assert 'sends the text "42"' in text
    assert "JSON mode is off" in text
    assert "JSON mode is on" in help_text(json_mode=True)


@pytest.mark.parametrize(
    "content, description",
    [("x", "text"), ({"a": 1}, "a JSON object (dict)"), ([1], "a JSON array (list)"), (42, "an int"),
     (True, "a bool"), (None, "no content"), (b"x", "a bytes")],
)
def test_describe_type_names_what_was_sent(content, description):
    assert describe_type(content) == description


def test_control_characters_from_a_peer_are_shown_escaped():
    assert visible("evil\x1b[2Jname") == "evil\\x1b[2Jname"
    assert visible("plain élan") == "plain élan"
    assert "\x1b" not in format_content({"text": "\x1b[31mred"})
