"""Memory from a file or a shared-memory region (/dev/shm/...), for tests and benchmarks."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from common.pagecodec import PAGE_SIZE

from .base import MemorySource, MemorySourceError


class FileSource(MemorySource):
    """A file mapped shared: PFN n is bytes [n*4096, (n+1)*4096) of the file.

    With writable=True the mapping is writable and `array` exposes it, so a workload in the
    same process can dirty pages; a workload in another process maps the same file itself.
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        self.path = Path(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        self._fd = os.open(self.path, flags | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            if size == 0 or size % PAGE_SIZE:
                raise MemorySourceError(f"{self.path}: size {size} is not a positive multiple of {PAGE_SIZE}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(self._fd)
            raise
        self.writable = writable
        self.max_pfn = size // PAGE_SIZE
        self._view = memoryview(self._map)
        self._array = np.frombuffer(self._map, dtype=np.uint8)

    @classmethod
    def create(cls, path: str | os.PathLike[str], size_bytes: int, *, writable: bool = True) -> FileSource:
        """A new sparse (all-zero) region of size_bytes, rounded up to whole pages."""
        pages = -(-size_bytes // PAGE_SIZE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, pages * PAGE_SIZE)
        finally:
            os.close(fd)
        return cls(path, writable=writable)

    @property
    def array(self) -> np.ndarray:
        """The whole region as a uint8 array (writable when opened writable)."""
        return self._array

    def ranges(self) -> list[tuple[int, int]]:
        return [(0, self.max_pfn)]

    def _check(self, pfn: int, count: int) -> None:
        if pfn < 0 or count < 0 or pfn + count > self.max_pfn:
            raise MemorySourceError(f"PFNs {pfn}..{pfn + count - 1} outside 0..{self.max_pfn - 1}")

    def read_into(self, pfn: int, out: memoryview) -> None:
        count = len(out) // PAGE_SIZE
        self._check(pfn, count)
        out[:] = self._view[pfn * PAGE_SIZE : (pfn + count) * PAGE_SIZE]

    def view(self, pfn: int, count: int) -> memoryview:
        self._check(pfn, count)
        return self._view[pfn * PAGE_SIZE : (pfn + count) * PAGE_SIZE]

    def close(self) -> None:
        if self._fd < 0:
            return
        self._view.release()
        del self._array
        try:
            self._map.close()
        except BufferError:
            pass  # views handed out are still alive; the mapping goes when they do
        os.close(self._fd)
        self._fd = -1
