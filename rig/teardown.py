"""Remove everything the rig (or a test on it) started: processes by pidfile and by name prefix,
libvirt domains by prefix, namespaces, links. Works from a fresh process after a crash: it needs
nothing but the run directory and the fixed names in rig.config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rig import config as C
from rig import libvirtd, net
from rig.procs import PidRegistry, kill_pid, proc_cmdline

log = logging.getLogger(__name__)
#: pid-registry name of the process that keeps the rig lock for a rig started by `python -m rig up`
LOCK_HOLDER = "rig-lock-holder"


def rig_qemu_pids() -> list[int]:
    """QEMU processes named with the rig prefix: the rig's own (`-name p2vrig-...`) and libvirt's
    (`-name guest=p2vrig-...`; normally removed through libvirt, this catches them if libvirtd died)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        cmd = proc_cmdline(pid)
        if "qemu-system" in cmd and (f"-name {C.NAME_PREFIX}" in cmd or f"-name guest={C.NAME_PREFIX}" in cmd):
            pids.append(pid)
    return sorted(pids)


def leftovers(run_dir: Path | None = None) -> dict[str, list]:
    """What teardown would remove (empty lists everywhere = clean)."""
    registry = PidRegistry((run_dir or C.RigConfig().run_dir) / "pids")
    return {
        "processes": [n for n in registry.names() if registry.get(n) is not None],
        "qemu_pids": rig_qemu_pids(),
        "namespaces": [ns for ns in net.NAMESPACES if net.netns_exists(ns)],
        "links": net.rig_links(),
        "domains": libvirtd.list_domains(C.NAME_PREFIX) if libvirtd.available() else [],
    }


def teardown(run_dir: Path | None = None) -> dict[str, list]:
    """Remove all rig leftovers; returns what was removed."""
    registry = PidRegistry((run_dir or C.RigConfig().run_dir) / "pids")
    removed: dict[str, list] = {"processes": [], "qemu_pids": [], "namespaces": [], "links": [],
                                "domains": []}
    # host-side helpers first (the TCP client would log P's disappearance as an error otherwise),
    # the holder of the rig lock (CLI `up`) only at the very end, after everything is gone
    names = [n for n in registry.names() if n != LOCK_HOLDER]
    for name in sorted(names, key=lambda n: n.startswith(C.NAME_PREFIX)):
        if registry.stop(name):
            removed["processes"].append(name)
    if libvirtd.available():
        removed["domains"] = libvirtd.remove_domains(C.NAME_PREFIX)
    for pid in rig_qemu_pids():
        kill_pid(pid, 5)
        removed["qemu_pids"].append(pid)
    # anything still running inside our namespaces was started by us or by a test on the rig
    for ns in net.NAMESPACES:
        if net.netns_exists(ns):
            for pid in net.netns_pids(ns):
                kill_pid(pid, 3)
                removed["processes"].append(pid)
    removed["namespaces"] = net.teardown_namespaces()
    removed["links"] = net.teardown_links()
    if registry.stop(LOCK_HOLDER):
        removed["processes"].append(LOCK_HOLDER)
    return removed
