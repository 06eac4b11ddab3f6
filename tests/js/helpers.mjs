// Shared pieces of the JavaScript client's tests: the Python-made fixtures, a fake
// WebSocket and a fake clock, so that every test runs on bytes alone, without a network.

import { readFileSync } from "node:fs";

import {
    ClientInfo,
    Float,
    HiSockClient,
    Tuple,
    parseClientBody,
    peerJoinedBody,
} from "../../hisock_gevent/static/hisock.js";

export const fixtures = JSON.parse(readFileSync(new URL("./fixtures.json", import.meta.url), "utf-8"));

export function hex(bytes) {
    return Buffer.from(bytes).toString("hex");
}

export function unhex(text) {
    return new Uint8Array(Buffer.from(text, "hex"));
}

export function text(bytes) {
    return Buffer.from(bytes).toString("latin1");
}

export function bytes(latin1) {
    return new Uint8Array(Buffer.from(latin1, "latin1"));
}

/**
 * The JavaScript value a fixture's tagged description stands for.  `forSending`: floats
 * become Float wrappers, so that an integral float (2.0) is sent as a float again.
 */
export function fromDescription(description, forSending = false) {
    const { t, v } = description;
    const child = (item) => fromDescription(item, forSending);
    switch (t) {
        case "none":
            return null;
        case "bool":
        case "str":
            return v;
        case "int": {
            const big = BigInt(v);
            return big >= -BigInt(Number.MAX_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
        }
        case "float": {
            const number = new DataView(unhex(v).buffer).getFloat64(0);
            return forSending ? new Float(number) : number;
        }
        case "bytes":
            return unhex(v);
        case "list":
            return v.map(child);
        case "tuple":
            return Tuple.from(v.map(child));
        case "dict": {
            const pairs = v.map(([key, value]) => [child(key), child(value)]);
            if (!pairs.every(([key]) => typeof key === "string")) return new Map(pairs);
            const object = {};
            for (const [key, value] of pairs) {
                Object.defineProperty(object, key, { value, enumerable: true, writable: true, configurable: true });
            }
            return object;
        }
        case "clientinfo":
            return new ClientInfo([v[0], v[1]], v[2], v[3]);
        default:
            throw new Error(`unknown description ${t}`);
    }
}

/** Let every pending promise callback and already-due event run. */
export function settle() {
    return new Promise((resolve) => setImmediate(resolve));
}

/** A clock whose time moves only when a test says so. */
export class FakeClock {
    constructor() {
        this.now = 0;
        this.timers = new Map();
        this.nextId = 1;
    }

    setTimeout(callback, delay = 0) {
        const id = this.nextId++;
        this.timers.set(id, { at: this.now + Math.max(0, delay), callback, delay });
        return id;
    }

    clearTimeout(id) {
        this.timers.delete(id);
    }

    /** Delays of the timers pending now, soonest first. */
    get pending() {
        return [...this.timers.values()].sort((a, b) => a.at - b.at).map((timer) => timer.delay);
    }

    /** Move time on by `ms`, firing every timer due on the way, each with its promises settled. */
    async tick(ms) {
        const end = this.now + ms;
        for (;;) {
            let due = null;
            for (const [id, timer] of this.timers) {
                if (timer.at <= end && (due === null || timer.at < due[1].at)) due = [id, timer];
            }
            if (due === null) break;
            this.timers.delete(due[0]);
            this.now = due[1].at;
            due[1].callback();
            await settle();
        }
        this.now = end;
        await settle();
    }
}

/**
 * A stand-in for the browser's WebSocket: records what the client sends and lets the test
 * play the server (`open`, `receive`, `drop`, `fail`).
 */
export class FakeWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;

    constructor(url) {
        this.url = url;
        this.readyState = FakeWebSocket.CONNECTING;
        this.binaryType = "blob";
        this.bufferedAmount = 0;
        this.sent = [];
        this.closeCode = null;
        this.onopen = this.onmessage = this.onclose = this.onerror = null;
    }

    send(data) {
        if (this.readyState !== FakeWebSocket.OPEN) throw new Error("InvalidStateError: the socket is not open");
        if (!(data instanceof Uint8Array)) throw new Error("the client sends only binary messages");
        this.sent.push(new Uint8Array(data));
    }

    close(code) {
        if (this.readyState >= FakeWebSocket.CLOSING) return;
        this.closeCode = code ?? 1005;
        this.readyState = FakeWebSocket.CLOSED;
        queueMicrotask(() => this.onclose?.({ code: this.closeCode, wasClean: true }));
    }

    // ---- the server's side

    open() {
        this.readyState = FakeWebSocket.OPEN;
        this.onopen?.({});
    }

    /** Deliver one message (a body as bytes, or a string for a text message). */
    receive(body) {
        const data = typeof body === "string" ? body : body.slice().buffer;
        this.onmessage?.({ data });
    }

    /** The server closes the connection. */
    drop() {
        if (this.readyState === FakeWebSocket.CLOSED) return;
        this.readyState = FakeWebSocket.CLOSED;
        this.onclose?.({ code: 1006, wasClean: false });
    }

    /** The connection could not be made at all. */
    fail() {
        this.readyState = FakeWebSocket.CLOSED;
        this.onerror?.({});
        this.onclose?.({ code: 1006, wasClean: false });
    }

    /** What the client sent, parsed as a server would. */
    get messages() {
        return this.sent.map((body) => parseClientBody(body));
    }

    get closedByClient() {
        return this.closeCode !== null;
    }
}

/** A client wired to fakes: its sockets (one per connection attempt), clock and reported errors. */
export function makeClient(options = {}) {
    const clock = new FakeClock();
    const sockets = [];
    const errors = [];
    class Socket extends FakeWebSocket {
        constructor(url) {
            super(url);
            sockets.push(this);
        }
    }
    const client = new HiSockClient("ws://hisock.test/ws", {
        WebSocketImpl: Socket,
        clock,
        random: () => 0.5,
        onError: (error, where) => errors.push({ error, where }),
        ...options,
    });
    return { client, clock, sockets, errors };
}

export function infoObject(name = "alice", group = "lobby", port = 50000) {
    return { ip: ["127.0.0.1", port], name, group, ipstr: `127.0.0.1:${port}` };
}

/** Play the server's side of the handshake on `ws`: open, read the hello, answer it. */
export function accept(ws, { caps = ["msgpack", "call"] } = {}) {
    if (ws.readyState === FakeWebSocket.CONNECTING) ws.open();
    const hello = parseClientBody(ws.sent[0]);
    if (hello.type !== "Hello") throw new Error(`the first message is ${hello.type}, not a hello`);
    const answer = infoObject(hello.name, hello.group);
    ws.receive(peerJoinedBody(caps === null ? answer : { ...answer, caps }));
    return hello;
}

/** A client connected through the fake socket, with the given server capabilities. */
export async function connected(options = {}, acceptOptions = {}) {
    const made = makeClient(options);
    const joining = made.client.connect();
    await settle();
    accept(made.sockets[0], acceptOptions);
    await joining;
    made.ws = made.sockets[0];
    made.ws.sent.length = 0; // the hello: tests look at what came after it
    return made;
}
