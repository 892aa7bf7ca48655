"""A restarted destination agent destroys, through the real libvirtd, the waiting VM an interrupted
migration left when that VM holds no image (its feed does not answer here), and leaves alone the VM
of a migration it had told to GO (that VM is P). (A VM still holding an image is adopted instead:
tests/cutover/test_resolve.py, with the real restore program.)

The "waiting VMs" are tiny real QEMU domains (TCG, no disk: the firmware idles), named as V names
them; the journals are what an earlier run of the agent wrote."""

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


async def test_restarted_agent_destroys_orphaned_waiting_vms_only(tmp_path: Path) -> None:
    reason = rig_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import libvirt

    await asyncio.to_thread(libvirtd.ensure_running)
    tag = uuid.uuid4().hex[:8]
    orphan_id, p_id = f"orphan-{tag}", f"moved-{tag}"
    config = dest_config(tmp_path / "v")
    config.vm.enabled, config.vm.name_prefix = True, VM_PREFIX
    root = Path(config.agent.state_dir) / "migrations"
    orphan = journal(root, orphan_id, common_pb2.MIGRATION_STATE_CUTOVER)
    journal(root, p_id, common_pb2.MIGRATION_STATE_CUTOVER, go=True)
    # what the earlier run recorded of the orphan: its feed answers no more (nothing listens there)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    disk = tmp_path / "orphan-vda.img"
    disk.write_bytes(b"")
    AdoptedVm(VM_PREFIX + orphan_id, FeedClient("127.0.0.1", dead_port, "token"), disk).save(orphan.waiting_vm_path)

    conn = libvirt.open("qemu:///system")
    try:
        for migration_id in (orphan_id, p_id):
            conn.createXML(tiny_domain_xml(VM_PREFIX + migration_id), 0)
        service = DestinationService(config, "test-dest")
        assert service.migrations[orphan_id].state == common_pb2.MIGRATION_STATE_FAILED
        assert service.migrations[p_id].state == common_pb2.MIGRATION_STATE_CUTOVER
        await service.start()
        await asyncio.wait_for(service._settled(), 60)
        alive = set(libvirtd.list_domains(VM_PREFIX))
        assert VM_PREFIX + orphan_id not in alive
        assert VM_PREFIX + p_id in alive  # the VM is P: never destroyed
        assert not disk.exists()
    finally:
        for migration_id in (orphan_id, p_id):
            try:
                conn.lookupByName(VM_PREFIX + migration_id).destroy()
            except libvirt.libvirtError:
                pass
        conn.close()
