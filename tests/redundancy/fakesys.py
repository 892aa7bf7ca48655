"""A fake sysfs/procfs tree for testing discovery's parsing (relative symlinks, like sysfs)."""

from __future__ import annotations

import os
from pathlib import Path


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def link(root: Path, rel: str, target_rel: str) -> None:
    """Create root/rel -> root/target_rel as a relative symlink."""
    p = root / rel.lstrip("/")
    t = root / target_rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    t.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(t, p.parent), p)


def pci_function(root: Path, bdf: str, vendor: str, device: str, driver: str) -> str:
    d = f"/sys/devices/pci0000:00/{bdf}"
    write(root, f"{d}/vendor", f"0x{vendor}\n")
    write(root, f"{d}/device", f"0x{device}\n")
    if driver:
        link(root, f"{d}/driver", f"/sys/bus/pci/drivers/{driver}")
    return d


def nic(root: Path, name: str, devpath: str) -> None:
    ndir = f"{devpath}/net/{name}"
    write(root, f"{ndir}/address", "00:00:00:00:00:00\n")
    link(root, f"/sys/class/net/{name}", ndir)
    link(root, f"{ndir}/device", devpath)


def disk(
    root: Path,
    name: str,
    devpath: str,
    sectors: int,
    partitions: dict[str, int] | None = None,
    serial: str = "",
    holders: dict[str, list[str]] | None = None,
) -> None:
    bdir = f"{devpath}/block/{name}"
    write(root, f"{bdir}/size", f"{sectors}\n")
    write(root, f"{bdir}/removable", "0\n")
    write(root, f"{bdir}/ro", "0\n")
    (root / bdir.lstrip("/") / "holders").mkdir(parents=True, exist_ok=True)
    if serial:
        write(root, f"{bdir}/serial", serial + "\n")
    link(root, f"{bdir}/device", devpath)
    link(root, f"/sys/class/block/{name}", bdir)
    for part, psectors in (partitions or {}).items():
        pdir = f"{bdir}/{part}"
        write(root, f"{pdir}/size", f"{psectors}\n")
        write(root, f"{pdir}/partition", "1\n")
        (root / pdir.lstrip("/") / "holders").mkdir(parents=True, exist_ok=True)
        link(root, f"/sys/class/block/{part}", pdir)
    for dev, hs in (holders or {}).items():
        base = bdir if dev == name else f"{bdir}/{dev}"
        for h in hs:
            link(root, f"{base}/holders/{h}", f"/sys/devices/virtual/block/{h}")


def md(root: Path, name: str, level: str, members: dict[str, str], sectors: int) -> None:
    """members: member name -> its sysfs block dir."""
    mdir = f"/sys/devices/virtual/block/{name}"
    write(root, f"{mdir}/size", f"{sectors}\n")
    write(root, f"{mdir}/md/level", level + "\n")
    (root / mdir.lstrip("/") / "holders").mkdir(parents=True, exist_ok=True)
    for m, bdir in members.items():
        link(root, f"{mdir}/md/dev-{m}/block", bdir)
        link(root, f"{mdir}/slaves/{m}", bdir)
    link(root, f"/sys/class/block/{name}", mdir)
