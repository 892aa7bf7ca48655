"""The workloads: three inside P (started by P's boot script, rig/guest/rc.sh) and the TCP client on
the host side in the client namespace (started here)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rig import config as C
from rig.procs import PidRegistry, spawn

if TYPE_CHECKING:
    from rig.machine import Machine

#: name in P's state dir -> what it is
P_WORKLOADS = {"counter": "counter (PID + value every 100 ms)", "echo": "TCP echo server",
               "filewriter": "checksummed file writer on md"}
TCP_CLIENT = "tcp-client"
TCP_CLIENT_SCRIPT = Path(__file__).resolve().parent / "tcp_client.py"


def p_workload_pids(machine: Machine) -> dict[str, int | None]:
    """PID of each workload in P, None when it is not running."""
    names = " ".join(P_WORKLOADS)
    script = (f"for n in {names}; do p=$(cat {C.P_STATE_DIR}/$n.pid 2>/dev/null); "
              "if [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null; then echo \"$n $p\"; else echo \"$n -\"; fi; "
              "done")
    res = machine.run(script, timeout=30, check=True)
    pids: dict[str, int | None] = {}
    for line in res.out.splitlines():
        name, pid = line.split()
        pids[name] = int(pid) if pid.isdigit() else None
    return pids


def start_tcp_client(registry: PidRegistry, run_dir: Path, interval_s: float = 0.05) -> Path:
    """The long-lived client (a host process in the client namespace). Returns its log path."""
    log_path = run_dir / "tcp-client.log"
    log_path.unlink(missing_ok=True)
    argv = [sys.executable, str(TCP_CLIENT_SCRIPT), "--host", C.P_IP, "--port", str(C.ECHO_PORT),
            "--log", str(log_path), "--interval", str(interval_s)]
    spawn(registry, TCP_CLIENT, argv, run_dir / "tcp-client.out", netns=C.NS_CLIENT)
    return log_path


def wait_tcp_flowing(log_path: Path, min_echoes: int = 20, timeout_s: float = 60.0) -> None:
    """Until the client has received min_echoes echoes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if text.count(" recv ") >= min_echoes:
            return
        time.sleep(0.2)
    raise TimeoutError(f"TCP client got fewer than {min_echoes} echoes in {timeout_s:.0f}s; log tail:\n"
                       + (log_path.read_text()[-1500:] if log_path.exists() else "(no log)"))


def stop_tcp_client(registry: PidRegistry) -> bool:
    return registry.stop(TCP_CLIENT)


def read_p_file(machine: Machine, path: str, tail_lines: int | None = None) -> str:
    cmd = f"tail -n {tail_lines} {shlex.quote(path)}" if tail_lines else f"cat {shlex.quote(path)}"
    return machine.run(cmd, timeout=60, check=True).out
