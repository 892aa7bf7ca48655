"""V's page hashes as the cutover helper holds them around the snapshot (source_agent/cutover_helper.py)."""

from __future__ import annotations

import mmap
import os

import numpy as np

from common.hibernate_image import PAGE_SIZE, held_content


class DedupTables:
    """V's hash per PFN (`held`, updated by the pass before FREEZE) and the sorted set of V's hashes
    (`content`), each in a mapping of its own so that it can leave P's memory for the snapshot.

    Both are written after the pass before FREEZE read P's memory (the pass updates `held`; `content`
    is made after it): in the image they would travel literally (rig: ~1000 of ~7500 literal pages,
    4 MiB for a 1 GiB P). `stash` writes them to a file, drops that file's pages from the page cache
    and the tables' pages from this process; after CREATE_IMAGE `prefetch` starts reading them back
    and `unstash` (at the first chunk's plan) waits for them, while P's link is still coming back."""

    def __init__(self, held: np.ndarray) -> None:
        self._held_map, self.held = self._mapped(held)
        self._content: tuple[mmap.mmap, np.ndarray] | None = None  # made once `held` is final (a sort)
        self.stashed: str = ""

    @property
    def content(self) -> np.ndarray:
        return self._content_table()[1]

    def _content_table(self) -> tuple[mmap.mmap, np.ndarray]:
        if self._content is None:
            self.update_content()
            assert self._content is not None
        return self._content

    @property
    def _maps(self) -> tuple[mmap.mmap, mmap.mmap]:
        return self._held_map, self._content_table()[0]

    @staticmethod
    def _mapped(values: np.ndarray) -> tuple[mmap.mmap, np.ndarray]:
        values = np.ascontiguousarray(values, dtype=np.uint64)
        # private: MADV_DONTNEED frees private anonymous pages (a shared mapping's stay in shmem)
        memory = mmap.mmap(-1, max(-(-values.nbytes // PAGE_SIZE), 1) * PAGE_SIZE, flags=mmap.MAP_PRIVATE)
        array_ = np.frombuffer(memory, dtype=np.uint64, count=values.size)
        array_[:] = values
        return memory, array_

    def update_content(self) -> None:
        """`content` from `held` as it is now (after the pass before FREEZE)."""
        self._content = self._mapped(held_content(self.held))

    def stash(self, path: str) -> None:
        """Out of memory until `unstash`. Raises OSError (the tables are then still in memory)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for memory in self._maps:
                view, done = memoryview(memory), 0
                while done < len(view):
                    done += os.write(fd, view[done:])
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean now: the page cache lets them go
        finally:
            os.close(fd)
        self.stashed = path  # from here on `unstash` puts back what is in the file
        for memory in self._maps:
            try:
                memory.madvise(mmap.MADV_DONTNEED)  # private anonymous: the pages are freed (reads see zeros)
            except OSError:
                pass  # they stay in the image; unstash rewrites them as they are

    def prefetch(self) -> None:
        """Start reading the file back (the kernel's readahead) while the caller goes on: after
        CREATE_IMAGE, P's disk answers only once its error handling has revalidated it (rig: 0.15 s).
        Never raises: `unstash` then reads without it."""
        if not self.stashed:
            return
        try:
            fd = os.open(self.stashed, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass

    def unstash(self) -> None:
        """Back from the file, which goes. Raises OSError (a short file included)."""
        if not self.stashed:
            return
        with open(self.stashed, "rb") as f:
            for memory in self._maps:
                if f.readinto(memory) != len(memory):
                    raise OSError(f"{self.stashed}: shorter than the dedup tables written to it")
        discard_stash(self.stashed)
        self.stashed = ""


def discard_stash(path: str) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass
