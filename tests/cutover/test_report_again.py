"""The OS resumed in the VM, but its agent died (or gave up while V's agent was down) before V heard
of it: the source agent started next in the VM finds the journal that says so and reports again
(source_agent/migration.py reporting_again, service start_recovery). Before, V never learnt that the
VM is P and P's redundancy was never cancelled.

V is the real DestinationService over gRPC on loopback; the agent in the VM is the real
SourceService; the redundancy journal holds only entries whose cancellation changes nothing on this
host (one the dead agent had cancelled, and the virtual NIC's place in an administrator's bond)."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import pytest

from common.atomicfile import write_json_atomic
from common.config import SourceAgentSection, SourceConfig, TlsConfig
from common.rpc import AgentServer
from dest_agent.service import DestinationService
from p2v.v1 import common_pb2, destination_pb2, source_pb2, source_pb2_grpc
from source_agent.cutover import split_cancel_ids
from source_agent.migration_journal import unreported_resumes
from source_agent.redundancy.journal import Entry, Journal, default_path
from source_agent.service import SourceService
from tests.agents import REPO
from tests.memory.harness import destination

FIGURES = {"frozen_at": 100.0, "resumed_at": 103.5, "unfrozen_at": 104.25, "resume_steps": ["adopt-nic: ok"]}


def test_split_cancel_ids() -> None:
    entries = [Entry("a", "bond", state="cancelled"), Entry("b", "nbd", state="done"), Entry("c", "md-leg")]
    assert split_cancel_ids(entries, ["a", "b", "c", "x"]) == (["b", "c", "x"], ["a"])
    assert split_cancel_ids([], ["a"]) == (["a"], [])


def vm_state(state_dir: Path, destination_address: str, remote_id: str, **journal) -> Path:
    """What a dead agent in the VM left: its migration journal (resumed, V not told) and its
    redundancy journal, the bond cancelled already, the placeholder not yet."""
    redundancy = Journal(default_path(state_dir), "m1", [
        Entry("p2v-m1-001-bond", "bond", physical="ens4", state="cancelled"),
        Entry("p2v-m1-002-bond-slave-placeholder", "bond-slave-placeholder", state="done",
              detail={"bond": "bond0"}),
    ])
    redundancy.save()
    path = state_dir / "migrations" / "m1local.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"id": "m1local", "destination": destination_address, "state": "MIGRATION_STATE_FAILED",
                             "error": "reporting the resume to V: no answer", "updated": 1.0, "remote_id": remote_id,
                             "resumed": True, "figures": FIGURES, "started_wall": 50.0, "cutover_started": 90.0,
                             "stats": {"dirty_sync_count": 5, "precopy_bytes": "113246208", "transferred": "113246208"},
                             **journal})
    return path


def vm_agent(state_dir: Path, monkeypatch) -> tuple[SourceService, list[str]]:
    unloads: list[str] = []
    monkeypatch.setattr(SourceService, "_unload_soon", staticmethod(lambda *_: unloads.append("unload")))
    config = SourceConfig(agent=SourceAgentSection(state_dir=str(state_dir)), tls=TlsConfig(insecure=True))
    return SourceService(config, "test-source"), unloads


async def test_the_next_agent_in_the_vm_reports_the_resume_and_cancels_the_rest(tmp_path: Path, monkeypatch) -> None:
    async with destination(tmp_path / "v") as dest:
        remote_id = (await dest.prepare(max_pfn=8192)).migration_id
        await dest.stub.ReportRedundancy(destination_pb2.RedundancyReport(migration_id=remote_id, entries=[
            destination_pb2.RedundancyEntry(id="p2v-m1-001-bond", kind="bond"),
            destination_pb2.RedundancyEntry(id="p2v-m1-002-bond-slave-placeholder", kind="bond-slave-placeholder"),
        ]), timeout=10)
        state_dir = tmp_path / "p"
        path = vm_state(state_dir, dest.address, remote_id)
        # an older migration V was told of, and a rehearsal, are left alone
        write_json_atomic(state_dir / "migrations" / "old.json", {
            "id": "old", "destination": dest.address, "remote_id": "x", "resumed": True, "completed": True})
        write_json_atomic(state_dir / "migrations" / "rehearsal.json", {
            "id": "rehearsal", "destination": dest.address, "remote_id": "y", "rehearsed": True})
        assert [j["id"] for j in unreported_resumes(str(state_dir))] == ["m1local"]

        service, unloads = vm_agent(state_dir, monkeypatch)
        service.start_recovery()
        said = await asyncio.wait_for(service.recovery, 30)
        assert said == ["migration m1local: reporting its resume to V again"]
        migration = service.migrations["m1local"]
        await asyncio.wait_for(migration.task, 60)

        status = migration.feed.status
        assert status.state == common_pb2.MIGRATION_STATE_COMPLETED, status.error
        assert status.point_of_no_return and status.stats.downtime_ms == 4250
        assert status.stats.dirty_sync_count == 5 and status.stats.precopy_bytes == 113246208  # the dead agent's
        assert "cancelled 2, failed 0" in status.progress.detail
        assert unloads == ["unload"]
        journal = json.loads(path.read_text())
        assert journal["completed"] and journal["state"] == "MIGRATION_STATE_COMPLETED"
        assert [e.state for e in Journal.load(default_path(state_dir)).entries] == ["cancelled", "cancelled"]

        on_v = await dest.stub.Status(common_pb2.MigrationRef(migration_id=remote_id), timeout=10)
        assert on_v.state == common_pb2.MIGRATION_STATE_COMPLETED and on_v.point_of_no_return
        figures = json.loads((dest.service.migrations[remote_id].dir / "cutover.json").read_text())
        assert figures["resumed"]["unfrozen_at"] == 104.25

        # the agent after that one has nothing to report
        assert unreported_resumes(str(state_dir)) == []


async def test_a_refusal_by_v_keeps_the_journal_for_the_next_agent(tmp_path: Path, monkeypatch) -> None:
    async with destination(tmp_path / "v") as dest:
        state_dir = tmp_path / "p"
        path = vm_state(state_dir, dest.address, "unknown-to-v")
        service, unloads = vm_agent(state_dir, monkeypatch)
        service.start_recovery()
        await asyncio.wait_for(service.recovery, 30)
        migration = service.migrations["m1local"]
        await asyncio.wait_for(migration.task, 60)
        status = migration.feed.status
        assert status.state == common_pb2.MIGRATION_STATE_FAILED
        assert "V refused: NOT_FOUND" in status.error and "report again" in status.error
        assert unloads == []
        journal = json.loads(path.read_text())
        assert journal["resumed"] and not journal.get("completed")
        assert [j["id"] for j in unreported_resumes(str(state_dir))] == ["m1local"]
        # nothing was cancelled without V's word
        assert [e.state for e in Journal.load(default_path(state_dir)).entries] == ["cancelled", "done"]


@pytest.mark.parametrize("broken", ["not json", "[]"])
def test_unreadable_journals_are_skipped(tmp_path: Path, broken: str) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "bad.json").write_text(broken)
    assert unreported_resumes(str(tmp_path)) == []


class HeldV(DestinationService):
    """V whose answer to Resumed waits until `gate` opens: the first agent in the VM is still asking
    when it dies."""

    gate: asyncio.Event

    async def Resumed(self, request, context):
        await self.gate.wait()
        return await super().Resumed(request, context)


async def serve_vm_agent(state_dir: Path, sock: Path, monkeypatch) -> tuple[AgentServer, SourceService]:
    service, _ = vm_agent(state_dir, monkeypatch)
    server = AgentServer("p2v-source")
    source_pb2_grpc.add_SourceServicer_to_server(service, server.server)
    server.listen_unix(str(sock))
    await server.start([source_pb2.DESCRIPTOR.services_by_name["Source"].full_name])
    service.start_recovery()
    return server, service


async def test_p2vctl_follows_the_move_across_a_restart_of_the_agent_in_the_vm(tmp_path: Path, monkeypatch) -> None:
    """p2vctl (a real process, on the agent's unix socket) follows the migration; the agent dies; the
    next one serves the same migration again; p2vctl follows it to the end and exits 0."""
    HeldV.gate = asyncio.Event()
    sock = Path(tempfile.mkdtemp(prefix="p2vt-")) / "source.sock"  # short: unix socket paths
    async with destination(tmp_path / "v", service_cls=HeldV) as dest:
        remote_id = (await dest.prepare(max_pfn=8192)).migration_id
        await dest.stub.ReportRedundancy(destination_pb2.RedundancyReport(migration_id=remote_id, entries=[
            destination_pb2.RedundancyEntry(id="p2v-m1-001-bond", kind="bond")]), timeout=10)
        state_dir = tmp_path / "p"
        vm_state(state_dir, dest.address, remote_id)
        server, service = await serve_vm_agent(state_dir, sock, monkeypatch)
        ctl = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "p2vctl.cli", "watch", "m1local", "--agent", str(sock), "--json",
            "--reattach-timeout", "60", cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            first = json.loads(await asyncio.wait_for(ctl.stdout.readline(), 30))
            assert first["migration_id"] == "m1local" and first["state"] == "MIGRATION_STATE_CUTOVER"
            await service.shutdown()  # the agent in the VM goes, still asking V
            await server.server.stop(None)
            await asyncio.sleep(1)
            HeldV.gate.set()
            server, service = await serve_vm_agent(state_dir, sock, monkeypatch)  # the next one
            out, err = await asyncio.wait_for(ctl.communicate(), 60)
        finally:
            if ctl.returncode is None:
                ctl.kill()
            await service.shutdown()
            await server.server.stop(None)
        assert ctl.returncode == 0, err.decode()
        assert "lost the agent" in err.decode() and "follow migration m1local again" in err.decode()
        last = json.loads(out.decode().strip().splitlines()[-1])
        assert last["state"] == "MIGRATION_STATE_COMPLETED" and last["migration_id"] == "m1local"
        on_v = await dest.stub.Status(common_pb2.MigrationRef(migration_id=remote_id), timeout=10)
        assert on_v.state == common_pb2.MIGRATION_STATE_COMPLETED


async def test_p2vctl_says_so_when_the_next_agent_does_not_know_the_migration(tmp_path: Path, monkeypatch) -> None:
    HeldV.gate = asyncio.Event()
    sock = Path(tempfile.mkdtemp(prefix="p2vt-")) / "source.sock"
    async with destination(tmp_path / "v", service_cls=HeldV) as dest:
        remote_id = (await dest.prepare(max_pfn=8192)).migration_id
        state_dir = tmp_path / "p"
        path = vm_state(state_dir, dest.address, remote_id)
        server, service = await serve_vm_agent(state_dir, sock, monkeypatch)
        ctl = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "p2vctl.cli", "watch", "m1local", "--agent", str(sock),
            "--reattach-timeout", "60", cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await asyncio.sleep(3)  # p2vctl follows
            await service.shutdown()
            await server.server.stop(None)
            path.unlink()  # the next agent finds nothing to serve again
            server, service = await serve_vm_agent(state_dir, sock, monkeypatch)
            out, err = await asyncio.wait_for(ctl.communicate(), 60)
        finally:
            if ctl.returncode is None:
                ctl.kill()
            HeldV.gate.set()
            await service.shutdown()
            await server.server.stop(None)
        assert ctl.returncode == 1, out.decode() + err.decode()
        assert "came back without migration m1local" in err.decode(), err.decode()
