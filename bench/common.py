"""Shared helpers for the memory benchmarks: namespaces, event loop, subprocess roles."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def run_async(coro: Awaitable[Any]) -> Any:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@contextlib.contextmanager
def netns_pair(tag: str, subnet: str = "10.79.0") -> Iterator[tuple[str, str, str, str] | None]:
    """(left ns, right ns, left ip, right ip) joined by a veth pair, deleted afterwards; None
    when namespaces are unavailable (then both ends use loopback)."""
    if not can_use_netns():
        yield None
        return
    left, right = f"p2vt-{tag}-a", f"p2vt-{tag}-b"
    for ns in (left, right):
        _ip("netns", "del", ns, check=False)
    try:
        for ns in (left, right):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", f"p2vt{tag}a", "netns", left, "type", "veth", "peer", "name", f"p2vt{tag}b",
            "netns", right)
        _ip("-n", left, "addr", "add", f"{subnet}.1/24", "dev", f"p2vt{tag}a")
        _ip("-n", right, "addr", "add", f"{subnet}.2/24", "dev", f"p2vt{tag}b")
        _ip("-n", left, "link", "set", f"p2vt{tag}a", "up")
        _ip("-n", right, "link", "set", f"p2vt{tag}b", "up")
        yield left, right, f"{subnet}.1", f"{subnet}.2"
    finally:
        for ns in (left, right):
            _ip("netns", "del", ns, check=False)


def python_cmd(module: str, *args: str, netns: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", module, *args]
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}
