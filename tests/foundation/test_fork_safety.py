"""Children forked by an agent while gRPC is busy must not crash (grpcio's fork handlers did: the
cutover's modprobe and helper died of SIGSEGV on P). common/__init__.py turns the handlers off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def probe(children: int, env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-m", "tests.foundation.fork_probe", str(children)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_children_forked_under_rpc_load_all_exit_cleanly() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    assert probe(300, env) == "failed 0 of 300"


def test_every_entry_package_turns_the_handlers_off_before_grpc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    for package in ("source_agent", "dest_agent", "p2vctl"):
        code = f"import {package}, os, sys; sys.exit(os.environ.get('GRPC_ENABLE_FORK_SUPPORT') != 'false')"
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, timeout=60)
        assert res.returncode == 0, (package, res.stderr[-1000:])
