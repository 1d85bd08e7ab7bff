// Test helpers: a real `fastws serve` subprocess, HS256 tokens, and bounded waits.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import WebSocket from "ws";

import { FastWS } from "../index.js";

export const SECRET = "js-test-secret-that-is-long-enough-for-hs256";
export const TIMEOUT = 5000;
const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

/** The Python with fastws installed: $FASTWS_PYTHON, the repo's .venv, or python3 on PATH. */
function python() {
  if (process.env.FASTWS_PYTHON) return process.env.FASTWS_PYTHON;
  const venv = join(ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

/** An HS256 JWT with the claims `fastws token` mints; `ttl` in seconds (negative: expired). */
export function mint(user, { ttl = 3600, secret = SECRET, username } = {}) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({
    // exp rounded up: with iat's floor a 1 s token had 0-1 s left, and a connect that
    // crossed the second boundary was refused (401) before the test began.
    userId: user, username: username ?? user, roles: [], iat: now,
    exp: Math.ceil(Date.now() / 1000) + ttl,
  })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/**
 * Start `fastws serve` on 127.0.0.1 (port 0 = a free one) and resolve once it prints its
 * listening line: {port, url, stop()}. `stop()` kills it (SIGKILL by default) and waits.
 */
export async function startServer({ port = 0, args = [] } = {}) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("FASTWS_")));
  const proc = spawn(python(), ["-m", "fastws", "serve", "--host", "127.0.0.1", "--port", String(port),
                                "--jwt-secret", SECRET, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  proc.stderr.setEncoding("utf8").on("data", (d) => { output += d; });
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  const listening = new Promise((resolve, reject) => {
    let out = "";
    proc.stdout.setEncoding("utf8").on("data", (d) => {
      out += d;
      const m = /listening on http:\/\/[\d.]+:(\d+)/.exec(out);
      if (m) resolve(Number(m[1]));
    });
    proc.once("error", reject);
    proc.once("exit", (code) => reject(new Error(`fastws serve exited with ${code}:\n${output}`)));
  });
  let actual;
  try {
    actual = await within(listening, 15000, "fastws serve did not start");
  } catch (err) {
    proc.kill("SIGKILL");
    throw err;
  }
  return {
    port: actual,
    url: `ws://127.0.0.1:${actual}/ws`,
    proc,
    get output() { return output; },
    async stop(signal = "SIGKILL") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await within(exited, TIMEOUT, "fastws serve did not exit");
    },
  };
}

/** `promise`, or a rejection after `ms` saying `what`. */
export function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** The next `event` of `client` for which `predicate` holds, within `ms`. */
export function next(client, event, predicate = () => true, ms = TIMEOUT) {
  let off;
  const seen = new Promise((resolve) => {
    off = client.on(event, (value) => { if (predicate(value)) resolve(value); });
  });
  return within(seen, ms, `event ${event}`).finally(() => off());
}

/** A FastWS client on `ws` for `user`, connected; options are passed on. */
export async function connected(server, user, options = {}) {
  const client = new FastWS(server.url, { token: mint(user), WebSocket, ...options });
  await within(client.connect(), TIMEOUT, `connect ${user}`);
  return client;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
