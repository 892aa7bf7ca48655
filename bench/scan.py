"""Dirty-scan rate vs a plain sequential read of the same memory, same run.

    python -m bench.scan [--size-mib 1024] [--repeat 3]

The region is a /dev/shm file filled with text-like pages (30 % zero). "read" copies it chunk
by chunk (16 MiB) into a buffer, the way any reader of that memory must at least touch it.
"scan" is the pre-copy scanner's own path for that source: the chunk is viewed in place,
every page hashed (xxh64), the hashes compared with those last sent (nothing changed here,
so nothing is encoded). Also printed: the read-then-hash path a source without zero-copy
views (kcore) takes. Last line: {"scan_GBps", "read_GBps", "ratio"}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from common.pagecodec import PAGE_SIZE, page_hashes
from source_agent.memory import FileSource, HashTracker, fill_region
from source_agent.precopy import ChunkScanner, PrecopyConfig

CHUNK_PAGES = 4096


def read_pass(src: FileSource, buf: np.ndarray) -> float:
    start = time.perf_counter()
    for pfn, count in src.chunks(CHUNK_PAGES):
        src.read_into(pfn, memoryview(buf)[: count * PAGE_SIZE])
    return time.perf_counter() - start


def scan_pass(scanner: ChunkScanner, src: FileSource) -> float:
    start = time.perf_counter()
    for pfn, count in src.chunks(CHUNK_PAGES):
        result = scanner.scan(pfn, count, 1)
        assert not result.batches, "nothing changed, nothing to send"
    return time.perf_counter() - start


def read_hash_pass(src: FileSource, buf: np.ndarray, tracker: HashTracker) -> float:
    start = time.perf_counter()
    for pfn, count in src.chunks(CHUNK_PAGES):
        src.read_into(pfn, memoryview(buf)[: count * PAGE_SIZE])
        changed, _ = tracker.dirty(pfn, buf[: count * PAGE_SIZE].reshape(-1, PAGE_SIZE))
        assert changed.size == 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib << 20
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(directory, f"p2v-bench-scan-{os.getpid()}")
    src = FileSource.create(path, size)
    try:
        fill_region(src.array, "text", seed=1, zero_fraction=0.3)
        tracker = HashTracker(src.max_pfn)
        tracker.seed(0, page_hashes(src.array))
        scanner = ChunkScanner(src, tracker, PrecopyConfig(chunk_pages=CHUNK_PAGES), "bench")
        buf = np.empty(CHUNK_PAGES * PAGE_SIZE, dtype=np.uint8)
        buf[:] = 0  # touch the buffer before timing
        reads, scans, read_hashes = [], [], []
        for _ in range(args.repeat):  # interleaved, so both see the same machine state
            reads.append(size / read_pass(src, buf) / 1e9)
            scans.append(size / scan_pass(scanner, src) / 1e9)
            read_hashes.append(size / read_hash_pass(src, buf, tracker) / 1e9)
    finally:
        src.close()
        os.unlink(path)
    read = float(np.median(reads))
    scan = float(np.median(scans))
    print(f"bench.scan: {args.size_mib} MiB in {directory}, {args.repeat} passes each")
    print(f"read GB/s {[round(x, 2) for x in reads]}; scan GB/s {[round(x, 2) for x in scans]}")
    print(f"read-then-hash path (sources without zero-copy views, e.g. kcore): "
          f"{float(np.median(read_hashes)):.2f} GB/s, ratio {float(np.median(read_hashes)) / read:.2f}")
    print(json.dumps({"scan_GBps": round(scan, 2), "read_GBps": round(read, 2), "ratio": round(scan / read, 3)}))


if __name__ == "__main__":
    main()
