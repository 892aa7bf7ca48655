"""Network namespaces for tests: two test hosts joined by a veth pair. Root only.

Only addresses inside namespaces a test created are ever used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def ss_rto_ms(ss: str) -> float:
    """The retransmission timeout `ss -tin` shows for a connection (ms)."""
    match = re.search(r"\brto:([\d.]+)", ss)
    assert match, ss
    return float(match.group(1))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class NetnsPair:
    left: str
    right: str
    left_if: str
    right_if: str
    left_ip: str
    right_ip: str

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def link(self, side: str, state: str) -> None:
        ns, ifname = (self.left, self.left_if) if side == "left" else (self.right, self.right_if)
        ip("-n", ns, "link", "set", ifname, state)

    def run_json(self, code: str, server: str = "", timeout: float = 60.0) -> dict:
        """Python `code` run on the left host, `server` (Python too) running on the right one meanwhile;
        the JSON object `code` prints last. Asserts that `code` exited 0."""
        peer = subprocess.Popen([*self.exec_prefix(self.right), sys.executable, "-c", server]) if server else None
        try:
            res = subprocess.run([*self.exec_prefix(self.left), sys.executable, "-c", code],
                                 capture_output=True, text=True, timeout=timeout)
        finally:
            if peer is not None:
                peer.kill()
                peer.wait(10)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])


def _wait_bindable(ns: str, addr: str, timeout: float = 5.0) -> None:
    """A fresh namespace can refuse a bind to a just-added address for a moment (seen as
    EADDRNOTAVAIL from gRPC's dual-stack socket); wait until a server could listen on it."""
    probe = ("import socket,sys\n"
             "s=socket.socket(socket.AF_INET6)\n"
             f"s.bind(('::ffff:{addr}',0))\n")
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True)
        if proc.returncode == 0 or time.monotonic() > deadline:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def netns_pair(tag: str, subnet: str = "10.78.0") -> Iterator[NetnsPair]:
    """Namespaces p2vt-<tag>-a / -b with <subnet>.1 and <subnet>.2 on a veth pair."""
    left, right = f"p2vt-{tag}-a", f"p2vt-{tag}-b"
    pair = NetnsPair(left, right, f"p2vt{tag[:6]}a", f"p2vt{tag[:6]}b", f"{subnet}.1", f"{subnet}.2")
    for ns in (left, right):
        ip("netns", "del", ns, check=False)
    try:
        for ns in (left, right):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", pair.left_if, "netns", left, "type", "veth", "peer", "name", pair.right_if,
           "netns", right)
        ip("-n", left, "addr", "add", f"{pair.left_ip}/24", "dev", pair.left_if)
        ip("-n", right, "addr", "add", f"{pair.right_ip}/24", "dev", pair.right_if)
        ip("-n", left, "link", "set", pair.left_if, "up")
        ip("-n", right, "link", "set", pair.right_if, "up")
        for ns, addr in ((left, pair.left_ip), (right, pair.right_ip)):
            _wait_bindable(ns, addr)
        yield pair
    finally:
        for ns in (left, right):
            ip("netns", "del", ns, check=False)
