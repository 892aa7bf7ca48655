"""The yardstick: QEMU's own live migration of P to a second QEMU on the same box.

Brings the rig up (P with its workloads, the TCP client in the client namespace), starts a target
QEMU with P's device set and `-incoming` (same disk files: shared storage; its own tap on the rig's
bridge, same MAC), runs QMP `migrate` with QEMU's default parameters, and reads total time and
downtime from `query-migrate`. client_gap_s is the longest pause between two echoes the TCP client
saw around the migration. Then it checks that the workloads live on in the target.

    python -m bench.qemu_baseline [--settle 5] [--after 8]

The last line printed is one JSON object: {"total_time_s", "downtime_s", "client_gap_s"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rig import config as C
from rig import net, observers, workloads
from rig.config import RigConfig
from rig.core import Rig
from rig.machine import Machine

TARGET_NAME = C.NAME_PREFIX + "target"
TARGET_TAP = "p2vtap-t"
MIGRATION_TIMEOUT_S = 600.0


def wait_migration(source: Machine, timeout_s: float) -> dict:
    """Poll query-migrate until it completes (or fails); returns the final info."""
    deadline = time.monotonic() + timeout_s
    info: dict = {}
    while time.monotonic() < deadline:
        info = source.qmp("query-migrate")  # type: ignore[assignment]
        status = info.get("status")
        if status == "completed":
            # QEMU marks the migration completed a moment before it computes total-time: until then
            # query-migrate says 0 (seen once in bench.e2e: total ratio null). Ask again, briefly.
            settle = time.monotonic() + 2.0
            while not info.get("total-time") and time.monotonic() < settle:
                time.sleep(0.05)
                info = source.qmp("query-migrate")  # type: ignore[assignment]
            return info
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}: {info.get('error-desc', info)}")
        time.sleep(0.1)
    raise TimeoutError(f"migration not complete after {timeout_s:.0f}s: {info}")


def run(settle_s: float, after_s: float, memory_mib: int | None) -> dict:
    cfg = RigConfig(with_libvirt=False)
    if memory_mib:
        cfg.memory_mib = memory_mib
    rig = Rig(cfg)
    rig.start(wait_agent=False)
    try:
        source = rig.machine
        workloads.wait_tcp_flowing(rig.tcp_log, min_echoes=20, timeout_s=60)
        time.sleep(settle_s)  # let the workloads run (and dirty memory) before the move
        pids_before = rig.workload_pids()

        net.setup_tap(TARGET_TAP)
        assert rig.build_result is not None
        target = Machine(TARGET_NAME, rig.run_dir, rig.build_result, source.disks,
                         memory_mib=source.memory_mib, smp=source.smp, tap=TARGET_TAP,
                         incoming=f"unix:{rig.run_dir / 'migrate.sock'}")
        target.start()
        deadline = time.monotonic() + 30
        while target.power_state() != "inmigrate" and time.monotonic() < deadline:
            time.sleep(0.1)

        t_start = time.time()
        source.qmp("migrate", {"uri": f"unix:{rig.run_dir / 'migrate.sock'}"})
        info = wait_migration(source, MIGRATION_TIMEOUT_S)
        t_done = time.time()
        source_state = source.power_state()  # 'postmigrate': stopped, never runs again
        deadline = time.monotonic() + 30
        while target.power_state() != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        target_state = target.power_state()
        source.stop(timeout_s=5)  # P is gone; the target is the machine now

        time.sleep(after_s)  # the client must see the session flow again after the move
        tcp = observers.tcp_from_log(rig.tcp_log, since=t_start - 2.0)
        counter = observers.counter_from_console([source.console_log, target.console_log])
        pids_after = workloads.p_workload_pids(target)
        files = observers.verify_files(target)
        ram = info.get("ram", {})
        details = {
            "memory_mib": source.memory_mib,
            "setup_time_s": info.get("setup-time", 0) / 1000,
            "ram_transferred_mib": round(ram.get("transferred", 0) / (1 << 20), 1),
            "ram_duplicate_pages": ram.get("duplicate"), "ram_normal_pages": ram.get("normal"),
            "dirty_sync_count": ram.get("dirty-sync-count"), "mbps": ram.get("mbps"),
            "source_state_after": source_state, "target_state_after": target_state,
            "pids_same": pids_before == pids_after, "pids": pids_after,
            "counter_single_pid": counter.single_pid, "counter_max_gap_s_guest_clock": counter.max_gap_s,
            "tcp_reconnects": tcp.reconnects, "tcp_lost": tcp.lost, "tcp_duplicated": tcp.duplicated,
            "tcp_gap_ended_at_s_after_migrate": round((tcp.max_gap_at or t_start) - t_start, 3),
            "files_ok": files.ok, "files_checked": files.checked,
            "wall_migrate_s": round(t_done - t_start, 3),
        }
        print(json.dumps(details))
        return {
            "total_time_s": info["total-time"] / 1000 if info.get("total-time") else round(t_done - t_start, 3),
            "downtime_s": info["downtime"] / 1000,
            "client_gap_s": round(tcp.max_gap_s, 3),
        }
    finally:
        rig.stop()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.qemu_baseline", description=__doc__.split("\n")[0])
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of workload before the move")
    ap.add_argument("--after", type=float, default=8.0, help="seconds of observation after the move")
    ap.add_argument("--memory", type=int, help="P's memory in MiB (default: the rig's, 1024)")
    args = ap.parse_args()
    result = run(args.settle, args.after, args.memory)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
