"""Pre-copy end to end against the real DestinationService on loopback.

Every test ends by comparing a full checksum of the source memory with the destination image.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from common.pagecodec import PAGE_SIZE, decode_batch, encode_batch, page_hashes
from dest_agent.service import DestinationService
from p2v.v1 import destination_pb2
from source_agent.memory import FileSource, Workload, fill_region
from source_agent.precopy import PrecopyAborted, PrecopyConfig, run_precopy
from source_agent.transport import BatchRejected
from tests.memory.harness import CuttableProxy, destination, digest_array

MiB = 1 << 20
BATCH = 256 << 10
WINDOW = 4


def make_region(tmp_path, size: int, fill: str = "text", seed: int = 0) -> FileSource:
    src = FileSource.create(tmp_path / "memory", size)
    fill_region(src.array, fill, seed=seed, zero_fraction=0.3)
    return src


def max_wire_batch() -> int:
    # a full batch of incompressible pages plus its PFN list, flags, and the message's other fields
    # and framing (ids, seq, round, checksum: ~300 bytes measured; 1 KiB keeps the bound a window's)
    return BATCH + (BATCH // PAGE_SIZE) * 9 + 1024


def precopy_config(**kw) -> PrecopyConfig:
    base = dict(streams=3, window=WINDOW, max_batch_bytes=BATCH, max_rounds=6, on_max_rounds="force",
                chunk_pages=1024, ack_timeout_s=5.0, resume_timeout_s=30.0)
    base.update(kw)
    return PrecopyConfig(**base)


async def migrate(dest, src: FileSource, config: PrecopyConfig, workload: Workload | None = None, **kw):
    reply = await dest.prepare(src.max_pfn, streams=config.streams)
    statuses = []

    async def on_status(stats, round_no, fraction):
        statuses.append((round_no, fraction, stats.transferred))
        hook = kw.get("hook")
        if hook is not None:
            await hook(round_no, fraction)

    if workload is not None:
        workload.start()
    try:
        result = await asyncio.wait_for(
            run_precopy(src, dest.channel, reply.migration_id, reply, config, on_status,
                        pause=workload.pause if workload is not None else (lambda: None)),
            timeout=90)
    finally:
        if workload is not None:
            workload.stop()
    return reply, result, statuses


def assert_identical(dest, migration_id: str, src: FileSource) -> None:
    store = dest.service.migrations[migration_id].store
    assert store.read(0, src.max_pfn) == src.array.tobytes(), "destination image differs from the source"
    assert dest.image_digest(migration_id) == digest_array(src.array)
    held = store.hashes(0, src.max_pfn)
    assert np.array_equal(held, page_hashes(src.array)), "hash index disagrees with the content"
    assert store.verify() == 0


@pytest.mark.parametrize(
    "size,rate,pattern,compress",
    [
        (4 * MiB, 0, "random", 1),
        (8 * MiB, 2 * MiB, "random", 1),
        (8 * MiB, 2 * MiB, "random", None),
        (16 * MiB, 20 * MiB, "hotset", 1),
        (16 * MiB, 8 * MiB, "random", None),
    ],
)
async def test_identical_with_workload(tmp_path, size, rate, pattern, compress) -> None:
    src = make_region(tmp_path, size, seed=size + rate)
    workload = Workload(src.array, rate, pattern=pattern, hot_fraction=0.05, seed=1, tick_s=0.002)
    async with destination(tmp_path / "dest", max_batch_bytes=BATCH, window=WINDOW) as dest:
        reply, result, statuses = await migrate(dest, src, precopy_config(zstd_level=compress), workload)
        assert result.outcome == "completed"
        assert result.rounds >= 2
        assert_identical(dest, reply.migration_id, src)
        stats = result.stats
        assert stats.dirty_sync_count == result.rounds
        assert stats.duplicate > 0 and stats.normal > 0  # zero pages went as flags
        assert stats.normal_bytes == stats.normal * PAGE_SIZE
        if compress is not None:
            assert stats.transferred < stats.normal_bytes  # text-like pages compress
        assert stats.downtime_bytes > 0 or rate == 0 or result.history[-1].dirty_pages == 0
        assert stats.resent_bytes == 0
        assert statuses and statuses[-1][1] == 1.0
    src.close()


async def test_second_round_sends_only_changes(tmp_path) -> None:
    src = make_region(tmp_path, 8 * MiB, fill="random")
    async with destination(tmp_path / "dest", max_batch_bytes=BATCH, window=WINDOW) as dest:
        _reply, result, _ = await migrate(dest, src, precopy_config())
        first, second = result.history[0], result.history[1]
        assert first.dirty_pages == src.max_pfn
        assert second.dirty_pages == 0 and second.wire_bytes == 0
        assert result.stats.transferred < 1.1 * 8 * MiB  # incompressible: ~1.0 of the size, once


class KillingDestination(DestinationService):
    """Aborts the first PushPages calls that reach a few acks, with batches still in flight. (By the
    calls' order instead, a short call could end before its acks and leave one kill undone.)"""

    kills = 2
    kill_after_acks = 3

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.killed = 0

    async def PushPages(self, request_iterator, context):
        acks = 0
        async for ack in super().PushPages(request_iterator, context):
            yield ack
            acks += 1
            if self.killed < self.kills and acks >= self.kill_after_acks:
                self.killed += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "test: stream killed")


async def test_stream_killed_mid_round(tmp_path) -> None:
    src = make_region(tmp_path, 16 * MiB, fill="random")
    workload = Workload(src.array, 4 * MiB, seed=2, tick_s=0.002)
    async with destination(tmp_path / "dest", service_cls=KillingDestination, max_batch_bytes=BATCH,
                           window=WINDOW) as dest:
        reply, result, _ = await migrate(dest, src, precopy_config(zstd_level=None), workload)
        assert dest.service.killed == 2
        assert result.stream_failures == 2
        assert 0 < result.resent_bytes <= result.stream_failures * WINDOW * max_wire_batch()
        assert result.stats.resent_bytes == result.resent_bytes
        assert_identical(dest, reply.migration_id, src)
        record = dest.service.migrations[reply.migration_id]
        assert record.counters.rejected == 0


async def test_connection_cut_mid_round(tmp_path) -> None:
    src = make_region(tmp_path, 16 * MiB, fill="random")
    workload = Workload(src.array, 4 * MiB, seed=3, tick_s=0.002)
    async with destination(tmp_path / "dest0", max_batch_bytes=BATCH, window=WINDOW) as direct:
        host, port = direct.address.rsplit(":", 1)
        proxy = CuttableProxy(host, int(port))
        await proxy.start()
        try:
            async with destination(tmp_path / "unused", max_batch_bytes=BATCH, window=WINDOW,
                                   channel_target=f"127.0.0.1:{proxy.port}") as through:
                # the channel of `through` goes via the proxy to `direct`'s server
                through.service = direct.service

                async def hook(round_no, fraction):
                    if round_no == 1 and fraction >= 0.3 and proxy.cuts == 0:
                        proxy.cut()

                reply, result, _ = await migrate(through, src, precopy_config(zstd_level=None, status_interval_s=0),
                                                 workload, hook=hook)
                assert proxy.cuts == 1
                assert result.stream_failures >= 1
                assert result.resent_bytes <= result.stream_failures * WINDOW * max_wire_batch()
                assert_identical(direct, reply.migration_id, src)
        finally:
            await proxy.close()


async def test_policy_abort_leaves_source_running(tmp_path) -> None:
    src = make_region(tmp_path, 2 * MiB, fill="random")
    # rewrites the whole region many times per round; the link is capped far below that
    workload = Workload(src.array, 40 * MiB, fill="page", seed=4, tick_s=0.002)
    async with destination(tmp_path / "dest", max_batch_bytes=BATCH, window=WINDOW) as dest:
        with pytest.raises(PrecopyAborted) as info:
            await migrate(dest, src, precopy_config(max_rounds=3, on_max_rounds="abort",
                                                    max_bandwidth_bytes=4 * MiB), workload)
        assert info.value.decision.expected_downtime_ms > 300
        assert info.value.stats.dirty_sync_count == 3
        assert workload.pages_written > 0


async def test_source_larger_than_prepared_is_rejected(tmp_path) -> None:
    src = make_region(tmp_path, 2 * MiB, fill="random")
    async with destination(tmp_path / "dest", max_batch_bytes=BATCH, window=WINDOW) as dest:
        reply = await dest.prepare(max_pfn=src.max_pfn // 2)
        with pytest.raises(BatchRejected, match="pfn-range"):
            await asyncio.wait_for(run_precopy(src, dest.channel, reply.migration_id, reply,
                                               precopy_config()), 30)
        store = dest.service.migrations[reply.migration_id].store
        assert store.verify() == 0
        held = np.flatnonzero(store.hashes())
        assert np.array_equal(store.hashes()[held], page_hashes(src.array[: store.max_pfn * PAGE_SIZE])[held])


def batch_for(pfns, pages, migration_id: str, seq: int, batch_id: int) -> destination_pb2.PageBatch:
    return encode_batch(np.asarray(pfns, dtype=np.uint64), pages, migration_id=migration_id, stream_id=1,
                        seq=seq, round=1, batch_id=batch_id, zstd_level=1)


async def push(stub, batches):
    call = stub.PushPages()
    for b in batches:
        await call.write(b)
    await call.done_writing()
    return [ack async for ack in call]


async def test_corrupt_replayed_and_out_of_range_batches(tmp_path) -> None:
    rng = np.random.default_rng(9)
    pages = rng.integers(0, 256, size=(8, PAGE_SIZE), dtype=np.uint8)
    async with destination(tmp_path / "dest", max_batch_bytes=BATCH, window=WINDOW) as dest:
        reply = await dest.prepare(max_pfn=64)
        mid = reply.migration_id
        store = dest.service.migrations[mid].store
        good = batch_for(range(8), pages.tobytes(), mid, seq=1, batch_id=100)
        acks = await push(dest.stub, [good])
        assert [a.status for a in acks] == [destination_pb2.ACK_STATUS_OK]
        before = store.hashes()

        corrupt = batch_for(range(8, 16), pages.tobytes(), mid, seq=2, batch_id=101)
        raw = bytearray(decode_batch(corrupt, max_pfn=64, max_raw_bytes=BATCH).data)
        raw[123] ^= 0x55
        corrupt.compression = destination_pb2.COMPRESSION_NONE
        corrupt.payload = bytes(raw)
        out_of_range = batch_for([10, 70], pages[:2].tobytes(), mid, seq=3, batch_id=102)
        replay_same_stream = batch_for(range(8), pages[::-1].tobytes(), mid, seq=1, batch_id=103)
        acks = await push(dest.stub, [good, corrupt, out_of_range, replay_same_stream])
        statuses = [a.status for a in acks]
        # the first is a replay after a resume (same batch id): acknowledged, nothing written
        assert statuses[0] == destination_pb2.ACK_STATUS_DUPLICATE
        assert statuses[1:] == [destination_pb2.ACK_STATUS_REJECTED] * 3
        assert "checksum" in acks[1].error and "pfn-range" in acks[2].error
        assert "seq" in acks[3].error
        assert np.array_equal(store.hashes(), before)
        assert store.read(0, 8) == pages.tobytes()
        assert store.read(8, 8) == bytes(8 * PAGE_SIZE)
        assert store.verify() == 0
