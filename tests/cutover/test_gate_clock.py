"""P's wall clock after the move (source_agent/resume.py: clock_at_gate, await_commit): set from V's
clock, which V's beacon keeps fresh next to the commit record, plus P's offset from V's clock taken
at ANNOUNCE. The restore alone leaves it off by the CMOS clock's whole seconds (rig: 0.3-1.5 s)."""

import mmap
import threading
import time
from pathlib import Path

from common import commit_gate
from source_agent.cutover import clock_offset, commit_gate_args
from source_agent.resume import MAX_CLOCK_STEP_S, await_commit, clock_at_gate


def test_the_clock_is_v_s_now_plus_p_s_offset_plus_the_time_since() -> None:
    target, why = clock_at_gate(1_000_000_000_000_000_000, -0.25, 0.002, now_s=999_999_998.5)
    assert why == ""
    assert abs(target - (1_000_000_000 + commit_gate.BEACON_PERIOD_S / 2 - 0.25 + 0.002)) < 1e-6


def test_the_clock_is_left_when_its_reading_is_not_known_to_a_few_ms() -> None:
    assert clock_at_gate(10**18, None, 0.0, 1e9) == (None, "no offset from V's clock")
    assert clock_at_gate(None, 0.1, 0.0, 1e9)[1] == "no live clock from V next to its record"
    target, why = clock_at_gate(10**18, 0.0, 0.0, 1e9 - MAX_CLOCK_STEP_S - 1)
    assert target is None and "more than the restore's error" in why


def test_p_s_offset_from_v_s_stamp_and_the_gate_carries_it() -> None:
    assert clock_offset(1000.5, 1_000_000_000_000) == 0.5
    assert clock_offset(1000.5, 0) is None  # an older V stamps nothing
    gate = commit_gate_args(0x40000, b"\x01" * 32, "mig", False, 0.5)
    assert gate == {"address": 0x40000, "token": "01" * 32, "migration_id": "mig", "p_minus_v_s": 0.5}
    assert "p_minus_v_s" not in commit_gate_args(0x40000, b"\x01" * 32, "mig", False, None)


def test_a_live_beacon_is_told_from_a_stopped_one(tmp_path: Path) -> None:
    ring = tmp_path / "ring"
    ring.write_bytes(bytes(4096))
    reader = commit_gate.map_physical(0, str(ring))
    writer = commit_gate.open_ring_page(ring)
    try:
        assert commit_gate.v_clock_now_ns(reader, tries=1) is None  # nothing written: an older V
        beacon = commit_gate.clock_beacon(writer, duration_s=0.3)
        now = commit_gate.v_clock_now_ns(reader)
        assert now is not None and abs(now - time.time_ns()) < 50_000_000
        beacon.join()
        assert commit_gate.v_clock_now_ns(reader, tries=2) is None  # stopped: its time goes stale
    finally:
        reader.close()
        writer.close()


def test_the_gate_sets_the_clock_from_v_s_beacon(tmp_path: Path) -> None:
    """The gate's real path on a file standing in for /dev/mem (the record there before the gate
    looks, as usual); the clock setter stands in for clock_settime (this host's clock is not the
    test's)."""
    ring = tmp_path / "ring"
    ring.write_bytes(bytes(8192))
    token, set_to = "ab" * 32, []
    record = commit_gate.commit_record(bytes.fromhex(token), "mig")
    with open(ring, "r+b") as f, mmap.mmap(f.fileno(), 4096) as writer:
        commit_gate.write_record(writer, record)
        beacon = commit_gate.clock_beacon(writer, duration_s=1.0)
        said = await_commit(0, token, "mig", memory_path=str(ring), p_minus_v_s=-2.0, set_clock=set_to.append)
        assert len(set_to) == 1 and abs(set_to[0] - (time.time() - 2.0)) < 0.5, (set_to, said)
        assert "clock set from V's (-" in said, said
        # a clock that cannot be set (no CAP_SYS_TIME, a seccomp filter) never stops the OS at the gate
        def refuse(seconds: float) -> None:
            raise PermissionError(1, "Operation not permitted")

        said = await_commit(0, token, "mig", memory_path=str(ring), p_minus_v_s=-2.0, set_clock=refuse)
        assert said.startswith("V's record of P's COMMIT") and "clock left as restored (off by -" in said, said
        # without an offset (an older P agent's plan): as before
        assert "clock" not in await_commit(0, token, "mig", memory_path=str(ring), set_clock=set_to.append)
        beacon.join()
    # the beacon has stopped (a gate reached a minute after V's word): the clock stays as restored
    said = await_commit(0, token, "mig", memory_path=str(ring), p_minus_v_s=-2.0, set_clock=set_to.append)
    assert len(set_to) == 1 and "clock left as restored: no live clock from V" in said, said


def test_the_record_waited_for_arrives_with_v_s_time(tmp_path: Path) -> None:
    ring = tmp_path / "ring"
    ring.write_bytes(bytes(4096))
    record = commit_gate.commit_record(b"t" * 32, "mig")
    reader = commit_gate.map_physical(0, str(ring))
    try:
        later = threading.Timer(0.05, commit_gate.write_record_to_file, (ring, record))
        later.start()
        before = time.time_ns()
        assert commit_gate.await_record(reader, record, timeout_s=5) > 0
        later.join()
        assert before <= commit_gate.record_wall_ns(reader) <= time.time_ns()
    finally:
        reader.close()
