"""`p2vctl list`, `rollback` and `watch` against the real source agent, on its unix socket, after a
restart of the agent: what it knows then comes from the journals an earlier run left.

Before, an agent started afresh knew no migration: `rollback` answered "no migration has been
started" (and its code imported a function that did not exist), and nothing listed the migrations
the operator had to see to (an OS resumed in the VM that V was never told of)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common.atomicfile import write_json_atomic
from common.config import SourceAgentSection, SourceConfig, TlsConfig
from common.rpc import AgentServer
from p2v.v1 import common_pb2, source_pb2, source_pb2_grpc
from source_agent.migration_journal import REPORT_AGAIN_ADVICE, attention, journaled_summary
from source_agent.redundancy.journal import Entry, Journal, default_path
from source_agent.service import SourceService
from tests.agents import REPO

FAILED, COMPLETED = "MIGRATION_STATE_FAILED", "MIGRATION_STATE_COMPLETED"


def journal(state_dir: Path, migration_id: str, state: str, started: float, **extra) -> Path:
    path = state_dir / "migrations" / f"{migration_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"id": migration_id, "destination": "v.example:50051", "state": state, "error": "",
                             "started_wall": started, "updated": started + 60, **extra})
    return path


# -- pure -------------------------------------------------------------------------------------------
def test_an_unfinished_journal_reads_interrupted() -> None:
    s = journaled_summary({"id": "a", "state": "MIGRATION_STATE_ACTIVE", "started_wall": 10.5, "updated": 20})
    assert s.status.state == common_pb2.MIGRATION_STATE_FAILED and not s.live
    assert "interrupted" in s.status.error and "(active)" in s.status.error and "P ran on" in s.status.error
    assert (s.started_ms, s.updated_ms, s.attention) == (10500, 20000, "")


def test_a_resume_v_never_heard_of_needs_the_operator() -> None:
    gave_up = {"id": "b", "state": FAILED, "resumed": True}
    assert attention(gave_up) == REPORT_AGAIN_ADVICE
    assert attention({**gave_up, "state": "MIGRATION_STATE_CUTOVER"}) == ""  # an agent is reporting now
    assert attention({**gave_up, "completed": True}) == ""
    reported = journaled_summary({"id": "d", "state": COMPLETED, "resumed": True, "completed": True,
                                  "figures": {"frozen_at": 100.0, "unfrozen_at": 104.25},
                                  "stats": {"dirty_sync_count": 5, "precopy_bytes": "113246208", "junk": 1}})
    assert reported.status.stats.downtime_ms == 4250 and reported.status.stats.dirty_sync_count == 5
    assert reported.status.stats.precopy_bytes == 113246208 and reported.attention == ""
    died = journaled_summary({"id": "b", "state": "MIGRATION_STATE_CUTOVER", "resumed": True})
    assert died.attention == REPORT_AGAIN_ADVICE and died.status.point_of_no_return
    assert "P ran on" not in died.status.error
    assert journaled_summary({"id": "c", "state": "garbage"}).status.state == common_pb2.MIGRATION_STATE_FAILED


# -- the real agent, a real p2vctl ------------------------------------------------------------------
def p2vctl(sock: Path, *argv: str) -> tuple[int, dict, str]:
    res = subprocess.run([sys.executable, "-m", "p2vctl.cli", *argv, "--agent", str(sock), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = res.stdout.strip().splitlines()
    return res.returncode, json.loads(lines[-1]) if lines else {}, res.stderr


async def serve(state_dir: Path) -> tuple[AgentServer, SourceService, Path]:
    sock = Path(tempfile.mkdtemp(prefix="p2vt-")) / "source.sock"  # short: unix socket paths
    config = SourceConfig(agent=SourceAgentSection(state_dir=str(state_dir)), tls=TlsConfig(insecure=True))
    service = SourceService(config, "test-source")
    server = AgentServer("p2v-source")
    source_pb2_grpc.add_SourceServicer_to_server(service, server.server)
    server.listen_unix(str(sock))
    await server.start([source_pb2.DESCRIPTOR.services_by_name["Source"].full_name])
    return server, service, sock


async def test_a_fresh_agent_lists_and_rolls_back_from_the_journals(tmp_path: Path) -> None:
    state_dir = tmp_path / "p"
    journal(state_dir, "zz-first", COMPLETED, started=1000.0)
    journal(state_dir, "aa-second", "MIGRATION_STATE_ACTIVE", started=2000.0)  # its agent died in pre-copy
    # P's redundancy: an entry whose undo changes nothing here, and one whose undo fails (no device)
    redundancy = Journal(default_path(state_dir), "aa-second", [
        Entry("p2v-aa-001-bond-slave-placeholder", "bond-slave-placeholder", state="done", detail={"bond": "bond0"}),
        Entry("p2v-aa-002-nbd", "nbd", state="done", detail={}),
    ])
    redundancy.save()
    server, service, sock = await serve(state_dir)
    try:
        code, listed, err = await asyncio.to_thread(p2vctl, sock, "list")
        assert code == 0, err
        rows = listed["migrations"]
        assert [r["status"]["migration_id"] for r in rows] == ["zz-first", "aa-second"]  # by start time
        assert rows[0]["status"]["state"] == COMPLETED and rows[0]["live"] is False
        assert rows[1]["status"]["state"] == FAILED and "interrupted" in rows[1]["status"]["error"]
        assert rows[1]["started_ms"] == "2000000" and not any(r["attention"] for r in rows)
        code, unfinished, _ = await asyncio.to_thread(p2vctl, sock, "list", "--unfinished")
        assert code == 0 and unfinished["migrations"] == []
        # watch: a migration only journaled ends at once with its journal's last word (p2vctl that
        # re-attaches after the agent's restart hears why, not just that it is gone)
        code, watched, err = await asyncio.to_thread(p2vctl, sock, "watch", "aa-second")
        assert code == 1 and watched["state"] == FAILED and "interrupted" in watched["error"], (watched, err)
        code, watched, _ = await asyncio.to_thread(p2vctl, sock, "watch", "zz-first")
        assert code == 0 and watched["state"] == COMPLETED
        code, watched, _ = await asyncio.to_thread(p2vctl, sock, "watch")  # no id: the last one started
        assert code == 1 and watched["migration_id"] == "aa-second"
        code, watched, _ = await asyncio.to_thread(p2vctl, sock, "watch", "never-was")
        assert code == 2 and watched["code"] == "NOT_FOUND"

        # rollback with no migration in the agent's memory: from the journal; what fails stays, said
        code, said, err = await asyncio.to_thread(p2vctl, sock, "rollback")
        assert code == 1, err
        assert said["migration_id"] == "aa-second" and said["undone"] == ["p2v-aa-001-bond-slave-placeholder"]
        assert len(said["failed"]) == 1 and said["failed"][0].startswith("p2v-aa-002-nbd: KeyError")
        states = {e.id: e.state for e in Journal.load(default_path(state_dir)).entries}
        assert states == {"p2v-aa-001-bond-slave-placeholder": "undone", "p2v-aa-002-nbd": "done"}
        code, listed, _ = await asyncio.to_thread(p2vctl, sock, "list")
        assert [r["status"]["state"] for r in listed["migrations"]] == [COMPLETED, "MIGRATION_STATE_ROLLED_BACK"]

        code, said, _ = await asyncio.to_thread(p2vctl, sock, "rollback", "no-such-migration")
        assert code == 2 and said["code"] == "NOT_FOUND", said
        assert Journal.load(default_path(state_dir)).live()[0].id == "p2v-aa-002-nbd"  # changed nothing
    finally:
        await service.shutdown()
        await server.server.stop(None)


async def test_in_the_vm_before_v_was_told_rollback_is_refused_and_list_says_what_to_do(tmp_path: Path) -> None:
    state_dir = tmp_path / "vm"
    journal(state_dir, "moved", FAILED, started=3000.0, resumed=True, remote_id="r1",
            error="reporting the resume to V: no answer")
    Journal(default_path(state_dir), "moved", [
        Entry("p2v-mv-001-bond-slave-placeholder", "bond-slave-placeholder", state="done", detail={"bond": "bond0"}),
    ]).save()
    server, service, sock = await serve(state_dir)  # no recovery started: nothing reports again here
    try:
        code, listed, err = await asyncio.to_thread(p2vctl, sock, "list", "--unfinished")
        assert code == 0, err
        [moved] = listed["migrations"]
        assert moved["attention"] == REPORT_AGAIN_ADVICE and moved["status"]["point_of_no_return"] is True
        code, said, err = await asyncio.to_thread(p2vctl, sock, "rollback")
        assert code == 1 and said["code"] == "FAILED_PRECONDITION", said
        assert "moved into the VM" in said["error"] and "restart the source agent" in said["error"]
        assert Journal.load(default_path(state_dir)).live()[0].state == "done"  # nothing undone
    finally:
        await service.shutdown()
        await server.server.stop(None)
