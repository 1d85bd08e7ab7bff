"""``fastws bench``: resolve the target(s), run the scenario against each, write and print
the results; or ``--compare`` two result files; or ``--summarize`` runs into Markdown."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import FastWSError
from .options import SERVERS, build_parser
from .targets import BenchError, Target


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except FastWSError as exc:
        print(f"fastws bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command with parsed ``args``: 0 when every run was clean, 1 when a run saw
    losses, duplicates, reorders, failed connections or server closes."""
    from . import report

    if args.compare:
        try:
            print(report.compare(*args.compare))
        except (OSError, ValueError) as exc:
            raise BenchError(str(exc)) from exc
        return 0
    if args.summarize:
        try:
            table = report.summarize(args.summarize, args.by)
            if args.readme:
                marker = "results" if args.by == "server" else "deployments"
                report.write_readme(args.readme, table, marker)
        except (OSError, ValueError) as exc:
            raise BenchError(str(exc)) from exc
        print(table, end="")
        return 0
    _check(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    docs: list[dict[str, Any]] = []
    if args.server:
        from ..auth import random_secret
        from .deployment import deployed

        secret = args.secret or random_secret()
        kinds = list(SERVERS) if args.server == "all" else [args.server]
        runs = [(kind, mode) for kind in kinds for mode in args.deployments]
        for kind, mode in runs:
            _reserve_server_fds(args, kind, mode)
            with deployed(
                kind, mode, secret, args.server_cpus, server_args(args, kind), args.baselines
            ) as (deployment, target):
                try:
                    docs.append(run_one(args, target, stamp, deployment.restart_node))
                except BenchError as exc:
                    tail = "".join(target.log or ())
                    raise BenchError(
                        f"{exc}\n--- last lines of the {kind} server ---\n{tail}"
                    ) from exc
    else:
        target = Target("url", args.url, secret=args.secret, token=args.token, pid=args.server_pid)
        docs.append(run_one(args, target, stamp))
    if len(docs) > 1:
        by = "deployment" if len(args.deployments) > 1 else "server"
        print()
        print(report.ratios_table(docs, by))
        if not args.no_plot:
            json_path, _ = report.output_paths(args.out, {**docs[0], by: "all"}, stamp)
            png = json_path.with_suffix(".png")
            report.plot_servers(docs, png)
            print(f"wrote {png}")
    dirty = [report.run_label(d) for d in docs if not _clean(d["headline"])]
    if dirty:
        print(
            f"fastws bench: integrity or connection problems with: {', '.join(dirty)} "
            "(see the tables above)",
            file=sys.stderr,
        )
        return 1
    return 0


def server_args(args: argparse.Namespace, kind: str) -> list[str]:
    """The extra arguments of a started server. An idle phase measures what idle connections
    cost, heartbeat included, so fastws gets back the default ping interval the harness
    otherwise turns off; a ``--server-arg=--ping-interval=N`` comes later and still wins."""
    if kind == "fastws" and args.idle:
        from ..config import Settings

        return [f"--ping-interval={Settings().ping_interval:g}", *args.server_arg]
    return list(args.server_arg)


# SO_REUSEPORT spreads connections over a server's processes by hash, not exactly evenly
_SHARE_SLACK = 1.05


def _reserve_server_fds(args: argparse.Namespace, kind: str, mode: str) -> None:
    """Raise RLIMIT_NOFILE before a connections run's server starts (it inherits the limit)
    to what each of its processes holds: its share of the connections (the other scenarios
    stay within the usual limit)."""
    if args.scenario != "connections":
        return
    from .scenarios import idle_connections
    from .targets import FD_HEADROOM, ensure_nofile

    processes = server_processes(kind, mode, args.server_arg)
    share = idle_connections(args) / processes * (_SHARE_SLACK if processes > 1 else 1)
    hint = " (--server-arg=--workers=N)" if kind == "fastws" else ""
    ensure_nofile(math.ceil(share) + FD_HEADROOM, hint)


def server_processes(kind: str, mode: str, extra: list[str]) -> int:
    """The processes a started server's connections are spread over: its nodes (redis2: two)
    times its workers (workers2, or the last --workers in ``extra``; 0 = one per core)."""
    nodes = 2 if mode == "redis2" else 1
    if kind != "fastws":
        return 1
    if mode == "workers2":
        return nodes * 2
    workers = "1"
    for i, arg in enumerate(extra):
        if arg.startswith("--workers="):
            workers = arg.partition("=")[2]
        elif arg == "--workers" and i + 1 < len(extra):
            workers = extra[i + 1]
    count = int(workers) if workers.isdigit() else 1  # a bad value: the server will say so
    return nodes * (count or os.cpu_count() or 1)


def _clean(head: dict[str, Any]) -> bool:
    return not (
        head.get("error_count")
        or head.get("losses")
        or head.get("duplicates")
        or head.get("reorders")
        or head.get("failed")
        or head.get("closes")
        or head.get("unexpected_disconnects")
    )


def _check(args: argparse.Namespace) -> None:
    if not args.scenario:
        raise BenchError(
            "give a SCENARIO (roundtrip, fanout, rooms, connections, soak), "
            "or --compare A.json B.json, or --summarize RUN.json..."
        )
    if args.server and args.url:
        raise BenchError("--server starts a server here; --url targets a running one: not both")
    if not args.server and not args.url:
        raise BenchError(
            "no target: --server fastws|picows|websockets|all, or --url "
            "ws://HOST:PORT/ws with --secret or --token"
        )
    if args.url and not (args.secret or args.token):
        raise BenchError("--url needs --secret (one token minted per user) or --token")
    if args.secret and args.token:
        raise BenchError("--secret or --token, not both")
    if args.server and args.token:
        raise BenchError("--server makes its own secret (or takes --secret), not --token")
    if args.url and not args.url.startswith(("ws://", "wss://")):
        raise BenchError("--url must be ws://HOST:PORT/PATH (or wss://)")
    if args.duration <= 0 or args.warmup < 0 or args.drain < 0 or args.timeout <= 0:
        raise BenchError("--duration and --timeout must be > 0, --warmup and --drain >= 0")
    for name in (
        "connections",
        "subscribers",
        "publishers",
        "rooms",
        "members",
        "window",
        "procs",
        "concurrency",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name} must be at least 1")
    if args.rate is not None and args.rate <= 0:
        raise BenchError("--rate must be > 0")
    if args.pad < 0:
        raise BenchError("--pad must be >= 0")
    if args.flooders < 0:
        raise BenchError("--flooders must be >= 0")
    if args.flooders and (args.scenario == "connections" or args.join_storm):
        raise BenchError("--flooders belongs to the roundtrip, fanout and rooms scenarios")
    if args.idle < 0:
        raise BenchError("--idle must be >= 0")
    if args.idle and args.scenario != "connections":
        raise BenchError("--idle belongs to the connections scenario")
    if args.sources is not None:
        if not 1 <= args.sources <= 253:  # 127.0.0.2 .. 127.0.0.254
            raise BenchError("--sources must be 1 to 253")
        if args.scenario != "connections":
            raise BenchError("--sources belongs to the connections scenario")
    if args.join_storm and args.scenario != "fanout":
        raise BenchError("--join-storm belongs to the fanout scenario")
    if args.reconnect_rate is not None:
        if args.scenario != "soak":
            raise BenchError("--reconnect-rate belongs to the soak scenario")
        if not 0 <= args.reconnect_rate <= 1:
            raise BenchError("--reconnect-rate is a share of the connections: 0 to 1")
    if args.scenario == "soak":
        if args.flooders:
            raise BenchError("--flooders belongs to the roundtrip, fanout and rooms scenarios")
        if args.server and args.server != "fastws":
            # the baselines number chats but keep no history: nothing to re-join with since
            raise BenchError("the soak re-joins with since: it needs --server fastws (or --url)")
    from .deployment import parse_deployments

    args.deployments = parse_deployments(args.deployment)
    if args.deployments != ["one"] and args.server != "fastws":
        raise BenchError("--deployment other than 'one' needs --server fastws")
    if args.reconnect_storm:
        if args.scenario != "fanout" or args.join_storm or args.flooders:
            raise BenchError("--reconnect-storm belongs to the fanout scenario, on its own")
        if args.server != "fastws":
            raise BenchError("--reconnect-storm restarts the server: it needs --server fastws")


def doc_of(target: Target) -> dict[str, Any]:
    """The fields of a run's document that name what it ran against."""
    return {"server": target.kind, "deployment": target.deployment or "one"}


def run_one(
    args: argparse.Namespace,
    target: Target,
    stamp: str,
    restart: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One scenario against one target: run, write JSON (+ PNG), print the table.
    ``restart`` restarts the target's first node (the reconnect storm)."""
    from . import report
    from .scenarios import build_plan, figures, generator_cpus, run_plan, soak_details, time_series
    from .targets import FD_HEADROOM, ensure_nofile, versions

    cpus = generator_cpus(args, target)
    procs = args.procs or (len(cpus) if cpus else 1)
    per_proc = [[cpus[i % len(cpus)]] if cpus else None for i in range(procs)]
    plan = build_plan(args, target, procs, per_proc)
    plan.parameters["generator_cpus"] = [p[0] for p in per_proc if p] or None
    # the generator processes inherit it: fail here, before any of them starts
    ensure_nofile(max(len(p["members"]) for p in plan.procs) + FD_HEADROOM, " (--procs N)")
    if not args.quiet:
        where = f"CPU {','.join(str(c) for c in cpus)}" if cpus else "unpinned"
        print(
            f"fastws bench: {plan.title} against {report.run_label(doc_of(target))} "
            f"at {', '.join(target.node_urls)}: "
            f"{procs} generator process{'es' * (procs > 1)} ({where})",
            flush=True,
        )
    merged = run_plan(plan, target, args, restart)
    head = figures(plan, merged, args.duration)
    hist = {"storm": merged.get("join_histogram"), "reconnect": merged.get("reconnect_histogram")}
    hist = hist.get(plan.mode) or merged["histogram"]
    doc = report.document(
        scenario=plan.scenario,
        mode=plan.mode,
        title=plan.title,
        parameters=plan.parameters,
        target=target.describe(),
        server=target.kind,
        deployment=target.deployment or "one",
        versions=versions(),
        headline=head,
        timeseries=time_series(plan, merged, args.duration),
        histogram=hist,
        details={
            "setup_s": round(merged["setup_s"], 3),
            "warnings": merged["warnings"],
            "schedule_ns": merged["schedule"],
            "sent_total": merged["sent_total"],
            "restart": merged.get("restart"),
            "server_cpu_measures": "utime+stime of every server process (each fastws node, "
            "the supervisor, redis-server) and their live descendants (/proc/<pid>/stat, "
            "task/*/children), over the measured window",
        },
    )
    if plan.mode == "soak":
        doc["details"]["soak"] = soak_details(merged)
    json_path, png_path = report.output_paths(args.out, doc, stamp)
    doc["files"] = {"json": json_path.name, "png": None if args.no_plot else png_path.name}
    if not args.no_plot:
        report.plot_run(doc, png_path)
    report.write_json(doc, json_path)
    print(report.run_table(doc))
    print(f"wrote {json_path}" + ("" if args.no_plot else f" and {png_path.name}"), flush=True)
    return doc
