// fastws.js: the JavaScript client for fastws (plain ES module, no build step).
//
//   import { FastWS } from "/fastws.js";            // served by fastws itself
//   const chat = new FastWS("ws://127.0.0.1:8080/ws", { token });
//   chat.on("message", (m) => console.log(m.seq, m.username, m.message));
//   await chat.connect();
//   await chat.join("general");
//   await chat.send("general", "hello");
//
// What it guarantees (the same as the Python client, fastws/client.py):
// - The token travels as a Sec-WebSocket-Protocol value (`fastws.token.<jwt>`, offered with
//   `fastws.v1`, which the server echoes): browsers cannot set Authorization on a WebSocket
//   and a query string ends up in proxy logs. See docs/protocol.md section 1.
// - Requests carry a fresh `id`; their promise settles with the reply carrying that id, or
//   rejects with a typed error (ServerError, ClosedError, RequestTimeout).
// - When the connection drops, it reconnects with exponential backoff and full jitter and
//   re-joins every room with `since` = the last (seq, epoch) it delivered: the server replays
//   what was missed and the client drops what it already delivered, so each chat message
//   reaches the app once and in order.
// - It does not reconnect after close 4001 (token expired) unless `getToken` can give a
//   fresh token, nor after 1008 (policy) unless `reconnectOnPolicyClose` is set, nor after an
//   HTTP 401 at the upgrade (when the WebSocket implementation reports it; browsers do not),
//   except once with a fresh token from `getToken`.

export const PROTOCOL = "fastws.v1";
export const TOKEN_PROTOCOL_PREFIX = "fastws.token.";

/** Base of every error the client reports: `code` is machine-readable. */
export class FastWSError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = "FastWSError";
    this.code = code;
    Object.assign(this, details);
  }
}

/** The server refused one request: `code` is its error code (`not_in_room`, `invalid_room`,
 *  `rate_limited`, ...; docs/protocol.md section 4). The connection stays open. */
export class ServerError extends FastWSError {
  constructor(code, message, details) { super(code, message, details); this.name = "ServerError"; }
}

/** The token was refused: `auth_failed` (HTTP 401 at the upgrade) or `token_expired`
 *  (close 4001 and no `getToken` to get a fresh one). The client has stopped. */
export class AuthError extends FastWSError {
  constructor(code, message, details) { super(code, message, details); this.name = "AuthError"; }
}

/** No connection: `disconnected` (dropped or not open yet; `closeCode` says how),
 *  `closed` (close() was called), `policy_violation` (close 1008; the client stopped),
 *  `handshake_failed` (the WebSocket did not open). */
export class ClosedError extends FastWSError {
  constructor(code, message, details) { super(code, message, details); this.name = "ClosedError"; }
}

/** A request got no reply within `requestTimeout` ms (it may still have taken effect). */
export class RequestTimeout extends FastWSError {
  constructor(message, details) { super("timeout", message, details); this.name = "RequestTimeout"; }
}

const TOKEN_EXPIRED = 4001;
const noop = () => {};
// Handlers become no-ops, not null: the ws package throws an 'error' event nobody listens to.
const detach = (ws) => { ws.onopen = ws.onmessage = ws.onerror = ws.onclose = noop; };
const POLICY_VIOLATION = 1008;
const EVENTS = new Set(["message", "user_joined", "user_left", "presence_diff", "typing", "presence", "room_joined",
                        "state", "error", "connected", "disconnected", "reconnected", "refreshed", "*"]);

/** The `exp` claim of a JWT, in ms, or null: read only to schedule a refresh, never trusted. */
function expiryOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "="))).exp;
    return Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

export class FastWS {
  /**
   * `url`: the server's WebSocket URL (`ws://host:port/ws`; `http(s)://` is turned into
   * `ws(s)://`). Options:
   * - `token`: a JWT; or `getToken`: a function (may be async) returning one, called before
   *   every connection attempt (it also makes a 4001 close reconnect with a fresh token).
   * - `WebSocket`: the constructor to use (default `globalThis.WebSocket`; in Node < 22
   *   pass the `ws` package's).
   * - `reconnect` (true), `backoffInitial` (500 ms), `backoffMax` (10000 ms): attempt n
   *   (from 0) first waits `random() * min(backoffMax, backoffInitial * 2**n)` ms.
   * - `reconnectOnPolicyClose` (false): reconnect after a 1008 close too.
   * - `requestTimeout` (10000 ms): bounds each request and each connection attempt.
   * - `trackPresence` (false): ask for `presence` after every join, rejoin, user_joined and
   *   user_left, so the `presence` event always carries the room's current member list.
   * - `presenceDiffs` (false): join rooms with `"presence": "diff"`: the room's joins and
   *   leaves come as one `presence_diff` event per interval ({room, members, joined, left,
   *   joins?, leaves?}) instead of a `user_joined`/`user_left` per change.
   * - `refreshBefore` (30000 ms; 0 = off): with `getToken`, renew the connection's token that
   *   long before its `exp` (half way through a shorter life) with a `refresh` message.
   */
  constructor(url, options = {}) {
    if (typeof url !== "string" || !/^(wss?|https?):\/\//.test(url)) {
      throw new TypeError(`FastWS: url must be ws://, wss://, http:// or https://, got ${url}`);
    }
    this.url = url.replace(/^http/, "ws");
    const o = options;
    if (o.token !== undefined && typeof o.token !== "string") {
      throw new TypeError("FastWS: token must be a string");
    }
    if (o.getToken !== undefined && typeof o.getToken !== "function") {
      throw new TypeError("FastWS: getToken must be a function");
    }
    this._token = o.token;
    this._getToken = o.getToken;
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("FastWS: no WebSocket here; pass { WebSocket } (e.g. from the ws package)");
    }
    this._reconnect = o.reconnect ?? true;
    this._backoffInitial = o.backoffInitial ?? 500;
    this._backoffMax = o.backoffMax ?? 10000;
    this._reconnectOnPolicyClose = o.reconnectOnPolicyClose ?? false;
    this._requestTimeout = o.requestTimeout ?? 10000;
    this._trackPresence = o.trackPresence ?? false;
    this._presenceDiffs = o.presenceDiffs ?? false;
    this._refreshBefore = o.refreshBefore ?? 30000;
    this._refreshTimer = null;
    this._connToken = null;   // the token the current connection was opened with

    this._state = "closed";
    this._ws = null;          // the socket messages are taken from
    this._ready = false;      // that socket said `connected` and the re-joins are sent
    this._attempt = 0;        // reconnect attempts since the last successful connection
    this._retryTimer = null;
    this._opening = null;     // {resolve, reject} of connect() until the first `connected`
    this._rooms = new Map();  // room -> {seq, epoch}: the last chat_message delivered
    this._members = new Map(); // room -> [{userId, username}] from the last presence reply
    this._pending = new Map(); // id -> {type, room, resolve, reject, timer}
    this._nextId = 0;
    this._run = 0;            // bumped by close(): an attempt from before it must not go on
    this._authRetried = false; // a 401 on a reconnect was retried once with a fresh token
    this._listeners = new Map();
    this.clientId = null;
    this.userId = null;
    this.username = null;
  }

  // ---- lifecycle ------------------------------------------------------------------------

  /** 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() { return this._state; }

  /** The current WebSocket (or null): for diagnostics and tests, not for sending. */
  get socket() { return this._ws; }

  /** The rooms this client is in and re-joins after a reconnect. */
  get rooms() { return [...this._rooms.keys()]; }

  /** The last known members of `room` (kept current with `trackPresence`). */
  members(room) { return this._members.get(room) ?? []; }

  /**
   * Open the connection; resolves with the server's `connected` message. Rejects with an
   * AuthError or a ClosedError (`handshake_failed`) if this first attempt fails: there is no
   * retry here. Once open, the client stays connected (reconnecting as needed) until close().
   */
  connect() {
    if (this._state !== "closed") return Promise.reject(new FastWSError("usage", "already connected"));
    return new Promise((resolve, reject) => {
      this._opening = { resolve, reject };
      this._setState("connecting");
      this._open();
    });
  }

  /** Close with 1000 and stop: no more reconnects, pending requests reject with ClosedError
   *  `closed`, and the remembered rooms are forgotten. Safe to call more than once. */
  close() {
    this._run += 1;
    clearTimeout(this._refreshTimer);
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const ws = this._ws;
    this._ws = null;
    this._ready = false;
    if (ws) {
      detach(ws);
      try { ws.close(1000); } catch { /* already closing */ }
    }
    this._failPending(new ClosedError("closed", "the client was closed"));
    this._failOpening(new ClosedError("closed", "the client was closed"));
    this._rooms.clear();
    this._members.clear();
    this._setState("closed");
  }

  /** While reconnecting, try now instead of waiting out the backoff (a "Retry now" button). */
  retryNow() {
    if (this._state !== "reconnecting" || this._ws || !this._retryTimer) return;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._open();
  }

  // ---- requests -------------------------------------------------------------------------

  /** Join `room`; resolves with its `room_joined` (`members`, `seq`, `epoch`). From then on
   *  the room is re-joined with recovery after every reconnect, until leave() or close(). */
  join(room) { return this._request("join_room", this._joinPayload(room), room); }

  _joinPayload(room) {
    return this._presenceDiffs ? { room, presence: "diff" } : { room };
  }

  /** Leave `room`; it is no longer re-joined. Resolves with `room_left`. */
  leave(room) {
    this._rooms.delete(room);
    this._members.delete(room);
    return this._request("leave_room", { room }, room);
  }

  /** Post `text` to `room`; resolves with the message's `seq` (from the ack). The message
   *  also arrives as a `message` event, like everyone else's. */
  async send(room, text) {
    if (typeof text !== "string") throw new TypeError("FastWS.send: text must be a string");
    const ack = await this._request("chat_message", { room, message: text }, room);
    return ack.seq;
  }

  /** Tell the room's other members this user is typing (or stopped: `isTyping` false). */
  async typing(room, isTyping = true) {
    await this._request("typing", { room, isTyping: !!isTyping }, room);
  }

  /** The users in `room`: `[{userId, username}]` (each user once). */
  async presence(room) {
    const reply = await this._request("presence", { room }, room);
    return reply.members;
  }

  /** Up to `limit` (1-1000) of the newest messages the server keeps for `room`, oldest first. */
  async history(room, limit = 50) {
    const reply = await this._request("history", { room, limit }, room);
    return reply.messages;
  }

  /** Renew the connection's token before it expires (else close 4001); resolves with the
   *  new expiry in ms. Later reconnects use `token` too. */
  async refresh(token) {
    if (typeof token !== "string") throw new TypeError("FastWS.refresh: token must be a string");
    const reply = await this._request("refresh", { token }, "");
    this._token = token;
    this._connToken = token;
    this._scheduleRefresh();
    this._emit("refreshed", { expiresAt: reply.expiresAt });
    return reply.expiresAt;
  }

  /** An application-level round trip; resolves with its duration in ms. */
  async ping() {
    const start = Date.now();
    await this._request("ping", undefined, "");
    return Date.now() - start;
  }

  // ---- events ---------------------------------------------------------------------------

  /**
   * Call `callback(event)` for each `event`: 'message' (a chat_message, once each),
   * 'user_joined', 'user_left', 'typing', 'presence' ({room, members}), 'room_joined' (the
   * outcome of a re-join: `recovered` false means reload history()), 'state' (the new state
   * string), 'connected', 'disconnected' ({code, reason}), 'reconnected', 'refreshed'
   * ({expiresAt}: the token was renewed), 'error' (a
   * FastWSError: a server error with no request to reject, a failed re-join, or why the
   * client stopped), '*' (every server message). Returns a function that removes it.
   */
  on(event, callback) {
    if (!EVENTS.has(event)) throw new TypeError(`FastWS.on: unknown event ${event}`);
    if (typeof callback !== "function") throw new TypeError("FastWS.on: callback must be a function");
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(callback);
    return () => this.off(event, callback);
  }

  off(event, callback) {
    this._listeners.get(event)?.delete(callback);
  }

  // ---- internals: connecting ------------------------------------------------------------

  async _open() {
    const run = this._run;
    let token;
    try {
      token = this._getToken ? await this._getToken() : this._token;
    } catch (err) {
      if (run === this._run) {
        this._handshakeFailed(new ClosedError("handshake_failed", `getToken failed: ${err}`, { cause: err }));
      }
      return;
    }
    if (run !== this._run || this._state === "closed") return;  // close() while getToken ran
    this._connToken = typeof token === "string" ? token : null;
    const protocols = typeof token === "string" && token ? [PROTOCOL, TOKEN_PROTOCOL_PREFIX + token] : [PROTOCOL];
    let ws;
    try {
      ws = new this._WebSocket(this.url, protocols);
    } catch (err) {
      this._handshakeFailed(new ClosedError("handshake_failed", String(err?.message ?? err), { cause: err }));
      return;
    }
    this._ws = ws;
    let opened = false;
    let refused = null;  // an HTTP status the implementation reported (the ws package does)
    const timer = setTimeout(() => {
      if (this._ws === ws && !this._ready) {
        try { ws.close(); } catch { /* closing anyway */ }
        this._drop(ws, opened, null, 0, "no `connected` within requestTimeout");
      }
    }, this._requestTimeout);
    ws.onopen = () => { opened = true; };
    ws.onerror = (ev) => {
      const status = /Unexpected server response: (\d{3})/.exec(String(ev?.message ?? ""));
      if (status) refused = Number(status[1]);
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws || typeof ev.data !== "string") return;
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      if (msg === null || typeof msg !== "object" || typeof msg.type !== "string") return;
      if (msg.type === "connected") clearTimeout(timer);
      this._receive(ws, msg);
    };
    ws.onclose = (ev) => {
      clearTimeout(timer);
      this._drop(ws, opened, refused, ev.code, ev.reason);
    };
  }

  _handshakeFailed(error) {
    this._ws = null;
    this._afterDrop(error);
  }

  /** `ws` is gone. Decide, from how it ended, whether and how to come back. */
  _drop(ws, opened, refused, code, reason) {
    if (this._ws !== ws) return;
    detach(ws);
    this._ws = null;
    const wasReady = this._ready;
    this._ready = false;
    clearTimeout(this._refreshTimer);
    this._failPending(new ClosedError("disconnected", "the connection dropped before the reply", { closeCode: code }));
    if (wasReady) this._emit("disconnected", { code, reason });
    if (refused === 401) {
      const error = new AuthError("auth_failed", "the server refused the token (HTTP 401)", { status: 401 });
      // A token that expired while the server was away: one more try with a fresh one.
      if (this._getToken && !this._opening && !this._authRetried) {
        this._authRetried = true;
        this._afterDrop(error, 0);
      } else {
        this._stop(error);
      }
      return;
    }
    if (code === TOKEN_EXPIRED) {
      const error = new AuthError("token_expired", "the token expired (close 4001)", { closeCode: code });
      if (this._getToken) { this._emit("error", error); this._afterDrop(error, 0); }
      else this._stop(error);
      return;
    }
    if (code === POLICY_VIOLATION && !this._reconnectOnPolicyClose) {
      this._stop(new ClosedError("policy_violation", `closed by the server: ${reason || "policy violation"}`, { closeCode: code }));
      return;
    }
    const error = !opened
      ? new ClosedError("handshake_failed", refused ? `the server answered HTTP ${refused}` :
                        "the WebSocket did not open (server down, or the upgrade was refused)", { status: refused })
      : new ClosedError("disconnected", `connection closed (${code}${reason ? " " + reason : ""})`, { closeCode: code });
    this._afterDrop(error);
  }

  _afterDrop(error, delay) {
    if (this._opening) { this._stop(error); return; }  // the first connect() fails: no retry
    if (!this._reconnect) { this._stop(error); return; }
    this._setState("reconnecting");
    const ceiling = Math.min(this._backoffMax, this._backoffInitial * 2 ** Math.min(this._attempt, 30));
    this._attempt += 1;
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => { this._retryTimer = null; this._open(); },
                                  delay ?? Math.random() * ceiling);  // "full jitter"
  }

  /** Stop for good with `error`: reported to connect()'s caller or as an 'error' event. */
  _stop(error) {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._ready = false;
    this._failPending(error);
    if (this._opening) this._failOpening(error);
    else this._emit("error", error);
    this._setState("closed");
  }

  _failOpening(error) {
    const opening = this._opening;
    this._opening = null;
    opening?.reject(error);
  }

  _connected(ws, msg) {
    this.clientId = msg.clientId ?? null;
    this.userId = msg.userId ?? null;
    this.username = msg.username ?? null;
    const rejoin = this._state === "reconnecting";
    this._attempt = 0;
    this._authRetried = false;
    this._ready = true;
    // Re-join before anything of the app can be sent, so the server handles them first.
    for (const [room, pos] of this._rooms) {
      const payload = this._joinPayload(room);
      if (pos.epoch) payload.since = { seq: pos.seq, epoch: pos.epoch };
      this._sendRequest("join_room", payload, room, null);
    }
    this._setState("open");
    this._scheduleRefresh();
    this._emit("connected", msg);
    if (rejoin) this._emit("reconnected", {});
    const opening = this._opening;
    this._opening = null;
    opening?.resolve(msg);
  }

  /** With getToken, renew the connection's token (a `refresh` message) `refreshBefore` ms
   *  before it expires, or half way through a shorter life, so the server never closes
   *  with 4001. A failed renewal is an `error` event; the 4001 path then takes over. */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const expires = this._connToken && expiryOf(this._connToken);
    if (!this._getToken || !this._refreshBefore || !expires) return;
    const remaining = expires - Date.now();
    const delay = remaining > 2 * this._refreshBefore ? remaining - this._refreshBefore : remaining / 2;
    this._refreshTimer = setTimeout(async () => {
      this._refreshTimer = null;
      try {
        const token = await this._getToken();
        if (this._ready) await this.refresh(token);
      } catch (err) {
        if (this._ready) {
          this._emit("error", err instanceof FastWSError ? err : new AuthError("refresh_failed", `token refresh failed: ${err}`, { cause: err }));
        }
      }
    }, Math.max(0, delay));
  }

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", state);
  }

  // ---- internals: messages --------------------------------------------------------------

  _request(type, payload, room) {
    if (!this._ready || !this._ws) {
      return Promise.reject(new ClosedError("disconnected", `not connected (${this._state})`));
    }
    return new Promise((resolve, reject) => this._sendRequest(type, payload, room, { resolve, reject }));
  }

  /** Send a request; `waiter` null marks the client's own re-joins (outcome as events). */
  _sendRequest(type, payload, room, waiter) {
    const id = ++this._nextId;
    const entry = { type, room, waiter, timer: null };
    if (waiter) {
      entry.timer = setTimeout(() => {
        this._pending.delete(id);
        waiter.reject(new RequestTimeout(`no reply to ${type} within ${this._requestTimeout} ms`, { room }));
      }, this._requestTimeout);
    }
    this._pending.set(id, entry);
    const msg = { type, id };
    if (payload !== undefined) msg.payload = payload;
    this._ws.send(JSON.stringify(msg));
  }

  _failPending(error) {
    const pending = this._pending;
    this._pending = new Map();
    for (const entry of pending.values()) {
      clearTimeout(entry.timer);
      entry.waiter?.reject(error);
    }
  }

  _receive(ws, msg) {
    if (msg.type === "connected") { this._connected(ws, msg); return; }
    const entry = typeof msg.id === "number" ? this._pending.get(msg.id) : undefined;
    if (entry) {
      this._pending.delete(msg.id);
      clearTimeout(entry.timer);
      this._reply(entry, msg);
      return;
    }
    switch (msg.type) {
      case "chat_message": {
        const pos = this._rooms.get(msg.room);
        if (pos && Number.isInteger(msg.seq)) {
          const epoch = msg.epoch ?? "";
          if (epoch === pos.epoch && msg.seq <= pos.seq) return;  // delivered already (replay overlap)
          pos.seq = msg.seq;
          pos.epoch = epoch;
        }
        this._emit("*", msg);
        this._emit("message", msg);
        return;
      }
      case "user_joined":
      case "user_left":
      case "presence_diff":
        this._emit("*", msg);
        this._emit(msg.type, msg);
        if (this._trackPresence && this._rooms.has(msg.room)) this._askPresence(msg.room);
        return;
      case "typing":
        this._emit("*", msg);
        this._emit("typing", msg);
        return;
      case "ping":  // the seed's JSON heartbeat (`--json-ping`): answer it, don't show it
        ws.send(JSON.stringify({ type: "pong" }));
        return;
      case "error":
        this._emit("*", msg);
        this._emit("error", new ServerError(msg.code ?? "error", msg.error ?? "error", { id: msg.id }));
        return;
      default:
        this._emit("*", msg);
    }
  }

  _reply(entry, msg) {
    if (msg.type === "room_joined" && entry.type === "join_room") this._joined(entry, msg);
    if (msg.type === "presence" && Array.isArray(msg.members)) {
      if (this._rooms.has(msg.room)) this._members.set(msg.room, msg.members);
      this._emit("presence", { room: msg.room, members: msg.members });
    }
    if (entry.waiter === null) {  // one of our own: a re-join or a presence refresh
      if (msg.type === "error") {
        // A refused re-join drops the room; a refused presence refresh (the room was left
        // meanwhile) is nothing to report.
        if (entry.type !== "join_room") return;
        this._rooms.delete(entry.room);
        this._emit("error", new ServerError(msg.code ?? "error", msg.error ?? "error", { room: entry.room }));
      } else if (msg.type === "room_joined") {
        const { id, ...event } = msg;
        this._emit("*", event);
        this._emit("room_joined", event);
      }
      return;
    }
    if (msg.type === "error") {
      entry.waiter.reject(new ServerError(msg.code ?? "error", msg.error ?? "error", { room: entry.room, id: msg.id }));
    } else {
      entry.waiter.resolve(msg);
    }
  }

  /** Set the room's position from a room_joined. On a plain join it starts at the server's
   *  seq; on a recovery the replay follows, so it stays where the app is, unless the room's
   *  run of seqs is another one (a restarted server: a new epoch). */
  _joined(entry, msg) {
    const seq = Number.isInteger(msg.seq) ? msg.seq : 0;
    const epoch = msg.epoch ?? "";
    const pos = this._rooms.get(entry.room);
    if (!pos) {
      if (entry.waiter !== null) this._rooms.set(entry.room, { seq, epoch });
    } else if (epoch !== pos.epoch || seq < pos.seq) {
      pos.seq = seq;
      pos.epoch = epoch;
    } else if (entry.waiter !== null) {
      pos.seq = Math.max(pos.seq, seq);
    }
    if (this._trackPresence && this._rooms.has(entry.room)) this._askPresence(entry.room);
  }

  _askPresence(room) {
    if (this._ready && this._ws) this._sendRequest("presence", { room }, room, null);
  }

  _emit(event, value) {
    const callbacks = this._listeners.get(event);
    if (!callbacks) return;
    for (const callback of [...callbacks]) {
      try {
        callback(value);
      } catch (err) {
        // One bad callback must not break the client or the others.
        if (typeof globalThis.reportError === "function") globalThis.reportError(err);
        else console.error("FastWS: an event callback failed:", err);
      }
    }
  }
}

export default FastWS;
