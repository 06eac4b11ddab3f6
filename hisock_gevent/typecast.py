"""The content codec: a Sendable value <-> ``(fmt, payload)`` bytes, as PROTOCOL.md section 3 says.

Two codecs share one entry point each way:

* **native letters** -- HiSock's own format, understood by every HiSock 3.x peer.  ``fmt``
  is a tiny grammar (``l1i2s``, ``d1s2[1i1i]``) telling how to cut the payload, which is
  the primitives' bytes laid end to end.  It carries str, bytes, int, float and nested
  lists, tuples and dicts of those.  HiSock reads a float with ``struct.unpack("!f")``,
  which takes exactly 4 bytes, so floats for a plain peer are written as 4-byte singles
  (rounded, as HiSock always did); between hisock_gevent peers they stay exact.
* **msgpack** (``fmt == b"m"``, an hisock_gevent extension) -- the payload is one
  MessagePack document, with ext types for what msgpack lacks (tuple, ClientInfo, ints
  beyond 64 bits).  It carries every Sendable exactly, and the C codec is much faster
  than building fmt strings in Python, so it is used for every container once the peer
  has said it understands ``m``.

:func:`encode` is the sending side and raises :class:`~hisock_gevent.errors.InvalidTypeCast`
when the caller hands it something it cannot send; :func:`decode` is the receiving side
and raises only :class:`~hisock_gevent.errors.MalformedPayload`, whatever the bytes are.

Decoding takes bytes from the network, so it is bounded in every direction: container
nesting (:data:`DEFAULT_MAX_DEPTH`, never by recursing on the input), the number of values
(:data:`DEFAULT_MAX_ITEMS`), digits in an int (:data:`MAX_INT_DIGITS`) or a LEN
(:data:`MAX_LEN_DIGITS`), and dict keys crafted to share a hash (:data:`MAX_HASH_COLLISIONS`).
It is also bounded in time per slice: given a ``pause`` callable, a payload of more than
:data:`PAUSE_ABOVE` bytes is decoded in slices of :data:`PAUSE_EVERY` values with
``pause()`` called between them (the server passes a yield to its event loop), so one
expensive payload cannot hold up everyone else.

Nothing here touches sockets or gevent.
"""

from __future__ import annotations

import math
import re
import struct
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import msgpack

from .errors import InvalidTypeCast, MalformedPayload
from .utils import ClientInfo

__all__ = [
    "MSGPACK_LETTER",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_ITEMS",
    "encode",
    "decode",
    "decode_positional",
    "is_native",
]

#: The whole fmt of a payload that is one MessagePack document.
MSGPACK_LETTER = b"m"
#: How deeply containers may nest (the outermost container is depth 1), both ways.
DEFAULT_MAX_DEPTH = 64
#: How many values (primitives and containers, dict keys included) one payload may hold.
DEFAULT_MAX_ITEMS = 1_000_000
#: Payloads longer than this (fmt and payload together) are decoded in slices when a
#: ``pause`` is given: smaller ones cannot take long enough to matter.
PAUSE_ABOVE = 64 * 1024
#: Values decoded between two calls of ``pause`` (a few milliseconds of work).
PAUSE_EVERY = 4096

#: msgpack ext type codes (0..127 are the application's; -1 is msgpack's timestamp).
EXT_TUPLE = 1
EXT_CLIENT_INFO = 2
EXT_BIG_INT = 3

#: Python refuses int <-> decimal conversions longer than this by default (CVE-2020-10735);
#: we hold peers to the same bound whatever ``sys.set_int_max_str_digits`` says.
MAX_INT_DIGITS = 4300
#: Longest LEN accepted in a fmt: 19 digits is more than any payload can be long, and
#: keeps ``int()`` on attacker-chosen digits trivially cheap.
MAX_LEN_DIGITS = 19
#: The range msgpack encodes as a plain integer; beyond it we use EXT_BIG_INT.
_MSGPACK_INT_MIN = -(2**63)
_MSGPACK_INT_MAX = 2**64 - 1
#: Int, float and tuple hashes are not randomised, so a peer can send dict keys that all
#: share one hash; each such key costs a walk past all the others (quadratic: 20 000 of
#: them, half a megabyte, take seconds).  More collisions than this in one dict are refused.
MAX_HASH_COLLISIONS = 64
#: A pooled msgpack Packer keeps its largest buffer; one that produced more than this is
#: dropped instead of pooled so a single big message does not pin memory forever.
_PACKER_KEEP_BYTES = 1 << 20

_NoneType = type(None)
_pack_double = struct.Struct(">d").pack
_pack_single = struct.Struct(">f").pack
#: What a float too large for single precision is sent as to a plain peer (see _single).
_SINGLE_INF = _pack_single(math.inf)
_SINGLE_MINUS_INF = _pack_single(-math.inf)
_unpack_double_from = struct.Struct(">d").unpack_from
_unpack_single_from = struct.Struct(">f").unpack_from

Fmt = bytes
Payload = bytes


# --------------------------------------------------------------------------- encoding


def encode(content: Any, *, msgpack_ok: bool = False) -> Tuple[Fmt, Payload]:
    """Return ``(fmt, payload)`` for ``content``.

    * ``None`` -> ``(b"", b"")``.
    * A top-level str, bytes-like, int or float always uses a native letter, so any peer
      can read it: ``"hi"`` -> ``(b"2s", b"hi")``.
    * A list, tuple or dict uses msgpack (``fmt == b"m"``) when ``msgpack_ok`` is true, and
      the native grammar otherwise: ``[1, "ab"]`` -> ``(b"l1i2s", b"1ab")``.
    * A bool, a ClientInfo, or a container holding something the native letters cannot
      carry (None, bool or ClientInfo inside it) needs msgpack.

    Floats depend on the peer.  With ``msgpack_ok`` (a hisock_gevent peer) a top-level
    float is an 8-byte big-endian double, ``(b"8f", ...)``, and floats in containers go
    inside the msgpack document: both exact.  Without it (a plain HiSock 3.x peer, which
    reads ``f`` with ``struct.unpack("!f", ...)`` and cannot take 8 bytes) every float,
    top-level or inside a container, is a 4-byte big-endian single, ``(b"4f", ...)``:
    rounded to the nearest single, as HiSock itself always sent floats.  A finite float
    that rounds past the largest single (about 3.4028235e38) is sent as infinity of its
    sign (where ``struct.pack("!f")`` would raise OverflowError), one too small for a
    single as a zero of its sign; infinities and NaN stay what they are.

    Subclasses of the supported types are sent as their base type: an ``IntEnum`` member
    arrives as an int, a namedtuple as a tuple, an OrderedDict as a dict.

    :param content: the value to send (HiSock's ``Sendable``).
    :param msgpack_ok: the peer understands the ``m`` letter.
    :returns: the fmt (ASCII) and the payload.
    :raises InvalidTypeCast: ``content`` holds a type that is not Sendable; or it needs
        msgpack and ``msgpack_ok`` is false; or containers nest deeper than
        :data:`DEFAULT_MAX_DEPTH`; or a str cannot be UTF-8 encoded (lone surrogates); or
        an int has more than :data:`MAX_INT_DIGITS` digits.
    """
    # Exact-type checks first: the common small messages never reach isinstance().
    kind = type(content)
    if msgpack_ok and (kind is dict or kind is list):
        return MSGPACK_LETTER, _encode_msgpack(content)
    if kind is str:
        try:
            data = content.encode()
        except UnicodeEncodeError as exc:
            raise _not_utf8(exc) from None
        return b"%ds" % len(data), data
    if kind is int:
        try:
            data = str(content).encode()
        except ValueError:
            raise _int_too_long() from None
        return b"%di" % len(data), data
    if kind is bytes:
        return b"%db" % len(content), content
    if kind is float:
        if msgpack_ok:
            return b"8f", _pack_double(content)
        return b"4f", _single(content)
    if content is None:
        return b"", b""
    if kind is list or kind is tuple or kind is dict:
        if msgpack_ok:
            return MSGPACK_LETTER, _encode_msgpack(content)
        return _encode_native_container(content)
    if kind is bool or isinstance(content, ClientInfo):
        if msgpack_ok:
            return MSGPACK_LETTER, _encode_msgpack(content)
        raise _needs_msgpack(content, inside=None)
    # bytearray, memoryview and subclasses of the above: send as the base type.
    return encode(_base_value(content), msgpack_ok=msgpack_ok)


def is_native(content: Any) -> bool:
    """Tell whether the native letters can carry ``content`` (to a plain HiSock peer).

    True exactly when ``encode(content, msgpack_ok=False)`` succeeds: None, str, bytes,
    int and float, and lists, tuples and dicts of those nested at most
    :data:`DEFAULT_MAX_DEPTH` deep.  False for a bool or ClientInfo anywhere, None inside
    a container, and for anything that is not Sendable at all.  Everything it accepts
    arrives with its type and value, except that floats arrive rounded to single
    precision (see :func:`encode`).  It costs one native encode.
    """
    try:
        encode(content, msgpack_ok=False)
    except InvalidTypeCast:
        return False
    return True


def _single(value: float) -> bytes:
    """``value`` as a 4-byte big-endian single, the only float a plain HiSock peer reads.

    Rounded to the nearest single; a finite value too large for one (``struct`` raises
    OverflowError) is sent as infinity of the same sign, the nearest thing a single holds.
    """
    try:
        return _pack_single(value)
    except OverflowError:
        return _SINGLE_INF if value > 0 else _SINGLE_MINUS_INF


def _not_utf8(exc: UnicodeEncodeError) -> InvalidTypeCast:
    return InvalidTypeCast(f"str cannot be sent: it is not valid UTF-8 ({exc})")


def _int_too_long() -> InvalidTypeCast:
    # str(int) raises ValueError past sys.get_int_max_str_digits() (4300 by default).
    return InvalidTypeCast(f"int cannot be sent: it has more than {MAX_INT_DIGITS} decimal digits")


def _base_value(value: Any) -> Any:
    """Return ``value`` as its exact Sendable base type, or raise InvalidTypeCast.

    The unbound base-class methods are used on purpose: ``str.__str__(s)`` copies the
    characters, whereas ``str(s)`` would call an overridden ``__str__`` (an enum's, say).
    """
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):  # bool cannot be subclassed; listed so int does not catch it
        return value
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        # Through a memoryview: bytes(value) would call a subclass's own __bytes__.
        return bytes(memoryview(value))
    if isinstance(value, list):
        return list(value)
    if isinstance(value, tuple):
        return tuple(value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, ClientInfo):
        return ClientInfo(value.ip, value.name, value.group)
    raise InvalidTypeCast(
        f"{type(value).__name__} is not Sendable: send bytes, str, int, float, None, bool, "
        "ClientInfo, or lists, tuples and dicts of them"
    )


def _needs_msgpack(value: Any, inside: Optional[str]) -> InvalidTypeCast:
    """The error for a value only the msgpack extension can carry."""
    what = "None" if value is None else type(value).__name__
    where = f" inside a {inside}" if inside else ""
    return InvalidTypeCast(
        f"{what}{where} cannot be sent to a peer without the msgpack extension "
        "(a plain HiSock peer only understands str, bytes, int, float and containers of them)"
    )


# ----- native grammar


_OPENERS: Dict[type, bytes] = {list: b"[", tuple: b"(", dict: b"{"}
_CLOSERS: Dict[type, bytes] = {list: b"]", tuple: b")", dict: b"}"}
_TOP_LETTERS: Dict[type, bytes] = {list: b"l", tuple: b"t", dict: b"d"}
#: Ready-made fmt tokens for short primitives: ``b"%ds" % n`` costs more than the item.
_CACHED_LENS = 256
_STR_TOKENS = [b"%ds" % n for n in range(_CACHED_LENS)]
_INT_TOKENS = [b"%di" % n for n in range(_CACHED_LENS)]
_BYTES_TOKENS = [b"%db" % n for n in range(_CACHED_LENS)]


def _encode_native_container(content: Union[list, tuple, dict]) -> Tuple[Fmt, Payload]:
    """Native encoding of a top-level list, tuple or dict.

    Only a plain HiSock peer gets containers in native letters (a hisock_gevent peer gets
    msgpack), so every float inside is a 4-byte single, the width HiSock reads.
    """
    kind = type(content)
    fmt: List[bytes] = [_TOP_LETTERS[kind]]
    payload: List[bytes] = []
    items = _dict_items(content) if isinstance(content, dict) else content
    _encode_native_items(items, kind, fmt, payload, 1)
    return b"".join(fmt), b"".join(payload)


def _dict_items(mapping: dict) -> List[Any]:
    """A dict's keys and values alternating, as the native grammar lays them out."""
    flat: List[Any] = []
    for pair in mapping.items():
        flat += pair
    return flat


def _encode_native_items(
    items: Any, container: type, fmt: List[bytes], payload: List[bytes], depth: int
) -> int:
    """Append the fmt tokens and payload bytes of ``items`` (the children of a container at
    ``depth``) and return how many payload bytes they cover: a nested container's LEN.

    Recursion is bounded by DEFAULT_MAX_DEPTH, so it cannot exhaust the Python stack; a
    self-containing list simply trips the depth check.
    """
    size = 0
    add_token = fmt.append
    add_bytes = payload.append
    for item in items:
        kind = type(item)
        if kind is str:
            try:
                data = item.encode()
            except UnicodeEncodeError as exc:
                raise _not_utf8(exc) from None
            n = len(data)
            add_token(_STR_TOKENS[n] if n < _CACHED_LENS else b"%ds" % n)
        elif kind is int:
            try:
                data = str(item).encode()
            except ValueError:
                raise _int_too_long() from None
            n = len(data)
            add_token(_INT_TOKENS[n] if n < _CACHED_LENS else b"%di" % n)
        elif kind is bytes:
            data = item
            n = len(data)
            add_token(_BYTES_TOKENS[n] if n < _CACHED_LENS else b"%db" % n)
        elif kind is float:
            data = _single(item)
            n = 4
            add_token(b"4f")
        elif kind is list or kind is tuple or kind is dict:
            if depth >= DEFAULT_MAX_DEPTH:
                raise InvalidTypeCast(f"containers nest deeper than {DEFAULT_MAX_DEPTH} levels")
            slot = len(fmt)
            add_token(b"")  # the LEN is known only once the children are encoded
            children = _dict_items(item) if kind is dict else item
            covered = _encode_native_items(children, kind, fmt, payload, depth + 1)
            fmt[slot] = b"%d%s" % (covered, _OPENERS[kind])
            add_token(_CLOSERS[kind])
            size += covered
            continue
        elif item is None or kind is bool or isinstance(item, ClientInfo):
            raise _needs_msgpack(item, inside=container.__name__)
        else:
            # A subclass, bytearray or memoryview: encode its base value in this same slot.
            size += _encode_native_items((_base_value(item),), container, fmt, payload, depth)
            continue
        add_bytes(data)
        size += n
    return size


# ----- msgpack


_packer_pool: List[msgpack.Packer] = []


def _pack(value: Any) -> bytes:
    """One MessagePack document for ``value``, with our ext types.

    ``packb`` builds a new Packer (and its buffer) per call, about three times the cost of
    packing a small dict; Packers are therefore pooled.  A Packer is not re-entrant (the
    default hook packs a tuple's items while the outer pack is still running) nor
    thread-safe, so each call takes one out of the pool -- ``list.pop``/``append`` are
    atomic under the GIL -- and gives it back afterwards.
    """
    try:
        packer = _packer_pool.pop()
    except IndexError:
        # strict_types: a tuple (or any subclass) must reach the default hook instead of
        # being packed as an array.  True/False/None, exact int/float/str/bytes/bytearray/
        # memoryview/list/dict still pack natively.
        packer = msgpack.Packer(default=_msgpack_default, use_bin_type=True, strict_types=True)
    data = packer.pack(value)  # on error the Packer resets itself and is simply not pooled
    if len(data) <= _PACKER_KEEP_BYTES:
        _packer_pool.append(packer)
    return data


def _msgpack_default(value: Any) -> Any:
    """msgpack's hook for what it cannot pack itself under strict_types.

    Returns an ExtType for tuples, ClientInfo and out-of-range ints, the exact base value
    for subclasses of the other Sendable types, and raises InvalidTypeCast for the rest.
    The packer calls the hook once per object and refuses to call it again on what it
    returns, so every branch must return something msgpack packs natively.
    """
    if isinstance(value, tuple):
        return msgpack.ExtType(EXT_TUPLE, _pack(list(value)))
    if isinstance(value, ClientInfo):
        return msgpack.ExtType(EXT_CLIENT_INFO, _pack(_client_info_fields(value)))
    if isinstance(value, int):
        # Reached for ints beyond msgpack's 64-bit range and for int subclasses (IntEnum).
        number = int.__int__(value)
        if _MSGPACK_INT_MIN <= number <= _MSGPACK_INT_MAX:
            return number
        try:
            digits = str(number).encode()
        except ValueError:
            raise _int_too_long() from None
        return msgpack.ExtType(EXT_BIG_INT, digits)
    return _base_value(value)


def _client_info_fields(info: ClientInfo) -> List[Any]:
    """``[host, port, name, group]`` of a ClientInfo, checked so the peer can rebuild it."""
    ip = info.ip
    if not (isinstance(ip, tuple) and len(ip) == 2):
        raise InvalidTypeCast(f"ClientInfo.ip must be a (host, port) tuple, not {ip!r}")
    host, port = ip
    name, group = info.name, info.group
    if not (
        isinstance(host, str)
        and isinstance(port, int)
        and not isinstance(port, bool)
        and 0 <= port <= 65535
        and (name is None or isinstance(name, str))
        and (group is None or isinstance(group, str))
    ):
        raise InvalidTypeCast(
            f"{info!r} cannot be sent: it needs a str host, a port 0-65535 and str or None "
            "name and group"
        )
    return [
        str.__str__(host),
        int.__int__(port),
        None if name is None else str.__str__(name),
        None if group is None else str.__str__(group),
    ]


def _encode_msgpack(content: Any) -> bytes:
    """The msgpack payload for ``content``; InvalidTypeCast for anything unsendable."""
    try:
        data = _pack(content)
    except InvalidTypeCast:
        raise
    except RecursionError:
        # Tuples nested hundreds deep: each one's items are packed by a nested call.
        raise InvalidTypeCast(
            f"content cannot be sent: containers nest deeper than {DEFAULT_MAX_DEPTH} levels"
        ) from None
    except (TypeError, ValueError, OverflowError) as exc:
        # TypeError/OverflowError: msgpack's own refusals; ValueError: a str that is not
        # valid UTF-8, or msgpack's nesting limit (a list that contains itself).
        raise InvalidTypeCast(f"content cannot be sent: {type(exc).__name__}: {exc}") from None
    # The peer would refuse a payload nested too deeply (and drop us); failing here tells
    # the caller why.  Packing first lets the cheap byte count spare most payloads the walk.
    if _may_nest_deeper(data, DEFAULT_MAX_DEPTH):
        problem = _shape_problem(content, DEFAULT_MAX_DEPTH, None)
        if problem:
            raise InvalidTypeCast(f"content cannot be sent: {problem}")
    return data


# ----- limits shared by both msgpack directions

#: Every byte value that can start a msgpack array, map or ext (tuple, ClientInfo).
_NESTING_BYTES = (
    bytes(range(0x80, 0xA0))  # fixmap, fixarray
    + bytes((0xDC, 0xDD, 0xDE, 0xDF))  # array16/32, map16/32
    + bytes((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))  # ext8/16/32, fixext1..16
)
_LEAF_TYPES = frozenset(
    (str, bytes, int, float, bool, _NoneType, bytearray, memoryview, ClientInfo)
)
_CONTAINER_TYPES = frozenset((list, tuple, dict))


def _may_nest_deeper(document: bytes, max_depth: int) -> bool:
    """False when the msgpack ``document`` cannot hold containers nested past ``max_depth``.

    Each level of nesting needs its own array/map/ext header byte, so a document with at
    most ``max_depth`` bytes that *could* be such headers cannot be deeper.  The count is
    one C-level pass (``bytes.translate``) and clears typical text-and-number payloads;
    the rest get the exact (slower) :func:`_shape_problem` walk.
    """
    if len(document) <= max_depth:
        return False
    return len(document) - len(document.translate(None, _NESTING_BYTES)) > max_depth


def _shape_problem(
    root: Any, max_depth: int, max_items: Optional[int], pause: Optional[Callable[[], Any]] = None
) -> Optional[str]:
    """Why ``root`` nests deeper than ``max_depth`` or holds more than ``max_items`` values
    (dict keys and containers included), or None if it does neither.

    The walk goes one nesting level at a time without recursion.  Within a container, a
    run of leaves is cleared by one C-level ``issuperset`` over the item types; only
    containers holding containers are looked at item by item.  Subclasses of list, tuple
    and dict (possible when sending) are found by isinstance.  ``pause()``, when given, is
    called every :data:`PAUSE_EVERY` containers.
    """
    if not isinstance(root, (list, tuple, dict)):
        return None
    level = [root]
    depth = 1
    count = 1
    boxes = 0
    while True:
        if depth > max_depth:
            return f"containers nest deeper than {max_depth} levels"
        below = []
        for box in level:
            if pause is not None:
                boxes += 1
                if boxes % PAUSE_EVERY == 0:
                    pause()
            if isinstance(box, dict):
                count += 2 * len(box)
                parts: Tuple[Any, ...] = (box.keys(), box.values())
            else:
                count += len(box)
                parts = (box,)
            for part in parts:
                if _LEAF_TYPES.issuperset(map(type, part)):
                    continue
                for item in part:
                    kind = type(item)
                    if kind in _CONTAINER_TYPES or (
                        kind not in _LEAF_TYPES and isinstance(item, (list, tuple, dict))
                    ):
                        below.append(item)
        if max_items is not None and count > max_items:
            return f"more than {max_items} values"
        if not below:
            return None
        level = below
        depth += 1


# --------------------------------------------------------------------------- decoding


def decode(
    fmt: bytes,
    payload: Union[bytes, bytearray, memoryview],
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int = DEFAULT_MAX_ITEMS,
    pause: Optional[Callable[[], Any]] = None,
) -> Any:
    """Rebuild the value that ``encode`` turned into ``(fmt, payload)``; see
    :func:`decode_positional`, which does the work (and which the per-message hot paths
    call with positional arguments)."""
    return decode_positional(fmt, payload, max_depth, max_items, pause)


def decode_positional(
    fmt: bytes,
    payload: Union[bytes, bytearray, memoryview],
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int = DEFAULT_MAX_ITEMS,
    pause: Optional[Callable[[], Any]] = None,
) -> Any:
    """Rebuild the value that ``encode`` turned into ``(fmt, payload)``.

    Accepts both codecs: the native grammar (``b""``, ``b"<n><s|i|b|f>"``, or
    ``l``/``t``/``d`` followed by items) and ``b"m"`` + one MessagePack document.  A native
    ``b`` always decodes to ``bytes``; a 4-byte ``f`` is read as a single-precision float
    (what HiSock peers send, and what :func:`encode` sends them), an 8-byte one as a
    double (what hisock_gevent peers send each other), any other width is malformed.  msgpack's own timestamp
    extension, which hisock_gevent never sends, arrives as a float (seconds).

    This is the receiving end of a network protocol: whatever the bytes, it either returns
    a Sendable value (str, bytes, int, float, None, bool, ClientInfo, and lists, tuples and
    dicts of them) or raises MalformedPayload.  Time and memory stay proportional to the
    input size (see the module's list of limits).

    :param fmt: the ASCII type description.
    :param payload: the bytes it describes.
    :param max_depth: most levels of container nesting (the outermost container is 1).
    :param max_items: most values, dict keys and containers included, in the payload.
    :param pause: called every :data:`PAUSE_EVERY` values while decoding a payload of
        more than :data:`PAUSE_ABOVE` bytes (to let other work run); None never pauses.
    :raises MalformedPayload: the fmt is not valid, the payload does not match it, or a
        limit is exceeded.
    """
    try:
        data = payload if type(payload) is bytes else bytes(payload)
        if fmt[-1:] == b"s" and len(fmt) <= MAX_LEN_DIGITS and fmt[:-1].isdigit() and int(fmt[:-1]) == len(data):
            return data.decode()  # a top-level str, the most common payload: no parser (one C call, nothing to pause)
        if pause is not None and len(data) + len(fmt) > PAUSE_ABOVE:
            return _decode_in_slices(fmt, data, max_depth, max_items, pause)
        if fmt == MSGPACK_LETTER:
            # _decode_msgpack, inlined: this is the hot path between hisock_gevent peers.
            value = msgpack.unpackb(
                data,
                strict_map_key=False,
                object_pairs_hook=_dict_from_pairs if _may_hold_big_map(data) else None,
                ext_hook=_ext_hooks.get(max_depth) or _ext_hook_for(max_depth),
                timestamp=1,
            )
            if len(data) > max_items or (len(data) > max_depth and _may_nest_deeper(data, max_depth)):
                problem = _shape_problem(value, max_depth, max_items)
                if problem:
                    raise _malformed(problem)
            return value
        return _decode_native(bytes(fmt), data, max_depth, max_items)
    except MalformedPayload:
        raise
    except Exception as exc:
        # The security promise: bytes from a peer never escape as anything else.  This
        # includes MemoryError and RecursionError from deep inside a decoder.
        detail = str(exc)
        if len(detail) > 200:
            detail = detail[:200] + "..."
        raise MalformedPayload(
            f"payload cannot be decoded: {type(exc).__name__}: {detail}"
        ) from exc


def _malformed(reason: str) -> MalformedPayload:
    return MalformedPayload(f"malformed payload: {reason}")


def _decode_in_slices(fmt: bytes, data: bytes, max_depth: int, max_items: int, pause: Callable[[], Any]) -> Any:
    """:func:`decode` of a long payload, calling ``pause()`` every :data:`PAUSE_EVERY` values.

    Native letters: the token loop pauses as it goes.  msgpack: the C unpacker calls back
    for every array and map it completes; those callbacks count the values (so a document
    with too many is refused as soon as the count passes ``max_items``, not after it was
    all built) and pause.  A single array or map longer than ``max_items`` is refused by
    its header alone.
    """
    if fmt != MSGPACK_LETTER:
        return _decode_native(bytes(fmt), data, max_depth, max_items, pause)
    tally = _Tally(max_items, pause)
    value = msgpack.unpackb(
        data,
        strict_map_key=False,
        list_hook=tally.array,
        object_pairs_hook=tally.map,
        ext_hook=_ext_hooks.get(max_depth) or _ext_hook_for(max_depth),
        timestamp=1,
        max_array_len=max_items,
        max_map_len=max_items // 2,
    )
    if len(data) > max_depth and _may_nest_deeper(data, max_depth):
        problem = _shape_problem(value, max_depth, max_items, pause)
        if problem:
            raise _malformed(problem)
    return value


class _Tally:
    """Counts the values of a msgpack document as the unpacker completes its containers,
    and the work done (values plus containers built: a thousand empty arrays are work
    too), pausing every :data:`PAUSE_EVERY` of it."""

    __slots__ = ("count", "work", "max_items", "pause", "next_pause")

    def __init__(self, max_items: int, pause: Callable[[], Any]):
        self.count = 1  # the document's own top-level value; a container counts in its parent
        self.work = 0
        self.max_items = max_items
        self.pause = pause
        self.next_pause = PAUSE_EVERY

    def _add(self, values: int) -> None:
        self.count += values
        if self.count > self.max_items:
            raise _malformed(f"more than {self.max_items} values")
        self.work += values + 1
        if self.work >= self.next_pause:
            self.next_pause = self.work + PAUSE_EVERY
            self.pause()

    def array(self, items: List[Any]) -> List[Any]:
        self._add(len(items))
        return items

    def map(self, pairs: List[Tuple[Any, Any]]) -> dict:
        self._add(2 * len(pairs))
        return _dict_from_pairs(pairs)


# ----- native grammar

#: Splitting a fmt on its letters and brackets leaves each one's LEN just before it:
#: ``b"1i2[1s]"`` -> ``[b"1", b"i", b"2", b"[", b"1", b"s", b"", b"]", b""]``.  One C-level
#: split costs about a third of validating and tokenising with a token regex (measured),
#: and whatever is not a valid LEN is caught where the LEN is read.
_MARK_SPLIT = re.compile(rb"([sibf\[({\])}])").split
#: Bytes in a fmt that start a value (each costs one item of max_items).
_VALUE_MARKS = b"sibf[({"
_CLOSER_OF = {b"[": b"]", b"(": b")", b"{": b"}"}
#: LEN text -> value for the short LENs nearly every token has; a hit is also proof that
#: the text is plain decimal digits.
_LEN_VALUES = {b"%d" % n: n for n in range(_CACHED_LENS)}


_MARK = re.compile(rb"[sibf\[({\])}]")


def _paced_tokens(body: bytes, pause: Callable[[], Any]) -> Iterator[bytes]:
    """The tokens of ``_MARK_SPLIT(body)`` but its last, made a slice of the fmt at a time
    (each cut just after a letter or bracket, so no LEN is cut in two), with ``pause()``
    between slices: splitting a long fmt at once takes long itself."""
    size = 2 * PAUSE_EVERY  # about PAUSE_EVERY tokens of the shortest kind ("0[")
    start = 0
    while start < len(body):
        mark = _MARK.search(body, min(start + size, len(body)) - 1)
        end = mark.end() if mark is not None else len(body)
        parts = _MARK_SPLIT(body[start:end])
        if mark is not None:
            del parts[-1]  # the empty text after the slice's last mark
        yield from parts
        start = end
        if start < len(body):
            pause()


def _decode_native(
    fmt: bytes, data: bytes, max_depth: int, max_items: int, pause: Optional[Callable[[], Any]] = None
) -> Any:
    if not fmt:
        if data:
            raise _malformed("empty fmt (None) with a non-empty payload")
        return None
    top = fmt[:1]
    if top != b"l" and top != b"t" and top != b"d":
        return _decode_single(fmt, data)
    if max_depth < 1:
        raise _malformed(f"containers nest deeper than {max_depth} levels")
    if not fmt.isascii():
        raise _malformed("fmt is not ASCII")
    # Count values (the top-level container is one) before splitting, so a huge fmt is
    # refused before a list is built for it.
    if 1 + len(fmt) - len(fmt.translate(None, _VALUE_MARKS)) > max_items:
        raise _malformed(f"more than {max_items} values")
    if pause is None:
        parts = _MARK_SPLIT(fmt[1:])
        if parts[-1]:
            raise _malformed(f"fmt {_clip(fmt)!r} ends with a LEN and no letter")
        del parts[-1]
    elif not _MARK.match(fmt[-1:]):
        raise _malformed(f"fmt {_clip(fmt)!r} ends with a LEN and no letter")

    lens = _LEN_VALUES
    end_of_data = len(data)
    pos = 0  # next unread payload byte
    limit = end_of_data  # end of the innermost open container's bytes
    closer = None  # what closes the innermost open container (None at the top level)
    items: List[Any] = []  # the innermost open container's children so far
    add = items.append
    stack: List[Tuple[List[Any], Optional[bytes], int, bytes]] = []  # enclosing containers
    kind = top
    tokens = iter(parts) if pause is None else _paced_tokens(fmt[1:], pause)
    for digits, mark in zip(tokens, tokens):
        n = lens.get(digits)
        if n is None:
            n = _parse_len(digits, mark)
        end = pos + n
        if end > limit:
            raise _malformed("a LEN runs past its container or the payload")
        if mark == b"s":
            add(data[pos:end].decode())
        elif mark == b"i":
            text = data[pos:end]
            if n <= MAX_INT_DIGITS and text.isdigit():
                add(int(text))
            else:
                add(_parse_int(text))
        elif mark == b"b":
            add(data[pos:end])
        elif mark == b"f":
            if n == 8:
                add(_unpack_double_from(data, pos)[0])
            else:
                add(_parse_float(data, pos, n))
        elif mark == closer:
            if digits:
                raise _malformed("a closing bracket has a LEN")
            if pos != limit:
                raise _malformed("a container's LEN does not match its contents")
            value = _build(kind, items)
            items, closer, limit, kind = stack.pop()
            add = items.append
            add(value)
            continue
        elif mark in _CLOSER_OF:
            if len(stack) + 2 > max_depth:
                raise _malformed(f"containers nest deeper than {max_depth} levels")
            stack.append((items, closer, limit, kind))
            items, closer, limit, kind = [], _CLOSER_OF[mark], end, mark
            add = items.append
            continue  # the container's bytes are its children's: pos stays
        else:
            raise _malformed(f"unexpected {mark.decode()!r} in fmt")
        pos = end
    if stack:
        raise _malformed("a container is not closed")
    if pos != end_of_data:
        raise _malformed("the payload is longer than its fmt says")
    return _build(top, items)


def _parse_len(digits: bytes, mark: bytes) -> int:
    """A LEN not in the cache: a closer's (empty, and valid), a long one, or garbage.

    A closer returns 0 so it passes the bounds check; the closer branch then insists that
    its LEN really was empty.
    """
    if not digits and mark in b"])}":
        return 0
    # bytes.isdigit() accepts ASCII digits only, unlike int(), which also takes " 1", "+1",
    # "1_0" and non-ASCII digits.
    if not (digits.isdigit() and len(digits) <= MAX_LEN_DIGITS):
        raise _malformed(f"{_clip(digits + mark)!r} in fmt is not a LEN followed by a letter")
    return int(digits)


def _build(kind: bytes, items: List[Any]) -> Any:
    """The container of ``kind`` (top-level l/t/d or an opening bracket) holding ``items``."""
    if kind == b"[" or kind == b"l":
        return items
    if kind == b"(" or kind == b"t":
        return tuple(items)
    if len(items) % 2:
        raise _malformed("a dict has a key without a value")
    if len(items) > 2 * MAX_HASH_COLLISIONS:
        _check_key_hashes(items[0::2])
    pairs = iter(items)
    try:
        return dict(zip(pairs, pairs))
    except TypeError:
        raise _malformed("a dict key is not hashable") from None


def _check_key_hashes(keys: List[Any]) -> None:
    """Refuse dict keys built to collide (see MAX_HASH_COLLISIONS), before the dict is built.

    Keys that share a hash share a hash *value*, and equal ints dedupe in a set at once, so
    counting distinct hashes is linear even for hostile keys.
    """
    try:
        distinct = len(set(map(hash, keys)))
    except TypeError:
        raise _malformed("a dict key is not hashable") from None
    if len(keys) - distinct > MAX_HASH_COLLISIONS:
        raise _malformed(f"more than {MAX_HASH_COLLISIONS} dict keys share hash values")


def _decode_single(fmt: bytes, data: bytes) -> Any:
    """A top-level primitive: ``<LEN><letter>`` whose LEN is the whole payload."""
    digits = fmt[:-1]
    letter = fmt[-1:]
    # bytes.isdigit() accepts ASCII digits only, unlike int() which also takes " 1", "1_0"...
    if not (digits.isdigit() and len(digits) <= MAX_LEN_DIGITS):
        raise _malformed(f"fmt {_clip(fmt)!r} does not follow the grammar")
    if int(digits) != len(data):
        raise _malformed("the fmt's LEN is not the payload's length")
    if letter == b"s":
        return data.decode()
    if letter == b"i":
        return _parse_int(data)
    if letter == b"b":
        return data
    if letter == b"f":
        return _parse_float(data, 0, len(data))
    raise _malformed(f"unknown type letter {_clip(letter)!r}")


def _parse_int(text: bytes) -> int:
    """ASCII decimal with an optional leading ``-``, and nothing else int() would accept."""
    digits = text[1:] if text[:1] == b"-" else text
    if not digits.isdigit():
        raise _malformed(f"{_clip(text)!r} is not a decimal integer")
    if len(digits) > MAX_INT_DIGITS:
        raise _malformed(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(data: bytes, offset: int, size: int) -> float:
    if size == 8:
        return _unpack_double_from(data, offset)[0]
    if size == 4:
        return _unpack_single_from(data, offset)[0]
    raise _malformed(f"a float is 4 or 8 bytes, not {size}")


def _clip(raw: bytes, length: int = 40) -> bytes:
    """Enough of a hostile input to recognise it in a log line, not all of it."""
    return raw if len(raw) <= length else raw[:length] + b"..."


# ----- msgpack

# How deep the tuples being unpacked right now are nested, per thread (or greenlet, when
# patched): a tuple's items are unpacked by a nested call from inside the ext hook.
_tuple_nesting = threading.local()
# max_depth -> its ext hook; a program uses one or two limits, so this stays tiny.
_ext_hooks: Dict[int, Callable[[int, bytes], Any]] = {}


def _ext_hook_for(max_depth: int) -> Callable[[int, bytes], Any]:
    """The msgpack ext hook that rebuilds our ext types, bounding tuple nesting by ``max_depth``.

    Built once per limit and shared: no closure is made per decoded message.
    """
    hook = _ext_hooks.get(max_depth)
    if hook is not None:
        return hook

    def ext_hook(code: int, body: bytes) -> Any:
        if code == EXT_TUPLE:
            depth = getattr(_tuple_nesting, "depth", 0)
            if depth >= max_depth:
                raise _malformed(f"containers nest deeper than {max_depth} levels")
            _tuple_nesting.depth = depth + 1
            try:
                items = _unpack_nested(body, ext_hook)
            finally:
                _tuple_nesting.depth = depth
            if type(items) is not list:
                raise _malformed("a tuple ext does not hold an array")
            return tuple(items)
        if code == EXT_CLIENT_INFO:
            return _client_info_from(body)
        if code == EXT_BIG_INT:
            return _parse_int(body)
        raise _malformed(f"unknown msgpack ext type {code}")

    if len(_ext_hooks) < 64:
        _ext_hooks[max_depth] = ext_hook
    return ext_hook


def _decode_msgpack(data: bytes, max_depth: int, max_items: int) -> Any:
    value = _unpack(data, _ext_hook_for(max_depth))
    # Every value takes at least one byte, so only a document longer than max_items can
    # hold too many; and only one with enough header-like bytes can nest too deeply.
    if len(data) > max_items or (len(data) > max_depth and _may_nest_deeper(data, max_depth)):
        problem = _shape_problem(value, max_depth, max_items)
        if problem:
            raise _malformed(problem)
    return value


def _unpack(data: bytes, ext_hook: Callable[[int, bytes], Any]) -> Any:
    """One whole MessagePack document (trailing bytes are an error).

    Every length is bounded by the document's size, so a header claiming 4 GiB cannot make
    msgpack allocate it; msgpack's C unpacker has its own fixed nesting stack and reports
    deeper documents as StackError.
    """
    # unpackb bounds every max_*_len by len(data) itself; raw=False and use_list=True are
    # its defaults.  Fewer keyword arguments is measurably faster on small documents.
    return msgpack.unpackb(
        data,
        strict_map_key=False,
        # Only a map16/map32 header (0xde/0xdf) can hold enough keys for hash flooding;
        # only then are maps built by the checking hook (about a microsecond per map).
        object_pairs_hook=_dict_from_pairs if _may_hold_big_map(data) else None,
        ext_hook=ext_hook,
        # msgpack decodes its own timestamp ext (-1) without calling ext_hook; as a float
        # (seconds) it is at least a Sendable value.  We never send one.
        timestamp=1,
    )


def _unpack_nested(body: bytes, ext_hook: Callable[[int, bytes], Any]) -> Any:
    """Like :func:`_unpack`, for a document inside an ext (a tuple's items).

    ``unpackb`` keeps its whole parse stack (about 40 KiB) on the C stack, so unpackb
    inside unpackb inside unpackb -- tuples nested a few hundred deep -- overflows it and
    kills the process with SIGSEGV before Python's recursion limit can object.  An
    Unpacker keeps that stack in the heap object instead; it costs about half a
    microsecond more per tuple, and deep nesting ends in a RecursionError at worst.
    """
    unpacker = msgpack.Unpacker(
        None,
        raw=False,
        use_list=True,
        strict_map_key=False,
        object_pairs_hook=_pairs_hook_for(body),
        ext_hook=ext_hook,
        timestamp=1,
        max_buffer_size=max(len(body), 1),  # also bounds every length inside, as above
    )
    unpacker.feed(body)
    value = unpacker.unpack()  # msgpack.OutOfData (an Exception) if the body is cut short
    if unpacker.tell() != len(body):
        raise _malformed("an ext holds more than one document")
    return value


_BIG_MAP_HEADERS = b"\xde\xdf"


def _may_hold_big_map(document: bytes) -> bool:
    """True when ``document`` has a byte that could start a map16/map32 (more than 15 keys).

    (One C-level ``translate``: measured several times faster than two ``in`` tests.)
    """
    return len(document.translate(None, _BIG_MAP_HEADERS)) != len(document)


def _pairs_hook_for(document: bytes) -> Optional[Callable[[List[Tuple[Any, Any]]], dict]]:
    """The object_pairs_hook a document needs: none, unless it might hold a big map.

    A map of more than 15 entries needs a map16/map32 header (0xde/0xdf).  Only then can
    hash flooding pay off, and only then are maps built by our checking hook, which costs
    about a microsecond per map.
    """
    return _dict_from_pairs if _may_hold_big_map(document) else None


def _dict_from_pairs(pairs: List[Tuple[Any, Any]]) -> dict:
    if len(pairs) > MAX_HASH_COLLISIONS:
        _check_key_hashes([key for key, _ in pairs])
    return dict(pairs)


def _refuse_ext(code: int, body: bytes) -> Any:
    raise _malformed(f"unexpected msgpack ext type {code} inside a ClientInfo")


def _client_info_from(body: bytes) -> ClientInfo:
    """A ClientInfo from its ext body: ``[host, port, name, group]``."""
    # The fields are plain scalars: an ext inside is refused, never recursed into.
    fields = _unpack(body, _refuse_ext)
    if not (type(fields) is list and len(fields) == 4):
        raise _malformed("a ClientInfo ext does not hold [host, port, name, group]")
    host, port, name, group = fields
    if not (
        type(host) is str
        and type(port) is int
        and 0 <= port <= 65535
        and (name is None or type(name) is str)
        and (group is None or type(group) is str)
    ):
        raise _malformed("a ClientInfo ext has fields of the wrong types")
    return ClientInfo((host, port), name, group)
