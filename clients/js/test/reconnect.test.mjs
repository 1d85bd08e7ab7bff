// Reconnection against a real fastws server: recovery of missed messages without duplicates,
// a server restart on the same port, token expiry (4001) and policy closes (1008).
import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket from "ws";

import { AuthError, ClosedError, FastWS, ServerError } from "../index.js";
import { connected, mint, next, sleep, startServer, TIMEOUT, within } from "../support/helpers.mjs";

const FAST = { backoffInitial: 50, backoffMax: 200 };

test("messages sent while a client was away are recovered, each once and in order", { timeout: 30000 }, async () => {
  const server = await startServer();
  // bob's reconnect waits at this gate (getToken runs before every attempt), so the
  // messages below are certainly sent while he is away.
  let openGate;
  let gate = Promise.resolve();
  const alice = await connected(server, "alice");
  const bob = new FastWS(server.url, {
    WebSocket, ...FAST, getToken: async () => { await gate; return mint("bob"); },
  });
  try {
    await within(bob.connect(), TIMEOUT, "bob connects");
    await alice.join("r");
    await bob.join("r");
    const got = [];
    bob.on("message", (m) => got.push(m.seq));
    const third = next(bob, "message", (m) => m.seq === 3);
    for (const text of ["1", "2", "3"]) await alice.send("r", text);
    await third;

    gate = new Promise((resolve) => { openGate = resolve; });
    const states = [];
    bob.on("state", (s) => states.push(s));
    const dropped = next(bob, "disconnected");
    bob.socket.terminate();  // the TCP connection dies: no close frame, 1006
    assert.equal((await dropped).code, 1006);
    assert.equal(bob.state, "reconnecting");
    await assert.rejects(bob.send("r", "while away"), (err) => err instanceof ClosedError && err.code === "disconnected");
    for (const text of ["4", "5", "6", "7"]) await alice.send("r", text);

    const rejoined = next(bob, "room_joined", (e) => e.room === "r", 10000);
    const reconnected = next(bob, "reconnected", undefined, 10000);
    const last = next(bob, "message", (m) => m.seq === 7, 10000);
    openGate();
    await reconnected;
    const joined = await rejoined;
    assert.equal(joined.recovered, true);
    await last;
    const live = next(bob, "message", (m) => m.seq === 8);
    assert.equal(await alice.send("r", "8"), 8);
    await live;
    assert.deepEqual(got, [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(states, ["reconnecting", "open"]);
    assert.deepEqual(bob.rooms, ["r"]);
  } finally {
    alice.close();
    bob.close();
    await server.stop();
  }
});

test("the client survives a server restart on the same port and rejoins its rooms", { timeout: 40000 }, async () => {
  let server = await startServer();
  const port = server.port;
  const alice = await connected(server, "alice", FAST);
  const bob = await connected(server, "bob", FAST);
  try {
    await alice.join("lobby");
    await bob.join("lobby");
    const hello = next(bob, "message", (m) => m.message === "before");
    await alice.send("lobby", "before");
    await hello;

    const aliceDown = next(alice, "state", (s) => s === "reconnecting");
    const bobDown = next(bob, "state", (s) => s === "reconnecting");
    await server.stop("SIGKILL");
    await aliceDown;
    await bobDown;

    const rejoinedA = next(alice, "room_joined", (e) => e.room === "lobby", 20000);
    const rejoinedB = next(bob, "room_joined", (e) => e.room === "lobby", 20000);
    server = await startServer({ port });
    // A new process keeps no history of the old one: a new epoch, so nothing to recover.
    assert.equal((await rejoinedA).recovered, false);
    assert.equal((await rejoinedB).recovered, false);
    assert.equal(alice.state, "open");

    const after = next(bob, "message", (m) => m.message === "after");
    assert.equal(await alice.send("lobby", "after"), 1);
    assert.equal((await after).seq, 1);
  } finally {
    alice.close();
    bob.close();
    await server.stop();
  }
});

test("token expiry (4001) stops the client unless getToken gives a fresh token", { timeout: 30000 }, async () => {
  const server = await startServer({ args: ["--jwt-leeway", "0"] });
  try {
    // Without getToken: an AuthError `token_expired`, and no reconnect.
    const short = new FastWS(server.url, { token: mint("alice", { ttl: 1 }), WebSocket, ...FAST });
    const states = [];
    short.on("state", (s) => states.push(s));
    await within(short.connect(), TIMEOUT, "connect");
    const error = await next(short, "error", () => true, 10000);
    assert.ok(error instanceof AuthError);
    assert.equal(error.code, "token_expired");
    assert.equal(error.closeCode, 4001);
    assert.equal(short.state, "closed");
    assert.deepEqual(states, ["connecting", "open", "closed"]);

    // With getToken: a fresh token and a reconnect, rooms rejoined.
    let minted = 0;
    const renewing = new FastWS(server.url, {
      // refreshBefore 0: no renewal ahead of time, so the token really expires.
      WebSocket, ...FAST, refreshBefore: 0,
      getToken: () => { minted += 1; return mint("bob", { ttl: minted === 1 ? 1 : 3600 }); },
    });
    try {
      await within(renewing.connect(), TIMEOUT, "connect");
      await renewing.join("x");
      const rejoined = next(renewing, "room_joined", (e) => e.room === "x", 10000);
      const expired = next(renewing, "error", (e) => e.code === "token_expired", 10000);
      await expired;
      await rejoined;
      assert.equal(renewing.state, "open");
      assert.equal(minted, 2);
      assert.equal(await renewing.send("x", "renewed"), 1);
    } finally {
      renewing.close();
    }
  } finally {
    await server.stop();
  }
});

test("a 401 on a reconnect is retried once with a fresh token from getToken, then stops", { timeout: 30000 }, async () => {
  const server = await startServer();
  const tokens = [];
  // The script of what getToken hands out: good, then an expired one (401), then good again.
  const script = ["good", "expired", "good", "expired", "expired"];
  const bob = new FastWS(server.url, {
    WebSocket, ...FAST, refreshBefore: 0,
    getToken: () => { const kind = script[tokens.length]; tokens.push(kind); return mint("bob", { ttl: kind === "good" ? 3600 : -3600 }); },
  });
  try {
    await within(bob.connect(), TIMEOUT, "connect");
    await bob.join("a");
    const back = next(bob, "reconnected", undefined, 10000);
    bob.socket.terminate();
    await back;
    assert.deepEqual(tokens, ["good", "expired", "good"]);
    assert.equal(await bob.send("a", "back"), 1);

    // Two refusals in a row: the client gives up with auth_failed.
    const stopped = next(bob, "error", (e) => e.code === "auth_failed", 10000);
    bob.socket.terminate();
    const error = await stopped;
    assert.ok(error instanceof AuthError);
    assert.equal(error.status, 401);
    assert.deepEqual(tokens, ["good", "expired", "good", "expired", "expired"]);
    assert.equal(bob.state, "closed");
  } finally {
    bob.close();
    await server.stop();
  }
});

test("with getToken the client renews its token before expiry and is never closed", { timeout: 30000 }, async () => {
  const server = await startServer({ args: ["--jwt-leeway", "0"] });
  let minted = 0;
  const alice = new FastWS(server.url, {
    WebSocket, ...FAST, refreshBefore: 1000, getToken: () => { minted += 1; return mint("alice", { ttl: 2 }); },
  });
  try {
    let drops = 0;
    alice.on("disconnected", () => { drops += 1; });
    await within(alice.connect(), TIMEOUT, "connect");
    await alice.join("k");
    const renewals = [];
    alice.on("refreshed", (e) => renewals.push(e.expiresAt));
    // Each token lives under 2 s; 4.5 s later the first connection is still the one in use.
    await sleep(4500);
    assert.equal(drops, 0);
    assert.equal(alice.state, "open");
    assert.ok(renewals.length >= 2, `renewed ${renewals.length} times`);
    assert.ok(renewals.every((ms) => ms > Date.now() - 3000));
    assert.ok(minted >= 3);
    assert.equal(await alice.send("k", "still the same connection"), 1);
  } finally {
    alice.close();
    await server.stop();
  }
});

test("a 1008 close (flooding) stops the client with policy_violation", { timeout: 30000 }, async () => {
  const server = await startServer({ args: ["--rate-limit", "1", "--rate-burst", "2"] });
  const alice = await connected(server, "alice", FAST);
  try {
    const errors = [];
    alice.on("error", (e) => errors.push(e));
    const stopped = next(alice, "state", (s) => s === "closed", 10000);
    const results = await Promise.allSettled(Array.from({ length: 10 }, () => alice.ping()));
    await stopped;
    assert.ok(results.some((r) => r.status === "rejected"));
    assert.ok(errors.some((e) => e instanceof ServerError && e.code === "rate_limited"), "rate_limited errors come first");
    const last = errors.at(-1);
    assert.ok(last instanceof ClosedError);
    assert.equal(last.code, "policy_violation");
    assert.equal(last.closeCode, 1008);
    assert.equal(alice.state, "closed");
  } finally {
    alice.close();
    await server.stop();
  }
});
