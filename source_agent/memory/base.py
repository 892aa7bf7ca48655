"""The memory source interface: page-addressed reads of a machine's (or a region's) memory."""

from __future__ import annotations

import abc
from collections.abc import Iterator

import numpy as np

from common.pagecodec import PAGE_SIZE


class MemorySourceError(OSError):
    pass


class MemorySource(abc.ABC):
    """Memory addressed by page frame number (PFN = physical address / 4096).

    Implementations give at least `read_into`; those that can hand out a zero-copy view of
    live memory also give `view` (the scanner then hashes in place and copies only the pages
    it sends).
    """

    max_pfn: int  # exclusive upper bound of PFNs

    @abc.abstractmethod
    def ranges(self) -> list[tuple[int, int]]:
        """Readable PFN ranges [start, end), sorted, non-overlapping."""

    @abc.abstractmethod
    def read_into(self, pfn: int, out: memoryview) -> None:
        """Fill `out` (a multiple of 4096 bytes) with the pages from `pfn` on, within one range."""

    def view(self, pfn: int, count: int) -> memoryview | None:
        """A zero-copy view of live memory, or None when this source cannot give one."""
        return None

    def read(self, pfn: int, count: int) -> bytes:
        out = bytearray(count * PAGE_SIZE)
        self.read_into(pfn, memoryview(out))
        return bytes(out)

    def skip_mask(self, start_pfn: int, end_pfn: int) -> np.ndarray | None:
        """Pages in [start, end) the image will not need (free pages, holes): True = skip.
        None = no information, read everything."""
        return None

    def total_pages(self) -> int:
        return sum(end - start for start, end in self.ranges())

    def chunks(self, chunk_pages: int) -> Iterator[tuple[int, int]]:
        """(pfn, count) pieces of at most chunk_pages, never crossing a range boundary."""
        for start, end in self.ranges():
            for pfn in range(start, end, chunk_pages):
                yield pfn, min(chunk_pages, end - pfn)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
