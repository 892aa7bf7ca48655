"""Observers that prove continuity from outside P: the counter (same PID, sequence continues, largest
gap), the TCP client's log (no reconnect, nothing lost or duplicated, longest gap), the file
checksums, P's power state. The parsers are pure functions of log text, so later tests can feed
them several logs (e.g. P's console log and, after a move, the VM's)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rig import config as C

if TYPE_CHECKING:
    from rig.machine import Machine

COUNTER_RE = re.compile(rf"{C.MARK_COUNTER} (\d+) (\d+) (\d+\.\d+)")


@dataclass
class CounterStats:
    samples: int = 0
    pids: list[int] = field(default_factory=list)  # distinct, in order of appearance
    first_value: int | None = None
    last_value: int | None = None
    last_time: float | None = None
    #: values that never appeared between first and last (a restart or lost console lines)
    missing_values: int = 0
    #: times the value did not grow by one
    discontinuities: int = 0
    #: largest interval between consecutive samples, in P's own clock
    max_gap_s: float = 0.0

    @property
    def single_pid(self) -> bool:
        return len(self.pids) == 1

    @property
    def continuous(self) -> bool:
        """One process counted on without restart (values may skip only if console lines were lost)."""
        return self.single_pid and self.samples > 0


def parse_counter(text: str, since_time: float | None = None) -> CounterStats:
    """Counter lines `P2V-COUNTER pid value time` (console) from text."""
    stats = CounterStats()
    prev_value: int | None = None
    prev_time: float | None = None
    for m in COUNTER_RE.finditer(text):
        pid, value, t = int(m.group(1)), int(m.group(2)), float(m.group(3))
        if since_time is not None and t < since_time:
            continue
        stats.samples += 1
        if pid not in stats.pids:
            stats.pids.append(pid)
        if stats.first_value is None:
            stats.first_value = value
        if prev_value is not None:
            if value != prev_value + 1:
                stats.discontinuities += 1
                if value > prev_value + 1:
                    stats.missing_values += value - prev_value - 1
            if prev_time is not None:
                stats.max_gap_s = max(stats.max_gap_s, t - prev_time)
        prev_value, prev_time = value, t
        stats.last_value, stats.last_time = value, t
    return stats


def parse_counter_file(text: str) -> CounterStats:
    """P's own counter file: lines `pid value time` (no marker)."""
    return parse_counter("\n".join(f"{C.MARK_COUNTER} {line}" for line in text.splitlines()))


@dataclass
class TcpStats:
    connects: int = 0
    reconnects: int = 0
    sent: int = 0
    received: int = 0
    lost: int = 0  # sent, never echoed (excluding the last `in_flight_grace_s` of sends)
    duplicated: int = 0
    bad: int = 0  # echoes that did not match what was expected
    errors: list[str] = field(default_factory=list)
    max_gap_s: float = 0.0  # longest interval between consecutive echoes (client_gap_s)
    max_gap_at: float | None = None  # wall-clock time at which that gap ended
    first_recv: float | None = None
    last_recv: float | None = None
    stopped: bool = False

    @property
    def healthy(self) -> bool:
        return (self.connects == 1 and self.reconnects == 0 and self.lost == 0 and self.duplicated == 0
                and self.bad == 0 and not self.errors)


def parse_tcp_log(text: str, since: float | None = None, until: float | None = None,
                  in_flight_grace_s: float = 5.0) -> TcpStats:
    """Stats from the client's log; gaps are measured between echoes inside [since, until]."""
    stats = TcpStats()
    sent_at: dict[int, float] = {}
    recv_count: Counter[int] = Counter()
    prev_recv: float | None = None
    last_time = 0.0
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 2:
            continue
        try:
            t = float(parts[0])
        except ValueError:
            continue
        last_time = max(last_time, t)
        kind = parts[1]
        arg = parts[2] if len(parts) > 2 else ""
        if kind == "send":
            sent_at[int(arg)] = t
            stats.sent += 1
        elif kind == "recv":
            seq = int(arg)
            recv_count[seq] += 1
            stats.received += 1
            in_window = (since is None or t >= since) and (until is None or t <= until)
            if in_window:
                if prev_recv is not None and t - prev_recv > stats.max_gap_s:
                    stats.max_gap_s, stats.max_gap_at = t - prev_recv, t
                prev_recv = t
            stats.first_recv = stats.first_recv or t
            stats.last_recv = t
        elif kind == "connect":
            stats.connects += 1
        elif kind == "reconnect":
            stats.reconnects += 1
        elif kind == "bad":
            stats.bad += 1
        elif kind == "error":
            stats.errors.append(f"{t:.3f} {arg}")
        elif kind == "stop":
            stats.stopped = True
    stats.duplicated = sum(n - 1 for n in recv_count.values() if n > 1)
    stats.lost = sum(1 for seq, t in sent_at.items()
                     if seq not in recv_count and t < last_time - in_flight_grace_s)
    return stats


@dataclass
class FileCheck:
    entries: int
    last_seq: int
    checked: int
    bad: list[int]
    missing: list[int]
    writer_pids: list[str]

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not self.bad and not self.missing


def verify_files(machine: Machine, timeout: float = 120.0) -> FileCheck:
    """Run the checksum verifier inside P (over the control channel)."""
    res = machine.run(f"python3 {C.P_RIG_DIR}/verify_files.py {C.P_FILES_DIR}", timeout=timeout,
                      check=True)
    return FileCheck(**json.loads(res.out.strip().splitlines()[-1]))


def counter_from_console(paths: list[Path], since_time: float | None = None) -> CounterStats:
    text = "".join(p.read_bytes().decode("utf-8", "replace") for p in paths if p.exists())
    return parse_counter(text, since_time=since_time)


def counter_in_p(machine: Machine, last_lines: int = 100000) -> CounterStats:
    """The counter file inside P (authoritative: the console may lose or mangle lines)."""
    res = machine.run(f"tail -n {last_lines} {C.P_COUNTER_LOG}", timeout=60, check=True)
    return parse_counter_file(res.out)


def tcp_from_log(path: Path, since: float | None = None, until: float | None = None) -> TcpStats:
    text = path.read_text(errors="replace") if path.exists() else ""
    return parse_tcp_log(text, since=since, until=until)


def power_state(machine: Machine) -> str:
    return machine.power_state()


def guest_clock_offset(run: Callable[[str], str], tries: int = 5) -> tuple[float, float] | None:
    """(the guest's wall clock minus the host's, the round trip of that reading) in seconds: the
    reading with the shortest round trip through the control channel (its error is at most half
    of it). None if the guest's answer is not a time."""
    best = None
    for _ in range(tries):
        before = time.time()
        out = run("date +%s.%N")
        after = time.time()
        try:
            guest = float(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return None
        reading = (guest - (before + after) / 2, after - before)
        if best is None or reading[1] < best[1]:
            best = reading
    return best
