"""The source agent's gRPC service (host P), used by p2vctl and other tooling."""

from __future__ import annotations

import asyncio
import logging

import grpc

from common import cutover_marker
from common.config import SourceConfig
from common.migration_state import FINAL_STATES
from common.rpc import require_peer
from p2v.v1 import common_pb2, source_pb2, source_pb2_grpc

from .check import run_check
from .cutover import vm_runs_after_commit
from .migration import SourceMigration, cancel_on_destination, resolve_on_destination
from .migration_journal import (
    RESTART_TO_REPORT,
    journaled_summaries,
    mark_interrupted,
    mark_journal,
    unreported_resumes,
)

log = logging.getLogger(__name__)

#: how long an agent that reported a resume again stays after it (watchers re-attaching see the end)
REATTACH_GRACE_S = 10.0


def _discover() -> source_pb2.Inventory:
    from source_agent.discovery import discover

    return discover()


class SourceService(source_pb2_grpc.SourceServicer):
    def __init__(self, config: SourceConfig, host_id: str) -> None:
        self.config = config
        self.host_id = host_id
        self.migrations: dict[str, SourceMigration] = {}
        self.recovery: asyncio.Task | None = None

    def start_recovery(self) -> None:
        """Finish what an agent that died mid-cutover left behind (host_settings), in the background:
        a helper that outlived it may still be at work."""
        for leftover in cutover_marker.leftovers(self.config.agent.listen_unix):  # a dead agent's
            cutover_marker.remove(leftover)
        self.recovery = asyncio.create_task(self._recover(), name="cutover-recovery")

    async def _recover(self) -> list[str]:
        from source_agent.host_settings import PendingCutover, recover_interrupted_cutover

        async def after_repair(pending: PendingCutover) -> str:
            why = "the source agent stopped during the cutover; P runs on"
            marked = await asyncio.to_thread(mark_interrupted, self.config.agent.state_dir, pending.migration_id,
                                             f"{why} (its settings were put back when the agent started again)")
            told = await cancel_on_destination(pending.destination, pending.migration_id, self.config.tls, why)
            return f"journal of {', '.join(marked) or 'no migration'} marked failed; {told}"

        async def vm_runs(pending: PendingCutover) -> bool:
            async def ask(destination: str, migration_id: str, committed: bool):
                return await resolve_on_destination(destination, migration_id, self.config.tls, committed)

            return await vm_runs_after_commit(pending.destination, pending.migration_id, pending.settings.blocked, ask)

        done = await recover_interrupted_cutover(self.config.agent.state_dir, after_repair, vm_runs=vm_runs)
        if done:
            log.warning("interrupted cutover recovered: %s", "; ".join(done))
        for journal in await asyncio.to_thread(unreported_resumes, self.config.agent.state_dir):
            migration = SourceMigration.reporting_again(self.config, journal, self.host_id)
            # watchers that lost the dead agent re-attach within seconds (p2vctl --reattach-timeout)
            migration.unload = lambda: self._unload_soon(REATTACH_GRACE_S)
            self.migrations[migration.id] = migration
            migration.start_reporting_again()
            done.append(f"migration {migration.id}: reporting its resume to V again")
        return done

    async def _peer(self, context: grpc.aio.ServicerContext) -> None:
        await require_peer(context, self.config.tls)

    def _active(self) -> SourceMigration | None:
        return next((m for m in self.migrations.values() if not m.feed.finished), None)

    async def _migration(self, migration_id: str, context) -> SourceMigration:
        if not migration_id:
            active = self._active() or (list(self.migrations.values())[-1] if self.migrations else None)
            if active is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no migration has been started")
            return active
        migration = self.migrations.get(migration_id)
        if migration is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown migration {migration_id!r}")
        return migration

    async def Discover(self, request, context):
        await self._peer(context)
        return await asyncio.to_thread(_discover)

    async def Check(self, request: source_pb2.CheckRequest, context):
        await self._peer(context)
        if not request.destination:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "destination (host:port) is required")
        inventory = await asyncio.to_thread(_discover)
        return await run_check(self.config, request.destination, self.host_id, inventory)

    async def Migrate(self, request: source_pb2.MigrateRequest, context):
        await self._peer(context)
        if not request.destination:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "destination (host:port) is required")
        if request.dry_run and request.rehearse:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "dry_run (pre-copy only) and rehearse (cutover up to V's acknowledgement) "
                                "exclude each other")
        active = self._active()
        if active is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"migration {active.id} is already running")
        migration = SourceMigration(self.config, request, _discover, self.host_id)
        migration.unload = self._unload_soon
        self.migrations[migration.id] = migration
        migration.start()
        return migration.feed.status

    async def _recovered(self) -> None:
        """Before a migration is called unknown: what an earlier agent left is taken up first (a resume
        to report again is served under its id once start_recovery has read the journals)."""
        if self.recovery is not None and not self.recovery.done():
            await asyncio.wait({self.recovery})  # its failures are its own (logged there)

    async def Watch(self, request: common_pb2.MigrationRef, context):
        """A migration this agent runs, followed to its end; one only journaled (an earlier agent's, or
        the last one when no id is given and none runs here): its journal's last word."""
        await self._peer(context)
        wanted = request.migration_id

        def not_served() -> bool:
            return wanted not in self.migrations if wanted else not self.migrations

        if not_served():
            await self._recovered()
        if not_served():
            journaled = await asyncio.to_thread(journaled_summaries, self.config.agent.state_dir, set(self.migrations))
            if known := [s for s in journaled if s.status.migration_id == wanted] if wanted else journaled[-1:]:
                yield known[0].status
                return
        migration = await self._migration(wanted, context)
        async for status in migration.feed.follow():
            yield status

    async def Cancel(self, request: common_pb2.CancelRequest, context):
        await self._peer(context)
        migration = await self._migration(request.migration_id, context)
        if migration.feed.status.point_of_no_return:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "past the point of no return: the migration can only go forward")
        await migration.cancel()
        return common_pb2.CancelReply(migration_id=migration.id, state=migration.feed.status.state,
                                      detail=migration.feed.status.error)

    async def Rollback(self, request: common_pb2.MigrationRef, context):
        """Undo P's redundancy from its journal: also after a restart of this agent (no migration in its
        memory), never while a migration runs, never in a VM the OS moved into (V's word cancels it)."""
        await self._peer(context)
        active = self._active()
        if active is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"migration {active.id} is still running: cancel it first")
        state_dir = self.config.agent.state_dir
        journaled = await asyncio.to_thread(journaled_summaries, state_dir, set())
        if moved := next((s for s in journaled if s.status.point_of_no_return), None):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this OS moved into the VM (migration {moved.status.migration_id}): its redundancy "
                                "is cancelled on V's word, never rolled back here"
                                + (f"; {RESTART_TO_REPORT}" if moved.attention else ""))
        migration_id = request.migration_id
        if not migration_id:  # the last migration this agent ran, else the last one journaled
            latest = list(self.migrations) or [s.status.migration_id for s in journaled]
            migration_id = latest[-1] if latest else ""
        elif migration_id not in self.migrations and all(s.status.migration_id != migration_id for s in journaled):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown migration {migration_id!r}")
        # Redundancy (bond, md leg, drivers) is undone from its journal in reverse order.
        from source_agent.redundancy.rollback import rollback_all

        result = await asyncio.to_thread(rollback_all, state_dir)
        failed = [f"{entry}: {why}" for entry, why in result.failed + result.skipped]
        migration = self.migrations.get(migration_id)
        if migration is not None and migration.feed.status.state != common_pb2.MIGRATION_STATE_COMPLETED:
            await migration.feed.publish(state=common_pb2.MIGRATION_STATE_ROLLED_BACK)
        if migration_id:  # the journal too: what the next agent lists (a completed one is left as it is)
            await asyncio.to_thread(mark_journal, state_dir, migration_id, common_pb2.MIGRATION_STATE_ROLLED_BACK)
        log.info("rollback", extra={"migration": migration_id, "undone": result.undone, "failed": failed})
        return source_pb2.RollbackReply(migration_id=migration_id, undone=result.undone, failed=failed,
                                        state=common_pb2.MIGRATION_STATE_ROLLED_BACK)

    async def List(self, request: common_pb2.ListRequest, context):
        await self._peer(context)
        live = [m.summary() for m in self.migrations.values()]
        journaled = await asyncio.to_thread(journaled_summaries, self.config.agent.state_dir, set(self.migrations))
        listed = sorted(journaled + live, key=lambda s: (s.started_ms, s.status.migration_id))
        if request.unfinished_only:
            listed = [s for s in listed if s.attention or s.status.state not in FINAL_STATES]
        return common_pb2.MigrationList(migrations=listed)

    @staticmethod
    def _unload_soon(delay_s: float = 3.0) -> None:
        """After a completed migration (inside the VM) the agent stops itself — the patent's unload —
        a moment later, so that watchers receive the final status first."""
        import os
        import signal

        asyncio.get_running_loop().call_later(delay_s, os.kill, os.getpid(), signal.SIGTERM)

    async def shutdown(self) -> None:
        if self.recovery is not None and not self.recovery.done():
            self.recovery.cancel()
        for migration in list(self.migrations.values()):
            await migration.cancel()
