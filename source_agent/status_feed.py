"""Latest status of a migration, with waiters: what Watch streams to p2vctl and tooling."""

from __future__ import annotations

import asyncio
import time

from common.migration_state import FINAL_STATES
from p2v.v1 import common_pb2


class StatusFeed:
    def __init__(self, migration_id: str) -> None:
        self.status = common_pb2.MigrationStatus(
            migration_id=migration_id, state=common_pb2.MIGRATION_STATE_SETUP,
            stats=common_pb2.MigrationStats(), progress=common_pb2.Progress(phase="setup", fraction=-1),
            timestamp_ms=int(time.time() * 1000))
        self.version = 0
        self._changed = asyncio.Condition()

    @property
    def finished(self) -> bool:
        return self.status.state in FINAL_STATES

    async def publish(self, **fields) -> None:
        status = common_pb2.MigrationStatus()
        status.CopyFrom(self.status)
        for key, value in fields.items():
            if isinstance(value, (common_pb2.MigrationStats, common_pb2.Progress)):
                getattr(status, key).CopyFrom(value)
            else:
                setattr(status, key, value)
        status.timestamp_ms = int(time.time() * 1000)
        async with self._changed:
            self.status = status
            self.version += 1
            self._changed.notify_all()

    async def follow(self):
        """Yield the current status, then every change, until a final state has been yielded."""
        seen = -1
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: self.version != seen)
                seen, status = self.version, self.status
            yield status
            if status.state in FINAL_STATES:
                return
