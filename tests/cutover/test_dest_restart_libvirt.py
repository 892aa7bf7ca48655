"""A restarted destination agent settles, through the real libvirtd, the waiting VMs an earlier run
left without GO: it asks each on its feed. One that answers holding nothing is destroyed with its
disk; one that does not answer is left running (it may be P: a restored VM has no feed); the VM of
a migration it had told to GO is P and never touched. (A VM still holding an image is adopted:
tests/cutover/test_resolve.py, with the real restore program.)

The "waiting VMs" are tiny real QEMU domains (TCG, no disk: the firmware idles), named as V names
them; the feed that answers is the real restore program's connection loop on loopback (a domain
this small runs no restore program); the journals are what an earlier run of the agent wrote."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import pytest

from common.atomicfile import write_json_atomic
from dest_agent.migration_record import MigrationRecord
from dest_agent.service import DestinationService
from dest_agent.waiting_vm import AdoptedVm, FeedClient
from p2v.v1 import common_pb2
from rig import libvirtd
from rig.destination import VM_PREFIX
from tests.conftest import rig_unavailable_reason
from tests.cutover.test_restore_program import feed_vm
from tests.memory.harness import dest_config

pytestmark = pytest.mark.rig


def tiny_domain_xml(name: str) -> str:
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
</devices></domain>"""


def journal(root: Path, migration_id: str, state: int, go: bool = False) -> MigrationRecord:
    record = MigrationRecord(root, migration_id, source_host_id="p", memory_bytes=1 << 30, max_pfn=1 << 18,
                             page_size=4096, peer=["p2v-source"])
    record.dir.mkdir(parents=True)
    record.state = state
    record.journal()
    if go:
        write_json_atomic(record.go_mark_path, {"migration": migration_id})
    return record


async def test_restarted_agent_destroys_only_waiting_vms_that_answer_holding_nothing(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    reason = rig_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import libvirt

    await asyncio.to_thread(libvirtd.ensure_running)
    tag = uuid.uuid4().hex[:8]
    empty_id, silent_id, p_id = f"empty-{tag}", f"silent-{tag}", f"moved-{tag}"
    config = dest_config(tmp_path / "v")
    config.vm.enabled, config.vm.name_prefix = True, VM_PREFIX
    root = Path(config.agent.state_dir) / "migrations"
    empty = journal(root, empty_id, common_pb2.MIGRATION_STATE_CUTOVER)
    silent = journal(root, silent_id, common_pb2.MIGRATION_STATE_CUTOVER)
    journal(root, p_id, common_pb2.MIGRATION_STATE_CUTOVER, go=True)
    (host, port), _, vm_thread, holding = feed_vm(tmp_path / "restore", monkeypatch, connections=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # nothing listens there
    disks = {i: tmp_path / f"{i}-vda.img" for i in (empty_id, silent_id)}
    for disk in disks.values():
        disk.write_bytes(b"")
    AdoptedVm(VM_PREFIX + empty_id, FeedClient(host, port, "tok"), disks[empty_id]).save(empty.waiting_vm_path)
    AdoptedVm(VM_PREFIX + silent_id, FeedClient("127.0.0.1", dead_port, "tok"),
              disks[silent_id]).save(silent.waiting_vm_path)

    conn = libvirt.open("qemu:///system")
    try:
        for migration_id in (empty_id, silent_id, p_id):
            conn.createXML(tiny_domain_xml(VM_PREFIX + migration_id), 0)
        service = DestinationService(config, "test-dest")
        assert service.migrations[empty_id].state == common_pb2.MIGRATION_STATE_FAILED
        assert service.migrations[p_id].state == common_pb2.MIGRATION_STATE_CUTOVER
        await service.start()
        await asyncio.wait_for(service._settled(), 60)
        alive = set(libvirtd.list_domains(VM_PREFIX))
        assert VM_PREFIX + empty_id not in alive and not disks[empty_id].exists()  # answered: holding nothing
        assert VM_PREFIX + silent_id in alive and disks[silent_id].exists()  # silent: may be P, left running
        assert VM_PREFIX + p_id in alive  # the VM is P: never destroyed
        # only the silent one needs the operator, and `p2vctl list` on V says what to do
        said = {i: service.cutover.attention(service.migrations[i]) for i in (empty_id, silent_id, p_id)}
        assert said[empty_id] == said[p_id] == ""
        assert f"virsh destroy {VM_PREFIX + silent_id}" in said[silent_id] and "may be P" in said[silent_id]
        await asyncio.to_thread(vm_thread.join, 10)
        assert holding == [0]
    finally:
        for migration_id in (empty_id, silent_id, p_id):
            try:
                conn.lookupByName(VM_PREFIX + migration_id).destroy()
            except libvirt.libvirtError:
                pass
        conn.close()
