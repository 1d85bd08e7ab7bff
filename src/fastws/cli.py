"""Command line: ``fastws serve`` and ``fastws token``. ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from . import __version__
from .auth import mint, random_secret
from .config import FIELD_HELP, Settings, env_name, load_settings
from .errors import ConfigError, FastWSError

_METAVAR = {int: "N", float: "NUM", str: "TEXT"}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for f in msgspec.structs.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{FIELD_HELP[f.name]} [env {env_name(f.name)}]"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=type(f.default),
                                metavar=_METAVAR[type(f.default)], help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastws",
        description="WebSocket chat and pub/sub server with a compiled broadcast fan-out. "
        "Every setting can also come from a FASTWS_* environment variable; flags win.",
    )
    parser.add_argument("--version", action="version", version=f"fastws {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run the server (WebSocket at /ws, demo page at /, health at /healthz)",
        description="Run the server. Without --jwt-secret a random secret is made for this run "
        "and a ready demo link with a token is printed.",
    )
    _add_settings_flags(serve)
    token = sub.add_parser("token", help="mint a JWT for a user with the configured secret",
                           description="Print a token signed with --jwt-secret or "
                           "FASTWS_JWT_SECRET (HS256 by default).")
    token.add_argument("--user", required=True, help="userId claim")
    token.add_argument("--username", help="username claim (default: the user id)")
    token.add_argument("--roles", default="", help="comma-separated roles claim")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until exp (default 3600)")
    token.add_argument("--jwt-secret", dest="jwt_secret", default=None,
                       help=f"HMAC secret [env {env_name('jwt_secret')}]")
    token.add_argument("--jwt-algorithms", dest="jwt_algorithms", default=None,
                       help="signing algorithm, HS256/HS384/HS512 (default HS256)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from .logs import configure
    from .server import Node, serve

    settings = load_settings(vars(args))
    configure(settings.log_level, settings.log_format)
    secret = settings.jwt_secret
    generated = not secret and settings.algorithms[0].startswith("HS")
    if generated:
        secret = random_secret()

    def announce(node: Node) -> None:
        base = f"http://{settings.host}:{node.port}"
        print(f"fastws {__version__} listening on {base} (WebSocket at ws://{settings.host}:"
              f"{node.port}/ws, pid {__import__('os').getpid()})", flush=True)
        if generated:
            alg = settings.algorithms[0]
            alice = mint(secret, "alice", ttl=86400, algorithm=alg)
            bob = mint(secret, "bob", ttl=86400, algorithm=alg)
            print("No --jwt-secret given: using a random secret for this run.\n"
                  f"Open the demo as alice: {base}/#token={alice}\n"
                  f"        and as bob:     {base}/#token={bob}", flush=True)

    node = Node(settings, secret)
    uvloop.run(serve(node, announce))
    return 0


def _token(args: argparse.Namespace) -> int:
    settings = load_settings({"jwt_secret": args.jwt_secret,
                              "jwt_algorithms": args.jwt_algorithms})
    if not settings.jwt_secret:
        raise ConfigError("no secret: pass --jwt-secret or set FASTWS_JWT_SECRET "
                          "(the same one the server uses)")
    roles = tuple(r for r in args.roles.split(",") if r)
    print(mint(settings.jwt_secret, args.user, args.username, roles, args.ttl,
               settings.algorithms[0]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers: dict[str, Any] = {"serve": _serve, "token": _token}
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
