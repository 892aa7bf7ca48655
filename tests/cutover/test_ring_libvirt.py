"""The feed's shared memory under a QEMU that libvirt runs as its own unprivileged user (Debian's
default; the rig runs its VMs as root): V makes the ring file 0600 for the user libvirt's
capabilities name, QEMU opens and maps it, nobody else may, and what V writes is in the guest's
physical memory behind the ivshmem BAR.

The domain is tiny (TCG, no disk, no kernel: its firmware assigns the BAR and idles); it has the
same `<shmem>` device as a waiting VM (vm_builder.shmem_xml)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from dest_agent import vm_builder
from dest_agent.waiting_vm import FeedRing
from tests.conftest import rig_unavailable_reason

pytestmark = pytest.mark.rig

SLOT = 5
MIB = 2


def hmp(name: str, command: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", name, "--hmp", command],
                          check=True, capture_output=True, text=True, timeout=30).stdout


def test_a_non_root_qemu_maps_the_ring_v_made_and_only_it_may_open_it() -> None:
    reason = rig_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import libvirt

    from rig import libvirtd

    libvirtd.ensure_running()
    conn = libvirt.open("qemu:///system")
    name = f"p2vtest-ring-{uuid.uuid4().hex[:8]}"
    ring = vm_builder.RING_DIR / name
    try:
        uid, gid = vm_builder.qemu_dac_owner(conn.getCapabilities(), run_as_root=False)
        if uid == 0:
            pytest.skip("libvirt on this host runs QEMU as root: nothing to show")
        vm_builder.create_ring_file(ring, MIB << 20, (uid, gid))
        feed = FeedRing(ring, MIB << 20)  # V's side: refuses a file others may open
        marker = b"p2v-ring-" + uuid.uuid4().hex.encode()
        feed.put(4096, memoryview(marker))
        conn.createXML(f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
{vm_builder.shmem_xml(name, MIB, SLOT)}</devices></domain>""", 0)
        dom = conn.lookupByName(name)
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        assert os.stat(f"/proc/{pid}").st_uid == uid  # QEMU runs as libvirt's user, not root
        assert str(ring) in Path(f"/proc/{pid}/maps").read_text()  # and maps V's file
        st = ring.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o600)  # nobody else may open it
        bar = ""
        for _ in range(100):  # the firmware assigns the BAR within a second or two under TCG
            info = hmp(name, "info pci")
            device = info.split(f"Bus  0, device   {SLOT}, function 0:")[-1] if f"device   {SLOT}," in info else ""
            m = re.search(r"BAR2: 64 bit prefetchable memory at (0x[0-9a-f]+)", device)
            if m and int(m.group(1), 16) not in (0, 0xFFFFFFFFFFFFFFFF):
                bar = m.group(1)
                break
            time.sleep(0.2)
        assert bar, f"no BAR2 assigned to the ivshmem device: {info}"
        seen = hmp(name, f"xp /{len(marker)}bx {int(bar, 16) + 4096:#x}")
        got = bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", seen.split(":", 1)[1]))
        assert got == marker  # what V wrote is in the guest's physical memory
        dom.destroy()
        feed.close()
    finally:
        try:
            conn.lookupByName(name).destroy()
        except libvirt.libvirtError:
            pass
        conn.close()
        ring.unlink(missing_ok=True)
