// The client over a fake WebSocket: the handshake, handlers, keepalive, names, getClient,
// closing, and what it does when the server misbehaves.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
    AuthenticationFailed,
    ClientDisconnected,
    ClientInfo,
    ClientNotFound,
    ConnectionRejected,
    ContentTooLarge,
    InvalidCommand,
    InvalidTypeCast,
    MalformedMessage,
    ServerNotRunning,
    TimeoutError,
    commandBody,
    connect,
    disconnectBody,
    encodeContent,
    keepAliveBody,
    peerJoinedBody,
    peerLeftBody,
} from "../../hisock_gevent/static/hisock.js";
import { FakeWebSocket, accept, bytes, connected, hex, infoObject, makeClient, settle, text } from "./helpers.mjs";

function command(name, content, msgpack = true) {
    const { fmt, payload } = encodeContent(content, { msgpack });
    return commandBody(name, fmt, payload);
}

describe("joining", () => {
    test("the hello comes first and offers msgpack and call, with the name, group and auth", async () => {
        const { client, sockets } = makeClient({ name: "alice", group: "lobby", auth: { token: "s3cret" } });
        const joining = client.connect();
        await settle();
        const ws = sockets[0];
        assert.equal(ws.binaryType, "arraybuffer");
        ws.open();
        assert.equal(
            text(ws.sent[0]),
            '$CLTHELLO${"caps":["msgpack","call"],"auth":{"token":"s3cret"},"name":"alice","group":"lobby"}',
        );
        ws.receive(peerJoinedBody({ ...infoObject(), caps: ["msgpack", "call"] }));
        assert.equal(await joining, client);
        assert.equal(client.connected, true);
        assert.deepEqual(client.capabilities, ["msgpack", "call"]);
        assert.equal(client.msgpack, true);
        assert.equal(client.callSupported, true);
        assert.deepEqual(client.info, new ClientInfo(["127.0.0.1", 50000], "alice", "lobby"));
    });

    test("without auth the hello has no auth key, and a missing name or group is null", async () => {
        const { client, sockets } = makeClient();
        client.connect().catch(() => {});
        await settle();
        sockets[0].open();
        assert.equal(text(sockets[0].sent[0]), '$CLTHELLO${"caps":["msgpack","call"],"name":null,"group":null}');
    });

    test("connect() is the short way, with WebSocketImpl injected", async () => {
        let socket;
        class Socket extends FakeWebSocket {
            constructor(url) {
                super(url);
                socket = this;
                queueMicrotask(() => accept(this));
            }
        }
        const client = await connect("ws://x/ws", { name: "n", WebSocketImpl: Socket });
        assert.equal(socket.url, "ws://x/ws");
        assert.equal(client.connected, true);
        client.close();
    });

    test("a server without the extensions leaves the connection plain", async () => {
        const { client, ws } = await connected({}, { caps: null });
        assert.equal(client.msgpack, false);
        assert.deepEqual(client.capabilities, []);
        client.send("move", [1, "ab"]);
        assert.equal(text(ws.sent[0]), "$CMD$move$MSG$5       l1i2s1ab");
        assert.throws(() => client.send("flag", true), InvalidTypeCast);
    });

    const refusals = [
        ["authentication failed", (ws) => (ws.open(), ws.receive(disconnectBody({ reason: "authentication failed" }))), AuthenticationFailed],
        ["a bare $DISCONN$ (full)", (ws) => (ws.open(), ws.receive(disconnectBody())), ConnectionRejected],
        ["a socket that never opens", (ws) => ws.fail(), ServerNotRunning],
        ["a close during the handshake", (ws) => (ws.open(), ws.drop()), ConnectionRejected],
        ["a protocol error in the answer", (ws) => (ws.open(), ws.receive(bytes("$NOPE$"))), ConnectionRejected],
    ];
    for (const [label, play, error] of refusals) {
        test(`connect() rejects on ${label}, and does not try again`, async () => {
            const { client, clock, sockets } = makeClient({ onError: () => {} });
            const joining = client.connect();
            await settle();
            play(sockets[0]);
            await assert.rejects(joining, error);
            assert.equal(client.closed, true);
            assert.equal(typeof (await client.whenClosed), "string");
            await clock.tick(120000);
            assert.equal(sockets.length, 1);
            assert.deepEqual(clock.pending, []);
        });
    }

    test("connect() rejects when the answer does not come within connectTimeout", async () => {
        const { client, clock, sockets } = makeClient({ connectTimeout: 5000 });
        const joining = client.connect();
        joining.catch(() => {});
        await settle();
        sockets[0].open();
        await clock.tick(4999);
        assert.equal(client.closed, false);
        await clock.tick(1);
        await assert.rejects(joining, ConnectionRejected);
        assert.ok(sockets[0].closedByClient);
    });

    test("a misspelt option is an error, not silently ignored", () => {
        assert.throws(() => makeClient({ reconectDelay: 5 }), /unknown option "reconectDelay"/);
        assert.throws(() => makeClient({ reconnectDelay: 0 }), RangeError);
        assert.throws(() => makeClient({ name: 5 }), TypeError);
    });

    test("connect() twice is an error", async () => {
        const { client } = await connected();
        await assert.rejects(client.connect(), /already/);
    });
});

describe("receiving", () => {
    test("a command goes to its handler with the decoded content", async () => {
        const { client, ws } = await connected();
        const seen = [];
        client.on("say", (content) => seen.push(content));
        ws.receive(command("say", { text: "hi", to: ["bob"] }));
        ws.receive(command("say", "plain", false));
        assert.deepEqual(seen, [{ text: "hi", to: ["bob"] }, "plain"]);
    });

    test("a command without a handler goes to *, with its name", async () => {
        const { client, ws } = await connected();
        const seen = [];
        client.on("say", () => seen.push("say"));
        client.on("*", (name, content) => seen.push([name, content]));
        ws.receive(command("other", 5));
        ws.receive(command("say", 1));
        ws.receive(command("ping", null));
        assert.deepEqual(seen, [["other", 5], "say", ["ping", null]]);
    });

    test("registering again replaces the handler, and off removes it", async () => {
        const { client, ws } = await connected();
        const seen = [];
        client.on("x", () => seen.push(1)).on("x", () => seen.push(2));
        ws.receive(command("x", null));
        client.off("x");
        ws.receive(command("x", null));
        assert.deepEqual(seen, [2]);
    });

    test("a handler that throws or rejects is reported, and the client goes on", async () => {
        const { client, ws, errors } = await connected();
        const seen = [];
        client.on("boom", () => {
            throw new Error("sync");
        });
        client.on("later", async () => {
            throw new Error("async");
        });
        client.on("ok", (content) => seen.push(content));
        ws.receive(command("boom", 1));
        ws.receive(command("later", 1));
        ws.receive(command("ok", 2));
        await settle();
        assert.deepEqual(seen, [2]);
        assert.deepEqual(errors.map((e) => e.error.message), ["sync", "async"]);
        assert.equal(client.connected, true);
    });

    test("client_connect and client_disconnect get a ClientInfo; our own join is not announced", async () => {
        const events = [];
        const { client, sockets } = makeClient({ name: "me" });
        client.on("client_connect", (info) => events.push(["connect", info]));
        client.on("client_disconnect", (info) => events.push(["disconnect", info]));
        const joining = client.connect();
        await settle();
        accept(sockets[0]);
        await joining;
        sockets[0].receive(peerJoinedBody(infoObject("bob", null, 50002)));
        sockets[0].receive(peerLeftBody(infoObject("bob", null, 50002)));
        const bob = new ClientInfo(["127.0.0.1", 50002], "bob", null);
        assert.deepEqual(events, [["connect", bob], ["disconnect", bob]]);
        assert.equal(bob.ipstr, "127.0.0.1:50002");
    });

    test("a keepalive is answered at once, without user code", async () => {
        const { ws } = await connected();
        ws.receive(keepAliveBody());
        assert.deepEqual(ws.messages, [{ type: "KeepAck" }]);
    });

    const breaches = [
        ["a text message", "hello"],
        ["an unknown reserved message", bytes("$NOPE$")],
        ["a message meant for the server", bytes("$CHNAME$x")],
        ["a malformed payload", bytes("$CMD$x$MSG$2       3s")],
        ["a message over maxMessageSize", new Uint8Array(2000).fill(0x24)],
    ];
    for (const [label, body] of breaches) {
        test(`${label} breaks the protocol: reported, the socket closed, a reconnect planned`, async () => {
            const { client, ws, errors, clock } = await connected({ maxMessageSize: 1000 });
            const seen = [];
            client.on("*", (...args) => seen.push(args));
            ws.receive(body);
            assert.equal(errors.length, 1);
            assert.ok(errors[0].error instanceof MalformedMessage || errors[0].error.name === "MalformedPayload");
            assert.ok(ws.closedByClient);
            assert.equal(client.connected, false);
            assert.equal(client.closed, false);
            assert.equal(clock.pending.length, 1);
            assert.deepEqual(seen, []);
        });
    }
});

describe("sending", () => {
    test("send writes one command message body per call, in the negotiated dialect", async () => {
        const { client, ws } = await connected();
        client.send("msg", { text: "hi", to: ["bob"], urgent: true });
        client.send("ping");
        client.send("temp", 0.1);
        assert.deepEqual(ws.sent.map(hex), [
            hex(bytes("$CMD$msg$MSG$1       m\x83\xa4text\xa2hi\xa2to\x91\xa3bob\xa6urgent\xc3")),
            hex(bytes("$CMD$ping$MSG$0       ")),
            hex(bytes("$CMD$temp$MSG$2       8f?\xb9\x99\x99\x99\x99\x99\x9a")),
        ]);
    });

    test("a reserved command, a non-string command or unsendable content is refused before anything is sent", async () => {
        const { client, ws } = await connected();
        assert.throws(() => client.send("$GETCLT$", 1), InvalidCommand);
        assert.throws(() => client.send(5, 1), InvalidCommand);
        assert.throws(() => client.send("x", new Date()), InvalidTypeCast);
        assert.throws(() => client.on("$x$", () => {}), InvalidCommand);
        assert.deepEqual(ws.sent, []);
    });

    test("content making a message over maxMessageSize is refused", async () => {
        const { client, ws } = await connected({ maxMessageSize: 200 });
        assert.throws(() => client.send("big", "x".repeat(200)), ContentTooLarge);
        assert.deepEqual(ws.sent, []);
    });

    test("a WebSocket with more than maxQueueBytes buffered refuses more", async () => {
        const { client, ws } = await connected({ maxQueueBytes: 1000 });
        ws.bufferedAmount = 990;
        assert.throws(() => client.send("x", "0123456789"), /maxQueueBytes/);
        ws.bufferedAmount = 0;
        client.send("x", "0123456789");
        assert.equal(ws.sent.length, 1);
    });

    test("changeName and changeGroup send the new value; null goes back to the connect name", async () => {
        const { client, ws } = await connected({ name: "alice", group: "lobby" });
        client.changeName("carol");
        client.changeGroup("red");
        assert.equal(client.name, "carol");
        assert.equal(client.group, "red");
        client.changeName(null);
        client.changeGroup("");
        assert.equal(client.name, "alice");
        assert.equal(client.group, "lobby");
        assert.deepEqual(ws.messages, [
            { type: "ChangeName", name: "carol" },
            { type: "ChangeGroup", group: "red" },
            { type: "ChangeName", name: "" },
            { type: "ChangeGroup", group: "" },
        ]);
    });
});

describe("getClient", () => {
    test("asks with $GETCLT$ and resolves with the answer as a ClientInfo", async () => {
        const { client, ws } = await connected();
        const asking = client.getClient("bob");
        assert.deepEqual(ws.messages, [{ type: "GetClient", query: "bob" }]);
        ws.receive(command("$GETCLT$", { ip: ["127.0.0.1", 50002], name: "bob", group: null }));
        assert.deepEqual(await asking, new ClientInfo(["127.0.0.1", 50002], "bob", null));
    });

    test("an address, an [ip, port] pair and a ClientInfo are asked about as ip:port", async () => {
        const { client, ws } = await connected();
        for (const query of ["10.0.0.1:5", ["10.0.0.1", 5], new ClientInfo(["10.0.0.1", 5])]) {
            client.getClient(query).catch(() => {});
        }
        assert.deepEqual(ws.messages.map((m) => m.query), ["10.0.0.1:5", "10.0.0.1:5", "10.0.0.1:5"]);
    });

    test("a plain server's answer (no null keys, in native letters) reads the same", async () => {
        const { client, ws } = await connected({}, { caps: null });
        const asking = client.getClient("bob");
        ws.receive(bytes("$CMD$$GETCLT$$MSG$15      d2s14[9s5i]4s3sip127.0.0.150002namebob"));
        assert.deepEqual(await asking, new ClientInfo(["127.0.0.1", 50002], "bob", null));
    });

    test("no such client rejects with ClientNotFound", async () => {
        const { client, ws } = await connected();
        const asking = client.getClient("nobody");
        ws.receive(bytes("$CMD$$GETCLT$$MSG$5       d9s9straceback$NOEXIST$"));
        await assert.rejects(asking, ClientNotFound);
    });

    test("answers are matched in order; one whose caller timed out is swallowed", async () => {
        const { client, ws, clock } = await connected({ answerTimeout: 1000 });
        const first = client.getClient("a");
        first.catch(() => {});
        await clock.tick(1000);
        await assert.rejects(first, TimeoutError);
        const second = client.getClient("b");
        ws.receive(command("$GETCLT$", { ip: ["h", 1], name: "a", group: null })); // the late answer to "a"
        ws.receive(command("$GETCLT$", { ip: ["h", 2], name: "b", group: null }));
        assert.equal((await second).name, "b");
        assert.deepEqual(clock.pending, []);
    });

    test("a $GETCLT$ command nobody waits for goes to the handlers", async () => {
        const { client, ws } = await connected();
        const seen = [];
        client.on("*", (name, content) => seen.push([name, content]));
        ws.receive(command("$GETCLT$", { traceback: "$NOEXIST$" }));
        assert.deepEqual(seen, [["$GETCLT$", { traceback: "$NOEXIST$" }]]);
    });

    test("rejects at once when the connection ends, leaving no timer", async () => {
        const { client, ws, clock } = await connected({ reconnect: false });
        const asking = client.getClient("bob");
        ws.drop();
        await assert.rejects(asking, ClientDisconnected);
        assert.deepEqual(clock.pending, []);
        await assert.rejects(client.getClient("bob"), ClientDisconnected);
    });
});

describe("ending", () => {
    test("close() says $USRCLOSE$, closes the socket, and never reconnects", async () => {
        const { client, ws, clock, sockets } = await connected();
        client.close();
        assert.deepEqual(ws.messages, [{ type: "UserClose" }]);
        assert.equal(ws.closeCode, 1000);
        assert.equal(client.closed, true);
        assert.equal(await client.whenClosed, "the client is closed");
        assert.throws(() => client.send("x", 1), ClientDisconnected);
        assert.throws(() => client.changeName("y"), ClientDisconnected);
        client.close(); // again: nothing
        await clock.tick(600000);
        assert.equal(sockets.length, 1);
    });

    test("close() during connect() rejects it", async () => {
        const { client, sockets } = makeClient();
        const joining = client.connect();
        await settle();
        sockets[0].open();
        client.close();
        await assert.rejects(joining, ClientDisconnected);
        assert.ok(sockets[0].closedByClient);
    });

    test("$DISCONN$ runs force_disconnect and closes for good, without reconnecting", async () => {
        const { client, ws, clock, sockets } = await connected();
        let forced = 0;
        client.on("force_disconnect", () => forced++);
        ws.receive(disconnectBody({ reason: "idle" }));
        assert.equal(forced, 1);
        assert.equal(client.closed, true);
        assert.match(await client.whenClosed, /idle/);
        await clock.tick(600000);
        assert.equal(sockets.length, 1);
    });

    test("with reconnect off, a lost connection closes the client", async () => {
        const { client, ws } = await connected({ reconnect: false });
        ws.drop();
        assert.equal(client.closed, true);
        assert.match(await client.whenClosed, /closed/);
    });
});
