"""Redis Cluster routing for the resp client: key slots, the slot map, MOVED and ASK.

Every key (and every shard channel) lives in one of 16384 slots, ``CRC16(key) % 16384``,
where only the part inside the first non-empty ``{...}`` counts (a room's keys are all tagged
``fastws:{room}:...``, so they share a slot, and its Lua scripts may touch them together).
Each slot is served by one primary; ``ClusterServers`` keeps one pipelined connection and one
sharded pub/sub listener per primary, reads the map with CLUSTER SLOTS, and when a primary
answers MOVED (the slot lives elsewhere now) or ASK (it is being migrated) retries the command
where it was told, refreshing the map in the background after a MOVED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from .resp import (
    B,
    Callback,
    Endpoint,
    Listener,
    Pipe,
    ReplyError,
    RespError,
    Servers,
    answer,
)

log = logging.getLogger("fastws.broker.redis")

SLOTS = 16384
_REDIRECTS = 5  # MOVED/ASK hops followed for one command before giving up


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


class ClusterServers(Servers):
    """``Servers`` over a cluster: commands and SSUBSCRIBEs go to their slot's primary."""

    sharded = True
    publish_command = b"SPUBLISH"

    def __init__(self, endpoint: Endpoint, **options: Any) -> None:
        super().__init__(endpoint, **options)
        self._slot_pipes: list[Pipe] = []
        self._slot_addresses: list[str] = []
        self._slot_cache: dict[bytes, int] = {}
        self._listen = True
        self._refreshing: asyncio.Task[None] | None = None

    async def connect(self, listen: bool = True) -> None:
        self._listen = listen
        seed = await self._new_pipe(self.endpoint)
        await self._load_map(seed)

    async def _load_map(self, via: Pipe) -> None:
        """CLUSTER SLOTS -> a pipe (and a listener) per primary, and the slot table."""
        ranges = await via.call(b"CLUSTER", b"SLOTS")
        addresses = [""] * SLOTS
        for first, last, primary, *_replicas in ranges:
            host = primary[0].decode() or self.endpoint.host
            address = f"{host}:{int(primary[1])}"
            for slot in range(int(first), int(last) + 1):
                addresses[slot] = address
        for address in sorted(set(addresses) - {""}):
            host, _, port = address.rpartition(":")
            endpoint = self.endpoint.with_address(host, int(port))
            if address not in self.pipes:
                await self._new_pipe(endpoint)
            if self._listen and address not in self.listeners:
                await self._new_listener(endpoint)
        self._slot_addresses = addresses
        self._slot_pipes = [self.pipes[a] if a else via for a in addresses]

    def slot(self, key: bytes) -> int:
        slot = self._slot_cache.get(key)
        if slot is None:
            if len(self._slot_cache) > 100_000:
                self._slot_cache.clear()
            slot = self._slot_cache[key] = key_slot(key)
        return slot

    # ---- routing ----------------------------------------------------------------------------

    def send(self, key: bytes, args: tuple[Any, ...], callback: Callback) -> None:
        self._slot_pipes[self.slot(key)].send(args, _Redirects(self, key, args, callback))

    def batch(self, key: bytes, make: Callable[[Servers, bytes], B], group: Any = None) -> B:
        slot = self.slot(key)  # one batch per slot: ``group`` is for one server's kinds
        pipe = self._slot_pipes[slot]
        batch = pipe.batch(slot)
        if batch is None:
            return pipe.open_batch(slot, make(self, key))
        return batch  # type: ignore[return-value]  # made by ``make``

    async def call(self, key: bytes, *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.send(key, args, functools.partial(answer, future))
        reply = await future
        if isinstance(reply, RespError):
            raise reply
        return reply

    def listener_for(self, channel: bytes) -> Listener:
        return self.listeners[self._slot_addresses[self.slot(channel)]]

    def hash_tag_for(self, listener: Listener) -> bytes:
        for n in range(100_000):
            tag = b"%d" % n
            if self._slot_addresses[key_slot(tag)] == listener.endpoint.address:
                return tag
        raise LookupError(f"no slot served by {listener.endpoint.address}")

    def redirect(
        self, reply: ReplyError, key: bytes, args: tuple[Any, ...], callback: Callback
    ) -> None:
        """Follow ``MOVED slot host:port`` or ``ASK slot host:port``."""
        kind, slot, address = str(reply).split()[:3]
        pipe = self.pipes.get(address)
        if kind == "MOVED":
            if pipe is not None:
                self._slot_addresses[int(slot)] = address
                self._slot_pipes[int(slot)] = pipe
            self.refresh()
        if pipe is None:
            # A primary we do not know yet: retry once the map says who it is.
            asyncio.get_running_loop().create_task(self._after_refresh(key, args, callback))
            return
        if kind == "ASK":
            pipe.send((b"ASKING",), _ignore)
        pipe.send(args, callback)

    def refresh(self) -> None:
        """Reload the slot map in the background (one reload at a time)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        for pipe in list(self.pipes.values()):
            if pipe.connected:
                try:
                    await self._load_map(pipe)
                    log.info(
                        "redis cluster slot map reloaded",
                        extra={"event": "cluster_map", "primaries": len(self.pipes)},
                    )
                    return
                except Exception as exc:  # next primary; the broker sees real outages itself
                    log.debug("cluster map reload via %s failed: %r", pipe.endpoint.address, exc)

    async def _after_refresh(self, key: bytes, args: tuple[Any, ...], callback: Callback) -> None:
        self.refresh()
        assert self._refreshing is not None
        await asyncio.shield(self._refreshing)
        self._slot_pipes[self.slot(key)].send(args, callback)


def _ignore(reply: Any) -> None:
    pass


class _Redirects:
    """A command's callback that follows MOVED/ASK up to ``_REDIRECTS`` times first."""

    __slots__ = ("args", "callback", "hops", "key", "servers")

    def __init__(
        self, servers: ClusterServers, key: bytes, args: tuple[Any, ...], callback: Callback
    ) -> None:
        self.servers = servers
        self.key = key
        self.args = args
        self.callback = callback
        self.hops = 0

    def __call__(self, reply: Any) -> None:
        if type(reply) is ReplyError and self.hops < _REDIRECTS:
            text = str(reply)
            if text.startswith(("MOVED ", "ASK ")):
                self.hops += 1
                self.servers.redirect(reply, self.key, self.args, self)
                return
        self.callback(reply)
