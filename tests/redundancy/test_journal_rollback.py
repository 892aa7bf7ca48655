"""Journal persistence and rollback ordering (pure logic: the undo actions are recorded, not real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from source_agent.redundancy import cancel
from source_agent.redundancy.journal import Journal, JournalError
from source_agent.redundancy.rollback import RollbackError, rollback, rollback_order


def test_ids_persisted_atomically(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    j = Journal.create(path, "m1")
    a = j.begin("driver-load", modules=["virtio_net"])
    j.done(a, new_modules=["virtio_net", "net_failover"])
    b = j.begin("bond", physical="ens3", virtual="vnet0", bond="p2vbond0")
    assert a.id == "p2v-m1-001-driver-load" and b.id == "p2v-m1-002-bond"
    data = json.loads(path.read_text())
    assert [e["state"] for e in data["entries"]] == ["done", "pending"]  # write-ahead: pending is on disk
    again = Journal.load(path)
    assert [e.id for e in again.live()] == [a.id, b.id]
    assert again.get(a.id).detail["new_modules"] == ["virtio_net", "net_failover"]
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    rep = again.report()
    assert rep.migration_id == "m1" and [e.id for e in rep.entries] == [a.id, b.id]
    assert rep.entries[1].kind == "bond" and rep.entries[1].physical == "ens3"


def test_create_refuses_live_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    j = Journal.create(path, "m1")
    j.begin("bond", physical="ens3")
    with pytest.raises(JournalError, match="still lists live configurations"):
        Journal.create(path, "m2")


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("{", "unreadable"),
        ('{"format": 9}', "unknown format"),
        ('{"format": 1, "migration_id": "m", "entries": [{"id": "x", "kind": "teleport"}]}', "unknown kind"),
    ],
)
def test_bad_journal_files(tmp_path: Path, text: str, msg: str) -> None:
    path = tmp_path / "j.json"
    path.write_text(text)
    with pytest.raises(JournalError, match=msg):
        Journal.load(path)


def test_bad_ids_and_kinds(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="migration id"):
        Journal(tmp_path / "j", "../etc")
    j = Journal.create(tmp_path / "j.json", "m")
    with pytest.raises(JournalError, match="unknown configuration kind"):
        j.begin("raid5")
    with pytest.raises(TypeError):
        j.begin("bond", weird=object())  # not JSON: refused before anything is recorded
    assert j.entries == []


def _journal(tmp_path: Path) -> Journal:
    j = Journal.create(tmp_path / "j.json", "m")
    for kind in ("driver-load", "initramfs-modules", "bond"):
        j.done(j.begin(kind))
    nbd = j.begin("nbd", device="/dev/nbd0")
    j.done(nbd)
    j.begin("md-leg", md="md127", leg="/dev/nbd0", depends_on=[nbd.id])  # cut short: still pending
    return j


def test_rollback_reverse_order_and_states(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    calls: list[str] = []
    undoers = {
        k: (lambda e, k=k: calls.append(e.kind)) for k in ("driver-load", "initramfs-modules", "bond", "nbd", "md-leg")
    }
    assert [e.kind for e in rollback_order(j)] == ["md-leg", "nbd", "bond", "initramfs-modules", "driver-load"]
    res = rollback(j, undoers)
    assert res.ok and calls == ["md-leg", "nbd", "bond", "initramfs-modules", "driver-load"]
    assert res.undone == [e.id for e in reversed(j.entries)]
    assert all(e.state == "undone" for e in Journal.load(j.path).entries)
    # running it again does nothing
    calls.clear()
    assert rollback(j, undoers).undone == [] and calls == []


def test_rollback_failure_keeps_dependencies_and_goes_on(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    calls: list[str] = []

    def fail(e):
        raise RuntimeError("mdadm: device busy")

    undoers = {k: (lambda e, k=k: calls.append(e.kind)) for k in ("driver-load", "initramfs-modules", "bond", "nbd")}
    undoers["md-leg"] = fail
    res = rollback(j, undoers)
    assert not res.ok
    assert [i for i, _ in res.failed] == [j.entries[4].id]
    assert [i for i, _ in res.skipped] == [j.entries[3].id]  # the nbd under the failed leg stays
    assert calls == ["bond", "initramfs-modules", "driver-load"]
    assert [e.kind for e in Journal.load(j.path).live()] == ["nbd", "md-leg"]
    with pytest.raises(RollbackError, match="device busy"):
        rollback(j, undoers, raise_on_failure=True)
    # once the cause is gone, a second rollback finishes the job
    undoers["md-leg"] = lambda e: calls.append("md-leg")
    assert rollback(j, undoers).ok and Journal.load(j.path).live() == []


def test_cancel_select_only_listed_ids(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    ids = [e.id for e in j.entries]
    with pytest.raises(cancel.CancelError, match="not created by p2v"):
        cancel.select(j, [ids[2], "admin-bond0"])
    with pytest.raises(cancel.CancelError, match="no redundancy ids"):
        cancel.select(j, [])
    assert [e.id for e in cancel.select(j, [ids[2], ids[4], ids[3]])] == [ids[4], ids[3], ids[2]]
    j.update(j.entries[2], "undone")
    with pytest.raises(cancel.CancelError, match="not live"):
        cancel.select(j, [ids[2]])
    with pytest.raises(cancel.CancelError):  # nothing was changed by the refused calls
        cancel.cancel(j, ["nope"])
    assert [e.state for e in Journal.load(j.path).entries][3:] == ["done", "pending"]
