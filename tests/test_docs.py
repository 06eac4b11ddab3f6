"""What ``help()`` shows: every option of the server and the client is documented where a
user looks for it (the class, and ``connect()`` for the client's keyword arguments)."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc

import pytest

import hisock_gevent
from hisock_gevent.config import ServerConfig


def rendered(obj: object) -> str:
    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


@pytest.mark.parametrize("option", [field.name for field in dataclasses.fields(ServerConfig)])
def test_help_of_the_server_documents_every_option(option):
    assert f":param {option}:" in rendered(hisock_gevent.HiSockServer), option


def _client_keywords() -> list:
    signature = inspect.signature(hisock_gevent.HiSockClient.__init__)
    return [name for name, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY]


@pytest.mark.parametrize("keyword", _client_keywords())
def test_every_client_keyword_is_documented_in_the_class_and_named_by_connect(keyword):
    assert f":param {keyword}:" in rendered(hisock_gevent.HiSockClient), keyword
    assert f"``{keyword}``" in (hisock_gevent.connect.__doc__ or ""), keyword
