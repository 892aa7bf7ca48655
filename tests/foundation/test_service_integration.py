"""How the agents behave as services: sd_notify, gRPC health, p2vctl over TLS to a remote agent."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.agents import REPO, AgentProcess
from tests.foundation.conftest import source_config


def test_sd_notify_ready_and_stopping(short_tmp, tls_dir):
    notify_path = short_tmp / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    os.environ["NOTIFY_SOCKET"] = str(notify_path)
    try:
        config = source_config(short_tmp, tls_dir, "file:/dev/null")
        agent = AgentProcess("source_agent.main", ["--config", str(config)], short_tmp, name="source")
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert listener.recv(256) == b"READY=1"
        agent.wait_ready()
        agent.terminate()
        assert listener.recv(256) == b"STOPPING=1"
        assert agent.proc.returncode == 0
    finally:
        agent.stop()
        listener.close()


@pytest.mark.usefixtures("needs_netns")
def test_health_and_p2vctl_over_tls(short_tmp, tls_dir):
    """Remote tooling reaches the source agent only with a valid client certificate."""
    cfg = source_config(short_tmp, tls_dir, "file:/dev/null")
    agent = AgentProcess("source_agent.main", ["--config", str(cfg), "--listen-tcp", "127.0.0.1:0"],
                         short_tmp, name="source")
    try:
        ports = agent.wait_ready().split()
        tcp = next(p for p in ports if not p.startswith("unix:"))

        async def health() -> int:
            async with grpc.aio.insecure_channel(f"unix:{short_tmp / 'source.sock'}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="p2v.v1.Source"), timeout=10)
                return reply.status

        assert asyncio.run(health()) == health_pb2.HealthCheckResponse.SERVING
        base = [sys.executable, "-m", "p2vctl.cli", "discover", "--json", "--agent", tcp, "--timeout", "10",
                "--ca", str(tls_dir / "ca.pem"), "--server-name", "p2v-source"]
        ok = subprocess.run([*base, "--cert", str(tls_dir / "p2vctl.pem"), "--key", str(tls_dir / "p2vctl.key")],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["nics"]
        rogue = subprocess.run([*base, "--cert", str(tls_dir / "rogue" / "p2v-source.pem"),
                                "--key", str(tls_dir / "rogue" / "p2v-source.key")],
                               capture_output=True, text=True, cwd=REPO, timeout=60)
        assert rogue.returncode == 3, rogue.stdout + rogue.stderr
        assert agent.proc.poll() is None
    finally:
        agent.stop()
