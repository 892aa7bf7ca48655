"""The hibernation image as /dev/snapshot yields it (x86_64, Linux 6.1 layout): pure parsing.

An image read from /dev/snapshot is a sequence of 4 KiB pages:

    page 0                       header: struct swsusp_info, with x86's arch header over `uts`
    pages 1 .. nr_meta           PFN metadata: the PFNs of the data pages, 512 little-endian
                                 uint64 per page, in increasing order; the last page is padded
                                 after an end marker (~0)
    then image_pages data pages  the saved content of each listed PFN, in the listed order

Header offsets (kernel/power/power.h, arch/x86/power/hibernate.c):
    +0 jump_address  +8 jump_address_phys  +16 cr3  +24 magic  +32 e820_checksum (crc32 of the
    firmware e820 table)  ...  +392 version_code (u32; unused while the arch header is in place)
    +400 num_physpages  +408 cpus (int)  +416 image_pages  +424 pages  +432 size

The restoring kernel checks the arch header (magic, e820 checksum) and num_physpages itself; on x86
it does not check the kernel build, so the caller must make sure the restoring kernel is P's.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAGE_SIZE = 4096
PFNS_PER_META_PAGE = PAGE_SIZE // 8
END_OF_MAP = (1 << 64) - 1
#: arch/x86/power/hibernate.c RESTORE_MAGIC (6.1)
RESTORE_MAGIC = 0x23456789ABCDEF02
#: Newer kernels (6.9+) mark zero pages in the PFN list's high bits; 6.1 does not. We refuse images
#: with any of these bits set rather than misreading them.
PFN_FLAG_BITS = 0xFFF0_0000_0000_0000

_ARCH = struct.Struct("<QQQQQ")
_COUNTS = struct.Struct("<QiiQQQ")  # num_physpages, cpus, (pad), image_pages, pages, size
_COUNTS_OFFSET = 400

# --- /dev/snapshot ioctls (include/uapi/linux/suspend_ioctls.h), computed like _IO/_IOR/_IOW ---
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
SNAPSHOT_IOC_MAGIC = ord("3")


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (SNAPSHOT_IOC_MAGIC << 8) | nr


SNAPSHOT_FREEZE = _ioc(_IOC_NONE, 1, 0)
SNAPSHOT_UNFREEZE = _ioc(_IOC_NONE, 2, 0)
SNAPSHOT_ATOMIC_RESTORE = _ioc(_IOC_NONE, 4, 0)
SNAPSHOT_FREE = _ioc(_IOC_NONE, 5, 0)
SNAPSHOT_FREE_SWAP_PAGES = _ioc(_IOC_NONE, 9, 0)
SNAPSHOT_S2RAM = _ioc(_IOC_NONE, 11, 0)
SNAPSHOT_SET_SWAP_AREA = _ioc(_IOC_WRITE, 13, 12)  # struct resume_swap_area is packed: 8 + 4
SNAPSHOT_GET_IMAGE_SIZE = _ioc(_IOC_READ, 14, 8)  # __kernel_loff_t
SNAPSHOT_PLATFORM_SUPPORT = _ioc(_IOC_NONE, 15, 0)
SNAPSHOT_POWER_OFF = _ioc(_IOC_NONE, 16, 0)
SNAPSHOT_CREATE_IMAGE = _ioc(_IOC_WRITE, 17, 4)  # int *in_suspend
SNAPSHOT_PREF_IMAGE_SIZE = _ioc(_IOC_NONE, 18, 0)
SNAPSHOT_AVAIL_SWAP_SIZE = _ioc(_IOC_READ, 19, 8)
SNAPSHOT_ALLOC_SWAP_PAGE = _ioc(_IOC_READ, 20, 8)


class ImageFormatError(ValueError):
    """The bytes are not a hibernation image this code understands."""


@dataclass(frozen=True)
class ImageHeader:
    jump_address: int
    jump_address_phys: int
    cr3: int
    magic: int
    e820_checksum: int
    num_physpages: int
    cpus: int
    image_pages: int  # data pages
    pages: int  # all pages: 1 header + meta + data
    size: int  # bytes, pages * 4096

    @property
    def meta_pages(self) -> int:
        return self.pages - 1 - self.image_pages

    @property
    def data_offset(self) -> int:
        """Byte offset of the first data page in the image."""
        return (1 + self.meta_pages) * PAGE_SIZE


def meta_pages_for(image_pages: int) -> int:
    return -(-image_pages // PFNS_PER_META_PAGE)


def parse_header(page: bytes) -> ImageHeader:
    """Parse and sanity-check the header page. Raises ImageFormatError with the reason."""
    if len(page) != PAGE_SIZE:
        raise ImageFormatError(f"header must be one {PAGE_SIZE}-byte page, got {len(page)} bytes")
    jump, jump_phys, cr3, magic, e820 = _ARCH.unpack_from(page, 0)
    num_physpages, cpus, _pad, image_pages, pages, size = _COUNTS.unpack_from(page, _COUNTS_OFFSET)
    hdr = ImageHeader(jump, jump_phys, cr3, magic, e820, num_physpages, cpus, image_pages, pages, size)
    if magic != RESTORE_MAGIC:
        raise ImageFormatError(f"arch header magic {magic:#x} is not x86_64's {RESTORE_MAGIC:#x} "
                               "(not an x86_64 6.1-layout hibernation image)")
    if image_pages == 0 or pages != 1 + meta_pages_for(image_pages) + image_pages:
        raise ImageFormatError(f"inconsistent page counts: pages={pages} image_pages={image_pages} "
                               f"(expected {1 + meta_pages_for(image_pages) + image_pages})")
    if size != pages * PAGE_SIZE:
        raise ImageFormatError(f"size {size} != pages {pages} * {PAGE_SIZE}")
    if num_physpages == 0 or image_pages > num_physpages:
        raise ImageFormatError(f"image_pages {image_pages} exceeds num_physpages {num_physpages}")
    return hdr


def parse_pfns(meta: bytes, image_pages: int, max_pfn: int | None = None) -> np.ndarray:
    """The PFN list from the metadata pages (uint64 array of length image_pages)."""
    n_meta = meta_pages_for(image_pages)
    if len(meta) != n_meta * PAGE_SIZE:
        raise ImageFormatError(f"metadata is {len(meta)} bytes, expected {n_meta} pages")
    words = np.frombuffer(meta, dtype="<u8")
    pfns = words[:image_pages].astype(np.uint64)
    if image_pages < words.size and int(words[image_pages]) != END_OF_MAP:
        raise ImageFormatError("PFN list is not terminated by the end-of-map marker")
    if np.any(pfns & np.uint64(PFN_FLAG_BITS)):
        raise ImageFormatError("PFN list carries flag bits (newer image format): unsupported")
    if pfns.size > 1 and not np.all(pfns[1:] > pfns[:-1]):
        raise ImageFormatError("PFN list is not strictly increasing")
    if max_pfn is not None and pfns.size and int(pfns[-1]) >= max_pfn:
        raise ImageFormatError(f"PFN {int(pfns[-1])} is beyond max_pfn {max_pfn}")
    return pfns


# --- firmware map -----------------------------------------------------------------------------

E820_TYPES = {
    "System RAM": 1, "Reserved": 2, "reserved": 2, "ACPI Tables": 3, "ACPI Non-volatile Storage": 4,
    "Unusable memory": 5, "Persistent Memory (legacy)": 12, "Persistent Memory": 7,
    "Soft Reserved": 0xEFFFFFFF,
}


@dataclass(frozen=True)
class MemmapEntry:
    start: int
    end: int  # exclusive
    type: str


def e820_checksum(entries: Sequence[MemmapEntry]) -> int:
    """crc32 of the firmware e820 table as the kernel stores it (u32 count, then packed
    {u64 addr, u64 size, u32 type} entries) — what the image header's e820 checksum is."""
    blob = bytearray(struct.pack("<I", len(entries)))
    for e in entries:
        if e.type not in E820_TYPES:
            raise ImageFormatError(f"unknown firmware memory type {e.type!r}")
        blob += struct.pack("<QQI", e.start, e.end - e.start, E820_TYPES[e.type])
    return binascii.crc32(bytes(blob)) & 0xFFFFFFFF


def read_sys_memmap(root: str = "/sys/firmware/memmap") -> list[MemmapEntry]:
    """P's (or the VM's) firmware map from sysfs, in index order; `end` made exclusive."""
    import os

    entries = []
    names = sorted((n for n in os.listdir(root) if n.isdigit()), key=int)
    for n in names:
        def rd(f: str, n: str = n) -> str:
            with open(f"{root}/{n}/{f}") as fh:
                return fh.read().strip()
        entries.append(MemmapEntry(int(rd("start"), 16), int(rd("end"), 16) + 1, rd("type")))
    return entries


# --- dedup at cutover ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DedupPlan:
    send: np.ndarray  # bool per data page: True = send its bytes, False = V holds it
    pages: int
    sent_pages: int
    #: bool per data page: V holds its content, though at another PFN (sent as its hash); never
    #: set where `send` is
    by_hash: np.ndarray | None = None

    @property
    def by_hash_pages(self) -> int:
        return 0 if self.by_hash is None else int(np.count_nonzero(self.by_hash))

    @property
    def skipped_pages(self) -> int:
        """Pages V takes from its store at the same PFN."""
        return self.pages - self.sent_pages - self.by_hash_pages


def held_content(held: np.ndarray) -> np.ndarray:
    """Every page hash V holds, sorted and unique (0 = nothing held is left out), for plan_dedup's
    lookup by content. Pure."""
    unique = np.unique(held.astype(np.uint64, copy=False))
    return unique[unique != 0]


def plan_dedup(pfns: np.ndarray, page_hashes: np.ndarray, held: np.ndarray,
               content: np.ndarray | None = None) -> DedupPlan:
    """Which data pages must travel: those whose hash differs from V's held hash for that PFN
    (0 in `held` = not held; a PFN beyond `held` = not held). With `content` (held_content(held)),
    a page V holds at another PFN travels as its hash only: the kernel moves pages between the
    last pre-copy round and the snapshot (rig: 30 % of the pages that differ by PFN). Pure."""
    if pfns.shape != page_hashes.shape:
        raise ValueError(f"{pfns.size} PFNs but {page_hashes.size} hashes")
    hashes = page_hashes.astype(np.uint64, copy=False)
    idx = pfns.astype(np.intp, copy=False)
    if pfns.size and int(pfns.max()) < held.size:  # the usual case: one gather, no masks
        held_for = held[idx]
    else:
        known = idx < held.size
        held_for = np.zeros(pfns.size, dtype=np.uint64)
        held_for[known] = held[idx[known]]
    send = (held_for == 0) | (held_for != hashes)
    by_hash = None
    if content is not None and content.size:
        # looked up only for the pages that would travel (a quarter or fewer): this runs in P's downtime
        differ = np.flatnonzero(send)
        wanted = hashes[differ]
        at = np.minimum(np.searchsorted(content, wanted), content.size - 1)
        by_hash = np.zeros(pfns.size, dtype=bool)
        by_hash[differ[content[at] == wanted]] = True
        send = send & ~by_hash
    return DedupPlan(send=send, pages=int(pfns.size), sent_pages=int(np.count_nonzero(send)), by_hash=by_hash)
