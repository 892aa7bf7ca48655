"""Memory sources (file, kcore parser on a synthetic core), kpageflags, workload, tracker."""

from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest

from common.pagecodec import PAGE_SIZE, page_hashes
from source_agent.memory import (
    FileSource,
    HashTracker,
    KcoreSource,
    KPageFlags,
    MemorySourceError,
    Workload,
    fill_region,
    open_memory_source,
)
from source_agent.memory.kcore import (
    KPF_BUDDY,
    KPF_NOPAGE,
    KPF_SLAB,
    direct_map_segments,
    parse_elf_load_segments,
)


def test_file_source_reads_and_views(tmp_path) -> None:
    src = FileSource.create(tmp_path / "mem", 64 * PAGE_SIZE)
    fill_region(src.array, "random", seed=1)
    assert src.max_pfn == 64 and src.ranges() == [(0, 64)] and src.total_pages() == 64
    expect = src.array[5 * PAGE_SIZE : 8 * PAGE_SIZE].tobytes()
    assert src.read(5, 3) == expect
    assert bytes(src.view(5, 3)) == expect
    assert list(src.chunks(30)) == [(0, 30), (30, 30), (60, 4)]
    with pytest.raises(MemorySourceError):
        src.read(63, 2)
    src.close()
    ro = open_memory_source(f"file:{tmp_path / 'mem'}")
    assert ro.read(5, 3) == expect
    with pytest.raises(TypeError):
        ro.view(0, 1)[0] = 1  # read-only mapping
    ro.close()
    with pytest.raises(ValueError, match="unknown memory source"):
        open_memory_source("floppy")


def test_file_source_rejects_odd_sizes(tmp_path) -> None:
    (tmp_path / "odd").write_bytes(b"x" * 5000)
    with pytest.raises(MemorySourceError):
        FileSource(tmp_path / "odd")


DIRECT_MAP = 0xFFFF888000000000
KTEXT = 0xFFFFFFFF80000000


def write_fake_kcore(path, segments: list[tuple[int, int, int, bytes]]) -> None:
    """An ELF64 core with PT_LOAD segments (vaddr, paddr, _, data), data after the headers."""
    phnum = len(segments) + 1  # plus a PT_NOTE
    data_offset = 64 + 56 * phnum
    data_offset = -(-data_offset // PAGE_SIZE) * PAGE_SIZE
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, 0, 0, 0, 0, 0, 0)]
    blobs = []
    offset = data_offset
    for vaddr, paddr, _, data in segments:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, offset, vaddr, paddr, len(data), len(data), PAGE_SIZE))
        blobs.append((offset, data))
        offset += len(data)
    with open(path, "wb") as f:
        f.write(ehdr + b"".join(phdrs))
        for off, data in blobs:
            f.seek(off)
            f.write(data)


def test_kcore_parser_picks_direct_map(tmp_path) -> None:
    rng = np.random.default_rng(0)
    ram_low = rng.integers(0, 256, size=16 * PAGE_SIZE, dtype=np.uint8).tobytes()  # PFN 0..15
    ram_high = rng.integers(0, 256, size=32 * PAGE_SIZE, dtype=np.uint8).tobytes()  # PFN 256..287
    text = ram_low[: 2 * PAGE_SIZE]
    segments = [
        (KTEXT + 0x1000000, 0x1000000, 0, text),  # kernel text: other offset
        (DIRECT_MAP + 256 * PAGE_SIZE, 256 * PAGE_SIZE, 0, ram_high),
        (0xFFFFC90000000000, 0xFFFFFFFFFFFFFFFF, 0, bytes(PAGE_SIZE)),  # vmalloc: no paddr
        (DIRECT_MAP, 0, 0, ram_low),
    ]
    write_fake_kcore(tmp_path / "kcore", segments)
    fd = os.open(tmp_path / "kcore", os.O_RDONLY)
    try:
        loads = parse_elf_load_segments(fd)
        assert len(loads) == 4
        chosen = direct_map_segments(loads)
        assert [s.paddr for s in chosen] == [0, 256 * PAGE_SIZE]
    finally:
        os.close(fd)
    src = KcoreSource(tmp_path / "kcore", kpageflags=False)
    assert src.ranges() == [(0, 16), (256, 288)]
    assert src.max_pfn == 288 and src.total_pages() == 48
    assert src.read(3, 2) == ram_low[3 * PAGE_SIZE : 5 * PAGE_SIZE]
    assert src.read(260, 28) == ram_high[4 * PAGE_SIZE :]
    assert list(src.chunks(20)) == [(0, 16), (256, 20), (276, 12)]
    with pytest.raises(MemorySourceError):
        src.read(14, 4)  # crosses the hole
    assert src.skip_mask(0, 16) is None
    src.close()


def test_kcore_rejects_non_elf(tmp_path) -> None:
    (tmp_path / "x").write_bytes(b"hello" * 100)
    with pytest.raises(MemorySourceError):
        KcoreSource(tmp_path / "x")


def test_kpageflags_skip_mask(tmp_path) -> None:
    flags = np.zeros(16, dtype="<u8")
    counts = np.ones(16, dtype="<u8")
    flags[2] = 1 << KPF_BUDDY  # head of a free order-1 block ...
    counts[2:4] = 0  # ... whose tail page has no flags and no references
    flags[7] = 1 << KPF_NOPAGE
    flags[9] = 1 << KPF_SLAB
    counts[9] = 0  # a frozen slab page is in use: not skipped
    (tmp_path / "flags").write_bytes(flags.tobytes())
    (tmp_path / "counts").write_bytes(counts.tobytes())
    kpf = KPageFlags(str(tmp_path / "flags"), str(tmp_path / "counts"))
    assert np.flatnonzero(kpf.skip_mask(0, 16)).tolist() == [2, 3, 7]
    assert np.flatnonzero(kpf.skip_mask(8, 20)).tolist() == [8, 9, 10, 11]  # past the end: no page
    kpf.close()
    kpf = KPageFlags(str(tmp_path / "flags"), None)
    assert np.flatnonzero(kpf.skip_mask(0, 16)).tolist() == [2, 7]
    kpf.close()


@pytest.mark.skipif(not os.path.exists("/proc/kcore"), reason="no /proc/kcore here (the rig test covers it)")
def test_kcore_live_if_present() -> None:
    src = KcoreSource()
    start, end = src.ranges()[0]
    assert len(src.read(start, min(4, end - start))) == min(4, end - start) * PAGE_SIZE
    src.close()


def test_workload_step_dirties_exactly_and_changes_content() -> None:
    region = np.zeros(128 * PAGE_SIZE, dtype=np.uint8)
    fill_region(region, "text", seed=3)
    before = page_hashes(region)
    wl = Workload(region, rate_Bps=0, pattern="hotset", hot_fraction=0.1, seed=4)
    assert wl.hot is not None and wl.hot.size == 12
    wl.step(50)
    changed = np.flatnonzero(page_hashes(region) != before)
    assert set(changed.tolist()) <= set(wl.hot.tolist())
    assert 0 < changed.size <= 12
    rnd = Workload(region, rate_Bps=0, pattern="random", fill="page", seed=5)
    before = page_hashes(region)
    rnd.step(20)
    assert 0 < np.count_nonzero(page_hashes(region) != before) <= 20


def test_workload_pause_stops_all_writes() -> None:
    region = np.zeros(256 * PAGE_SIZE, dtype=np.uint8)
    wl = Workload(region, rate_Bps=50 * PAGE_SIZE * 1000, seed=6, tick_s=0.001)
    wl.start()
    try:
        deadline = time.monotonic() + 10
        while wl.pages_written == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert wl.pages_written > 0
        wl.pause()
        frozen = region.copy()
        written = wl.pages_written
        time.sleep(0.05)  # not a timing assertion: nothing may change, however long we wait
        assert wl.pages_written == written
        assert np.array_equal(region, frozen)
        wl.resume()
        deadline = time.monotonic() + 10
        while wl.pages_written == written and time.monotonic() < deadline:
            time.sleep(0.005)
        assert wl.pages_written > written
    finally:
        wl.stop()


def test_hash_tracker() -> None:
    region = np.zeros(64 * PAGE_SIZE, dtype=np.uint8)
    fill_region(region, "random", seed=7, zero_fraction=0.3)
    pages = region.reshape(-1, PAGE_SIZE)
    tracker = HashTracker(max_pfn=100)
    idx, hashes = tracker.dirty(10, pages)
    assert idx.tolist() == list(range(64))  # nothing sent yet: all dirty, zero pages included
    tracker.mark_sent(idx + 10, hashes)
    assert tracker.dirty(10, pages)[0].size == 0
    pages[[3, 40]] ^= 1
    idx, hashes = tracker.dirty(10, pages)
    assert idx.tolist() == [3, 40]
    assert hashes.tolist() == page_hashes(pages[[3, 40]]).tolist()
    fresh = HashTracker(max_pfn=100)
    fresh.seed(10, page_hashes(pages))
    assert fresh.dirty(10, pages)[0].size == 0 and fresh.pages_known() == 64
