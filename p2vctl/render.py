"""Human output for p2vctl: rich tables and a live progress display."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2v.v1 import common_pb2, source_pb2

console = Console()


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def inventory(inv: source_pb2.Inventory) -> None:
    console.print(f"[bold]{inv.hostname or inv.host_id}[/]  kernel {inv.kernel_release}  "
                  f"{inv.cpus} x {inv.cpu_model}  RAM {size(inv.memory_bytes)} "
                  f"(available {size(inv.mem_available_bytes)})")
    console.print(f"/dev/snapshot: {'yes' if inv.snapshot_device else 'no'}   "
                  f"lockdown: {inv.lockdown or 'none'}   host id: {inv.host_id}")
    nics = Table(title="Network interfaces")
    for col in ("name", "kind", "mac", "driver", "pci", "addresses", "master", "up"):
        nics.add_column(col)
    for n in inv.nics:
        nics.add_row(n.name, n.kind or "physical", n.mac, n.driver, f"{n.pci_address} {n.pci_id}".strip(),
                     ", ".join(n.addresses), n.master, "up" if n.up else "down")
    console.print(nics)
    routes = Table(title="Routes")
    for col in ("destination", "gateway", "device"):
        routes.add_column(col)
    for r in inv.routes:
        routes.add_row(r.destination, r.gateway, r.device)
    console.print(routes)
    disks = Table(title="Block devices")
    for col in ("name", "size", "driver", "pci", "serial", "md", "holders"):
        disks.add_column(col)
    for b in inv.block_devices:
        md = f"{b.md_level} [{', '.join(b.md_members)}]" if b.md_level else ""
        disks.add_row(b.name, size(b.size_bytes), b.driver, f"{b.pci_address} {b.pci_id}".strip(),
                      b.serial, md, ", ".join(b.holders))
    console.print(disks)
    console.print(f"firmware memory map: {len(inv.firmware_memmap)} entries")


def verdict(v: source_pb2.CheckVerdict) -> None:
    if v.plan:
        plan = Table(title="Redundancy plan")
        for col in ("physical", "virtual", "scheme"):
            plan.add_column(col)
        for p in v.plan:
            plan.add_row(p.physical, p.virtual, p.scheme)
        console.print(plan)
    for u in v.unpaired:
        console.print(f"  [dim]left as is:[/] {u}")
    for r in v.reasons:
        mark = "[red]BLOCK[/]" if r.blocking else "[yellow]warn[/]"
        console.print(f"  {mark} {r.code}: {r.message}")
    console.print("[bold green]check passed[/]" if v.ok else "[bold red]check refused[/]")


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "?"


def migrations(listed: common_pb2.MigrationList) -> None:
    """`p2vctl list`: one row per migration, then what needs the operator."""
    if not listed.migrations:
        console.print("no migrations")
        return
    table = Table(title="Migrations")
    for col in ("id", "state", "started", "updated", "downtime", "peer", ""):
        table.add_column(col)
    for m in listed.migrations:
        state = common_pb2.MigrationState.Name(m.status.state).removeprefix("MIGRATION_STATE_").lower()
        downtime = f"{m.status.stats.downtime_ms / 1000:.2f} s" if m.status.stats.downtime_ms else ""
        table.add_row(m.status.migration_id, state, _when(m.started_ms), _when(m.updated_ms), downtime,
                      escape(m.peer),
                      "[bold red]needs you[/]" if m.attention else ("" if m.live else "[dim]journal[/]"))
    console.print(table)
    for m in listed.migrations:
        if m.status.error:
            console.print(f"  {m.status.migration_id}: {escape(m.status.error)}")
    for m in listed.migrations:
        if m.attention:
            console.print(f"[bold red]![/] {m.status.migration_id}: {escape(m.attention)}")


def _line(status: common_pb2.MigrationStatus) -> str:
    s = status.stats
    parts = [f"round {status.round}"]
    if s.total:
        parts.append(f"{size(s.transferred)} sent")
        parts.append(f"{size(s.remaining)} dirty")
    if s.mbps:
        parts.append(f"{s.mbps:.0f} Mbit/s")
    if s.expected_downtime_ms:
        parts.append(f"expected downtime {s.expected_downtime_ms} ms")
    return "  ".join(parts)


async def follow(stream) -> common_pb2.MigrationStatus | None:
    """Show a live progress bar until the migration ends; returns the final status."""
    last: common_pb2.MigrationStatus | None = None
    columns = (TextColumn("[bold]{task.fields[phase]:<10}"), BarColumn(),
               TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("migration", total=1.0, phase="setup", info="")
        said = ("", "")
        async for status in stream:
            last = status
            # each step's own word once, above the bar (the bar shows the round figures instead)
            step = (status.progress.phase or "setup", status.progress.detail)
            if step[1] and step != said and not step[1].startswith("round "):
                progress.console.print(f"[dim]{step[0]}:[/] {escape(step[1])}")
            said = step
            fraction = status.progress.fraction
            progress.update(task, completed=max(fraction, 0.0) if fraction >= 0 else None,
                            phase=status.progress.phase or "setup",
                            info=_line(status) or status.progress.detail)
    if last is not None:
        summary(last)
    return last


def summary(status: common_pb2.MigrationStatus) -> None:
    s = status.stats
    state = common_pb2.MigrationState.Name(status.state).removeprefix("MIGRATION_STATE_").lower()
    colour = "green" if state == "completed" else "red"
    rehearsal = status.progress.phase == "rehearsal"
    console.print(f"[bold {colour}]migration {status.migration_id}: {state}[/]"
                  + (" (a rehearsal: P runs on, nothing was handed over)" if rehearsal else "")
                  + (f" — {status.error}" if status.error else ""))
    table = Table(show_header=False, box=None)
    rows: list[tuple[str, object]] = [
        ("rounds", s.dirty_sync_count), ("transferred", size(s.transferred)), ("total memory", size(s.total)),
        ("zero pages", s.duplicate), ("full pages", s.normal)]
    if s.cutover_pages:  # the whole-OS move: pre-copy, then the final image
        image = s.cutover_pages * 4096
        rows += [("pre-copy", size(s.precopy_bytes)),
                 ("cutover", f"{size(s.downtime_bytes)} on the wire for a {size(image)} image "
                             f"({s.downtime_bytes / image:.1%})"),
                 ("dedup at cutover", f"{s.skipped} of {s.cutover_pages} pages from V's store "
                                      f"({s.skipped / s.cutover_pages:.1%})")]
    else:
        rows.append(("skipped (held)", s.skipped))
    rows += [("total time", f"{s.total_time_ms / 1000:.2f} s"),
             ("downtime", (f"{s.downtime_ms} ms (OS frozen" + (" until V had verified the image)" if rehearsal
                                                                 else ")")) if s.downtime_ms else "-")]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
