"""V gives up a migration whose source fell silent before the point of no return
(dest_agent.source_lease): the verdict, then the real service over a real gRPC socket (a silent
migration is failed, a talking one kept, Status does not count as the source speaking), then the
real libvirtd (the silent migration's waiting VM is destroyed; a VM past the point of no return is
P and stays)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from common.pagecodec import encode_batch
from dest_agent.source_lease import abandon_reason, watch_period_s
from p2v.v1 import common_pb2, destination_pb2
from tests.memory.harness import destination

BEFORE_PONR = dict(finished=False, past_point_of_no_return=False, receiving=False)


def test_abandon_only_a_silent_unfinished_migration_before_the_point_of_no_return() -> None:
    reason = abandon_reason(901, 900, **BEFORE_PONR)
    assert "901 s" in reason and "source_silence_s" in reason and "waiting VM" in reason
    assert abandon_reason(899, 900, **BEFORE_PONR) == ""  # still within the lease
    assert abandon_reason(10_000, 0, **BEFORE_PONR) == ""  # 0 = never
    assert abandon_reason(10_000, 900, **{**BEFORE_PONR, "past_point_of_no_return": True}) == ""  # the VM is P
    assert abandon_reason(10_000, 900, **{**BEFORE_PONR, "receiving": True}) == ""  # P's helper streams
    assert abandon_reason(10_000, 900, **{**BEFORE_PONR, "finished": True}) == ""


def test_watch_period_is_a_quarter_lease_within_bounds() -> None:
    assert watch_period_s(900) == 30.0
    assert watch_period_s(8) == 2.0
    assert watch_period_s(1) == 0.5


async def state_of(stub, migration_id: str) -> common_pb2.MigrationStatus:
    return await stub.Status(common_pb2.MigrationRef(migration_id=migration_id), timeout=5)


async def test_a_silent_source_loses_its_migration_a_talking_one_keeps_it(tmp_path: Path) -> None:
    async with destination(tmp_path / "v") as d:
        d.service.config.limits.source_silence_s = 1
        await d.service.start()
        silent = (await d.prepare(max_pfn=1024)).migration_id
        talking = (await d.prepare(max_pfn=1024)).migration_id
        image = d.service.migrations[silent].image_path
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await d.stub.ReportRedundancy(destination_pb2.RedundancyReport(migration_id=talking), timeout=5)
            if (await state_of(d.stub, silent)).state == common_pb2.MIGRATION_STATE_FAILED:
                break  # Status every 0.2 s: it must not count as the source speaking
            await asyncio.sleep(0.2)
        failed = await state_of(d.stub, silent)
        assert failed.state == common_pb2.MIGRATION_STATE_FAILED, failed
        assert "said nothing" in failed.error and "source_silence_s" in failed.error
        for _ in range(8):  # longer than the lease: the one that talks is still on
            await d.stub.ReportRedundancy(destination_pb2.RedundancyReport(migration_id=talking), timeout=5)
            await asyncio.sleep(0.2)
        assert (await state_of(d.stub, talking)).state == common_pb2.MIGRATION_STATE_ACTIVE
        # a source that comes back is told why, and nothing is written
        pages = np.full((1, 4096), 7, dtype=np.uint8)
        batch = encode_batch(np.array([3], dtype=np.uint64), pages, migration_id=silent, stream_id=0, seq=1,
                             round=1, batch_id=1, zstd_level=None)
        acks = [ack async for ack in d.stub.PushPages(iter([batch]))]
        assert acks[0].status == destination_pb2.ACK_STATUS_REJECTED and "said nothing" in acks[0].error
        assert d.service.migrations[silent].counters.pages == 0
        assert image.exists()  # the copy stays until P's rollback (a cancel) frees it
        cancel = await d.stub.Cancel(common_pb2.CancelRequest(migration_id=silent, reason="rollback"), timeout=5)
        assert cancel.state == common_pb2.MIGRATION_STATE_CANCELLED and not image.exists()


@pytest.mark.rig
async def test_a_silent_source_loses_its_waiting_vm_the_vm_that_is_p_stays(tmp_path: Path) -> None:
    """Through the real libvirtd: tiny TCG domains named as V names its waiting VMs stand for them
    (a real waiting VM needs P's kernel; what is under test is the lease and the destroy)."""
    from tests.conftest import rig_unavailable_reason

    reason = rig_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import libvirt

    from dest_agent.waiting_vm import SourceFacts, WaitingVm
    from rig import libvirtd
    from rig.destination import VM_PREFIX
    from tests.cutover.test_dest_restart_libvirt import tiny_domain_xml

    await asyncio.to_thread(libvirtd.ensure_running)
    tag = uuid.uuid4().hex[:8]
    async with destination(tmp_path / "v") as d:
        config = d.service.config
        config.vm.enabled, config.vm.name_prefix = True, VM_PREFIX
        config.vm.image_address, config.vm.feed_vm_ip = "127.0.0.1", "127.0.0.2/8"
        ids = {}
        for role in ("silent", "moved"):
            reply = await d.stub.Prepare(destination_pb2.PrepareRequest(
                source_host_id="test-source", memory_bytes=4 << 20, page_size=4096, max_pfn=1024,
                migration_id=f"{role}-{tag}"))
            ids[role] = reply.migration_id
        conn = libvirt.open("qemu:///system")
        vms = {}
        try:
            for role, migration_id in ids.items():
                vm = WaitingVm(config.vm, migration_id, SourceFacts(4 << 20, "r", "v", [], []), tmp_path / "vm")
                vm.work_dir.mkdir(parents=True, exist_ok=True)
                vm.disk_path.write_bytes(b"")
                conn.createXML(tiny_domain_xml(vm.name), 0)
                vm.started = True
                d.service.cutover.state(migration_id).vm = vms[role] = vm
            d.service.cutover.state(ids["moved"]).point_of_no_return = True  # P committed: the VM is P
            config.limits.source_silence_s = 1
            await d.service.start()
            for _ in range(100):  # 20 s at most
                if vms["silent"].name not in libvirtd.list_domains(VM_PREFIX):
                    break
                await asyncio.sleep(0.2)
            alive = set(libvirtd.list_domains(VM_PREFIX))
            assert vms["silent"].name not in alive and not vms["silent"].disk_path.exists()
            assert vms["moved"].name in alive and vms["moved"].disk_path.exists()
            silent = d.service.migrations[ids["silent"]]
            assert silent.state == common_pb2.MIGRATION_STATE_FAILED and "said nothing" in silent.error
            assert d.service.migrations[ids["moved"]].state == common_pb2.MIGRATION_STATE_ACTIVE
        finally:
            for vm in vms.values():
                try:
                    conn.lookupByName(vm.name).destroy()
                except libvirt.libvirtError:
                    pass
            conn.close()


async def test_a_call_that_comes_while_v_gives_up_finds_the_migration_failed(tmp_path: Path, monkeypatch) -> None:
    """The lease's verdict and the migration's failed state are one step: a Cutover that P sends
    while V still tears the migration down (its VM going) is refused, not started on it."""
    import threading

    import grpc

    async with destination(tmp_path / "v") as d:
        d.service.config.limits.source_silence_s = 1
        closing, release = threading.Event(), threading.Event()
        close = d.service.cutover.close

        def slow_close(record_id: str) -> None:  # the waiting VM's destroy, held up
            closing.set()
            release.wait(10)
            close(record_id)

        monkeypatch.setattr(d.service.cutover, "close", slow_close)
        await d.service.start()
        silent = (await d.prepare(max_pfn=1024)).migration_id
        try:
            assert await asyncio.to_thread(closing.wait, 10), "the lease never gave the migration up"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await d.stub.Cutover(destination_pb2.CutoverRequest(
                    migration_id=silent, phase=destination_pb2.CutoverRequest.PHASE_ANNOUNCE), timeout=5)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
            assert "FAILED" in refused.value.details()
        finally:
            release.set()
