"""Command-line handling shared by both daemons: --config, --set overrides, common flags."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from common.config import ConfigError, load
from common.log import setup_logging
from common.rpc import run

T = TypeVar("T")


def base_parser(prog: str, description: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", "-c", default=None,
                        help=f"TOML config file (default {default_config} when it exists)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext gRPC without peer authentication: local development ONLY")
    parser.add_argument("--ready-file", default=None, help="write the listen addresses here once ready")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    parser.add_argument("--text-logs", action="store_true", help="human log lines instead of JSON")
    return parser


def load_config(cls: type[T], args: argparse.Namespace, default_config: str, extra: list[str]) -> T:
    path = args.config
    if path is None and Path(default_config).exists():
        path = default_config
    overrides = list(args.set) + extra
    if args.insecure:
        overrides.append("tls.insecure=true")
    try:
        return load(cls, path, overrides)
    except ConfigError as exc:
        print(f"{sys.argv[0]}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def flag_overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """A daemon's own shortcut flags as `section.key=value` overrides ({args attribute: config key})."""
    return [f"{key}={getattr(args, attr)}" for attr, key in flags.items() if getattr(args, attr, None)]


def run_daemon(args: argparse.Namespace, log_level: str, serve: Coroutine[Any, Any, None], log: logging.Logger
               ) -> None:
    """Logging as asked, then serve until stopped; a failure to start is one clear line and exit 1."""
    setup_logging(args.log_level or log_level, json_lines=not args.text_logs)
    try:
        run(serve)
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None


def machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            return value
    import socket

    return socket.gethostname()
