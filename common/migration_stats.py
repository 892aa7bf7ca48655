"""Migration statistics accumulated during pre-copy, reported with QEMU's query-migrate names.

The accumulator takes a clock function so tests can drive it; the pre-copy loop feeds it
from the event loop (no locking).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from p2v.v1 import common_pb2

PAGE_SIZE = 4096


@dataclass
class RoundCounters:
    round: int
    started: float
    pages: int = 0  # pages sent (data + zero)
    zero_pages: int = 0
    raw_bytes: int = 0  # uncompressed data-page bytes sent
    wire_bytes: int = 0
    skipped: int = 0  # pages unchanged since the destination got them
    scanned_pages: int = 0
    resent_bytes: int = 0
    finished: float | None = None


@dataclass
class MigrationStatsAccumulator:
    total_bytes: int  # memory being migrated
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    setup_done: float | None = None
    finished: float | None = None
    downtime_started: float | None = None
    downtime_ms: int = 0
    transferred: int = 0
    duplicate: int = 0
    normal: int = 0
    normal_bytes: int = 0
    skipped: int = 0
    resent_bytes: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    remaining: int = 0
    expected_downtime_ms: float = 0.0
    rounds: list[RoundCounters] = field(default_factory=list)
    in_downtime: bool = False

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.clock()
        self.remaining = self.total_bytes

    # -- events --------------------------------------------------------------------------------

    def mark_setup_done(self) -> None:
        self.setup_done = self.clock()

    def start_round(self, round_no: int, *, final: bool = False) -> RoundCounters:
        if self.setup_done is None:
            self.mark_setup_done()
        if final and not self.in_downtime:
            self.in_downtime = True
            self.downtime_started = self.clock()
        counters = RoundCounters(round=round_no, started=self.clock())
        self.rounds.append(counters)
        return counters

    @property
    def current(self) -> RoundCounters:
        if not self.rounds:
            return self.start_round(1)
        return self.rounds[-1]

    def add_batch(self, *, pages: int, zero_pages: int, raw_bytes: int, wire_bytes: int) -> None:
        """A batch the destination acknowledged."""
        r = self.current
        r.pages += pages
        r.zero_pages += zero_pages
        r.raw_bytes += raw_bytes
        r.wire_bytes += wire_bytes
        self.transferred += wire_bytes
        self.duplicate += zero_pages
        self.normal += pages - zero_pages
        self.normal_bytes += raw_bytes
        if self.in_downtime:
            self.downtime_bytes += wire_bytes
        else:
            self.precopy_bytes += wire_bytes

    def add_scanned(self, pages: int, skipped: int) -> None:
        r = self.current
        r.scanned_pages += pages
        r.skipped += skipped
        self.skipped += skipped

    def add_resent(self, wire_bytes: int) -> None:
        """Bytes sent again after a drop (also counted in transferred when acknowledged)."""
        self.resent_bytes += wire_bytes
        self.current.resent_bytes += wire_bytes

    def finish_round(self) -> RoundCounters:
        r = self.current
        r.finished = self.clock()
        return r

    def set_prediction(self, *, remaining_bytes: int, expected_downtime_ms: float) -> None:
        self.remaining = int(remaining_bytes)
        self.expected_downtime_ms = expected_downtime_ms

    def finish(self) -> None:
        now = self.clock()
        self.finished = now
        if self.downtime_started is not None:
            self.downtime_ms = round((now - self.downtime_started) * 1000)
        self.remaining = 0

    # -- derived figures ---------------------------------------------------------------------------

    def _last_finished(self) -> RoundCounters | None:
        for r in reversed(self.rounds):
            if r.finished is not None:
                return r
        return None

    def dirty_pages_rate(self) -> float:
        """Pages found dirty by the last finished round over the previous round's duration."""
        done = [r for r in self.rounds if r.finished is not None]
        if len(done) < 2:
            return 0.0
        prev = done[-2]
        span = (prev.finished or prev.started) - prev.started
        return done[-1].pages / span if span > 0 else 0.0

    def to_proto(self) -> common_pb2.MigrationStats:
        now = self.finished if self.finished is not None else self.clock()
        last = self._last_finished()
        mbps = pages_per_second = 0.0
        if last is not None and last.finished is not None and last.finished > last.started:
            span = last.finished - last.started
            mbps = last.wire_bytes * 8 / span / 1e6
            pages_per_second = last.pages / span
        setup_ms = round(((self.setup_done or now) - self.started) * 1000)
        downtime_ms = self.downtime_ms
        if self.finished is None and self.downtime_started is not None:
            downtime_ms = round((now - self.downtime_started) * 1000)
        return common_pb2.MigrationStats(
            transferred=self.transferred,
            remaining=max(0, self.remaining),
            total=self.total_bytes,
            duplicate=self.duplicate,
            normal=self.normal,
            normal_bytes=self.normal_bytes,
            dirty_pages_rate=self.dirty_pages_rate(),
            mbps=mbps,
            dirty_sync_count=len(self.rounds),
            pages_per_second=pages_per_second,
            expected_downtime_ms=round(self.expected_downtime_ms),
            setup_time_ms=setup_ms,
            total_time_ms=round((now - self.started) * 1000),
            downtime_ms=downtime_ms,
            precopy_bytes=self.precopy_bytes,
            downtime_bytes=self.downtime_bytes,
            skipped=self.skipped,
            resent_bytes=self.resent_bytes,
        )
