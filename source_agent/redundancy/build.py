"""Build the redundant configurations of a plan, journaling each one (lifecycle step 3).

``build(plan, journal)`` first checks that every planned device is still there (a plan made for a
device that vanished is refused before anything changes), then: drivers, initramfs, bonds, nbd legs.
If a step fails, what was built is rolled back (unless asked not to) and ``BuildError`` says which
step failed and how the rollback went.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.planning import Pair, Plan
from source_agent.redundancy import bond, drivers, mdmirror
from source_agent.redundancy.journal import Entry, Journal
from source_agent.redundancy.rollback import RollbackResult, real_undoers, rollback

log = logging.getLogger(__name__)


class PlanError(RuntimeError):
    """The plan does not fit the system as it is now; nothing was changed."""


class InjectedFailure(RuntimeError):
    """Raised by ``BuildOptions.fail_at`` (tests of rollback at every step)."""


class BuildError(RuntimeError):
    def __init__(self, step: str, cause: Exception, rolled_back: RollbackResult | None) -> None:
        self.step = step
        self.cause = cause
        self.rolled_back = rolled_back
        rb = "not rolled back"
        if rolled_back is not None:
            rb = "rolled back" if rolled_back.ok else f"rollback incomplete: {rolled_back.failed + rolled_back.skipped}"
        super().__init__(f"redundancy step {step!r} failed: {cause} ({rb})")


@dataclass
class BuildOptions:
    initramfs: bool = True  # make the initramfs carry the virtual drivers
    rebuild_initramfs: bool = True
    miimon_ms: int = 100
    num_grat_arp: int = 5
    rollback_on_failure: bool = True
    netns: str | None = None  # tests only
    # Tests only: fail when the step whose name starts with this is reached (rollback drill).
    fail_at: str = ""


@dataclass
class BuildResult:
    entries: list[Entry] = field(default_factory=list)
    legs: list[tuple[str, str]] = field(default_factory=list)  # (md, /dev/nbdN)
    notes: list[str] = field(default_factory=list)


def verify_plan(plan: Plan, netns: str | None = None) -> None:
    """Every planned physical device still exists as planned; raises PlanError otherwise."""
    problems: list[str] = []
    if not plan.ok:
        problems.append("the plan has blocking reasons: " + "; ".join(r.message for r in plan.reasons if r.blocking))
    with bond._ipr(netns) as ipr:
        for p in plan.pairs:
            if p.kind == "nic":
                for name in (p.physical, *p.members):
                    if not ipr.link_lookup(ifname=name):
                        problems.append(f"NIC {name} vanished since the plan was made")
            elif p.kind == "disk":
                try:
                    st = mdmirror.array_state(p.physical)
                except mdmirror.MirrorError as e:
                    problems.append(str(e))
                    continue
                for m in p.members:
                    if st.member(m) is None:
                        problems.append(f"{m} is no longer a member of {st.name}")
    if problems:
        raise PlanError("; ".join(problems))


def build(
    plan: Plan, journal: Journal, options: BuildOptions | None = None, on_step: Callable[[str], None] | None = None
) -> BuildResult:
    opts = options or BuildOptions()
    verify_plan(plan, opts.netns)
    result = BuildResult()
    step = "start"

    def at(name: str) -> None:
        nonlocal step
        step = name
        log.info("redundancy: %s", name)
        if on_step is not None:
            on_step(name)
        if opts.fail_at and name.startswith(opts.fail_at):
            raise InjectedFailure(f"injected failure at step {name!r}")

    try:
        mods = plan.drivers()
        disks = [p for p in plan.pairs if p.kind == "disk"]
        if any(p.kind == "nic" and not p.existing for p in plan.pairs):
            mods = [*mods, "bonding"]
        if disks:
            mods = [*mods, "nbd"]
        at("drivers")
        if mods:
            e = drivers.load(journal, mods, options={"bonding": ["max_bonds=0"]})
            if e:
                result.entries.append(e)
        if opts.initramfs and plan.drivers():
            at("initramfs")
            e = drivers.ensure_initramfs(journal, plan.drivers(), rebuild=opts.rebuild_initramfs)
            if e:
                result.entries.append(e)
            elif not drivers.detect_initramfs_tool().name:
                result.notes.append("P uses neither initramfs-tools nor dracut: initramfs not changed")
        for p in plan.pairs:
            if p.kind != "nic":
                continue
            if p.existing:
                at(f"bond-placeholder {p.physical}")
                e = journal.begin(
                    "bond-slave-placeholder",
                    physical=p.physical,
                    virtual=p.virtual,
                    existing=True,
                    bond=p.physical,
                    virtual_mac=p.virtual_mac or p.mac,
                )
                journal.done(e)
            else:
                at(f"bond {p.physical}")
                e = bond.build_bond(
                    journal,
                    p.physical,
                    virtual=p.virtual,
                    virtual_mac=p.virtual_mac or p.mac,
                    miimon_ms=opts.miimon_ms,
                    num_grat_arp=opts.num_grat_arp,
                    netns=opts.netns,
                )
            journal.update(e, physical_drivers=pair_drivers(p))
            result.entries.append(e)
        for p in disks:
            at(f"nbd {p.virtual}")
            st = mdmirror.array_state(p.physical)
            need = max((mdmirror.block_size_bytes(f"/dev/{m}") for m in p.members), default=0)
            ne, dev = mdmirror.nbd_connect(
                journal, p.export_uri, virtual=p.virtual, min_size=need, block_size=mdmirror.logical_block_size(st.name)
            )
            result.entries.append(ne)
            at(f"md-leg {st.name}")
            me = mdmirror.add_leg(journal, st.name, dev, virtual=p.virtual, depends_on=[ne.id], virtual_serial=p.serial)
            journal.update(me, physical_drivers=pair_drivers(p))
            result.entries.append(me)
            result.legs.append((st.name, dev))
        at("done")
        return result
    except Exception as e:
        rb = None
        if opts.rollback_on_failure:
            rb = rollback(journal, real_undoers())
        raise BuildError(step, e, rb) from e


def legs(journal: Journal) -> list[tuple[str, str]]:
    """(md, leg device) of every live md-leg entry."""
    return [(e.detail["md"], e.detail["leg"]) for e in journal.live() if e.kind == "md-leg"]


def wait_mirrors(
    journal: Journal,
    timeout_s: float = 3600.0,
    poll_s: float = 1.0,
    on_progress: Callable[[mdmirror.LegStatus], None] | None = None,
) -> list[mdmirror.LegStatus]:
    """Wait until every network leg is a clean, in-sync member (the switchover's precondition)."""
    return [mdmirror.wait_in_sync(md, leg, timeout_s, poll_s, on_progress) for md, leg in legs(journal)]


def pair_drivers(pair: Pair, root: Path = Path("/")) -> list[str]:
    """Drivers of a pair's physical devices (unloaded at cancellation inside the VM, where
    discovery no longer sees those devices; so they are journaled on P)."""
    from source_agent.discovery import block_devices, nic_hw_info

    out: list[str] = []
    if pair.kind == "nic":
        found = [nic_hw_info(root, m).driver for m in pair.members]
    else:
        blocks = {b.name: b for b in block_devices(root)}
        found = [blocks[m].hw.driver for m in pair.members if m in blocks]
    for d in found:
        if d and d not in out and not d.startswith("virtio"):
            out.append(d)
    return out


def default_journal_path() -> Path:
    return Path(os.environ.get("P2V_REDUNDANCY_JOURNAL", "/var/lib/p2v-source/redundancy-journal.json"))
