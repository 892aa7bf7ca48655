"""The observers' parsers on made-up logs: what later migration tests will rely on to call a move
continuous or not. (Pure functions; marked `rig` because they belong to the rig.)"""

from __future__ import annotations

import pytest

from rig.observers import parse_counter, parse_counter_file, parse_tcp_log

pytestmark = pytest.mark.rig


def tcp_log(events: list[tuple[float, str]]) -> str:
    return "".join(f"{t:.6f} {e}\n" for t, e in events)


def test_tcp_log_healthy_session_and_gap() -> None:
    events = [(100.0, "connect 0")]
    for seq in range(10):
        events += [(100.0 + seq * 0.05, f"send {seq}"), (100.01 + seq * 0.05, f"recv {seq}")]
    # a 2.5 s pause (the move), then the queued lines arrive
    events += [(100.5, "send 10"), (103.0, "recv 10"), (103.01, "send 11"), (103.02, "recv 11")]
    stats = parse_tcp_log(tcp_log(events))
    assert stats.healthy
    assert (stats.sent, stats.received, stats.lost, stats.duplicated) == (12, 12, 0, 0)
    assert stats.max_gap_s == pytest.approx(103.0 - 100.46, abs=1e-6)
    assert stats.max_gap_at == pytest.approx(103.0)
    # outside the window the gap is not counted
    assert parse_tcp_log(tcp_log(events), until=102.0).max_gap_s < 0.1


def test_tcp_log_reconnect_lost_duplicated() -> None:
    events = [(0.0, "connect 0"), (0.1, "send 0"), (0.2, "recv 0"), (0.3, "send 1"),
              (1.0, "error eof"), (1.5, "reconnect 1"), (1.6, "send 2"), (1.7, "recv 2"),
              (1.8, "recv 2"), (20.0, "send 3")]
    stats = parse_tcp_log(tcp_log(events))
    assert not stats.healthy
    assert stats.reconnects == 1 and stats.errors
    assert stats.lost == 1  # line 1; line 3 is still in flight
    assert stats.duplicated == 1


def test_counter_continuity_and_restart() -> None:
    console = "".join(f"noise P2V-COUNTER 42 {v} {1000 + v * 0.1:.3f}\r\n" for v in range(20))
    stats = parse_counter(console)
    assert stats.continuous and stats.pids == [42]
    assert (stats.first_value, stats.last_value, stats.missing_values) == (0, 19, 0)
    assert stats.max_gap_s == pytest.approx(0.1, abs=1e-3)

    # the move: 3 s without lines, then the same process counts on
    moved = console + "P2V-COUNTER 42 20 1004.900\n"
    assert parse_counter(moved).max_gap_s == pytest.approx(3.0, abs=1e-3)
    assert parse_counter(moved).continuous

    # a restart: another PID, the value starts over
    restarted = console + "P2V-COUNTER 77 0 1003.000\n"
    stats = parse_counter(restarted)
    assert not stats.continuous and stats.pids == [42, 77] and stats.discontinuities == 1

    inside = parse_counter_file("42 5 10.0\n42 6 10.1\n42 8 10.3\n")
    assert inside.missing_values == 1 and inside.single_pid


def test_guest_clock_offset_takes_the_reading_with_the_shortest_round_trip() -> None:
    import time

    from rig.observers import guest_clock_offset

    delays = iter([0.05, 0.0, 0.03])

    def run(cmd: str) -> str:
        assert cmd == "date +%s.%N"
        time.sleep(next(delays))
        return f"{time.time() + 2.5:.9f}\n"

    offset, rtt = guest_clock_offset(run, tries=3)
    assert abs(offset - 2.5) < 0.03 and rtt < 0.03
    assert guest_clock_offset(lambda cmd: "date: not found") is None
