"""Command line: ``fastws serve``, ``token``, ``config`` and ``bench``. ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from . import __version__
from .auth import mint, random_secret, skip_public_key_crypto
from .config import (
    CONFIG_ENV,
    FIELD_HELP,
    Settings,
    env_name,
    environ_for,
    load_settings,
    render_json,
    render_toml,
    resolve,
)
from .errors import ConfigError, FastWSError

_METAVAR = {int: "N", float: "NUM", str: "TEXT"}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for f in msgspec.structs.fields(Settings):
        flags = ["--" + f.name.replace("_", "-")]
        if f.name == "redis_url":
            flags.append("--redis")
        help_text = f"{FIELD_HELP[f.name]} [env {env_name(f.name)}]"
        if isinstance(f.default, bool):
            parser.add_argument(
                *flags,
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(
                *flags,
                dest=f.name,
                default=None,
                type=type(f.default),
                metavar=_METAVAR[type(f.default)],
                help=help_text,
            )


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="PATH",
        default=None,
        help="TOML file of settings, in sections as `fastws config --print` "
        f"shows them; FASTWS_* variables and flags override it [env {CONFIG_ENV}]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastws",
        description="WebSocket chat and pub/sub server with a compiled broadcast fan-out. "
        "Every setting can also come from a TOML file (--config) or a FASTWS_* environment "
        "variable; flags beat variables, which beat the file.",
    )
    parser.add_argument("--version", action="version", version=f"fastws {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the server (WebSocket at /ws, demo page at /, health at /healthz)",
        description="Run the server. Without --jwt-secret a random secret is made for this run "
        "and a ready demo link with a token is printed.",
    )
    _add_config_flag(serve)
    _add_settings_flags(serve)
    config = sub.add_parser(
        "config",
        help="show the effective configuration (file < env < flags), secrets masked",
        description="Print the settings `fastws serve` would run with, given the same --config, "
        "FASTWS_* variables and flags, as a TOML file --config reads, each value marked with "
        "where it came from. Secrets (and passwords in URLs) are masked and their lines "
        "commented out. Exits 2 with the reason if the configuration is invalid.",
    )
    config.add_argument(
        "--print",
        dest="print_config",
        action="store_true",
        help="print the effective configuration",
    )
    config.add_argument(
        "--format",
        choices=("toml", "json"),
        default="toml",
        help="toml (default; loadable with --config) or json",
    )
    _add_config_flag(config)
    _add_settings_flags(config)
    token = sub.add_parser(
        "token",
        help="mint a JWT for a user with the configured secret",
        description="Print a token signed with --jwt-secret or "
        "FASTWS_JWT_SECRET (HS256 by default).",
    )
    token.add_argument("--user", required=True, help="userId claim")
    token.add_argument("--username", help="username claim (default: the user id)")
    token.add_argument("--roles", default="", help="comma-separated roles claim")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until exp (default 3600)")
    token.add_argument(
        "--jwt-secret",
        dest="jwt_secret",
        default=None,
        help=f"HMAC secret [env {env_name('jwt_secret')}]",
    )
    token.add_argument(
        "--jwt-algorithms",
        dest="jwt_algorithms",
        default=None,
        help="signing algorithm, HS256/HS384/HS512 (default HS256)",
    )
    _add_config_flag(token)
    from .bench.options import add_arguments as add_bench_arguments  # argparse only: cheap

    bench = sub.add_parser(
        "bench",
        help="benchmark a server: roundtrip, fanout, rooms, "
        "connections (load generator on picows + uvloop)",
    )
    add_bench_arguments(bench)
    return parser


def _serve(args: argparse.Namespace) -> int:
    return serve_with(vars(args), args.config_file)


def _serve_forked_worker(options: dict[str, Any]) -> int:
    """A worker forked by the supervisor's zygote: the settings from its environment and
    ``options``, as an exec'd worker would read them, but without building the parser
    (which alone writes ~3 MB of pages each worker would otherwise share)."""
    try:
        return serve_with(options, None)
    except FastWSError as exc:
        print(f"fastws: error: {exc}", file=sys.stderr)
        return 2


def serve_with(options: dict[str, Any], config_file: str | None) -> int:
    """``fastws serve`` with ``options`` (flag values by setting name) over the file and the
    environment: one node, or the supervisor of ``--workers`` and its workers."""
    import os

    import uvloop

    from .logs import configure
    from .supervisor import ENV_BUS, ENV_NODE, ENV_WORKER, Supervisor

    settings = load_settings(options, config_file=config_file)
    configure(settings.log_level, settings.log_format)
    # HMAC tokens only: PyJWT then never loads cryptography (~16 MB in every process).
    skip_public_key_crypto(settings)
    secret = settings.jwt_secret
    generated = not secret and settings.algorithms[0].startswith("HS")
    if generated:
        secret = random_secret()
    host = settings.host

    def announce(port: int) -> None:
        base = f"http://{host}:{port}"
        print(
            f"fastws {__version__} listening on {base} (WebSocket at ws://{host}:{port}/ws, "
            f"pid {os.getpid()})",
            flush=True,
        )
        if generated and ENV_WORKER not in os.environ:
            alg = settings.algorithms[0]
            alice = mint(secret, "alice", ttl=86400, algorithm=alg)
            bob = mint(secret, "bob", ttl=86400, algorithm=alg)
            print(
                "No --jwt-secret given: using a random secret for this run.\n"
                f"Open the demo as alice: {base}/#token={alice}\n"
                f"        and as bob:     {base}/#token={bob}",
                flush=True,
            )
        if ENV_WORKER not in os.environ:
            from .policy import Policy

            print(Policy(settings).describe(), flush=True)  # open, or the rules in force

    workers = settings.workers or os.cpu_count() or 1
    if ENV_WORKER in os.environ:
        from .supervisor import die_with_parent

        die_with_parent()
    if workers > 1 and ENV_WORKER not in os.environ:
        # Workers are started with only --host/--port/--workers: the rest of the effective
        # settings (from the file, variables and flags alike) reach them as FASTWS_* variables.
        os.environ.update(environ_for(settings))
        os.environ.pop(CONFIG_ENV, None)
        from . import prefork

        # Before the loop exists: the zygote must not inherit it (see prefork.py).
        forking = settings.fork_workers and prefork.supported()
        zygote = prefork.Zygote.start(_serve_forked_worker) if forking else None
        try:
            return uvloop.run(Supervisor(settings, secret, workers, zygote).run(announce))
        finally:
            if zygote is not None:
                zygote.close()
    return uvloop.run(
        _run_node(
            settings,
            secret,
            announce,
            os.environ.get(ENV_BUS),
            os.environ.get(ENV_NODE),
            ENV_WORKER in os.environ,
        )
    )


async def _run_node(
    settings: Settings,
    secret: str,
    announce: Any,
    bus_dir: str | None,
    node_id: str | None,
    reuse_port: bool,
) -> int:
    from .broker import Broker
    from .broker.memory import MemoryBroker
    from .server import Node, history_policy, serve

    broker: Broker
    if settings.redis_url:
        from .broker.redis import RedisBroker

        broker = RedisBroker(
            settings.redis_url,
            node_ttl=settings.redis_node_ttl,
            cluster=settings.redis_cluster,
            policy=history_policy(settings),
            leases=settings.redis_leases,
        )
    elif bus_dir:
        from .broker.buswire import socket_path
        from .broker.localbus import LocalBusBroker

        broker = LocalBusBroker(socket_path(bus_dir))
    else:
        broker = MemoryBroker(history_policy(settings))
    node = Node(settings, secret, broker, node_id)
    await serve(node, lambda n: announce(n.port), reuse_port=reuse_port)
    return 0


def _token(args: argparse.Namespace) -> int:
    settings = load_settings(
        {"jwt_secret": args.jwt_secret, "jwt_algorithms": args.jwt_algorithms},
        config_file=args.config_file,
    )
    if not settings.jwt_secret:
        raise ConfigError(
            "no secret: pass --jwt-secret or set FASTWS_JWT_SECRET (the same one the server uses)"
        )
    roles = tuple(r for r in args.roles.split(",") if r)
    print(
        mint(settings.jwt_secret, args.user, args.username, roles, args.ttl, settings.algorithms[0])
    )
    return 0


def _config(args: argparse.Namespace) -> int:
    if not args.print_config:
        print("fastws config: nothing to do; pass --print", file=sys.stderr)
        return 2
    resolved = resolve(vars(args), config_file=args.config_file)
    print(render_json(resolved) if args.format == "json" else render_toml(resolved), end="")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench.runner import run  # picows clients, matplotlib, hdrh: only when benchmarking

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers: dict[str, Any] = {
        "serve": _serve,
        "token": _token,
        "config": _config,
        "bench": _bench,
    }
    if args.command not in handlers:
        parser.print_help()
        return 2
    try:
        return int(handlers[args.command](args))
    except FastWSError as exc:
        print(f"fastws: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
