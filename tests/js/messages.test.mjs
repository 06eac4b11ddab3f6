// Frame bodies: every reserved message both ways against the Python library's bytes
// (fixtures.json), and the call extension's three messages.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
    MalformedMessage,
    RemoteProtocolError,
    callBody,
    callErrorBody,
    changeGroupBody,
    changeNameBody,
    commandBody,
    disconnectBody,
    encodeContent,
    fmtLengthField,
    getClientBody,
    helloBody,
    isReservedCommand,
    keepAckBody,
    keepAliveBody,
    parseClientBody,
    parseServerBody,
    peerJoinedBody,
    peerLeftBody,
    replyBody,
    userCloseBody,
} from "../../hisock_gevent/static/hisock.js";
import { bytes, fixtures, hex, text, unhex } from "./helpers.mjs";

/** The body JavaScript builds for a message as the fixtures describe it. */
function build(message) {
    switch (message.type) {
        case "Hello":
            return helloBody(message.name, message.group, message.extra);
        case "UserClose":
            return userCloseBody();
        case "ChangeName":
            return changeNameBody(message.name);
        case "ChangeGroup":
            return changeGroupBody(message.group);
        case "KeepAck":
            return keepAckBody();
        case "GetClient":
            return getClientBody(message.query);
        case "Command":
            return commandBody(message.command, unhex(message.fmt), unhex(message.payload));
        case "PeerJoined":
            return peerJoinedBody(message.info);
        case "PeerLeft":
            return peerLeftBody(message.info);
        case "Disconnect":
            return disconnectBody(message.details);
        case "KeepAlive":
            return keepAliveBody();
        default:
            throw new Error(`no builder for ${message.type}`);
    }
}

/** A parsed message in the fixtures' form (fmt and payload as hex). */
function plain(message) {
    const out = { ...message };
    for (const key of ["fmt", "payload"]) if (key in out) out[key] = hex(out[key]);
    return out;
}

function parserFor(direction) {
    return direction === "to_server" ? parseClientBody : parseServerBody;
}

describe("reserved and command messages, against the Python library", () => {
    for (const c of fixtures.messages) {
        test(`${c.name}: JavaScript builds Python's body`, () => {
            assert.equal(hex(build(c.message)), c.body);
        });
        test(`${c.name}: JavaScript parses Python's body`, () => {
            assert.deepEqual(plain(parserFor(c.direction)(unhex(c.body))), c.message);
        });
    }
    for (const c of fixtures.lenient_bodies) {
        test(`${c.name}: accepted as Python accepts it`, () => {
            assert.deepEqual(plain(parserFor(c.direction)(unhex(c.body))), c.message);
        });
    }
    for (const c of fixtures.malformed_bodies) {
        test(`${c.name}: refused as Python refuses it`, () => {
            assert.throws(() => parserFor(c.direction)(unhex(c.body)), RemoteProtocolError);
        });
    }
});

describe("commands", () => {
    test("the command is cut at the first $MSG$ and kept exactly (no stripping)", () => {
        const message = parseServerBody(bytes("$CMD$Cmd$MSG$2       2shi"));
        assert.equal(message.command, "Cmd");
        assert.equal(text(message.payload), "hi");
    });

    test("reserved names are $, something, $ anywhere; a newline is not something, as in Python", () => {
        assert.ok(isReservedCommand("$GETCLT$"));
        assert.ok(isReservedCommand("a$b$c"));
        assert.ok(isReservedCommand("$\r$"));
        assert.ok(!isReservedCommand("$\n$"));
        assert.ok(!isReservedCommand("a$b"));
        assert.ok(!isReservedCommand("$$"));
    });

    test("a fmt of 10^8 bytes does not fit the 8-digit field", () => {
        assert.equal(text(fmtLengthField(99999999)), "99999999");
        assert.throws(() => fmtLengthField(100000000));
    });
});

describe("the call extension", () => {
    const { fmt, payload } = encodeContent([1, 2], { msgpack: true });

    test("a call is $CALL$, the id, a colon and a command message", () => {
        const body = callBody(7, "add", fmt, payload);
        assert.equal(hex(body), hex(bytes("$CALL$7:$CMD$add$MSG$1       m\x92\x01\x02")));
        for (const parse of [parseServerBody, parseClientBody]) {
            assert.deepEqual(plain(parse(body)), { type: "Call", id: "7", command: "add", fmt: "6d", payload: "920102" });
        }
    });

    test("a reply is $REPLY$, the id, a colon, the fmt length, fmt and payload", () => {
        const body = replyBody(12, fmt, payload);
        assert.equal(hex(body), hex(bytes("$REPLY$12:1       m\x92\x01\x02")));
        const reply = parseServerBody(body);
        assert.deepEqual(plain(reply), { type: "Reply", id: "12", fmt: "6d", payload: "920102" });
        const none = parseServerBody(bytes("$REPLY$3:0       "));
        assert.deepEqual(plain(none), { type: "Reply", id: "3", fmt: "", payload: "" });
    });

    test("a failed call is $CALLERR$, the id, a colon and {type, message} in JSON", () => {
        const body = callErrorBody("9", "ValueError", "bad ü");
        assert.equal(text(body), '$CALLERR$9:{"type":"ValueError","message":"bad \\u00fc"}');
        assert.deepEqual(parseClientBody(body), { type: "CallError", id: "9", error: { type: "ValueError", message: "bad ü" } });
    });

    test("a $CALLERR$ missing its fields still reads, with defaults", () => {
        assert.deepEqual(parseServerBody(bytes("$CALLERR$1:{}")).error, { type: "Exception", message: "" });
    });

    for (const [label, body] of [
        ["no id", "$CALL$:$CMD$a$MSG$0       "],
        ["an id that is not digits", "$CALL$x1:$CMD$a$MSG$0       "],
        ["a signed id", "$REPLY$-1:0       "],
        ["no colon", "$REPLY$1"],
        ["a call without a command message", "$CALL$1:hello"],
        ["a call whose command has no $MSG$", "$CALL$1:$CMD$a"],
        ["a reply too short for its fmt length", "$REPLY$1:0"],
        ["a reply whose fmt runs past the end", "$REPLY$1:3       ab"],
        ["an error that is not JSON", "$CALLERR$1:oops"],
        ["an error that is not an object", "$CALLERR$1:[1]"],
    ]) {
        test(`refused: ${label}`, () => {
            assert.throws(() => parseServerBody(bytes(body)), MalformedMessage);
        });
    }
});
