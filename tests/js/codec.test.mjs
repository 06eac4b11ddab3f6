// The content codec against byte vectors made by hisock_gevent's typecast (fixtures.json),
// and the choices JavaScript makes for types it lacks.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
    ClientInfo,
    Float,
    InvalidTypeCast,
    MalformedPayload,
    Tuple,
    decodeContent,
    encodeContent,
} from "../../hisock_gevent/static/hisock.js";
import { bytes, fixtures, fromDescription, hex, text, unhex } from "./helpers.mjs";

const MSGPACK = bytes("m");

function encodeHex(value, msgpack) {
    const { fmt, payload } = encodeContent(value, { msgpack });
    return [hex(fmt), hex(payload)];
}

describe("bytes made by the Python library", () => {
    for (const c of fixtures.content) {
        test(`${c.name}: decodes as Python decodes it`, () => {
            assert.deepEqual(decodeContent(unhex(c.fmt), unhex(c.payload)), fromDescription(c.decoded));
        });
        test(`${c.name}: encodes to Python's bytes`, () => {
            assert.deepEqual(encodeHex(fromDescription(c.value, true), c.dialect === "extended"), [c.fmt, c.payload]);
        });
    }
    for (const c of fixtures.decode_only) {
        test(`${c.name}: other senders' forms decode as in Python`, () => {
            assert.deepEqual(decodeContent(unhex(c.fmt), unhex(c.payload)), fromDescription(c.decoded));
        });
    }
    for (const c of fixtures.refused) {
        test(`${c.name}: refused on sending, as in Python`, () => {
            assert.throws(() => encodeContent(fromDescription(c.value, true), { msgpack: c.dialect === "extended" }), InvalidTypeCast);
        });
    }
    for (const c of fixtures.malformed) {
        test(`${c.name}: refused on receiving, as in Python`, () => {
            assert.throws(() => decodeContent(unhex(c.fmt), unhex(c.payload)), MalformedPayload);
        });
    }
});

describe("numbers", () => {
    test("a safe integer is an int and a fraction a float, in both dialects", () => {
        assert.deepEqual(encodeHex(7, false), [hex(bytes("1i")), hex(bytes("7"))]);
        assert.equal(text(encodeContent(0.5, { msgpack: true }).fmt), "8f");
        assert.equal(text(encodeContent(0.5).fmt), "4f");
    });

    test("an integer too large to be exact (1e20) is a float: only a BigInt is an exact big int", () => {
        assert.equal(text(encodeContent(1e20, { msgpack: true }).fmt), "8f");
        assert.deepEqual(encodeHex(10n ** 20n, true), [hex(bytes("21i")), hex(bytes("100000000000000000000"))]);
        assert.equal(hex(encodeContent([1e20], { msgpack: true }).payload), "91cb4415af1d78b58c40");
    });

    test("-0 is a float (the int 0 has no sign)", () => {
        const { fmt, payload } = encodeContent(-0, { msgpack: true });
        assert.equal(text(fmt), "8f");
        assert.ok(Object.is(decodeContent(fmt, payload), -0));
        assert.equal(hex(encodeContent([-0], { msgpack: true }).payload), "91cb8000000000000000");
    });

    test("Float sends an integral value as a float; it arrives as a plain number", () => {
        const { fmt, payload } = encodeContent(new Float(2), { msgpack: true });
        assert.deepEqual([text(fmt), hex(payload)], ["8f", "4000000000000000"]);
        assert.equal(decodeContent(fmt, payload), 2);
        assert.equal(hex(encodeContent([new Float(2), 2], { msgpack: true }).payload), "92cb400000000000000002");
        assert.equal(text(encodeContent([new Float(2)]).fmt), "l4f");
    });

    test("an int arrives as a number when it is exact and as a BigInt beyond 2^53 - 1", () => {
        assert.equal(decodeContent(bytes("16i"), bytes("9007199254740991")), 9007199254740991);
        assert.equal(decodeContent(bytes("16i"), bytes("9007199254740992")), 9007199254740992n);
        assert.equal(decodeContent(MSGPACK, unhex("cf0020000000000000")), 9007199254740992n);
        assert.equal(decodeContent(MSGPACK, unhex("cf001fffffffffffff")), 9007199254740991);
    });

    test("a BigInt that is small goes in its smallest msgpack form, as Python packs it", () => {
        assert.equal(hex(encodeContent([5n, -5n, 2n ** 32n], { msgpack: true }).payload), "9305fbcf0000000100000000");
    });
});

describe("what is not Sendable", () => {
    for (const [label, value] of [
        ["a Date", new Date(0)],
        ["a function", () => 1],
        ["a symbol", Symbol("s")],
        ["a class instance", new (class Point {})()],
        ["a Set", new Set([1])],
        ["a list holding a Date", [new Date(0)]],
    ]) {
        test(`${label} is refused in both dialects`, () => {
            assert.throws(() => encodeContent(value, { msgpack: true }), InvalidTypeCast);
            assert.throws(() => encodeContent(value), InvalidTypeCast);
        });
    }

    test("a string with a lone surrogate is refused (UTF-8 cannot carry it; Python refuses it too)", () => {
        for (const value of ["a\ud800", ["\udc00"], { "\ud800": 1 }, new Map([["x\udbff", 1]])]) {
            assert.throws(() => encodeContent(value, { msgpack: true }), InvalidTypeCast);
            assert.throws(() => encodeContent(value), InvalidTypeCast);
        }
        assert.doesNotThrow(() => encodeContent("\ud83d\ude00", { msgpack: true }));
    });

    test("a Map key Python cannot hash (a list, a dict, a tuple holding a list) is refused", () => {
        for (const key of [[1], {}, new Map(), Tuple.of(1, [2])]) {
            assert.throws(() => encodeContent(new Map([[key, 1]]), { msgpack: true }), InvalidTypeCast);
            assert.throws(() => encodeContent(new Map([[key, 1]])), InvalidTypeCast);
        }
    });

    test("a list that contains itself is refused by the nesting limit", () => {
        const loop = [];
        loop.push(loop);
        assert.throws(() => encodeContent(loop, { msgpack: true }), InvalidTypeCast);
        assert.throws(() => encodeContent(loop), InvalidTypeCast);
    });

    test("a ClientInfo with a bad port is refused", () => {
        assert.throws(() => encodeContent(new ClientInfo(["h", 70000]), { msgpack: true }), InvalidTypeCast);
        assert.throws(() => encodeContent(new ClientInfo(["h", "80"]), { msgpack: true }), InvalidTypeCast);
    });
});

describe("JavaScript's own forms", () => {
    test("undefined is sent as None, at the top and inside containers", () => {
        assert.deepEqual(encodeHex(undefined, true), ["", ""]);
        assert.deepEqual(encodeHex([undefined, { a: undefined }], true), encodeHex([null, { a: null }], true));
    });

    test("any ArrayBuffer view or ArrayBuffer is bytes", () => {
        const data = new Uint8Array([1, 2, 3, 4]);
        const expected = encodeHex(data, true);
        assert.deepEqual(encodeHex(data.buffer, true), expected);
        assert.deepEqual(encodeHex(new DataView(data.buffer), true), expected);
        assert.deepEqual(encodeHex(Buffer.from(data), true), expected);
        assert.deepEqual(encodeHex([data.buffer], true), encodeHex([data], true));
        assert.deepEqual(encodeHex([data.buffer], false), encodeHex([data], false));
    });

    test("received bytes are a copy, not a view of the message", () => {
        const payload = unhex("91c40201ff");
        const [value] = decodeContent(MSGPACK, payload);
        payload.fill(0);
        assert.deepEqual(value, new Uint8Array([1, 0xff]));
        assert.equal(value.buffer.byteLength, 2);
    });

    test("a null-prototype object is a dict", () => {
        const object = Object.create(null);
        object.a = 1;
        assert.deepEqual(encodeHex(object, true), encodeHex({ a: 1 }, true));
    });

    test("a dict with only string keys is a plain object; any other key makes it a Map", () => {
        assert.deepEqual(decodeContent(MSGPACK, unhex("81a16101")), { a: 1 });
        assert.deepEqual(decodeContent(MSGPACK, unhex("82a1610101a162")), new Map([["a", 1], [1, "b"]]));
        assert.deepEqual(decodeContent(MSGPACK, unhex("80")), {});
    });

    test('a "__proto__" key is an own property and does not change the prototype', () => {
        for (const [fmt, payload] of [
            [MSGPACK, unhex("81a95f5f70726f746f5f5f81a17801")],
            [bytes("d9s2{1s1i}"), bytes("__proto__x1")],
        ]) {
            const value = decodeContent(fmt, payload);
            assert.equal(Object.getPrototypeOf(value), Object.prototype);
            assert.deepEqual(Object.keys(value), ["__proto__"]);
            assert.equal(value.x, undefined);
            assert.deepEqual(encodeHex(value, true), encodeHex(new Map([["__proto__", { x: 1 }]]), true));
        }
    });

    test("a tuple arrives as a Tuple, which is an Array, and goes back as a tuple", () => {
        const value = decodeContent(bytes("t1i1i"), bytes("12"));
        assert.ok(value instanceof Tuple && Array.isArray(value));
        assert.deepEqual([...value], [1, 2]);
        assert.deepEqual(encodeHex(value, false), [hex(bytes("t1i1i")), hex(bytes("12"))]);
    });

    test("a ClientInfo arrives with ip, name, group, and prints as HiSock's", () => {
        const info = decodeContent(MSGPACK, unhex("c71a0294a93132372e302e302e31cdc350a5616c696365a56c6f626279"));
        assert.deepEqual({ ...info }, { ip: ["127.0.0.1", 50000], name: "alice", group: "lobby" });
        assert.equal(info.ipstr, "127.0.0.1:50000");
        assert.equal(String(new ClientInfo(["h", 1])), "<ClientInfo: IP: h:1, Name: None, Group: None>");
    });
});

describe("receive limits", () => {
    test("more values than maxItems is malformed, counted as Python counts them", () => {
        const payload = unhex("93010203"); // the array and its 3 items: 4 values
        assert.deepEqual(decodeContent(MSGPACK, payload, { maxItems: 4 }), [1, 2, 3]);
        assert.throws(() => decodeContent(MSGPACK, payload, { maxItems: 3 }), MalformedPayload);
        assert.throws(() => decodeContent(bytes("l1i1i1i"), bytes("123"), { maxItems: 3 }), MalformedPayload);
        assert.throws(() => decodeContent(MSGPACK, unhex("81a16101"), { maxItems: 2 }), MalformedPayload);
    });

    test("nesting deeper than maxNesting is malformed", () => {
        assert.deepEqual(decodeContent(MSGPACK, unhex("9190"), { maxNesting: 2 }), [[]]);
        assert.throws(() => decodeContent(MSGPACK, unhex("919190"), { maxNesting: 2 }), MalformedPayload);
        assert.throws(() => decodeContent(bytes("l0[0[]]"), bytes(""), { maxNesting: 2 }), MalformedPayload);
    });

    test("a very deep document is refused without exhausting the stack", () => {
        const deep = new Uint8Array(200000).fill(0x91);
        deep[deep.length - 1] = 0x90;
        assert.throws(() => decodeContent(MSGPACK, deep), MalformedPayload);
        // 3000 tuples, each an ext 32 (type 1) holding a one-item array of the next one.
        let tuple = Uint8Array.of(0xd4, 0x01, 0x90);
        for (let i = 0; i < 3000; i++) {
            const data = Uint8Array.of(0x91, ...tuple);
            const header = new DataView(new ArrayBuffer(6));
            header.setUint8(0, 0xc9);
            header.setUint32(1, data.length);
            header.setInt8(5, 1);
            tuple = new Uint8Array([...new Uint8Array(header.buffer), ...data]);
        }
        assert.throws(() => decodeContent(MSGPACK, tuple), MalformedPayload);
    });

    test("an array header claiming more items than the document holds fails at once", () => {
        assert.throws(() => decodeContent(MSGPACK, unhex("ddffffffff")), MalformedPayload);
    });
});
