"""Facts about processes from /proc (standard library only: p2vctl's step-out waiter imports it)."""

from __future__ import annotations

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
