"""Facts about processes from /proc (standard library only: p2vctl's step-out waiter imports it)."""

from __future__ import annotations

import os
from pathlib import Path


def process_started(pid: int, proc: str = "/proc") -> int | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or None if
    there is no such process, or only its exit status is left (a zombie)."""
    try:
        stat = Path(proc, str(pid), "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: fields resume after the last ')'
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def status_kib(pid: int, field: str, proc: str = "/proc") -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, RssFile, ...), or None if the process or the field
    is not there."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


#: the columns of /proc/stat's "cpu" line, in order
CPU_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
#: the network's columns of /proc/stat's "softirq" line (after its total: HI, TIMER, NET_TX, NET_RX)
SOFTIRQ_COLUMNS = {"net_tx": 3, "net_rx": 4}


def stat_counters(stat: str = "/proc/stat") -> dict[str, float]:
    """The machine's counters since boot from /proc/stat: seconds all CPUs spent in each state
    (CPU_COLUMNS), interrupts taken ("interrupts") and the network's softirqs run ("net_tx",
    "net_rx"). Empty if unreadable."""
    try:
        with open(stat) as f:  # split only the three lines read: "intr" has hundreds of fields
            lines = {key: line.split() for line in f if (key := line.split(" ", 1)[0]) in ("cpu", "intr", "softirq")}
        ticks = os.sysconf("SC_CLK_TCK")
        out = {name: int(v) / ticks for name, v in zip(CPU_COLUMNS, lines["cpu"][1:], strict=False)}
        if "intr" in lines:
            out["interrupts"] = float(lines["intr"][1])
        if "softirq" in lines:
            out.update({name: float(lines["softirq"][1 + i]) for name, i in SOFTIRQ_COLUMNS.items()})
        return out
    except (OSError, ValueError, KeyError, IndexError):
        return {}
