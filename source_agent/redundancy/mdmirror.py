"""Disk redundancy: an NBD network leg to V's export, added to P's md RAID1 as a write-mostly member
with a write-intent bitmap; md's recovery copies the disk live.

Steps (each journaled with its undo):
- nbd: ``nbd-client`` connects a free ``/dev/nbdN`` to ``nbd://host:port/export`` (with an I/O timeout,
  so a vanished export fails the leg instead of hanging the array); undo disconnects it.
- md-leg: bitmap added if the array has none; ``mdadm --add`` of the nbd device, flagged write-mostly;
  the array grown by one slot if it had no free one; undo fails and removes the leg and puts
  raid-disks and bitmap back as they were.

Never one backing store as two members (DESIGN.md's caution on the disk): before any ``--add`` the
candidate's md superblock is read; if it carries the Device UUID of a current member, the add is
refused (the two are the same disk seen twice).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from source_agent.redundancy import sysops
from source_agent.redundancy.journal import Entry, Journal

log = logging.getLogger(__name__)

NBD_TIMEOUT_S = 10
NBD_DEFAULT_PORT = 10809


class MirrorError(RuntimeError):
    pass


# --------------------------------------------------------------------------- md state (sysfs)


def _sys(root: Path, rel: str) -> Path:
    return root / "sys" / rel.lstrip("/")


def _read(p: Path, default: str = "") -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return default


def md_kernel_name(md: str, root: Path = Path("/")) -> str:
    """ "md127" for "md127", "/dev/md127" or "/dev/md/p2vdata"."""
    if "/" in md:
        md = os.path.basename(os.path.realpath(root / md.lstrip("/")))
    if not _sys(root, f"/block/{md}/md").is_dir():
        raise MirrorError(f"md array {md} does not exist (any more)")
    return md


@dataclass(frozen=True)
class Member:
    name: str
    state: tuple[str, ...]  # e.g. ("in_sync", "write_mostly")
    slot: str  # "0", "1", ..., "none" for a spare


@dataclass(frozen=True)
class ArrayState:
    name: str
    level: str
    raid_disks: int
    degraded: int
    bitmap: str  # bitmap location: "none", "+8", "file"
    sync_action: str  # "idle", "recover", "resync", ...
    sync_completed: str  # "none" or "done / total" (sectors)
    members: tuple[Member, ...]

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def shape(self) -> dict:
        """What rollback must restore: members, raid-disks, bitmap."""
        return {
            "members": sorted(m.name for m in self.members),
            "raid_disks": self.raid_disks,
            "bitmap": "none" if self.bitmap == "none" else "yes",
            "level": self.level,
        }


def describe_array(st: ArrayState) -> str:
    """One line for error messages: `md127 raid1 2 disks, degraded 1: nbd0 in_sync, sdb faulty`."""
    members = ", ".join(f"{m.name} {'+'.join(m.state)}" for m in st.members) or "no members"
    return f"{st.name} {st.level} {st.raid_disks} disks, degraded {st.degraded}: {members}"


def array_state(md: str, root: Path = Path("/")) -> ArrayState:
    name = md_kernel_name(md, root)
    base = _sys(root, f"/block/{name}/md")
    members = []
    for d in sorted(base.glob("dev-*")):
        members.append(
            Member(name=d.name[4:], state=tuple(_read(d / "state").split(",")), slot=_read(d / "slot", "none"))
        )
    return ArrayState(
        name=name,
        level=_read(base / "level"),
        raid_disks=int(_read(base / "raid_disks", "0") or 0),
        degraded=int(_read(base / "degraded", "0") or 0),
        bitmap=_read(base / "bitmap" / "location", "none") or "none",
        sync_action=_read(base / "sync_action", "idle"),
        sync_completed=_read(base / "sync_completed", "none"),
        members=tuple(members),
    )


@dataclass(frozen=True)
class LegStatus:
    """Where a leg stands; policy for "ready for switchover" is :meth:`ready`."""

    md: str
    leg: str
    present: bool
    in_sync: bool
    faulty: bool
    write_mostly: bool
    bitmap: bool
    recovering: bool
    fraction: float  # 0..1 of the recovery, 1.0 when in sync, -1 unknown

    def ready(self) -> bool:
        return self.present and self.in_sync and not self.faulty and not self.recovering

    def describe(self) -> str:
        if not self.present:
            return f"{self.leg} is no longer a member of {self.md}"
        if self.faulty:
            return f"{self.leg} of {self.md} failed (faulty): the network leg is broken"
        if self.ready():
            return f"{self.leg} of {self.md} in sync"
        return f"{self.leg} of {self.md} recovering {max(self.fraction, 0) * 100:.1f}%"


def free_slots(st: ArrayState) -> int:
    """Slots of the array that no working member occupies (a new member takes one at once)."""
    used = sum(1 for m in st.members if m.slot not in ("", "none") and "faulty" not in m.state)
    return max(st.raid_disks - used, 0)


def leg_status(st: ArrayState, leg: str) -> LegStatus:
    """Pure: the leg's status from an array state."""
    m = st.member(leg)
    recovering = st.sync_action in ("recover", "resync", "reshape") or (m is not None and "in_sync" not in m.state)
    fraction = -1.0
    if m is not None and "in_sync" in m.state and not recovering:
        fraction = 1.0
    elif st.sync_completed not in ("", "none", "delayed"):
        try:
            done, total = (int(x) for x in st.sync_completed.split("/"))
            fraction = done / total if total else -1.0
        except ValueError:
            fraction = -1.0
    return LegStatus(
        md=st.name,
        leg=leg,
        present=m is not None,
        in_sync=m is not None and "in_sync" in m.state,
        faulty=m is not None and "faulty" in m.state,
        write_mostly=m is not None and "write_mostly" in m.state,
        bitmap=st.bitmap != "none",
        recovering=recovering,
        fraction=fraction,
    )


# --------------------------------------------------------------------------- nbd


@dataclass(frozen=True)
class NbdUri:
    host: str
    port: int
    export: str


def parse_nbd_uri(uri: str) -> NbdUri:
    p = urlparse(uri)
    if p.scheme != "nbd" or not p.hostname:
        raise MirrorError(f"export {uri!r}: expected nbd://host[:port]/export")
    try:
        port = p.port or NBD_DEFAULT_PORT
    except ValueError as e:
        raise MirrorError(f"export {uri!r}: {e}") from None
    return NbdUri(p.hostname, port, p.path.lstrip("/"))


def nbd_in_use(dev: str, root: Path = Path("/")) -> bool:
    name = os.path.basename(dev)
    return _sys(root, f"/block/{name}/pid").exists() or _read(_sys(root, f"/block/{name}/size"), "0") not in ("", "0")


def free_nbd(root: Path = Path("/")) -> str:
    names = sorted((p.name for p in _sys(root, "/block").glob("nbd*")), key=lambda n: int(n[3:] or 0))
    for n in names:
        if not nbd_in_use(n, root):
            return f"/dev/{n}"
    raise MirrorError("no free /dev/nbdN (is the nbd module loaded?)")


def logical_block_size(dev: str, root: Path = Path("/")) -> int:
    return int(_read(_sys(root, f"/block/{os.path.basename(dev)}/queue/logical_block_size"), "512") or 512)


def block_size_bytes(dev: str, root: Path = Path("/")) -> int:
    return int(_read(_sys(root, f"/block/{os.path.basename(dev)}/size"), "0") or 0) * 512


def nbd_connect(
    journal: Journal, uri: str, virtual: str = "", min_size: int = 0, block_size: int = 512
) -> tuple[Entry, str]:
    """Connect a free nbd device to V's export; journaled. Returns (entry, "/dev/nbdN")."""
    dev = free_nbd()
    entry = journal.begin("nbd", physical=dev, virtual=virtual, uri=uri, device=dev)
    size = attach_nbd(dev, uri, block_size)
    journal.done(entry, size_bytes=size)
    if size < min_size:
        raise MirrorError(f"V's export {uri} has {size} bytes, the array's members need {min_size}")
    log.info("nbd: %s connected to %s (%d bytes)", dev, uri, size)
    return entry, dev


def attach_nbd(dev: str, uri: str, block_size: int = 512) -> int:
    """`nbd-client` attaches `dev` to V's export; returns the size it shows (bytes)."""
    target = parse_nbd_uri(uri)
    if block_size not in (512, 1024, 2048, 4096):
        raise MirrorError(f"block size {block_size}: must be 512, 1024, 2048 or 4096")
    # the array's logical block size: a leg with a bigger one could not take md's small writes
    argv = ["nbd-client", "-t", str(NBD_TIMEOUT_S), "-b", str(block_size)]
    if target.export:
        argv += ["-N", target.export]
    argv += [target.host, str(target.port), dev]
    try:
        sysops.run(argv, timeout=60)
    except sysops.CommandError as e:
        raise MirrorError(f"cannot attach V's export {uri}: {e}") from None
    size = 0
    for _ in range(50):  # the size shows up asynchronously with the netlink interface
        size = block_size_bytes(dev)
        if size:
            break
        time.sleep(0.1)
    return size


def undo_nbd(entry: Entry) -> None:
    dev = entry.detail["device"]
    name = os.path.basename(dev)
    for md in Path("/sys/block").glob("md*/md"):
        if (md / f"dev-{name}").exists():
            raise MirrorError(f"{dev} is still a member of {md.parent.name}: remove it from the array first")
    if nbd_in_use(dev):
        sysops.run(["nbd-client", "-d", dev], timeout=60)
    for _ in range(50):
        if not nbd_in_use(dev):
            return
        time.sleep(0.1)
    raise MirrorError(f"{dev} is still connected after nbd-client -d")


# --------------------------------------------------------------------------- the md leg


def examine(dev: str) -> dict[str, str]:
    """``mdadm --examine --export``: {} when the device carries no md superblock."""
    out = sysops.run(["mdadm", "--examine", "--export", dev], timeout=30, check=False)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def same_backing_guard(md: str, candidate: str) -> None:
    """Refuse to add ``candidate`` if it is a current member seen a second time."""
    cand = examine(candidate).get("MD_DEV_UUID")
    if not cand:
        return
    st = array_state(md)
    for m in st.members:
        if examine(f"/dev/{m.name}").get("MD_DEV_UUID") == cand:
            raise MirrorError(
                f"{candidate} carries the md superblock of member {m.name} of {st.name} (Device UUID {cand}): "
                "the same backing store would be two members; refusing"
            )


def add_leg(
    journal: Journal,
    md: str,
    leg: str,
    virtual: str = "",
    depends_on: list[str] | None = None,
    virtual_serial: str = "",
) -> Entry:
    """Add ``leg`` (e.g. /dev/nbd0) to the raid1 ``md`` as a write-mostly member with a bitmap."""
    st = array_state(md)
    if st.level != "raid1":
        raise MirrorError(f"{st.name} is {st.level}: only raid1 takes a mirror leg")
    leg_name = os.path.basename(leg)
    if st.member(leg_name):
        raise MirrorError(f"{leg} is already a member of {st.name}")
    same_backing_guard(st.name, leg)
    entry = journal.begin(
        "md-leg",
        physical=st.name,
        virtual=virtual,
        md=st.name,
        leg=leg,
        before=st.shape(),
        bitmap_added=False,
        grown_from=0,
        depends_on=depends_on or [],
        virtual_serial=virtual_serial,
    )
    mdp = f"/dev/{st.name}"
    if st.bitmap == "none":
        sysops.run(["mdadm", "--grow", mdp, "--bitmap=internal"], timeout=120)
        journal.update(entry, bitmap_added=True)
    # plain --add, then the write-mostly flag through sysfs: mdadm 4.2's "--add --write-mostly"
    # leaves the new member faulty at once (seen on Debian 12 with kernel 6.1, no kernel message)
    try:
        sysops.run(["mdadm", mdp, "--add", leg], timeout=120)
    except sysops.CommandError as e:
        raise MirrorError(f"adding {leg} to {st.name}: {e}") from None
    state_file = Path(f"/sys/block/{st.name}/md/dev-{leg_name}/state")
    try:
        state_file.write_text("writemostly")
    except OSError as e:
        raise MirrorError(f"setting write-mostly on {leg_name} of {st.name}: {e}") from None
    if "write_mostly" not in _read(state_file):
        raise MirrorError(f"{leg_name} of {st.name} is not write-mostly: {_read(state_file)}")
    if free_slots(st) == 0:  # no free slot: it came in as a spare; make room
        journal.update(entry, grown_from=st.raid_disks)
        sysops.run(["mdadm", "--grow", mdp, f"--raid-devices={st.raid_disks + 1}"], timeout=120)
    journal.done(entry)
    log.info("md: %s added to %s (write-mostly)", leg, st.name)
    return entry


def wait_in_sync(
    md: str,
    leg: str,
    timeout_s: float = 3600.0,
    poll_s: float = 1.0,
    on_progress: Callable[[LegStatus], None] | None = None,
) -> LegStatus:
    """Wait until the leg is a clean, fully synced member. Raises MirrorError when it fails or
    times out (the array goes on with its other members either way)."""
    leg_name = os.path.basename(leg)
    deadline = time.monotonic() + timeout_s
    status = leg_status(array_state(md), leg_name)
    for _ in range(int(timeout_s / max(poll_s, 0.01)) + 2):
        status = leg_status(array_state(md), leg_name)
        if on_progress is not None:
            on_progress(status)
        if not status.present or status.faulty:
            raise MirrorError(status.describe())
        if status.ready():
            return status
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    raise MirrorError(f"{status.describe()}: not in sync after {timeout_s:g} s")


def remove_member(md: str, leg_name: str, timeout_s: float = 10.0) -> None:
    """Fail and remove one member through sysfs (works when its device is dead, too)."""
    state = Path(f"/sys/block/{md}/md/dev-{leg_name}/state")
    for _ in range(max(1, int(timeout_s * 10))):
        if not state.exists():
            return
        try:
            if "faulty" not in _read(state):
                state.write_text("faulty")
            state.write_text("remove")
        except OSError as e:
            if e.errno != 16:  # EBUSY: md still has I/O in flight on it; try again
                raise MirrorError(f"removing {leg_name} from {md}: {e}") from None
        time.sleep(0.1)
    raise MirrorError(f"{leg_name} could not be removed from {md}")


def undo_md_leg(entry: Entry) -> None:
    md = entry.detail["md"]
    leg_name = os.path.basename(entry.detail["leg"])
    st = array_state(md)
    if st.member(leg_name):
        remove_member(md, leg_name)
    mdp = f"/dev/{md}"
    grown_from = int(entry.detail.get("grown_from") or 0)
    if grown_from and array_state(md).raid_disks != grown_from:
        sysops.run(["mdadm", "--grow", mdp, f"--raid-devices={grown_from}"], timeout=120)
    if entry.detail.get("bitmap_added") and array_state(md).bitmap != "none":
        sysops.run(["mdadm", "--grow", mdp, "--bitmap=none"], timeout=120)
    after = array_state(md).shape()
    if after != entry.detail["before"]:
        raise MirrorError(f"{md} after rollback differs from before: {after} != {entry.detail['before']}")


# --------------------------------------------------------------------------- bringing a leg back

#: the steps that bring a network leg back (heal_steps)
REMOVE, REATTACH, READD, WAIT = "remove", "reattach", "re-add", "wait"


def heal_steps(status: LegStatus) -> list[str]:
    """Pure: how to bring a network leg back into sync. A failed or missing leg is taken out, its
    nbd device attached to V's export afresh (nbd shuts a timed-out connection down for good) and
    re-added: its write-intent bitmap makes md copy only what changed while it was out. A leg
    still recovering only needs waiting for."""
    if status.ready():
        return []
    if status.present and not status.faulty:
        return [WAIT]
    return ([REMOVE] if status.present else []) + [REATTACH, READD, WAIT]


def heal_leg(md: str, leg: str, uri: str, timeout_s: float = 600.0,
             on_progress: Callable[[LegStatus], None] | None = None) -> list[str]:
    """Bring md's network leg `leg` (its nbd device, as the journal names it) back into sync with
    V's export `uri`; returns the steps taken. Raises MirrorError (sysops.CommandError is wrapped)."""
    name = os.path.basename(leg)
    steps = heal_steps(leg_status(array_state(md), name))
    mdp = f"/dev/{md}"
    for step in steps:
        try:
            if step == REMOVE:
                remove_member(md, name)
            elif step == REATTACH:
                if nbd_in_use(leg):
                    sysops.run(["nbd-client", "-d", leg], timeout=60)
                attach_nbd(leg, uri, logical_block_size(mdp))
            elif step == READD:
                try:
                    sysops.run(["mdadm", mdp, "--re-add", leg], timeout=120)
                except sysops.CommandError as e:  # the bitmap cannot cover the gap: a full recovery
                    log.warning("md: re-adding %s to %s refused (%s): adding it afresh", name, md, e)
                    sysops.run(["mdadm", mdp, "--add", leg], timeout=120)
                state_file = Path(f"/sys/block/{md}/md/dev-{name}/state")
                if "write_mostly" not in _read(state_file):
                    state_file.write_text("writemostly")
            else:
                wait_in_sync(md, leg, timeout_s, on_progress=on_progress)
        except (sysops.CommandError, OSError) as e:
            raise MirrorError(f"bringing {name} of {md} back ({step}): {e}") from None
    if steps:
        log.warning("md: %s of %s brought back (%s)", name, md, ", ".join(steps))
    return steps


def status_dict(md: str, leg: str) -> dict:
    return asdict(leg_status(array_state(md), os.path.basename(leg)))
