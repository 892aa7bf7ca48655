"""Token bucket arithmetic, batch splitting and the scanner's choice of pages, without network or timing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from p2v.v1 import destination_pb2
from source_agent.memory.file_source import FileSource
from source_agent.precopy import MAX_PAGES_PER_BATCH, ChunkScanner, PrecopyConfig, _effective_config
from source_agent.transport import PageTransport, TokenBucket, TransportConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_rate_and_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, 500.0, clock=clock)
    assert bucket.delay(400) == 0.0  # within the burst
    assert bucket.delay(400) == pytest.approx(0.3)  # 100 left, 300 missing at 1000 B/s
    clock.now = 0.3
    assert bucket.delay(400) == 0.0
    clock.now = 10.0
    assert bucket.delay(2000) == 0.0  # larger than the burst: goes when full, leaves a debt
    assert bucket.delay(100) == pytest.approx(1.6)  # -1500 + 100 -> 1.6 s of refill
    total, clock.now = 0, 20.0
    start = clock.now
    for _ in range(1000):  # long-run average holds the rate
        wait = bucket.delay(250)
        if wait:
            clock.now += wait
            assert bucket.delay(250) == 0.0
        total += 250
    assert total / (clock.now - start) == pytest.approx(1000.0, rel=0.05)


def test_unlimited_bucket_never_waits() -> None:
    bucket = TokenBucket(0, 0)
    assert all(bucket.delay(1 << 30) == 0.0 for _ in range(10))


def test_transport_rejects_silly_config() -> None:
    with pytest.raises(ValueError):
        PageTransport(None, TransportConfig(streams=0), stub=object())


def test_destination_limits_win() -> None:
    reply = destination_pb2.PrepareReply(max_batch_bytes=128 << 10, window=2, streams=2)
    cfg = _effective_config(PrecopyConfig(streams=4, window=8, max_batch_bytes=1 << 20), reply)
    assert (cfg.streams, cfg.window, cfg.max_batch_bytes) == (2, 2, 128 << 10)


def test_batch_split_bounds() -> None:
    scanner = ChunkScanner.__new__(ChunkScanner)
    scanner.data_pages_per_batch = 4
    is_data = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=bool)
    bounds = scanner._split(is_data)
    assert bounds[0][0] == 0 and bounds[-1][1] == is_data.size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(int(is_data[s:e].sum()) <= 4 for s, e in bounds)
    zeros = np.zeros(MAX_PAGES_PER_BATCH * 2 + 5, dtype=bool)
    assert [e - s for s, e in scanner._split(zeros)] == [MAX_PAGES_PER_BATCH, MAX_PAGES_PER_BATCH, 5]


def test_in_use_spans() -> None:
    from source_agent.precopy import in_use_spans

    skip = np.zeros(20, dtype=bool)
    skip[3:8] = skip[12:] = True
    assert in_use_spans(skip) == [(0, 3), (8, 4)]
    assert in_use_spans(np.ones(5, dtype=bool)) == []
    assert in_use_spans(np.zeros(5, dtype=bool)) == [(0, 5)]
    fragmented = np.arange(300) % 3 == 0
    assert in_use_spans(fragmented, max_spans=64) is None  # 100 runs: the chunk is taken whole


class CountingSource(FileSource):
    """A file-backed memory source without in-place views that records its reads, with a given
    free-page mask (kpageflags' verdict on a real host)."""

    def __init__(self, path, free: np.ndarray) -> None:
        super().__init__(path)
        self.free = free
        self.reads: list[tuple[int, int]] = []

    def view(self, pfn: int, count: int) -> None:
        return None

    def read_into(self, pfn: int, out) -> None:
        self.reads.append((pfn, len(out) // 4096))
        super().read_into(pfn, out)

    def skip_mask(self, start_pfn: int, end_pfn: int) -> np.ndarray:
        return self.free[start_pfn:end_pfn]


@pytest.mark.parametrize("layout", ["long runs", "fragmented"])
def test_the_scanner_reads_and_sends_only_pages_in_use(tmp_path, layout: str) -> None:
    from source_agent.memory.tracker import HashTracker

    pages = np.random.default_rng(3).integers(0, 256, size=(1024, 4096), dtype=np.uint8)
    path = tmp_path / "mem.raw"
    path.write_bytes(pages.tobytes())
    free = np.zeros(1024, dtype=bool)
    if layout == "long runs":
        free[100:900] = True
    else:
        free[::3] = True
    source = CountingSource(path, free)
    scanner = ChunkScanner(source, HashTracker(1024), PrecopyConfig(zstd_level=None, chunk_pages=1024), "m")
    result = scanner.scan(0, 1024, 1)
    sent = np.concatenate([e.pfns for e in result.batches])
    assert sent.tolist() == np.flatnonzero(~free).tolist()  # every page in use (nothing was sent before), no free one
    assert result.free_skipped == int(free.sum()) and result.unchanged == 0
    if layout == "long runs":
        assert source.reads == [(0, 100), (900, 124)]  # the free run is never read
    else:
        assert source.reads == [(0, 1024)]  # too many runs: one read of the whole chunk
    again = scanner.scan(0, 1024, 2)
    assert again.batches == [] and again.unchanged == int((~free).sum())
