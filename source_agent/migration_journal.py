"""The source agent's migration journals (`<state_dir>/migrations/<id>.json`, written by
`SourceMigration._journal`): what a later agent reads of the migrations an earlier one ran.

They travel with the OS: a journal written in P is read in the VM after the move. The next agent
reports again a resume that V never heard of (`unreported_resumes`), marks a cutover it repaired
(`mark_interrupted`), lists them (`journaled_summary`, with what needs the operator: `attention`) and
records a rollback (`mark_journal`). The verdicts are pure functions of a journal; reading and
writing the files is the edge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from google.protobuf import json_format

from common.atomicfile import read_json, write_json_atomic
from common.migration_state import FINAL_STATE_NAMES
from p2v.v1 import common_pb2

#: the operator's way to have a resume reported to V when no agent is reporting it
RESTART_TO_REPORT = "restart the source agent (systemctl restart p2v-source) to report again"


def read_journals(state_dir: str) -> Iterator[tuple[Path, dict]]:
    """This agent's migration journals that can be read, oldest name first."""
    for path in sorted((Path(state_dir) / "migrations").glob("*.json")):
        try:
            journal = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(journal, dict):
            yield path, journal


def resumed_unreported(journal: dict) -> bool:
    """The OS resumed in the VM and V never said it was told (the reports after resume). Pure."""
    return bool(journal.get("resumed")) and not journal.get("completed")


def unreported_resumes(state_dir: str) -> list[dict]:
    """The journals of migrations that resumed in the VM and never had V's word that it was told
    (the reports after resume): the agent started next reports them again."""
    return [journal for _, journal in read_journals(state_dir)
            if resumed_unreported(journal) and journal.get("remote_id") and journal.get("destination")
            and journal.get("id")]


#: what the operator is told when the OS runs in the VM and no agent is telling V any more
REPORT_AGAIN_ADVICE = ("the OS runs in the VM but V was never told, and P's redundancy stays until it is: "
                       f"{RESTART_TO_REPORT}")


def attention(journal: dict) -> str:
    """What the operator must do about a migration, from its journal (empty: nothing). Pure."""
    if resumed_unreported(journal) and journal.get("state") in FINAL_STATE_NAMES:
        return REPORT_AGAIN_ADVICE
    return ""


def _state_value(name: object) -> int:
    try:
        return common_pb2.MigrationState.Value(str(name))
    except ValueError:
        return common_pb2.MIGRATION_STATE_UNSPECIFIED


def _ms(seconds: object) -> int:
    try:
        return max(0, int(float(seconds) * 1000))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def journaled_summary(journal: dict) -> common_pb2.MigrationSummary:
    """What `List` says of a migration only journaled: no agent runs it now. One whose journal stops
    before a final state was interrupted: it reads failed (before the point of no return P ran on,
    after it the OS resumed in the VM and V is still to be told). Pure."""
    state, error = _state_value(journal.get("state")), str(journal.get("error") or "")
    if str(journal.get("state")) not in FINAL_STATE_NAMES:
        was = common_pb2.MigrationState.Name(state).removeprefix("MIGRATION_STATE_").lower()
        journal = {**journal, "state": common_pb2.MigrationState.Name(common_pb2.MIGRATION_STATE_FAILED)}
        state = common_pb2.MIGRATION_STATE_FAILED
        error = (f"interrupted: the source agent stopped during the migration ({was})"
                 + ("" if resumed_unreported(journal) else "; P ran on"))
    updated_ms = _ms(journal.get("updated"))
    status = common_pb2.MigrationStatus(migration_id=str(journal.get("id", "")), state=state, error=error,
                                        timestamp_ms=updated_ms,
                                        point_of_no_return=bool(journal.get("resumed")))
    try:  # the figures journaled at resume: pre-copy's, and the downtime
        json_format.ParseDict(journal.get("stats") or {}, status.stats, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError):
        pass  # figures only
    figures = journal.get("figures")
    if isinstance(figures, dict) and not status.stats.downtime_ms:
        status.stats.downtime_ms = max(0, _ms(figures.get("unfrozen_at")) - _ms(figures.get("frozen_at")))
    return common_pb2.MigrationSummary(status=status, peer=str(journal.get("destination", "")),
                                       started_ms=_ms(journal.get("started_wall")), updated_ms=updated_ms,
                                       live=False, attention=attention(journal))


def journaled_summaries(state_dir: str, skip: set[str]) -> list[common_pb2.MigrationSummary]:
    """The journaled migrations whose ids are not in `skip` (those the agent runs), oldest first."""
    listed = [journaled_summary(journal) for _, journal in read_journals(state_dir)
              if str(journal.get("id", "")) not in skip]
    return sorted(listed, key=lambda s: (s.started_ms, s.status.migration_id))


def _mark(state_dir: str, wanted: Callable[[dict], bool], state: int, **fields: object) -> list[str]:
    """Set `state` (and `fields`) in the journals `wanted` picks; returns their ids."""
    marked = []
    for path, journal in read_journals(state_dir):
        if not wanted(journal):
            continue
        journal.update(state=common_pb2.MigrationState.Name(state), updated=time.time(), **fields)
        write_json_atomic(path, journal)
        marked.append(str(journal.get("id", path.stem)))
    return marked


def mark_journal(state_dir: str, migration_id: str, state: int) -> bool:
    """Set the state of the journal of `migration_id` (never of a completed one: its OS moved).
    Returns whether one was changed."""
    completed = common_pb2.MigrationState.Name(common_pb2.MIGRATION_STATE_COMPLETED)
    return bool(_mark(state_dir, lambda j: str(j.get("id", "")) == migration_id and j.get("state") != completed,
                      state))


def mark_interrupted(state_dir: str, remote_id: str, detail: str) -> list[str]:
    """Mark failed, with `detail`, the journals of the migration V knows as `remote_id` that an agent
    which died mid-cutover left unfinished (the operator's record says what happened). Returns the
    ids marked."""
    return _mark(state_dir, lambda j: j.get("remote_id") == remote_id and j.get("state") not in FINAL_STATE_NAMES,
                 common_pb2.MIGRATION_STATE_FAILED, error=detail)
