"""Prometheus metrics for one node: exported from the node's own counters, off the hot path.

The message path only bumps plain counters it already keeps (``node.counters``, the hub's
delivery count); ``Metrics.sync`` turns their growth into prometheus-client values on a short
timer and right before a scrape, so no message pays for Prometheus. Two things are measured
here directly: event-loop lag (a periodic timer's lateness) and broker latency (each
``publish_seq`` round trip, only for brokers that have one).

Under ``fastws serve --workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its
workers; prometheus-client then keeps every value in a per-process file there, and a scrape,
whichever worker answers it, reads them all: counters and histograms are summed over workers
(dead ones included, so totals never go back), gauges use the ``multiprocess_mode`` named
beside them. Values of other workers are at most ``SYNC_INTERVAL`` old.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from .server import Node

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
SYNC_INTERVAL = 0.5  # seconds: how stale another worker's values may be in a scrape
LAG_INTERVAL = 0.25  # seconds between event-loop lag probes

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: node.counters key -> (metric name, help). Each becomes a ``fastws_<name>_total`` counter.
COUNTERS: dict[str, tuple[str, str]] = {
    "connections_total": ("connections_opened", "WebSocket connections accepted"),
    "slow_consumers": ("slow_consumers", "connections closed as slow consumers (4008)"),
    "rate_limited": ("rate_limited_messages", "client messages dropped by the rate limit"),
    "refused_full": ("refused_full", "upgrades refused with 503 at max_connections"),
    "refused_origin": ("refused_origin", "upgrades refused with 403 for their Origin"),
    "refused_per_ip": ("refused_per_ip", "connections closed at max_connections_per_ip"),
    "broker_pauses": (
        "broker_pauses",
        "times the broker's queue was full and clients were not read until it drained",
    ),
    "forbidden": (
        "forbidden_requests",
        "requests refused by the room policy (join, post, typing, presence): code forbidden",
    ),
    "access_revoked": (
        "access_revoked",
        "connections taken out of a private room because a refreshed token no longer opens it",
    ),
    "presence_resumed": (
        "presence_resumed",
        "joins that took the place of their user's "
        "dropped connection within the presence grace (no user_left or "
        "user_joined sent)",
    ),
}


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The Prometheus side of one node. ``start()`` runs its timers; ``render()`` is a scrape."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # A registry per node: several nodes may share a process (tests), each with its own.
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "fastws_connections",
            "open WebSocket connections",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rooms = Gauge(
            "fastws_rooms",
            "rooms with members in this process (summed over "
            "workers: a room spanning two workers counts twice)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.broker_up = Gauge(
            "fastws_broker_up",
            "1 when the broker is reachable, 0 when degraded (with workers: the minimum over them)",
            ["broker"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.loop_lag = Gauge(
            "fastws_event_loop_lag_last_seconds",
            "lateness of the last event-loop probe (with workers: the maximum over them)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.loop_lag_hist = Histogram(
            "fastws_event_loop_lag_seconds",
            f"lateness of a timer due every {LAG_INTERVAL} s",
            registry=r,
            buckets=_LAG_BUCKETS,
        )
        self.broker_latency = Histogram(
            "fastws_broker_publish_seconds",
            "round trip of a "
            "chat publish to the broker (seq allocation, history, "
            "publish); none for the in-process broker",
            ["broker"],
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.messages_in = Counter(
            "fastws_messages_in",
            "chat messages accepted, by source (websocket clients, or the publish API)",
            ["source"],
            registry=r,
        )
        self.messages_out = Counter(
            "fastws_messages_out",
            "publications (chat, joins/leaves, "
            "typing, API) this process received to fan out to its "
            "members, one each however many got it",
            registry=r,
        )
        self.deliveries = Counter(
            "fastws_fanout_deliveries",
            "messages queued to member sockets by the fan-out (one per recipient)",
            registry=r,
        )
        self.handler_failures = Counter(
            "fastws_handler_failures",
            "client messages whose "
            "handling raised (a server bug, logged): each closed "
            "its connection with 1011",
            registry=r,
        )
        self.auth_failures = Counter(
            "fastws_auth_failures",
            "refused WebSocket upgrades and expired tokens, by reason",
            ["reason"],
            registry=r,
        )
        self.broker_dropped = Counter(
            "fastws_broker_dropped",
            "messages read from the broker "
            "that did not parse and were dropped (never sent to a "
            "client)",
            ["broker"],
            registry=r,
        )
        self.presence_reconciled = Counter(
            "fastws_presence_reconciled",
            "presence entries the "
            "node put back in or took out of the broker to match "
            "its connections (after an outage or a sweep)",
            ["broker"],
            registry=r,
        )
        self.api_requests = Counter(
            "fastws_api_requests",
            "admin API requests, by route and HTTP status",
            ["route", "status"],
            registry=r,
        )
        self.counters = {
            key: Counter(f"fastws_{name}", text, registry=r)
            for key, (name, text) in COUNTERS.items()
        }
        self._seen: dict[Any, float] = {}  # what was already exported, by source key
        self.events = Counter(
            "fastws_events",
            "backend events (events_url), by outcome: "
            "delivered, or dropped (queue full, refused, left at shutdown)",
            ["outcome"],
            registry=r,
        )
        self.events_waiting = Gauge(
            "fastws_events_waiting",
            "backend events queued, not delivered yet",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._tasks: list[asyncio.Task[None]] = []
        broker = node.broker
        self._broker_name = str(getattr(broker, "name", type(broker).__name__))
        # Touch the labelled series once, so a scrape lists them before the first event.
        self.messages_in.labels("websocket")
        self.messages_in.labels("api")
        self.broker_up.labels(self._broker_name)
        self.broker_dropped.labels(self._broker_name)
        self.presence_reconciled.labels(self._broker_name)
        if not broker.inline:
            self.broker_latency.labels(self._broker_name)
            self._time_publishes()

    def _time_publishes(self) -> None:
        """Time every chat's seq round trip to a remote broker: one per chat, never per
        recipient. An inline (in-process) broker has no round trip, so it is left untouched."""
        self.node.on_publish_latency = self.broker_latency.labels(self._broker_name).observe

    # ---- timers ---------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sync_forever()), loop.create_task(self._probe_lag())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.sync()  # the last word of this process, for the other workers' scrapes

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            self.sync()

    async def _probe_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_INTERVAL
            await asyncio.sleep(LAG_INTERVAL)
            lag = max(0.0, loop.time() - due)
            self.loop_lag.set(lag)
            self.loop_lag_hist.observe(lag)

    # ---- export ---------------------------------------------------------------------------

    def _add(self, metric: Any, key: Any, value: float) -> None:
        """Increase ``metric`` by how much ``value`` grew since the last sync."""
        grown = value - self._seen.get(key, 0)
        if grown > 0:
            metric.inc(grown)
            self._seen[key] = value

    def sync(self) -> None:
        """Copy the node's counters and table sizes into the Prometheus values."""
        node = self.node
        counters = node.counters
        self.connections.set(len(node.sessions))
        self.rooms.set(len(node.hub.rooms))
        health = node.broker.health()
        self.broker_up.labels(self._broker_name).set(1 if health.get("state") == "ok" else 0)
        self._add(
            self.broker_dropped.labels(self._broker_name),
            "broker_dropped",
            health.get("dropped", 0),
        )
        self._add(
            self.presence_reconciled.labels(self._broker_name),
            "presence_reconciled",
            health.get("reconciled", 0),
        )
        self._add(self.messages_in.labels("websocket"), "messages_in", node.messages_in)
        self._add(self.messages_in.labels("api"), "api_messages_in", counters["api_messages_in"])
        self._add(self.deliveries, "deliveries", node.hub.deliveries)
        self._add(self.messages_out, "messages_out", node.messages_out)
        if node.wires is not None:
            self._add(self.handler_failures, "handler_failures", node.wires.failures)
        for key, metric in self.counters.items():
            self._add(metric, key, counters[key])
        events = node.events
        if events is not None:
            self._add(self.events.labels("delivered"), "events_delivered", events.delivered)
            self._add(self.events.labels("dropped"), "events_dropped", events.dropped)
            self.events_waiting.set(events.waiting)
        for reason, count in list(node.auth_failures.items()):
            self._add(self.auth_failures.labels(reason), ("auth", reason), count)

    def render(self) -> bytes:
        """One scrape in the Prometheus text format: this process, or every worker's files."""
        self.sync()
        if multiprocess():
            from prometheus_client import multiprocess as mp

            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))


def mark_process_dead(pid: int, directory: str) -> None:
    """Supervisor: drop a dead worker's live gauges (its counters stay in the totals)."""
    from prometheus_client import multiprocess as mp

    mp.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
