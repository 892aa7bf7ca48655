"""Synthetic hibernation images in the x86_64 6.1 layout (for tests without /dev/snapshot)."""

from __future__ import annotations

import struct

import numpy as np

from common.hibernate_image import PAGE_SIZE, RESTORE_MAGIC, meta_pages_for


def make_image(pfns: list[int] | np.ndarray, seed: int = 0, num_physpages: int = 262_000,
               e820: int = 0x3DF3DAC1) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(image bytes, pfns, data pages as (n, 4096) uint8)."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(pfns.size, PAGE_SIZE), dtype=np.uint8)
    n_meta = meta_pages_for(pfns.size)
    pages = 1 + n_meta + pfns.size
    header = bytearray(PAGE_SIZE)
    struct.pack_into("<QQQQQ", header, 0, 0xFFFFFFFF899D5000, 0x10BD5000, 0x25F8000, RESTORE_MAGIC, e820)
    struct.pack_into("<QiiQQQ", header, 400, num_physpages, 0, 0, pfns.size, pages, pages * PAGE_SIZE)
    meta = np.full(n_meta * (PAGE_SIZE // 8), (1 << 64) - 1, dtype="<u8")
    meta[: pfns.size] = pfns
    return bytes(header) + meta.tobytes() + data.tobytes(), pfns, data
