"""HiSock's helpers under HiSock's names: ClientInfo, MessageCacheMember, the address
functions, the input_* prompts, and the package's public names."""

from __future__ import annotations

import builtins
import ipaddress
from typing import Iterator, List

import pytest

import hisock_gevent
from hisock_gevent import utils
from hisock_gevent.utils import (
    ClientInfo,
    MessageCacheMember,
    get_local_ip,
    input_client_config,
    input_server_config,
    ipstr_to_tup,
    iptup_to_str,
    validate_ipv4,
)

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------- ClientInfo


def test_clientinfo_fields_and_ipstr():
    info = ClientInfo(("192.168.1.2", 5000), "alice", "red")
    assert info.ip == ("192.168.1.2", 5000)
    assert info.name == "alice"
    assert info.group == "red"
    assert info.ipstr == "192.168.1.2:5000"


def test_clientinfo_name_and_group_default_to_none():
    info = ClientInfo(("10.0.0.1", 1))
    assert info.name is None
    assert info.group is None
    assert info.ipstr == "10.0.0.1:1"


def test_clientinfo_getitem_reads_fields_like_a_dict():
    info = ClientInfo(("10.0.0.1", 80), "bob", "blue")
    assert info["ip"] == ("10.0.0.1", 80)
    assert info["name"] == "bob"
    assert info["group"] == "blue"
    assert info["ipstr"] == "10.0.0.1:80"
    with pytest.raises(KeyError):
        info["socket"]


def test_clientinfo_as_dict():
    info = ClientInfo(("10.0.0.1", 80), "bob", "blue")
    as_dict = info.as_dict()
    assert as_dict["ip"] == ("10.0.0.1", 80)
    assert as_dict["name"] == "bob"
    assert as_dict["group"] == "blue"
    assert as_dict["ipstr"] == "10.0.0.1:80"


@pytest.mark.parametrize(
    "ip",
    [("10.0.0.1", 80), ["10.0.0.1", 80], "10.0.0.1:80"],
    ids=["tuple", "list", "ip:port"],
)
def test_clientinfo_from_dict_accepts_every_ip_form(ip):
    info = ClientInfo.from_dict({"ip": ip, "name": "n", "group": "g"})
    assert info == ClientInfo(("10.0.0.1", 80), "n", "g")
    assert isinstance(info.ip, tuple)
    assert isinstance(info.ip[1], int)


def test_clientinfo_from_dict_without_name_and_group():
    assert ClientInfo.from_dict({"ip": "1.2.3.4:5"}) == ClientInfo(("1.2.3.4", 5))


def test_clientinfo_from_dict_round_trips_as_dict():
    info = ClientInfo(("10.9.8.7", 6543), "n", None)
    assert ClientInfo.from_dict(info.as_dict()) == info


def test_clientinfo_built_from_a_list_ip_keeps_the_tuple_form():
    info = ClientInfo(["10.0.0.1", 80])  # type: ignore[arg-type]
    assert info.ip == ("10.0.0.1", 80)
    assert info == ClientInfo(("10.0.0.1", 80))


def test_clientinfo_equality_and_hash():
    first = ClientInfo(("10.0.0.1", 80), "a", "g")
    same = ClientInfo(("10.0.0.1", 80), "a", "g")
    renamed = ClientInfo(("10.0.0.1", 80), "b", "g")
    moved = ClientInfo(("10.0.0.1", 81), "a", "g")
    assert first == same and hash(first) == hash(same)
    assert first != renamed
    assert first != moved
    assert {first: 1}[same] == 1
    assert len({first, same, renamed, moved}) == 3


def test_clientinfo_copy_is_equal_but_separate():
    info = ClientInfo(("10.0.0.1", 80), "a", "g")
    copied = info.copy()
    assert copied == info
    assert copied is not info
    assert copied.ipstr == info.ipstr


def test_clientinfo_str_mentions_address_name_and_group():
    text = str(ClientInfo(("10.0.0.1", 80), "alice", "red"))
    assert "10.0.0.1:80" in text and "alice" in text and "red" in text


def test_clientinfo_prints_hisocks_form():
    assert str(ClientInfo(("10.0.0.1", 80), "alice", "red")) == "<ClientInfo: IP: 10.0.0.1:80, Name: alice, Group: red>"
    assert str(ClientInfo(("10.0.0.1", 80))) == "<ClientInfo: IP: 10.0.0.1:80, Name: None, Group: None>"


def test_clientinfo_repr_is_its_str_so_containers_print_it_the_same_way():
    info = ClientInfo(("10.0.0.1", 80), "alice", "red")
    assert repr(info) == str(info)
    assert str([info]) == f"[{info}]"
    assert str({"who": info}) == f"{{'who': {info}}}"
    assert f"{info!r}" == f"{info}"


# ---------------------------------------------------------------- MessageCacheMember


def test_message_cache_member_from_a_dict():
    member = MessageCacheMember({"header": 12, "content": "hi", "called": True, "command": "greet"})
    assert member.header == 12
    assert member.content == "hi"
    assert member.called is True
    assert member.command == "greet"


def test_message_cache_member_from_keywords_and_equality():
    member = MessageCacheMember(header=5, content=[1], called=False, command="c")
    assert member == MessageCacheMember({"header": 5, "content": [1], "called": False, "command": "c"})
    assert member != MessageCacheMember(header=5, content=[2], called=False, command="c")
    assert "c" in repr(member)


# ---------------------------------------------------------------- address helpers


@pytest.mark.parametrize(
    "text, expected",
    [("127.0.0.1:5000", ("127.0.0.1", 5000)), ("192.168.10.200:1", ("192.168.10.200", 1))],
)
def test_ipstr_to_tup(text, expected):
    result = ipstr_to_tup(text)
    assert result == expected
    assert isinstance(result, tuple) and isinstance(result[1], int)


@pytest.mark.parametrize("bad", ["127.0.0.1", "127.0.0.1:", ":5000", "127.0.0.1:port", ""])
def test_ipstr_to_tup_raises_value_error(bad):
    with pytest.raises(ValueError):
        ipstr_to_tup(bad)


def test_iptup_to_str_and_back():
    assert iptup_to_str(("10.0.0.1", 80)) == "10.0.0.1:80"
    assert ipstr_to_tup(iptup_to_str(("10.0.0.1", 80))) == ("10.0.0.1", 80)


@pytest.mark.parametrize(
    "ip, kwargs",
    [
        ("192.168.1.1:8080", {}),
        ("0.0.0.0:0", {}),
        ("255.255.255.255:65535", {}),
        (("127.0.0.1", 80), {}),
        ("10.0.0.1", {"require_port": False}),
        (":8080", {"require_ip": False}),
    ],
    ids=repr,
)
def test_validate_ipv4_accepts_valid_addresses(ip, kwargs):
    assert validate_ipv4(ip, **kwargs) is True


@pytest.mark.parametrize(
    "ip, kwargs",
    [
        ("256.1.1.1:80", {}),
        ("1.2.3:80", {}),
        ("1.2.3.4:99999", {}),
        ("1.2.3.4:-1", {}),
        ("1.2.3.4:port", {}),
        ("1.2.3.4", {}),
        (":80", {}),
        ("abc:80", {}),
        (("1.2.3.4", 70000), {}),
        (("1.2.3.4",), {}),
        ("not-an-ip", {"require_port": False}),
        (":http", {"require_ip": False}),
    ],
    ids=repr,
)
def test_validate_ipv4_raises_value_error_for_invalid_addresses(ip, kwargs):
    with pytest.raises(ValueError):
        validate_ipv4(ip, **kwargs)


def test_get_local_ip_returns_a_dotted_quad():
    ip = get_local_ip()
    assert isinstance(ip, str)
    assert len(ip.split(".")) == 4
    ipaddress.IPv4Address(ip)  # raises if not an IPv4 address


# ---------------------------------------------------------------- input_* prompts


@pytest.fixture
def answers(monkeypatch):
    """Feed ``input()`` from a list; the prompts it was given are recorded."""
    prompts: List[str] = []

    def install(*replies: str) -> List[str]:
        feed: Iterator[str] = iter(replies)

        def fake_input(prompt: str = "") -> str:
            prompts.append(prompt)
            try:
                return next(feed)
            except StopIteration:
                raise AssertionError(f"input() asked once too often: {prompt!r}") from None

        monkeypatch.setattr(builtins, "input", fake_input)
        return prompts

    return install


def test_input_server_config_returns_ip_and_int_port(answers):
    prompts = answers("127.0.0.1", "5000")
    assert input_server_config() == ("127.0.0.1", 5000)
    assert len(prompts) == 2


def test_input_server_config_reprompts_after_invalid_answers(answers):
    prompts = answers("999.1.1.1", "", "localhost", "10.0.0.2", "port", "70000", "0", "8080")
    assert input_server_config("IP? ", "Port? ") == ("10.0.0.2", 8080)
    assert len(prompts) == 8
    assert all("IP? " in prompt for prompt in prompts[:4])
    assert all("Port? " in prompt for prompt in prompts[4:])


def test_input_client_config_returns_address_name_and_group(answers):
    answers("127.0.0.1", "6000", "alice", "red")
    assert input_client_config() == ("127.0.0.1", 6000, "alice", "red")


def test_input_client_config_skips_prompts_that_are_none(answers):
    answers("127.0.0.1", "6000", "red")
    assert input_client_config(name_prompt=None) == ("127.0.0.1", 6000, "red")
    answers("127.0.0.1", "6000")
    assert input_client_config(name_prompt=None, group_prompt=None) == ("127.0.0.1", 6000)


def test_input_client_config_reprompts_for_an_empty_name_or_group(answers):
    prompts = answers("bad", "127.0.0.1", "x", "6000", "", "alice", "", "red")
    assert input_client_config("IP? ", "Port? ", "Name? ", "Group? ") == ("127.0.0.1", 6000, "alice", "red")
    assert len(prompts) == 8
    assert sum("Name? " in prompt for prompt in prompts) == 2
    assert sum("Group? " in prompt for prompt in prompts) == 2


# ---------------------------------------------------------------- public names

PACKAGE_NAMES = [
    "HiSockServer",
    "ThreadedHiSockServer",
    "start_server",
    "start_threaded_server",
    "HiSockClient",
    "ThreadedHiSockClient",
    "connect",
    "threaded_connect",
    "ClientInfo",
    "MessageCacheMember",
    "Sendable",
    "__version__",
    "get_local_ip",
    "input_client_config",
    "input_server_config",
    "ipstr_to_tup",
    "iptup_to_str",
    "server",
    "client",
    "utils",
]
EXCEPTION_NAMES = [
    "ClientException",
    "ServerException",
    "ClientNotFound",
    "GroupNotFound",
    "FunctionNotFoundException",
    "InvalidTypeCast",
    "ServerNotRunning",
    "ClientDisconnected",
    "NoMessageException",
]
WARNING_NAMES = ["NoHeaderWarning", "FunctionNotFoundWarning"]


@pytest.mark.parametrize("name", PACKAGE_NAMES + EXCEPTION_NAMES + WARNING_NAMES)
def test_package_exports_every_hisock_name(name):
    assert hasattr(hisock_gevent, name)
    assert name in hisock_gevent.__all__


@pytest.mark.parametrize("name", EXCEPTION_NAMES)
def test_hisock_exceptions_are_exceptions(name):
    cls = getattr(hisock_gevent, name)
    assert isinstance(cls, type) and issubclass(cls, Exception)
    assert not issubclass(cls, Warning)


@pytest.mark.parametrize("name", WARNING_NAMES)
def test_hisock_warnings_are_warnings(name):
    cls = getattr(hisock_gevent, name)
    assert isinstance(cls, type) and issubclass(cls, Warning)


def test_group_not_found_is_also_a_type_error():
    # HiSock documents send_group as raising TypeError for a missing group.
    assert issubclass(hisock_gevent.GroupNotFound, TypeError)


def test_version_is_a_3_x_string():
    assert isinstance(hisock_gevent.__version__, str)
    assert hisock_gevent.__version__.split(".")[0] == "3"


def test_sendable_is_a_type_hint_covering_the_documented_types():
    text = repr(hisock_gevent.Sendable)
    for part in ("bytes", "str", "int", "float", "NoneType", "ClientInfo", "List", "Dict"):
        assert part in text, f"{part} missing from Sendable: {text}"


@pytest.mark.parametrize(
    "module, names",
    [
        ("server", ["HiSockServer", "ThreadedHiSockServer", "start_server", "start_threaded_server"]),
        ("client", ["HiSockClient", "ThreadedHiSockClient", "connect", "threaded_connect"]),
        (
            "utils",
            [
                "ClientInfo",
                "MessageCacheMember",
                "Sendable",
                "Client",
                "ipstr_to_tup",
                "iptup_to_str",
                "validate_ipv4",
                "get_local_ip",
                "input_server_config",
                "input_client_config",
            ],
        ),
    ],
)
def test_submodules_have_hisocks_names(module, names):
    mod = getattr(hisock_gevent, module)
    for name in names:
        assert hasattr(mod, name), f"hisock_gevent.{module}.{name} is missing"
        assert getattr(mod, name) is getattr(hisock_gevent, name, getattr(mod, name))


def test_utils_module_has_hisocks_exceptions():
    """HiSock 3 defines its exceptions in hisock.utils (``from hisock.utils import ClientNotFound``)."""
    missing = [name for name in EXCEPTION_NAMES + WARNING_NAMES if getattr(utils, name, None) is not getattr(hisock_gevent, name)]
    assert missing == [], f"hisock_gevent.utils lacks {missing}"


def test_submodule_classes_are_the_package_classes():
    assert hisock_gevent.server.HiSockServer is hisock_gevent.HiSockServer
    assert hisock_gevent.client.HiSockClient is hisock_gevent.HiSockClient
    assert hisock_gevent.utils.ClientInfo is hisock_gevent.ClientInfo
