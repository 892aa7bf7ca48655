"""Convergence policy: QEMU's rule, P.Haul's heuristics, the schedule; and the stats names."""

from __future__ import annotations

import math

import pytest

from common.convergence import (
    PAGE_SIZE,
    Action,
    ConvergencePolicy,
    RoundReport,
    Schedule,
    ScheduleStep,
    count_stalls,
    decide,
    estimate_bandwidth,
    linear_downtime_schedule,
)
from common.migration_stats import MigrationStatsAccumulator

MiB = 1 << 20


def simulate(
    policy: ConvergencePolicy,
    *,
    region_pages: int,
    bandwidth_Bps: float,
    dirty_pages_per_s: float,
    hot_pages: int | None = None,
    max_iterations: int = 200,
):
    """A model of pre-copy: each round sends the pages dirtied during the previous one.

    Uniform dirtying of N pages at rate d over t seconds leaves N(1 - e^(-dt/N)) distinct
    pages dirty; a hot set saturates at its size.
    """
    history: list[RoundReport] = []
    elapsed = 0.0
    to_send = region_pages
    for i in range(1, max_iterations + 1):
        duration = to_send * PAGE_SIZE / bandwidth_Bps
        elapsed += duration
        history.append(RoundReport(round=i, dirty_pages=to_send, raw_bytes=to_send * PAGE_SIZE,
                                   wire_bytes=to_send * PAGE_SIZE, duration_s=duration))
        decision = decide(history, policy, elapsed)
        if decision.action is not Action.CONTINUE:
            return decision, history
        span = hot_pages if hot_pages is not None else region_pages
        to_send = max(1, int(span * (1 - math.exp(-dirty_pages_per_s * duration / span))))
    raise AssertionError("the policy never decided within the iteration bound")


def test_dirty_rate_above_bandwidth_never_converges() -> None:
    bw = 100 * MiB
    for dirty_factor in (1.2, 2.0, 10.0):
        policy = ConvergencePolicy(downtime_limit_ms=300, max_rounds=25)
        decision, history = simulate(policy, region_pages=256 * MiB // PAGE_SIZE, bandwidth_Bps=bw,
                                     dirty_pages_per_s=dirty_factor * bw / PAGE_SIZE)
        assert decision.action is Action.ABORT, decision
        assert len(history) == 25
        assert decision.expected_downtime_ms > 300


def test_dirty_rate_above_bandwidth_small_region_still_needs_time_budget() -> None:
    # Whole region rewritten faster than it can be sent: each round re-sends all of it.
    policy = ConvergencePolicy(downtime_limit_ms=300, max_rounds=10, on_max_rounds="force")
    decision, history = simulate(policy, region_pages=64 * MiB // PAGE_SIZE, bandwidth_Bps=50 * MiB,
                                 dirty_pages_per_s=1e9)
    assert decision.action is Action.FORCE  # only because configured; never SWITCHOVER
    assert all(r.dirty_pages == history[0].dirty_pages for r in history)


def test_hot_set_converges_by_qemu_rule() -> None:
    policy = ConvergencePolicy(downtime_limit_ms=300)
    decision, history = simulate(policy, region_pages=1024 * MiB // PAGE_SIZE, bandwidth_Bps=200 * MiB,
                                 dirty_pages_per_s=1e6, hot_pages=10 * MiB // PAGE_SIZE)
    assert decision.action is Action.SWITCHOVER, decision
    assert len(history) == 2
    assert decision.expected_downtime_ms <= 300
    assert "<= downtime limit" in decision.reason


def test_idle_converges_on_floor() -> None:
    policy = ConvergencePolicy(downtime_limit_ms=1)
    history = [
        RoundReport(1, dirty_pages=100000, wire_bytes=400 * MiB, duration_s=10.0),
        RoundReport(2, dirty_pages=10, wire_bytes=40 * 1024, duration_s=0.001),
    ]
    d = decide(history, policy, 11.0)
    assert d.action is Action.SWITCHOVER
    assert "floor" in d.reason or "downtime" in d.reason


def test_first_round_alone_never_switches() -> None:
    history = [RoundReport(1, dirty_pages=10, wire_bytes=40960, duration_s=0.001)]
    assert decide(history, ConvergencePolicy(), 0.001).action is Action.CONTINUE


def steady(n: int, pages: int, bw: float = 100 * MiB) -> list[RoundReport]:
    first = RoundReport(1, dirty_pages=1 << 20, wire_bytes=4 << 30, duration_s=(4 << 30) / bw)
    rest = [RoundReport(i, dirty_pages=pages, wire_bytes=pages * PAGE_SIZE,
                        duration_s=pages * PAGE_SIZE / bw) for i in range(2, n + 1)]
    return [first, *rest]


def test_stall_counting() -> None:
    policy = ConvergencePolicy()
    assert count_stalls(steady(2, 50000), policy) == 0
    assert count_stalls(steady(5, 50000), policy) == 3  # rounds 3, 4, 5 do not beat round 2
    shrinking = [RoundReport(i, dirty_pages=100000 // i) for i in range(1, 6)]
    assert count_stalls(shrinking, policy) == 0
    growing = [RoundReport(1, 10**6), RoundReport(2, 1000), RoundReport(3, 900), RoundReport(4, 1200)]
    assert count_stalls(growing, policy) == 1


def test_schedule_escalates_then_aborts() -> None:
    # 20000 pages = 78 MiB at 100 MiB/s: ~780 ms final transfer, above 300 ms.
    schedule = Schedule.from_data([
        {"action": "downtime", "downtime_ms": 500, "after_stalls": 1},
        {"action": "downtime", "downtime_ms": 700, "after_stalls": 2},
        {"action": "abort", "after_stalls": 3},
    ])
    policy = ConvergencePolicy(downtime_limit_ms=300, schedule=schedule)
    seen = []
    for n in range(2, 10):
        d = decide(steady(n, 20000), policy, 0.0)
        seen.append((d.action, d.downtime_limit_ms))
        if d.action is not Action.CONTINUE:
            break
    assert seen == [
        (Action.CONTINUE, 300),
        (Action.CONTINUE, 500),
        (Action.CONTINUE, 700),
        (Action.ABORT, 700),
    ]


def test_schedule_escalation_reaches_switchover_when_limit_suffices() -> None:
    policy = ConvergencePolicy(downtime_limit_ms=300,
                               schedule=linear_downtime_schedule(300, 900, 3, then="abort"))
    actions = [decide(steady(n, 20000), policy, 0.0) for n in range(2, 8)]
    # downtime steps 300 -> 500 -> 700 -> 900; 781 ms fits once the limit reaches 900
    assert [a.action for a in actions[:3]] == [Action.CONTINUE] * 3
    assert actions[3].action is Action.SWITCHOVER and actions[3].downtime_limit_ms == 900


@pytest.mark.parametrize("then", ["abort", "force"])
def test_linear_schedule_final_step(then) -> None:
    policy = ConvergencePolicy(downtime_limit_ms=100,
                               schedule=linear_downtime_schedule(100, 200, 2, then=then))
    final = None
    for n in range(2, 20):
        d = decide(steady(n, 200000), policy, 0.0)  # 781 MiB: never fits 200 ms
        if d.action is not Action.CONTINUE:
            final = (n, d.action)
            break
    assert final == (5, Action.ABORT if then == "abort" else Action.FORCE)


def test_schedule_by_time_and_rounds() -> None:
    policy = ConvergencePolicy(schedule=Schedule((ScheduleStep("force", after_seconds=60.0),)))
    assert decide(steady(3, 200000), policy, 59.0).action is Action.CONTINUE
    assert decide(steady(3, 200000), policy, 60.0).action is Action.FORCE
    policy = ConvergencePolicy(schedule=Schedule((ScheduleStep("abort", after_rounds=4),)))
    assert decide(steady(3, 200000), policy, 0).action is Action.CONTINUE
    assert decide(steady(4, 200000), policy, 0).action is Action.ABORT


def test_schedule_data_round_trip_and_validation() -> None:
    data = [{"action": "downtime", "downtime_ms": 500, "after_rounds": 3},
            {"action": "abort", "after_seconds": 9.5}]
    assert Schedule.from_data(data).to_data() == data
    with pytest.raises(ValueError):
        Schedule.from_data([{"action": "explode"}])
    with pytest.raises(ValueError):
        Schedule.from_data([{"action": "downtime", "after_rounds": 3}])
    with pytest.raises(ValueError):
        Schedule.from_data([{"action": "abort", "when": 3}])
    with pytest.raises(ValueError):
        ConvergencePolicy(on_max_rounds="retry")


def test_bandwidth_estimate_respects_cap_and_small_samples() -> None:
    history = [RoundReport(1, 1000, wire_bytes=100 * MiB, duration_s=1.0),
               RoundReport(2, 10, wire_bytes=40960, duration_s=1.0)]  # tiny round: not a fair sample
    assert estimate_bandwidth(history, ConvergencePolicy()) == pytest.approx(100 * MiB)
    assert estimate_bandwidth(history, ConvergencePolicy(max_bandwidth_Bps=10 * MiB)) == 10 * MiB
    assert estimate_bandwidth([], ConvergencePolicy()) == 0.0


def test_no_bandwidth_measured_never_switches() -> None:
    history = [RoundReport(1, 1000), RoundReport(2, 1000)]
    d = decide(history, ConvergencePolicy(min_round_pages=0), 1.0)
    assert d.action is Action.CONTINUE and math.isinf(d.expected_downtime_ms)


def test_stats_names_and_accounting() -> None:
    now = [100.0]
    acc = MigrationStatsAccumulator(total_bytes=1 << 30, clock=lambda: now[0])
    now[0] += 0.5
    acc.mark_setup_done()
    acc.start_round(1)
    acc.add_batch(pages=256, zero_pages=56, raw_bytes=200 * 4096, wire_bytes=500_000)
    acc.add_scanned(1024, skipped=768)
    acc.add_resent(100_000)
    now[0] += 1.0
    acc.finish_round()
    acc.start_round(2)
    acc.add_batch(pages=10, zero_pages=0, raw_bytes=40960, wire_bytes=20000)
    now[0] += 0.5
    acc.finish_round()
    acc.start_round(3, final=True)
    acc.add_batch(pages=2, zero_pages=0, raw_bytes=8192, wire_bytes=4000)
    now[0] += 0.1
    acc.finish_round()
    acc.finish()
    s = acc.to_proto()
    assert s.transferred == 524_000
    assert s.total == 1 << 30 and s.remaining == 0
    assert s.duplicate == 56 and s.normal == 212 and s.normal_bytes == 212 * 4096
    assert s.dirty_sync_count == 3
    assert s.skipped == 768 and s.resent_bytes == 100_000
    assert s.precopy_bytes == 520_000 and s.downtime_bytes == 4000
    assert s.setup_time_ms == 500 and s.total_time_ms == 2100 and s.downtime_ms == 100
    assert s.pages_per_second == pytest.approx(20.0)
    assert s.mbps == pytest.approx(4000 * 8 / 0.1 / 1e6)
    assert s.dirty_pages_rate == pytest.approx(2 / 0.5)
