"""libvirtd and virtlogd without systemd: started by hand, found by their pidfiles; domains the rig
(or the destination agent on it) creates are named with config.NAME_PREFIX."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from rig.procs import pid_alive

log = logging.getLogger(__name__)
URI = "qemu:///system"
DAEMONS = (("virtlogd", Path("/run/virtlogd.pid")), ("libvirtd", Path("/run/libvirtd.pid")))


def _pidfile_alive(path: Path) -> bool:
    try:
        return pid_alive(int(path.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return False


def available() -> bool:
    return all(shutil.which(name) for name, _ in DAEMONS) and shutil.which("virsh") is not None


def running() -> bool:
    return all(_pidfile_alive(pidfile) for _, pidfile in DAEMONS)


def virsh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)


def ensure_running(timeout_s: float = 30.0) -> None:
    if not available():
        raise RuntimeError("libvirt is not installed (run rig/host-setup.sh)")
    for name, pidfile in DAEMONS:
        if not _pidfile_alive(pidfile):
            subprocess.run([name, "-d"], check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if virsh("version", timeout=10).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("libvirtd did not answer `virsh version`")


def list_domains(prefix: str) -> list[str]:
    """All domains (running or only defined) whose name starts with prefix."""
    names: set[str] = set()
    if running():
        res = virsh("list", "--all", "--name", timeout=15)
        names |= {n.strip() for n in res.stdout.splitlines() if n.strip().startswith(prefix)}
    # persistent definitions exist even while libvirtd is down
    names |= {p.stem for p in Path("/etc/libvirt/qemu").glob(f"{prefix}*.xml")}
    return sorted(names)


def remove_domains(prefix: str) -> list[str]:
    removed = []
    for name in list_domains(prefix):
        if running():
            virsh("destroy", name, timeout=30)
            if virsh("undefine", name, "--nvram", timeout=30).returncode != 0:
                virsh("undefine", name, timeout=30)
            if virsh("dominfo", name, timeout=15).returncode != 0:
                removed.append(name)
        else:
            xml = Path("/etc/libvirt/qemu", f"{name}.xml")
            xml.unlink(missing_ok=True)
            removed.append(name)
    return removed
