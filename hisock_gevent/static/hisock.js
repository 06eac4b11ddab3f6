/**
 * hisock.js: a HiSock client for browsers, speaking to a hisock_gevent server over WebSocket.
 *
 * An ES module with no build step.  Each binary WebSocket message carries exactly one
 * HiSock frame *body* (PROTOCOL.md section 2): WebSocket already frames, so the 16-byte
 * length header of PROTOCOL.md section 1 is not sent.  Text messages are never sent, and
 * one arriving is a protocol error.
 *
 *     import { connect } from "/hisock.js";   // wherever the server serves it
 *     const client = await connect("ws://host:port/path", { name: "alice", group: "lobby" });
 *     client.on("say", (content) => show(content));
 *     client.send("say", "hi");
 *     const sum = await client.call("add", [1, 2]);      // the call extension
 *
 * Register handlers right after `await connect(...)` (before awaiting anything else) and
 * no message is missed; or build `new HiSockClient(url, options)`, register, then
 * `await client.connect()`.
 *
 * The file has these sections, each usable on its own: errors; the value types JavaScript
 * lacks (Tuple, Float, ClientInfo); the content codec (PROTOCOL.md section 3: native fmt
 * letters and msgpack); frame bodies (section 2, and the call extension); the reconnect
 * delay; and the client.
 *
 * How Python values arrive in JavaScript, and what JavaScript values are sent as:
 *
 *   Python            JavaScript (received)           JavaScript (sent as that Python type)
 *   None              null                            null or undefined
 *   bool              true / false                    boolean (msgpack only)
 *   int               number when |n| <= 2^53 - 1,    a safe integer number (not -0), or any
 *                     BigInt beyond that              BigInt; beyond 64 bits msgpack uses ext 3
 *   float             number                          any other number (fractions, -0, NaN,
 *                                                     +-Infinity, unsafe integers such as 1e20),
 *                                                     or new Float(x) for an integral float
 *   str               string                          string (lone surrogates are refused)
 *   bytes             Uint8Array (a copy)             Uint8Array, any ArrayBuffer view, ArrayBuffer
 *   list              Array                           Array
 *   tuple             Tuple (a subclass of Array)     Tuple.of(...) / Tuple.from(array)
 *   dict, str keys    plain object                    plain object (its string keys)
 *   dict, other keys  Map (all of its keys)           Map (keys: any hashable value)
 *   ClientInfo        ClientInfo {ip: [host, port],   ClientInfo (msgpack only)
 *                       name, group}
 *
 * So a Python float with an integral value (2.0) arrives as the number 2 and goes back as
 * the int 2 unless wrapped in Float; a dict whose keys are all strings is a plain object
 * (whose integer-like keys JavaScript orders first); a Map's Tuple keys are compared by
 * identity, as any object key of a Map.  A msgpack timestamp (never sent by
 * hisock_gevent) arrives as seconds, a number, as in Python.
 *
 * Vendored: ./msgpack/ is @msgpack/msgpack 3.1.3's ES module build, copied unchanged; its
 * license (ISC) is ./msgpack/LICENSE and ./msgpack/VENDORED.txt says how to update it.
 *
 * @module hisock
 */

import {
    DecodeError,
    Decoder,
    Encoder,
    ExtData,
    ExtensionCodec,
    decodeTimestampToTimeSpec,
} from "./msgpack/index.mjs";

// =========================================================================== errors

/** Base class of every error this module throws or rejects with. */
export class HiSockError extends Error {
    constructor(message) {
        super(message);
        this.name = new.target.name;
    }
}

/** Content cannot be encoded for this server (not Sendable, or it needs msgpack). */
export class InvalidTypeCast extends HiSockError {}
/** A command name that cannot be sent: not a string, or HiSock's reserved `$...$` form. */
export class InvalidCommand extends HiSockError {}
/** What we were asked to send makes a message larger than the server accepts. */
export class ContentTooLarge extends HiSockError {}
/** More bytes would be waiting to go out than `maxQueueBytes` allows. */
export class SendQueueFull extends HiSockError {}
/** The connection is closed (or being re-made): the operation cannot be carried out. */
export class ClientDisconnected extends HiSockError {}
/** The server knows no client by that name or address (`getClient`). */
export class ClientNotFound extends HiSockError {}
/** No WebSocket connection could be opened to the server. */
export class ServerNotRunning extends HiSockError {}
/** The server refused our hello (`$DISCONN$`), closed during the handshake, or did not answer. */
export class ConnectionRejected extends HiSockError {}
/** The server's authentication check refused the `auth` of our hello. */
export class AuthenticationFailed extends ConnectionRejected {}
/** `call()` needs the server to accept the `"call"` capability, and it did not. */
export class CallNotSupported extends HiSockError {}
/** No answer came in time (a call, a `getClient`). */
export class TimeoutError extends HiSockError {}

/**
 * The other side's handler for a call failed (a `$CALLERR$` answer).
 * `type` is the name of the exception it raised, `message` its text.
 */
export class RemoteCallError extends HiSockError {
    constructor(type, message) {
        super(`${type}: ${message}`);
        this.type = type;
        this.remoteMessage = message;
    }
}

/** The server broke the protocol; the connection it came on is closed. */
export class RemoteProtocolError extends HiSockError {}
/** A body is neither a known reserved message nor a command message. */
export class MalformedMessage extends RemoteProtocolError {}
/** A command message's fmt or payload cannot be decoded. */
export class MalformedPayload extends RemoteProtocolError {}
/** A hello that is not a JSON object with string (or null) name and group. */
export class HandshakeError extends RemoteProtocolError {}

// =========================================================================== value types

/**
 * A Python tuple.  It is an Array (so everything that reads arrays reads it), of its own
 * class so that it goes back as a tuple.  Make one with `Tuple.of(a, b)` or
 * `Tuple.from(array)`, not `new Tuple(n)` (that is Array's "n empty slots").
 */
export class Tuple extends Array {}

/** A float that JavaScript would otherwise send as an int: `new Float(2)` arrives as 2.0. */
export class Float {
    constructor(value) {
        if (typeof value !== "number") {
            throw new TypeError(`Float wraps a number, not ${typeof value}`);
        }
        this.value = value;
    }

    valueOf() {
        return this.value;
    }
}

/** What the server knows of one client: `ip` is `[host, port]`, `name` and `group` are strings or null. */
export class ClientInfo {
    constructor(ip, name = null, group = null) {
        this.ip = [ip[0], ip[1]];
        this.name = name ?? null;
        this.group = group ?? null;
    }

    /** `"host:port"` */
    get ipstr() {
        return `${this.ip[0]}:${this.ip[1]}`;
    }

    /** HiSock's printed form: `<ClientInfo: IP: 10.0.0.1:80, Name: alice, Group: None>`. */
    toString() {
        return `<ClientInfo: IP: ${this.ipstr}, Name: ${this.name ?? "None"}, Group: ${this.group ?? "None"}>`;
    }

    /** From the JSON object of `$CLTCONN$`/`$CLTDISCONN$` or a `$GETCLT$` answer. */
    static fromObject(object) {
        let ip = object.ip;
        if (typeof ip === "string") {
            const colon = ip.lastIndexOf(":");
            ip = [ip.slice(0, colon), Number(ip.slice(colon + 1))];
        }
        return new ClientInfo([String(ip[0]), Number(ip[1])], object.name ?? null, object.group ?? null);
    }
}

// =========================================================================== content codec

/** Containers may nest this deep (the outermost is level 1), both ways. */
export const MAX_NESTING = 64;
/** Values (containers, dict keys and values included) one received payload may hold. */
export const MAX_ITEMS = 1_000_000;
/** Most decimal digits of an int, both ways. */
export const MAX_INT_DIGITS = 4300;
/** Most digits of a LEN in a native fmt. */
const MAX_LEN_DIGITS = 19;

const EXT_TIMESTAMP = -1;
const EXT_TUPLE = 1;
const EXT_CLIENT_INFO = 2;
const EXT_BIG_INT = 3;

const INT32_MIN = -0x80000000;
const UINT32_LIMIT = 0x100000000;
const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;
const SAFE_MAX = BigInt(Number.MAX_SAFE_INTEGER);

const EMPTY = new Uint8Array(0);
const textEncoder = new TextEncoder();
// fatal: invalid UTF-8 is an error, as in Python; ignoreBOM: a leading U+FEFF is text, kept.
const textDecoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

// A lone surrogate: a high one not followed by a low one, or a low one not preceded by a high one.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?:^|[^\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const isWellFormed =
    typeof String.prototype.isWellFormed === "function"
        ? (text) => text.isWellFormed()
        : (text) => !LONE_SURROGATE.test(text);

/** `text` as UTF-8; InvalidTypeCast for a lone surrogate (UTF-8 cannot carry it; Python refuses it). */
function utf8(text) {
    if (!isWellFormed(text)) {
        throw new InvalidTypeCast("a string cannot be sent: it holds a lone surrogate (not valid UTF-8)");
    }
    return textEncoder.encode(text);
}

function ascii(text) {
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
}

function latin1(bytes) {
    let text = "";
    for (let i = 0; i < bytes.length; i += 4096) {
        text += String.fromCharCode.apply(null, bytes.subarray(i, i + 4096));
    }
    return text;
}

function concat(parts) {
    let length = 0;
    for (const part of parts) length += part.length;
    const out = new Uint8Array(length);
    let offset = 0;
    for (const part of parts) {
        out.set(part, offset);
        offset += part.length;
    }
    return out;
}

function malformed(reason) {
    return new MalformedPayload(`malformed payload: ${reason}`);
}

function isIntegerNumber(value) {
    return Number.isSafeInteger(value) && !Object.is(value, -0);
}

/** An int as JavaScript holds it: a number when exact, a BigInt otherwise. */
function fromBigInt(value) {
    return value >= -SAFE_MAX && value <= SAFE_MAX ? Number(value) : value;
}

/**
 * Which Sendable kind `value` is ("none", "bool", "int", "float", "str", "bytes", "list",
 * "tuple", "dict", "map", "clientinfo"), or null when it is not Sendable.
 */
function kindOf(value) {
    if (value === null || value === undefined) return "none";
    switch (typeof value) {
        case "string":
            return "str";
        case "boolean":
            return "bool";
        case "bigint":
            return "int";
        case "number":
            return isIntegerNumber(value) ? "int" : "float";
        case "object": {
            if (value instanceof Float) return "float";
            if (value instanceof Tuple) return "tuple";
            if (Array.isArray(value)) return "list";
            if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) return "bytes";
            if (value instanceof ClientInfo) return "clientinfo";
            if (value instanceof Map) return "map";
            const proto = Object.getPrototypeOf(value);
            if (proto === Object.prototype || proto === null) return "dict";
            return null;
        }
        default:
            return null;
    }
}

function notSendable(value) {
    const what = typeof value === "object" ? value.constructor?.name ?? "object" : typeof value;
    return new InvalidTypeCast(
        `${what} is not Sendable: send null, booleans, numbers, BigInts, strings, bytes (Uint8Array), ` +
            "ClientInfo, Float, or Arrays, Tuples, plain objects and Maps of them",
    );
}

function needsMsgpack(value, inside) {
    const what = value === null || value === undefined ? "null" : kindOf(value);
    const where = inside ? ` inside a ${inside}` : "";
    return new InvalidTypeCast(
        `${what}${where} cannot be sent to a peer without the msgpack extension ` +
            "(a plain HiSock peer only understands str, bytes, int, float and containers of them)",
    );
}

function tooDeep() {
    return new InvalidTypeCast(`content cannot be sent: containers nest deeper than ${MAX_NESTING} levels`);
}

function bytesOf(value) {
    if (value instanceof ArrayBuffer) return new Uint8Array(value);
    if (value instanceof Uint8Array) return value;
    return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
}

function floatOf(value) {
    return value instanceof Float ? value.value : value;
}

function intText(value) {
    const text = typeof value === "bigint" ? value.toString() : String(value);
    if (text.length - (text[0] === "-" ? 1 : 0) > MAX_INT_DIGITS) {
        throw new InvalidTypeCast(`an int cannot be sent: it has more than ${MAX_INT_DIGITS} decimal digits`);
    }
    return text;
}

function single(value) {
    // DataView rounds to the nearest single; a finite value too large becomes Infinity of
    // its sign and one too small a zero of its sign, exactly as PROTOCOL.md section 3.2 says.
    const bytes = new Uint8Array(4);
    new DataView(bytes.buffer).setFloat32(0, value);
    return bytes;
}

function double(value) {
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setFloat64(0, value);
    return bytes;
}

/** Whether Python could use `key` as a dict key (lists and dicts cannot be, nor tuples holding them). */
function isHashable(key) {
    const kind = kindOf(key);
    if (kind === "list" || kind === "dict" || kind === "map" || kind === null) return false;
    if (kind === "tuple") return key.every(isHashable);
    return true;
}

function checkKey(key) {
    if (!isHashable(key)) {
        throw new InvalidTypeCast(
            "a Map key cannot be sent: a Python dict key cannot be a list, a dict, or a tuple holding one",
        );
    }
}

/** A dict's keys and values alternating, as the native grammar lays them out. */
function flatItems(value, kind) {
    if (kind === "list" || kind === "tuple") return value;
    const flat = [];
    if (kind === "map") {
        for (const [key, item] of value) {
            checkKey(key);
            flat.push(key, item);
        }
    } else {
        for (const key of Object.keys(value)) flat.push(key, value[key]);
    }
    return flat;
}

const TOP_LETTER = { list: "l", tuple: "t", dict: "d", map: "d" };
const OPENER = { list: "[", tuple: "(", dict: "{", map: "{" };
const CLOSER = { list: "]", tuple: ")", dict: "}", map: "}" };
const CONTAINER_NAME = { list: "list", tuple: "tuple", dict: "dict", map: "dict" };

/**
 * Append the fmt tokens and payload bytes of `items` (the children of a container at
 * `depth`) and return how many payload bytes they cover: a nested container's LEN.
 * Floats are 4-byte singles: only a plain peer gets native containers.
 */
function encodeNativeItems(items, container, fmt, payload, depth) {
    let size = 0;
    for (const item of items) {
        const kind = kindOf(item);
        let data;
        switch (kind) {
            case "str":
                data = utf8(item);
                fmt.push(`${data.length}s`);
                break;
            case "int":
                data = ascii(intText(item));
                fmt.push(`${data.length}i`);
                break;
            case "bytes":
                data = bytesOf(item);
                fmt.push(`${data.length}b`);
                break;
            case "float":
                data = single(floatOf(item));
                fmt.push("4f");
                break;
            case "list":
            case "tuple":
            case "dict":
            case "map": {
                if (depth >= MAX_NESTING) throw tooDeep();
                const slot = fmt.length;
                fmt.push(""); // the LEN is known once the children are encoded
                const covered = encodeNativeItems(flatItems(item, kind), kind, fmt, payload, depth + 1);
                fmt[slot] = `${covered}${OPENER[kind]}`;
                fmt.push(CLOSER[kind]);
                size += covered;
                continue;
            }
            case "none":
            case "bool":
            case "clientinfo":
                throw needsMsgpack(item, CONTAINER_NAME[container]);
            default:
                throw notSendable(item);
        }
        payload.push(data);
        size += data.length;
    }
    return size;
}

/**
 * Encode `content` as HiSock's `(fmt, payload)` (PROTOCOL.md section 3), exactly as
 * hisock_gevent's `typecast.encode` does.
 *
 * A top-level null, string, int, bytes or float keeps its native letter whatever the
 * dialect (a float is an 8-byte double with `msgpack`, a 4-byte single without).  Arrays,
 * Tuples, plain objects, Maps, booleans and ClientInfo use msgpack (`fmt` "m") when
 * `msgpack` is true; without it containers use the native grammar, and booleans,
 * ClientInfo and null inside containers cannot be sent.
 *
 * @param {*} content
 * @param {{msgpack?: boolean}} [options] msgpack: the peer negotiated the msgpack extension.
 * @returns {{fmt: Uint8Array, payload: Uint8Array}}
 * @throws {InvalidTypeCast} content is not Sendable, needs msgpack, nests deeper than
 *     64 levels, holds a lone surrogate, an int of more than 4300 digits, or a Map key
 *     Python cannot hash.
 */
export function encodeContent(content, { msgpack = false } = {}) {
    const kind = kindOf(content);
    let fmt;
    let payload;
    switch (kind) {
        case "none":
            return { fmt: EMPTY, payload: EMPTY };
        case "str":
            payload = utf8(content);
            fmt = `${payload.length}s`;
            break;
        case "int":
            payload = ascii(intText(content));
            fmt = `${payload.length}i`;
            break;
        case "bytes":
            payload = bytesOf(content).slice();
            fmt = `${payload.length}b`;
            break;
        case "float":
            if (msgpack) {
                return { fmt: ascii("8f"), payload: double(floatOf(content)) };
            }
            return { fmt: ascii("4f"), payload: single(floatOf(content)) };
        case "list":
        case "tuple":
        case "dict":
        case "map": {
            if (msgpack) {
                return { fmt: ascii("m"), payload: packMsgpack(content) };
            }
            const tokens = [TOP_LETTER[kind]];
            const parts = [];
            encodeNativeItems(flatItems(content, kind), kind, tokens, parts, 1);
            return { fmt: ascii(tokens.join("")), payload: concat(parts) };
        }
        case "bool":
        case "clientinfo":
            if (msgpack) {
                return { fmt: ascii("m"), payload: packMsgpack(content) };
            }
            throw needsMsgpack(content, null);
        default:
            throw notSendable(content);
    }
    return { fmt: ascii(fmt), payload };
}

// ----- native grammar, decoding

const VALUE_MARKS = "sibf[({";
const ALL_MARKS = "sibf[({])}";
const CLOSER_OF = { "[": "]", "(": ")", "{": "}" };

function isDigits(text) {
    return text.length > 0 && /^[0-9]+$/.test(text);
}

function decodeText(bytes) {
    try {
        return textDecoder.decode(bytes);
    } catch {
        throw malformed("a string is not valid UTF-8");
    }
}

/** ASCII decimal with an optional leading "-", and nothing else (letter `i`, ext type 3). */
function parseInt_(bytes) {
    const text = latin1(bytes);
    const digits = text[0] === "-" ? text.slice(1) : text;
    if (!isDigits(digits)) throw malformed(`${JSON.stringify(clip(text))} is not a decimal integer`);
    if (digits.length > MAX_INT_DIGITS) throw malformed(`an integer has more than ${MAX_INT_DIGITS} digits`);
    if (digits.length <= 15) {
        const number = Number(text);
        return number === 0 ? 0 : number; // "-0" is the int 0
    }
    return fromBigInt(BigInt(text));
}

function parseFloat_(bytes, offset, size) {
    const view = new DataView(bytes.buffer, bytes.byteOffset + offset, size);
    if (size === 8) return view.getFloat64(0);
    if (size === 4) return view.getFloat32(0);
    throw malformed(`a float is 4 or 8 bytes, not ${size}`);
}

function clip(text, length = 40) {
    return text.length <= length ? text : `${text.slice(0, length)}...`;
}

/** Build a dict from [key, value] pairs: a plain object when every key is a string, a Map otherwise. */
function buildDict(pairs) {
    let allText = true;
    for (const [key] of pairs) {
        if (typeof key !== "string") {
            allText = false;
            if (!isHashable(key)) throw malformed("a dict key is not hashable (a list or a dict)");
        }
    }
    if (!allText) return new Map(pairs);
    const object = {};
    for (const [key, value] of pairs) {
        if (key === "__proto__") {
            // Assignment would set the object's prototype; a property is what was sent.
            Object.defineProperty(object, key, { value, enumerable: true, writable: true, configurable: true });
        } else {
            object[key] = value;
        }
    }
    return object;
}

function buildContainer(kind, items) {
    if (kind === "l" || kind === "[") return items;
    if (kind === "t" || kind === "(") return Tuple.from(items);
    if (items.length % 2) throw malformed("a dict has a key without a value");
    const pairs = [];
    for (let i = 0; i < items.length; i += 2) pairs.push([items[i], items[i + 1]]);
    return buildDict(pairs);
}

function decodeSingle(fmt, data) {
    const digits = fmt.slice(0, -1);
    const letter = fmt.slice(-1);
    if (!isDigits(digits) || digits.length > MAX_LEN_DIGITS) {
        throw malformed(`fmt ${JSON.stringify(clip(fmt))} does not follow the grammar`);
    }
    if (Number(digits) !== data.length) throw malformed("the fmt's LEN is not the payload's length");
    switch (letter) {
        case "s":
            return decodeText(data);
        case "i":
            return parseInt_(data);
        case "b":
            return data.slice();
        case "f":
            return parseFloat_(data, 0, data.length);
        default:
            throw malformed(`unknown type letter ${JSON.stringify(letter)}`);
    }
}

function decodeNative(fmt, data, limits) {
    if (fmt === "") {
        if (data.length) throw malformed("empty fmt (None) with a non-empty payload");
        return null;
    }
    const top = fmt[0];
    if (top !== "l" && top !== "t" && top !== "d") return decodeSingle(fmt, data);
    let values = 1;
    for (const ch of fmt) if (VALUE_MARKS.includes(ch)) values++;
    if (values > limits.maxItems) throw malformed(`more than ${limits.maxItems} values`);

    let pos = 0; // next unread payload byte
    let limit = data.length; // end of the innermost open container's bytes
    let closer = null; // what closes the innermost open container (null at the top level)
    let items = [];
    let kind = top;
    const stack = [];
    let i = 1;
    while (i < fmt.length) {
        let j = i;
        while (j < fmt.length && fmt.charCodeAt(j) >= 48 && fmt.charCodeAt(j) <= 57) j++;
        if (j >= fmt.length) throw malformed(`fmt ${JSON.stringify(clip(fmt))} ends with a LEN and no letter`);
        const digits = fmt.slice(i, j);
        const mark = fmt[j];
        if (!ALL_MARKS.includes(mark)) throw malformed(`unexpected ${JSON.stringify(mark)} in fmt`);
        i = j + 1;
        let n;
        if (digits === "") {
            if (!"])}".includes(mark)) throw malformed(`${JSON.stringify(mark)} in fmt has no LEN`);
            n = 0;
        } else {
            if (digits.length > MAX_LEN_DIGITS) throw malformed("a LEN has more than 19 digits");
            n = Number(digits);
        }
        const end = pos + n;
        if (end > limit) throw malformed("a LEN runs past its container or the payload");
        if (mark === "s") {
            items.push(decodeText(data.subarray(pos, end)));
        } else if (mark === "i") {
            items.push(parseInt_(data.subarray(pos, end)));
        } else if (mark === "b") {
            items.push(data.slice(pos, end));
        } else if (mark === "f") {
            items.push(parseFloat_(data, pos, n));
        } else if (mark === closer) {
            if (digits !== "") throw malformed("a closing bracket has a LEN");
            if (pos !== limit) throw malformed("a container's LEN does not match its contents");
            const value = buildContainer(kind, items);
            ({ items, closer, limit, kind } = stack.pop());
            items.push(value);
            continue;
        } else if (mark in CLOSER_OF) {
            if (stack.length + 2 > limits.maxNesting) {
                throw malformed(`containers nest deeper than ${limits.maxNesting} levels`);
            }
            stack.push({ items, closer, limit, kind });
            items = [];
            closer = CLOSER_OF[mark];
            limit = end;
            kind = mark;
            continue; // the container's bytes are its children's: pos stays
        } else {
            throw malformed(`unexpected ${JSON.stringify(mark)} in fmt`);
        }
        pos = end;
    }
    if (stack.length) throw malformed("a container is not closed");
    if (pos !== data.length) throw malformed("the payload is longer than its fmt says");
    return buildContainer(top, items);
}

// ----- msgpack
//
// @msgpack/msgpack does the byte work; hisock's types need a few hooks it does not offer,
// so its Encoder and Decoder are subclassed, overriding these methods of version 3.1.3:
// Encoder.encodeNumber / encodeBigInt64 / encodeObject (ints as Python packs them, Float,
// Map, ArrayBuffer, ints beyond 64 bits) and Decoder.decodeUtf8String (strict UTF-8, and
// the "__proto__" key the library refuses).  Every map key goes through mapKeyConverter,
// which swaps it for a fresh Symbol so that no key is turned into a string; `finish`
// then builds plain objects and Maps from the real keys, in their order.

/** Stands for a map key "__proto__", which the library refuses before mapKeyConverter sees it. */
const PROTO_KEY = Object.freeze({ protoKey: true });

const extensions = new ExtensionCodec();
extensions.register({
    type: EXT_TIMESTAMP,
    encode: () => null, // never sent (a Date is not Sendable)
    decode: (data) => {
        const { sec, nsec } = decodeTimestampToTimeSpec(data);
        return sec + nsec / 1e9; // seconds, as Python's msgpack.unpackb(timestamp=1)
    },
});
extensions.register({
    type: EXT_TUPLE,
    encode: (value) => (value instanceof Tuple ? new WireEncoder().encode(Array.from(value)) : null),
    decode: (data, type, reader) => reader.tuple(data),
});
extensions.register({
    type: EXT_CLIENT_INFO,
    encode: (value) => (value instanceof ClientInfo ? new WireEncoder().encode(clientInfoFields(value)) : null),
    decode: (data, type, reader) => reader.clientInfo(data),
});
extensions.register({
    type: EXT_BIG_INT,
    encode: () => null, // WireEncoder.encodeBigInt64 writes it
    decode: (data) => parseInt_(data),
});
/** For the fields of a ClientInfo, where no ext may appear: every ext stays ExtData and is refused. */
const noExtensions = new ExtensionCodec();
noExtensions.register({ type: EXT_TIMESTAMP, encode: () => null, decode: (data) => new ExtData(EXT_TIMESTAMP, data) });

function clientInfoFields(info) {
    const ip = info.ip;
    const [host, port] = Array.isArray(ip) && ip.length === 2 ? ip : [];
    const portOk = (typeof port === "number" && Number.isInteger(port)) || typeof port === "bigint";
    if (
        typeof host !== "string" ||
        !portOk ||
        port < 0 ||
        port > 65535 ||
        !(info.name === null || typeof info.name === "string") ||
        !(info.group === null || typeof info.group === "string")
    ) {
        throw new InvalidTypeCast(
            `${info} cannot be sent: it needs ip [host string, port 0-65535] and string or null name and group`,
        );
    }
    for (const text of [host, info.name, info.group]) if (text !== null) utf8(text);
    return [host, Number(port), info.name, info.group];
}

class WireEncoder extends Encoder {
    constructor() {
        // Nesting is checked (64 levels) before encoding; tuples restart the library's count.
        super({ extensionCodec: extensions, useBigInt64: true, maxDepth: 4 * MAX_NESTING, initialBufferSize: 256 });
    }

    encodeNumber(value) {
        if (!isIntegerNumber(value)) {
            this.encodeNumberAsFloat(value);
        } else if (value >= INT32_MIN && value < UINT32_LIMIT) {
            super.encodeNumber(value);
        } else {
            this.encodeBigInt64(BigInt(value));
        }
    }

    encodeBigInt64(value) {
        // Python packs each int in its smallest form: uint64 / int64 only beyond 32 bits.
        if (value >= BigInt(INT32_MIN) && value < BigInt(UINT32_LIMIT)) {
            super.encodeNumber(Number(value));
        } else if (value >= INT64_MIN && value <= UINT64_MAX) {
            super.encodeBigInt64(value);
        } else {
            this.encodeExtension(new ExtData(EXT_BIG_INT, ascii(value.toString())));
        }
    }

    encodeObject(object, depth) {
        if (object instanceof Float) {
            this.encodeNumberAsFloat(object.value);
        } else if (object instanceof Map) {
            const size = object.size;
            if (size < 16) {
                this.writeU8(0x80 + size);
            } else if (size < 0x10000) {
                this.writeU8(0xde);
                this.writeU16(size);
            } else {
                this.writeU8(0xdf);
                this.writeU32(size);
            }
            for (const [key, value] of object) {
                this.doEncode(key, depth + 1);
                this.doEncode(value, depth + 1);
            }
        } else if (object instanceof ArrayBuffer) {
            this.encodeBinary(new Uint8Array(object));
        } else {
            super.encodeObject(object, depth);
        }
    }
}

/** Refuse, before any byte is packed, what Python could not read back (see encodeContent). */
function checkForMsgpack(value, depth) {
    const kind = kindOf(value);
    switch (kind) {
        case "str":
            utf8(value);
            return;
        case "int":
            if (typeof value === "bigint") intText(value);
            return;
        case "none":
        case "bool":
        case "float":
        case "bytes":
            return;
        case "clientinfo":
            clientInfoFields(value);
            return;
        case "list":
        case "tuple":
            if (depth >= MAX_NESTING) throw tooDeep();
            for (const item of value) checkForMsgpack(item, depth + 1);
            return;
        case "dict":
            if (depth >= MAX_NESTING) throw tooDeep();
            for (const key of Object.keys(value)) {
                utf8(key);
                checkForMsgpack(value[key], depth + 1);
            }
            return;
        case "map":
            if (depth >= MAX_NESTING) throw tooDeep();
            for (const [key, item] of value) {
                checkKey(key);
                checkForMsgpack(key, depth + 1);
                checkForMsgpack(item, depth + 1);
            }
            return;
        default:
            throw notSendable(value);
    }
}

function packMsgpack(value) {
    checkForMsgpack(value, 0);
    return new WireEncoder().encode(value);
}

class WireDecoder extends Decoder {
    constructor(reader, size, codec = extensions) {
        super({
            extensionCodec: codec,
            context: reader,
            useBigInt64: true,
            keyDecoder: null,
            mapKeyConverter: (key) => reader.key(key),
            // Every element takes a byte: no header may claim more than the document holds.
            maxArrayLength: size,
            maxMapLength: size,
        });
    }

    decodeUtf8String(byteLength, headerOffset) {
        if (this.bytes.byteLength < this.pos + headerOffset + byteLength) {
            throw new RangeError("Insufficient data");
        }
        const offset = this.pos + headerOffset;
        const text = decodeText(this.bytes.subarray(offset, offset + byteLength));
        this.pos += headerOffset + byteLength;
        return text === "__proto__" && this.stateIsMapKey() ? PROTO_KEY : text;
    }
}

/** One msgpack document's decoding: the map keys seen, tuple depth, and the final walk. */
class MsgpackReader {
    constructor(limits) {
        this.limits = limits;
        this.keys = new Map(); // Symbol -> the real map key
        this.tupleDepth = 0;
        this.count = 1;
    }

    read(bytes, codec = extensions) {
        return new WireDecoder(this, bytes.length, codec).decode(bytes);
    }

    key(key) {
        const symbol = Symbol();
        this.keys.set(symbol, key === PROTO_KEY ? "__proto__" : key);
        return symbol;
    }

    tuple(data) {
        // A tuple's items are a document of their own, decoded from inside the ext hook.
        if (this.tupleDepth >= this.limits.maxNesting) {
            throw malformed(`containers nest deeper than ${this.limits.maxNesting} levels`);
        }
        this.tupleDepth++;
        try {
            const items = this.read(data);
            if (!Array.isArray(items) || items instanceof Tuple) throw malformed("a tuple ext does not hold an array");
            return Tuple.from(items);
        } finally {
            this.tupleDepth--;
        }
    }

    clientInfo(data) {
        const fields = this.read(data, noExtensions);
        if (!Array.isArray(fields) || fields.length !== 4) {
            throw malformed("a ClientInfo ext does not hold [host, port, name, group]");
        }
        const [host, rawPort, name, group] = fields;
        const port = typeof rawPort === "bigint" ? fromBigInt(rawPort) : rawPort;
        if (
            typeof host !== "string" ||
            typeof port !== "number" ||
            !Number.isInteger(port) ||
            port < 0 ||
            port > 65535 ||
            !(name === null || typeof name === "string") ||
            !(group === null || typeof group === "string")
        ) {
            throw malformed("a ClientInfo ext has fields of the wrong types");
        }
        return new ClientInfo([host, port], name, group);
    }

    /** The decoded value with real keys, ints as numbers where exact, bytes copied, limits checked. */
    finish(value, depth = 0) {
        if (typeof value === "bigint") return fromBigInt(value);
        if (value === null || typeof value !== "object") return value;
        if (value instanceof Uint8Array) return value.slice();
        if (value instanceof ClientInfo) return value;
        if (value instanceof ExtData) throw malformed(`unknown msgpack ext type ${value.type}`);
        const { maxNesting, maxItems } = this.limits;
        if (depth >= maxNesting) throw malformed(`containers nest deeper than ${maxNesting} levels`);
        if (Array.isArray(value)) {
            this.count += value.length;
            if (this.count > maxItems) throw malformed(`more than ${maxItems} values`);
            for (let i = 0; i < value.length; i++) value[i] = this.finish(value[i], depth + 1);
            return value;
        }
        const symbols = Object.getOwnPropertySymbols(value);
        this.count += 2 * symbols.length;
        if (this.count > maxItems) throw malformed(`more than ${maxItems} values`);
        const pairs = symbols.map((symbol) => [
            this.finish(this.keys.get(symbol), depth + 1),
            this.finish(value[symbol], depth + 1),
        ]);
        return buildDict(pairs);
    }
}

/**
 * Decode a command message's `(fmt, payload)` (PROTOCOL.md section 3) to a JavaScript
 * value (see the table at the top of this file).  Accepts both codecs, from anyone.
 *
 * @param {Uint8Array} fmt
 * @param {Uint8Array} payload
 * @param {{maxNesting?: number, maxItems?: number}} [limits]
 * @throws {MalformedPayload} whatever is wrong with the bytes; nothing else.
 */
export function decodeContent(fmt, payload, { maxNesting = MAX_NESTING, maxItems = MAX_ITEMS } = {}) {
    const limits = { maxNesting, maxItems };
    try {
        for (const byte of fmt) if (byte > 0x7f) throw malformed("fmt is not ASCII");
        const text = latin1(fmt);
        if (text !== "m") return decodeNative(text, payload, limits);
        const reader = new MsgpackReader(limits);
        return reader.finish(reader.read(payload));
    } catch (err) {
        // Bytes from the network never escape as anything else (the library's DecodeError
        // and RangeError for a cut-short document included).
        if (err instanceof MalformedPayload) throw err;
        const kind = err instanceof DecodeError ? "msgpack" : err?.name ?? "error";
        throw malformed(`${kind}: ${err?.message ?? err}`);
    }
}

// =========================================================================== frame bodies

/** Capability strings this client offers in its hello. */
export const CAPABILITIES = Object.freeze(["msgpack", "call"]);
/** The command of the server's answer to `$GETCLT$`. */
export const GETCLT_COMMAND = "$GETCLT$";
/** The `traceback` of a `$GETCLT$` answer about a client that does not exist. */
export const NO_SUCH_CLIENT = "$NOEXIST$";

const CMD = ascii("$CMD$");
const MSG = ascii("$MSG$");
const FMT_LEN_WIDTH = 8;
// Python's re "." matches anything but "\n" (JavaScript's also refuses "\r" and others).
const RESERVED_COMMAND = /\$[^\n]+\$/;

/** True when `command` has the `$...$` form HiSock reserves for itself. */
export function isReservedCommand(command) {
    return RESERVED_COMMAND.test(command);
}

function checkCommand(command) {
    if (typeof command !== "string") {
        throw new InvalidCommand(`a command is a string, not ${typeof command}`);
    }
    if (isReservedCommand(command)) {
        throw new InvalidCommand(`commands of the form "$command$" are reserved for HiSock: ${JSON.stringify(command)}`);
    }
    if (!isWellFormed(command)) throw new InvalidCommand("a command cannot hold a lone surrogate");
}

/** JSON as Python's json.dumps(separators=(",", ":")) writes it: compact, non-ASCII as \uXXXX. */
function pyJson(value) {
    const text = JSON.stringify(value).replace(
        /[\u0080-\uffff]/g,
        (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, "0")}`,
    );
    return ascii(text);
}

function parseJson(bytes, what) {
    try {
        return JSON.parse(decodeTextOr(bytes, what));
    } catch (err) {
        if (err instanceof RemoteProtocolError) throw err;
        throw new MalformedMessage(`${what} is not JSON`);
    }
}

function decodeTextOr(bytes, what) {
    try {
        return textDecoder.decode(bytes);
    } catch {
        throw new MalformedMessage(`${what} is not UTF-8`);
    }
}

function isPlainObject(value) {
    return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The 8-byte, space-padded fmt length of a command message. */
export function fmtLengthField(length) {
    const digits = String(length);
    if (digits.length > FMT_LEN_WIDTH) {
        throw new ContentTooLarge(`a fmt of ${length} bytes does not fit the 8-digit fmt length`);
    }
    return ascii(digits.padEnd(FMT_LEN_WIDTH, " "));
}

// ----- building bodies

/** `$CMD$<command>$MSG$<fmt length><fmt><payload>` (the command is not checked here). */
export function commandBody(command, fmt, payload) {
    return concat([CMD, textEncoder.encode(command), MSG, fmtLengthField(fmt.length), fmt, payload]);
}

/** `$CLTHELLO$` + JSON: `extra` keys (caps, auth) first, then name and group, as Python writes it. */
export function helloBody(name, group, extra = {}) {
    return concat([ascii("$CLTHELLO$"), pyJson({ ...extra, name: name ?? null, group: group ?? null })]);
}

export function userCloseBody() {
    return ascii("$USRCLOSE$");
}

/** `$CHNAME$`; the empty string means "back to the name of the hello". */
export function changeNameBody(name) {
    return concat([ascii("$CHNAME$"), utf8(name)]);
}

/** `$CHGROUP$`; the empty string means "back to the group of the hello". */
export function changeGroupBody(group) {
    return concat([ascii("$CHGROUP$"), utf8(group)]);
}

export function keepAckBody() {
    return ascii("$KEEPACK$");
}

/** `$GETCLT$` + a client's name or `"ip:port"`. */
export function getClientBody(query) {
    return concat([ascii("$GETCLT$"), utf8(query)]);
}

/** `$CLTCONN$` + a client-info object (keys in the order given). */
export function peerJoinedBody(info) {
    return concat([ascii("$CLTCONN$"), pyJson(info)]);
}

export function peerLeftBody(info) {
    return concat([ascii("$CLTDISCONN$"), pyJson(info)]);
}

/** `$DISCONN$`, with a JSON object (`{"reason": ...}`) when `details` is given. */
export function disconnectBody(details = null) {
    return details ? concat([ascii("$DISCONN$"), pyJson(details)]) : ascii("$DISCONN$");
}

export function keepAliveBody() {
    return ascii("$KEEPALIVE$");
}

/** The call extension's request: `$CALL$<id>:` + a command message body. */
export function callBody(id, command, fmt, payload) {
    return concat([ascii(`$CALL$${id}:`), commandBody(command, fmt, payload)]);
}

/** The call extension's answer: `$REPLY$<id>:` + fmt length + fmt + payload. */
export function replyBody(id, fmt, payload) {
    return concat([ascii(`$REPLY$${id}:`), fmtLengthField(fmt.length), fmt, payload]);
}

/** The call extension's failure: `$CALLERR$<id>:` + `{"type": ..., "message": ...}`. */
export function callErrorBody(id, type, message) {
    return concat([ascii(`$CALLERR$${id}:`), pyJson({ type, message })]);
}

// ----- parsing bodies

function startsWith(body, prefix, at = 0) {
    if (body.length < at + prefix.length) return false;
    for (let i = 0; i < prefix.length; i++) if (body[at + i] !== prefix[i]) return false;
    return true;
}

function indexOf(body, needle, from) {
    const last = body.length - needle.length;
    outer: for (let i = from; i <= last; i++) {
        for (let j = 0; j < needle.length; j++) if (body[i + j] !== needle[j]) continue outer;
        return i;
    }
    return -1;
}

/** fmt and payload from the 8-byte fmt length field at `start` onwards. */
function parseFmtAndPayload(body, start) {
    const fmtStart = start + FMT_LEN_WIDTH;
    const digits = latin1(body.subarray(start, fmtStart)).replace(/^ +| +$/g, "");
    if (body.length < fmtStart || !isDigits(digits)) {
        throw new MalformedMessage("command message has no valid fmt length");
    }
    const fmtEnd = fmtStart + Number(digits);
    if (fmtEnd > body.length) throw new MalformedMessage("fmt length runs past the end of the message");
    return { fmt: body.subarray(fmtStart, fmtEnd), payload: body.subarray(fmtEnd) };
}

function parseCommand(body) {
    const split = indexOf(body, MSG, CMD.length);
    if (split < 0) throw new MalformedMessage("command message without $MSG$");
    let command;
    try {
        command = textDecoder.decode(body.subarray(CMD.length, split));
    } catch {
        throw new MalformedMessage("command is not UTF-8");
    }
    return { type: "Command", command, ...parseFmtAndPayload(body, split + MSG.length) };
}

function parseInfo(argument) {
    const info = parseJson(argument, "client info");
    if (!isPlainObject(info)) throw new MalformedMessage("client info is not a JSON object");
    const ip = info.ip;
    if (!(Array.isArray(ip) && ip.length === 2 && typeof ip[0] === "string" && Number.isInteger(ip[1]))) {
        throw new MalformedMessage("client info has no [host, port] ip");
    }
    for (const key of ["name", "group"]) {
        if (info[key] != null && typeof info[key] !== "string") {
            throw new MalformedMessage(`client info ${key} is not a string`);
        }
    }
    return info;
}

function parseDetails(argument) {
    // Only advice: what cannot be read is ignored.
    if (!argument.length) return null;
    try {
        const details = JSON.parse(textDecoder.decode(argument));
        return isPlainObject(details) ? details : null;
    } catch {
        return null;
    }
}

function parseHello(argument) {
    let hello;
    try {
        hello = JSON.parse(textDecoder.decode(argument));
    } catch {
        throw new HandshakeError("hello is not JSON");
    }
    if (!isPlainObject(hello)) throw new HandshakeError("hello is not a JSON object");
    const { name = null, group = null, ...extra } = hello;
    for (const [label, value] of [["name", name], ["group", group]]) {
        if (value !== null && typeof value !== "string") throw new HandshakeError(`hello ${label} is not a string`);
    }
    return { type: "Hello", name, group, extra };
}

/** `<id>:` at the start of a call-extension argument: the id's digits and the offset after the colon. */
function parseCallId(argument) {
    const colon = argument.indexOf(0x3a);
    const id = colon < 0 ? "" : latin1(argument.subarray(0, colon));
    if (!isDigits(id) || id.length > 20) throw new MalformedMessage("a call message has no valid id");
    return { id, rest: colon + 1 };
}

function parseCallMessage(tag, argument) {
    const { id, rest } = parseCallId(argument);
    const tail = argument.subarray(rest);
    if (tag === "$CALL$") {
        if (!startsWith(tail, CMD)) throw new MalformedMessage("a $CALL$ does not hold a command message");
        const { command, fmt, payload } = parseCommand(tail);
        return { type: "Call", id, command, fmt, payload };
    }
    if (tag === "$REPLY$") return { type: "Reply", id, ...parseFmtAndPayload(tail, 0) };
    const error = parseJson(tail, "a $CALLERR$");
    if (!isPlainObject(error)) throw new MalformedMessage("a $CALLERR$ does not hold a JSON object");
    return {
        type: "CallError",
        id,
        error: {
            type: typeof error.type === "string" ? error.type : "Exception",
            message: typeof error.message === "string" ? error.message : "",
        },
    };
}

const SERVER_TAGS = {
    $CLTCONN$: (arg) => ({ type: "PeerJoined", info: parseInfo(arg) }),
    $CLTDISCONN$: (arg) => ({ type: "PeerLeft", info: parseInfo(arg) }),
    $DISCONN$: (arg) => ({ type: "Disconnect", details: parseDetails(arg) }),
    $KEEPALIVE$: () => ({ type: "KeepAlive" }),
};

const CLIENT_TAGS = {
    $CLTHELLO$: parseHello,
    $USRCLOSE$: () => ({ type: "UserClose" }),
    $CHNAME$: (arg) => ({ type: "ChangeName", name: decodeTextOr(arg, "name") }),
    $CHGROUP$: (arg) => ({ type: "ChangeGroup", group: decodeTextOr(arg, "group") }),
    $KEEPACK$: () => ({ type: "KeepAck" }),
    $GETCLT$: (arg) => ({ type: "GetClient", query: decodeTextOr(arg, "client query") }),
};

const CALL_TAGS = new Set(["$CALL$", "$REPLY$", "$CALLERR$"]);

function parseBody(body, tags) {
    if (startsWith(body, CMD)) return parseCommand(body);
    const end = body[0] === 0x24 ? body.indexOf(0x24, 1) : -1;
    if (end < 0) {
        throw new MalformedMessage(`body ${JSON.stringify(clip(latin1(body.subarray(0, 24))))} is neither a reserved nor a command message`);
    }
    const tag = latin1(body.subarray(0, end + 1));
    const argument = body.subarray(end + 1);
    if (CALL_TAGS.has(tag)) return parseCallMessage(tag, argument);
    if (!Object.hasOwn(tags, tag)) throw new MalformedMessage(`unknown reserved message ${JSON.stringify(clip(tag, 24))}`);
    return tags[tag](argument);
}

/**
 * Parse a body the server sent: `{type: "Command", command, fmt, payload}`,
 * `{type: "PeerJoined" | "PeerLeft", info}`, `{type: "Disconnect", details}`,
 * `{type: "KeepAlive"}`, or the call extension's `{type: "Call", id, command, fmt,
 * payload}`, `{type: "Reply", id, fmt, payload}`, `{type: "CallError", id, error}`.
 *
 * @param {Uint8Array} body
 * @throws {MalformedMessage}
 */
export function parseServerBody(body) {
    return parseBody(body, SERVER_TAGS);
}

/**
 * Parse a body a client sent (what a server, or a test's fake one, reads):
 * `Hello {name, group, extra}`, `UserClose`, `ChangeName {name}`, `ChangeGroup {group}`,
 * `KeepAck`, `GetClient {query}`, `Command` and the call extension's messages.
 *
 * @throws {MalformedMessage} or HandshakeError for a bad hello.
 */
export function parseClientBody(body) {
    return parseBody(body, CLIENT_TAGS);
}

// =========================================================================== reconnecting

/**
 * Milliseconds to wait before reconnect attempt `attempt` (1 for the first): the nominal
 * delay `min(max, base * 2^(attempt - 1))`, jittered to between half of it and all of it
 * so that many browsers cut off at once do not all come back at once.
 */
export function reconnectDelay(attempt, { base = 1000, max = 30000, random = Math.random } = {}) {
    const nominal = Math.min(max, base * 2 ** Math.min(Math.max(attempt - 1, 0), 60));
    return nominal / 2 + (random() * nominal) / 2;
}

// =========================================================================== the client

/** The `$DISCONN$` reason of a server shutting down (PROTOCOL.md section 7.4): a reconnecting client comes back. */
const SERVER_CLOSING = "server closing";

const RESERVED_EVENTS = new Set(["client_connect", "client_disconnect", "force_disconnect", "reconnect", "*"]);

const DEFAULTS = Object.freeze({
    name: null,
    group: null,
    auth: undefined,
    reconnect: true,
    reconnectDelay: 1000,
    reconnectDelayMax: 30000,
    reconnectAttempts: 0,
    connectTimeout: 10000,
    answerTimeout: 10000,
    callTimeout: 10000,
    maxMessageSize: 16 * 1024 * 1024,
    maxQueueBytes: 16 * 1024 * 1024,
    maxNesting: MAX_NESTING,
    maxItems: MAX_ITEMS,
    WebSocketImpl: undefined,
    clock: undefined,
    random: Math.random,
    onError: undefined,
});

function reportError(error, where) {
    console.error(`hisock: ${where}:`, error);
}

/**
 * A HiSock client over one WebSocket at a time (a new one after each reconnect).
 *
 * Options (all optional):
 *  - `name`, `group`: strings or null, sent in the hello.
 *  - `auth`: credentials for the server's authentication check (anything JSON carries).
 *  - `reconnect` (true): when the connection is lost, connect again with exponential
 *    backoff and jitter (`reconnectDelay` 1000 ms doubling up to `reconnectDelayMax`
 *    30000 ms, see {@link reconnectDelay}); give up after `reconnectAttempts` failed
 *    attempts in a row (0: never).  Also after `$DISCONN$` whose reason is "server
 *    closing" (the server went down gracefully and comes back), as the Python client
 *    does; not after any other `$DISCONN$` (the server meant it), not after `close()`,
 *    and not when the first connection fails (`connect()` rejects).
 *  - `connectTimeout` (10000 ms): opening plus the server's answer to the hello.
 *  - `answerTimeout` (10000 ms): each `getClient`.  `callTimeout` (10000 ms): each `call`
 *    by default (0 or Infinity: none).
 *  - `maxMessageSize` (16 MiB): the largest body sent or accepted.
 *  - `maxQueueBytes` (16 MiB): sends while disconnected wait, in order, up to this many
 *    bytes (past it `send` throws SendQueueFull); while connected, the WebSocket's
 *    `bufferedAmount` is held to it the same way.
 *  - `maxNesting` (64), `maxItems` (1 000 000): limits on received content.
 *  - `WebSocketImpl`: the WebSocket class (default: the global one).
 *  - `onError(error, where)`: handler errors and protocol errors (default console.error).
 *  - `clock` ({setTimeout, clearTimeout}) and `random`: for tests.
 */
export class HiSockClient {
    constructor(url, options = {}) {
        for (const key of Object.keys(options)) {
            if (!Object.hasOwn(DEFAULTS, key)) throw new TypeError(`unknown option ${JSON.stringify(key)}`);
        }
        const opts = { ...DEFAULTS, ...options };
        for (const key of ["name", "group"]) {
            if (opts[key] != null && typeof opts[key] !== "string") {
                throw new TypeError(`${key} must be a string or null, not ${typeof opts[key]}`);
            }
        }
        if (!(opts.reconnectDelay > 0) || !(opts.reconnectDelayMax >= opts.reconnectDelay)) {
            throw new RangeError("reconnectDelay must be > 0 and reconnectDelayMax >= reconnectDelay");
        }
        this.url = url;
        /** Our name and group as the server has them (or will, once connected). */
        this.name = opts.name ?? null;
        this.group = opts.group ?? null;
        /** Connected and joined now. */
        this.connected = false;
        /** Closed for good: by close(), by $DISCONN$, or after giving up reconnecting. */
        this.closed = false;
        /** The server's accepted capabilities and what follows from them. */
        this.capabilities = [];
        this.msgpack = true; // the dialect sends are encoded in until the server has answered
        /** Our own ClientInfo as the server announced it. */
        this.info = null;
        /** Resolves with the reason once the client is closed for good. */
        this.whenClosed = new Promise((resolve) => {
            this._resolveClosed = resolve;
        });

        this._opts = opts;
        this._clock = opts.clock ?? globalThis;
        this._connectName = this.name; // what every hello says; "" in $CHNAME$ goes back to it
        this._connectGroup = this.group;
        this._commands = new Map();
        this._reserved = new Map();
        this._conn = null;
        this._started = false;
        this._queue = [];
        this._queuedBytes = 0;
        this._calls = new Map();
        this._nextCallId = 1;
        this._getclt = [];
        this._failures = 0;
        this._reconnectTimer = null;
    }

    /** Whether the server accepted the call extension. */
    get callSupported() {
        return this.capabilities.includes("call");
    }

    /**
     * Open the connection and join.  Resolves with the client once the server has answered
     * the hello.
     *
     * @throws {ServerNotRunning} no WebSocket could be opened.
     * @throws {ConnectionRejected} the server refused us, closed, or did not answer in time.
     * @throws {AuthenticationFailed} the server's check refused `auth`.
     */
    async connect() {
        if (this._started) throw new HiSockError("connect() was already called");
        this._started = true;
        try {
            await this._open();
        } catch (err) {
            this._finish(`could not connect: ${err.message}`);
            throw err;
        }
        return this;
    }

    /**
     * Register `handler` for a command (`handler(content)`, whose return value, awaited,
     * answers a call from the server) or a reserved event: `client_connect(info)`,
     * `client_disconnect(info)`, `force_disconnect()`, `reconnect()` and `*`
     * `(command, content)` for commands without a handler of their own.  One handler per
     * name: registering again replaces it.
     */
    on(command, handler) {
        if (typeof handler !== "function") throw new TypeError("a handler is a function");
        if (RESERVED_EVENTS.has(command)) {
            this._reserved.set(command, handler);
        } else {
            checkCommand(command);
            this._commands.set(command, handler);
        }
        return this;
    }

    /** Remove the handler of a command or reserved event. */
    off(command) {
        this._reserved.delete(command);
        this._commands.delete(command);
        return this;
    }

    /**
     * Send a command to the server.  While the client is reconnecting the message waits in
     * order (up to `maxQueueBytes`) and goes out right after the re-join.
     *
     * @throws {InvalidCommand} @throws {InvalidTypeCast} @throws {ContentTooLarge}
     * @throws {SendQueueFull} @throws {ClientDisconnected} the client is closed.
     */
    send(command, content = null) {
        checkCommand(command);
        if (this.closed) throw new ClientDisconnected("the client is closed");
        const msgpack = this.msgpack;
        const body = this._commandBody(command, content, msgpack);
        if (this.connected) {
            this._write(body);
            return;
        }
        if (this._queuedBytes + body.length > this._opts.maxQueueBytes) {
            throw new SendQueueFull(
                `${this._queuedBytes} bytes already wait for the connection; this message would pass maxQueueBytes (${this._opts.maxQueueBytes})`,
            );
        }
        this._queue.push({ command, content, msgpack, body });
        this._queuedBytes += body.length;
    }

    /**
     * Call a command's handler on the server and resolve with what it returns (the call
     * extension: the server must list "call" in its answer's caps).  Calls are not queued:
     * while the client is disconnected, and for calls pending when the connection ends,
     * the promise rejects at once with ClientDisconnected.
     *
     * @param {{timeout?: number}} [options] milliseconds (default `callTimeout`; 0 or Infinity: none).
     * @returns {Promise<*>} rejects with RemoteCallError (the handler failed), TimeoutError,
     *     ClientDisconnected, CallNotSupported, InvalidCommand, InvalidTypeCast or ContentTooLarge.
     */
    call(command, content = null, { timeout = this._opts.callTimeout } = {}) {
        return new Promise((resolve, reject) => {
            checkCommand(command);
            if (!this.connected) throw new ClientDisconnected("the client is not connected");
            if (!this.callSupported) {
                throw new CallNotSupported(
                    'call() needs the server to accept the "call" capability, and its answer to our hello did not list it',
                );
            }
            const { fmt, payload } = encodeContent(content, { msgpack: this.msgpack });
            const id = this._nextCallId++;
            const body = this._checkSize(callBody(id, command, fmt, payload), command);
            const pending = { resolve, reject, timer: null };
            if (timeout > 0 && timeout !== Infinity) {
                pending.timer = this._clock.setTimeout(() => {
                    this._calls.delete(id);
                    reject(new TimeoutError(`no answer to the call of ${JSON.stringify(command)} within ${timeout} ms`));
                }, timeout);
            }
            this._calls.set(id, pending);
            try {
                this._write(body);
            } catch (err) {
                this._calls.delete(id);
                this._clock.clearTimeout(pending.timer);
                throw err;
            }
        });
    }

    /**
     * Change our name; null or "" goes back to the name we connected with.  While
     * disconnected it takes effect at the re-join.
     */
    changeName(name) {
        this._change("name", name);
    }

    /** Change our group; null or "" goes back to the group we connected with. */
    changeGroup(group) {
        this._change("group", group);
    }

    _change(key, value) {
        if (value != null && typeof value !== "string") throw new TypeError(`a ${key} is a string or null`);
        if (this.closed) throw new ClientDisconnected("the client is closed");
        const base = key === "name" ? this._connectName : this._connectGroup;
        const body = key === "name" ? changeNameBody(value || "") : changeGroupBody(value || "");
        if (this.connected) this._write(body);
        this[key] = value || base;
    }

    /**
     * Ask the server about a client, by name, `"ip:port"`, `[ip, port]` or ClientInfo.
     *
     * @returns {Promise<ClientInfo>} rejects with ClientNotFound, TimeoutError (after
     *     `answerTimeout`) or ClientDisconnected.
     */
    getClient(client) {
        return new Promise((resolve, reject) => {
            let query;
            if (client instanceof ClientInfo) query = client.ipstr;
            else if (Array.isArray(client) && client.length === 2) query = `${client[0]}:${client[1]}`;
            else if (typeof client === "string") query = client;
            else throw new TypeError("a client is named by name, \"ip:port\", [ip, port] or ClientInfo");
            if (!this.connected) throw new ClientDisconnected("the client is not connected");
            this._write(getClientBody(query));
            const waiter = { resolve, reject, query, timer: null, done: false };
            const timeout = this._opts.answerTimeout;
            waiter.timer = this._clock.setTimeout(() => {
                // Answers come in order: the waiter stays queued, done, to swallow its late answer.
                waiter.done = true;
                reject(new TimeoutError(`the server did not answer getClient(${JSON.stringify(query)}) within ${timeout} ms`));
            }, timeout);
            this._getclt.push(waiter);
        });
    }

    /** Leave: tell the server (`$USRCLOSE$`) and close.  Queued sends are dropped.  Idempotent. */
    close() {
        if (this.closed) return;
        const conn = this._conn;
        if (conn && this.connected) {
            try {
                conn.ws.send(userCloseBody());
            } catch {
                // already going: nothing to tell
            }
        }
        this._finish("the client is closed");
    }

    // ------------------------------------------------------------------ connection life

    _open() {
        return new Promise((resolve, reject) => {
            const Impl = this._opts.WebSocketImpl ?? globalThis.WebSocket;
            if (typeof Impl !== "function") {
                throw new HiSockError("no WebSocket here: pass options.WebSocketImpl");
            }
            let ws;
            try {
                ws = new Impl(this.url);
            } catch (err) {
                throw new ServerNotRunning(`cannot open a WebSocket to ${this.url}: ${err.message}`);
            }
            const conn = { ws, opened: false, joined: false, ended: false, resolve, reject, timer: null };
            this._conn = conn;
            ws.binaryType = "arraybuffer";
            const timeout = this._opts.connectTimeout;
            conn.timer = this._clock.setTimeout(() => {
                this._handshakeFailed(conn, new ConnectionRejected(`the server did not answer our hello within ${timeout} ms`));
            }, timeout);
            ws.onopen = () => {
                if (conn.ended) return;
                conn.opened = true;
                const extra = { caps: [...CAPABILITIES] };
                if (this._opts.auth !== undefined) extra.auth = this._opts.auth;
                this._sendOn(conn, helloBody(this._connectName, this._connectGroup, extra));
            };
            ws.onmessage = (event) => this._onMessage(conn, event.data);
            ws.onerror = () => {}; // a close event follows, and says the rest
            ws.onclose = () => this._onClose(conn);
        });
    }

    _sendOn(conn, body) {
        try {
            conn.ws.send(body);
        } catch (err) {
            this._lost(conn, `the connection failed: ${err.message}`);
        }
    }

    _onMessage(conn, data) {
        if (conn.ended) return;
        let body;
        if (data instanceof ArrayBuffer) body = new Uint8Array(data);
        else if (ArrayBuffer.isView(data)) body = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        else {
            this._protocolError(conn, new MalformedMessage("the server sent a text message; HiSock messages are binary"));
            return;
        }
        if (body.length > this._opts.maxMessageSize) {
            this._protocolError(conn, new MalformedMessage(`a ${body.length}-byte message is more than maxMessageSize`));
            return;
        }
        try {
            this._route(conn, parseServerBody(body));
        } catch (err) {
            if (!(err instanceof RemoteProtocolError)) throw err;
            this._protocolError(conn, err);
        }
    }

    _route(conn, message) {
        switch (message.type) {
            case "Command": {
                const content = this._decode(message.fmt, message.payload);
                if (message.command === GETCLT_COMMAND && this._getclt.length) {
                    this._answerGetClient(this._getclt.shift(), content);
                } else {
                    this._dispatch(message.command, content);
                }
                return;
            }
            case "KeepAlive":
                this._sendOn(conn, keepAckBody());
                return;
            case "PeerJoined":
                if (!conn.joined) this._joined(conn, message.info); // the first one answers our hello
                else this._emit("client_connect", ClientInfo.fromObject(message.info));
                return;
            case "PeerLeft":
                if (conn.joined) this._emit("client_disconnect", ClientInfo.fromObject(message.info));
                return;
            case "Disconnect": {
                const reason = typeof message.details?.reason === "string" ? message.details.reason : null;
                if (!conn.joined) {
                    const error =
                        reason === "authentication failed"
                            ? new AuthenticationFailed("the server's authentication check refused us")
                            : new ConnectionRejected(`the server refused the connection ($DISCONN$)${reason ? `: ${reason}` : ""}`);
                    this._handshakeFailed(conn, error);
                    return;
                }
                const why = `the server disconnected us${reason ? `: ${reason}` : ""}`;
                if (reason === SERVER_CLOSING && this._opts.reconnect) {
                    this._lost(conn, why); // it comes back when the server does
                    return;
                }
                this._endConnection(conn, why);
                this._emit("force_disconnect");
                this._finish(why);
                return;
            }
            case "Call":
                this._answerCall(conn, message.id, message.command, this._decode(message.fmt, message.payload));
                return;
            case "Reply":
            case "CallError": {
                const id = Number(message.id);
                const pending = this._calls.get(id);
                if (!pending) return; // its caller gave up (timeout): a late answer is normal
                const result = message.type === "Reply" ? this._decode(message.fmt, message.payload) : null;
                this._calls.delete(id);
                this._clock.clearTimeout(pending.timer);
                if (message.type === "Reply") pending.resolve(result);
                else pending.reject(new RemoteCallError(message.error.type, message.error.message));
                return;
            }
            default:
                throw new MalformedMessage(`a client does not expect ${message.type}`);
        }
    }

    _decode(fmt, payload) {
        return decodeContent(fmt, payload, { maxNesting: this._opts.maxNesting, maxItems: this._opts.maxItems });
    }

    _joined(conn, info) {
        conn.joined = true;
        this._clock.clearTimeout(conn.timer);
        const caps = Array.isArray(info.caps) ? info.caps.filter((cap) => typeof cap === "string") : [];
        this.capabilities = caps.filter((cap) => CAPABILITIES.includes(cap));
        this.msgpack = this.capabilities.includes("msgpack");
        this.info = ClientInfo.fromObject(info);
        this.connected = true;
        // The hello said the names we connected with: say what they are now, then what waited.
        if (this.name !== this._connectName) this._sendOn(conn, changeNameBody(this.name ?? ""));
        if (this.group !== this._connectGroup) this._sendOn(conn, changeGroupBody(this.group ?? ""));
        const queued = this._queue;
        this._queue = [];
        this._queuedBytes = 0;
        for (const item of queued) {
            if (conn.ended) break;
            let body = item.body;
            if (item.msgpack !== this.msgpack) {
                try {
                    body = this._commandBody(item.command, item.content, this.msgpack);
                } catch (err) {
                    this._report(err, `a queued ${JSON.stringify(item.command)} cannot be sent to this server`);
                    continue;
                }
            }
            this._sendOn(conn, body);
        }
        conn.resolve();
    }

    _onClose(conn) {
        if (conn.ended) return;
        if (!conn.joined) {
            this._handshakeFailed(
                conn,
                conn.opened
                    ? new ConnectionRejected("the server closed the connection during the handshake")
                    : new ServerNotRunning(`cannot open a WebSocket to ${this.url}`),
            );
            return;
        }
        this._lost(conn, "the connection to the server closed");
    }

    _protocolError(conn, error) {
        this._report(error, "the server broke the protocol; closing the connection");
        if (!conn.joined) {
            this._handshakeFailed(conn, new ConnectionRejected(`the server's answer broke the protocol: ${error.message}`));
        } else {
            this._lost(conn, `the server broke the protocol: ${error.message}`);
        }
    }

    _handshakeFailed(conn, error) {
        if (conn.ended) return;
        this._endConnection(conn, error.message);
        conn.reject(error);
    }

    /** A joined connection ended without `$DISCONN$`: reconnect, or finish. */
    _lost(conn, why) {
        if (conn.ended) return;
        this._endConnection(conn, why);
        if (this.closed) return;
        if (this._opts.reconnect) this._scheduleReconnect();
        else this._finish(why);
    }

    /** Close one connection and fail what waited on it (calls, getClient); nothing is left behind. */
    _endConnection(conn, why) {
        conn.ended = true;
        this._clock.clearTimeout(conn.timer);
        if (this._conn === conn) {
            this._conn = null;
            this.connected = false;
        }
        try {
            conn.ws.close(1000);
        } catch {
            // closing a socket that is already closed
        }
        const error = new ClientDisconnected(why);
        const calls = [...this._calls.values()];
        this._calls.clear();
        for (const pending of calls) {
            this._clock.clearTimeout(pending.timer);
            pending.reject(error);
        }
        const waiters = this._getclt;
        this._getclt = [];
        for (const waiter of waiters) {
            this._clock.clearTimeout(waiter.timer);
            if (!waiter.done) waiter.reject(error);
        }
    }

    _scheduleReconnect() {
        const attempt = ++this._failures;
        const most = this._opts.reconnectAttempts;
        if (most > 0 && attempt > most) {
            this._finish(`gave up reconnecting after ${most} attempts`);
            return;
        }
        const delay = reconnectDelay(attempt, {
            base: this._opts.reconnectDelay,
            max: this._opts.reconnectDelayMax,
            random: this._opts.random,
        });
        this._reconnectTimer = this._clock.setTimeout(() => {
            this._reconnectTimer = null;
            this._reconnectNow();
        }, delay);
    }

    _reconnectNow() {
        if (this.closed) return;
        this._open().then(
            () => {
                this._failures = 0;
                this._emit("reconnect");
            },
            (err) => {
                if (this.closed) return;
                if (err instanceof AuthenticationFailed) {
                    this._finish(err.message);
                    return;
                }
                this._scheduleReconnect();
            },
        );
    }

    /** Closed for good. */
    _finish(why) {
        if (this.closed && !this._conn) return;
        this.closed = true;
        this._clock.clearTimeout(this._reconnectTimer);
        this._reconnectTimer = null;
        if (this._conn) {
            const conn = this._conn;
            this._endConnection(conn, why);
            if (!conn.joined) conn.reject(new ClientDisconnected(why));
        }
        this._queue = [];
        this._queuedBytes = 0;
        this._resolveClosed(why);
    }

    // ------------------------------------------------------------------ sending

    _commandBody(command, content, msgpack) {
        const { fmt, payload } = encodeContent(content, { msgpack });
        return this._checkSize(commandBody(command, fmt, payload), command);
    }

    _checkSize(body, command) {
        if (body.length > this._opts.maxMessageSize) {
            throw new ContentTooLarge(
                `${JSON.stringify(command)} with this content is a ${body.length}-byte message, more than maxMessageSize (${this._opts.maxMessageSize})`,
            );
        }
        return body;
    }

    _write(body) {
        const conn = this._conn;
        if (!conn || !this.connected) throw new ClientDisconnected("the client is not connected");
        const buffered = conn.ws.bufferedAmount ?? 0;
        if (buffered + body.length > this._opts.maxQueueBytes) {
            throw new SendQueueFull(
                `${buffered} bytes are still waiting to go out; this message would pass maxQueueBytes (${this._opts.maxQueueBytes})`,
            );
        }
        conn.ws.send(body);
    }

    // ------------------------------------------------------------------ handlers

    _report(error, where) {
        (this._opts.onError ?? reportError)(error, where);
    }

    /** Run a handler; an error it throws (or its promise rejects with) is reported, not raised. */
    _run(handler, args, where) {
        let result;
        try {
            result = handler(...args);
        } catch (err) {
            this._report(err, where);
            return;
        }
        if (result && typeof result.then === "function") {
            result.then(undefined, (err) => this._report(err, where));
        }
    }

    _emit(event, ...args) {
        const handler = this._reserved.get(event);
        if (handler) this._run(handler, args, `the ${event} handler`);
    }

    _dispatch(command, content) {
        const handler = this._commands.get(command);
        if (handler) {
            this._run(handler, [content], `the handler of ${JSON.stringify(command)}`);
            return;
        }
        const catchAll = this._reserved.get("*");
        if (catchAll) this._run(catchAll, [command, content], "the * handler");
    }

    _answerGetClient(waiter, answer) {
        if (waiter.done) return; // its caller gave up: this is the late answer it left for
        waiter.done = true;
        this._clock.clearTimeout(waiter.timer);
        if (!isPlainObject(answer) || answer instanceof Map || answer.traceback === NO_SUCH_CLIENT || !("ip" in answer)) {
            waiter.reject(new ClientNotFound(`the server knows no client ${JSON.stringify(waiter.query)}`));
            return;
        }
        const ip = answer.ip;
        if (!(Array.isArray(ip) && ip.length === 2 && typeof ip[0] === "string" && Number.isInteger(ip[1]))) {
            waiter.reject(new HiSockError(`the server's answer about ${JSON.stringify(waiter.query)} is not a client info`));
            return;
        }
        waiter.resolve(new ClientInfo(ip, answer.name ?? null, answer.group ?? null));
    }

    /** The server calls us: run the command's handler and answer with its (awaited) result. */
    _answerCall(conn, id, command, content) {
        const answer = (body) => {
            if (conn.ended || this._conn !== conn) return; // the caller's connection is gone
            try {
                this._write(body);
            } catch (err) {
                this._report(err, `the answer to the server's call of ${JSON.stringify(command)} cannot be sent`);
            }
        };
        const fail = (err) => {
            const type = typeof err?.name === "string" ? err.name : typeof err;
            const message = typeof err?.message === "string" ? err.message : String(err);
            answer(callErrorBody(id, type, message));
        };
        const handler = this._commands.get(command);
        if (!handler) {
            fail({ name: "FunctionNotFoundException", message: `the client has no handler for ${JSON.stringify(command)}` });
            return;
        }
        new Promise((resolve) => resolve(handler(content))).then((value) => {
            let body;
            try {
                const { fmt, payload } = encodeContent(value === undefined ? null : value, { msgpack: this.msgpack });
                body = this._checkSize(replyBody(id, fmt, payload), command);
            } catch (err) {
                fail(err);
                return;
            }
            answer(body);
        }, fail);
    }
}

/**
 * Connect to a HiSock server over WebSocket and join; resolves with the client.
 * Options: see {@link HiSockClient}.
 */
export function connect(url, options = {}) {
    return new HiSockClient(url, options).connect();
}
