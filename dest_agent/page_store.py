"""The destination's page store: a sparse PFN-indexed image file plus a per-page hash index.

    <path>          image: page `pfn` lives at offset pfn * 4096; never-written pages are holes
    <path>.hashes   index: a 4 KiB header, then one little-endian uint64 per PFN: the page hash (pagecodec) of the
                    page as held, 0 = not held

Durability: `write` only puts pages into the page cache; `sync` makes everything written so far
durable (image first, then the index), so a caller acknowledges batches after `sync` returns.

Crash safety: the header records "open" while the store is in use and "clean" after `close`.
The index is a memory map that the kernel may write back at any moment, so after a crash an
index entry may describe data that never reached the disk. Reopening a store that was not
closed cleanly therefore re-hashes every held page from the image (the image is the truth),
and any page whose data is unknown stays "not held", so the source sends it again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import struct
import threading
from pathlib import Path

import numpy as np

from common.pagecodec import PAGE_SIZE, ZERO_PAGE_HASH, DecodedBatch, page_hashes, runs

INDEX_MAGIC = b"P2VHIDX1"
HEADER_SIZE = 4096
_HEADER = struct.Struct("<8sIIQI")  # magic, version, page_size, max_pfn, state
_VERSION = 2  # 2: xxh64 page hashes (1 held xxh3)
STATE_CLEAN = 1
STATE_OPEN = 2

# Recovery and verification read the image in chunks of this many pages.
_SCAN_PAGES = 4096

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these bytes of the file to disk, without waiting (sync_file_range): a later
    fdatasync then waits only for what is still in flight. Best effort: errors are the fdatasync's."""
    _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class PageStoreError(RuntimeError):
    pass


def index_path(path: Path) -> Path:
    return path.with_name(path.name + ".hashes")


class PageStore:
    """Sparse image + hash index for one migration.

    `PageStore(path, max_pfn)` creates the store, or reopens it when both files exist with the
    same max_pfn. `PageStore.open(path)` reopens with the max_pfn recorded in the index.
    """

    def __init__(self, path: Path, max_pfn: int) -> None:
        if max_pfn <= 0:
            raise ValueError(f"max_pfn must be positive, not {max_pfn}")
        self.path = Path(path)
        self.max_pfn = int(max_pfn)
        self.recovered = False  # True when opening found an unclean store and re-hashed it
        self._lock = threading.Lock()
        self._closed = False
        idx_path = index_path(self.path)
        existing = self.path.exists() and idx_path.exists()
        self._image_fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._index_fd = -1
        self._image_map: mmap.mmap | None = None  # read-only view of the image, for gather()
        try:
            self._index_fd = os.open(idx_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self._index_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PageStoreError(f"page store {self.path} is in use by another process") from None
            if existing and os.fstat(self._index_fd).st_size >= HEADER_SIZE:
                state = self._check_header()
            else:
                state = self._initialise()
            self._index = np.memmap(
                idx_path, dtype="<u8", mode="r+", offset=HEADER_SIZE, shape=(self.max_pfn,)
            )
            self._write_state(STATE_OPEN)
            if state != STATE_CLEAN:
                self._recover()
        except BaseException:
            self._close_fds()
            raise

    @classmethod
    def open(cls, path: Path) -> PageStore:
        """Reopen an existing store; its max_pfn comes from the index header."""
        with open(index_path(Path(path)), "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:8] != INDEX_MAGIC:
            raise PageStoreError(f"{index_path(Path(path))} is not a p2v page store index")
        _, _, _, max_pfn, _ = _HEADER.unpack(header)
        return cls(Path(path), max_pfn)

    # -- setup -------------------------------------------------------------------------------

    def _initialise(self) -> int:
        os.ftruncate(self._image_fd, 0)
        os.ftruncate(self._image_fd, self.max_pfn * PAGE_SIZE)
        os.ftruncate(self._index_fd, 0)
        os.ftruncate(self._index_fd, HEADER_SIZE + self.max_pfn * 8)
        self._write_state(STATE_CLEAN)
        os.fsync(self._index_fd)
        os.fsync(self._image_fd)
        return STATE_CLEAN

    def _check_header(self) -> int:
        magic, version, page_size, max_pfn, state = _HEADER.unpack(os.pread(self._index_fd, _HEADER.size, 0))
        if magic != INDEX_MAGIC or version != _VERSION or page_size != PAGE_SIZE:
            raise PageStoreError(f"{index_path(self.path)}: not a version-{_VERSION} p2v page store index")
        if max_pfn != self.max_pfn:
            raise PageStoreError(f"page store {self.path} holds max_pfn {max_pfn}, asked for {self.max_pfn}")
        if os.fstat(self._image_fd).st_size != self.max_pfn * PAGE_SIZE:
            raise PageStoreError(f"image {self.path} has the wrong size for max_pfn {self.max_pfn}")
        return state

    def _write_state(self, state: int) -> None:
        os.pwrite(self._index_fd, _HEADER.pack(INDEX_MAGIC, _VERSION, PAGE_SIZE, self.max_pfn, state), 0)
        os.fdatasync(self._index_fd)

    def _recover(self) -> None:
        """Re-hash every held page from the image (see the module docstring)."""
        held = np.flatnonzero(self._index)
        if held.size:
            for chunk_start in range(0, self.max_pfn, _SCAN_PAGES):
                chunk_end = min(chunk_start + _SCAN_PAGES, self.max_pfn)
                sel = held[(held >= chunk_start) & (held < chunk_end)]
                if sel.size == 0:
                    continue
                hashes = page_hashes(self.read(chunk_start, chunk_end - chunk_start))
                self._index[sel] = hashes[sel - chunk_start]
        self._index.flush()
        os.fdatasync(self._index_fd)
        self.recovered = True

    # -- the data path -----------------------------------------------------------------------

    def write(self, batch: DecodedBatch) -> int:
        """Write a verified batch into the page cache; returns the pages written (not durable yet)."""
        self._check_open()
        count = int(batch.pfns.size)
        if count == 0:
            return 0
        if int(batch.pfns.max()) >= self.max_pfn:
            raise PageStoreError(f"PFN {int(batch.pfns.max())} outside this store (max_pfn {self.max_pfn})")
        data_pfns = batch.pfns[~batch.zero]
        if data_pfns.size * PAGE_SIZE != len(batch.data):
            raise PageStoreError(f"{data_pfns.size} data pages but {len(batch.data)} bytes of data")
        if data_pfns.size:
            data = memoryview(batch.data)
            for start, length in runs(data_pfns):
                offset = int(data_pfns[start]) * PAGE_SIZE
                chunk = data[start * PAGE_SIZE : (start + length) * PAGE_SIZE]
                written = os.pwrite(self._image_fd, chunk, offset)
                if written != len(chunk):
                    raise PageStoreError(f"short write at PFN {int(data_pfns[start])}")
            self._index[data_pfns] = page_hashes(batch.data)
        zero_pfns = batch.pfns[batch.zero]
        if zero_pfns.size:
            # Pages known to be zero already need no I/O; anything else becomes a hole.
            todo = zero_pfns[self._index[zero_pfns] != np.uint64(ZERO_PAGE_HASH)]
            for start, length in runs(todo):
                self._zero_range(int(todo[start]), length)
            self._index[zero_pfns] = np.uint64(ZERO_PAGE_HASH)
        return count

    def _zero_range(self, pfn: int, count: int) -> None:
        offset, length = pfn * PAGE_SIZE, count * PAGE_SIZE
        if _fallocate(self._image_fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, f"fallocate(PUNCH_HOLE) on {self.path}: {os.strerror(err)}")
        zeros = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            done += os.pwrite(self._image_fd, zeros[: length - done], offset + done)

    def sync(self) -> None:
        """Make every page written so far durable: the image first, then the index."""
        self._check_open()
        os.fdatasync(self._image_fd)
        self._index.flush()
        os.fdatasync(self._index_fd)

    # -- queries -----------------------------------------------------------------------------

    def hashes(self, start_pfn: int = 0, end_pfn: int | None = None) -> np.ndarray:
        """Copy of the hash index for [start_pfn, end_pfn); 0 = not held."""
        self._check_open()
        end = self.max_pfn if end_pfn is None or end_pfn == 0 else min(int(end_pfn), self.max_pfn)
        start = max(0, int(start_pfn))
        if start >= end:
            return np.zeros(0, dtype=np.uint64)
        return np.array(self._index[start:end], dtype=np.uint64)

    def read(self, pfn: int, count: int) -> bytes:
        self._check_open()
        if pfn < 0 or count < 0 or pfn + count > self.max_pfn:
            raise PageStoreError(f"read of PFNs {pfn}..{pfn + count - 1} outside 0..{self.max_pfn - 1}")
        length = count * PAGE_SIZE
        data = os.pread(self._image_fd, length, pfn * PAGE_SIZE)
        if len(data) != length:
            raise PageStoreError(f"short read at PFN {pfn}")
        return data

    def gather(self, pfns: np.ndarray) -> np.ndarray:
        """The pages at these PFNs, in their order, as an (n, PAGE_SIZE) array: one copy through a
        read-only mapping of the image instead of a read per run (V assembles a hibernation image
        from tens of thousands of scattered pages inside P's downtime)."""
        self._check_open()
        pfns = np.asarray(pfns, dtype=np.int64)
        if pfns.size and (int(pfns.min()) < 0 or int(pfns.max()) >= self.max_pfn):
            raise PageStoreError(f"gather of PFNs outside 0..{self.max_pfn - 1}")
        return self._pages()[pfns]

    def warm(self) -> None:
        """Fault every held page into gather()'s mapping now (one byte read from each): a cutover's
        first gathers then find their page tables made (rig's host, 55k pages: 0.12 s of gathering
        on a fresh mapping, 0.03 s on a warm one). Before P's snapshot; again after the pass."""
        self._check_open()
        held = np.flatnonzero(self._index)
        if held.size:
            int(self._pages()[held, 0].max())

    def _pages(self) -> np.ndarray:
        """The image through a read-only mapping, as (max_pfn, PAGE_SIZE)."""
        if self._image_map is None:
            self._image_map = mmap.mmap(self._image_fd, self.max_pfn * PAGE_SIZE, prot=mmap.PROT_READ)
        return np.frombuffer(self._image_map, dtype=np.uint8).reshape(self.max_pfn, PAGE_SIZE)

    def pages_held(self) -> int:
        self._check_open()
        return int(np.count_nonzero(self._index))

    def verify(self) -> int:
        """Re-hash held pages from the image; returns how many disagree with the index."""
        self._check_open()
        mismatches = 0
        for chunk_start in range(0, self.max_pfn, _SCAN_PAGES):
            chunk_end = min(chunk_start + _SCAN_PAGES, self.max_pfn)
            index = np.asarray(self._index[chunk_start:chunk_end])
            held = index != 0
            if not held.any():
                continue
            actual = page_hashes(self.read(chunk_start, chunk_end - chunk_start))
            mismatches += int(np.count_nonzero(actual[held] != index[held]))
        return mismatches

    # -- lifetime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PageStoreError(f"page store {self.path} is closed")

    def close(self) -> None:
        """Sync, mark the store clean and release it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.sync()
                self._write_state(STATE_CLEAN)
            finally:
                self._closed = True
                self._close_fds()

    def _close_fds(self) -> None:
        image_map, self._image_map = getattr(self, "_image_map", None), None
        if image_map is not None:
            try:
                image_map.close()
            except BufferError:
                pass  # an array from gather() still refers to it; the mapping goes with it
        index = getattr(self, "_index", None)
        if index is not None:
            mm = getattr(index, "_mmap", None)
            del self._index
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass  # a caller still holds a view; the mapping goes with it
        for fd in (self._image_fd, self._index_fd):
            if fd >= 0:
                os.close(fd)
        self._image_fd = self._index_fd = -1

    def __enter__(self) -> PageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_image_fd", -1) >= 0:
            # Not closed: leave the header saying "open" so a reopen re-hashes.
            self._closed = True
            self._close_fds()
