"""The Redis broker's Lua: every script, and the room-lease rules they share.

A room's seq, epoch and history move together. A missing epoch means the room's state is
gone (expired, or Redis lost it): a new epoch starts, and seq restarts from 1 under it.
History entries are "seq:unix_ms:payload", newest first, trimmed to size and aged by ttl.

Room leases (one Redis server, not a cluster: a script there may only touch one slot). A room
whose members are all on one node is leased to that node: the epoch key holds
``"<epoch> <node> <incarnation>"`` instead of ``"<epoch>"``. The holder sequences the room's
chats itself and writes each one's history entry with ``record`` (one call per loop turn for
all of them, delivered once Redis answered), so no INCR, PUBLISH or TTL refresh per chat.
While a room is leased, the seq key may lag: the room's seq is the larger of it and the seq of
the newest history entry (``current_seq``).

The node's liveness key ``fastws:node:<id>`` holds its incarnation. A lease is live while the
holder's liveness key holds the incarnation the lease names; ``record`` applies nothing unless
it does, and an incarnation that lapsed (the key expired: a pause; or was replaced) never comes
back, since a node that finds its key gone starts a new one. So a lease can be taken over only
from a holder none of whose records can land any more, and everything the holder delivered
was in Redis first: whoever settles the room (``settle``: seq key brought up to date, lease
dropped) keeps its epoch, and ``since`` recovers across the handover.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from .types import CHAT_END, CHAT_EPOCH


def _lua_string(raw: bytes) -> str:
    """A Lua string literal of exactly ``raw`` (anything but [A-Za-z0-9 ,:_-] escaped)."""
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,:_-"
    return "'" + "".join(chr(c) if c in safe else f"\\{c:03d}" for c in raw) + "'"


_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# The lease rules, as functions every script that reads a room's epoch starts with.
# split(v): the epoch and the holder ("node incarnation", or nil) of an epoch key's value.
# live(holder): the holder's liveness key still holds the lease's incarnation (a node id may
# hold spaces; an incarnation does not).
# current_seq: the room's seq while its seq key may lag a lease's records.
# settle: the lease is over; the seq key catches up, the epoch stays (nothing was lost).
_LEASES = """
local function split(v)
  local sp = string.find(v, ' ', 1, true)
  if not sp then return v, nil end
  return string.sub(v, 1, sp - 1), string.sub(v, sp + 1)
end
local function live(holder)
  local node, incarnation = string.match(holder, '^(.*) ([^ ]*)$')
  return redis.call('GET', 'fastws:node:' .. node) == incarnation
end
local function current_seq(seq_key, history_key)
  local seq = tonumber(redis.call('GET', seq_key) or '0')
  local head = redis.call('LINDEX', history_key, 0)
  if head then
    local s = tonumber(string.sub(head, 1, string.find(head, ':', 1, true) - 1))
    if s > seq then seq = s end
  end
  return seq
end
local function settle(seq_key, epoch_key, history_key, epoch, ttl)
  local seq = current_seq(seq_key, history_key)
  if seq > 0 then redis.call('SET', seq_key, seq, 'EX', ttl) end
  redis.call('SET', epoch_key, epoch, 'EX', ttl)
end
"""

# Every chat of one loop turn for one server (one slot on a cluster) in one call: the per-call
# cost of EVALSHA (about 10 us in redis-server) is paid once for all of them.
# KEYS: per message seq, epoch, history, channel (4 each, in the order of the calls)
# ARGV: new epoch, state ttl s, PUBLISH|SPUBLISH, deadline (Redis' clock, unix ms), the
#       caller's "node incarnation" ("" if not a node), then per message head, history
#       size - 1 (-1: no history)
# Past the deadline the node has given up on the call (and told its clients unavailable):
# the script then applies nothing and returns "expired", so no chat lands behind their back.
# The history list is trimmed to size once it holds size / 8 more (an LTRIM per message
# costs more than the rest of the history upkeep); readers read only its newest ``size``.
# Returns, in order, each message's seq, or the holder ("node incarnation") of a live lease on
# its room (the caller's own included: it learns of its lease from the join's reply); nothing
# is applied for those. A room met again in the same call reuses its epoch, and its TTLs are
# refreshed once. redis-server's CPU is part of the cost of a chat, so each redis.call() is
# counted (~0.3-0.5 us of Lua glue each) and numbers are turned into strings once (Lua's
# number -> string costs ~0.4 us; redis.call() does it to number arguments too).
# The payload is types.chat_payload, spelled with its own constants (tests compare the bytes).
_PUBLISH_SEQS = (
    _LEASES
    + """
local fresh, ttl, publish, me = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local seqs, epochs = {}, {}
local t = redis.call('TIME')
local ms = t[1] * 1000 + math.floor(t[2] / 1000)
if ms > tonumber(ARGV[4]) then return 'expired' end
local now = ':' .. tostring(ms) .. ':'
for i = 1, #KEYS / 4 do
  local seq_key, epoch_key, history_key = KEYS[i * 4 - 3], KEYS[i * 4 - 2], KEYS[i * 4 - 1]
  local epoch = epochs[epoch_key]
  local first = epoch == nil
  if first then
    local value = redis.call('GETEX', epoch_key, 'EX', ttl)
    if not value then
      epoch = fresh
      redis.call('SET', epoch_key, epoch, 'EX', ttl)
      redis.call('DEL', seq_key, history_key)
    else
      local holder
      epoch, holder = split(value)
      if holder then
        if holder == me or live(holder) then
          epoch = {holder}  -- a live lease: the room's chats are its holder's to sequence
        else
          settle(seq_key, epoch_key, history_key, epoch, ttl)
        end
      end
    end
    epochs[epoch_key] = epoch
  end
  if type(epoch) == 'table' then
    seqs[i] = epoch[1]
  else
    local seq = redis.call('INCR', seq_key)
    if first then redis.call('EXPIRE', seq_key, ttl) end
    local s = tostring(seq)
    local payload = ARGV[i * 2 + 4] .. s .. """
    + _lua_string(CHAT_EPOCH)
    + """ .. epoch .. """
    + _lua_string(CHAT_END)
    + """
    redis.call(publish, KEYS[i * 4], '\\n' .. s .. '\\n' .. payload)
    local last = ARGV[i * 2 + 5]
    if last ~= '-1' then
      local size = tonumber(last) + 1
      if redis.call('LPUSH', history_key, s .. now .. payload) > size + math.floor(size / 8) then
        redis.call('LTRIM', history_key, '0', last)
      end
      if first then redis.call('EXPIRE', history_key, ttl) end
    end
    seqs[i] = seq
  end
end
return seqs
"""
)

# A lease holder's chats of one loop turn: each one's history entry (or, for a room without
# history, its seq), if the holder's incarnation is still the live one.
# KEYS: the holder's liveness key, then per chat its history key (its seq key: no history)
# ARGV: incarnation, the next incarnation, deadline (Redis' clock, unix ms), then per chat
#       the entry ("seq:unix_ms:payload"; the seq: no history), history size - 1 (-1: none)
# Returns "ok"; "fenced" if the incarnation is not live (nothing applied); "expired" past the
# deadline (nothing applied, and the incarnation is ended, so that no later call of it lands
# either and the room's seqs stay without a gap: the holder moves to the next one).
_RECORD = """
local t = redis.call('TIME')
if t[1] * 1000 + math.floor(t[2] / 1000) > tonumber(ARGV[3]) then
  if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  end
  return 'expired'
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'fenced' end
for i = 2, #KEYS do
  local last = ARGV[i * 2 + 1]
  if last == '-1' then
    redis.call('SET', KEYS[i], ARGV[i * 2], 'KEEPTTL')
  else
    local size = tonumber(last) + 1
    if redis.call('LPUSH', KEYS[i], ARGV[i * 2]) > size + math.floor(size / 8) then
      redis.call('LTRIM', KEYS[i], '0', last)
    end
  end
end
return 'ok'
"""

# The holder gives a lease back (another node wants the room, or its last member left).
# KEYS: seq, epoch, history; ARGV: "node incarnation", state ttl s. Returns 1 if it held it.
_SETTLE = (
    _LEASES
    + """
local value = redis.call('GET', KEYS[2])
if not value then return 0 end
local epoch, holder = split(value)
if holder ~= ARGV[1] then return 0 end
settle(KEYS[1], KEYS[2], KEYS[3], epoch, ARGV[2])
return 1
"""
)

# Another node asks the holder for a room: PUBLISH on the holder's private channel. If no
# connection of the holder listens there, it is gone (a crash closes them at once; a paused
# node keeps them): its incarnation is ended, so the lease is free now, not at its TTL.
# KEYS: the holder's liveness key; ARGV: channel, message, the lease's incarnation.
_REVOKE = """
local heard = redis.call('PUBLISH', ARGV[1], ARGV[2])
if heard == 0 and redis.call('GET', KEYS[1]) == ARGV[3] then
  redis.call('SET', KEYS[1], 'ended', 'KEEPTTL')
end
return heard
"""

# The keep-alive: KEYS: liveness key; ARGV: incarnation, the next one, ttl s. Returns 1 if the
# incarnation was still live (refreshed), else 0 and the next one is live now (the old one and
# its leases stay ended: see the module docstring).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 0
"""

# Reads history newer than ARGV[8] (and within ttl), oldest first, into ``out``: the newest
# ARGV[9] + 1 entries only (the list may hold up to size / 8 more; ARGV[9] -1: all of it).
_READ_HISTORY = """
local out = {}
local first = -1
local entries = redis.call('LRANGE', KEYS[4], 0, ARGV[9])
local ttl = tonumber(ARGV[7])
for i = #entries, 1, -1 do
  local e = entries[i]
  local p1 = string.find(e, ':', 1, true)
  local p2 = string.find(e, ':', p1 + 1, true)
  local s = tonumber(string.sub(e, 1, p1 - 1))
  local t = tonumber(string.sub(e, p1 + 1, p2 - 1))
  if s > tonumber(ARGV[8]) and (ttl == 0 or now - t <= ttl) then
    if first < 0 then first = s end
    table.insert(out, string.sub(e, p2 + 1))
  end
end
"""

# KEYS: seq, epoch, members, history, presence version, nodes (node -> its members here),
#       lingering (userId -> "clientId node" of its connection in the presence grace)
# ARGV: clientId, member, new epoch, state ttl s, since epoch, since seq (-1: none),
#       history ttl ms, since seq again (for _READ_HISTORY), history size - 1,
#       "node incarnation", node, 1 if the room may be leased to it, userId
# Returns {members, seq, epoch, recovered (-1 none, 0, 1), replay, presence version,
# leased (1: the room is this node's now), resumed (1: it took the place of its user's
# lingering connection)}, or {'leased', holder} (nothing done) while another node's lease is
# live. A room whose members are all on this node is leased to it.
_JOIN = (
    _NOW_MS
    + _LEASES
    + """
local ttl, me = ARGV[4], ARGV[10]
local value = redis.call('GET', KEYS[2])
local epoch, holder
if not value then
  epoch = ARGV[3]
  redis.call('DEL', KEYS[1], KEYS[4])
else
  epoch, holder = split(value)
  if holder and holder ~= me then
    if live(holder) then return {'leased', holder} end
    settle(KEYS[1], KEYS[2], KEYS[4], epoch, ttl)
    holder = nil
  end
end
if holder then
  redis.call('EXPIRE', KEYS[2], ttl)
else
  redis.call('SET', KEYS[2], epoch, 'EX', ttl)
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[4], ttl)
local resumed = 0
local dropped = redis.call('HGET', KEYS[7], ARGV[13])
if dropped then
  redis.call('HDEL', KEYS[7], ARGV[13])
  local cid, node = string.match(dropped, '^(.-) (.*)$')
  if cid ~= ARGV[1] and redis.call('HDEL', KEYS[3], cid) == 1 then
    resumed = 1
    if redis.call('HINCRBY', KEYS[6], node, -1) <= 0 then redis.call('HDEL', KEYS[6], node) end
  end
end
if redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[6], ARGV[11], 1)
end
redis.call('EXPIRE', KEYS[6], ttl)
local version = redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ttl)
local count = redis.call('HLEN', KEYS[3])
local seq
local leased = 0
if holder then
  seq = current_seq(KEYS[1], KEYS[4])
  leased = 1
else
  seq = tonumber(redis.call('GET', KEYS[1]) or '0')
  if ARGV[12] == '1' and redis.call('HLEN', KEYS[6]) == 1 then
    redis.call('SET', KEYS[2], epoch .. ' ' .. me, 'EX', ttl)
    leased = 1
  end
end
local since = tonumber(ARGV[6])
if since < 0 then return {count, seq, epoch, -1, {}, version, leased, resumed} end
if ARGV[5] ~= epoch or since > seq then
  return {count, seq, epoch, 0, {}, version, leased, resumed}
end
if since == seq then return {count, seq, epoch, 1, {}, version, leased, resumed} end
"""
    + _READ_HISTORY
    + """
local complete = 0
if first == since + 1 then complete = 1 end
return {count, seq, epoch, complete, out, version, leased, resumed}
"""
)

# KEYS: seq, epoch, members (unused), history
# ARGV: 1-6 unused, history ttl ms, since (-1), history size - 1
_HISTORY = (
    _NOW_MS
    + _LEASES
    + """
local epoch = split(redis.call('GET', KEYS[2]) or '')
local seq = current_seq(KEYS[1], KEYS[4])
"""
    + _READ_HISTORY
    + """
return {seq, epoch, out}
"""
)

# KEYS: members, presence version, nodes, lingering; ARGV: clientId, state ttl s, the member's
# node, its userId ("" if unknown). Returns {left, version, removed (0: it was not there)}.
# The version key outlives an emptied room (its TTL is the room state's), so a room made
# again does not count from 1 while notices from before may still be on their way.
_LEAVE = """
local version
if ARGV[4] ~= '' and redis.call('HGET', KEYS[4], ARGV[4]) == ARGV[1] .. ' ' .. ARGV[3] then
  redis.call('HDEL', KEYS[4], ARGV[4])
end
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed == 1 then
  version = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[3])
  end
else
  version = tonumber(redis.call('GET', KEYS[2]) or '0')
end
local left = redis.call('HLEN', KEYS[1])
if left == 0 then redis.call('DEL', KEYS[1]) end
return {left, version, removed}
"""

# A dropped connection's presence grace begins (``Broker.linger``): a join of its user takes
# its place. KEYS: members, lingering; ARGV: clientId, userId, node, state ttl s.
_LINGER = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1] .. ' ' .. ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return 1
"""


class Script(NamedTuple):
    source: bytes
    sha: bytes

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source.encode(), hashlib.sha1(source.encode()).hexdigest().encode())


SCRIPTS = {
    name: Script.of(source)
    for name, source in (
        ("publish_seqs", _PUBLISH_SEQS),
        ("join", _JOIN),
        ("history", _HISTORY),
        ("leave", _LEAVE),
        ("record", _RECORD),
        ("settle", _SETTLE),
        ("revoke", _REVOKE),
        ("renew", _RENEW),
        ("linger", _LINGER),
    )
}
