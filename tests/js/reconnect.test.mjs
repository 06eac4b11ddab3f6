// Reconnecting: the backoff's bounds, what a re-join says, and the bounded send queue.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
    ClientDisconnected,
    SendQueueFull,
    decodeContent,
    disconnectBody,
    reconnectDelay,
} from "../../hisock_gevent/static/hisock.js";
import { accept, connected, makeClient, settle, text } from "./helpers.mjs";

describe("reconnectDelay", () => {
    test("doubles from base up to max, jittered between half of it and all of it", () => {
        const options = { base: 1000, max: 30000 };
        const nominal = [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
        nominal.forEach((expected, index) => {
            const attempt = index + 1;
            assert.equal(reconnectDelay(attempt, { ...options, random: () => 0 }), expected / 2);
            assert.equal(reconnectDelay(attempt, { ...options, random: () => 1 }), expected);
            for (let i = 0; i < 200; i++) {
                const delay = reconnectDelay(attempt, options);
                assert.ok(delay >= expected / 2 && delay <= expected, `attempt ${attempt}: ${delay}`);
            }
        });
    });

    test("stays finite and bounded however many attempts there were", () => {
        assert.equal(reconnectDelay(10000, { base: 1000, max: 30000, random: () => 1 }), 30000);
        assert.equal(reconnectDelay(0, { base: 1000, max: 30000, random: () => 1 }), 1000);
    });
});

describe("reconnecting", () => {
    test("a lost connection is re-made after the backoff, and reconnect() runs once joined", async () => {
        const { client, ws, clock, sockets } = await connected();
        let reconnects = 0;
        client.on("reconnect", () => reconnects++);
        ws.drop();
        assert.equal(client.connected, false);
        assert.deepEqual(clock.pending, [750]); // base 1000, jitter fixed at 0.5 by the test's random
        await clock.tick(749);
        assert.equal(sockets.length, 1);
        await clock.tick(1);
        assert.equal(sockets.length, 2);
        accept(sockets[1]);
        await settle();
        assert.equal(client.connected, true);
        assert.equal(reconnects, 1);
        assert.deepEqual(clock.pending, []);
    });

    test("failed attempts double the delay up to reconnectDelayMax", async () => {
        const { client, ws, clock, sockets } = await connected({ reconnectDelay: 1000, reconnectDelayMax: 8000 });
        ws.drop();
        const delays = [];
        for (let attempt = 1; attempt <= 6; attempt++) {
            const [delay] = clock.pending;
            delays.push(delay);
            await clock.tick(delay);
            sockets.at(-1).fail();
            await settle();
        }
        assert.deepEqual(delays, [750, 1500, 3000, 6000, 6000, 6000]);
        assert.equal(client.closed, false);
        // A success starts the count again.
        await clock.tick(clock.pending[0]);
        accept(sockets.at(-1));
        await settle();
        sockets.at(-1).drop();
        assert.deepEqual(clock.pending, [750]);
    });

    test("reconnectAttempts failed attempts in a row, then it gives up and closes", async () => {
        const { client, ws, clock, sockets } = await connected({ reconnectAttempts: 3 });
        ws.drop();
        for (let attempt = 1; attempt <= 3; attempt++) {
            await clock.tick(clock.pending[0]);
            sockets.at(-1).fail();
            await settle();
        }
        assert.equal(client.closed, true);
        assert.match(await client.whenClosed, /gave up reconnecting after 3 attempts/);
        assert.equal(sockets.length, 4);
        assert.deepEqual(clock.pending, []);
    });

    test("an attempt refused by the authentication check ends the reconnecting", async () => {
        const { client, ws, clock, sockets } = await connected({ auth: "old" });
        ws.drop();
        await clock.tick(clock.pending[0]);
        sockets[1].open();
        sockets[1].receive(disconnectBody({ reason: "authentication failed" }));
        await settle();
        assert.equal(client.closed, true);
        assert.deepEqual(clock.pending, []);
    });

    test("an attempt the server refuses for another reason (full) is retried", async () => {
        const { client, ws, clock, sockets } = await connected();
        ws.drop();
        await clock.tick(clock.pending[0]);
        sockets[1].open();
        sockets[1].receive(disconnectBody());
        await settle();
        assert.equal(client.closed, false);
        assert.deepEqual(clock.pending, [1500]);
    });

    test("an attempt that gets no answer within connectTimeout is retried", async () => {
        const { client, ws, clock, sockets } = await connected({ connectTimeout: 2000 });
        ws.drop();
        await clock.tick(750);
        sockets[1].open();
        await clock.tick(2000);
        assert.ok(sockets[1].closedByClient);
        assert.equal(client.closed, false);
        assert.deepEqual(clock.pending, [1500]);
    });

    test("close() while waiting to reconnect stops everything", async () => {
        const { client, ws, clock, sockets } = await connected();
        ws.drop();
        client.close();
        assert.deepEqual(clock.pending, []);
        await clock.tick(600000);
        assert.equal(sockets.length, 1);
    });

    test("close() during an attempt closes that socket and stops", async () => {
        const { client, ws, clock, sockets } = await connected();
        ws.drop();
        await clock.tick(750);
        sockets[1].open();
        client.close();
        assert.ok(sockets[1].closedByClient);
        assert.deepEqual(clock.pending, []);
        assert.equal(client.closed, true);
    });

    test("the re-join's hello says the connect name and group, then the current ones follow", async () => {
        const { client, ws, clock, sockets } = await connected({ name: "alice", group: "lobby" });
        client.changeName("carol");
        ws.drop();
        client.changeGroup("red"); // while disconnected: takes effect at the re-join
        await clock.tick(750);
        const hello = accept(sockets[1]);
        assert.equal(hello.name, "alice");
        assert.equal(hello.group, "lobby");
        assert.deepEqual(sockets[1].messages.slice(1), [
            { type: "ChangeName", name: "carol" },
            { type: "ChangeGroup", group: "red" },
        ]);
        assert.equal(client.name, "carol");
        assert.equal(client.group, "red");
    });

    test("a name changed back to the connect name while disconnected needs no message", async () => {
        const { client, ws, clock, sockets } = await connected({ name: "alice" });
        client.changeName("carol");
        ws.drop();
        client.changeName(null);
        await clock.tick(750);
        accept(sockets[1]);
        assert.deepEqual(sockets[1].messages.slice(1), []);
    });
});

describe("sending while disconnected", () => {
    test("sends wait in order and go out right after the re-join", async () => {
        const { client, ws, clock, sockets } = await connected({ name: "alice" });
        ws.drop();
        client.send("a", 1);
        client.send("b", [2, "two"]);
        client.changeName("carol");
        client.send("c", null);
        await clock.tick(750);
        sockets[1].open();
        client.send("d", 4); // after the hello, before the answer: waits too
        assert.equal(sockets[1].sent.length, 1);
        accept(sockets[1]);
        const after = sockets[1].messages.slice(1);
        assert.deepEqual(after[0], { type: "ChangeName", name: "carol" });
        assert.deepEqual(
            after.slice(1).map((m) => [m.command, decodeContent(m.fmt, m.payload)]),
            [["a", 1], ["b", [2, "two"]], ["c", null], ["d", 4]],
        );
        assert.equal(client._queue.length, 0);
        assert.equal(client._queuedBytes, 0);
    });

    test("sends before the first connect() wait for it too", async () => {
        const { client, sockets } = makeClient();
        client.send("early", "bird");
        const joining = client.connect();
        await settle();
        accept(sockets[0]);
        await joining;
        assert.deepEqual(sockets[0].messages.slice(1).map((m) => m.command), ["early"]);
    });

    test("past maxQueueBytes, send throws SendQueueFull and what waited is kept", async () => {
        const { client, ws, clock, sockets } = await connected({ maxQueueBytes: 100 });
        ws.drop();
        client.send("x", "y".repeat(40)); // "$CMD$x$MSG$" + "3       " + "40s" + 40 bytes
        assert.equal(client._queuedBytes, 62);
        assert.throws(() => client.send("x", "z".repeat(40)), SendQueueFull);
        client.send("x", "w".repeat(16)); // 38 bytes: exactly the bound of 100 in all
        assert.equal(client._queuedBytes, 100);
        assert.throws(() => client.send("x", "v"), SendQueueFull);
        await clock.tick(750);
        accept(sockets[1]);
        const sent = sockets[1].messages.slice(1).map((m) => text(m.payload));
        assert.deepEqual(sent, ["y".repeat(40), "w".repeat(16)]);
    });

    test("what waited is re-encoded when the new connection speaks another dialect", async () => {
        const { client, ws, clock, sockets, errors } = await connected();
        ws.drop();
        client.send("pair", [1, "ab"]);
        client.send("flag", true); // a plain server cannot take it: reported, skipped
        client.send("after", "ok");
        await clock.tick(750);
        accept(sockets[1], { caps: null });
        const sent = sockets[1].messages.slice(1);
        assert.deepEqual(sent.map((m) => [m.command, text(m.fmt)]), [["pair", "l1i2s"], ["after", "2s"]]);
        assert.deepEqual(errors.map((e) => e.error.name), ["InvalidTypeCast"]);
    });

    test("the queue is dropped when the client closes for good", async () => {
        const { client, ws } = await connected({ reconnect: true });
        ws.drop();
        client.send("x", 1);
        client.close();
        assert.equal(client._queue.length, 0);
        assert.throws(() => client.send("x", 1), ClientDisconnected);
    });

    test("$DISCONN$ saying the server is closing is a lost connection: it comes back", async () => {
        const { client, ws, clock, sockets } = await connected();
        let forced = 0;
        client.on("force_disconnect", () => forced++);
        ws.receive(disconnectBody({ reason: "server closing" }));
        assert.equal(client.connected, false);
        assert.equal(client.closed, false);
        assert.equal(forced, 0);
        await clock.tick(clock.pending[0]);
        accept(sockets[1]);
        await settle();
        assert.equal(client.connected, true);
    });

    test("$DISCONN$ saying the server is closing ends a client without reconnect", async () => {
        const { client, ws } = await connected({ reconnect: false });
        ws.receive(disconnectBody({ reason: "server closing" }));
        assert.equal(client.closed, true);
    });

    test("after $DISCONN$ nothing is queued: the client is closed", async () => {
        const { client, ws } = await connected();
        ws.receive(disconnectBody());
        assert.throws(() => client.send("x", 1), ClientDisconnected);
    });
});
