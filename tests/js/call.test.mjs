// The call extension: calls matched to answers by id, timeouts, disconnects, nothing left
// behind; and the server calling the client.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
    CallNotSupported,
    ClientDisconnected,
    InvalidCommand,
    InvalidTypeCast,
    RemoteCallError,
    TimeoutError,
    callBody,
    callErrorBody,
    decodeContent,
    encodeContent,
    replyBody,
} from "../../hisock_gevent/static/hisock.js";
import { connected, settle, text } from "./helpers.mjs";

function reply(id, value, msgpack = true) {
    const { fmt, payload } = encodeContent(value, { msgpack });
    return replyBody(id, fmt, payload);
}

function serverCall(id, command, content) {
    const { fmt, payload } = encodeContent(content, { msgpack: true });
    return callBody(id, command, fmt, payload);
}

/** What is left inside the client for calls and getClient: empty once all are settled. */
function leftovers(client, clock) {
    return { calls: client._calls.size, getclt: client._getclt.length, timers: clock.pending.length };
}

describe("calling the server", () => {
    test("a call is $CALL$ with a new id and resolves with the reply's value", async () => {
        const { client, ws, clock } = await connected();
        const sum = client.call("add", [1, 2]);
        const [request] = ws.messages;
        assert.equal(request.type, "Call");
        assert.equal(request.id, "1");
        assert.equal(request.command, "add");
        assert.deepEqual(decodeContent(request.fmt, request.payload), [1, 2]);
        ws.receive(reply(1, 3));
        assert.equal(await sum, 3);
        assert.deepEqual(leftovers(client, clock), { calls: 0, getclt: 0, timers: 0 });
    });

    test("replies arriving out of order reach their own callers", async () => {
        const { client, ws } = await connected();
        const calls = ["a", "b", "c"].map((name) => client.call(name, name));
        assert.deepEqual(ws.messages.map((m) => m.id), ["1", "2", "3"]);
        ws.receive(reply(3, "C"));
        ws.receive(reply(1, "A"));
        ws.receive(reply(2, { b: Uint8Array.of(2) }));
        assert.deepEqual(await Promise.all(calls), ["A", { b: Uint8Array.of(2) }, "C"]);
    });

    test("a reply in native letters (from any server) reads the same", async () => {
        const { client, ws } = await connected();
        const call = client.call("f");
        ws.receive(reply(1, [1, "ab"], false));
        assert.deepEqual(await call, [1, "ab"]);
    });

    test("$CALLERR$ rejects with RemoteCallError carrying the exception's type and message", async () => {
        const { client, ws, clock } = await connected();
        const call = client.call("div", [1, 0]);
        ws.receive(callErrorBody(1, "ZeroDivisionError", "division by zero"));
        await assert.rejects(call, (err) => {
            assert.ok(err instanceof RemoteCallError);
            assert.equal(err.type, "ZeroDivisionError");
            assert.equal(err.remoteMessage, "division by zero");
            assert.equal(err.message, "ZeroDivisionError: division by zero");
            return true;
        });
        assert.deepEqual(leftovers(client, clock), { calls: 0, getclt: 0, timers: 0 });
    });

    test("a call with no answer in time rejects with TimeoutError; the late answer is ignored", async () => {
        const { client, ws, clock, errors } = await connected({ callTimeout: 5000 });
        const slow = client.call("slow", null);
        const slower = client.call("slower", null, { timeout: 20000 });
        slow.catch(() => {});
        await clock.tick(4999);
        assert.equal(client._calls.size, 2);
        await clock.tick(1);
        await assert.rejects(slow, TimeoutError);
        assert.equal(client._calls.size, 1);
        ws.receive(reply(1, "late"));
        ws.receive(reply(2, "in time"));
        assert.equal(await slower, "in time");
        assert.deepEqual(errors, []);
        assert.equal(client.connected, true);
        assert.deepEqual(leftovers(client, clock), { calls: 0, getclt: 0, timers: 0 });
    });

    test("timeout 0 or Infinity waits as long as it takes", async () => {
        const { client, ws, clock } = await connected();
        const a = client.call("a", null, { timeout: 0 });
        const b = client.call("b", null, { timeout: Infinity });
        assert.deepEqual(clock.pending, []);
        await clock.tick(3600000);
        ws.receive(reply(2, 2));
        ws.receive(reply(1, 1));
        assert.deepEqual(await Promise.all([a, b]), [1, 2]);
    });

    test("every pending call rejects at once when the connection ends, and nothing is left", async () => {
        const { client, ws, clock } = await connected();
        const calls = [client.call("a"), client.call("b", null, { timeout: 0 }), client.call("c")];
        const asking = client.getClient("bob");
        ws.drop();
        for (const call of [...calls, asking]) await assert.rejects(call, ClientDisconnected);
        // Only the reconnect timer remains.
        assert.deepEqual(leftovers(client, clock), { calls: 0, getclt: 0, timers: 1 });
    });

    test("close() rejects pending calls", async () => {
        const { client, clock } = await connected();
        const call = client.call("a");
        client.close();
        await assert.rejects(call, ClientDisconnected);
        assert.deepEqual(leftovers(client, clock), { calls: 0, getclt: 0, timers: 0 });
    });

    test("a call while disconnected rejects at once: calls are not queued", async () => {
        const { client, ws } = await connected();
        ws.drop();
        await assert.rejects(client.call("a"), ClientDisconnected);
        assert.equal(client._calls.size, 0);
    });

    test("a server that did not accept the call capability gets no call", async () => {
        const { client, ws } = await connected({}, { caps: ["msgpack"] });
        await assert.rejects(client.call("a"), (err) => err instanceof CallNotSupported && /"call"/.test(err.message));
        assert.deepEqual(ws.sent, []);
    });

    test("a reserved command or unsendable content rejects without sending", async () => {
        const { client, ws } = await connected();
        await assert.rejects(client.call("$x$"), InvalidCommand);
        await assert.rejects(client.call("x", Symbol("no")), InvalidTypeCast);
        assert.deepEqual(ws.sent, []);
        assert.equal(client._calls.size, 0);
    });

    test("a reply that cannot be decoded breaks the protocol and fails the call as disconnected", async () => {
        const { client, ws } = await connected();
        const call = client.call("a");
        ws.receive(Uint8Array.from(Buffer.from("$REPLY$1:2       3s", "latin1")));
        await assert.rejects(call, ClientDisconnected);
    });
});

describe("the server calling the client", () => {
    test("the handler's return value is the reply, with the server's id", async () => {
        const { client, ws } = await connected();
        client.on("add", ([a, b]) => a + b);
        ws.receive(serverCall("41", "add", [2, 3]));
        await settle();
        const [answer] = ws.messages;
        assert.equal(answer.type, "Reply");
        assert.equal(answer.id, "41");
        assert.equal(decodeContent(answer.fmt, answer.payload), 5);
    });

    test("an async handler is awaited; undefined answers None", async () => {
        const { client, ws } = await connected();
        client.on("later", async (content) => ({ got: content }));
        client.on("nothing", () => {});
        ws.receive(serverCall(1, "later", "x"));
        ws.receive(serverCall(2, "nothing", null));
        await settle();
        // Each answer goes out when its handler is done: here the synchronous one first.
        const answers = Object.fromEntries(ws.messages.map((m) => [m.id, m]));
        assert.deepEqual(decodeContent(answers["1"].fmt, answers["1"].payload), { got: "x" });
        assert.equal(text(answers["2"].fmt), "");
        assert.equal(answers["2"].payload.length, 0);
    });

    test("a handler that throws answers $CALLERR$ with its error's name and message", async () => {
        const { client, ws, errors } = await connected();
        client.on("bad", () => {
            throw new RangeError("out of range");
        });
        client.on("worse", async () => {
            throw new TypeError("not a number");
        });
        ws.receive(serverCall(1, "bad", null));
        ws.receive(serverCall(2, "worse", null));
        await settle();
        assert.deepEqual(
            ws.messages.map((m) => [m.type, m.id, m.error]),
            [
                ["CallError", "1", { type: "RangeError", message: "out of range" }],
                ["CallError", "2", { type: "TypeError", message: "not a number" }],
            ],
        );
        assert.deepEqual(errors, []);
    });

    test("no handler for the command answers $CALLERR$ FunctionNotFoundException; * does not answer calls", async () => {
        const { client, ws } = await connected();
        client.on("*", () => "catch-all");
        ws.receive(serverCall(5, "missing", null));
        await settle();
        const [answer] = ws.messages;
        assert.equal(answer.type, "CallError");
        assert.equal(answer.error.type, "FunctionNotFoundException");
        assert.match(answer.error.message, /missing/);
    });

    test("a return value that cannot be sent answers $CALLERR$ InvalidTypeCast", async () => {
        const { client, ws } = await connected();
        client.on("date", () => new Date());
        ws.receive(serverCall(1, "date", null));
        await settle();
        assert.equal(ws.messages[0].error.type, "InvalidTypeCast");
    });

    test("a plain connection's reply is in native letters", async () => {
        const { client, ws } = await connected({}, { caps: ["call"] });
        client.on("pair", () => [1, "ab"]);
        ws.receive(serverCall(1, "pair", null));
        await settle();
        assert.equal(text(ws.messages[0].fmt), "l1i2s");
    });

    test("an answer finished after the connection ended is dropped, not sent on the next one", async () => {
        const { client, ws } = await connected();
        let finish;
        client.on("wait", () => new Promise((resolve) => (finish = resolve)));
        ws.receive(serverCall(1, "wait", null));
        ws.drop();
        finish("done");
        await settle();
        assert.deepEqual(ws.sent, []);
    });
});
