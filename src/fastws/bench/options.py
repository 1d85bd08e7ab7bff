"""The ``fastws bench`` command line. Only argparse here: the fastws CLI imports this module
to build its parser, so nothing heavy (picows, matplotlib, hdrh) may be imported at the top."""

from __future__ import annotations

import argparse

SCENARIOS = ("roundtrip", "fanout", "rooms", "connections", "soak")
SERVERS = ("fastws", "picows", "websockets")  # what --server all runs
# Started only when asked for: Bun is not a fastws dependency (see benchmarks/baselines).
EXTRA_SERVERS = ("bun",)

DESCRIPTION = """\
Benchmark a fastws-protocol server. Scenarios: roundtrip (one room per connection, post and
wait for your own broadcast), fanout (one room, many subscribers, --join-storm for joins),
rooms (many small rooms, everyone posts), connections (many idle authenticated connections),
soak (rooms at a fixed total rate for minutes while a share of the users reconnects with since
every second; server memory sampled all along).
Target: --server KIND starts a server here (port 0, pinned with taskset), --server all runs
fastws, picows and websockets one after the other and prints ratios; --deployment runs fastws
as one process, --workers 2, on a Redis or as two nodes on one Redis (a list compares them with
ratios to the first); or --url ws://HOST:PORT/ws with --secret (one token minted per simulated
user) or --token (one token for everyone).
Every run writes a JSON and a PNG to --out and prints a table."""

EPILOG = """\
examples:
  fastws bench roundtrip --server all
  fastws bench fanout --server fastws --subscribers 1000 --window 64
  fastws bench fanout --server fastws --subscribers 1000 --rate 500
  fastws bench fanout --server fastws --subscribers 2000 --join-storm
  fastws bench fanout --server fastws --deployment one,workers2,redis,redis2 --subscribers 1000
  fastws bench fanout --server fastws --deployment redis2 --reconnect-storm --subscribers 1000
  fastws bench rooms --url ws://10.0.0.5:8080/ws --secret "$FASTWS_JWT_SECRET" --rate 5
  fastws bench connections --server fastws --connections 10000
  fastws bench connections --server fastws --connections 100000 --idle 30 --procs 2
  fastws bench soak --server fastws --duration 600
  fastws bench --compare benchmarks/results/A.json benchmarks/results/B.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``fastws bench`` option to ``parser`` (a subparser or a standalone one)."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("scenario", nargs="?", choices=SCENARIOS, help="what to measure")

    target = parser.add_argument_group("target")
    target.add_argument(
        "--server",
        choices=(*SERVERS, *EXTRA_SERVERS, "all"),
        help="start this server locally (port 0) and stop it after; "
        "'all' runs the scenario against all three and prints ratios",
    )
    target.add_argument(
        "--deployment",
        default="one",
        metavar="MODES",
        help="with --server fastws: how the server side runs, all of it pinned to "
        "--server-cpus and counted in its CPU seconds and memory: one (one process, default), "
        "workers2 (--workers 2), redis (one node on a redis-server started here), redis2 (two "
        "nodes on one redis-server, users spread over both); a comma list (or 'all') runs each "
        "in turn and prints ratios to the first",
    )
    target.add_argument("--url", metavar="URL", help="an already running server: ws://HOST:PORT/ws")
    target.add_argument(
        "--secret",
        metavar="SECRET",
        help="HS256 secret: mint one token per simulated user "
        "(with --server: the secret given to the started server)",
    )
    target.add_argument(
        "--token", metavar="JWT", help="one ready token used by every simulated user"
    )
    target.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="pid of the --url server, to report its CPU seconds and memory "
        "(read from /proc: so only for a server on this machine)",
    )
    target.add_argument(
        "--server-cpus",
        default="0",
        metavar="CPUS",
        help="CPU list for a started server, applied with taskset -c (default 0; '' = not pinned)",
    )
    target.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for a started server, repeatable (e.g. --server-arg=--workers=2)",
    )
    target.add_argument(
        "--baselines",
        metavar="DIR",
        help="folder of picows_server.py, websockets_server.py and bun_server.ts "
        "(default: benchmarks/baselines of this checkout)",
    )

    gen = parser.add_argument_group("load generator")
    gen.add_argument(
        "--procs",
        type=int,
        metavar="N",
        help="generator processes (default: one per generator CPU)",
    )
    gen.add_argument(
        "--cpus",
        default="auto",
        metavar="CPUS",
        help="CPU list for the generator processes, process i on the i-th CPU "
        "(cycling); 'auto' (default) = the CPUs the started server does not use, "
        "unpinned otherwise; 'none' = never pin",
    )
    gen.add_argument(
        "--concurrency",
        type=int,
        default=200,
        metavar="N",
        help="connections being opened at once, over all processes (default 200)",
    )
    gen.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SEC",
        help="seconds allowed for connecting and joining, and for a join storm "
        "or a connection run to complete (default 120)",
    )
    gen.add_argument(
        "--sources",
        type=int,
        metavar="K",
        help="connections: spread the connections over K loopback source addresses "
        "127.0.0.2 .. 127.0.0.(K+1), since one source reaches one server port from at most "
        "~28k ephemeral ports, and binding past ~14k per source gets slow (default: one per "
        "12,000 connections; 1 = no bind). Only for a server on 127.0.0.1 or localhost; "
        "ignored otherwise",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--duration", type=float, default=10.0, metavar="SEC", help="measured seconds (default 10)"
    )
    run.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        metavar="SEC",
        help="seconds of load before measuring (default 1)",
    )
    run.add_argument(
        "--drain",
        type=float,
        default=5.0,
        metavar="SEC",
        help="at most this many seconds after the run for in-flight messages "
        "to arrive before they count as lost (default 5)",
    )
    run.add_argument(
        "--rate",
        type=float,
        metavar="MSG/S",
        help="fixed offered rate instead of flat out: total msgs/s (roundtrip, "
        "fanout, soak: default 1000) or msgs/s per member (rooms)",
    )
    run.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="flat out: messages in flight per publisher, each complete when its "
        "own broadcast comes back (default: 1 roundtrip, 64 fanout, 16 rooms)",
    )
    run.add_argument(
        "--connections",
        type=int,
        metavar="N",
        help="roundtrip: connections (default 64); connections: idle "
        "connections to open (default 10000)",
    )
    run.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="SEC",
        help="connections: once every connection is open, keep them all idle this many "
        "seconds and measure the server's CPU and memory over that window, its heartbeat "
        "included (a started fastws keeps its default ping interval; the clients answer and "
        "count the pings) (default 0: no idle phase)",
    )
    run.add_argument(
        "--subscribers",
        type=int,
        metavar="N",
        default=100,
        help="fanout: subscribers in the room (default 100)",
    )
    run.add_argument(
        "--publishers", type=int, metavar="N", default=1, help="fanout: publishers (default 1)"
    )
    run.add_argument(
        "--join-storm",
        action="store_true",
        help="fanout: --subscribers clients join one room one after another; "
        "measures the S*(S-1)/2 user_joined deliveries",
    )
    run.add_argument(
        "--flooders",
        type=int,
        metavar="N",
        default=0,
        help="roundtrip/fanout/rooms: N more clients, in a generator process of their own, "
        "each writing chat_messages into its own room as fast as its socket takes them from the "
        "load's start (an abuser; a server should rate-limit and close them while the measured "
        "clients keep their latency). Their traffic is not counted; their fate is reported as "
        "'flood' (default 0)",
    )
    run.add_argument(
        "--storm-concurrency",
        type=int,
        metavar="N",
        default=1,
        help="join storm: joins in flight per generator process (default 1: one after another; "
        "more lets a server batch the notices of joins that arrive together)",
    )
    run.add_argument(
        "--presence-diff",
        action="store_true",
        help='join storm: the clients join with "presence": "diff" (fastws): counts the '
        "presence_diff messages they get instead of user_joined, and waits until each has seen "
        "the room's final count",
    )
    run.add_argument(
        "--reconnect-storm",
        action="store_true",
        help="fanout, with --server: --subscribers clients in one room while one publisher "
        "posts at --rate (default 10 msg/s); after --warmup seconds their node is restarted and "
        "every client reconnects at once and re-joins with since; measures the time until every "
        "client has caught up, and any gap, duplicate or error",
    )
    run.add_argument(
        "--rooms", type=int, metavar="N", default=500, help="rooms, soak: rooms (default 500)"
    )
    run.add_argument(
        "--members",
        type=int,
        metavar="N",
        help="rooms, soak: members per room, each one posting (default 4; soak 20)",
    )
    run.add_argument(
        "--reconnect-rate",
        type=float,
        metavar="FRACTION",
        help="soak: the share of all connections closed each second, each coming straight "
        "back and re-joining its room with since (default 0.01: 1 %% per second)",
    )
    run.add_argument(
        "--pad",
        type=int,
        metavar="N",
        default=0,
        help="characters of padding added to each chat text (default 0)",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        default="benchmarks/results",
        metavar="DIR",
        help="where the JSON and PNG go (default benchmarks/results)",
    )
    out.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    out.add_argument("--quiet", action="store_true", help="no progress bar, only the tables")
    out.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="print the ratios A/B between two runs' headline figures and exit",
    )
    out.add_argument(
        "--summarize",
        nargs="+",
        metavar="RUN.json",
        help="print a Markdown table of these runs (grouped by scenario, one "
        "column per server) and exit",
    )
    out.add_argument(
        "--by",
        choices=("server", "deployment"),
        default="server",
        help="with --summarize: one column per server (fastws / each baseline; default) or per "
        "deployment (each / one process)",
    )
    out.add_argument(
        "--readme",
        metavar="README.md",
        help="with --summarize: write the table into this file between "
        "<!-- results:start --> and <!-- results:end --> (--by deployment: "
        "<!-- deployments:start --> and <!-- deployments:end -->)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastws.bench")
    add_arguments(parser)
    return parser
