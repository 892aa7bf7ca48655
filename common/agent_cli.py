"""Command-line handling shared by both daemons: --config, --set overrides, common flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TypeVar

from common.config import ConfigError, load

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
