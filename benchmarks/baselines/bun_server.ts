// Baseline: the fastws chat protocol subset on Bun (uWebSockets underneath), written the
// usual Bun way: Bun.serve with its websocket handlers, rooms as uWS topics, and a broadcast
// that encodes once and calls server.publish (uWS' own fan-out, in C++).
//
//     bun benchmarks/baselines/bun_server.ts --host 127.0.0.1 --port 0 --jwt-secret SECRET
//
// Bun is not a fastws dependency: `npm install --prefix benchmarks/baselines bun@1.4.4` puts
// it at benchmarks/baselines/node_modules/.bin/bun, where the harness looks (or set FASTWS_BUN).

import { createHmac, randomUUID, timingSafeEqual } from "node:crypto";

const NAME = "bun_server";
const MAX_MESSAGE_BYTES = 64 * 1024;

type Client = {
  userId: string;
  username: string;
  clientId: string;
  rooms: Set<string>;
};

function arg(name: string, fallback?: string): string {
  const i = process.argv.indexOf(name);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  const eq = process.argv.find((a) => a.startsWith(name + "="));
  if (eq !== undefined) return eq.slice(name.length + 1);
  if (fallback === undefined) throw new Error(`${name} is required`);
  return fallback;
}

function b64url(data: Buffer): string {
  return data.toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}

// An HS256 token with exp in the future -> [userId, username]; else null.
function verify(token: string | null, secret: string): [string, string] | null {
  if (!token) return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const header = JSON.parse(Buffer.from(parts[0], "base64url").toString());
    if (header.alg !== "HS256") return null;
    const want = Buffer.from(
      b64url(createHmac("sha256", secret).update(`${parts[0]}.${parts[1]}`).digest()),
    );
    const got = Buffer.from(parts[2]);
    if (want.length !== got.length || !timingSafeEqual(want, got)) return null;
    const claims = JSON.parse(Buffer.from(parts[1], "base64url").toString());
    if (typeof claims.exp !== "number" || claims.exp * 1000 < Date.now()) return null;
    const userId = claims.userId ?? claims.sub;
    if (userId === undefined || userId === "") return null;
    return [String(userId), String(claims.username ?? userId)];
  } catch {
    return null;
  }
}

const secret = arg("--jwt-secret");
const host = arg("--host", "127.0.0.1");
const port = Number(arg("--port", "8080"));
const members = new Map<string, number>(); // room -> member count
const seqs = new Map<string, number>();
const sockets = new Set<any>();

const server = Bun.serve<Client>({
  hostname: host,
  port,
  fetch(req, srv) {
    const url = new URL(req.url);
    const user = verify(url.searchParams.get("token"), secret);
    if (user === null) return new Response("Unauthorized\n", { status: 401 });
    const data: Client = { userId: user[0], username: user[1], clientId: randomUUID(), rooms: new Set() };
    if (srv.upgrade(req, { data })) return undefined;
    return new Response("Upgrade Required\n", { status: 426 });
  },
  websocket: {
    maxPayloadLength: MAX_MESSAGE_BYTES,
    idleTimeout: 0,
    open(ws) {
      sockets.add(ws);
      ws.send(JSON.stringify({ type: "connected", clientId: ws.data.clientId, timestamp: Date.now() }));
    },
    message(ws, raw) {
      let msg: any;
      try {
        msg = JSON.parse(typeof raw === "string" ? raw : raw.toString());
      } catch {
        msg = null;
      }
      if (msg === null || typeof msg !== "object" || typeof msg.type !== "string") {
        ws.send(JSON.stringify({ type: "error", error: "Invalid message format" }));
        return;
      }
      const kind = msg.type;
      if (kind === "ping") {
        ws.send(JSON.stringify({ type: "pong", timestamp: Date.now() }));
        return;
      }
      if (kind !== "join_room" && kind !== "leave_room" && kind !== "chat_message") {
        ws.send(JSON.stringify({ type: "error", error: `Unknown message type: ${kind}` }));
        return;
      }
      const payload = msg.payload;
      const room = payload && typeof payload === "object" ? payload.room : undefined;
      const text = payload && typeof payload === "object" ? payload.message : undefined;
      if (typeof room !== "string" || (kind === "chat_message" && typeof text !== "string")) {
        ws.send(JSON.stringify({ type: "error", error: `Invalid ${kind} message` }));
        return;
      }
      const c = ws.data;
      if (kind === "join_room") {
        const fresh = !c.rooms.has(room);
        if (fresh) {
          c.rooms.add(room);
          ws.subscribe(room);
          members.set(room, (members.get(room) ?? 0) + 1);
        }
        const count = members.get(room) ?? 0;
        const reply: any = { type: "room_joined", room, members: count, seq: seqs.get(room) ?? 0 };
        if (msg.id !== undefined) reply.id = msg.id;
        ws.send(JSON.stringify(reply));
        if (fresh) {
          // ws.publish: every subscriber but this socket
          ws.publish(room, JSON.stringify({
            type: "user_joined", room, username: c.username, timestamp: Date.now(),
            userId: c.userId, members: count,
          }));
        }
      } else if (!c.rooms.has(room)) {
        ws.send(JSON.stringify({ type: "error", error: `Not a member of room: ${room}` }));
      } else if (kind === "leave_room") {
        leave(ws, room);
      } else {
        const seq = (seqs.get(room) ?? 0) + 1;
        seqs.set(room, seq);
        // server.publish: every subscriber, the sender included (it waits for its own copy)
        server.publish(room, JSON.stringify({
          type: "chat_message", room, username: c.username, message: text,
          timestamp: Date.now(), userId: c.userId, seq,
        }));
      }
    },
    close(ws) {
      sockets.delete(ws);
      for (const room of [...ws.data.rooms]) leave(ws, room);
    },
  },
});

function leave(ws: any, room: string): void {
  const c: Client = ws.data;
  c.rooms.delete(room);
  ws.unsubscribe(room);
  const count = (members.get(room) ?? 1) - 1;
  if (count <= 0) {
    members.delete(room);
    seqs.delete(room);
    return;
  }
  members.set(room, count);
  server.publish(room, JSON.stringify({
    type: "user_left", room, username: c.username, timestamp: Date.now(),
    userId: c.userId, members: count,
  }));
}

console.log(`${NAME} listening on http://${host}:${server.port} (pid ${process.pid})`);

function shutdown(): void {
  for (const ws of sockets) ws.close(1001, "server shutting down");
  setTimeout(() => { server.stop(true); process.exit(0); }, 200);
}
process.on("SIGINT", shutdown);
process.on("SIGTERM", shutdown);
