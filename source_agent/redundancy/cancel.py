"""Cancellation (lifecycle step 7): inside the migrated OS, on V's instruction, for the listed ids only.

- bond: the NIC is left on the virtual device (the physical slave is gone); the bond is dissolved
  onto the virtio NIC when that NIC's own MAC is the bond's, else kept with it as only slave.
- bond-slave-placeholder (an administrator's bond that the virtual NIC joined): nothing to do; the
  virtual NIC stays in the administrator's bond.
- md-leg: the array moves onto the VM's local virtio disk (found by the catalog's serial, else by
  name): the local disk is added, md rebuilds it from the network leg, then the network leg is failed
  and removed, the vanished physical members are removed, raid-disks and bitmap are put back to the
  administrator's shape. The local disk must never be the export seen a second time (checked).
- nbd: disconnected (after its md leg is gone).
- driver-load / initramfs-modules: kept (the VM needs the virtio drivers); marked cancelled.
- Afterwards the drivers of the physical devices are unloaded when no device is bound to them.

Ids that are not in the journal are refused before anything is changed. Nothing that is not in the
journal (a redundancy the administrator made before) is ever touched.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from source_agent.redundancy import bond, drivers, mdmirror, sysops
from source_agent.redundancy.journal import Entry, Journal

log = logging.getLogger(__name__)
_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class CancelError(RuntimeError):
    pass


@dataclass
class CancelResult:
    done: list[tuple[str, str]] = field(default_factory=list)  # (id, what was done)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    kept_drivers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def select(journal: Journal, ids: Iterable[str]) -> list[Entry]:
    """The entries to cancel, in cancellation order (newest first). Pure; raises CancelError on ids
    that are not in the journal or not live."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        raise CancelError("no redundancy ids given")
    known = {e.id: e for e in journal.entries}
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise CancelError(
            f"ids not created by p2v in migration {journal.migration_id}: {', '.join(unknown)}; nothing changed"
        )
    not_live = [i for i in wanted if known[i].state not in ("done", "pending")]
    if not_live:
        raise CancelError(f"ids not live (already undone or cancelled): {', '.join(not_live)}; nothing changed")
    order = {e.id: n for n, e in enumerate(journal.entries)}
    return sorted((known[i] for i in wanted), key=lambda e: -order[e.id])


def find_local_disk(virtual: str, serial: str, exclude: Iterable[str] = (), root: Path = Path("/")) -> str:
    """The VM's local virtio disk for a catalog disk: by serial, else by name. Must be unused."""
    skip = {os.path.basename(x) for x in exclude}
    base = root / "sys/class/block"
    candidates = []
    for p in sorted(base.iterdir()) if base.is_dir() else []:
        if p.name in skip or (p / "partition").exists():
            continue
        drv = p / "device" / "driver"
        if not (drv.exists() and os.path.basename(os.path.realpath(drv)) == "virtio_blk"):
            continue
        dev_serial = (p / "serial").read_text().strip() if (p / "serial").exists() else ""
        if serial and dev_serial == serial:
            candidates.insert(0, p.name)
        elif not serial and p.name == virtual:
            candidates.append(p.name)
    for name in candidates:
        holders = list((base / name / "holders").iterdir()) if (base / name / "holders").is_dir() else []
        if holders:
            raise CancelError(f"local disk {name} is in use by {[h.name for h in holders]}")
        return f"/dev/{name}"
    what = f"serial {serial!r}" if serial else f"name {virtual!r}"
    raise CancelError(f"no local virtio disk with {what} in this machine")


VANISHED_MEMBER_TIMEOUT_S = 60.0
LEG_READ_TIMEOUT_S = 30.0


def leg_answers(leg_name: str, timeout_s: float = LEG_READ_TIMEOUT_S) -> None:
    """One direct read of the network leg's superblock area, bounded: a leg that does not answer is
    named as the cause instead of mdadm's 'cannot load array metadata'."""
    try:
        sysops.run(["dd", f"if=/dev/{leg_name}", "of=/dev/null", "bs=4096", "count=2", "iflag=direct",
                    "status=none"], timeout=timeout_s)
    except sysops.CommandError as exc:
        raise CancelError(f"the network leg {leg_name} does not answer reads ({exc}): the array cannot "
                          "be moved onto the local disk; check the NBD connection to V") from None


def move_md_to_local(entry: Entry, local: str | None = None, sync_timeout_s: float = 3600.0) -> str:
    md = entry.detail["md"]
    leg = entry.detail["leg"]
    leg_name = os.path.basename(leg)
    st = mdmirror.array_state(md)
    if st.member(leg_name) is None:
        raise CancelError(f"the network leg {leg_name} is not in {md}: nothing to move from")
    local = local or find_local_disk(entry.virtual, entry.detail.get("virtual_serial", ""), exclude=[leg])
    if local == leg:
        raise CancelError(f"local disk {local} is the network leg itself")
    mdmirror.same_backing_guard(md, local)
    mdp = f"/dev/{md}"
    # vanished physical members first: they free the slot the local disk takes. An IDE disk that
    # vanished under the VM keeps requests pending for its ~10 s of failed revalidation: md answers
    # EBUSY until then, so this waits longer than a plain removal would
    for m in st.members:
        gone = not Path(f"/dev/{m.name}").exists() or "faulty" in m.state
        if m.name != leg_name and gone:
            mdmirror.remove_member(md, m.name, timeout_s=VANISHED_MEMBER_TIMEOUT_S)
    # mdadm --add reads the array's metadata from an in-sync member: here the network leg
    leg_answers(leg_name)
    before_add = mdmirror.array_state(md)
    try:
        sysops.run(["mdadm", mdp, "--add", local], timeout=120)
    except sysops.CommandError as exc:
        raise CancelError(f"{exc} [{mdmirror.describe_array(mdmirror.array_state(md))}]") from None
    if mdmirror.free_slots(before_add) == 0:  # no free slot: make room for it
        sysops.run(["mdadm", "--grow", mdp, f"--raid-devices={before_add.raid_disks + 1}"], timeout=120)
    mdmirror.wait_in_sync(md, local, timeout_s=sync_timeout_s)
    mdmirror.remove_member(md, leg_name)
    shape = entry.detail.get("before", {})
    want_disks = int(shape.get("raid_disks") or 0)
    if want_disks and mdmirror.array_state(md).raid_disks != want_disks:
        sysops.run(["mdadm", "--grow", mdp, f"--raid-devices={want_disks}"], timeout=120, check=False)
    if entry.detail.get("bitmap_added") and mdmirror.array_state(md).bitmap != "none":
        sysops.run(["mdadm", "--grow", mdp, "--bitmap=none"], timeout=120)
    return f"{md} moved onto {local}; network leg {leg_name} removed"


def _bound_devices(driver: str) -> list[str]:
    for bus in ("pci", "virtio", "scsi"):
        d = Path(f"/sys/bus/{bus}/drivers/{driver}")
        if d.is_dir():
            return [p.name for p in d.iterdir() if _BDF.match(p.name) or ":" in p.name]
    return []


def unload_physical_drivers(names: Iterable[str], result: CancelResult) -> None:
    for d in dict.fromkeys(names):
        mod = d.replace("-", "_")
        if mod not in drivers.loaded_modules():
            result.kept_drivers.append((d, "not a loaded module (built in, or gone already)"))
            continue
        bound = _bound_devices(d)
        if bound:
            result.kept_drivers.append((d, f"still bound to {', '.join(bound)}"))
            continue
        try:
            sysops.run(["modprobe", "-r", mod], timeout=60)
        except sysops.CommandError as e:
            result.kept_drivers.append((d, str(e)))
            continue
        result.unloaded.append(d)


def cancel(
    journal: Journal,
    ids: Iterable[str],
    local_disks: Mapping[str, str] | None = None,
    sync_timeout_s: float = 3600.0,
    unload: bool = True,
) -> CancelResult:
    """Cancel the listed redundancy ids (inside the VM). Returns what was done; never raises for a
    single entry's failure (it is reported), only for an invalid id list (then nothing is changed)."""
    entries = select(journal, ids)
    result = CancelResult()
    physical: list[str] = []
    failed_legs: set[str] = set()
    for e in entries:
        try:
            if e.kind == "bond":
                what = bond.release_gone_and_dissolve(e)
            elif e.kind == "bond-slave-placeholder":
                what = f"virtual NIC stays in the administrator's bond {e.detail.get('bond')}"
            elif e.kind == "md-leg":
                local = (local_disks or {}).get(e.virtual)
                what = move_md_to_local(e, local, sync_timeout_s)
            elif e.kind == "nbd":
                if e.id in failed_legs:
                    raise CancelError("its md leg could not be moved: the network leg stays")
                mdmirror.undo_nbd(e)
                what = f"{e.detail['device']} disconnected from {e.detail['uri']}"
            elif e.kind in ("driver-load", "initramfs-modules"):
                what = "kept: the VM needs the virtual devices' drivers"
            else:
                raise CancelError(f"unknown kind {e.kind}")
        except Exception as err:
            log.error("cancel %s: %s", e.id, err)
            result.failed.append((e.id, f"{type(err).__name__}: {err}"))
            if e.kind == "md-leg":
                failed_legs.update(e.detail.get("depends_on", []))
            continue
        physical += e.detail.get("physical_drivers", [])
        journal.update(e, "cancelled", cancel_note=what)
        result.done.append((e.id, what))
    if unload and physical:
        unload_physical_drivers(physical, result)
    return result
