"""The whole-OS move on the rig, next to QEMU's own live migration of the same P, in one run.

    python -m bench.e2e [--memory MIB] [--max-rounds N] [--no-redundancy] [--skip-qemu]

1. QEMU's own migration of P (bench.qemu_baseline): total time and the client's longest gap.
2. p2v: the rig up, V's agent with the waiting VM, P's redundancy (bond + md leg over NBD), then
   `p2vctl migrate` inside P; P powers off, the OS runs on in the VM, the redundancy is cancelled.

Figures: downtime_s = P frozen for the snapshot -> OS unfrozen in the VM (both wall clocks, from the
agent's journal in the VM); client_gap_s = the longest pause between two echoes the TCP client saw;
total_time_s = `p2vctl migrate` start -> completion reported; cutover_bytes = bytes on the image
socket; image_bytes = the hibernation image; ratios p2v / QEMU. The line before it has the details,
among them p_cpu_probe_s: P's emulated CPU speed in this run (the host's varies from run to run).
The last line printed is one JSON object with the keys named in issue 6.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rig import observers, workloads
from rig.config import RigConfig
from rig.core import Rig

#: In P: hash 20 480 pages (80 MiB) through page views, as the cutover helper does. Its time tells this
#: run's emulated CPU speed, which varies from run to run on this box by more than the changes measured.
CPU_PROBE = ("import time, xxhash; v = memoryview(bytearray(4096 * 1024)); "
             "pages = [v[i * 4096:(i + 1) * 4096] for i in range(1024)]; t = time.perf_counter(); "
             "[xxhash.xxh64_intdigest(p) for _ in range(20) for p in pages]; print(time.perf_counter() - t)")


def p_cpu_probe(rig: Rig) -> float | None:
    """The best of three CPU_PROBE runs in P, seconds (None if it could not run)."""
    times = []
    for _ in range(3):
        res = rig.run(f"python3 -c '{CPU_PROBE}'", timeout=60)
        try:
            times.append(float(res.out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return None
    return round(min(times), 4)


def run_p2v(memory_mib: int | None, max_rounds: int, redundancy: bool, settle_s: float) -> dict:
    from rig import destination as cr

    cfg = RigConfig()
    if memory_mib:
        cfg.memory_mib = memory_mib
    rig = Rig(cfg)
    rig.start()
    try:
        dest = cr.start_destination(rig, with_export=redundancy)
        workloads.wait_tcp_flowing(rig.tcp_log, min_echoes=20, timeout_s=60)
        if redundancy:
            cr.build_redundancy(rig)
        time.sleep(settle_s)
        probe_s = p_cpu_probe(rig)
        p_clock = observers.guest_clock_offset(lambda cmd: rig.run(cmd, timeout=30).out)
        t_start = time.time()
        cr.start_migration(rig, dest, extra=f"--max-rounds {max_rounds}" if max_rounds else "")
        off_at = cr.wait_p_off(rig, timeout_s=1800)
        out = cr.wait_migration_end_in_vm(dest, timeout_s=600)
        if cr.final_state(out) != "completed":
            raise RuntimeError(f"migration did not complete:\n{out[-3000:]}")
        journal = json.loads(cr.wait_vm_command(
            dest, "cat $(ls -t /var/lib/p2v-source/migrations/*.json | head -1)", 60))
        # the move's error on P's wall clock (the restore counts the time it was away in whole
        # seconds of the CMOS clock): P's offset from the host's clock after the move minus before
        vm_clock = observers.guest_clock_offset(lambda cmd: cr.wait_vm_command(dest, cmd, 60))
        time.sleep(5)
        tcp = rig.tcp_stats(since=t_start - 2.0)
        figures = journal.get("figures", {})
        cut = next((dest.dir / "state" / "migrations").glob("*/cutover.json"))
        receipt = json.loads(cut.read_text())
        details = {
            "memory_mib": cfg.memory_mib, "p_cpu_probe_s": probe_s, "p_off_after_s": round(off_at - t_start, 3),
            "pages_sent": receipt["pages_sent"], "pages_from_store": receipt["pages_from_store"],
            "p_timings_s": receipt.get("source_timings"), "v_steps": receipt.get("steps"),
            "resume_steps": figures.get("resume_steps"), "tcp_reconnects": tcp.reconnects, "tcp_lost": tcp.lost,
            "tcp_duplicated": tcp.duplicated,
            "p_clock_offset_s": p_clock and round(p_clock[0], 3),
            "vm_clock_offset_s": vm_clock and round(vm_clock[0], 3),
            "clock_shift_s": round(vm_clock[0] - p_clock[0], 3) if p_clock and vm_clock else None,
            "clock_reading_rtt_s": round(max(p_clock[1], vm_clock[1]), 3) if p_clock and vm_clock else None,
        }
        print(json.dumps(details), flush=True)
        return {
            "downtime_s": round(figures["unfrozen_at"] - figures["frozen_at"], 3),
            "client_gap_s": round(tcp.max_gap_s, 3),
            "total_time_s": round(journal["updated"] - t_start, 3),
            "cutover_bytes": receipt["wire_bytes"],
            "image_bytes": receipt["image_bytes"],
        }
    finally:
        rig.stop()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--memory", type=int, help="P's memory in MiB (default: the rig's, 1024)")
    ap.add_argument("--max-rounds", type=int, default=5,
                    help="pre-copy rounds at most (default 5: under TCG the agent dirties pages faster than "
                         "pre-copy converges; 0 = the agent's default)")
    ap.add_argument("--no-redundancy", action="store_true", help="plain P: no bond, no md leg")
    ap.add_argument("--skip-qemu", action="store_true", help="do not run QEMU's own migration")
    ap.add_argument("--settle", type=float, default=5.0)
    args = ap.parse_args()
    qemu = {"total_time_s": None, "client_gap_s": None}
    if not args.skip_qemu:
        from bench import qemu_baseline

        qemu = qemu_baseline.run(args.settle, 8.0, args.memory)
    ours = run_p2v(args.memory, args.max_rounds, not args.no_redundancy, args.settle)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    result = {
        **ours,
        "qemu_client_gap_s": qemu["client_gap_s"], "qemu_total_time_s": qemu["total_time_s"],
        "gap_ratio": ratio(ours["client_gap_s"], qemu["client_gap_s"]),
        "total_ratio": ratio(ours["total_time_s"], qemu["total_time_s"]),
        "cutover_ratio": ratio(ours["cutover_bytes"], ours["image_bytes"]),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
