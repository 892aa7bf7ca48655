"""How the agents behave as services: sd_notify, gRPC health, p2vctl over TLS to a remote agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from source_agent import host_settings as hs
from source_agent.host_settings import HostSettings, PendingCutover
from tests.agents import REPO, AgentProcess
from tests.foundation.conftest import dest_config, source_config


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


@pytest.mark.netns
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
                "--connect-timeout", "3",
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


def test_restarted_source_agent_repairs_and_has_v_drop_the_migration(short_tmp, tls_dir) -> None:
    """Real agents, mutual TLS on loopback. A migration prepared on V; a pending cutover of it on the
    source's disk whose helper is gone; the source agent that starts puts the settings back (here
    nothing on the host: no interface, no image_size), marks the dead agent's journal of it failed and
    cancels the migration on V."""
    from common.config import TlsConfig
    from common.rpc import open_channel
    from p2v.v1 import common_pb2, destination_pb2_grpc
    from tests.foundation.peer import prepare

    dest = AgentProcess("dest_agent.main", ["--config", str(dest_config(short_tmp, tls_dir, "127.0.0.1:0"))],
                        short_tmp, name="dest")
    source = None
    try:
        address = next(p for p in dest.wait_ready().split() if not p.startswith("unix:"))
        tls = TlsConfig(ca=str(tls_dir / "ca.pem"), cert=str(tls_dir / "p2v-source.pem"),
                        key=str(tls_dir / "p2v-source.key"), server_name="p2v-dest")

        async def on_v(call: str, migration_id: str = "") -> str:
            channel = open_channel(address, tls)
            try:
                stub = destination_pb2_grpc.DestinationStub(channel)
                if call == "prepare":
                    return (await prepare(stub)).migration_id
                status = await stub.Status(common_pb2.MigrationRef(migration_id=migration_id), timeout=10)
                return common_pb2.MigrationState.Name(status.state)
            finally:
                await channel.close()

        migration_id = asyncio.run(on_v("prepare"))
        assert asyncio.run(on_v("status", migration_id)) != "MIGRATION_STATE_CANCELLED"
        path = hs.pending_path(short_tmp / "source-state")
        hs.write_pending(path, PendingCutover(HostSettings([], [], {}, ""), hs.current_boot_id(), migration_id,
                                              address, helper_pid=0))
        # the dead agent's journals: this migration's, cut short at the cutover, and an older finished one
        journals = short_tmp / "source-state" / "migrations"
        journals.mkdir()
        (journals / "local1.json").write_text(json.dumps({"id": "local1", "state": "MIGRATION_STATE_CUTOVER",
                                                          "remote_id": migration_id, "error": ""}))
        older = {"id": "local0", "state": "MIGRATION_STATE_COMPLETED", "remote_id": "other", "error": ""}
        (journals / "local0.json").write_text(json.dumps(older))
        config = source_config(short_tmp, tls_dir, "file:/dev/null")
        source = AgentProcess("source_agent.main", ["--config", str(config)], short_tmp, name="source")
        source.wait_ready()
        deadline = time.monotonic() + 30
        while "interrupted cutover recovered" not in source.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = source.output()
        assert "interrupted cutover recovered" in log and f"V told: migration {migration_id} cancelled" in log, log
        assert not path.exists()
        assert asyncio.run(on_v("status", migration_id)) == "MIGRATION_STATE_CANCELLED"
        assert "journal of local1 marked failed" in log, log
        marked = json.loads((journals / "local1.json").read_text())
        assert marked["state"] == "MIGRATION_STATE_FAILED" and "stopped during the cutover" in marked["error"], marked
        assert json.loads((journals / "local0.json").read_text()) == older
    finally:
        if source is not None:
            source.stop()
        dest.stop()


@contextlib.contextmanager
def dest_and_source(short_tmp: Path, tls_dir: Path, memory: str) -> Iterator[tuple[str, AgentProcess]]:
    """A real destination agent on loopback, then a source agent (memory source `memory`) that
    migrates to it; yields V's address and the source agent; both stopped at the end."""
    dest = AgentProcess("dest_agent.main", ["--config", str(dest_config(short_tmp, tls_dir, "127.0.0.1:0"))],
                        short_tmp, name="dest")
    source = None
    try:
        address = next(p for p in dest.wait_ready().split() if not p.startswith("unix:"))
        source = AgentProcess("source_agent.main", ["--config", str(source_config(short_tmp, tls_dir, memory))],
                              short_tmp, name="source")
        source.wait_ready()
        yield address, source
    finally:
        if source is not None:
            source.stop()
        dest.stop()


def test_migrations_leave_no_descriptors_behind(short_tmp, tls_dir) -> None:
    """Real agents over mutual TLS on loopback: the source agent's open descriptors are the same
    after each of three dry runs (its memory source, the channels and sockets are closed)."""
    memory = short_tmp / "memory.bin"
    memory.write_bytes(os.urandom(4 << 20) + bytes(12 << 20))
    with dest_and_source(short_tmp, tls_dir, f"file:{memory}") as (address, source):
        fds = []
        for _ in range(3):
            run = subprocess.run([sys.executable, "-m", "p2vctl.cli", "migrate", address, "--agent",
                                  str(short_tmp / "source.sock"), "--dry-run", "--json"],
                                 capture_output=True, text=True, cwd=REPO, timeout=120)
            assert run.returncode == 0, run.stdout + run.stderr
            time.sleep(0.5)  # the agent closes what the migration used after it reported the end
            fds.append(len(os.listdir(f"/proc/{source.proc.pid}/fd")))
        assert fds[0] == fds[1] == fds[2], fds


def test_a_migration_over_a_broken_mirror_is_refused_before_pre_copy(short_tmp, tls_dir) -> None:
    """Real agents over mutual TLS: the redundancy journal lists an md network leg whose array is not
    there (this host has no md at all): `p2vctl migrate` fails at once with the reason, before any
    page is sent and without reserving anything on V. The rig's whole-OS test does it with a leg
    md really failed."""
    from source_agent.redundancy.journal import Journal, default_path

    journal = Journal.create(default_path(short_tmp / "source-state"), "earlier")
    leg = journal.begin("md-leg", physical="sdb", virtual="/dev/nbd0", md="md127", leg="/dev/nbd0")
    journal.update(leg, state="done")
    with dest_and_source(short_tmp, tls_dir, "file:/dev/null") as (address, _):
        run = subprocess.run([sys.executable, "-m", "p2vctl.cli", "migrate", address, "--agent",
                              str(short_tmp / "source.sock"), "--json"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        final = json.loads(run.stdout.strip().splitlines()[-1])
        assert run.returncode != 0 and final["state"] == "MIGRATION_STATE_FAILED", run.stdout + run.stderr
        assert "cannot carry P's disk" in final["error"] and "md127 does not exist" in final["error"], final
        assert int(final["stats"].get("transferred", 0)) == 0, final  # refused before pre-copy
        assert not list((short_tmp / "dest-state").glob("migrations/*")), "V reserved a migration"
