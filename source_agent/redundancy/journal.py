"""The journal of created configurations: every configuration p2v builds on P gets an id, and the list
is kept on P's disk as JSON (written atomically: temp file, fsync, rename, fsync of the directory).

Write-ahead: an entry is recorded as ``pending`` *before* the change is made (with what its undo
needs), and marked ``done`` after. Rollback therefore also sees a step that was cut short, and every
undo is written to be harmless when the change was only partly made. Only ids found here are ever
undone or cancelled; nothing that is not in the journal (the administrator's own bonds and arrays)
is ever touched.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomicfile import write_json_atomic
from p2v.v1 import destination_pb2

FORMAT_VERSION = 1
STATES = ("pending", "done", "undone", "cancelled")
KINDS = (
    "driver-load",  # a kernel module p2v loaded (undo: unload it)
    "initramfs-modules",  # lines p2v added to the initramfs module list (undo: remove them, rebuild)
    "bond",  # a bond p2v created over a physical NIC (undo: move addresses and routes back, delete)
    "bond-slave-placeholder",  # the virtual NIC's slot in a bond (MAC from the catalog); nothing to undo
    "nbd",  # an nbd device connected to V's export (undo: disconnect)
    "md-leg",  # the nbd device added to an md array (undo: fail, remove, shrink if grown)
)
_MIGRATION_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class JournalError(RuntimeError):
    pass


@dataclass
class Entry:
    id: str
    kind: str
    physical: str = ""
    virtual: str = ""
    state: str = "pending"
    detail: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    # A configuration that joins one the administrator made (e.g. their bond): cancellation and
    # rollback only ever take out what p2v added.
    existing: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        if not isinstance(d, dict):
            raise JournalError(f"journal entry is not an object: {d!r}")
        try:
            e = cls(**d)
        except TypeError as err:
            raise JournalError(f"journal entry {d.get('id', '?')!r}: {err}") from None
        if e.kind not in KINDS:
            raise JournalError(f"journal entry {e.id!r}: unknown kind {e.kind!r}")
        if e.state not in STATES:
            raise JournalError(f"journal entry {e.id!r}: unknown state {e.state!r}")
        return e


class Journal:
    """Created configurations of one migration, persisted at ``path`` after every change."""

    def __init__(self, path: Path, migration_id: str, entries: list[Entry] | None = None) -> None:
        if not _MIGRATION_ID_RE.match(migration_id):
            raise JournalError(f"migration id {migration_id!r}: use 1-64 characters of [A-Za-z0-9_.-]")
        self.path = Path(path)
        self.migration_id = migration_id
        self.entries: list[Entry] = list(entries or [])

    # ---------------------------------------------------------------- persistence
    @classmethod
    def create(cls, path: Path, migration_id: str) -> Journal:
        """A new, empty journal. Refuses to overwrite one that still has live entries."""
        path = Path(path)
        if path.exists():
            old = cls.load(path)
            if old.live():
                raise JournalError(
                    f"{path} still lists live configurations of migration {old.migration_id} "
                    f"({', '.join(e.id for e in old.live())}): roll it back or cancel it first"
                )
        j = cls(path, migration_id)
        j.save()
        return j

    @classmethod
    def load(cls, path: Path) -> Journal:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise JournalError(f"no journal at {path}") from None
        except (OSError, ValueError) as e:
            raise JournalError(f"journal {path} is unreadable: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise JournalError(
                f"journal {path}: unknown format {data.get('format') if isinstance(data, dict) else data!r}"
            )
        entries = [Entry.from_dict(e) for e in data.get("entries", [])]
        return cls(path, str(data.get("migration_id", "")), entries)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(
            self.path,
            {
                "format": FORMAT_VERSION,
                "migration_id": self.migration_id,
                "entries": [asdict(e) for e in self.entries],
            },
        )

    # ---------------------------------------------------------------- entries
    def begin(self, kind: str, physical: str = "", virtual: str = "", existing: bool = False, **detail: Any) -> Entry:
        """Record a change about to be made (state ``pending``) and persist it."""
        if kind not in KINDS:
            raise JournalError(f"unknown configuration kind {kind!r}")
        n = len(self.entries) + 1
        entry = Entry(
            id=f"p2v-{self.migration_id}-{n:03d}-{kind}",
            kind=kind,
            physical=physical,
            virtual=virtual,
            detail=_jsonable(detail),
            created=time.time(),
            existing=existing,
        )
        self.entries.append(entry)
        self.save()
        return entry

    def update(self, entry: Entry, state: str | None = None, **detail: Any) -> None:
        if state is not None:
            if state not in STATES:
                raise JournalError(f"unknown state {state!r}")
            entry.state = state
        entry.detail.update(_jsonable(detail))
        self.save()

    def done(self, entry: Entry, **detail: Any) -> None:
        self.update(entry, "done", **detail)

    def get(self, entry_id: str) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise JournalError(f"no configuration with id {entry_id!r} in the journal of migration {self.migration_id}")

    def live(self) -> list[Entry]:
        """Entries whose change may be in place (pending or done), in creation order."""
        return [e for e in self.entries if e.state in ("pending", "done")]

    def report(self) -> destination_pb2.RedundancyReport:
        """The ids for V (``Destination.ReportRedundancy``)."""
        out = destination_pb2.RedundancyReport(migration_id=self.migration_id)
        for e in self.live():
            out.entries.add(
                id=e.id,
                kind=e.kind,
                physical=e.physical,
                virtual=e.virtual,
                detail=json.dumps(e.detail, sort_keys=True),
            )
        return out


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Refuse anything that would not survive a JSON round trip (caught before the change is made)."""
    text = json.dumps(d, sort_keys=True)
    return json.loads(text)


def default_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "redundancy-journal.json"
