"""The file the source agent keeps next to its unix socket while a cutover runs.

Every page in use at the snapshot is part of P's image, and each costs inside the downtime (the
kernel's copy, P's read and hash, the VM's load and restore: ~40 µs a page under TCG). A `p2vctl
migrate` following the move from inside P is ~20 MiB of it. So p2vctl steps out for the cutover
(p2vctl.step_out): it replaces itself (exec: same pid, same terminal) with a bare interpreter that
waits for this marker to go, then follows the migration again. The agent creates the marker before
it announces the cutover phase and removes it when the cutover is over: in the VM, or P running on.

    <socket>.cutover-<migration id>                  {"agent_pid", "agent_started"}  (the agent's)
    <socket>.cutover-<migration id>.watcher-<pid>    {"pid", "started"} of a p2vctl that stepped out:
                                                     the agent unloads only once it follows again

Standard library only: the waiter imports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.atomicfile import write_atomic
from common.procfs import process_started

#: how long the source agent lets its cutover helper run (source_agent.cutover); the waiter's limit too
HELPER_TIMEOUT_S = 900.0
MARKER_INFIX = ".cutover-"
WATCHER_INFIX = ".watcher-"


def socket_path(address: str) -> str:
    """The filesystem path of a gRPC unix address ("unix:/p", "unix:///p", a bare path), "" for TCP."""
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        return "/" + path.lstrip("/") if path.startswith("//") else path
    return address if address.startswith("/") else ""


def marker_path(socket: str, migration_id: str) -> Path:
    return Path(f"{socket}{MARKER_INFIX}{migration_id}")


def watcher_path(marker: Path, pid: int) -> Path:
    """A stepped-out p2vctl's note (its pid stays through the exec into the waiter and back)."""
    return marker.with_name(f"{marker.name}{WATCHER_INFIX}{pid}")


def watcher_paths(marker: Path) -> list[Path]:
    return sorted(marker.parent.glob(f"{marker.name}{WATCHER_INFIX}*"))


def _write(path: Path, obj: dict) -> None:
    # readable by a p2vctl that is not root; a rename, no fsync: these live only as long as the cutover
    write_atomic(path, json.dumps(obj).encode(), mode=0o644, durable=False)


def create_marker(marker: Path) -> None:
    """By the agent, before it announces the cutover."""
    pid = os.getpid()
    _write(marker, {"agent_pid": pid, "agent_started": process_started(pid)})


def remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def _live(pid: object, started: object) -> bool:
    return isinstance(pid, int) and pid > 0 and process_started(pid) == started


def cutover_running(marker: Path) -> bool:
    """The marker is there and the agent that made it still runs (a dead agent leaves its marker)."""
    try:
        note = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(note, dict) and _live(note.get("agent_pid"), note.get("agent_started"))


def announce_watcher(marker: Path) -> None:
    """By the stepped-out p2vctl: the agent keeps running until this process follows again."""
    pid = os.getpid()
    _write(watcher_path(marker, pid), {"pid": pid, "started": process_started(pid)})


def watcher_waiting(marker: Path) -> bool:
    """A p2vctl stepped out of this cutover and has not followed the migration again yet."""
    for path in watcher_paths(marker):
        try:
            note = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(note, dict) and _live(note.get("pid"), note.get("started")):
            return True
    return False


def leftovers(socket: str) -> list[Path]:
    """Markers and watcher notes next to `socket` (an agent starting afresh removes them: no cutover
    of its own runs yet, and a dead agent's marker would only keep a waiter waiting for its checks)."""
    where = Path(socket)
    return sorted(where.parent.glob(f"{where.name}{MARKER_INFIX}*")) if socket else []
