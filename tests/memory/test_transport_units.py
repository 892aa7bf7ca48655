"""Token bucket arithmetic and batch splitting, without I/O or timing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from p2v.v1 import destination_pb2
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
