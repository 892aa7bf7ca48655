"""Discovery of the physical host P: NICs, routes, block devices, firmware map, CPU, memory.

Typed records (dataclasses) are gathered first; conversion to the public proto happens at the
edge (:func:`to_proto`). Every sysfs/procfs reader takes a ``root`` path so that its parsing can be
unit-tested against a fake tree; netlink (links, addresses, routes) comes from pyroute2.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from p2v.v1 import source_pb2

PCI_ADDR_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# Block devices that are not hardware (discovered, but never paired by planning).
VIRTUAL_BLOCK_PREFIXES = ("loop", "ram", "zram", "nbd", "dm-", "md", "sr", "fd")
# SCSI upper-level drivers: the interesting driver for a disk is the controller's below them.
SCSI_ULD = {"sd", "sr", "st", "sg"}


@dataclass(frozen=True)
class HwInfo:
    """Where a device hangs in the device tree (from sysfs)."""

    driver: str = ""
    pci_address: str = ""
    pci_id: str = ""  # vendor:device, lower-case hex without 0x


@dataclass
class NicRecord:
    name: str
    index: int
    mac: str
    mtu: int
    up: bool
    kind: str = ""  # netlink IFLA_INFO_KIND: "", "bond", "bridge", "veth", ...
    master: str = ""
    addresses: list[str] = field(default_factory=list)  # CIDR
    hw: HwInfo = field(default_factory=HwInfo)
    bond_mode: str = ""  # for kind == "bond": e.g. "active-backup"

    @property
    def physical(self) -> bool:
        """A NIC backed by a bus device (PCI, virtio...), not a software link."""
        return not self.kind and bool(self.hw.driver or self.hw.pci_address)


@dataclass
class RouteRecord:
    destination: str  # CIDR or "default"
    gateway: str
    device: str
    family: int = socket.AF_INET
    metric: int = 0
    proto: int = 0
    scope: int = 0
    prefsrc: str = ""


@dataclass
class BlockRecord:
    name: str
    size_bytes: int
    kind: str  # "disk", "partition", "md", "loop", "nbd", "dm", "zram", "ram", ...
    parent: str = ""  # partitions: the whole disk
    hw: HwInfo = field(default_factory=HwInfo)
    serial: str = ""
    holders: list[str] = field(default_factory=list)
    removable: bool = False
    read_only: bool = False
    md_level: str = ""
    md_members: list[str] = field(default_factory=list)


@dataclass
class MemmapRecord:
    start: int
    end: int  # exclusive
    type: str


@dataclass
class InventoryRecord:
    host_id: str
    hostname: str
    kernel_release: str
    cpu_model: str
    cpus: int
    memory_bytes: int
    mem_available_bytes: int
    nics: list[NicRecord]
    routes: list[RouteRecord]
    block_devices: list[BlockRecord]
    firmware_memmap: list[MemmapRecord]
    snapshot_device: bool
    lockdown: str


# ---------------------------------------------------------------- small sysfs helpers


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return default


def _read_int(path: Path, default: int = 0) -> int:
    text = _read(path)
    try:
        return int(text, 0)
    except ValueError:
        return default


def _rel(root: Path, abs_path: str) -> Path:
    """Map an absolute system path ("/sys/...") into ``root``."""
    return root / abs_path.lstrip("/")


def _resolve(link: Path) -> Path | None:
    """Follow symlinks (sysfs uses relative links, so fake trees under a root work the same)."""
    try:
        return Path(os.path.realpath(link, strict=True))
    except OSError:
        return None


def hw_info(root: Path, device_dir: Path, skip_drivers: Iterable[str] = ()) -> HwInfo:
    """Driver, PCI address and PCI vendor:device for the device at ``device_dir`` (a sysfs
    ``.../device`` link or directory inside ``root``), walking up the device tree.

    The driver is the nearest bound driver that is not in ``skip_drivers``; the PCI address is the
    nearest ancestor named like a PCI function that has ``vendor`` and ``device`` files.
    """
    skip = set(skip_drivers)
    here = _resolve(device_dir)
    if here is None:
        return HwInfo()
    sys_devices = _resolve(_rel(root, "/sys/devices")) or Path("/sys/devices")
    driver = ""
    pci_address = ""
    pci_id = ""
    cur = here
    for _ in range(32):  # bounded walk up the tree
        if not driver:
            drv = _resolve(cur / "driver") if (cur / "driver").is_symlink() else None
            if drv is not None and drv.name not in skip:
                driver = drv.name
        if not pci_address and PCI_ADDR_RE.match(cur.name):
            vendor = _read(cur / "vendor")
            device = _read(cur / "device")
            if vendor and device:
                pci_address = cur.name
                pci_id = f"{_hex4(vendor)}:{_hex4(device)}"
        if (driver and pci_address) or cur == sys_devices or cur.parent == cur:
            break
        cur = cur.parent
    return HwInfo(driver=driver, pci_address=pci_address, pci_id=pci_id)


def _hex4(text: str) -> str:
    try:
        return f"{int(text, 16):04x}"
    except ValueError:
        return text.lower()


# ---------------------------------------------------------------- NICs


def nic_hw_info(root: Path, name: str) -> HwInfo:
    return hw_info(root, _rel(root, f"/sys/class/net/{name}/device"))


def bond_mode(root: Path, name: str) -> str:
    """``/sys/class/net/<bond>/bonding/mode`` is e.g. "active-backup 1"."""
    return _read(_rel(root, f"/sys/class/net/{name}/bonding/mode")).split(" ")[0]


def _nla(msg: object, name: str, default: object = None) -> object:
    get = getattr(msg, "get", None)
    if get is None:
        return default
    value = get(name)
    return default if value is None else value


def links_from_netlink(links: Iterable, addrs: Iterable, root: Path = Path("/")) -> list[NicRecord]:
    """Build NIC records from pyroute2 link and address messages (plus sysfs for hardware)."""
    by_index: dict[int, NicRecord] = {}
    master_of: dict[int, int] = {}
    for msg in links:
        name = str(_nla(msg, "IFLA_IFNAME", ""))
        linkinfo = _nla(msg, "IFLA_LINKINFO")
        kind = str(_nla(linkinfo, "IFLA_INFO_KIND", "") or "") if linkinfo is not None else ""
        rec = NicRecord(
            name=name,
            index=int(msg["index"]),
            mac=str(_nla(msg, "IFLA_ADDRESS", "") or ""),
            mtu=int(_nla(msg, "IFLA_MTU", 0) or 0),
            up=bool(int(msg["flags"]) & 1),  # IFF_UP
            kind=kind,
        )
        master_of[rec.index] = int(_nla(msg, "IFLA_MASTER", 0) or 0)
        by_index[rec.index] = rec
    for rec in by_index.values():
        mi = master_of.get(rec.index, 0)
        if mi and mi in by_index:
            rec.master = by_index[mi].name
        if rec.name != "lo":
            rec.hw = nic_hw_info(root, rec.name)
        if rec.kind == "bond":
            rec.bond_mode = bond_mode(root, rec.name)
    for a in addrs:
        rec = by_index.get(int(a["index"]))
        if rec is None:
            continue
        address = _nla(a, "IFA_LOCAL") or _nla(a, "IFA_ADDRESS")
        if address:
            rec.addresses.append(f"{address}/{int(a['prefixlen'])}")
    return sorted(by_index.values(), key=lambda r: r.index)


def routes_from_netlink(routes: Iterable, names: dict[int, str]) -> list[RouteRecord]:
    """Unicast routes of the main table (what an administrator configured or the kernel added)."""
    out: list[RouteRecord] = []
    for r in routes:
        table = int(_nla(r, "RTA_TABLE", r["table"]) or 0)
        if table != 254 or int(r["type"]) != 1:  # RT_TABLE_MAIN, RTN_UNICAST
            continue
        dst = _nla(r, "RTA_DST")
        dst_len = int(r["dst_len"])
        destination = "default" if not dst and dst_len == 0 else f"{dst}/{dst_len}"
        out.append(
            RouteRecord(
                destination=destination,
                gateway=str(_nla(r, "RTA_GATEWAY", "") or ""),
                device=names.get(int(_nla(r, "RTA_OIF", 0) or 0), ""),
                family=int(r["family"]),
                metric=int(_nla(r, "RTA_PRIORITY", 0) or 0),
                proto=int(r["proto"]),
                scope=int(r["scope"]),
                prefsrc=str(_nla(r, "RTA_PREFSRC", "") or ""),
            )
        )
    return out


# ---------------------------------------------------------------- block devices


def _block_kind(name: str, is_partition: bool) -> str:
    if is_partition:
        return "partition"
    for prefix, kind in (
        ("loop", "loop"),
        ("nbd", "nbd"),
        ("md", "md"),
        ("dm-", "dm"),
        ("zram", "zram"),
        ("ram", "ram"),
        ("sr", "rom"),
        ("fd", "floppy"),
    ):
        if name.startswith(prefix):
            return kind
    return "disk"


def _block_serial(dev: Path) -> str:
    for candidate in (dev / "serial", dev / "device" / "serial", dev / "device" / "wwid"):
        text = _read(candidate)
        if text:
            return text
    # SCSI/ATA: unit serial number VPD page 0x80: 4-byte header, then the serial.
    try:
        raw = (dev / "device" / "vpd_pg80").read_bytes()
    except OSError:
        return ""
    if len(raw) > 4:
        return raw[4 : 4 + raw[3]].decode("ascii", "replace").strip()
    return ""


def md_members(dev: Path) -> list[str]:
    """Members of an md array from ``md/dev-*/block`` (falls back to ``slaves``)."""
    members: list[str] = []
    md_dir = dev / "md"
    if md_dir.is_dir():
        for entry in sorted(md_dir.glob("dev-*")):
            blk = entry / "block"
            target = os.readlink(blk) if blk.is_symlink() else ""
            members.append(os.path.basename(target) if target else entry.name[len("dev-") :])
    if not members and (dev / "slaves").is_dir():
        members = sorted(p.name for p in (dev / "slaves").iterdir())
    return members


def block_devices(root: Path = Path("/")) -> list[BlockRecord]:
    """Every block device and partition in ``/sys/class/block``."""
    base = _rel(root, "/sys/class/block")
    if not base.is_dir():
        return []
    out: list[BlockRecord] = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        name = entry.name
        dev = entry  # a symlink into /sys/devices; following it works for real and fake trees
        is_partition = (dev / "partition").exists()
        kind = _block_kind(name, is_partition)
        parent = ""
        if is_partition:
            real = _resolve(entry)
            parent = real.parent.name if real is not None else ""
        rec = BlockRecord(
            name=name,
            size_bytes=_read_int(dev / "size") * 512,  # always 512-byte sectors
            kind=kind,
            parent=parent,
            removable=_read(dev / "removable") == "1",
            read_only=_read(dev / "ro") == "1",
            holders=sorted(p.name for p in (dev / "holders").iterdir()) if (dev / "holders").is_dir() else [],
        )
        if kind == "disk":
            rec.hw = hw_info(root, dev / "device", skip_drivers=SCSI_ULD)
            rec.serial = _block_serial(dev)
        if kind == "md":
            rec.md_level = _read(dev / "md" / "level")
            rec.md_members = md_members(dev)
        out.append(rec)
    # partitions inherit the hardware of their disk
    by_name = {r.name: r for r in out}
    for r in out:
        if r.kind == "partition" and r.parent in by_name:
            r.hw = by_name[r.parent].hw
    return out


# ---------------------------------------------------------------- firmware, cpu, memory, misc


def firmware_memmap(root: Path = Path("/")) -> list[MemmapRecord]:
    """``/sys/firmware/memmap/N/{start,end,type}``; sysfs ``end`` is inclusive, ours exclusive."""
    base = _rel(root, "/sys/firmware/memmap")
    if not base.is_dir():
        return []
    out: list[MemmapRecord] = []
    for entry in base.iterdir():
        if not entry.name.isdigit():
            continue
        start = _read_int(entry / "start", -1)
        end = _read_int(entry / "end", -1)
        if start < 0 or end < start:
            continue
        out.append(MemmapRecord(start=start, end=end + 1, type=_read(entry / "type")))
    return sorted(out, key=lambda m: (m.start, m.end))


def cpu_info(root: Path = Path("/")) -> tuple[str, int]:
    """(model name, number of logical CPUs) from /proc/cpuinfo."""
    model = ""
    cpus = 0
    for line in _read(_rel(root, "/proc/cpuinfo")).splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cpus += 1
        elif key == "model name" and not model:
            model = value.strip()
    return model, cpus


def mem_info(root: Path = Path("/")) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo."""
    values: dict[str, int] = {}
    for line in _read(_rel(root, "/proc/meminfo")).splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            mult = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            values[key.strip()] = int(parts[0]) * mult
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def lockdown_mode(root: Path = Path("/")) -> str:
    """The selected lockdown mode ("none", "integrity", "confidentiality"); "" if not available.

    The file reads like "[none] integrity confidentiality"; "none" is reported as "".
    """
    text = _read(_rel(root, "/sys/kernel/security/lockdown"))
    m = re.search(r"\[(\w+)\]", text)
    mode = m.group(1) if m else ""
    return "" if mode == "none" else mode


def machine_id(root: Path = Path("/")) -> str:
    return _read(_rel(root, "/etc/machine-id")) or _read(_rel(root, "/var/lib/dbus/machine-id"))


def kernel_release(root: Path = Path("/")) -> str:
    return _read(_rel(root, "/proc/sys/kernel/osrelease")) or os.uname().release


def hostname(root: Path = Path("/")) -> str:
    return _read(_rel(root, "/proc/sys/kernel/hostname")) or socket.gethostname()


# ---------------------------------------------------------------- assembly and proto edge


def gather(root: Path = Path("/"), netns: str | None = None) -> InventoryRecord:
    """Collect the typed inventory. ``netns`` (a named network namespace) is for tests."""
    from pyroute2 import IPRoute, NetNS

    ipr = NetNS(netns) if netns else IPRoute()
    try:
        links = list(ipr.get_links())
        addrs = list(ipr.get_addr())
        routes = list(ipr.get_routes(family=socket.AF_INET)) + list(ipr.get_routes(family=socket.AF_INET6))
    finally:
        ipr.close()
    nics = links_from_netlink(links, addrs, root)
    names = {n.index: n.name for n in nics}
    model, cpus = cpu_info(root)
    total, available = mem_info(root)
    return InventoryRecord(
        host_id=machine_id(root),
        hostname=hostname(root),
        kernel_release=kernel_release(root),
        cpu_model=model,
        cpus=cpus,
        memory_bytes=total,
        mem_available_bytes=available,
        nics=nics,
        routes=routes_from_netlink(routes, names),
        block_devices=block_devices(root),
        firmware_memmap=firmware_memmap(root),
        snapshot_device=_rel(root, "/dev/snapshot").exists(),
        lockdown=lockdown_mode(root),
    )


def to_proto(inv: InventoryRecord) -> source_pb2.Inventory:
    out = source_pb2.Inventory(
        host_id=inv.host_id,
        hostname=inv.hostname,
        kernel_release=inv.kernel_release,
        cpu_model=inv.cpu_model,
        cpus=inv.cpus,
        memory_bytes=inv.memory_bytes,
        mem_available_bytes=inv.mem_available_bytes,
        snapshot_device=inv.snapshot_device,
        lockdown=inv.lockdown,
    )
    for n in inv.nics:
        out.nics.add(
            name=n.name,
            mac=n.mac,
            driver=n.hw.driver,
            pci_address=n.hw.pci_address,
            pci_id=n.hw.pci_id,
            addresses=n.addresses,
            mtu=n.mtu,
            master=n.master,
            kind=n.kind,
            up=n.up,
            bond_mode=n.bond_mode,
        )
    for r in inv.routes:
        out.routes.add(destination=r.destination, gateway=r.gateway, device=r.device)
    for b in inv.block_devices:
        out.block_devices.add(
            name=b.name,
            size_bytes=b.size_bytes,
            driver=b.hw.driver,
            pci_address=b.hw.pci_address,
            pci_id=b.hw.pci_id,
            serial=b.serial,
            holders=b.holders,
            removable=b.removable,
            md_level=b.md_level,
            md_members=b.md_members,
            kind=b.kind,
            parent=b.parent,
        )
    for m in inv.firmware_memmap:
        out.firmware_memmap.add(start=m.start, end=m.end, type=m.type)
    return out


def discover(root: Path = Path("/"), netns: str | None = None) -> source_pb2.Inventory:
    """Discover this host (P) and return the public ``Inventory``."""
    return to_proto(gather(root, netns))
