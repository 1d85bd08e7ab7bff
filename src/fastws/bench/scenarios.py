"""The scenarios: who connects where (the plans handed to generator processes), the
coordinator that starts those processes and holds the barrier, and the figures computed from
what they report.

Phases of one run, the same for every scenario:

1. spawn ``--procs`` generator processes; each connects its users (``--concurrency`` at a
   time over all processes) and joins their rooms, then says "ready" and waits at the barrier;
2. the coordinator writes the schedule (load start, measured window start and end, as
   ``time.time_ns()``) into shared memory and joins the barrier, releasing everyone;
3. at the window's start and end it reads the server's CPU seconds (and memory) from /proc
   (the soak: its memory every few seconds all along);
4. the generators drain in-flight messages, report counts and histograms, and disconnect.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import queue as queue_mod
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .loadgen import new_histogram, worker_main
from .report import Progress
from .targets import (
    BenchError,
    Target,
    cpu_by_pid,
    cpu_runtime,
    cpu_seconds,
    listen_overflows,
    pss_bytes,
    rss_bytes,
)

_NS = 1_000_000_000
_LEAD_NS = 300_000_000  # the schedule starts this long after the barrier is released
# the soak's memory after warm-up is its sample at this share of --duration (history filled,
# every pool and cache at its working size), the baseline its growth is measured from
SOAK_WARM_FRACTION = 0.2


DEFAULT_IDLE_CONNECTIONS = 10000
# Connections per loopback source address. One (source, server address and port) pair has
# ~28k ephemeral ports (32768-60999), but bind(port 0) searches its preferred half (one
# parity, ~14k ports) first: past that, each bind took 3-11 ms here instead of 10 us.
CONNECTIONS_PER_SOURCE = 12_000
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def idle_connections(args: argparse.Namespace) -> int:
    """The connections scenario's connection count: --connections or its default."""
    return int(args.connections or DEFAULT_IDLE_CONNECTIONS)


def source_count(args: argparse.Namespace, target: Target, connections: int) -> int:
    """How many loopback source addresses the connections are spread over: --sources, else
    one per CONNECTIONS_PER_SOURCE. 1 (no bind: the kernel picks the source) when a node is
    not on loopback, where 127.0.0.x would not reach it."""
    if not all(urlsplit(url).hostname in _LOOPBACK_HOSTS for url in target.node_urls):
        return 1
    return int(args.sources or max(1, math.ceil(connections / CONNECTIONS_PER_SOURCE)))


def soak_rss_interval(duration: float) -> float:
    """Seconds between the soak's memory samples: every 5 s, or 20 samples in a short run."""
    return min(5.0, duration / 20)


@dataclass
class Plan:
    """One run: the mode, its parameters (as written to the JSON) and one plan per process."""

    scenario: str
    mode: str  # window | rate | storm | connect | reconnect | soak
    title: str
    parameters: dict[str, Any]
    procs: list[dict[str, Any]] = field(default_factory=list)
    unit: str = "deliveries/s"

    @property
    def clients(self) -> int:
        return sum(len(p["members"]) for p in self.procs)

    @property
    def timed(self) -> bool:
        return self.mode in ("window", "rate")


def build_plan(
    args: argparse.Namespace, target: Target, procs: int, cpus: list[list[int] | None]
) -> Plan:
    """Split the scenario's users over ``procs`` processes. ``members`` rows are
    ``(user number, room or None, posts or not, node)``, node indexing ``target.node_urls``
    (round robin by user number, so a room's members are spread over the nodes); room names
    carry a random run id so runs against a shared server never meet."""
    run = secrets.token_hex(3)
    scenario = args.scenario
    rate = args.rate
    nodes = len(target.node_urls)
    members: list[list[tuple[int, str | None, bool, int]]] = [[] for _ in range(procs)]
    rates = [0.0] * procs
    sources = 1
    if scenario == "roundtrip":
        conns = args.connections or 64
        for i in range(conns):
            members[i % procs].append((i, f"b{run}-rt-{i}", True, i % nodes))
        mode = "rate" if rate else "window"
        window = args.window or 1
        if rate:
            rates = [rate * len(m) / conns for m in members]
        params: dict[str, Any] = {"connections": conns}
        title = f"roundtrip, {conns} connections" + (f", {rate:g} msg/s" if rate else "")
        unit = "round trips/s"
    elif scenario == "fanout":
        subs, pubs = args.subscribers, args.publishers
        room = f"b{run}-fanout"
        window = args.window or 64
        if args.reconnect_storm:
            mode = "reconnect"
            rate = rate or 10.0
            # Every subscriber on node 0, the one restarted; the publisher on the last node
            # (with two nodes, chat goes on through the other node while node 0 is down).
            members[0].append((0, room, True, nodes - 1))
            for i in range(1, subs + 1):
                members[i % procs].append((i, room, False, 0))
            rates = [rate if i == 0 else 0.0 for i in range(procs)]
            params = {"subscribers": subs, "reconnect_storm": True, "rate": rate}
            title = f"reconnect storm, {subs} clients, {rate:g} msg/s"
            unit = "clients/s"
        elif args.join_storm:
            mode = "storm"
            for i in range(subs):
                members[i % procs].append((i, room, False, i % nodes))
            params = {
                "subscribers": subs,
                "join_storm": True,
                "storm_concurrency": args.storm_concurrency,
                "expected_deliveries": subs * (subs - 1) // 2,
            }
            title = f"join storm, {subs} clients"
            if getattr(args, "presence_diff", False):
                # Each client must see the final count once; the cost is the diffs sent.
                params.update(presence_diff=True, expected_deliveries=subs)
                title += ", presence diffs"
            unit = "deliveries/s"
        else:
            mode = "rate" if rate else "window"
            for i in range(pubs + subs):
                members[i % procs].append((i, room, i < pubs, i % nodes))
            if rate:
                rates = [rate * sum(1 for m in ms if m[2]) / pubs for ms in members]
            params = {"subscribers": subs, "publishers": pubs}
            how = f"{rate:g} msg/s" if rate else f"window {window}"
            title = f"fanout, {subs} subscribers, {pubs} publisher{'s' * (pubs > 1)}, {how}"
            unit = "deliveries/s"
    elif scenario == "rooms":
        n_rooms, per_room = args.rooms, args.members or 4
        window = args.window or 16
        mode = "rate" if rate else "window"
        for r in range(n_rooms):
            for j in range(per_room):
                cid = r * per_room + j
                members[r % procs].append((cid, f"b{run}-room-{r}", True, cid % nodes))
        if rate:
            rates = [rate * len(m) for m in members]
        params = {"rooms": n_rooms, "members": per_room}
        how = f"{rate:g} msg/s per member" if rate else f"window {window}"
        title = f"rooms, {n_rooms} x {per_room} members, {how}"
        unit = "deliveries/s"
    elif scenario == "soak":
        n_rooms, per_room = args.rooms, args.members or 20
        mode = "soak"
        window = 0
        rate = rate or 1000.0
        churn = 0.01 if args.reconnect_rate is None else args.reconnect_rate
        # room r in process r % procs: soak.py judges each room inside one process
        for r in range(n_rooms):
            for j in range(per_room):
                cid = r * per_room + j
                members[r % procs].append((cid, f"b{run}-soak-{r}", True, cid % nodes))
        total = n_rooms * per_room
        rates = [rate * len(m) / total for m in members]
        params = {
            "rooms": n_rooms,
            "members": per_room,
            "connections": total,
            "rate": rate,
            "rate_unit": "msg/s in total",
            "reconnect_rate": churn,
            "rss_interval_s": soak_rss_interval(args.duration),
            "warm_fraction": SOAK_WARM_FRACTION,
        }
        title = (
            f"soak, {n_rooms} x {per_room} members, {rate:g} msg/s, "
            f"{churn * 100:g} % reconnecting per second"
        )
        unit = "deliveries/s"
    elif scenario == "connections":
        n = idle_connections(args)
        for i in range(n):
            members[i % procs].append((i, None, False, i % nodes))
        mode = "connect"
        window = 0
        sources = source_count(args, target, n)
        params = {"connections": n, "sources": sources, "idle": args.idle}
        title = f"connections, {n} idle" + (f" for {args.idle:g} s" if args.idle else "")
        unit = "connections/s"
    else:
        raise BenchError(f"unknown scenario {scenario!r}")
    if mode == "window":
        params["window"] = window
    else:
        window = 0  # paced (or not posting): no message is sent in reply to an echo
    if nodes > 1:
        params["nodes"] = nodes
    if getattr(target, "deployment", None):
        params["deployment"] = target.deployment
    if mode == "rate":
        params["rate"] = rate
        params["rate_unit"] = "msg/s per member" if scenario == "rooms" else "msg/s in total"
    params.update(
        duration=args.duration,
        warmup=args.warmup if mode in ("window", "rate", "reconnect") else 0.0,
        procs=procs,
        concurrency=args.concurrency,
        pad=args.pad,
    )
    flooders = getattr(args, "flooders", 0)
    if flooders:
        # An abuser of its own process, so its flood does not slow the measured clients'
        # generators; user numbers past everyone else's, one room each.
        members.append(
            [(1_000_000 + i, f"b{run}-flood-{i}", False, i % nodes) for i in range(flooders)]
        )
        rates.append(0.0)
        cpus = [*cpus, cpus[-1]]
        params["flooders"] = flooders
        title += f", {flooders} flooder{'s' * (flooders > 1)}"
    plan = Plan(scenario, mode, title, params, unit=unit)
    per_proc_concurrency = max(1, math.ceil(args.concurrency / procs))
    total = sum(len(m) for m in members)
    for i in range(len(members)):
        plan.procs.append(
            {
                "index": i,
                "url": target.url,
                "urls": target.node_urls,
                "secret": target.secret,
                "token": target.token,
                "cpus": cpus[i],
                "mode": mode,
                "members": members[i],
                "rate": rates[i],
                "reconnect_rate": params.get("reconnect_rate", 0.0),
                "window": window,
                "concurrency": per_proc_concurrency,
                "pad": args.pad,
                "timeout": args.timeout,
                "drain": args.drain,
                "duration": args.duration,
                "flood": bool(flooders) and i == procs,
                "storm_size": total if mode == "storm" else 0,
                "storm_concurrency": max(1, getattr(args, "storm_concurrency", 1)),
                "presence_diff": mode == "storm" and bool(getattr(args, "presence_diff", False)),
                "sources": sources,
                "barrier_timeout": (
                    args.timeout + args.warmup + args.duration + args.drain + args.idle + 60
                ),
                "ttl": 3600 + args.timeout + args.duration + args.idle,
            }
        )
    return plan


def generator_cpus(args: argparse.Namespace, target: Target) -> list[int] | None:
    """The CPUs the generator processes are pinned to, or None for not pinned."""
    from .targets import available_cpus, parse_cpus

    if args.cpus == "none":
        return None
    if args.cpus != "auto":
        return parse_cpus(args.cpus)
    if target.started and target.server_cpus:
        rest = [c for c in available_cpus() if c not in parse_cpus(target.server_cpus)]
        return rest or None
    return None


class _Inbox:
    """The generators' queue, read with the processes' health in mind."""

    def __init__(self, q: Any, processes: list[Any]) -> None:
        self.q = q
        self.processes = processes
        self.kept: list[tuple[str, int, Any]] = []
        self.warnings: list[str] = []

    def wait_for(
        self,
        kind: str,
        count: int,
        timeout: float,
        progress: Progress | None = None,
        counter: Any = None,
    ) -> dict[int, Any]:
        got: dict[int, Any] = {}
        for msg in list(self.kept):
            if msg[0] == kind:
                self.kept.remove(msg)
                got[msg[1]] = msg[2]
        deadline = time.monotonic() + timeout
        while len(got) < count:
            if progress is not None and counter is not None:
                progress.update_to(counter.value)
            try:
                msg = self.q.get(timeout=0.1)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"timed out after {timeout:.0f}s waiting for the load "
                        f"generators ({kind}: {len(got)} of {count})"
                    ) from None
                dead = [p for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise BenchError(f"generator process exited with {dead[0].exitcode}") from None
                continue
            if msg[0] == "error":
                raise BenchError(f"generator {msg[1]} failed:\n{msg[2]}")
            if msg[0] == "warning":
                self.warnings.append(msg[2])
                print(f"fastws bench: warning: {msg[2]}", file=sys.stderr)
            elif msg[0] == kind:
                got[msg[1]] = msg[2]
            else:
                self.kept.append(msg)
        return got


def _sleep_until(t_ns: int, progress: Progress | None = None, start_ns: int = 0) -> None:
    while True:
        left = (t_ns - time.time_ns()) / _NS
        if progress is not None:
            progress.update_to((time.time_ns() - start_ns) / _NS)
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def run_plan(
    plan: Plan,
    target: Target,
    args: argparse.Namespace,
    restart: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``plan`` against ``target``; return the raw merged results plus server readings.
    ``restart`` restarts the node of a reconnect storm (see deployment.py)."""
    ctx = mp.get_context("spawn")
    n = len(plan.procs)
    q = ctx.Queue()
    barrier = ctx.Barrier(n + 1)
    # start, window start, window end; for the reconnect storm: node down, node up again
    schedule = ctx.Array("q", 5, lock=False)
    counter = ctx.Value("q", 0)
    processes = [
        ctx.Process(
            target=worker_main,
            args=(p, q, barrier, schedule, counter),
            name=f"fastws-bench-{p['index']}",
            daemon=True,
        )
        for p in plan.procs
    ]
    interactive = not args.quiet and sys.stderr.isatty()
    inbox = _Inbox(q, processes)
    pid = target.server_pids
    readings: dict[str, Any] = {}
    t_start = m0 = m1 = 0
    t_setup = time.monotonic()
    for proc in processes:
        proc.start()
    try:
        progress = Progress(
            interactive and plan.clients >= 2000,
            plan.clients,
            "connecting" if plan.mode == "connect" else "connecting, joining",
            "conn",
        )
        if plan.mode == "connect":
            progress.close()
        inbox.wait_for("ready", n, args.timeout + 30, progress, counter)
        progress.close()
        readings["setup_s"] = time.monotonic() - t_setup
        readings["rss_before"] = rss_bytes(pid)
        warmup = plan.parameters["warmup"]
        t_start = time.time_ns() + _LEAD_NS
        m0 = t_start + int(warmup * _NS)
        m1 = m0 + int(args.duration * _NS)
        schedule[0], schedule[1], schedule[2] = t_start, m0, m1
        barrier.wait(30)
        if plan.mode == "reconnect":
            if restart is None:
                raise BenchError("the reconnect storm needs a server started here (--server)")
            _sleep_until(m0)
            readings["cpu_start_by_pid"] = cpu_by_pid(target.server_pids)
            schedule[3] = time.time_ns()
            readings["restart"] = restart()
            schedule[4] = readings["restart"]["up"] or time.time_ns()
            inbox.wait_for("done", n, args.timeout + args.duration + 30)
            readings["cpu_end_by_pid"] = cpu_by_pid(target.server_pids)
            readings["rss_after"] = rss_bytes(target.server_pids)
        elif plan.mode == "soak":
            progress = Progress(interactive and args.duration >= 3, args.duration, "soak", "s")
            readings.update(
                _sample_soak(pid, t_start, m1, plan.parameters["rss_interval_s"], progress)
            )
            progress.close()
            inbox.wait_for("done", n, args.drain + 60)
        elif plan.timed:
            total = warmup + args.duration
            progress = Progress(interactive and total >= 3, total, plan.scenario, "s")
            _sleep_until(m0, progress, t_start)
            readings["cpu_start"] = cpu_seconds(pid)
            _sleep_until(m1, progress, t_start)
            readings["cpu_end"] = cpu_seconds(pid)
            readings["rss_after"] = rss_bytes(pid)
            progress.close()
            inbox.wait_for("done", n, 30)
        else:
            _sleep_until(t_start)
            readings["cpu_start"] = cpu_seconds(pid)
            readings["overflows_start"] = listen_overflows()
            counter.value = 0
            progress = Progress(
                interactive and plan.clients >= 2000,
                plan.clients,
                plan.scenario,
                "conn" if plan.mode == "connect" else "join",
            )
            inbox.wait_for(
                "done", n, args.timeout + 30, progress, counter if plan.mode == "connect" else None
            )
            readings["cpu_end"] = cpu_seconds(pid)
            readings["overflows_end"] = listen_overflows()
            progress.close()
            if plan.mode == "connect":
                time.sleep(0.5)  # let the server finish its per-connection bookkeeping
                readings["rss_after"] = rss_bytes(pid)
                readings["pss_after"] = pss_bytes(pid)
                if args.idle:
                    readings.update(_idle_window(pid, args.idle, schedule, interactive))
                barrier.wait(30)
            else:
                readings["rss_after"] = rss_bytes(pid)
        results = inbox.wait_for("result", n, args.drain + 60)
        if plan.mode == "soak":
            time.sleep(1.0)  # the generators have closed: let the server let go of them
            readings["rss_closed"] = rss_bytes(pid)
    except BaseException:
        barrier.abort()
        raise
    finally:
        _reap(processes)
    readings["warnings"] = inbox.warnings
    # slots 3 and 4: the reconnect storm's node down and up, or the idle phase's window
    later = ("idle_start", "idle_end") if plan.mode == "connect" else ("down", "up")
    readings["schedule"] = {"start": t_start, "measure": m0, "end": m1,
                            later[0]: schedule[3], later[1]: schedule[4]}  # fmt: skip
    return merge([results[i] for i in sorted(results)], readings)


def _sample_soak(
    pids: list[int], t_start: int, end: int, interval: float, progress: Progress
) -> dict[str, Any]:
    """The soak's server readings: CPU seconds at its start and end, and the resident memory
    every ``interval`` seconds from the load's start to its end (both included)."""
    step = max(1, int(interval * _NS))
    rss: list[list[float | int | None]] = []  # [seconds from the load's start, bytes]
    _sleep_until(t_start)
    cpu_start = cpu_seconds(pids)
    k = 0
    while True:
        due = min(t_start + k * step, end)
        _sleep_until(due, progress, t_start)
        rss.append([round((time.time_ns() - t_start) / _NS, 3), rss_bytes(pids)])
        if due >= end:
            break
        k += 1
    return {"cpu_start": cpu_start, "cpu_end": cpu_seconds(pids), "rss_series": rss,
            "rss_after": rss[-1][1]}  # fmt: skip


def _idle_window(
    pids: list[int], seconds: float, schedule: Any, interactive: bool
) -> dict[str, Any]:
    """The idle phase: every connection open, nothing sent but the heartbeat. The server's
    CPU (to the nanosecond) over ``seconds``, and its memory at the end. The window goes
    into ``schedule[3:5]`` (``time.time_ns()``) so the generators count the pings in it."""
    progress = Progress(interactive and seconds >= 3, seconds, "idle", "s")
    start = time.time_ns()
    cpu_start = cpu_runtime(pids)
    _sleep_until(start + int(seconds * _NS), progress, start)
    cpu_end = cpu_runtime(pids)
    end = time.time_ns()
    progress.close()
    schedule[3], schedule[4] = start, end
    return {"idle_cpu_start": cpu_start, "idle_cpu_end": cpu_end,
            "idle_s": (end - start) / _NS, "rss_idle_end": rss_bytes(pids),
            "pss_idle_end": pss_bytes(pids)}  # fmt: skip


def _reap(processes: list[Any]) -> None:
    deadline = time.monotonic() + 10
    for proc in processes:
        proc.join(max(0.1, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
            proc.join(2)


def merge(results: list[dict[str, Any]], readings: dict[str, Any]) -> dict[str, Any]:
    """Add up what the generator processes reported."""
    hist = new_histogram()
    for r in results:
        hist.decode_and_add(r["histogram"])
    merged: dict[str, Any] = {"histogram": hist, **readings}
    for key in ("deliveries", "duplicates", "reorders", "sent_window", "sent_total", "disconnects"):
        merged[key] = sum(r[key] for r in results)
    for key in ("series", "sent_series"):
        length = max(len(r[key]) for r in results)
        merged[key] = [sum(r[key][i] for r in results if i < len(r[key])) for i in range(length)]
    rooms: dict[str, list[int]] = {}
    for r in results:
        for room, (receivers, distinct, sent) in r["rooms"].items():
            entry = rooms.setdefault(room, [0, 0, 0])
            entry[0] += receivers
            entry[1] += distinct
            entry[2] += sent
    merged["expected"] = sum(e[0] * e[2] for e in rooms.values())
    merged["distinct"] = sum(e[1] for e in rooms.values())
    merged["closes"] = _add_counts(r["closes"] for r in results)
    merged["errors"] = _add_counts(r["errors"] for r in results)
    merged["drain_timed_out"] = any(r["drain_timed_out"] for r in results)
    merged["pacer_max_lag_us"] = max(r["pacer_max_lag_us"] for r in results)
    floods = [r["flood"] for r in results if "flood" in r]
    if floods:
        merged["flood"] = {
            "clients": sum(f["clients"] for f in floods),
            "sent": sum(f["sent"] for f in floods),
            "refused": sum(f["refused"] for f in floods),
            "closes": _add_counts(f["closes"] for f in floods),
            "open_at_end": sum(f["open_at_end"] for f in floods),
        }
    if "storm" in results[0]:
        storms = [r["storm"] for r in results]
        join_hist = new_histogram()
        for s in storms:
            join_hist.decode_and_add(s["join_histogram"])
        expected = [s["expected"] for s in storms]
        merged["storm"] = {
            "first": min(s["first"] for s in storms if s["first"]),
            "last": max(s["last"] for s in storms),
            "received": sum(s["received"] for s in storms),
            "duplicates": sum(s["duplicates"] for s in storms),
            "stale": sum(s["stale"] for s in storms),
            "diffs": sum(s.get("diffs", 0) for s in storms),
            "expected_known": all(e is not None for e in expected),
        }
        merged["join_histogram"] = join_hist
    if "reconnect" in results[0]:
        storms = [r["reconnect"] for r in results]
        merged["reconnect"] = {
            "users": [u for s in storms for u in s["users"]],
            "settled": all(s["settled"] for s in storms),
            "chats": sum(s["chats"] for s in storms),
        }
    if "soak" in results[0]:
        merged["soak"] = merge_soak([r["soak"] for r in results])
    if "connect" in results[0]:
        conns = [r["connect"] for r in results]
        firsts = [c["first"] for c in conns if c["first"]]
        lasts = [c["last"] for c in conns if c["last"]]
        merged["connect"] = {
            "first": min(firsts) if firsts else 0,
            "last": max(lasts) if lasts else 0,
            "open": sum(c["open"] for c in conns),
            "failed": sum(c["failed"] for c in conns),
            "open_after_idle": sum(c["open_after_idle"] for c in conns),
            "idle_pings": sum(c["idle_pings"] for c in conns),
            "sources": _add_counts(c["sources"] for c in conns),
        }
    return merged


_SOAK_SUMS = ("users", "cycles", "reconnects", "drops", "recovered", "not_recovered",
              "epoch_changes", "failed", "distinct", "duplicates", "reorders", "losses",
              "unsequenced", "sent", "skipped", "unsent")  # fmt: skip


def merge_soak(soaks: list[dict[str, Any]]) -> dict[str, Any]:
    """The soak's counts over every generator process (each judged its own rooms)."""
    merged: dict[str, Any] = {key: sum(s[key] for s in soaks) for key in _SOAK_SUMS}
    merged["settled"] = all(s["settled"] for s in soaks)
    merged["rooms"] = {room: entry for s in soaks for room, entry in s["rooms"].items()}
    series = [s["cycles_series"] for s in soaks]
    length = max(len(c) for c in series)
    merged["cycles_series"] = [sum(c[i] for c in series if i < len(c)) for i in range(length)]
    return merged


def _add_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[str(k)] = total.get(str(k), 0) + v
    return total


def latency_figures(hist: Any) -> dict[str, float]:
    if hist.get_total_count() == 0:
        return {}
    return {
        "p50": hist.get_value_at_percentile(50),
        "p90": hist.get_value_at_percentile(90),
        "p99": hist.get_value_at_percentile(99),
        "p99.9": hist.get_value_at_percentile(99.9),
        "max": hist.get_max_value(),
        "mean": round(hist.get_mean_value(), 1),
        "count": hist.get_total_count(),
    }


def figures(plan: Plan, merged: dict[str, Any], duration: float) -> dict[str, Any]:
    """The headline figures of a run (what the table, the JSON and --compare show)."""
    cpu = None
    if merged.get("cpu_start") is not None and merged.get("cpu_end") is not None:
        cpu = round(merged["cpu_end"] - merged["cpu_start"], 3)
    head: dict[str, Any] = {"throughput_unit": plan.unit, "server_cpu_s": cpu}
    if plan.mode == "reconnect":
        return {**head, **reconnect_figures(merged)}
    if plan.mode == "soak":
        return {**head, **soak_figures(plan, merged, duration, cpu)}
    if plan.timed:
        count = merged["deliveries"]
        head["throughput"] = count / duration
        head["wall_s"] = duration
        head["deliveries"] = merged["deliveries"]
        head["deliveries_per_s"] = merged["deliveries"] / duration
        head["messages_per_s"] = merged["sent_window"] / duration
        head["latency_us"] = latency_figures(merged["histogram"])
        head["latency_of"] = (
            "send -> own broadcast back"
            if plan.scenario == "roundtrip"
            else "send -> each delivery"
        )
        head["losses"] = merged["expected"] - merged["distinct"]
        head["duplicates"] = merged["duplicates"]
        head["reorders"] = merged["reorders"]
        if plan.mode == "rate":
            # how far behind its schedule the generator sent (a stall of the generator itself)
            head["pacer_max_lag_us"] = merged["pacer_max_lag_us"]
        if "flood" in merged:
            head["flood"] = merged["flood"]
    elif plan.mode == "storm":
        storm = merged["storm"]
        elapsed = max(1e-9, (storm["last"] - storm["first"]) / _NS)
        expected = plan.parameters["expected_deliveries"]
        count = storm["received"]
        head["throughput"] = count / elapsed
        head["wall_s"] = head["storm_s"] = round(elapsed, 4)
        head["deliveries"] = storm["received"]
        head["deliveries_per_s"] = head["throughput"]
        head["expected_deliveries"] = expected
        head["losses"] = expected - storm["received"]
        head["duplicates"] = storm["duplicates"]
        head["stale_notices"] = storm["stale"]
        if plan.parameters.get("presence_diff"):
            # received = clients that saw the final count; the presence traffic is the diffs
            head["presence_messages"] = storm["diffs"]
        else:
            head["presence_messages"] = storm["received"]
        head["latency_us"] = latency_figures(merged["join_histogram"])
        head["latency_of"] = "join_room -> room_joined"
    else:
        conn = merged["connect"]
        elapsed = max(1e-9, (conn["last"] - conn["first"]) / _NS)
        count = conn["open"]
        head["throughput"] = count / elapsed
        head["wall_s"] = round(elapsed, 4)
        head["connections"] = conn["open"]
        head["failed"] = conn["failed"]
        head["latency_us"] = latency_figures(merged["histogram"])
        head["latency_of"] = "TCP connect -> `connected` message"
        start, end = merged.get("overflows_start"), merged.get("overflows_end")
        if start is not None and end is not None:
            # system-wide, so other traffic counts too; each one costs its client a 1 s retry
            head["listen_overflows"] = end - start
        head["source_addresses"] = conn["sources"]
        pss = merged.get("pss_after")
        head["server_pss_after_mb"] = round(pss / 1e6, 1) if pss is not None else None
        before, after = merged.get("rss_before"), merged.get("rss_after")
        if before is not None and after is not None and conn["open"]:
            per_conn = (after - before) / conn["open"]
            head["memory_per_connection_bytes"] = round(per_conn, 1)
            head["memory_per_connection_kib"] = round(per_conn / 1024, 2)
        head.update(idle_figures(merged))
    # the same events as "throughput", counted over the same window, per server CPU-second
    head["throughput_per_cpu_s"] = count / cpu if cpu else None
    head["server_rss_before_bytes"] = merged.get("rss_before")
    head["server_rss_after_bytes"] = merged.get("rss_after")
    head["closes"] = merged["closes"]
    head["errors"] = merged["errors"]
    head["unexpected_disconnects"] = merged["disconnects"]
    head["drain_timed_out"] = merged["drain_timed_out"]
    return head


def idle_figures(merged: dict[str, Any]) -> dict[str, Any]:
    """The idle phase's cost: the server's CPU over the window per open connection and per
    second (microseconds of CPU each connection costs every second it sits idle), its memory
    at the window's end, and the heartbeat pings the clients answered meanwhile."""
    start, end, window = (merged.get(k) for k in ("idle_cpu_start", "idle_cpu_end", "idle_s"))
    conn = merged["connect"]
    if start is None or end is None or not window or not conn["open"]:
        return {}
    cpu = end - start
    rss, pss = merged.get("rss_idle_end"), merged.get("pss_idle_end")
    return {
        "idle_s": round(window, 3),
        "idle_server_cpu_s": round(cpu, 6),
        "idle_cpu_us_per_s_per_connection": round(cpu * 1e6 / (conn["open"] * window), 4),
        "server_rss_idle_end_mb": round(rss / 1e6, 1) if rss is not None else None,
        "server_pss_idle_end_mb": round(pss / 1e6, 1) if pss is not None else None,
        "idle_pings": conn["idle_pings"],
        "idle_pings_per_connection": round(conn["idle_pings"] / conn["open"], 3),
        "open_after_idle": conn["open_after_idle"],
    }


def reconnect_figures(merged: dict[str, Any]) -> dict[str, Any]:
    """The reconnect storm's outcome. Losses are by seq: every gap a user saw, plus what it
    lacks of the publisher's final seq. A re-join answered ``recovered: false`` (the
    in-process broker lost the room's history in the restart: a new epoch) is counted apart,
    as the documented outcome of that broker, not as a loss."""
    storm = merged["reconnect"]
    users = storm["users"]
    down, up = merged["schedule"]["down"], merged["schedule"]["up"]
    final = next((u for u in users if u["publisher"]), None)
    final_epoch, final_seq = (final["epoch"], final["last"]) if final else ("", 0)
    shortfall = sum(max(0, final_seq - u["last"]) for u in users if u["epoch"] == final_epoch)
    stale = [u for u in users if u["epoch"] != final_epoch]
    dropped = [u for u in users if u["dropped"]]
    caught = [u for u in dropped if u["caught_ns"]]
    hist = merged["reconnect_histogram"] = new_histogram()
    for u in caught:
        hist.record_value(min(max(1, u["caught_up_us"]), 60_000_000), 1)
    recovery_s = (max(u["caught_ns"] for u in caught) - down) / _NS if caught else None
    failed = sum(1 for u in users if u["failed"])
    errors = sum(merged["errors"].values())
    before, after = merged["cpu_start_by_pid"], merged["cpu_end_by_pid"]
    # a process started by the restart counts from zero; one that exited took its time along
    cpu = round(sum(v - before.get(p, 0.0) for p, v in after.items()), 3) if after else None
    restart = merged["restart"]
    return {
        "server_cpu_s": cpu,
        "throughput": len(caught) / recovery_s if recovery_s else None,
        "throughput_per_cpu_s": len(caught) / cpu if cpu else None,
        "storm_s": round(recovery_s, 4) if recovery_s is not None else None,
        "wall_s": round(recovery_s, 4) if recovery_s is not None else None,
        "restart_s": round((up - down) / _NS, 4) if up else None,
        "restart": {k: restart[k] for k in ("how", "old_pid", "new_pid")},
        "clients": len(users),
        "clients_dropped": len(dropped),
        "clients_caught_up": len(caught),
        "recovered": sum(1 for u in dropped if u["recovered"] is True),
        "history_lost": sum(1 for u in dropped if u["recovered"] is False),
        "reconnect_attempts": sum(u["reconnects"] for u in users),
        "final_seq": final_seq,
        "messages_sent": sum(u["sent"] for u in users),
        "losses": sum(u["gaps"] for u in users) + shortfall,
        "duplicates": sum(u["duplicates"] for u in users),
        "reorders": 0,  # a seq below the last one held is a duplicate here
        "stale_epoch": len(stale),
        "failed": failed,
        "error_count": errors + failed + len(stale),
        "latency_us": latency_figures(hist),
        "latency_of": "node down -> this client re-joined and holds every message it missed",
        "server_rss_after_bytes": merged.get("rss_after"),
        "closes": merged["closes"],
        "errors": merged["errors"],
        "unexpected_disconnects": 0,  # every drop is the storm: see clients_dropped
        "drain_timed_out": not storm["settled"],
    }


def rss_figures(series: list[list[Any]], duration: float, warm_fraction: float) -> dict[str, Any]:
    """Server memory over a soak: after warm-up (the first sample at ``warm_fraction`` of the
    duration), at the end, the growth between them in percent, and the least-squares slope
    over every sample from warm-up on (a steady leak shows there even when it is small)."""
    points = [(t, b) for t, b in series if b is not None]
    if not points:
        return {}
    warm_t, warm = next(((t, b) for t, b in points if t >= duration * warm_fraction), points[-1])
    end_t, end = points[-1]
    after = [(t, b) for t, b in points if t >= warm_t]
    slope = None
    if len(after) >= 2:
        mean_t = sum(t for t, _ in after) / len(after)
        mean_b = sum(b for _, b in after) / len(after)
        var = sum((t - mean_t) ** 2 for t, _ in after)
        if var:
            slope = sum((t - mean_t) * (b - mean_b) for t, b in after) / var * 60
    return {
        "rss_start_bytes": points[0][1],
        "rss_warm_bytes": warm,
        "rss_warm_at_s": warm_t,
        "rss_end_bytes": end,
        "rss_end_at_s": end_t,
        "rss_peak_bytes": max(b for _, b in points),
        "rss_growth_pct": round((end - warm) / warm * 100, 2) if warm else None,
        "rss_slope_bytes_per_min": round(slope) if slope is not None else None,
    }


def soak_figures(
    plan: Plan, merged: dict[str, Any], duration: float, cpu: float | None
) -> dict[str, Any]:
    """The soak's outcome. Losses are by seq, per room: every seq up to the room's last that a
    member lacks, plus the messages sent into the room that never got a seq (unsequenced)."""
    soak = merged["soak"]
    params = plan.parameters
    rooms = soak["rooms"]
    errors = sum(merged["errors"].values())
    deliveries = merged["deliveries"]
    return {
        "throughput": deliveries / duration,
        "throughput_per_cpu_s": deliveries / cpu if cpu else None,
        "wall_s": duration,
        "deliveries": deliveries,
        "deliveries_per_s": deliveries / duration,
        "messages_per_s": merged["sent_total"] / duration,
        "latency_us": latency_figures(merged["histogram"]),
        "latency_of": "send -> each live delivery (replays after a re-join not counted)",
        "clients": soak["users"],
        "reconnects": soak["reconnects"],
        "reconnects_per_s": round(soak["reconnects"] / duration, 2),
        "recovered": soak["recovered"],
        "not_recovered": soak["not_recovered"],
        "history_lost": soak["epoch_changes"],
        "losses": soak["losses"] + soak["unsequenced"],
        "receiver_losses": soak["losses"],
        "unsequenced": soak["unsequenced"],
        "duplicates": soak["duplicates"],
        "reorders": soak["reorders"],
        "rooms_with_losses": sum(1 for r in rooms.values() if r[2] or r[3]),
        "final_seq_total": sum(r[0] for r in rooms.values()),
        "failed": soak["failed"],
        "error_count": errors + soak["failed"] + soak["epoch_changes"],
        **rss_figures(merged["rss_series"], duration, params["warm_fraction"]),
        "server_rss_before_bytes": merged.get("rss_before"),
        "server_rss_after_bytes": merged.get("rss_after"),
        "server_rss_closed_bytes": merged.get("rss_closed"),
        "pacer_max_lag_us": merged["pacer_max_lag_us"],
        "closes": merged["closes"],
        "errors": merged["errors"],
        "unexpected_disconnects": merged["disconnects"],
        "drain_timed_out": not soak["settled"],
    }


def soak_details(merged: dict[str, Any]) -> dict[str, Any]:
    """For the JSON's details: the soak's counters, and every room that lost, doubled or
    reordered a seq, with its final seq and the messages its members sent."""
    soak = merged["soak"]
    fields = ("final_seq", "sent", "losses", "unsequenced", "duplicates", "reorders")
    problems = {
        room: dict(zip(fields, entry, strict=True))
        for room, entry in soak["rooms"].items()
        if any(entry[2:])
    }
    counters = {k: v for k, v in soak.items() if k not in ("rooms", "cycles_series")}
    return {**counters, "rooms_with_problems": problems}


def time_series(plan: Plan, merged: dict[str, Any], duration: float) -> dict[str, Any]:
    if plan.mode == "soak":
        seconds = math.ceil(duration)
        rss = merged["rss_series"]
        return {
            "interval_s": 1.0,
            "origin": "start of the load",
            "deliveries": merged["series"][:seconds],
            "sent": merged["sent_series"][:seconds],
            "reconnects": merged["soak"]["cycles_series"][:seconds],
            "rss_interval_s": plan.parameters["rss_interval_s"],
            "rss_t_s": [t for t, _ in rss],
            "rss_bytes": [b for _, b in rss],
        }
    if plan.timed:
        buckets = round(duration * 10)
        return {
            "interval_s": 0.1,
            "origin": "start of the measured window",
            "deliveries": merged["series"][:buckets],
            "sent": merged["sent_series"][:buckets],
        }
    if plan.mode == "reconnect":
        down = merged["schedule"]["down"]
        caught = [u["caught_ns"] for u in merged["reconnect"]["users"] if u["caught_ns"]]
        clients = [0] * (max(((c - down) // 100_000_000 for c in caught), default=-1) + 1)
        for c in caught:
            clients[max(0, (c - down) // 100_000_000)] += 1
        return {"interval_s": 0.1, "origin": "the node going down", "clients": clients}
    what = "connections" if plan.mode == "connect" else "deliveries"
    series = merged["series"]
    while series and series[-1] == 0:
        series = series[:-1]
    return {"interval_s": 0.1, "origin": "start of the load", what: series}
