"""The waiting VM (the patent's "empty virtual machine"), built through libvirt before cutover.

`domain_xml(spec)` is a pure function of a `WaitingVmSpec`; `predict_memmap` is V's model of the
firmware memory map its VMs get (SeaBIOS on QEMU's `pc` machine); `start`/`destroy` are the I/O.

What makes the hibernation carrier accept the VM (shared/research/hibernate-carrier):
- P's kernel and P's memory size (the image header records the number of physical pages);
- the same firmware e820 map: no device that makes SeaBIOS reserve memory at boot — the virtio
  disk gets no boot order (libvirt then passes `-boot strict=on`, and SeaBIOS leaves it alone),
  no USB controller, no balloon;
- none of the VM's PCI devices sits on a slot P's devices occupy (P's drivers are still bound to
  those addresses when P's kernel wakes up; they must read "nothing there" and be removed);
- CPU model qemu64, machine `pc`, ACPI on, like P;
- virtio devices without I/O port BARs (non-transitional): P's kernel writes its own devices' saved
  I/O BARs back on resume, and they must not collide with anything of the VM.
"""

from __future__ import annotations

import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

from common.hibernate_image import MemmapEntry

log = logging.getLogger(__name__)

LIBVIRT_URI = "qemu:///system"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: Slots QEMU's `pc` machine always uses (host bridge, PIIX3 ISA/IDE/ACPI).
PC_BUILTIN_SLOTS = frozenset({0, 1})
FIRST_FREE_SLOT = 3


@dataclass(frozen=True)
class VmNic:
    mac: str
    bridge: str
    #: modern-only virtio: no I/O port BAR. P's kernel restores the I/O BARs of P's own devices (the
    #: IDE controller's bus-master DMA ports) to P's values, which must not land on a VM device.
    model: str = "virtio-non-transitional"


@dataclass(frozen=True)
class VmDisk:
    path: str
    target: str  # "vda", "hda", ...
    bus: str = "virtio"  # "virtio" | "ide"
    fmt: str = "raw"
    #: IDE position (controller 0): (bus, unit); P's kernel knows its IDE disks by position.
    ide_position: tuple[int, int] | None = None
    #: Opened by P's QEMU at the same time (rig: P's root disk as shared storage): no image locking.
    shareable: bool = False
    serial: str = ""
    #: IDE model string: libata revalidates a disk after resume by its identity (model, serial)
    #: and drops it if they differ from what P's kernel knew
    model: str = ""


@dataclass(frozen=True)
class WaitingVmSpec:
    name: str
    uuid: str
    memory_bytes: int
    vcpus: int
    kernel: str
    initrd: str
    cmdline: str
    nics: tuple[VmNic, ...]  # P's NICs (P's MACs)
    feed_nic: VmNic  # the restore program receives the image on it
    #: the feed's shared memory (an ivshmem-plain device over /dev/shm/<feed_ring>, `feed_ring_mib`
    #: MiB): the image's pages reach the restore program without the VM's network stack; "" = none
    feed_ring: str = ""
    feed_ring_mib: int = 0
    disks: tuple[VmDisk, ...] = ()
    console_log: str = ""
    control_socket: str = ""  # ttyS1 as a unix socket (the rig's control channel), "" = none
    #: PCI slots taken by P's devices: the VM leaves them empty
    reserved_slots: frozenset[int] = field(default_factory=frozenset)
    run_as_root: bool = False
    cpu_model: str = "qemu64"
    cpu_features: tuple[str, ...] = ()  # required on top of the model (P's CPU flags)
    machine: str = "pc"


def allocate_slots(count: int, reserved: frozenset[int]) -> list[int]:
    """`count` PCI slots on bus 0 that neither QEMU's builtins nor P's devices use."""
    slots = [s for s in range(FIRST_FREE_SLOT, 32) if s not in reserved and s not in PC_BUILTIN_SLOTS]
    if len(slots) < count:
        raise ValueError(f"no {count} free PCI slots left (P occupies {sorted(reserved)})")
    return slots[:count]


@dataclass(frozen=True)
class PciLayout:
    """Where domain_xml puts the VM's PCI devices (bus 0, function 0 each)."""
    disks: tuple[int, ...]  # virtio disks, in spec order
    nics: tuple[int, ...]  # P's NICs, in spec order
    feed: int  # the feed NIC
    ring: int | None = None  # the feed's shared memory (never probed by P's kernel, as the feed NIC)

    @staticmethod
    def address(slot: int) -> str:
        return f"0000:00:{slot:02x}.0"


def pci_layout(spec: WaitingVmSpec) -> PciLayout:
    """Virtio disks, then P's NICs, then the feed NIC and the feed's shared memory, on the slots
    allocate_slots gives. P's resume enables the NICs' slots only (the disks' after UNFREEZE, the
    feed's never). Pure."""
    n_disks = sum(1 for d in spec.disks if d.bus == "virtio")
    n_feed = n_disks + len(spec.nics)
    slots = allocate_slots(n_feed + 1 + bool(spec.feed_ring), spec.reserved_slots)
    return PciLayout(tuple(slots[:n_disks]), tuple(slots[n_disks:n_feed]), slots[n_feed],
                     slots[n_feed + 1] if spec.feed_ring else None)


def feed_nic_pci_address(spec: WaitingVmSpec) -> str:
    """Where domain_xml puts the feed NIC. Pure."""
    return PciLayout.address(pci_layout(spec).feed)


def slot_of(pci_address: str) -> int | None:
    """Slot number of a bus-0 address like 0000:00:05.0 (None for other buses or malformed)."""
    try:
        domain, bus, devfn = pci_address.split(":")
        slot = devfn.split(".")[0]
        if int(domain, 16) == 0 and int(bus, 16) == 0:
            return int(slot, 16)
    except ValueError:
        pass
    return None


def predict_memmap(memory_bytes: int) -> list[MemmapEntry]:
    """The firmware map SeaBIOS (QEMU 7.2, machine pc-i440fx) gives a guest with this much RAM and
    no boot-time virtio-blk. RAM below 4 GiB ends at 3.5 GiB when RAM reaches it (QEMU splits at
    3 GiB then); SeaBIOS keeps the top 128 KiB of low RAM for its tables."""
    if memory_bytes <= 0 or memory_bytes % (1 << 20):
        raise ValueError(f"memory size {memory_bytes} must be a positive whole number of MiB")
    low = memory_bytes if memory_bytes < 0xE000_0000 else 0xC000_0000
    high = memory_bytes - low
    entries = [
        MemmapEntry(0, 0x9FC00, "System RAM"),
        MemmapEntry(0x9FC00, 0xA0000, "Reserved"),
        MemmapEntry(0xF0000, 0x100000, "Reserved"),
        MemmapEntry(0x100000, low - 0x20000, "System RAM"),
        MemmapEntry(low - 0x20000, low, "Reserved"),
        MemmapEntry(0xFFFC0000, 0x1_0000_0000, "Reserved"),
    ]
    if high:
        entries.append(MemmapEntry(0x1_0000_0000, 0x1_0000_0000 + high, "System RAM"))
    entries.append(MemmapEntry(0xFD_0000_0000, 0x100_0000_0000, "Reserved"))
    return entries


#: where QEMU's memory-backend-file for a libvirt <shmem name=N> lives: RING_DIR/N
RING_DIR = Path("/dev/shm")


def qemu_dac_owner(capabilities_xml: str, run_as_root: bool) -> tuple[int, int]:
    """The uid and gid libvirt runs a QEMU domain as (its DAC security model's base label in the host
    capabilities, e.g. +64055:+108), root's when the domain runs as root or no label is given. Pure."""
    if run_as_root:
        return 0, 0
    for secmodel in ET.fromstring(capabilities_xml).iterfind("host/secmodel"):
        if secmodel.findtext("model") != "dac":
            continue
        for base in secmodel.iterfind("baselabel"):
            if base.get("type") == "qemu" and base.text:
                uid, _, gid = base.text.strip().partition(":")
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
    return 0, 0


def create_ring_file(path: Path, size: int, owner: tuple[int, int]) -> None:
    """The feed's shared memory file, made before QEMU opens it: QEMU would create it world-readable
    (0644), and it is going to hold P's memory. Only its owner (QEMU's user) may open it."""
    path.unlink(missing_ok=True)  # a leftover of an earlier attempt with the same name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        try:  # its pages now, not at the image's first lap through the ring (inside the downtime)
            os.posix_fallocate(fd, 0, size)
        except OSError:
            pass  # then they come as the ring is first written
        os.fchown(fd, *owner)
    finally:
        os.close(fd)


def _q(value: object) -> str:
    return quoteattr(str(value))


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def domain_xml(spec: WaitingVmSpec) -> str:
    """libvirt domain XML for the waiting VM. Pure."""
    if spec.memory_bytes % (1 << 20):
        raise ValueError("memory must be a whole number of MiB")
    virtio_disks = [d for d in spec.disks if d.bus == "virtio"]
    ide_disks = [d for d in spec.disks if d.bus == "ide"]
    for d in spec.disks:
        if d.bus not in ("virtio", "ide"):
            raise ValueError(f"disk {d.target}: bus {d.bus!r} unsupported")
        if d.bus == "ide" and d.ide_position is None:
            raise ValueError(f"IDE disk {d.target} needs its position (P's kernel knows it by position)")
    mib = spec.feed_ring_mib
    if spec.feed_ring and (mib <= 0 or mib & (mib - 1) or "/" in spec.feed_ring):
        raise ValueError(f"feed ring {spec.feed_ring!r} of {mib} MiB: a PCI BAR needs a power of two, a name no '/'")
    layout = pci_layout(spec)
    slot_iter = iter((*layout.disks, *layout.nics, layout.feed))
    dev: list[str] = ["<emulator>/usr/bin/qemu-system-x86_64</emulator>"]
    # Per-device boot order on one device that P has too (or on the feed NIC, whose ROM is off) keeps
    # libvirt from giving the virtio disk a boot index: SeaBIOS would then set it up at boot and
    # reserve 3 more pages of RAM, and P's image would be refused for a different e820 map.
    boot_on_ide = bool(ide_disks)
    for n, d in enumerate(ide_disks):
        bus, unit = d.ide_position  # type: ignore[misc]
        dev.append(
            f"<disk type='file' device='disk'><driver name='qemu' type={_q(d.fmt)} cache='none'/>"
            f"<source file={_q(d.path)}/><target dev={_q(d.target)} bus='ide'/>"
            + ("<boot order='1'/>" if n == 0 else "")
            + ("<shareable/>" if d.shareable else "")
            + (f"<serial>{_text(d.serial)}</serial>" if d.serial else "")
            + f"<address type='drive' controller='0' bus='{bus}' target='0' unit='{unit}'/></disk>")
    for d in virtio_disks:
        dev.append(
            f"<disk type='file' device='disk' model='virtio-non-transitional'>"
            f"<driver name='qemu' type={_q(d.fmt)} cache='none'/>"
            f"<source file={_q(d.path)}/><target dev={_q(d.target)} bus='virtio'/>"
            + ("<shareable/>" if d.shareable else "")
            + (f"<serial>{_text(d.serial)}</serial>" if d.serial else "")
            + f"<address type='pci' domain='0x0000' bus='0x00' slot='{next(slot_iter):#04x}' function='0x0'/>"
            "</disk>")
    for nic in (*spec.nics, spec.feed_nic):
        boot = "<boot order='1'/>" if nic is spec.feed_nic and not boot_on_ide else ""
        dev.append(
            f"<interface type='bridge'><mac address={_q(nic.mac.lower())}/><source bridge={_q(nic.bridge)}/>"
            f"<model type={_q(nic.model)}/><rom enabled='no'/>{boot}"
            f"<address type='pci' domain='0x0000' bus='0x00' slot='{next(slot_iter):#04x}' function='0x0'/>"
            "</interface>")
    if spec.feed_ring and layout.ring is not None:
        dev.append(shmem_xml(spec.feed_ring, mib, layout.ring))
    dev.append("<controller type='usb' model='none'/>")
    if spec.console_log:
        dev.append(f"<serial type='file'><source path={_q(spec.console_log)} append='on'/>"
                   "<target port='0'/></serial>")
    else:
        dev.append("<serial type='null'><target port='0'/></serial>")
    if spec.control_socket:
        dev.append(f"<serial type='unix'><source mode='bind' path={_q(spec.control_socket)}/>"
                   "<target port='1'/></serial>")
    dev.append("<memballoon model='none'/>")
    overrides = "".join(
        f"<qemu:device alias='ide0-{d.ide_position[0]}-{d.ide_position[1]}'><qemu:frontend>"  # type: ignore[index]
        f"<qemu:property name='model' type='string' value={_q(d.model)}/></qemu:frontend></qemu:device>"
        for d in ide_disks if d.model)
    override_xml = f"<qemu:override>{overrides}</qemu:override>" if overrides else ""
    seclabel = ("<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
                if spec.run_as_root else "")
    return (
        f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'><name>{_text(spec.name)}</name><uuid>{_text(spec.uuid)}</uuid>"
        f"<memory unit='KiB'>{spec.memory_bytes // 1024}</memory>"
        f"<currentMemory unit='KiB'>{spec.memory_bytes // 1024}</currentMemory>"
        f"<vcpu>{spec.vcpus}</vcpu>"
        f"<os><type arch='x86_64' machine={_q(spec.machine)}>hvm</type>"
        f"<kernel>{_text(spec.kernel)}</kernel><initrd>{_text(spec.initrd)}</initrd>"
        f"<cmdline>{_text(spec.cmdline)}</cmdline></os>"
        "<features><acpi/><apic/></features>"
        f"<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{_text(spec.cpu_model)}</model>"
        + "".join(f"<feature policy='require' name={_q(f)}/>" for f in spec.cpu_features) + "</cpu>"
        "<clock offset='utc'/>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
        f"<devices>{''.join(dev)}</devices>{seclabel}{override_xml}</domain>")


def shmem_xml(name: str, mib: int, slot: int) -> str:
    """The feed's shared memory as a libvirt device: QEMU maps RING_DIR/name into an ivshmem-plain BAR."""
    return (f"<shmem name={_q(name)}><model type='ivshmem-plain'/><size unit='M'>{mib}</size>"
            f"<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/></shmem>")


# --- I/O: libvirt ----------------------------------------------------------------------------------

class VmError(RuntimeError):
    pass


def _connect():
    try:
        import libvirt
    except ImportError as exc:
        raise VmError("libvirt-python is not installed on V (pip install libvirt-python)") from exc
    try:
        return libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        raise VmError(f"cannot reach libvirtd at {LIBVIRT_URI}: {exc}") from None


def start(spec: WaitingVmSpec) -> str:
    """Start the waiting VM as a transient domain. Returns libvirt's QEMU command line log path."""
    import libvirt

    if spec.console_log:
        Path(spec.console_log).parent.mkdir(parents=True, exist_ok=True)
    conn = _connect()
    try:
        if spec.feed_ring:
            try:
                owner = qemu_dac_owner(conn.getCapabilities(), spec.run_as_root)
                create_ring_file(RING_DIR / spec.feed_ring, spec.feed_ring_mib << 20, owner)
            except (OSError, ValueError, ET.ParseError, libvirt.libvirtError) as exc:
                raise VmError(f"cannot make the feed's shared memory {RING_DIR / spec.feed_ring}: {exc}") from None
        try:
            conn.createXML(domain_xml(spec), 0)
        except libvirt.libvirtError as exc:
            raise VmError(f"starting the waiting VM {spec.name}: {exc}") from None
    finally:
        conn.close()
    log.info("waiting VM started", extra={"vm": spec.name})
    return f"/var/log/libvirt/qemu/{spec.name}.log"


def state(name: str) -> str:
    """'running', 'shutoff', 'absent', ..."""
    import libvirt

    conn = _connect()
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return "absent"
        st = dom.state()[0]
        return {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                libvirt.VIR_DOMAIN_SHUTOFF: "shutoff", libvirt.VIR_DOMAIN_CRASHED: "crashed"}.get(st, str(st))
    finally:
        conn.close()


def destroy(name: str, timeout_s: float = 20.0) -> bool:
    """Stop the domain if it exists. True if it was running."""
    import libvirt

    conn = _connect()
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return False
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            log.warning("destroy %s: %s", name, exc)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                conn.lookupByName(name)
            except libvirt.libvirtError:
                return True
            time.sleep(0.1)
        return True
    finally:
        conn.close()
