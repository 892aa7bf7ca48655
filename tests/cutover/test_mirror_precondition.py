"""The cutover's precondition on md's network legs (source_agent/cutover.mirror_problems): after
the move the VM's arrays keep only their network leg, so a leg that is faulty, gone or still
recovering must stop the cutover before anything is frozen. md's sysfs is a stand-in tree (the
host kernel has no md); the real arrays are read by the same code in the rig's whole-OS test."""

from __future__ import annotations

from pathlib import Path

import pytest

from source_agent.cutover import mirror_problems
from source_agent.redundancy.journal import Entry
from source_agent.redundancy.mdmirror import array_state, leg_status


def md_tree(root: Path, leg_state: str = "in_sync,write_mostly", sync_action: str = "idle",
            legs: tuple[str, ...] = ("sdb", "nbd0")) -> None:
    base = root / "sys/block/md127/md"
    base.mkdir(parents=True)
    for name, text in (("level", "raid1"), ("raid_disks", "2"), ("degraded", "0"), ("sync_action", sync_action),
                       ("sync_completed", "none" if sync_action == "idle" else "1024 / 4096")):
        (base / name).write_text(text + "\n")
    for slot, leg in enumerate(legs):
        (base / f"dev-{leg}").mkdir()
        (base / f"dev-{leg}" / "state").write_text(("in_sync" if leg == "sdb" else leg_state) + "\n")
        (base / f"dev-{leg}" / "slot").write_text(f"{slot}\n")


ENTRIES = [Entry("e1", "bond", physical="eth0", state="done", detail={"bond": "p2vbond0"}),
           Entry("e2", "nbd", state="done", detail={"device": "/dev/nbd0"}),
           Entry("e3", "md-leg", state="done", detail={"md": "md127", "leg": "/dev/nbd0"})]


def problems(root: Path, entries: list[Entry] = ENTRIES) -> list[str]:
    return mirror_problems(entries, status=lambda md, leg: leg_status(array_state(md, root), leg))


def test_an_in_sync_leg_lets_the_cutover_go(tmp_path: Path) -> None:
    md_tree(tmp_path)
    assert problems(tmp_path) == []


@pytest.mark.parametrize("tree, expected", [
    ({"leg_state": "faulty,write_mostly"}, "nbd0 of md127 failed (faulty): the network leg is broken"),
    ({"leg_state": "write_mostly", "sync_action": "recover"}, "nbd0 of md127 recovering 25.0%"),
    ({"legs": ("sdb",)}, "nbd0 is no longer a member of md127"),
])
def test_a_leg_that_cannot_carry_the_disk_stops_the_cutover(tmp_path: Path, tree: dict, expected: str) -> None:
    md_tree(tmp_path, **tree)
    assert problems(tmp_path) == [expected]


def test_an_array_that_is_gone_stops_it_too(tmp_path: Path) -> None:
    (tmp_path / "sys/block").mkdir(parents=True)
    assert "md127 does not exist" in problems(tmp_path)[0]


def test_only_live_md_legs_count(tmp_path: Path) -> None:
    md_tree(tmp_path, leg_state="faulty")
    undone = [Entry("e3", "md-leg", state="undone", detail={"md": "md127", "leg": "/dev/nbd0"})]
    assert problems(tmp_path, ENTRIES[:2] + undone) == []  # rolled back: not carried into the VM


# --- bringing a leg back before the migration relies on it (mdmirror.heal_steps, cutover.heal_mirrors)

def leg(root: Path, state: str, sync_action: str = "idle", legs: tuple[str, ...] = ("sdb", "nbd0")):
    md_tree(root, state, sync_action, legs)
    return leg_status(array_state("md127", root), "nbd0")


@pytest.mark.parametrize(("state", "sync_action", "legs", "steps"), [
    ("in_sync,write_mostly", "idle", ("sdb", "nbd0"), []),
    ("write_mostly", "recover", ("sdb", "nbd0"), ["wait"]),  # recovering: only wait
    ("faulty,write_mostly", "idle", ("sdb", "nbd0"), ["remove", "reattach", "re-add", "wait"]),
    ("in_sync", "idle", ("sdb",), ["reattach", "re-add", "wait"]),  # gone from the array
])
def test_heal_steps(tmp_path: Path, state: str, sync_action: str, legs: tuple[str, ...], steps: list[str]) -> None:
    from source_agent.redundancy.mdmirror import heal_steps

    assert heal_steps(leg(tmp_path, state, sync_action, legs)) == steps


def test_heal_mirrors_brings_back_only_broken_legs_of_its_own_journal(tmp_path: Path) -> None:
    from source_agent.cutover import heal_mirrors
    from source_agent.redundancy.mdmirror import MirrorError

    entries = [*ENTRIES[:1],
               Entry("e2", "nbd", state="done", detail={"device": "/dev/nbd0", "uri": "nbd://10.0.0.2/p2v"}),
               ENTRIES[2]]
    healed: list[tuple[str, str, str]] = []

    def heal(md: str, dev: str, uri: str) -> list[str]:
        healed.append((md, dev, uri))
        return ["remove", "reattach", "re-add", "wait"]

    md_tree(tmp_path, "faulty,write_mostly")

    def status(md: str, name: str):
        return leg_status(array_state(md, tmp_path), name)

    said = heal_mirrors(entries, status=status, heal=heal)
    assert healed == [("md127", "/dev/nbd0", "nbd://10.0.0.2/p2v")]
    assert said == ["nbd0 of md127 brought back (remove, reattach, re-add, wait)"]

    healthy = tmp_path / "healthy"
    md_tree(healthy)
    healed.clear()
    assert heal_mirrors(entries, status=lambda md, name: leg_status(array_state(md, healthy), name), heal=heal) == []
    assert healed == []  # an in-sync leg is left alone

    def failing(md: str, dev: str, uri: str) -> list[str]:
        raise MirrorError("cannot attach V's export nbd://10.0.0.2/p2v: connection refused")

    said = heal_mirrors(entries, status=status, heal=failing)
    assert said == ["nbd0 of md127 could not be brought back: cannot attach V's export nbd://10.0.0.2/p2v: "
                    "connection refused"]
    # no export recorded (an entry from an older journal): not touched, said so
    said = heal_mirrors(ENTRIES, status=status, heal=heal)
    assert "no nbd export recorded" in said[0]
