"""Pre-flight check of the hibernation carrier (lifecycle step 2): a pure verdict from data.

Input: P's inventory (source_pb2.Inventory) and what V says its waiting VM will be
(destination_pb2.VirtualDeviceCatalog, requested with P's memory size). Output: a list of reasons,
blocking or warnings. Nothing is read from the system here and nothing is changed anywhere.

The rules come from measured facts (shared/research/hibernate-carrier): the restoring kernel refuses
an image whose firmware e820 map or memory size differ; the image must fit in free RAM at snapshot
time (no swap); the restoring kernel must be P's own build; the VM's CPU must offer what P's kernel
uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from p2v.v1 import destination_pb2, source_pb2

#: The image needs about the used memory again as free memory (the kernel copies every saveable
#: page); keep this much of the available memory in reserve for the kernel's own allocations.
IMAGE_RESERVE_FRACTION = 0.10
#: V's page store holds P's memory; the image file on top needs about the used memory again.
DISK_SPACE_FACTOR = 2


@dataclass(frozen=True)
class Reason:
    code: str
    message: str
    blocking: bool = True


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def lockdown_selected(text: str) -> str:
    """"none" / "integrity" / "confidentiality" from the lockdown file ("[none] integrity ...")
    or from an already-selected word; "" when unknown."""
    text = text.strip()
    if "[" in text and "]" in text:
        return text[text.index("[") + 1:text.index("]")].strip()
    return text


MIB = 1 << 20
FOUR_GIB = 1 << 32


def installed_ram_bytes(memmap: Iterable) -> int:
    """The machine's RAM size from its firmware map: low RAM up to the end of the highest "System RAM"
    range below 4 GiB (firmware keeps a little at its top), plus all RAM above 4 GiB, in whole MiB.
    MemTotal is smaller (the kernel's own reservations) and is not what a VM is given."""
    low_end, high = 0, 0
    for e in memmap:
        if e.type.strip().lower() != "system ram":
            continue
        if e.end <= FOUR_GIB:
            low_end = max(low_end, e.end)
        else:
            high += e.end - max(e.start, FOUR_GIB)
    return -(-low_end // MIB) * MIB + -(-high // MIB) * MIB


def estimated_image_bytes(inventory: source_pb2.Inventory) -> int:
    """The image holds the used (saveable) pages: about RAM minus what is available."""
    return max(0, inventory.memory_bytes - inventory.mem_available_bytes)


def _ranges(entries: Iterable) -> list[tuple[int, int, str]]:
    return [(e.start, e.end, e.type.strip().lower()) for e in entries]


def memmap_difference(source: Iterable, target: Iterable) -> str:
    """'' when the two firmware maps are equal, else a description of the first difference."""
    a, b = _ranges(source), _ranges(target)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return (f"entry {i}: P has {x[0]:#x}-{x[1]:#x} {x[2]!r}, the VM would have "
                    f"{y[0]:#x}-{y[1]:#x} {y[2]!r}")
    if len(a) != len(b):
        return f"P's map has {len(a)} entries, the VM's {len(b)}"
    return ""


def check_carrier(inventory: source_pb2.Inventory,
                  catalog: destination_pb2.VirtualDeviceCatalog) -> list[Reason]:
    """Every reason the hibernation carrier cannot (or might not) move this P to this V."""
    reasons: list[Reason] = []
    if not inventory.snapshot_device:
        reasons.append(Reason("snapshot-device", "P's kernel has no /dev/snapshot "
                              "(needs CONFIG_HIBERNATION and CONFIG_HIBERNATION_SNAPSHOT_DEV)"))
    mode = lockdown_selected(inventory.lockdown)
    if mode not in ("", "none"):
        reasons.append(Reason("lockdown", f"kernel lockdown is {mode!r}: hibernation is disabled "
                              "while the kernel is locked down"))
    image = estimated_image_bytes(inventory)
    usable = int(inventory.mem_available_bytes * (1 - IMAGE_RESERVE_FRACTION))
    if inventory.memory_bytes and image > usable:
        reasons.append(Reason("image-fits-ram", f"the image (about {_mib(image)} of used memory) does "
                              f"not fit in free RAM ({_mib(inventory.mem_available_bytes)} available, "
                              f"{_mib(usable)} usable): free memory first; there is no swap fallback"))
    if not catalog.cutover_supported:
        reasons.append(Reason("destination-cutover", "the destination cannot build a waiting VM or "
                              "receive an image (no cutover support configured)"))
    ram = installed_ram_bytes(inventory.firmware_memmap) or inventory.memory_bytes
    if catalog.max_memory_bytes and ram > catalog.max_memory_bytes:
        reasons.append(Reason("memory-size", f"P has {_mib(ram)} of RAM, the "
                              f"destination gives a VM at most {_mib(catalog.max_memory_bytes)}; the "
                              "restoring kernel needs exactly P's memory size"))
    if not inventory.firmware_memmap:
        reasons.append(Reason("firmware-map", "P's firmware memory map is unknown "
                              "(/sys/firmware/memmap missing)"))
    elif not catalog.vm_firmware_memmap:
        reasons.append(Reason("firmware-map", "the destination did not state the firmware memory map "
                              "of the VM it would build"))
    else:
        diff = memmap_difference(inventory.firmware_memmap, catalog.vm_firmware_memmap)
        if diff:
            reasons.append(Reason("firmware-map", "the VM's firmware memory map would differ from P's "
                                  f"({diff}); the restoring kernel refuses such an image. Use warm "
                                  "cutover for this host"))
    if inventory.kernel_release not in set(catalog.kernel_releases):
        have = ", ".join(catalog.kernel_releases) or "none"
        reasons.append(Reason("kernel", f"the destination has no kernel {inventory.kernel_release!r} "
                              f"to boot the waiting VM with (it has: {have})"))
    if catalog.vm_cpu_model and inventory.cpu_model.strip() != catalog.vm_cpu_model.strip():
        reasons.append(Reason("cpu-model", f"P's CPU is {inventory.cpu_model!r}, the VM's would be "
                              f"{catalog.vm_cpu_model!r}: P's kernel may use features the VM lacks"))
    elif not catalog.vm_cpu_model:
        reasons.append(Reason("cpu-model", "the destination did not state its VM CPU model", blocking=False))
    need = inventory.memory_bytes + DISK_SPACE_FACTOR * image
    if catalog.free_disk_bytes and catalog.free_disk_bytes < need:
        reasons.append(Reason("disk-space", f"the destination has {_mib(catalog.free_disk_bytes)} free, "
                              f"needs about {_mib(need)} (page store + image)"))
    return reasons


def merge_into_verdict(verdict: source_pb2.CheckVerdict, reasons: Iterable[Reason]) -> source_pb2.CheckVerdict:
    """Add carrier reasons to the device plan's verdict; ok only if nothing blocks."""
    for r in reasons:
        verdict.reasons.add(code=r.code, message=r.message, blocking=r.blocking)
    verdict.ok = not any(r.blocking for r in verdict.reasons)
    return verdict
