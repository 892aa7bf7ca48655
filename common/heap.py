"""glibc's heap in the source agent: what P's hibernation image carries of it.

The snapshot holds every page in use, so memory the agent freed but glibc kept mapped costs
downtime like any other page. Two things keep it out:

- `fix_mmap_threshold`, at the agent's start: glibc raises its mmap threshold to the size of
  every large block freed (up to 32 MiB), after which blocks that large come from the heap and its
  per-thread arenas, where freed memory stays behind. Pre-copy allocates 16 MiB buffers and copies
  that large in worker threads: under the dynamic threshold the agent on the rig grew from 28 to
  102, 129 and 190 MiB over three pre-copies, with the threshold fixed it stayed at 37-38 MiB
  (bench/README, sixth session).
- `trim_heap`, right before the snapshot: what is free in the heap goes back to the kernel.

The cutover helper, forked from the agent, does the opposite (`hold_freed_memory`): after the
snapshot nothing it allocates is in the image, and under a fixed threshold every chunk's copies
and compressed output would be mapped afresh, faulted in and unmapped again, inside the downtime
(a loop of the helper's per-chunk copies, zstd output and frames in P under TCG: 0.97-1.36 s with
the fixed threshold, 0.50-0.74 s held, 0.50-0.77 s under glibc's default).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value: only the dynamic raise is switched off
HOLD_MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
HOLD_TRIM_THRESHOLD = 1 << 30


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Blocks of `threshold` bytes and more are mapped on their own and unmapped when freed; setting
    it switches off glibc's dynamic raise (mallopt(3)). False where it cannot (not glibc)."""
    try:
        return bool(_libc().mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError) as exc:
        log.warning("mallopt unavailable: %s", exc)
        return False


def hold_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and keep what is freed there (trim_heap still gives
    it back when asked). For a process whose later allocations are not in any image."""
    try:
        libc = _libc()
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HOLD_MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, HOLD_TRIM_THRESHOLD))
    except (OSError, AttributeError) as exc:
        log.warning("mallopt unavailable: %s", exc)
        return False


def trim_heap() -> bool:
    """Hand glibc's freed heap back to the kernel (malloc_trim). Never raises; False where it
    cannot (not glibc: the image is just larger)."""
    try:
        _libc().malloc_trim(0)
        return True
    except (OSError, AttributeError) as exc:
        log.warning("malloc_trim unavailable: %s", exc)
        return False
