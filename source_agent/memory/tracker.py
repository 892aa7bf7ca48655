"""Dirty tracking: which pages differ from what the destination holds.

HashTracker keeps one page hash (pagecodec) per PFN: the hash of the content the destination was sent
(0 = nothing sent). A page is dirty when its current hash differs. It needs no kernel support
and doubles as dedup at cutover (the destination's HeldHashes use the same hash).

There is no kernel-assisted tracker: soft-dirty bits and PAGEMAP_SCAN see only user mappings, and
P's image is mostly kernel memory and page cache. One would narrow the pages the scan reads (a hook
called by the scan, which does not exist yet) and still compare hashes in `dirty()`, so that both
kinds agree on what was sent.
"""

from __future__ import annotations

import abc

import numpy as np

from common.pagecodec import page_hashes


class DirtyTracker(abc.ABC):
    def __init__(self, max_pfn: int, sent: np.ndarray | None = None) -> None:
        """`sent`: an array of max_pfn hashes to track in place (the cutover helper's copy of V's
        held hashes), else a new one of zeros."""
        if sent is not None and (sent.dtype != np.uint64 or sent.shape != (max_pfn,)):
            raise ValueError(f"sent must be {max_pfn} uint64 hashes, not {sent.dtype} {sent.shape}")
        self.max_pfn = max_pfn
        self.sent = np.zeros(max_pfn, dtype=np.uint64) if sent is None else sent  # hash of the content sent, 0 = none

    def begin_round(self, round_no: int) -> None:  # noqa: B027 - optional hook
        """Called before each round's scan (a soft-dirty tracker reads and clears its bits here)."""

    @abc.abstractmethod
    def dirty(self, pfn: int, pages: np.ndarray, spans: list[tuple[int, int]] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """For the (n, 4096) pages starting at pfn: (indices of changed pages, their hashes).
        `spans`: look only at these (first index, count) spans of `pages` (the others are free)."""

    def mark_sent(self, pfns: np.ndarray, hashes: np.ndarray) -> None:
        self.sent[pfns] = hashes

    def seed(self, start_pfn: int, held: np.ndarray) -> None:
        """Start from what the destination already holds (its HeldHashes)."""
        self.sent[start_pfn : start_pfn + held.size] = held

    def pages_known(self) -> int:
        return int(np.count_nonzero(self.sent))


class HashTracker(DirtyTracker):
    def dirty(self, pfn: int, pages: np.ndarray, spans: list[tuple[int, int]] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        if spans is None:
            hashes = page_hashes(pages)
            changed = np.flatnonzero(hashes != self.sent[pfn : pfn + hashes.size])
            return changed, hashes[changed]
        if not spans:
            return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.uint64)
        idx = np.concatenate([np.arange(first, first + n) for first, n in spans])
        hashes = np.concatenate([page_hashes(pages[first:first + n]) for first, n in spans])
        changed = np.flatnonzero(hashes != self.sent[pfn + idx])
        return idx[changed], hashes[changed]
