"""A cutover whose helper went between its commit mark and COMMIT (dest_agent/cutover.py resolve,
source_agent/cutover.py vm_runs_after_commit): V holds the acknowledged image undecided, the waiting
VM keeps it loaded, and P's agent's word decides. V's answer binds P: once COMMIT had reached V, P
powers off whatever it meant; once V dropped the image, it never starts it.

The helper is P's real one on a playback snapshot, killed for real (SIGKILL, $P2V_FAULT) in a child
process; V is the real DestinationService over gRPC on loopback, its image receiver the real one;
the waiting VM is a recording stand-in (the VM's side runs in the rig)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.config import TlsConfig
from common.faults import FAULT_ENV
from dest_agent import restore_program
from dest_agent.cutover import (
    AS_JOURNALED,
    DROP,
    INTERRUPTED,
    NOTHING_HELD,
    START_VM,
    UNDECIDED_ERROR,
    VM_IS_P,
    VM_RUNS,
    resolve_verdict,
    restart_verdict,
    undecided,
)
from dest_agent.image_receiver import ImageReceiver, ReceiveResult
from dest_agent.waiting_vm import AdoptedVm, FeedClient
from p2v.v1 import common_pb2, destination_pb2
from source_agent import host_settings as hs
from source_agent.cutover import vm_runs_after_commit
from source_agent.migration import resolve_on_destination
from tests.cutover.imagegen import make_image
from tests.cutover.test_image_socket import MAX_PFN, TOKEN, PlaybackSnapshot, RecordingFeed, make_helper
from tests.memory.harness import destination

INSECURE = TlsConfig(insecure=True)


def test_verdict() -> None:
    def result(acked: bool, committed: bool = False, aborted: bool = False) -> ReceiveResult:
        return ReceiveResult("m", acked=acked, committed=committed, aborted_after_ack=aborted)

    undecided_image = result(True)
    assert resolve_verdict(undecided_image, False, False, source_committed=True) == START_VM
    assert resolve_verdict(undecided_image, False, False, source_committed=False) == DROP
    # COMMIT had reached V: the VM is P, also for an agent that meant to run on
    for committed in (True, False):
        assert resolve_verdict(result(True, committed=True), True, False, committed) == VM_RUNS
        assert resolve_verdict(undecided_image, True, False, committed) == VM_RUNS  # started on an earlier word
    # nothing held: never acknowledged, P said ABORT, or dropped since (an earlier word, a cancel)
    for committed in (True, False):
        assert resolve_verdict(None, False, False, committed) == NOTHING_HELD
        assert resolve_verdict(result(False), False, False, committed) == NOTHING_HELD
        assert resolve_verdict(result(True, aborted=True), False, False, committed) == NOTHING_HELD
        assert resolve_verdict(undecided_image, False, True, committed) == NOTHING_HELD


def test_restart_verdict() -> None:
    """What a restarted V makes of a journaled migration. Pure."""
    for finished, failed in ((False, False), (True, True), (True, False)):
        assert restart_verdict(finished, failed, "", go_marked=True, receipt_committed=False) == VM_IS_P
        assert restart_verdict(finished, failed, "", go_marked=False, receipt_committed=True) == VM_IS_P
    assert restart_verdict(False, False, "", False, False) == INTERRUPTED  # under way
    assert restart_verdict(True, True, f"{UNDECIDED_ERROR}: no COMMIT", False, False) == INTERRUPTED
    assert restart_verdict(True, True, "destination agent stopped", False, False) == AS_JOURNALED
    assert restart_verdict(True, False, "", False, False) == AS_JOURNALED  # completed, cancelled


def helper_killed_before_commit(tmp_path: Path, migration_id: str, endpoint: str, image: bytes,
                                store) -> tuple[list[dict], int]:
    """P's helper in a child, killed by its fault point between "committed" and COMMIT. Returns its
    outcome lines (what the agent reads) and its wait status."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only the helper runs here, then the process ends without cleanup
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.environ[FAULT_ENV] = "helper-killed-before-commit"
            helper, _ = make_helper(tmp_path, endpoint, PlaybackSnapshot(image), store, migration_id=migration_id)
            helper.run()
        finally:
            os._exit(70)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as out:
        lines = [json.loads(ln) for ln in out.read().decode().splitlines() if ln.startswith("{")]
    return lines, os.waitpid(pid, 0)[1]


async def undecided_cutover(tmp_path: Path, dest, vm: FeedClient | None = None) -> tuple[str, RecordingFeed]:
    """A migration on V whose image was acknowledged, then P's helper died before COMMIT. `vm`: a
    feed to a restore program (else a recording stand-in), recorded as V's desk records it."""
    await asyncio.to_thread(tmp_path.mkdir, parents=True, exist_ok=True)
    migration_id = (await dest.prepare(max_pfn=MAX_PFN)).migration_id
    record = dest.service.migrations[migration_id]
    desk = dest.service.cutover
    feed = RecordingFeed()
    feed.go_mark = record.go_mark_path
    if vm is not None:
        await asyncio.to_thread(vm.connect)
        AdoptedVm(f"p2vtest-vm-{migration_id}", vm, tmp_path / "vda.img").save(record.waiting_vm_path)
        feed = vm
    receiver = ImageReceiver(migration_id, TOKEN, record.store, feed, record.dir / "hibernation.img",
                             accept_timeout_s=30, io_timeout_s=30, commit_timeout_s=10, go_mark=record.go_mark_path,
                             ack_mark=record.ack_mark_path)
    st = desk.state(migration_id)
    st.receiver = receiver  # as announce() does once the waiting VM is ready
    st.receive = asyncio.create_task(desk._receive(record, st, receiver))
    image, _, _ = make_image(np.arange(100, 400, dtype=np.uint64), seed=7)
    host, port = receiver.endpoint
    said, status = await asyncio.to_thread(helper_killed_before_commit, tmp_path, migration_id, f"{host}:{port}",
                                           image, record.store)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert said[-1]["outcome"] == "committed"  # the agent's cue: P must not run on as it was
    await st.receive
    assert st.result is not None and undecided(st.result)
    assert record.ack_mark_path.exists()
    if vm is None:
        assert feed.events == ["begin", "loaded"]  # the VM holds the image: neither started nor dropped
    assert not dest.service.cutover.past_point_of_no_return(migration_id)
    return migration_id, feed


async def test_p_committed_v_starts_the_vm_and_its_answer_binds(tmp_path: Path) -> None:
    async with destination(tmp_path / "v") as dest:
        migration_id, feed = await undecided_cutover(tmp_path, dest)
        status = await dest.stub.Status(common_pb2.MigrationRef(migration_id=migration_id), timeout=10)
        assert "undecided" in status.error

        reply = await resolve_on_destination(dest.address, migration_id, INSECURE, committed=True)
        assert reply.vm_runs and "started the VM" in reply.detail
        assert feed.events == ["begin", "loaded", "go"]
        figures = json.loads((dest.service.migrations[migration_id].dir / "cutover.json").read_text())
        assert figures["committed"] and figures["resolved_by_source"]
        status = await dest.stub.Status(common_pb2.MigrationRef(migration_id=migration_id), timeout=10)
        assert status.state == common_pb2.MIGRATION_STATE_CUTOVER and status.point_of_no_return

        # an agent that says P runs on now (one that lost its note) is told to power off
        again = await resolve_on_destination(dest.address, migration_id, INSECURE, committed=False)
        assert again.vm_runs and feed.events.count("go") == 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dest.stub.Cancel(common_pb2.CancelRequest(migration_id=migration_id), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_p_runs_on_v_drops_the_image_and_never_starts_it(tmp_path: Path) -> None:
    async with destination(tmp_path / "v") as dest:
        migration_id, feed = await undecided_cutover(tmp_path, dest)

        reply = await resolve_on_destination(dest.address, migration_id, INSECURE, committed=False)
        assert not reply.vm_runs and "dropped" in reply.detail
        assert feed.events == ["begin", "loaded", "abort"]
        status = await dest.stub.Status(common_pb2.MigrationRef(migration_id=migration_id), timeout=10)
        assert status.state == common_pb2.MIGRATION_STATE_ACTIVE and not status.point_of_no_return

        late = await resolve_on_destination(dest.address, migration_id, INSECURE, committed=True)
        assert not late.vm_runs and "go" not in feed.events


async def test_the_agent_asks_v_and_keeps_to_the_helper_s_mark_when_v_cannot_answer(tmp_path: Path) -> None:
    """source_agent.cutover.vm_runs_after_commit, what both the live agent and the next one call."""
    async def ask(address: str, migration_id: str, committed: bool):
        return await resolve_on_destination(address, migration_id, INSECURE, committed, attempts=2, timeout_s=3)

    async with destination(tmp_path / "v") as dest:
        migration_id, feed = await undecided_cutover(tmp_path, dest)
        assert await vm_runs_after_commit(dest.address, migration_id, [], ask) is True
        assert feed.events[-1] == "go"

        # V does not know the migration (restarted, or another V): the mark stands, P powers off
        assert await vm_runs_after_commit(dest.address, "unknown-migration", [], ask) is True

        other, other_feed = await undecided_cutover(tmp_path / "b", dest)
        await dest.stub.Cancel(common_pb2.CancelRequest(migration_id=other, reason="operator"), timeout=10)
        assert await vm_runs_after_commit(dest.address, other, [], ask) is False  # dropped: P runs on
        assert "go" not in other_feed.events

    # V gone altogether
    assert await vm_runs_after_commit(dest.address, migration_id, [], ask) is True


async def test_v_restarted_without_go_lets_p_run_on(tmp_path: Path) -> None:
    """V's agent died after its ACK and before COMMIT (the waiting VM discarded the image when its
    feed closed). The next run of V's agent reloads the migration from its journal: it never told
    the VM GO, so it says P runs on — before, it did not know the migration and P powered off with
    nothing running anywhere."""
    async def ask(address: str, migration_id: str, committed: bool):
        return await resolve_on_destination(address, migration_id, INSECURE, committed, attempts=2, timeout_s=3)

    async with destination(tmp_path / "v") as dest:
        migration_id, feed = await undecided_cutover(tmp_path, dest)
        record = dest.service.migrations[migration_id]
        assert not record.go_mark_path.exists()
        async with destination(tmp_path / "v") as restarted:  # the same state dir, a new agent
            status = await restarted.stub.Status(common_pb2.MigrationRef(migration_id=migration_id), timeout=10)
            assert status.state == common_pb2.MIGRATION_STATE_FAILED and "restarted" in status.error
            reply = await resolve_on_destination(restarted.address, migration_id, INSECURE, committed=True)
            assert not reply.vm_runs and "P runs on" in reply.detail
            assert await vm_runs_after_commit(restarted.address, migration_id, [], ask) is False

            # its page store is not open: a clear refusal, not a crash; the same id is not reused
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in restarted.stub.HeldHashes(
                        destination_pb2.HeldHashesRequest(migration_id=migration_id), timeout=10):
                    pass
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "failed" in refused.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await restarted.stub.Prepare(destination_pb2.PrepareRequest(
                    migration_id=migration_id, source_host_id="test-source", memory_bytes=MAX_PFN * 4096,
                    page_size=4096, max_pfn=MAX_PFN), timeout=10)
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS

            # P's agent cancels it: the space goes, the journal stays
            assert record.image_path.exists()
            cancelled = await restarted.stub.Cancel(common_pb2.CancelRequest(migration_id=migration_id), timeout=10)
            assert cancelled.state == common_pb2.MIGRATION_STATE_CANCELLED
            assert not record.image_path.exists() and record.meta_path.exists()
        assert "go" not in feed.events


async def test_v_restarted_after_go_knows_the_vm_is_p(tmp_path: Path) -> None:
    """V's agent died after it told the VM GO: the next run finds the GO mark, answers that the VM
    is P, refuses to cancel it, and still serves the VM's agent's report (the redundancy to cancel)."""
    async with destination(tmp_path / "v") as dest:
        migration_id, feed = await undecided_cutover(tmp_path, dest)
        await dest.stub.ReportRedundancy(destination_pb2.RedundancyReport(migration_id=migration_id, entries=[
            destination_pb2.RedundancyEntry(id="bond0:ens4", kind="bond")]), timeout=10)
        assert (await resolve_on_destination(dest.address, migration_id, INSECURE, committed=True)).vm_runs
        assert feed.events[-1] == "go"  # and the mark was on disk before it (RecordingFeed checks)

        async with destination(tmp_path / "v") as restarted:
            reply = await resolve_on_destination(restarted.address, migration_id, INSECURE, committed=False)
            assert reply.vm_runs  # binds P: it powers off
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await restarted.stub.Cancel(common_pb2.CancelRequest(migration_id=migration_id), timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            resumed = await restarted.stub.Resumed(destination_pb2.ResumedRequest(migration_id=migration_id),
                                                   timeout=10)
            assert list(resumed.cancel_ids) == ["bond0:ens4"]
            done = await restarted.stub.Complete(destination_pb2.CompletionReport(
                migration_id=migration_id, cancelled=["bond0:ens4"]), timeout=10)
            assert done.state == common_pb2.MIGRATION_STATE_COMPLETED and done.point_of_no_return
        assert feed.events.count("go") == 1


async def test_v_restarted_discards_an_image_it_never_acknowledged(tmp_path: Path, monkeypatch) -> None:
    """V's agent died after the VM had loaded the image and before its ACK: P's helper got no ACK,
    never committed, and runs on. The VM kept the image (it cannot tell); the next run of V's agent
    finds no ACK mark, has the VM discard it, and tells P to run on."""
    from tests.cutover.test_restore_program import feed_vm

    (host, port), ioctls, vm_thread, holding = feed_vm(tmp_path / "vm", monkeypatch, connections=2)
    async with destination(tmp_path / "v") as dest:
        migration_id = (await dest.prepare(max_pfn=MAX_PFN)).migration_id
        record = dest.service.migrations[migration_id]
        record.set_state(common_pb2.MIGRATION_STATE_CUTOVER)
        feed = FeedClient(host, port, "tok")
        await asyncio.to_thread(feed.connect)
        AdoptedVm(f"p2vtest-vm-{migration_id}", feed, tmp_path / "vda.img").save(record.waiting_vm_path)
        image = os.urandom(30 * 4096)
        await asyncio.to_thread(lambda: (feed.begin(len(image)), feed.write(image), feed.finish()))
        feed.close()  # V's agent dies before it acknowledged anything
        async with destination(tmp_path / "v") as restarted:
            await restarted.service.start()
            await restarted.service._settled()
            reply = await resolve_on_destination(restarted.address, migration_id, INSECURE, committed=True)
            assert not reply.vm_runs and "P runs on" in reply.detail
    await asyncio.to_thread(vm_thread.join, 10)
    assert holding == [30, 0] and ioctls.calls == []  # kept across the lost feed, then discarded


async def test_v_restarted_keeps_a_vm_an_older_agent_committed(tmp_path: Path) -> None:
    """A migration whose VM an agent from before the GO mark started (its receipt says committed):
    the next run treats it as P's, not as an orphan to destroy."""
    async with destination(tmp_path / "v") as dest:
        migration_id = (await dest.prepare(max_pfn=MAX_PFN)).migration_id
        record = dest.service.migrations[migration_id]
        record.set_state(common_pb2.MIGRATION_STATE_CUTOVER)
        (record.dir / "cutover.json").write_text(json.dumps({"acked": True, "committed": True}))
        async with destination(tmp_path / "v") as restarted:
            assert restarted.service.migrations[migration_id].state == common_pb2.MIGRATION_STATE_CUTOVER
            assert restarted.service._orphans == []
            reply = await resolve_on_destination(restarted.address, migration_id, INSECURE, committed=False)
            assert reply.vm_runs


@pytest.mark.parametrize("p_word", ["p-is-off", "p-runs-on"])
async def test_v_restarted_after_ack_the_vm_kept_the_image_and_p_decides(tmp_path: Path, monkeypatch,
                                                                          p_word: str) -> None:
    """V's agent died between its ACK and COMMIT: P may be off already (its helper sent COMMIT into
    a dead socket and powered off) or about to run on. The waiting VM — the real restore program's
    loop, /dev/snapshot a file — keeps the loaded image when the feed drops; the next run of V's
    agent adopts it from what the first recorded (waiting-vm.json), and the cutover is undecided
    again: P's word (its agent, or the operator's p2vctl resolve) starts it or drops it."""
    from tests.cutover.test_restore_program import feed_vm

    (host, port), ioctls, vm_thread, holding = feed_vm(tmp_path / "vm", monkeypatch, connections=2)
    committed = p_word == "p-is-off"
    async with destination(tmp_path / "v") as dest:
        migration_id, feed = await undecided_cutover(tmp_path, dest, vm=FeedClient(host, port, "tok"))
        record = dest.service.migrations[migration_id]
        received = dest.service.cutover.state(migration_id).result
        feed.close()  # V's agent dies: its socket closes, neither GO nor ABORT was said
        async with destination(tmp_path / "v") as restarted:
            await restarted.service.start()
            await restarted.service._settled()
            status = await restarted.stub.Status(common_pb2.MigrationRef(migration_id=migration_id), timeout=10)
            assert status.state == common_pb2.MIGRATION_STATE_FAILED
            assert "undecided" in status.error and "still holds it" in status.error, status.error
            # the first run's figures of the receive, from its ACK mark
            assert status.stats.downtime_bytes == received.wire_bytes > 0
            assert (status.stats.cutover_pages, status.stats.skipped) == (received.image_pages,
                                                                           received.pages_from_store)
            reply = await resolve_on_destination(restarted.address, migration_id, INSECURE, committed=committed)
            assert reply.vm_runs is committed, reply.detail
            if committed:
                assert "started the VM" in reply.detail and record.go_mark_path.exists()
            else:
                assert "dropped" in reply.detail and not record.go_mark_path.exists()
    await asyncio.to_thread(vm_thread.join, 10)
    assert holding[0] > 0 and holding[1] == 0  # kept across the lost feed; then restored or discarded
    if committed:
        assert ioctls.calls == [restore_program.SNAPSHOT_FREEZE, restore_program.SNAPSHOT_ATOMIC_RESTORE]
    else:
        assert ioctls.calls == []


@pytest.mark.parametrize("p_word", ["p-is-off", "p-runs-on"])
async def test_v_restarted_while_p_s_os_waits_at_the_commit_gate(tmp_path: Path, monkeypatch, p_word: str) -> None:
    """V's agent died after the VM restored P's image ahead of P's COMMIT (the commit gate): the VM
    runs P's OS, stopped at the gate, and its restore program (the feed) is gone. The next run of
    V's agent finds the gate's record in the ACK mark, so the silent VM is not "maybe P, left to the
    operator" but an undecided cutover again: P's word writes the record into the ring (P is off:
    the OS goes on) or destroys the VM (P runs on) — never both copies on the network."""
    from common import commit_gate
    from dest_agent import vm_builder

    monkeypatch.setattr(vm_builder, "RING_DIR", tmp_path)
    destroyed: list[str] = []
    monkeypatch.setattr(vm_builder, "destroy", destroyed.append)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))  # bound, never listening: the feed's connect is refused at once
    committed = p_word == "p-is-off"
    async with destination(tmp_path / "v") as dest:
        migration_id = (await dest.prepare(max_pfn=MAX_PFN)).migration_id
        record = dest.service.migrations[migration_id]
        record.set_state(common_pb2.MIGRATION_STATE_CUTOVER)
        name = f"p2vtest-vm-{migration_id}"
        ring = tmp_path / f"{name}-feed"
        ring.write_bytes(b"\0" * 4096)
        AdoptedVm(name, FeedClient(*silent.getsockname(), "tok"), tmp_path / "vda.img").save(record.waiting_vm_path)
        gate = commit_gate.commit_record(TOKEN, migration_id)
        record.ack_mark_path.write_text(json.dumps({"migration": migration_id, "pages": 300, "gate": gate.hex(),
                                                    "figures": {"image_pages": 300}}))
        async with destination(tmp_path / "v") as restarted:
            await restarted.service.start()
            await restarted.service._settled()
            status = await restarted.stub.Status(common_pb2.MigrationRef(migration_id=migration_id), timeout=10)
            assert "undecided" in status.error and "commit gate" in status.error, status.error
            vm_side = ring.open("rb")  # what the VM sees (QEMU's mapping outlives the file's name)
            assert ring.read_bytes()[:32] != gate
            reply = await resolve_on_destination(restarted.address, migration_id, INSECURE, committed=committed)
            assert reply.vm_runs is committed, reply.detail
            assert (os.pread(vm_side.fileno(), 32, 0) == gate) is committed
            vm_side.close()
            if committed:
                assert record.go_mark_path.exists() and destroyed == []
                assert not ring.exists()  # written, then let go (QEMU keeps its mapping)
            else:
                assert destroyed == [name] and not record.go_mark_path.exists() and not ring.exists()
    silent.close()


def p2vctl(*argv: str) -> tuple[int, dict]:
    """p2vctl in a child process (its own event loop and stdout), JSON out."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "p2vctl.cli", *argv, "--json", "--insecure"], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    return res.returncode, json.loads(res.stdout.strip().splitlines()[-1])


async def test_operator_resolves_on_v_with_p2vctl(tmp_path: Path) -> None:
    """P's agent could not reach V: the operator, who sees P off, tells V (p2vctl resolve)."""
    async with destination(tmp_path / "v") as dest:
        migration_id, feed = await undecided_cutover(tmp_path, dest)
        # `p2vctl list` on V (its server has no Source service: p2vctl asks V's) names what to do
        code, listed = await asyncio.to_thread(p2vctl, "list", "--unfinished", "--agent", dest.address)
        assert code == 0, listed
        [held] = listed["migrations"]
        assert held["status"]["migration_id"] == migration_id and "undecided" in held["status"]["error"]
        assert f"p2vctl resolve {migration_id} --p-is-off" in held["attention"], held
        code, said = await asyncio.to_thread(p2vctl, "resolve", migration_id, "--p-is-off", "--agent", dest.address)
        assert code == 0 and said["vm_runs"] is True, said
        assert feed.events[-1] == "go"
        code, listed = await asyncio.to_thread(p2vctl, "list", "--agent", dest.address)
        [started] = listed["migrations"]
        assert started["attention"] == "" and started["status"]["point_of_no_return"] is True, started
        code, said = await asyncio.to_thread(p2vctl, "resolve", "no-such-migration", "--p-runs-on",
                                             "--agent", dest.address)
        assert code == 2 and said["code"] == "NOT_FOUND", said


async def test_next_agent_runs_p_on_when_v_dropped_the_committed_image(tmp_path: Path) -> None:
    """host_settings.recover_interrupted_cutover with V's answer: the helper's committed note makes
    the next agent power P off, unless V says it holds nothing (then P is put back, as before the
    mark)."""
    settings = hs.HostSettings(blocked=[], admin_up=[], bonds={}, image_size="")
    state = tmp_path / "state"
    powered: list[str] = []
    for vm_runs, expected in ((True, "powered"), (False, "repaired")):
        note = hs.PendingCutover(settings, "boot", "m1", "10.0.0.2:7470", committed=True)
        hs.write_pending(hs.pending_path(state), note)
        asked: list[str] = []

        async def answer(pending: hs.PendingCutover, vm_runs: bool = vm_runs, asked: list[str] = asked) -> bool:
            asked.append(pending.migration_id)
            return vm_runs

        done = await hs.recover_interrupted_cutover(
            state, None, boot_id="boot", proc=str(tmp_path / "noproc"), root=str(tmp_path / "net"),
            image_size_path=str(tmp_path / "image_size"), block_root=str(tmp_path / "block"),
            power_off=lambda: powered.append("off"), vm_runs=answer)
        assert asked == ["m1"]
        if expected == "powered":
            assert powered == ["off"] and "P powered off" in done[-1]
            assert hs.read_pending(hs.pending_path(state)) is not None  # kept until P is off for good
        else:
            assert powered == ["off"]  # not again
            assert "settings put back" in done[0] and hs.read_pending(hs.pending_path(state)) is None


@pytest.mark.parametrize("p_commits", ["within-the-wait", "after-the-stop"])
async def test_v_stopped_between_ack_and_commit_never_drops_the_image(tmp_path: Path, monkeypatch,
                                                                       p_commits: str) -> None:
    """V's agent is told to stop (SIGTERM: a package upgrade, `systemctl stop`) after its ACK and
    before P's COMMIT: P's helper may commit and power off at any moment. Within STOP_WAIT_S the
    cutover ends as usual (GO); later, the receive is abandoned as if the agent had died, and the
    waiting VM — the real restore program's loop — keeps the image for the next run to adopt and
    start on P's word. Before, the stop closed the migration and the VM discarded the image while P
    powered off: the OS ran nowhere. P's helper is the real one (in a thread), held at its
    before-commit point."""
    from dest_agent import cutover as desk_module
    from source_agent import cutover_helper
    from tests.cutover.test_restore_program import feed_vm

    within = p_commits == "within-the-wait"
    (host, port), ioctls, vm_thread, holding = feed_vm(tmp_path / "vm", monkeypatch, connections=1 if within else 2)
    at_commit, go_on = threading.Event(), threading.Event()
    fault_point = cutover_helper.fault_point

    def held_before_commit(point: str) -> None:
        if point == "before-commit":
            at_commit.set()
            go_on.wait(30)
        fault_point(point)

    monkeypatch.setattr(cutover_helper, "fault_point", held_before_commit)
    if not within:
        monkeypatch.setattr(desk_module, "STOP_WAIT_S", 0.3)
    async with destination(tmp_path / "v") as dest:
        migration_id = (await dest.prepare(max_pfn=MAX_PFN)).migration_id
        record = dest.service.migrations[migration_id]
        desk = dest.service.cutover
        vm = FeedClient(host, port, "tok")
        await asyncio.to_thread(vm.connect)
        AdoptedVm(f"p2vtest-vm-{migration_id}", vm, tmp_path / "vda.img").save(record.waiting_vm_path)
        receiver = ImageReceiver(migration_id, TOKEN, record.store, vm, record.dir / "hibernation.img",
                                 accept_timeout_s=30, io_timeout_s=30, commit_timeout_s=30,
                                 go_mark=record.go_mark_path, ack_mark=record.ack_mark_path)
        st = desk.state(migration_id)
        st.receiver = receiver
        st.receive = asyncio.create_task(desk._receive(record, st, receiver))
        image, _, _ = make_image(np.arange(100, 400, dtype=np.uint64), seed=7)
        snap = PlaybackSnapshot(image)
        ep_host, ep_port = receiver.endpoint
        helper, _ = make_helper(tmp_path, f"{ep_host}:{ep_port}", snap, record.store, migration_id=migration_id)
        p_side = asyncio.create_task(asyncio.to_thread(helper.run))
        assert await asyncio.to_thread(at_commit.wait, 30)
        assert record.ack_mark_path.exists() and not record.go_mark_path.exists()

        if within:
            asyncio.get_running_loop().call_later(0.3, go_on.set)
        await dest.service.shutdown()
        go_on.set()
        assert await asyncio.wait_for(p_side, 30) == "powered-off"
        assert snap.calls[-1] == "power_off"  # P is off: the image is all there is of the OS
        if within:
            assert record.go_mark_path.exists() and desk.past_point_of_no_return(migration_id)
        else:
            assert not record.go_mark_path.exists()
            assert record.state == common_pb2.MIGRATION_STATE_FAILED and UNDECIDED_ERROR in record.error
            vm.close()  # what the agent's exit does to its feed socket

        async with destination(tmp_path / "v") as restarted:
            await restarted.service.start()
            await restarted.service._settled()
            reply = await resolve_on_destination(restarted.address, migration_id, INSECURE, committed=True)
            assert reply.vm_runs, reply.detail
    await asyncio.to_thread(vm_thread.join, 10)
    restores = [restore_program.SNAPSHOT_FREEZE, restore_program.SNAPSHOT_ATOMIC_RESTORE]
    assert ioctls.calls[-2:] == restores and ioctls.calls.count(restore_program.SNAPSHOT_ATOMIC_RESTORE) == 1
    if within:  # restored on the first run's GO
        assert holding == [0]
    else:  # kept across the lost feed, restored on the next run's
        assert len(holding) == 2 and holding[0] > 0 and holding[1] == 0


async def test_v_stopped_before_p_s_helper_connects_closes_the_image_socket(tmp_path: Path) -> None:
    """Told to stop while its image socket waits for P's helper: the socket closes at once (the
    helper cannot start a cutover into a stopping agent: P runs on), the migration reads failed."""
    async with destination(tmp_path / "v") as dest:
        migration_id = (await dest.prepare(max_pfn=MAX_PFN)).migration_id
        record = dest.service.migrations[migration_id]
        desk = dest.service.cutover
        receiver = ImageReceiver(migration_id, TOKEN, record.store, RecordingFeed(), record.dir / "hibernation.img",
                                 accept_timeout_s=120, go_mark=record.go_mark_path, ack_mark=record.ack_mark_path)
        st = desk.state(migration_id)
        st.receiver = receiver
        st.receive = asyncio.create_task(desk._receive(record, st, receiver))
        endpoint = receiver.endpoint
        socket.create_connection(endpoint, timeout=2).close()  # open until the stop
        await dest.service.shutdown()
        assert st.receive.done() and not st.result.acked
        assert record.state == common_pb2.MIGRATION_STATE_FAILED and "stopped" in record.error
        with pytest.raises(OSError):
            socket.create_connection(endpoint, timeout=2).close()
