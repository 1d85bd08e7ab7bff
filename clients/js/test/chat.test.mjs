// The client against a real fastws server: auth by subprotocol, rooms, chat, typing,
// presence, and typed errors.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import WebSocket from "ws";

import { AuthError, ClosedError, FastWS, PROTOCOL, ServerError } from "../index.js";
import { connected, mint, next, SECRET, sleep, startServer, TIMEOUT, within } from "../support/helpers.mjs";

describe("chat", { timeout: 30000 }, () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await server?.stop(); });

  test("connects with the token as a subprotocol; the server echoes fastws.v1", async () => {
    const states = [];
    const client = new FastWS(server.url, { token: mint("alice"), WebSocket });
    client.on("state", (s) => states.push(s));
    try {
      const hello = await within(client.connect(), TIMEOUT, "connect");
      assert.equal(hello.type, "connected");
      assert.equal(hello.userId, "alice");
      assert.equal(client.userId, "alice");
      assert.equal(client.socket.protocol, PROTOCOL);
      assert.ok(!client.socket.url.includes("token"), "the token is not in the URL");
      assert.deepEqual(states, ["connecting", "open"]);
      assert.ok((await client.ping()) >= 0);
    } finally {
      client.close();
    }
    assert.equal(client.state, "closed");
    assert.deepEqual(states, ["connecting", "open", "closed"]);
  });

  test("two clients join a room and chat both ways", async () => {
    const alice = await connected(server, "alice");
    const bob = await connected(server, "bob");
    try {
      const joined = await alice.join("general");
      assert.equal(joined.type, "room_joined");
      assert.equal(joined.members, 1);
      const bobJoins = next(alice, "user_joined", (e) => e.room === "general");
      assert.equal((await bob.join("general")).members, 2);
      assert.equal((await bobJoins).userId, "bob");

      const atBob = next(bob, "message", (m) => m.message === "hi bob");
      const atAlice = next(alice, "message", (m) => m.message === "hi bob");
      const seq = await alice.send("general", "hi bob");
      assert.equal(seq, 1);
      for (const m of [await atBob, await atAlice]) {
        assert.equal(m.seq, 1);
        assert.equal(m.username, "alice");
        assert.equal(m.room, "general");
      }
      const back = next(alice, "message", (m) => m.message === "hi alice");
      assert.equal(await bob.send("general", "hi alice"), 2);
      assert.equal((await back).userId, "bob");
      assert.deepEqual(alice.rooms, ["general"]);
    } finally {
      alice.close();
      bob.close();
    }
  });

  test("typing reaches the other members, not the typist", async () => {
    const alice = await connected(server, "alice");
    const bob = await connected(server, "bob");
    try {
      await alice.join("t");
      await bob.join("t");
      let ownTyping = 0;
      alice.on("typing", () => { ownTyping += 1; });
      const seen = next(bob, "typing", (e) => e.room === "t");
      await alice.typing("t");
      const typing = await seen;
      assert.equal(typing.userId, "alice");
      assert.equal(typing.isTyping, true);
      const stopped = next(bob, "typing", (e) => e.isTyping === false);
      await alice.typing("t", false);
      await stopped;
      assert.equal(ownTyping, 0);
    } finally {
      alice.close();
      bob.close();
    }
  });

  test("presence lists the members and, tracked, follows joins and leaves", async () => {
    const alice = await connected(server, "alice", { trackPresence: true });
    const bob = await connected(server, "bob", { username: "Bob" });
    try {
      const first = next(alice, "presence", (p) => p.room === "p" && p.members.length === 1);
      await alice.join("p");
      await first;
      const two = next(alice, "presence", (p) => p.room === "p" && p.members.length === 2);
      await bob.join("p");
      await two;
      assert.deepEqual(alice.members("p").map((m) => m.userId).sort(), ["alice", "bob"]);
      assert.deepEqual((await bob.presence("p")).map((m) => m.userId).sort(), ["alice", "bob"]);
      const left = next(alice, "user_left", (e) => e.room === "p");
      const one = next(alice, "presence", (p) => p.room === "p" && p.members.length === 1);
      assert.equal((await bob.leave("p")).type, "room_left");
      assert.equal((await left).userId, "bob");
      await one;
      assert.deepEqual(alice.members("p").map((m) => m.userId), ["alice"]);
    } finally {
      alice.close();
      bob.close();
    }
  });

  test("presenceDiffs: joins and leaves come as presence_diff, not one by one", async () => {
    const alice = await connected(server, "alice", { presenceDiffs: true });
    const bob = await connected(server, "bob", { username: "Bob" });
    const carol = await connected(server, "carol");
    let single = 0;
    alice.on("user_joined", () => { single += 1; });
    try {
      await alice.join("d");
      const both = next(alice, "presence_diff", (d) => d.room === "d" && d.members === 3);
      await Promise.all([bob.join("d"), carol.join("d")]);
      const diff = await both;
      assert.ok(diff.joined >= 1);
      const left = next(alice, "presence_diff", (d) => d.room === "d" && d.left === 1);
      await bob.leave("d");
      const gone = await left;
      assert.deepEqual(gone.leaves.map((u) => u.userId), ["bob"]);
      assert.equal(gone.members, 2);
      assert.equal(single, 0);
    } finally {
      alice.close();
      bob.close();
      carol.close();
    }
  });

  test("history returns the newest messages, oldest first", async () => {
    const alice = await connected(server, "alice");
    try {
      await alice.join("h");
      for (const text of ["one", "two", "three"]) await alice.send("h", text);
      const messages = await alice.history("h", 2);
      assert.deepEqual(messages.map((m) => m.message), ["two", "three"]);
    } finally {
      alice.close();
    }
  });

  test("a refused request rejects with a typed ServerError", async () => {
    const alice = await connected(server, "alice");
    try {
      await assert.rejects(alice.join("bad\nroom"), (err) =>
        err instanceof ServerError && err.code === "invalid_room" && /Invalid room name/.test(err.message));
      await assert.rejects(alice.send("nowhere", "x"), (err) =>
        err instanceof ServerError && err.code === "not_in_room" && err.room === "nowhere");
      await alice.join("e");
      await assert.rejects(alice.send("e", "   "), (err) => err.code === "empty_message");
      await assert.rejects(alice.send("e", "x".repeat(1001)), (err) => err.code === "message_too_long");
      assert.throws(() => alice.on("nope", () => {}), TypeError);
      await assert.rejects(alice.send("e", 5), TypeError);
      // The connection stays open after refusals.
      assert.equal(await alice.send("e", "still here"), 1);
    } finally {
      alice.close();
    }
    await assert.rejects(alice.join("e"), (err) => err instanceof ClosedError && err.code === "disconnected");
  });

  test("a bad or missing token fails connect() with AuthError auth_failed", async () => {
    for (const token of [mint("alice", { secret: "x".repeat(40) }), mint("alice", { ttl: -3600 }), undefined]) {
      const client = new FastWS(server.url, { token, WebSocket });
      const states = [];
      client.on("state", (s) => states.push(s));
      await assert.rejects(within(client.connect(), TIMEOUT, "connect"), (err) =>
        err instanceof AuthError && err.code === "auth_failed" && err.status === 401);
      assert.equal(client.state, "closed");
      assert.deepEqual(states, ["connecting", "closed"]);
    }
  });

  test("close() rejects pending requests and stops for good", async () => {
    const alice = await connected(server, "alice");
    await alice.join("c");
    const pending = alice.send("c", "in flight");
    alice.close();
    await assert.rejects(pending, (err) => err instanceof ClosedError && err.code === "closed");
    assert.equal(alice.state, "closed");
    assert.equal(alice.socket, null);
    assert.deepEqual(alice.rooms, []);
  });

  test("a failing getToken fails connect(); close() while getToken runs opens nothing", async () => {
    const failing = new FastWS(server.url, { WebSocket, getToken: async () => { throw new Error("no token service"); } });
    await assert.rejects(within(failing.connect(), TIMEOUT, "connect"), (err) =>
      err instanceof ClosedError && err.code === "handshake_failed" && /no token service/.test(err.message));
    assert.equal(failing.state, "closed");

    let release;
    const gate = new Promise((resolve) => { release = resolve; });
    const slow = new FastWS(server.url, { WebSocket, getToken: async () => { await gate; return mint("alice"); } });
    const pending = slow.connect();
    slow.close();
    await assert.rejects(pending, (err) => err instanceof ClosedError && err.code === "closed");
    release();
    await sleep(200);
    assert.equal(slow.socket, null);
    assert.equal(slow.state, "closed");
  });

  test("bad arguments are TypeErrors at once", () => {
    assert.throws(() => new FastWS("127.0.0.1:8080", { WebSocket }), TypeError);
    assert.throws(() => new FastWS(server.url, { WebSocket, token: 5 }), TypeError);
    assert.throws(() => new FastWS(server.url, { WebSocket: "nope" }), TypeError);
    assert.equal(new FastWS(server.url.replace("ws:", "http:"), { WebSocket }).url, server.url);
    assert.ok(SECRET.length >= 32);
  });
});
