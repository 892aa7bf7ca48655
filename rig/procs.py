"""Processes the rig starts, tracked by pidfiles under <run_dir>/pids so that teardown finds them even
after the Python process that started them crashed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: tells a recycled pid from the process we started."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class PidRegistry:
    """`<dir>/<name>.pid` holds "pid start_ticks"."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def record(self, name: str, pid: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{name}.pid").write_text(f"{pid} {proc_start_ticks(pid) or 0}\n")

    def get(self, name: str) -> int | None:
        """The live pid recorded under name, or None."""
        path = self.directory / f"{name}.pid"
        try:
            pid_s, ticks_s = path.read_text().split()
        except (OSError, ValueError):
            return None
        pid = int(pid_s)
        if not pid_alive(pid) or (int(ticks_s) and proc_start_ticks(pid) != int(ticks_s)):
            return None
        return pid

    def names(self) -> list[str]:
        if not self.directory.exists():
            return []
        return sorted(p.stem for p in self.directory.glob("*.pid"))

    def forget(self, name: str) -> None:
        (self.directory / f"{name}.pid").unlink(missing_ok=True)

    def stop(self, name: str, timeout_s: float = 5.0) -> bool:
        """SIGTERM, then SIGKILL after timeout; True if a live process was stopped."""
        pid = self.get(name)
        self.forget(name)
        if pid is None:
            return False
        kill_pid(pid, timeout_s)
        return True


def kill_pid(pid: int, timeout_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)


def spawn(registry: PidRegistry, name: str, argv: list[str], log_path: Path,
          netns: str | None = None, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start a detached process (own session; it outlives the caller) and record its pid."""
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]  # ip execs the command: same pid
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})},
                                cwd=str(cwd) if cwd else None)
    registry.record(name, proc.pid)
    return proc
