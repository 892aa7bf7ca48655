"""Rollback: undo every created configuration in reverse order, so that P is exactly as before.

The ordering and bookkeeping here is pure (the undo actions are passed in); the real undo actions
of each kind live next to the code that made the change and are collected by ``real_undoers``.

Rules:
- only live journal entries (pending or done) are undone, newest first;
- an entry whose undo fails stays live and the error is reported; the entries it depends on
  (``detail["depends_on"]``, e.g. the nbd device under an md leg) are then left in place too,
  because taking them away under a configuration still in use would do harm; every other entry is
  still undone (best effort to get P back);
- the journal is saved after every step, so a rollback that is interrupted can simply be run again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from source_agent.redundancy.journal import Entry, Journal

log = logging.getLogger(__name__)

Undo = Callable[[Entry], None]


class RollbackError(RuntimeError):
    def __init__(self, result: RollbackResult) -> None:
        self.result = result
        lines = [f"{i}: {why}" for i, why in result.failed + result.skipped]
        super().__init__("rollback incomplete: " + "; ".join(lines))


@dataclass
class RollbackResult:
    undone: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


def rollback_order(journal: Journal) -> list[Entry]:
    """The entries to undo, in the order to undo them."""
    return list(reversed(journal.live()))


def rollback(journal: Journal, undoers: Mapping[str, Undo], raise_on_failure: bool = False) -> RollbackResult:
    result = RollbackResult()
    held: dict[str, str] = {}  # entry id -> why it must stay
    for entry in rollback_order(journal):
        if entry.id in held:
            result.skipped.append((entry.id, held[entry.id]))
            continue
        undo = undoers.get(entry.kind)
        try:
            if undo is None:
                raise RuntimeError(f"no undo action for kind {entry.kind!r}")
            log.info("rollback: undoing %s (%s %s)", entry.id, entry.kind, entry.physical)
            undo(entry)
        except Exception as e:
            log.error("rollback: %s failed: %s", entry.id, e)
            result.failed.append((entry.id, f"{type(e).__name__}: {e}"))
            for dep in entry.detail.get("depends_on", []):
                held.setdefault(dep, f"kept: {entry.id}, which uses it, could not be undone")
            continue
        journal.update(entry, "undone")
        result.undone.append(entry.id)
    if raise_on_failure and not result.ok:
        raise RollbackError(result)
    return result


def rollback_all(state_dir: str) -> RollbackResult:
    """Undo what P's redundancy journal (in the agent's state directory) still holds, with the real
    undo actions. No journal: nothing to undo."""
    from source_agent.redundancy.journal import default_path

    path = default_path(state_dir)
    if not path.exists():
        return RollbackResult()
    return rollback(Journal.load(path), real_undoers())


def real_undoers() -> dict[str, Undo]:
    """The undo action of every configuration kind (they act on the running system)."""
    from source_agent.redundancy import bond, drivers, mdmirror

    return {
        "driver-load": drivers.undo_load,
        "initramfs-modules": drivers.undo_initramfs,
        "bond": bond.undo_bond,
        "bond-slave-placeholder": lambda e: None,
        "nbd": mdmirror.undo_nbd,
        "md-leg": mdmirror.undo_md_leg,
    }
