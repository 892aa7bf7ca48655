"""The destination's record of one incoming migration: its page store and journaled state.

The journal (meta.json) only ever claims what is durable: `durable_round` moves forward
when a round's pages are fsynced (EndRound), so a crash or SIGTERM mid-round leaves the
interrupted round visibly incomplete.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Any

from common.atomicfile import read_json, write_json_atomic
from common.migration_state import FINAL_STATES
from p2v.v1 import common_pb2

MIGRATION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

STATE_NAMES = {v: k.removeprefix("MIGRATION_STATE_").lower()
               for k, v in common_pb2.MigrationState.items()}
STATE_VALUES = {v: k for k, v in STATE_NAMES.items()}

#: Written durably before V tells the waiting VM to GO (dest_agent.image_receiver): an agent that
#: restarts finds that the VM may be P, and must never let anyone cancel it or run P on.
GO_MARK = "go.json"
#: Written durably before V acknowledges an image: without it, an image a waiting VM still holds
#: was never acknowledged, so P never committed it (P runs on).
ACK_MARK = "ack.json"


@dataclasses.dataclass
class Counters:
    batches: int = 0
    pages: int = 0
    zero_pages: int = 0
    wire_bytes: int = 0
    raw_bytes: int = 0
    duplicates: int = 0
    rejected: int = 0


class MigrationRecord:
    """State of one migration on V. Bookkeeping is guarded by a lock: streams write from threads."""

    def __init__(self, root: Path, migration_id: str, *, source_host_id: str, memory_bytes: int,
                 max_pfn: int, page_size: int, peer: list[str]) -> None:
        if not MIGRATION_ID_RE.match(migration_id):
            raise ValueError(f"invalid migration id {migration_id!r}")
        self.id = migration_id
        self.dir = root / migration_id
        self.source_host_id = source_host_id
        self.memory_bytes = memory_bytes
        self.max_pfn = max_pfn
        self.page_size = page_size
        self.peer = peer
        self.state = common_pb2.MIGRATION_STATE_SETUP
        self.error = ""
        self.round = 0
        self.durable_round = 0
        self.round_batches: dict[int, int] = {}
        self.written_batch_ids: set[int] = set()
        self.redundancy: list[dict[str, str]] = []
        self.counters = Counters()
        self.created = time.time()
        self.updated = self.created  # when the journal last changed
        self.heard_at = time.monotonic()  # when the source last spoke about it (dest_agent.source_lease)
        self.lock = threading.Lock()
        # Threads writing into the store right now; the store is closed only when none are.
        self.inflight = 0
        self.idle = threading.Condition(self.lock)
        self.store: Any = None  # dest_agent.page_store.PageStore once opened

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    @property
    def image_path(self) -> Path:
        return self.dir / "memory.img"

    @property
    def go_mark_path(self) -> Path:
        return self.dir / GO_MARK

    @property
    def ack_mark_path(self) -> Path:
        return self.dir / ACK_MARK

    @property
    def waiting_vm_path(self) -> Path:
        """How a later run of the agent finds this migration's waiting VM (dest_agent.waiting_vm.AdoptedVm)."""
        return self.dir / "waiting-vm.json"

    @classmethod
    def reload(cls, root: Path, meta: dict[str, Any]) -> MigrationRecord:
        """The record as an earlier run of the agent journaled it; no page store is open."""
        record = cls(root, meta["id"], source_host_id=meta.get("source_host_id", ""),
                     memory_bytes=int(meta["memory_bytes"]), max_pfn=int(meta["max_pfn"]),
                     page_size=int(meta.get("page_size", 4096)), peer=list(meta.get("peer", [])))
        record.state = STATE_VALUES[meta["state"]]
        record.error = meta.get("error", "")
        record.round = int(meta.get("round", 0))
        record.durable_round = int(meta.get("durable_round", 0))
        record.redundancy = list(meta.get("redundancy", []))
        record.created = float(meta.get("created", record.created))
        record.updated = float(meta.get("updated", record.created))
        return record

    def journal(self) -> None:
        self.updated = time.time()
        write_json_atomic(self.meta_path, {
            "id": self.id,
            "state": STATE_NAMES[self.state],
            "error": self.error,
            "source_host_id": self.source_host_id,
            "memory_bytes": self.memory_bytes,
            "max_pfn": self.max_pfn,
            "page_size": self.page_size,
            "peer": self.peer,
            "round": self.round,
            "durable_round": self.durable_round,
            "redundancy": self.redundancy,
            "created": self.created,
            "updated": self.updated,
        })

    @staticmethod
    def load_meta(path: Path) -> dict[str, Any]:
        return read_json(path)

    def set_state(self, state: int, error: str = "") -> None:
        self.state = state
        if error:
            self.error = error
        self.journal()

    def heard(self) -> None:
        """The source spoke about this migration: its lease on V runs again."""
        self.heard_at = time.monotonic()

    def silent_s(self) -> float:
        return time.monotonic() - self.heard_at

    def enter_io(self) -> bool:
        """Register a writer; False when the migration no longer takes pages."""
        with self.lock:
            if self.store is None:
                return False
            self.inflight += 1
            return True

    def leave_io(self) -> None:
        with self.lock:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self.lock:
            return self.idle.wait_for(lambda: self.inflight == 0, timeout)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES
