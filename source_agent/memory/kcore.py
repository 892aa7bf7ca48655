"""All physical RAM through /proc/kcore, addressed by PFN; free pages from /proc/kpageflags.

/proc/kcore is an ELF core file of the running kernel. Its PT_LOAD segments of type
KCORE_RAM map the kernel's direct map, and since Linux 4.x their p_paddr holds the physical
address (__pa of the segment); kernel text and vmalloc segments carry another offset or -1.
So the direct-map segments are those whose (p_vaddr - p_paddr) is the direct-map base, found
as the offset shared by the most bytes. PFNs then are the hibernation image's PFNs.

Reading kcore is a live read (not a snapshot); pages the kernel cannot read come back zero.
"""

from __future__ import annotations

import os
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.pagecodec import PAGE_SIZE

from .base import MemorySource, MemorySourceError

PT_LOAD = 1
PN_XNUM = 0xFFFF
_NO_PADDR = 0xFFFFFFFFFFFFFFFF
_U64 = 1 << 64

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")

# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_SLAB = 7
KPF_BUDDY = 10
KPF_HWPOISON = 19
KPF_NOPAGE = 20
KPF_OFFLINE = 23
KPF_PGTABLE = 26
SKIP_BITS = (1 << KPF_BUDDY) | (1 << KPF_HWPOISON) | (1 << KPF_NOPAGE) | (1 << KPF_OFFLINE)


@dataclass(frozen=True)
class LoadSegment:
    offset: int  # file offset in kcore
    vaddr: int
    paddr: int
    size: int


def parse_elf_load_segments(fd: int) -> list[LoadSegment]:
    header = os.pread(fd, _EHDR.size, 0)
    if len(header) < _EHDR.size or header[:4] != b"\x7fELF":
        raise MemorySourceError("not an ELF file")
    if header[4] != 2 or header[5] != 1:
        raise MemorySourceError("not a little-endian 64-bit ELF file")
    (_, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, _, _, _) = _EHDR.unpack(header)
    if phnum == PN_XNUM:  # more than 65534 segments: the count is in section header 0
        sh0 = _SHDR.unpack(os.pread(fd, _SHDR.size, shoff))
        phnum = sh0[7]
    if phentsize != _PHDR.size:
        raise MemorySourceError(f"unexpected program header size {phentsize}")
    table = os.pread(fd, phnum * phentsize, phoff)
    if len(table) != phnum * phentsize:
        raise MemorySourceError("truncated program header table")
    segments = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, _, _ = _PHDR.unpack_from(table, i * phentsize)
        if p_type == PT_LOAD and p_filesz > 0:
            segments.append(LoadSegment(p_offset, p_vaddr, p_paddr, p_filesz))
    return segments


def direct_map_segments(segments: list[LoadSegment], direct_map_base: int | None = None) -> list[LoadSegment]:
    """The segments of the kernel's direct map (see the module docstring)."""
    candidates = [s for s in segments if s.paddr != _NO_PADDR]
    if not candidates:
        raise MemorySourceError("no PT_LOAD segment carries a physical address (kernel too old?)")
    if direct_map_base is None:
        weight: dict[int, int] = defaultdict(int)
        for s in candidates:
            weight[(s.vaddr - s.paddr) % _U64] += s.size
        direct_map_base = max(weight, key=lambda k: weight[k])
    chosen = [s for s in candidates if (s.vaddr - s.paddr) % _U64 == direct_map_base]
    return sorted(chosen, key=lambda s: s.paddr)


class KPageFlags:
    """Which pages are free or absent, from /proc/kpageflags (+ /proc/kpagecount). Root only.

    KPF_BUDDY marks only the first page of a free buddy block; the rest of the block has no
    flags and a zero reference count, so with free_tails those pages are skipped too. A page
    wrongly skipped costs nothing but efficiency: the cutover sends whatever the image holds
    that the destination does not.
    """

    def __init__(self, flags_path: str = "/proc/kpageflags", count_path: str | None = "/proc/kpagecount",
                 *, free_tails: bool = True) -> None:
        self._flags_fd = os.open(flags_path, os.O_RDONLY | os.O_CLOEXEC)
        self._count_fd = -1
        if free_tails and count_path:
            try:
                self._count_fd = os.open(count_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._count_fd = -1

    def _read(self, fd: int, start: int, end: int, beyond: int) -> np.ndarray:
        data = os.pread(fd, (end - start) * 8, start * 8)
        out = np.full(end - start, beyond, dtype=np.uint64)
        got = np.frombuffer(data[: len(data) // 8 * 8], dtype="<u8")
        out[: got.size] = got
        return out

    def skip_mask(self, start: int, end: int) -> np.ndarray:
        flags = self._read(self._flags_fd, start, end, beyond=1 << KPF_NOPAGE)
        skip = (flags & np.uint64(SKIP_BITS)) != 0
        if self._count_fd >= 0:
            counts = self._read(self._count_fd, start, end, beyond=0)
            skip |= (counts == 0) & (flags == 0)
        return skip

    def close(self) -> None:
        for fd in (self._flags_fd, self._count_fd):
            if fd >= 0:
                os.close(fd)
        self._flags_fd = self._count_fd = -1


class KcoreSource(MemorySource):
    def __init__(self, path: str | os.PathLike[str] = "/proc/kcore", *, direct_map_base: int | None = None,
                 kpageflags: KPageFlags | bool | None = True) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.segments = direct_map_segments(parse_elf_load_segments(self._fd), direct_map_base)
        except BaseException:
            os.close(self._fd)
            raise
        # (start_pfn, end_pfn, file offset of start_pfn), pages wholly inside a segment
        self._ranges: list[tuple[int, int, int]] = []
        for s in self.segments:
            first = -(-s.paddr // PAGE_SIZE)
            last = (s.paddr + s.size) // PAGE_SIZE
            if last > first:
                self._ranges.append((first, last, s.offset + first * PAGE_SIZE - s.paddr))
        if not self._ranges:
            os.close(self._fd)
            raise MemorySourceError(f"{self.path}: no direct-map RAM found")
        self.max_pfn = max(end for _, end, _ in self._ranges)
        self._starts = [start for start, _, _ in self._ranges]
        self._flags: KPageFlags | None = None
        if isinstance(kpageflags, KPageFlags):
            self._flags = kpageflags
        elif kpageflags:
            try:
                self._flags = KPageFlags()
            except OSError:
                self._flags = None  # not root or no such file: read everything

    def ranges(self) -> list[tuple[int, int]]:
        return [(start, end) for start, end, _ in self._ranges]

    def _locate(self, pfn: int, count: int) -> int:
        for start, end, offset in self._ranges:
            if start <= pfn and pfn + count <= end:
                return offset + (pfn - start) * PAGE_SIZE
        raise MemorySourceError(f"PFNs {pfn}..{pfn + count - 1} are not inside one RAM range")

    def read_into(self, pfn: int, out: memoryview) -> None:
        count = len(out) // PAGE_SIZE
        offset = self._locate(pfn, count)
        done = 0
        while done < len(out):
            n = os.preadv(self._fd, [out[done:]], offset + done)
            if n <= 0:
                raise MemorySourceError(f"{self.path}: short read at PFN {pfn + done // PAGE_SIZE}")
            done += n

    def skip_mask(self, start_pfn: int, end_pfn: int) -> np.ndarray | None:
        if self._flags is None:
            return None
        return self._flags.skip_mask(start_pfn, end_pfn)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._flags is not None:
            self._flags.close()
