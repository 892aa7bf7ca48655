"""Past the point of no return P never runs on (source_agent/cutover.py): the helper tells the agent
"committed" right before COMMIT leaves; if P still runs after that (the helper died, or the kernel's
power-off failed), the agent powers P off itself, and leaves the traffic block in place if it cannot.

The verdict is pure. The power-off is the real reboot(2): in a PID namespace of its own it ends
that namespace (its init is killed with SIGINT, pid_namespaces(7)), not this host; without
CAP_SYS_BOOT the kernel refuses it, and the agent says so."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from source_agent.cutover import helper_verdict
from tests.agents import REPO

AGENT_AFTER_COMMIT = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from source_agent.cutover import PastPointOfNoReturn, power_off_after_commit
print("running", flush=True)
try:
    power_off_after_commit()
except PastPointOfNoReturn as exc:
    print("refused:", exc, flush=True)
    sys.exit(3)
print("still running", flush=True)
"""


def test_verdict() -> None:
    assert helper_verdict({"outcome": "resumed"}, rehearse=False) == "resumed"
    assert helper_verdict({"outcome": "committed"}, rehearse=False) == "power-off"
    assert helper_verdict({"outcome": "committed"}, rehearse=True) == "power-off"
    assert helper_verdict({"outcome": "rehearsed"}, rehearse=True) == "rehearsed"
    assert helper_verdict({"outcome": "rehearsed"}, rehearse=False) == "aborted"  # not asked for: P runs on
    assert helper_verdict({"outcome": "aborted", "reason": "V refused"}, rehearse=False) == "aborted"
    assert helper_verdict({}, rehearse=False) == "aborted"


def needs_root_tools(*tools: str) -> None:
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in tools):
        pytest.skip(f"needs root and {', '.join(tools)}")


def test_agent_powers_p_off_after_commit() -> None:
    """The real reboot(RB_POWER_OFF), confined to a PID namespace: it ends the namespace at once."""
    needs_root_tools("unshare")
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", AGENT_AFTER_COMMIT],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "running", res
    assert res.returncode in (-signal.SIGINT, 128 + signal.SIGINT), res


def test_agent_that_cannot_power_off_says_so() -> None:
    needs_root_tools("setpriv")
    res = subprocess.run(["setpriv", "--bounding-set=-sys_boot", "--inh-caps=-sys_boot", sys.executable, "-c",
                          AGENT_AFTER_COMMIT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res
    assert "refused: V runs the OS now" in res.stdout and "power it off by hand" in res.stdout, res


async def test_v_refuses_to_cancel_a_migration_past_its_point_of_no_return(tmp_path) -> None:
    """Cancel is what P's agent says when P runs on; once P committed, the VM is P, and an agent
    that says otherwise (one in the VM that found a note from before the snapshot) is refused: the
    migration stays as it is. Before that point, Cancel cancels. The real DestinationService over
    gRPC on loopback; the commit is marked as V's image receiver marks it."""
    import grpc

    from p2v.v1 import common_pb2
    from tests.memory.harness import destination

    async with destination(tmp_path) as dest:
        committed = (await dest.prepare(max_pfn=1024)).migration_id
        dest.service.cutover.state(committed).point_of_no_return = True  # as after COMMIT (_receive)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dest.stub.Cancel(common_pb2.CancelRequest(migration_id=committed, reason="P runs on"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "point of no return" in refused.value.details()
        status = await dest.stub.Status(common_pb2.MigrationRef(migration_id=committed), timeout=10)
        assert status.state != common_pb2.MIGRATION_STATE_CANCELLED
        assert dest.service.migrations[committed].store is not None  # its pages are kept

        before = (await dest.prepare(max_pfn=1024)).migration_id
        reply = await dest.stub.Cancel(common_pb2.CancelRequest(migration_id=before, reason="P runs on"), timeout=10)
        assert reply.state == common_pb2.MIGRATION_STATE_CANCELLED
