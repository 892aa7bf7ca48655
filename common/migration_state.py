"""The states that end a migration, for both agents and p2vctl (one definition)."""

from __future__ import annotations

from p2v.v1 import common_pb2

FINAL_STATES = frozenset({
    common_pb2.MIGRATION_STATE_COMPLETED, common_pb2.MIGRATION_STATE_FAILED,
    common_pb2.MIGRATION_STATE_CANCELLED, common_pb2.MIGRATION_STATE_ROLLED_BACK,
})
#: as journals write them (MigrationState names)
FINAL_STATE_NAMES = frozenset(common_pb2.MigrationState.Name(s) for s in FINAL_STATES)
