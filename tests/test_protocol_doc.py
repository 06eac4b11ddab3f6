"""PROTOCOL.md against the library: its byte examples are what hisock_gevent builds and
parses, and every "PROTOCOL.md section N" cited in the repository exists."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Tuple

import pytest
from rawpeer import as_single, wire_frame

from hisock_gevent.frames import DEFAULT_HEADER_LEN, frame, parse_header
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
    parse_client_body,
    parse_server_body,
)
from hisock_gevent.outgoing import OutgoingCommand
from hisock_gevent.typecast import decode, encode
from hisock_gevent.utils import ClientInfo

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "PROTOCOL.md"

if not PROTOCOL.exists():  # pragma: no cover - an installed copy without the repository
    pytest.skip("PROTOCOL.md is a repository document; run from a checkout", allow_module_level=True)

TEXT = PROTOCOL.read_text(encoding="utf-8")


# ------------------------------------------------------------------ reading the document


def section_numbers(text: str) -> Dict[str, str]:
    """``"3"`` / ``"3.4"`` -> heading title, from ``## 3. Title`` and ``### 3.4 Title``."""
    found: Dict[str, str] = {}
    for number, title in re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.+)$", text, re.MULTILINE):
        found[number] = title
    return found


SECTIONS = section_numbers(TEXT)


def python_blocks(text: str) -> List[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def frame_examples(text: str) -> Dict[str, bytes]:
    """``# example: tag`` blocks -> the bytes literal that follows the tag line."""
    examples: Dict[str, bytes] = {}
    for block in python_blocks(text):
        first, _, rest = block.partition("\n")
        match = re.fullmatch(r"# example: (\S+)", first)
        if match is None:
            continue
        tag = match.group(1)
        assert tag not in examples, f"example {tag!r} appears twice"
        value = ast.literal_eval(rest.strip())
        assert type(value) is bytes, f"example {tag!r} is not a bytes literal"
        examples[tag] = value
    return examples


def codec_lines(text: str) -> List[str]:
    blocks = [block for block in python_blocks(text) if block.startswith("# codec examples\n")]
    assert len(blocks) == 1, "PROTOCOL.md has one codec examples block"
    return [line for line in blocks[0].splitlines()[1:] if line.strip()]


# ------------------------------------------------------------------ the numbering code and tests cite


def test_the_sections_cited_by_number_keep_their_subjects():
    assert "Frames" in SECTIONS["1"]
    assert "messages" in SECTIONS["2"]
    assert "codec" in SECTIONS["3"]


def test_top_level_sections_are_numbered_one_after_another():
    top = [int(number) for number in SECTIONS if "." not in number]
    assert top == list(range(1, len(top) + 1))
    for number in SECTIONS:
        if "." in number:
            assert number.split(".")[0] in SECTIONS, f"section {number} has no parent section"


#: "PROTOCOL.md section 3", "`PROTOCOL.md` sections 1 and 2", "[PROTOCOL.md](PROTOCOL.md) section 3.4".
CITATION = re.compile(
    r"PROTOCOL\.md(?:`|\]\([^)]*\))?,?\s+sections?\s+"
    r"(\d+(?:\.\d+)?(?:(?:,\s*|\s+and\s+|\s+or\s+|\s+to\s+)\d+(?:\.\d+)?)*)"
)
SKIP_DIRS = {".git", ".venv", ".ci-venv", "node_modules", "__pycache__", "build", "dist", "results"}


def repository_texts() -> List[Tuple[Path, str]]:
    texts = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith((".py", ".md", ".toml", ".txt", ".html", ".cfg")):
                path = Path(directory) / name
                texts.append((path, path.read_text(encoding="utf-8", errors="replace")))
    return texts


def cited_numbers(text: str) -> List[str]:
    return [
        number
        for match in CITATION.finditer(text)
        for number in re.findall(r"\d+(?:\.\d+)?", match.group(1))
    ]


def test_citation_pattern_reads_the_forms_used():
    assert cited_numbers("as PROTOCOL.md section 3 says") == ["3"]
    assert cited_numbers("(PROTOCOL.md sections 1 and 2, and") == ["1", "2"]
    assert cited_numbers("see `PROTOCOL.md`, section 3.2") == ["3.2"]
    assert cited_numbers("[PROTOCOL.md](PROTOCOL.md) section\n7.1") == ["7.1"]


def test_every_protocol_md_section_cited_in_the_repository_exists():
    citations = []
    for path, text in repository_texts():
        for number in cited_numbers(text):
            citations.append((path.relative_to(ROOT), number))
    assert citations, "nothing cites PROTOCOL.md by section: the pattern is broken"
    # The files that cite sections by number today must still be found.
    cited_in = {str(path) for path, _ in citations}
    assert {"hisock_gevent/typecast.py", "tests/test_frames.py", "tests/test_messages.py"} <= cited_in
    missing = [(str(path), number) for path, number in citations if number not in SECTIONS]
    assert missing == []


def test_every_section_the_document_refers_to_exists():
    references = re.findall(r"\bsections? (\d+(?:\.\d+)?)(?: (?:to|and) (\d+(?:\.\d+)?))?", TEXT)
    numbers = {number for pair in references for number in pair if number}
    assert numbers, "the document refers to no section: the pattern is broken"
    assert sorted(numbers - set(SECTIONS)) == []


# ------------------------------------------------------------------ the codec examples of section 3


CODEC_LINES = codec_lines(TEXT)


@pytest.mark.parametrize("line", CODEC_LINES)
def test_codec_example_is_what_encode_returns_and_decode_reverses(line):
    # Each line reads: encode(VALUE[, msgpack_ok=BOOL]) == (FMT, PAYLOAD)
    tree = ast.parse(line, mode="eval").body
    assert isinstance(tree, ast.Compare) and isinstance(tree.ops[0], ast.Eq), line
    call = tree.left
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "encode", line
    (value,) = [ast.literal_eval(arg) for arg in call.args]
    options = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    fmt, payload = ast.literal_eval(tree.comparators[0])

    assert encode(value, **options) == (fmt, payload)
    extended = options.get("msgpack_ok", False)
    assert decode(fmt, payload) == (value if extended else as_single(value))


# ------------------------------------------------------------------ the frame examples of section 8


ALICE = ClientInfo(("127.0.0.1", 50000), "alice", "lobby")
BOB = ClientInfo(("127.0.0.1", 50002), "bob", None)
CLIENT, SERVER, BOTH = "client -> server", "server -> client", "either way"


class Example(NamedTuple):
    built: bytes  # the frame as the library builds it
    direction: str
    meaning: Any  # the parsed message, or (command, content) for a command message


def reserved(message: Any) -> bytes:
    return frame(message.to_body())


def command(name: str, content: Any, extended: bool, reserved_ok: bool = False) -> bytes:
    return OutgoingCommand(name, content, DEFAULT_HEADER_LEN, reserved_ok).frame_for(extended)


BOB_PLAIN_ANSWER = {"ip": ["127.0.0.1", 50002], "name": "bob"}
BOB_ANSWER = {"ip": ["127.0.0.1", 50002], "name": "bob", "group": None}
NOEXIST = {"traceback": "$NOEXIST$"}
DICT_CONTENT = {"text": "hi", "to": ["bob"], "urgent": True}

EXAMPLES: Dict[str, Example] = {
    "hello-plain": Example(reserved(Hello("bob", None)), CLIENT, Hello("bob", None)),
    "hello-extended": Example(
        reserved(Hello("alice", "lobby", {"caps": ["msgpack"], "auth": "s3cret"})),
        CLIENT,
        Hello("alice", "lobby", {"caps": ["msgpack"], "auth": "s3cret"}),
    ),
    "usrclose": Example(reserved(UserClose()), CLIENT, UserClose()),
    "chname": Example(reserved(ChangeName("carol")), CLIENT, ChangeName("carol")),
    "chname-reset": Example(reserved(ChangeName("")), CLIENT, ChangeName("")),
    "chgroup": Example(reserved(ChangeGroup("red")), CLIENT, ChangeGroup("red")),
    "keepack": Example(reserved(KeepAck()), CLIENT, KeepAck()),
    "getclt-name": Example(reserved(GetClient("alice")), CLIENT, GetClient("alice")),
    "getclt-address": Example(reserved(GetClient("127.0.0.1:50000")), CLIENT, GetClient("127.0.0.1:50000")),
    # The server builds its announcements and answers exactly like this (server.py _join).
    "cltconn-plain": Example(reserved(PeerJoined(BOB.as_dict())), SERVER, PeerJoined(json.loads(json.dumps(BOB.as_dict())))),
    "cltconn-extended-answer": Example(
        reserved(PeerJoined(dict(ALICE.as_dict(), caps=["msgpack"], max_message_size=16 * 1024 * 1024))),
        SERVER,
        PeerJoined(json.loads(json.dumps(dict(ALICE.as_dict(), caps=["msgpack"], max_message_size=16 * 1024 * 1024)))),
    ),
    "cltdisconn": Example(reserved(PeerLeft(BOB.as_dict())), SERVER, PeerLeft(json.loads(json.dumps(BOB.as_dict())))),
    "disconn": Example(reserved(Disconnect()), SERVER, Disconnect()),
    "disconn-reason": Example(
        reserved(Disconnect({"reason": "authentication failed"})), SERVER, Disconnect({"reason": "authentication failed"})
    ),
    "keepalive": Example(reserved(KeepAlive()), SERVER, KeepAlive()),
    "getclt-answer-plain": Example(command("$GETCLT$", BOB_PLAIN_ANSWER, False, True), SERVER, ("$GETCLT$", BOB_PLAIN_ANSWER)),
    "getclt-answer-extended": Example(command("$GETCLT$", BOB_ANSWER, True, True), SERVER, ("$GETCLT$", BOB_ANSWER)),
    "getclt-noexist": Example(command("$GETCLT$", NOEXIST, False, True), SERVER, ("$GETCLT$", NOEXIST)),
    "command-str": Example(command("say", "hi", False), BOTH, ("say", "hi")),
    "command-none": Example(command("ping", None, False), BOTH, ("ping", None)),
    "command-list-plain": Example(command("move", [1, "ab"], False), BOTH, ("move", [1, "ab"])),
    "command-dict-plain": Example(command("x", {"a": [1, 2]}, False), BOTH, ("x", {"a": [1, 2]})),
    "command-float-plain": Example(command("temp", 21.5, False), BOTH, ("temp", 21.5)),
    "command-float-list-plain": Example(command("temps", [0.1, -2.5], False), BOTH, ("temps", as_single([0.1, -2.5]))),
    "command-float-extended": Example(command("temp", 0.1, True), BOTH, ("temp", 0.1)),
    "command-dict-extended": Example(command("msg", DICT_CONTENT, True), BOTH, ("msg", DICT_CONTENT)),
    "command-tuple-extended": Example(command("pos", (1, 2), True), BOTH, ("pos", (1, 2))),
    "command-clientinfo-extended": Example(command("who", ALICE, True), BOTH, ("who", ALICE)),
    "command-bigint-extended": Example(command("big", [2**64], True), BOTH, ("big", [2**64])),
}

DOC_EXAMPLES = frame_examples(TEXT)


def test_every_example_in_the_document_is_checked_and_every_check_is_in_the_document():
    assert sorted(DOC_EXAMPLES) == sorted(EXAMPLES)


@pytest.mark.parametrize("tag", sorted(EXAMPLES))
def test_example_is_the_frame_the_library_builds(tag):
    assert DOC_EXAMPLES[tag] == EXAMPLES[tag].built


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (a tuple is not a list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[key], b[key]) for key in a)
    return bool(a == b)


@pytest.mark.parametrize("tag", sorted(EXAMPLES))
def test_example_parses_back_to_what_it_says(tag):
    data = DOC_EXAMPLES[tag]
    example = EXAMPLES[tag]
    header, body = data[:DEFAULT_HEADER_LEN], data[DEFAULT_HEADER_LEN:]
    assert parse_header(header) == len(body)
    parsers = {CLIENT: [parse_client_body], SERVER: [parse_server_body], BOTH: [parse_client_body, parse_server_body]}
    for parse in parsers[example.direction]:
        message = parse(body)
        if isinstance(message, Command):
            name, content = example.meaning
            assert message.command == name
            assert same(decode(message.fmt, message.payload), content)
        else:
            assert message == example.meaning


# ------------------------------------------------------------------ the same bytes from a running server


def at_port(example: bytes, doc_port: int, port: int) -> bytes:
    """A documented frame with the documented client's port replaced by a real one."""
    body = example[DEFAULT_HEADER_LEN:].replace(str(doc_port).encode(), str(port).encode())
    return wire_frame(body)


def test_a_running_server_answers_the_documented_hellos_with_the_documented_frames(server, raw):
    bob = raw(server)
    bob.send_raw(DOC_EXAMPLES["hello-plain"])
    assert bob.read_frame() == at_port(DOC_EXAMPLES["cltconn-plain"], 50002, bob.addr[1])[DEFAULT_HEADER_LEN:]

    alice = raw(server)
    alice.send_raw(DOC_EXAMPLES["hello-extended"])
    answer = at_port(DOC_EXAMPLES["cltconn-extended-answer"], 50000, alice.addr[1])
    assert alice.read_frame() == answer[DEFAULT_HEADER_LEN:]
    # bob hears of alice without her caps.
    announced = bob.read_frame()
    assert json.loads(announced[len(b"$CLTCONN$") :]) == {
        "ip": ["127.0.0.1", alice.addr[1]], "name": "alice", "group": "lobby", "ipstr": f"127.0.0.1:{alice.addr[1]}",
    }


def test_a_running_server_answers_getclt_with_the_documented_frames(server, raw):
    bob = raw(server)
    bob.send_raw(DOC_EXAMPLES["hello-plain"])
    bob.read_frame()
    alice = raw(server)
    alice.send_raw(DOC_EXAMPLES["hello-extended"])
    alice.read_frame()
    bob.read_frame()  # alice's announcement
    if len(str(bob.addr[1])) != 5:  # the examples' LENs assume a 5-digit port
        pytest.skip(f"port {bob.addr[1]} does not have 5 digits")

    bob.send_frame(b"$GETCLT$bob")
    assert bob.read_frame() == at_port(DOC_EXAMPLES["getclt-answer-plain"], 50002, bob.addr[1])[DEFAULT_HEADER_LEN:]
    alice.send_frame(b"$GETCLT$bob")
    # In MessagePack the port is binary, not text: compare with the example's recipe instead.
    real_answer = dict(BOB_ANSWER, ip=["127.0.0.1", bob.addr[1]])
    assert alice.read_frame() == command("$GETCLT$", real_answer, True, True)[DEFAULT_HEADER_LEN:]
    bob.send_frame(b"$GETCLT$nobody")
    assert bob.read_frame() == DOC_EXAMPLES["getclt-noexist"][DEFAULT_HEADER_LEN:]
