"""The pre-copy round loop: scan, send, end the round, ask the convergence policy, repeat.

One round: every readable chunk of memory is read (or viewed in place), hashed per page and
compared with the hash last sent for that PFN; changed pages are copied out, encoded into
batches (zero pages as flags, zstd) and handed to the transport. Scanning and encoding run in
a worker thread one chunk ahead of the sending. When the whole memory has been scanned and
every batch is acknowledged (durable on the destination), EndRound closes the round and the
policy decides: another round, switch over, force, or abort.

On switch-over with a `pause` callback (a workload that can be stopped, as in tests and
benchmarks) a final round runs with the workload paused, after which the destination holds
exactly the source's memory. Without one (a real host), pre-copy ends "converged" and the
cutover (hibernation image with dedup against what the destination holds) completes it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from common.convergence import Action, ConvergencePolicy, Decision, RoundReport, Schedule, decide
from common.migration_stats import MigrationStatsAccumulator
from common.pagecodec import PAGE_SIZE, ZERO_PAGE_HASH, as_pages, encode_wire_batch, page_hashes, runs
from p2v.v1 import common_pb2, destination_pb2, destination_pb2_grpc
from source_agent.memory.base import MemorySource
from source_agent.memory.tracker import DirtyTracker, HashTracker
from source_agent.transport import FATAL_CODES, BulkEndpoint, OutgoingBatch, PageTransport, TransportConfig

log = logging.getLogger(__name__)

# Zero pages cost 9 bytes each on the wire; bound a batch's page count anyway so that acks
# keep flowing on an idle machine's mostly-zero memory.
MAX_PAGES_PER_BATCH = 16384

StatusCallback = Callable[[common_pb2.MigrationStats, int, float], Awaitable[None] | None]


class PrecopyAborted(RuntimeError):
    """The convergence policy gave up; the source runs on unharmed."""

    def __init__(self, decision: Decision, stats: common_pb2.MigrationStats) -> None:
        super().__init__(f"pre-copy aborted: {decision.reason}")
        self.decision = decision
        self.stats = stats


@dataclass
class PrecopyConfig:
    streams: int = 3
    window: int = 8
    max_batch_bytes: int = 1 << 20  # uncompressed data per batch (the destination's limit)
    downtime_limit_ms: int = 300
    max_bandwidth_bytes: int = 0  # bytes per second on the wire, 0 = no cap
    zstd_level: int | None = 1  # None = no compression
    max_rounds: int = 30
    on_max_rounds: str = "abort"  # or "force"
    min_round_pages: int = 64
    schedule: Schedule | list[dict] | None = None
    chunk_pages: int = 4096  # pages read and hashed at a time (16 MiB)
    skip_free_pages: bool = True  # use the source's skip_mask (kpageflags) when it has one
    seed_from_destination: bool = False  # start from the destination's HeldHashes (a re-run)
    ack_timeout_s: float = 30.0
    resume_timeout_s: float = 120.0
    status_interval_s: float = 0.5
    max_time_s: float = 0.0  # 0 = none; else the schedule gets an abort step at this time

    def policy(self) -> ConvergencePolicy:
        schedule = self.schedule
        if isinstance(schedule, list):
            schedule = Schedule.from_data(schedule)
        schedule = schedule or Schedule()
        if self.max_time_s > 0:
            from common.convergence import ScheduleStep

            schedule = Schedule((*schedule.steps, ScheduleStep("abort", after_seconds=self.max_time_s)))
        return ConvergencePolicy(
            downtime_limit_ms=self.downtime_limit_ms,
            max_rounds=self.max_rounds,
            on_max_rounds=self.on_max_rounds,
            min_round_pages=self.min_round_pages,
            schedule=schedule,
            max_bandwidth_Bps=float(self.max_bandwidth_bytes),
        )


@dataclass
class PrecopyResult:
    outcome: str  # "completed" (final round ran paused), "converged", "forced"
    decision: Decision
    rounds: int
    stats: common_pb2.MigrationStats
    history: list[RoundReport] = field(default_factory=list)
    resent_bytes: int = 0
    stream_failures: int = 0


@dataclass
class _Encoded:
    batch: OutgoingBatch
    pfns: np.ndarray
    hashes: np.ndarray


@dataclass
class _ChunkResult:
    batches: list[_Encoded]
    scanned: int
    unchanged: int
    free_skipped: int


#: a chunk with more runs of pages in use than this is read and hashed whole (per-run calls would cost more)
MAX_SPANS_PER_CHUNK = 64


def in_use_spans(skip: np.ndarray, max_spans: int = MAX_SPANS_PER_CHUNK) -> list[tuple[int, int]] | None:
    """(first index, count) of each run of pages in use (False in `skip`); None when there are more
    than `max_spans` runs (the caller then takes the whole chunk). Pure."""
    in_use = np.flatnonzero(~skip)
    spans = runs(in_use)
    if len(spans) > max_spans:
        return None
    return [(int(in_use[start]), n) for start, n in spans]


class ChunkScanner:
    """Scan + encode of one chunk: in a worker thread during pre-copy, in the cutover helper for its
    pass before FREEZE (final_pass)."""

    def __init__(self, memory: MemorySource, tracker: DirtyTracker, config: PrecopyConfig,
                 migration_id: str) -> None:
        self.memory = memory
        self.tracker = tracker
        self.config = config
        self.migration_id = migration_id
        self.buffer = np.empty(config.chunk_pages * PAGE_SIZE, dtype=np.uint8)
        self.data_pages_per_batch = max(1, config.max_batch_bytes // PAGE_SIZE)
        # batch ids unique per migration even across re-runs of pre-copy for the same migration
        self.next_batch_id = secrets.randbits(38) << 24

    def scan(self, pfn: int, count: int, round_no: int) -> _ChunkResult:
        # Free pages first (kpageflags): only the pages in use are read and hashed. Free memory
        # comes in long runs (rig: ~1 run of pages in use per 1024-page chunk, 22 % of the pages),
        # so a read per run costs few system calls and saves most of the copying and hashing.
        skip = self.memory.skip_mask(pfn, pfn + count) if self.config.skip_free_pages else None
        spans = None if skip is None else in_use_spans(skip)
        free = 0 if skip is None else int(np.count_nonzero(skip))
        if spans == []:
            return _ChunkResult([], count, 0, free)
        live = self.memory.view(pfn, count)
        if live is not None:
            pages = as_pages(live)
        else:
            buf = memoryview(self.buffer)
            for first, n in spans or [(0, count)]:
                self.memory.read_into(pfn + first, buf[first * PAGE_SIZE:(first + n) * PAGE_SIZE])
            pages = as_pages(self.buffer[: count * PAGE_SIZE])
        changed, hashes = self.tracker.dirty(pfn, pages, spans)
        if skip is not None and spans is None:  # read and hashed whole: the free pages stay out
            keep = ~skip[changed]
            changed, hashes = changed[keep], hashes[keep]
        result = _ChunkResult([], count, count - free - int(changed.size), free)
        if changed.size == 0:
            return result
        chosen = pages[changed]  # a copy: what is sent, whatever the live memory does next
        if live is not None:
            hashes = page_hashes(chosen)  # the page may have changed between hashing and copying
        pfns = changed.astype(np.uint64) + np.uint64(pfn)
        is_data = hashes != np.uint64(ZERO_PAGE_HASH)
        for start, end in self._split(is_data):
            # A WireBatch: its payload is a view of `chosen` (our copy), sent without further copies.
            msg = encode_wire_batch(
                pfns[start:end], chosen[start:end], migration_id=self.migration_id, stream_id=0, seq=0,
                round=round_no, batch_id=self.next_batch_id, zstd_level=self.config.zstd_level,
            )
            self.next_batch_id += 1
            data_pages = msg.raw_size // PAGE_SIZE
            batch = OutgoingBatch(msg=msg, pages=end - start, zero_pages=(end - start) - data_pages,
                                  raw_bytes=msg.raw_size)
            result.batches.append(_Encoded(batch, pfns[start:end], hashes[start:end]))
            self.tracker.mark_sent(pfns[start:end], hashes[start:end])
        return result

    def _split(self, is_data: np.ndarray) -> list[tuple[int, int]]:
        """Cut the changed pages into batches of at most data_pages_per_batch data pages and
        MAX_PAGES_PER_BATCH pages in all."""
        n = is_data.size
        data_before = np.concatenate(([0], np.cumsum(is_data)))
        bounds = []
        start = 0
        while start < n:  # one iteration per batch
            limit_data = data_before[start] + self.data_pages_per_batch
            end_by_data = int(np.searchsorted(data_before, limit_data, side="right")) - 1
            end = min(n, start + MAX_PAGES_PER_BATCH, max(end_by_data, start + 1))
            bounds.append((start, end))
            start = end
        return bounds


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


async def run_precopy(
    memory: MemorySource,
    channel: grpc.aio.Channel,
    migration_id: str,
    prepare_reply: destination_pb2.PrepareReply,
    config: PrecopyConfig,
    on_status: StatusCallback | None = None,
    *,
    pause: Callable[[], Any] | None = None,
    tracker: DirtyTracker | None = None,
    bulk: BulkEndpoint | None = None,
) -> PrecopyResult:
    """Run pre-copy rounds of `memory` into the prepared migration on `channel`.

    `pause` (optional, sync or async) stops whatever changes the memory; when given, the
    switch-over runs a final round after it and the destination ends byte-identical.
    `bulk`: the destination's bulk sockets (transport.bulk_endpoint), else PushPages streams.
    Raises PrecopyAborted when the policy gives up, TransportError/grpc.RpcError on failures.
    """
    config = _effective_config(config, prepare_reply)
    policy = config.policy()
    stub = destination_pb2_grpc.DestinationStub(channel)
    stats = MigrationStatsAccumulator(total_bytes=memory.total_pages() * PAGE_SIZE)
    tracker = tracker or HashTracker(memory.max_pfn)
    if config.seed_from_destination:
        await _seed_from_destination(stub, migration_id, tracker)
    transport = PageTransport(
        channel,
        TransportConfig(streams=config.streams, window=config.window,
                        max_bandwidth_Bps=float(config.max_bandwidth_bytes),
                        ack_timeout_s=config.ack_timeout_s, resume_timeout_s=config.resume_timeout_s),
        on_ack=lambda batch, ack: stats.add_batch(pages=batch.pages, zero_pages=batch.zero_pages,
                                                  raw_bytes=batch.raw_bytes, wire_bytes=batch.wire_bytes),
        on_resend=lambda batch: stats.add_resent(batch.wire_bytes),
        stub=stub,
        bulk=bulk,
    )
    scanner = ChunkScanner(memory, tracker, config, migration_id)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2v-scan")
    await transport.start()
    stats.mark_setup_done()
    history: list[RoundReport] = []
    started = time.monotonic()
    ok = False
    try:
        round_no = 1
        while True:
            report = await _run_round(round_no, False, memory, scanner, transport, stub, stats, executor,
                                      config, on_status, migration_id)
            history.append(report)
            decision = decide(history, policy, time.monotonic() - started)
            stats.set_prediction(remaining_bytes=decision.remaining_bytes,
                                 expected_downtime_ms=min(decision.expected_downtime_ms, 1e12))
            log.info("round done", extra={
                "migration": migration_id, "round": round_no, "pages": report.dirty_pages,
                "wire_bytes": report.wire_bytes, "seconds": round(report.duration_s, 3),
                "decision": decision.action.value, "reason": decision.reason})
            await _status(on_status, stats, round_no, 1.0)
            if decision.action is Action.CONTINUE:
                round_no += 1
                continue
            if decision.action is Action.ABORT:
                raise PrecopyAborted(decision, stats.to_proto())
            break
        outcome = "converged" if decision.action is Action.SWITCHOVER else "forced"
        if pause is not None:
            await _maybe_await(pause())
            round_no += 1
            final = await _run_round(round_no, True, memory, scanner, transport, stub, stats, executor,
                                     config, on_status, migration_id)
            history.append(final)
            outcome = "completed"
        stats.finish()
        await transport.close()
        ok = True
        result_stats = stats.to_proto()
        await _status(on_status, stats, round_no, 1.0)
        return PrecopyResult(outcome=outcome, decision=decision, rounds=round_no, stats=result_stats,
                             history=history, resent_bytes=transport.counters.resent_bytes,
                             stream_failures=transport.counters.stream_failures)
    finally:
        if not ok:
            await transport.abort()
        executor.shutdown(wait=True, cancel_futures=True)


def _effective_config(config: PrecopyConfig, reply: destination_pb2.PrepareReply) -> PrecopyConfig:
    """The destination's limits win over our wishes."""
    from dataclasses import replace

    changes: dict[str, Any] = {}
    if reply.streams:
        changes["streams"] = min(config.streams, reply.streams) if config.streams else reply.streams
    if reply.window:
        changes["window"] = min(config.window, reply.window) if config.window else reply.window
    if reply.max_batch_bytes:
        changes["max_batch_bytes"] = min(config.max_batch_bytes, reply.max_batch_bytes)
    return replace(config, **changes)


async def _status(on_status: StatusCallback | None, stats: MigrationStatsAccumulator, round_no: int,
                  fraction: float) -> None:
    if on_status is None:
        return
    try:
        await _maybe_await(on_status(stats.to_proto(), round_no, fraction))
    except Exception:  # a status consumer must not break the migration
        log.exception("status callback failed")


async def _run_round(round_no: int, final: bool, memory: MemorySource, scanner: ChunkScanner,
                     transport: PageTransport, stub: Any, stats: MigrationStatsAccumulator,
                     executor: ThreadPoolExecutor, config: PrecopyConfig, on_status: StatusCallback | None,
                     migration_id: str) -> RoundReport:
    loop = asyncio.get_running_loop()
    counters = stats.start_round(round_no, final=final)
    scanner.tracker.begin_round(round_no)
    started = time.monotonic()
    busy_before = transport.busy_s
    chunks = list(memory.chunks(config.chunk_pages))
    total = max(1, sum(count for _, count in chunks))
    scanned = 0
    batches = pages = zero_pages = raw_bytes = wire_bytes = 0
    next_status = started + config.status_interval_s
    pending = loop.run_in_executor(executor, scanner.scan, *chunks[0], round_no) if chunks else None
    for i in range(len(chunks)):
        assert pending is not None
        result: _ChunkResult = await pending
        # scan the next chunk while this one's batches go out
        pending = loop.run_in_executor(executor, scanner.scan, *chunks[i + 1], round_no) \
            if i + 1 < len(chunks) else None
        stats.add_scanned(result.scanned, result.unchanged)
        for encoded in result.batches:
            await transport.submit(encoded.batch)
            batches += 1
            pages += encoded.batch.pages
            zero_pages += encoded.batch.zero_pages
            raw_bytes += encoded.batch.raw_bytes
            wire_bytes += encoded.batch.wire_bytes
        scanned += result.scanned
        now = time.monotonic()
        if now >= next_status:
            next_status = now + config.status_interval_s
            await _status(on_status, stats, round_no, scanned / total)
    await transport.flush()
    await _end_round(stub, migration_id, round_no, batches, final)
    stats.finish_round()
    duration = time.monotonic() - started
    counters.scanned_pages = scanned
    send_s = transport.busy_s - busy_before
    return RoundReport(round=round_no, dirty_pages=pages, zero_pages=zero_pages, raw_bytes=raw_bytes,
                       wire_bytes=wire_bytes, duration_s=duration, send_s=send_s if send_s > 0 else duration,
                       scanned_pages=scanned)


async def _end_round(stub: Any, migration_id: str, round_no: int, batches: int, final: bool) -> None:
    mark = destination_pb2.RoundMark(migration_id=migration_id, round=round_no, batches=batches, final=final)
    delay = 0.1
    for attempt in range(8):  # the connection may be re-dialling after a drop
        try:
            ack = await stub.EndRound(mark, wait_for_ready=True, timeout=60)
            if ack.round != round_no or not ack.durable:
                raise RuntimeError(f"destination did not make round {round_no} durable: {ack}")
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and attempt > 0:
                # The earlier attempt's reply was lost after the destination closed the round.
                log.warning("EndRound retry found the round closed", extra={"round": round_no,
                                                                            "detail": exc.details()})
                return
            if exc.code() in FATAL_CODES or attempt == 7:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _seed_from_destination(stub: Any, migration_id: str, tracker: DirtyTracker) -> None:
    call = stub.HeldHashes(destination_pb2.HeldHashesRequest(migration_id=migration_id), timeout=300)
    async for chunk in call:
        held = np.frombuffer(chunk.hashes, dtype="<u8").astype(np.uint64)
        end = min(chunk.start_pfn + held.size, tracker.max_pfn)
        if end > chunk.start_pfn:
            tracker.seed(chunk.start_pfn, held[: end - chunk.start_pfn])
