"""The README's main job: migrate the rig's running "physical" machine P into a VM on V, live.

`python -m rig demo` boots the rig and hands it here. Everything the demo shows is observed from
outside P: the counter process's PID and values, the client's TCP session, the files on md, P's
power state, and the migration's own statistics as p2vctl prints them (--json lines, read back
from P and then from the VM, since P's console ends with P).
"""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.migration_state import FINAL_STATE_NAMES
from p2vctl.render import size

console = Console()


def _last_status(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"state"' in line:
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _final(status: dict | None) -> bool:
    return status is not None and status.get("state") in FINAL_STATE_NAMES


def migrate_on_rig(rig) -> int:  # rig: rig.core.Rig (kept untyped: p2vctl must import without the rig)
    from rig import config as C
    from rig import workloads

    # V's side of the rig (destination agent, NBD export, waiting VM's network), as the e2e test
    # and bench.e2e drive it
    from rig.destination import (
        build_redundancy,
        start_destination,
        start_migration,
        stop_destination,
        wait_vm_command,
    )
    from rig.observers import parse_counter_file

    console.rule("[bold]V: destination agent and the waiting VM's network")
    dest = start_destination(rig, with_export=True)
    try:
        workloads.wait_tcp_flowing(rig.tcp_log, min_echoes=20)
        counter_before, files_before = rig.counter_stats(), rig.verify_files()
        pids_before = rig.workload_pids()
        console.print(f"P runs: counter pid {counter_before.pids} at {counter_before.last_value}, "
                      f"TCP session flowing, {files_before.checked} checksummed files on md")

        console.rule("[bold]P: redundancy — bond over the e1000, md RAID1 leg over NBD to V")
        with console.status("building the bond and syncing the md leg over the network ..."):
            built = build_redundancy(rig)
        table = Table("id", "kind", "detail")
        for entry in built["journal"]["entries"]:
            table.add_row(entry["id"], entry["kind"], json.dumps(entry.get("detail", {}))[:80])
        console.print(table)

        console.rule(f"[bold]migrating P to {dest.address}")
        t0 = time.time()
        # under TCG the agent itself dirties pages faster than pre-copy converges: switch over after
        # 5 rounds and let the cutover carry the rest (as the end-to-end test does)
        start_migration(rig, dest, extra="--json --max-rounds 5")
        status: dict | None = None
        where = "P"
        columns = (TextColumn("[bold]{task.fields[phase]:<9}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("migration", total=1.0, phase="setup", info="")
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline and not _final(status):
                time.sleep(1)
                try:
                    if rig.machine.alive():
                        out = rig.run(f"tail -n 3 {C.P_STATE_DIR}/migrate.out", timeout=20).out
                    else:
                        where = "VM"
                        out = wait_vm_command(dest, f"tail -n 3 {C.P_STATE_DIR}/migrate.out", 60)
                except Exception:  # the control channel is down while P freezes and the VM resumes
                    continue
                status = _last_status(out) or status
                if status:
                    stats = status.get("stats", {})
                    progress.update(
                        task, completed=max(float(status.get("progress", {}).get("fraction", 0)), 0.0),
                        phase=status.get("progress", {}).get("phase", ""),
                        info=(f"[{where}] round {status.get('round', 0)}  "
                              f"{size(int(stats.get('transferred', 0)))} sent  "
                              f"{size(int(stats.get('remaining', 0)))} dirty"))
        ok = bool(status) and status["state"].endswith("COMPLETED")
        elapsed = time.time() - t0
        time.sleep(5)  # the agent unloads itself a moment after completion

        console.rule("[bold]result, observed from outside")
        table = Table("what", "observed", "verdict")

        def row(what: str, observed: str, good: bool) -> None:
            nonlocal ok
            ok = ok and good
            table.add_row(what, observed, "[green]ok[/]" if good else "[red]FAIL[/]")

        state = status["state"].removeprefix("MIGRATION_STATE_").lower() if status else "unknown"
        row("migration", f"{state} in {elapsed:.1f} s" + (f": {status.get('error')}" if status and
                                                               status.get("error") else ""), state == "completed")
        row("P (physical)", rig.power_state(), rig.power_state() == "off")
        try:
            counter = parse_counter_file(dest.vm_run(f"cat {C.P_COUNTER_LOG}", timeout=120))
            alive = dest.vm_run(f"for n in counter echo filewriter; do kill -0 $(cat {C.P_STATE_DIR}/$n.pid) "
                                "2>/dev/null && echo $n; done").split()
            row("same processes", f"{sorted(pids_before.items())} alive in the VM: {alive}",
                len(alive) == len(pids_before))
            row("counter", f"pid {counter.pids}, {counter_before.last_value} -> {counter.last_value}, "
                f"longest gap {counter.max_gap_s:.2f} s", counter.pids == counter_before.pids
                and counter.discontinuities == 0)
            files = json.loads(dest.vm_run(f"python3 {C.P_RIG_DIR}/verify_files.py {C.P_FILES_DIR}",
                                           timeout=120).strip().splitlines()[-1])
            row("files on md", f"writer at file {files_before.last_seq} -> {files['last_seq']}, "
                f"{files['checked']} checked, bad {len(files['bad'])}, missing {len(files['missing'])}",
                files["last_seq"] > files_before.last_seq and not files["bad"] and not files["missing"])
            agent = dest.vm_run("pgrep -f '[s]ource_agent[.]main' || echo gone").strip()
            row("agent unloaded", agent, agent == "gone")
        except Exception as exc:  # the VM is not answering: say so rather than crash the demo
            row("the VM", f"not reachable: {exc}", False)
        tcp = rig.tcp_stats(since=t0)
        row("client's TCP session", f"reconnects {tcp.reconnects}, lost {tcp.lost}, duplicated {tcp.duplicated}, "
            f"longest gap {tcp.max_gap_s:.2f} s", tcp.reconnects == 0 and tcp.lost == 0 and tcp.duplicated == 0)
        console.print(table)
        if status:
            stats = status.get("stats", {})
            console.print(f"rounds {stats.get('dirty_sync_count', 0)}, pre-copy "
                          f"{size(int(stats.get('precopy_bytes', 0) or stats.get('transferred', 0)))}, "
                          f"at cutover {size(int(stats.get('downtime_bytes', 0)))} "
                          f"({int(stats.get('skipped', 0))} of {int(stats.get('cutover_pages', 0))} image pages "
                          "from V's store), "
                          f"downtime {stats.get('downtime_ms', '?')} ms (QEMU's own live migration of the "
                          "same P: python -m bench.qemu_baseline; both side by side: python -m bench.e2e)")
        console.print("[bold green]P now runs as a VM on V[/]" if ok else "[bold red]the demo found a problem[/]")
        return 0 if ok else 1
    finally:
        stop_destination(dest)
