"""Discovery: parsing against a fake sysfs tree, and the real thing on this host and in a netns."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from source_agent import discovery
from tests.redundancy import fakesys as fs


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path
    e1000 = fs.pci_function(root, "0000:00:03.0", "8086", "100e", "e1000")
    fs.nic(root, "ens3", e1000)
    piix = fs.pci_function(root, "0000:00:01.1", "8086", "7010", "ata_piix")
    scsi = f"{piix}/ata1/host0/target0:0:0/0:0:0:0"
    fs.write(root, f"{scsi}/vendor", "ATA\n")
    fs.link(root, f"{scsi}/driver", "/sys/bus/scsi/drivers/sd")
    fs.disk(root, "sda", scsi, 2097152, partitions={"sda1": 2095104}, holders={"sda1": ["md0"]})
    vblk = fs.pci_function(root, "0000:00:05.0", "1af4", "1001", "virtio-pci")
    fs.link(root, f"{vblk}/virtio1/driver", "/sys/bus/virtio/drivers/virtio_blk")
    fs.disk(root, "vda", f"{vblk}/virtio1", 4096, serial="p2v-data")
    fs.md(root, "md0", "raid1", {"sda1": f"{scsi}/block/sda/sda1"}, 2091008)
    fs.write(root, "/sys/firmware/memmap/0/start", "0x0\n")
    fs.write(root, "/sys/firmware/memmap/0/end", "0x9fbff\n")
    fs.write(root, "/sys/firmware/memmap/0/type", "System RAM\n")
    fs.write(root, "/sys/firmware/memmap/10/start", "0x100000\n")
    fs.write(root, "/sys/firmware/memmap/10/end", "0x1ffdffff\n")
    fs.write(root, "/sys/firmware/memmap/10/type", "System RAM\n")
    fs.write(root, "/sys/firmware/memmap/2/start", "0x9fc00\n")
    fs.write(root, "/sys/firmware/memmap/2/end", "0x9ffff\n")
    fs.write(root, "/sys/firmware/memmap/2/type", "Reserved\n")
    fs.write(
        root,
        "/proc/cpuinfo",
        "processor\t: 0\nmodel name\t: QEMU Virtual CPU version 2.5+\n\n"
        "processor\t: 1\nmodel name\t: QEMU Virtual CPU version 2.5+\n",
    )
    fs.write(root, "/proc/meminfo", "MemTotal:         493580 kB\nMemFree:  1 kB\nMemAvailable:     400000 kB\n")
    fs.write(root, "/etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    fs.write(root, "/sys/kernel/security/lockdown", "[none] integrity confidentiality\n")
    return root


def test_nic_hw_info_pci_and_driver(fake_root: Path) -> None:
    hw = discovery.nic_hw_info(fake_root, "ens3")
    assert hw == discovery.HwInfo(driver="e1000", pci_address="0000:00:03.0", pci_id="8086:100e")
    assert discovery.nic_hw_info(fake_root, "nonexistent") == discovery.HwInfo()


def test_block_devices_fake(fake_root: Path) -> None:
    devs = {b.name: b for b in discovery.block_devices(fake_root)}
    assert set(devs) == {"sda", "sda1", "vda", "md0"}
    sda = devs["sda"]
    assert sda.kind == "disk" and sda.size_bytes == 2097152 * 512
    # the SCSI upper-level driver "sd" is skipped: the controller's driver is what matters
    assert sda.hw == discovery.HwInfo("ata_piix", "0000:00:01.1", "8086:7010")
    assert devs["sda1"].kind == "partition" and devs["sda1"].parent == "sda"
    assert devs["sda1"].holders == ["md0"]
    assert devs["vda"].hw.driver == "virtio_blk" and devs["vda"].hw.pci_id == "1af4:1001"
    assert devs["vda"].serial == "p2v-data"
    assert devs["md0"].kind == "md" and devs["md0"].md_level == "raid1" and devs["md0"].md_members == ["sda1"]


def test_memmap_sorted_end_exclusive(fake_root: Path) -> None:
    mm = discovery.firmware_memmap(fake_root)
    assert [(m.start, m.end, m.type) for m in mm] == [
        (0, 0x9FC00, "System RAM"),
        (0x9FC00, 0xA0000, "Reserved"),
        (0x100000, 0x1FFE0000, "System RAM"),
    ]


def test_cpu_mem_misc(fake_root: Path) -> None:
    assert discovery.cpu_info(fake_root) == ("QEMU Virtual CPU version 2.5+", 2)
    assert discovery.mem_info(fake_root) == (493580 * 1024, 400000 * 1024)
    assert discovery.machine_id(fake_root) == "0123456789abcdef0123456789abcdef"
    assert discovery.lockdown_mode(fake_root) == ""
    fs.write(fake_root, "/sys/kernel/security/lockdown", "none [integrity] confidentiality\n")
    assert discovery.lockdown_mode(fake_root) == "integrity"


def test_missing_tree_is_empty(tmp_path: Path) -> None:
    assert discovery.block_devices(tmp_path) == []
    assert discovery.firmware_memmap(tmp_path) == []
    assert discovery.cpu_info(tmp_path) == ("", 0)


# ------------------------------------------------------------------ the real thing


def _sysfs_block_names() -> set[str]:
    return set(os.listdir("/sys/class/block"))


def test_real_host_discovery() -> None:
    inv = discovery.discover()
    assert inv.host_id == Path("/etc/machine-id").read_text().strip()
    assert inv.kernel_release == os.uname().release
    assert inv.cpus == os.cpu_count()
    assert inv.memory_bytes > inv.mem_available_bytes > 0
    names = {n.name for n in inv.nics}
    assert names == set(os.listdir("/sys/class/net"))
    for n in inv.nics:
        assert n.mac == Path(f"/sys/class/net/{n.name}/address").read_text().strip()
        dev = Path(f"/sys/class/net/{n.name}/device/driver")
        if dev.exists():
            assert n.driver == os.path.basename(os.readlink(dev))
    assert {b.name for b in inv.block_devices} == _sysfs_block_names()
    for b in inv.block_devices:
        assert b.size_bytes == int(Path(f"/sys/class/block/{b.name}/size").read_text()) * 512
    assert inv.firmware_memmap and all(m.end > m.start for m in inv.firmware_memmap)
    assert inv.snapshot_device == os.path.exists("/dev/snapshot")
    # the default route, as `ip route` shows it
    shown = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True).stdout
    if shown.strip():
        words = shown.split()
        assert any(r.destination == "default" and r.gateway == words[2] and r.device == words[4] for r in inv.routes)


@pytest.fixture
def netns() -> str:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2")
    name = f"p2vt-red-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_real_netns_links_masters_routes(netns: str) -> None:
    def ns(*args: str) -> None:
        subprocess.run(["ip", "-n", netns, *args], check=True)

    ns("link", "add", "br0", "type", "bridge")
    ns("link", "add", "va", "type", "veth", "peer", "name", "vb")
    ns("link", "set", "vb", "master", "br0")
    ns("link", "set", "va", "address", "02:00:00:00:00:0a")
    for dev in ("br0", "va", "vb"):
        ns("link", "set", dev, "up")
    ns("addr", "add", "10.99.0.1/24", "dev", "va")
    ns("route", "add", "10.98.0.0/16", "via", "10.99.0.2", "dev", "va")
    inv = discovery.discover(netns=netns)
    nics = {n.name: n for n in inv.nics}
    assert set(nics) == {"lo", "br0", "va", "vb"}
    assert nics["br0"].kind == "bridge" and nics["vb"].master == "br0" and nics["vb"].kind == "veth"
    assert nics["va"].mac == "02:00:00:00:00:0a" and "10.99.0.1/24" in nics["va"].addresses
    assert nics["va"].up
    routes = {(r.destination, r.gateway, r.device) for r in inv.routes}
    assert ("10.98.0.0/16", "10.99.0.2", "va") in routes
    assert ("10.99.0.0/24", "", "va") in routes
