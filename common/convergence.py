"""When to stop pre-copy rounds: pure functions of measured numbers, and the schedule as data.

Three sources of wisdom, combined:
  * QEMU's rule: switch over when the predicted final transfer (what is still dirty, as it
    will look on the wire, divided by the measured bandwidth) fits in the downtime limit.
  * P.Haul's stop heuristics: a round at or below a floor of pages ends pre-copy (the final
    round is then trivially small); rounds that grow (> 10 % over the previous one) or that
    fail to beat the best round so far (vdsm's "lowmark") count as a stall; a maximum of rounds.
  * vdsm's / nova's schedule written as data: steps that raise the downtime limit after so
    many rounds, seconds or stalls, then a final "abort" or "force" step.

Nothing here does I/O or reads a clock: the caller passes the history and the elapsed time,
so the tests drive these functions with invented numbers.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PAGE_SIZE = 4096


class Action(enum.Enum):
    CONTINUE = "continue"  # run another pre-copy round
    SWITCHOVER = "switchover"  # converged: pause the workload, run the final round
    FORCE = "force"  # not converged, but the schedule says switch over anyway
    ABORT = "abort"  # give up; the source runs on unharmed


@dataclass(frozen=True)
class RoundReport:
    """What one finished pre-copy round measured."""

    round: int  # 1-based
    dirty_pages: int  # pages found changed (or never sent) by this round's scan and sent
    zero_pages: int = 0  # of those, zero pages (flags only)
    raw_bytes: int = 0  # uncompressed bytes of the data pages sent
    wire_bytes: int = 0  # bytes this round put on the wire (compressed payload + metadata)
    duration_s: float = 0.0  # wall time of the round (scan + send + EndRound)
    send_s: float = 0.0  # time the transport was busy sending; 0 = use duration_s
    scanned_pages: int = 0

    @property
    def dirty_bytes(self) -> int:
        return self.dirty_pages * PAGE_SIZE


@dataclass(frozen=True)
class ScheduleStep:
    """One step of the convergence schedule.

    The step applies once any of its triggers is reached (a trigger left None is ignored;
    a step with no trigger applies from the start).
      action "downtime": raise the allowed downtime to `downtime_ms`
      action "abort":    give up
      action "force":    switch over whatever the predicted downtime
    """

    action: str
    downtime_ms: int = 0
    after_rounds: int | None = None
    after_seconds: float | None = None
    after_stalls: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ("downtime", "abort", "force"):
            raise ValueError(f"schedule action must be downtime, abort or force, not {self.action!r}")
        if self.action == "downtime" and self.downtime_ms <= 0:
            raise ValueError("a downtime step needs downtime_ms > 0")

    def reached(self, rounds: int, elapsed_s: float, stalls: int) -> bool:
        triggers = [
            (self.after_rounds, rounds),
            (self.after_seconds, elapsed_s),
            (self.after_stalls, stalls),
        ]
        set_triggers = [(limit, value) for limit, value in triggers if limit is not None]
        if not set_triggers:
            return True
        return any(value >= limit for limit, value in set_triggers)


@dataclass(frozen=True)
class Schedule:
    steps: tuple[ScheduleStep, ...] = ()

    @classmethod
    def from_data(cls, data: Iterable[Mapping[str, Any]]) -> Schedule:
        """From a list of dicts, e.g. parsed from TOML or JSON:
        [{"action": "downtime", "downtime_ms": 500, "after_stalls": 2},
         {"action": "abort", "after_rounds": 30}]
        """
        steps = []
        for item in data:
            unknown = set(item) - {f for f in ScheduleStep.__dataclass_fields__}
            if unknown:
                raise ValueError(f"unknown schedule keys {sorted(unknown)}")
            steps.append(ScheduleStep(**item))
        return cls(tuple(steps))

    def to_data(self) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in asdict(s).items() if v is not None and not (k == "downtime_ms" and v == 0)}
            for s in self.steps
        ]


def linear_downtime_schedule(
    initial_ms: int,
    max_ms: int,
    steps: int,
    *,
    every_stalls: int = 1,
    then: str = "abort",
) -> Schedule:
    """nova-style linear downtime steps from initial_ms to max_ms, one per `every_stalls`
    stalls, then `then` ("abort" or "force") once the last step has stalled too."""
    if then not in ("abort", "force"):
        raise ValueError(f"then must be abort or force, not {then!r}")
    if steps < 1 or max_ms < initial_ms:
        raise ValueError("need steps >= 1 and max_ms >= initial_ms")
    out = [ScheduleStep("downtime", downtime_ms=initial_ms)]
    for i in range(1, steps + 1):
        ms = initial_ms + (max_ms - initial_ms) * i // steps
        out.append(ScheduleStep("downtime", downtime_ms=ms, after_stalls=i * every_stalls))
    out.append(ScheduleStep(then, after_stalls=(steps + 1) * every_stalls))
    return Schedule(tuple(out))


@dataclass(frozen=True)
class ConvergencePolicy:
    downtime_limit_ms: int = 300  # QEMU's default
    max_rounds: int = 30
    on_max_rounds: str = "abort"  # or "force"
    min_round_pages: int = 64  # P.Haul: a round this small ends pre-copy
    growth_stall_ratio: float = 1.10  # P.Haul: a round > 10 % larger than the previous is a stall
    schedule: Schedule = field(default_factory=Schedule)
    max_bandwidth_Bps: float = 0.0  # the transport's cap, 0 = none; bounds the estimate
    # Rounds sending fewer wire bytes than this do not measure bandwidth reliably.
    min_bandwidth_sample_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if self.on_max_rounds not in ("abort", "force"):
            raise ValueError(f"on_max_rounds must be abort or force, not {self.on_max_rounds!r}")
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    downtime_limit_ms: int
    expected_downtime_ms: float  # predicted duration of the final round's transfer
    remaining_bytes: int  # predicted dirty bytes at switchover (uncompressed)
    stalls: int
    bandwidth_Bps: float


def estimate_bandwidth(history: Sequence[RoundReport], policy: ConvergencePolicy) -> float:
    """Bytes per second the transport achieved: the most recent round that sent enough to be
    a fair sample, else the best of all rounds; never above the configured cap."""
    samples = [
        r.wire_bytes / (r.send_s or r.duration_s)
        for r in history
        if r.wire_bytes > 0 and (r.send_s or r.duration_s) > 0
    ]
    reliable = [
        r.wire_bytes / (r.send_s or r.duration_s)
        for r in history
        if r.wire_bytes >= policy.min_bandwidth_sample_bytes and (r.send_s or r.duration_s) > 0
    ]
    if reliable:
        bw = reliable[-1]
    elif samples:
        bw = max(samples)
    else:
        return 0.0
    if policy.max_bandwidth_Bps > 0:
        bw = min(bw, policy.max_bandwidth_Bps)
    return bw


def wire_ratio(history: Sequence[RoundReport]) -> float:
    """Wire bytes per dirty byte (compression and zero pages included), from recent rounds."""
    for r in reversed(history):
        if r.dirty_pages > 0 and r.wire_bytes > 0:
            return r.wire_bytes / r.dirty_bytes
    return 1.0


def dirty_rate_pages(history: Sequence[RoundReport]) -> float:
    """Pages dirtied per second, as QEMU reports it: the pages the last scan found changed,
    over the time they had to change in (the previous round's duration)."""
    if len(history) < 2:
        return 0.0
    span = history[-2].duration_s
    return history[-1].dirty_pages / span if span > 0 else 0.0


def predicted_remaining_bytes(history: Sequence[RoundReport]) -> int:
    """Dirty bytes the final round would have to send: what the last round found dirty.

    Pages dirtied during the last round are found by the next scan; the last round's size
    is the best measure of how much changes in one round's time. Round 1 sends everything,
    so one round alone predicts nothing useful and is never reported as converged.
    """
    if not history:
        return 0
    return history[-1].dirty_bytes


def count_stalls(history: Sequence[RoundReport], policy: ConvergencePolicy) -> int:
    """Rounds (after the first two) that made no progress: not below the best round so far
    (vdsm's lowmark), or more than growth_stall_ratio times the previous round (P.Haul)."""
    stalls = 0
    lowmark: int | None = None
    for i, r in enumerate(history):
        if i == 0:
            continue  # round 1 sends everything; it sets no mark
        if lowmark is None:
            lowmark = r.dirty_pages
            continue
        grew = r.dirty_pages > history[i - 1].dirty_pages * policy.growth_stall_ratio
        if r.dirty_pages >= lowmark or grew:
            stalls += 1
        lowmark = min(lowmark, r.dirty_pages)
    return stalls


def schedule_state(
    policy: ConvergencePolicy, rounds: int, elapsed_s: float, stalls: int
) -> tuple[int, str | None, str]:
    """(downtime limit in ms, final action "abort"/"force" or None, why) at this point."""
    downtime = policy.downtime_limit_ms
    why = f"initial downtime limit {downtime} ms"
    final: str | None = None
    for step in policy.schedule.steps:
        if not step.reached(rounds, elapsed_s, stalls):
            continue
        if step.action == "downtime":
            downtime = step.downtime_ms
            why = f"schedule step raised the downtime limit to {downtime} ms"
        elif final is None:
            final = step.action
            why = f"schedule step {step.action} reached (rounds {rounds}, {elapsed_s:.1f} s, stalls {stalls})"
    return downtime, final, why


def decide(history: Sequence[RoundReport], policy: ConvergencePolicy, elapsed_s: float) -> Decision:
    """After a finished round: continue, switch over, force, or abort."""
    rounds = len(history)
    stalls = count_stalls(history, policy)
    bandwidth = estimate_bandwidth(history, policy)
    remaining = predicted_remaining_bytes(history)
    expected_s = remaining * wire_ratio(history) / bandwidth if bandwidth > 0 else float("inf")
    if remaining == 0:
        expected_s = 0.0
    downtime_ms, final, why = schedule_state(policy, rounds, elapsed_s, stalls)

    def out(action: Action, reason: str) -> Decision:
        return Decision(action, reason, downtime_ms, expected_s * 1000.0, remaining, stalls, bandwidth)

    if rounds == 0:
        return out(Action.CONTINUE, "no round yet")
    last = history[-1]
    if rounds >= 2 and expected_s * 1000.0 <= downtime_ms:
        return out(
            Action.SWITCHOVER,
            f"predicted final transfer {expected_s * 1000.0:.0f} ms <= downtime limit {downtime_ms} ms",
        )
    if rounds >= 2 and last.dirty_pages <= policy.min_round_pages:
        return out(Action.SWITCHOVER, f"round {last.round} sent {last.dirty_pages} pages <= floor")
    if final == "abort":
        return out(Action.ABORT, why)
    if final == "force":
        return out(Action.FORCE, why)
    if rounds >= policy.max_rounds:
        action = Action.ABORT if policy.on_max_rounds == "abort" else Action.FORCE
        return out(action, f"{rounds} rounds reached max_rounds {policy.max_rounds}")
    return out(
        Action.CONTINUE,
        f"predicted final transfer {expected_s * 1000.0:.0f} ms > {downtime_ms} ms; {why}",
    )
