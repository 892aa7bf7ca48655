"""One outgoing migration on P, start to end: the lifecycle phases in order.

    prepare -> (check) -> pre-copy -> cutover -> resume -> cancel + unload

Each phase lives in its own module; this file only sequences them, publishes status and
guarantees the invariant that any failure before the point of no return leaves P running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from google.protobuf import json_format

from common import cutover_marker, faults, version
from common.atomicfile import write_json_atomic
from common.config import SourceConfig, TlsConfig
from common.rpc import open_channel
from p2v.v1 import common_pb2, destination_pb2, destination_pb2_grpc, source_pb2

from . import cutover, prepare
from .migration_journal import RESTART_TO_REPORT, attention
from .precopy import PrecopyAborted
from .status_feed import StatusFeed
from .transport import TransportError

log = logging.getLogger(__name__)

#: Tries to tell V that P runs on after a cutover that went as far as a snapshot (see _abort_remote).
AFTER_SNAPSHOT_ATTEMPTS = 5
#: how long the agent in the VM waits, before it unloads, for a p2vctl that stepped out of P's image
REATTACH_WAIT_S = 30.0


def pass_note(figures: dict) -> str:
    """What the helper's pass before FREEZE sent, for the phase details ("" when there was none)."""
    pages = int(figures.get("pass_pages", 0))
    return f"; {pages} pages went before the snapshot ({int(figures.get('pass_bytes', 0))} B)" if pages else ""


class MigrationAborted(RuntimeError):
    pass


class SourceMigration:
    def __init__(self, config: SourceConfig, request: source_pb2.MigrateRequest,
                 inventory: Callable[[], source_pb2.Inventory], host_id: str, migration_id: str = "") -> None:
        self.config = config
        self.request = request
        self.inventory_fn = inventory
        self.host_id = host_id
        self.id = migration_id or uuid.uuid4().hex[:16]
        self.feed = StatusFeed(self.id)
        self.task: asyncio.Task | None = None
        self.started = time.monotonic()
        self.session: prepare.Session | None = None
        self.journal_path = Path(config.agent.state_dir) / "migrations" / f"{self.id}.json"
        self.journal_extra: dict = {}
        self.point_of_no_return = False
        self.started_wall = time.time()
        self.helper = cutover.HelperProcess()
        #: called after a completed migration inside the VM: the agent unloads itself
        self.unload: Callable[[], None] | None = None
        self.cutover_marker: Path | None = None

    # -- status ----------------------------------------------------------------------------
    async def _phase(self, phase: str, detail: str = "", fraction: float = -1.0, **fields) -> None:
        log.info("phase", extra={"migration": self.id, "phase": phase, "detail": detail})
        await self.feed.publish(progress=common_pb2.Progress(phase=phase, fraction=fraction, detail=detail),
                                **fields)

    def _journal(self, **extra) -> None:
        """Write the journal; what a call adds (remote id, figures) stays for the later writes."""
        self.journal_extra.update(extra)
        self.journal_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.journal_path, {
            "id": self.id, "destination": self.request.destination,
            "state": common_pb2.MigrationState.Name(self.feed.status.state),
            "error": self.feed.status.error, "started_wall": self.started_wall, "updated": time.time(),
            **self.journal_extra})

    def summary(self) -> common_pb2.MigrationSummary:
        """What `List` says of this migration, which this agent's process runs."""
        status = common_pb2.MigrationStatus()
        status.CopyFrom(self.feed.status)
        journal = {**self.journal_extra, "state": common_pb2.MigrationState.Name(status.state)}
        return common_pb2.MigrationSummary(
            status=status, peer=self.request.destination, started_ms=int(self.started_wall * 1000),
            updated_ms=status.timestamp_ms, live=True, attention=attention(journal))

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"migration-{self.id}")

    async def run(self) -> None:
        address = self.request.destination
        channel = None
        memory = None
        try:
            self._journal()
            await self._phase("prepare", f"negotiating with {address}")
            channel = open_channel(address, self.config.tls)
            self.session = await prepare.open_session(channel, address, self.host_id)
            if not self.request.dry_run:  # before pre-copy: a broken mirror would only be found after it
                entries = cutover.load_journal_entries(self.config.agent.state_dir)[1]
                if healed := await asyncio.to_thread(cutover.heal_mirrors, entries):
                    log.warning("md's network legs", extra={"migration": self.id, "detail": "; ".join(healed)})
                    await self._phase("prepare", "; ".join(healed))
                await cutover.check_mirrors(entries, MigrationAborted, healed)  # nothing on V yet: no retried cancel
            memory = self._open_memory()
            inventory = await asyncio.to_thread(self.inventory_fn)
            streams = self.request.streams or self.config.migration.streams
            request = prepare.prepare_request(inventory, max_pfn=memory.max_pfn, streams=streams,
                                              migration_id=self.id)
            cutover.enrich_prepare(request, inventory, waiting_vm=not self.request.dry_run)
            reply = await prepare.reserve(self.session, request, address)
            self._journal(remote_id=reply.migration_id)
            await self._phase("precopy", f"{reply.streams} streams, window {reply.window}",
                              state=common_pb2.MIGRATION_STATE_ACTIVE)
            if not self.request.dry_run:
                await self.helper.warm_up()  # during pre-copy: these pages travel early
            result = await self._precopy(memory, reply)
            if not self.request.dry_run:
                await self._cutover(reply.migration_id, inventory, memory.max_pfn, result)
                return
            await self._phase("precopy", "dry run complete: destination holds a consistent copy",
                              fraction=1.0, state=common_pb2.MIGRATION_STATE_COMPLETED,
                              stats=result.stats if hasattr(result, "stats") else self.feed.status.stats)
        except asyncio.CancelledError:
            if self.point_of_no_return:
                raise  # the OS lives in the VM now: nothing to abort
            await self._abort_remote("cancelled on the source")
            await self.feed.publish(state=common_pb2.MIGRATION_STATE_CANCELLED,
                                    error="cancelled on the source")
            self._journal()
            raise
        except cutover.PastPointOfNoReturn as exc:
            self.point_of_no_return = True  # nothing may be cancelled on V: the VM is the OS now
            log.critical("migration past the point of no return", extra={"migration": self.id, "error": str(exc)})
            await self.feed.publish(state=common_pb2.MIGRATION_STATE_FAILED, error=str(exc), point_of_no_return=True)
        except (prepare.PeerError, MigrationAborted, cutover.CutoverAborted, PrecopyAborted, TransportError,
                ValueError, OSError,
                grpc.RpcError) as exc:
            message = prepare.describe_rpc_error(exc, address) if isinstance(exc, grpc.RpcError) else str(exc)
            log.error("migration failed", extra={"migration": self.id, "error": message})
            await self._abort_remote(message, attempts=AFTER_SNAPSHOT_ATTEMPTS
                                     if isinstance(exc, cutover.CutoverAborted) else 1)
            await self.feed.publish(state=common_pb2.MIGRATION_STATE_FAILED, error=message)
        except Exception as exc:  # a bug: still leave P running and say so
            log.exception("migration crashed", extra={"migration": self.id})
            await self._abort_remote(f"source error: {exc}")
            await self.feed.publish(state=common_pb2.MIGRATION_STATE_FAILED, error=f"internal error: {exc!r}")
        finally:
            self._journal()
            if memory is not None:
                memory.close()  # its descriptors (/proc/kcore, kpageflags) would outlive every migration
            if channel is not None:
                await channel.close()

    def _memory_spec(self) -> str:
        return self.request.memory_source or self.config.agent.memory_source

    def _open_memory(self):
        from source_agent.memory import open_memory_source

        return open_memory_source(self._memory_spec())

    def _final_pass_source(self) -> str:
        """The memory source of the helper's pass before FREEZE, "" when V cannot take it or it is off."""
        assert self.session is not None
        if not self.config.migration.final_pass:
            return ""
        if version.IMAGE_PASS_CAPABILITY not in set(self.session.hello.capabilities):
            return ""
        return self._memory_spec()

    async def _precopy(self, memory, reply: destination_pb2.PrepareReply):
        from source_agent.precopy import PrecopyConfig, run_precopy

        m = self.config.migration
        cfg = PrecopyConfig(
            streams=reply.streams,
            window=reply.window,
            max_batch_bytes=reply.max_batch_bytes,
            downtime_limit_ms=self.request.downtime_limit_ms or m.downtime_limit_ms,
            max_bandwidth_bytes=self.request.max_bandwidth_bytes or m.max_bandwidth_bytes,
            zstd_level=None if (self.request.no_compression or not m.compression) else m.zstd_level,
            max_rounds=self.request.max_rounds or m.max_rounds,
            # With the hibernation carrier a pre-copy that does not converge only makes the cutover
            # delta larger (the snapshot carries the rest exactly): switch over at max_rounds.
            on_max_rounds="abort" if self.request.dry_run else "force",
        )

        async def on_status(stats: common_pb2.MigrationStats, round_no: int, fraction: float) -> None:
            await self.feed.publish(stats=stats, round=round_no,
                                    progress=common_pb2.Progress(phase="precopy", fraction=fraction,
                                                                 detail=f"round {round_no}"))

        from source_agent.transport import bulk_endpoint

        # Page batches on the destination's bulk sockets when both agents can (2x gRPC's throughput).
        bulk = bulk_endpoint(reply, self.session.hello.capabilities, self.request.destination, self.config.tls)
        return await run_precopy(memory, self.session.channel, reply.migration_id, reply, cfg, on_status,
                                 bulk=bulk)

    async def _cutover(self, remote_id: str, inventory: source_pb2.Inventory, max_pfn: int, precopy_result) -> None:
        """Steps 5-7. Returns in the VM after completion; raises CutoverAborted while P runs on."""
        assert self.session is not None
        stats = precopy_result.stats if hasattr(precopy_result, "stats") else self.feed.status.stats
        marker = self._mark_cutover()  # before the phase: a p2vctl on this host steps out when it sees both
        await self._phase("cutover", "snapshot and final transfer", state=common_pb2.MIGRATION_STATE_CUTOVER,
                          stats=stats)
        t0 = time.time()
        stats.precopy_bytes = stats.transferred
        try:
            figures = await cutover.cutover(self.session.stub, remote_id, inventory, max_pfn,
                                            self.config.agent.state_dir, self.helper, rehearse=self.request.rehearse,
                                            destination=self.request.destination, resolve=self._resolve,
                                            precopy_ended_at=t0, final_pass_source=self._final_pass_source(),
                                            runtime_dir=self.config.agent.runtime_dir)
        finally:
            if marker is not None:  # over: in the VM, or P runs on; a stepped-out p2vctl follows again
                cutover_marker.remove(marker)
        # the helper's pass before FREEZE went while P ran: pre-copy traffic, not the downtime's
        stats.precopy_bytes += int(figures.get("pass_bytes", 0))
        stats.transferred += int(figures.get("pass_bytes", 0))
        if figures.get("outcome") == "rehearsed":
            await self._rehearsed(figures, stats, t0)
            return
        # From here on this process runs inside the VM: the only way is forward.
        self.point_of_no_return = True
        downtime_s = figures.get("unfrozen_at", 0.0) - figures.get("frozen_at", 0.0)
        stats.downtime_ms = int(max(0.0, downtime_s) * 1000)
        await self._phase("resume", "; ".join(figures.get("resume_steps", [])), point_of_no_return=True,
                          stats=stats)
        # before any report: an agent started after this one died (or gave up) reports again from it
        self._journal(resumed=True, figures=figures, cutover_started=t0,
                      stats=json_format.MessageToDict(stats, preserving_proto_field_name=True))
        if fault := faults.requested("agent-killed-after-resume"):  # the rig: the next agent reports
            log.critical("%s=%s: killing myself", faults.FAULT_ENV, fault)
            os.kill(os.getpid(), signal.SIGKILL)
        await self._report(self.session.stub, remote_id, figures, stats, t0)

    async def _report(self, stub: destination_pb2_grpc.DestinationStub, remote_id: str, figures: dict,
                      stats: common_pb2.MigrationStats, t0: float) -> None:
        """Inside the VM: tell V, cancel what it names, tell V it is done; then the agent unloads. When
        V cannot be told, the migration ends failed and the journal keeps it for the next agent."""
        await self._phase("cancel", "reporting to V, cancelling the redundancy", point_of_no_return=True)
        try:
            outcome = await cutover.after_resume(stub, remote_id, self.host_id, figures, self.config.agent.state_dir)
        except RuntimeError as exc:
            message = f"{exc}. The OS runs in the VM; P's redundancy stays until V is told: {RESTART_TO_REPORT}"
            log.critical("reports to V failed", extra={"migration": self.id, "error": message})
            await self.feed.publish(state=common_pb2.MIGRATION_STATE_FAILED, error=message, point_of_no_return=True)
            return
        final = outcome.completion
        if final is not None:
            stats.downtime_bytes = final.stats.downtime_bytes
            stats.skipped = final.stats.skipped
            stats.cutover_pages = final.stats.cutover_pages
        stats.total_time_ms = int((time.time() - self.started_wall) * 1000)
        detail = (f"downtime {stats.downtime_ms} ms (OS frozen), cutover {stats.downtime_bytes} B, "
                  f"{stats.skipped} pages from V's store{pass_note(figures)}; cancelled {len(outcome.cancelled)}, "
                  f"failed {len(outcome.failed)}; cutover phase {time.time() - t0:.1f}s")
        state = common_pb2.MIGRATION_STATE_COMPLETED if not outcome.failed else common_pb2.MIGRATION_STATE_FAILED
        await self._phase("cancel", detail, fraction=1.0, state=state, stats=stats, point_of_no_return=True,
                          **({"error": "; ".join(outcome.failed)} if outcome.failed else {}))
        self._journal(completed=True, figures=figures)
        if self.unload is not None:
            await self._wait_for_stepped_out_watcher()
            self.unload()

    def _mark_cutover(self) -> Path | None:
        """The marker next to the agent's unix socket (common.cutover_marker); None without a socket."""
        socket = self.config.agent.listen_unix
        if not socket:
            return None
        marker = cutover_marker.marker_path(socket, self.id)
        try:
            cutover_marker.create_marker(marker)
        except OSError as exc:  # a p2vctl on this host then stays in P's image: a larger image, no more
            log.warning("no cutover marker: %s", exc, extra={"migration": self.id})
            return None
        self.cutover_marker = marker
        return marker

    async def _wait_for_stepped_out_watcher(self) -> None:
        """A p2vctl that stepped out of P's image for the cutover follows again seconds after it (it
        starts afresh, under TCG ~2-3 s): the agent stays until it has (at most REATTACH_WAIT_S)."""
        marker = self.cutover_marker
        if marker is None:
            return
        for _ in range(int(REATTACH_WAIT_S / 0.2)):  # a file another process removes: polled
            if not cutover_marker.watcher_waiting(marker):
                break
            await asyncio.sleep(0.2)
        for note in cutover_marker.watcher_paths(marker):
            cutover_marker.remove(note)

    @classmethod
    def reporting_again(cls, config: SourceConfig, journal: dict, host_id: str) -> SourceMigration:
        """A migration whose OS resumed in the VM but whose reports never reached V (its agent died, or
        gave up while V's agent was down): `report_again` tells V now, from the journal."""
        request = source_pb2.MigrateRequest(destination=str(journal["destination"]))
        migration = cls(config, request, source_pb2.Inventory, host_id, str(journal["id"]))
        migration.journal_extra = {k: v for k, v in journal.items()
                                   if k not in ("id", "destination", "state", "error", "started_wall", "updated")}
        migration.point_of_no_return = True
        migration.started_wall = float(journal.get("started_wall") or time.time())
        return migration

    def start_reporting_again(self) -> None:
        self.task = asyncio.create_task(self.report_again(), name=f"report-{self.id}")

    async def report_again(self) -> None:
        figures = dict(self.journal_extra.get("figures") or {})
        stats = common_pb2.MigrationStats()
        try:  # the pre-copy's figures, as the agent that died had them
            json_format.ParseDict(self.journal_extra.get("stats") or {}, stats, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            log.warning("journal stats unreadable: %s", exc, extra={"migration": self.id})
        stats.downtime_ms = int(max(0.0, figures.get("unfrozen_at", 0.0) - figures.get("frozen_at", 0.0)) * 1000)
        await self.feed.publish(state=common_pb2.MIGRATION_STATE_CUTOVER, point_of_no_return=True, stats=stats)
        log.warning("the OS resumed in the VM but V was never told: reporting again", extra={"migration": self.id})
        channel = open_channel(self.request.destination, self.config.tls)
        try:
            await self._report(destination_pb2_grpc.DestinationStub(channel), str(self.journal_extra["remote_id"]),
                               figures, stats, float(self.journal_extra.get("cutover_started") or time.time()))
        except Exception as exc:  # a bug: say so, keep the journal for the next agent
            log.exception("reporting again failed", extra={"migration": self.id})
            await self.feed.publish(state=common_pb2.MIGRATION_STATE_FAILED, error=f"internal error: {exc!r}")
        finally:
            self._journal()
            await channel.close()

    async def _resolve(self, destination: str, migration_id: str, committed: bool) -> destination_pb2.ResolveReply:
        return await resolve_on_destination(destination, migration_id, self.config.tls, committed)

    async def _rehearsed(self, figures: dict, stats: common_pb2.MigrationStats, t0: float) -> None:
        """P ran on after V acknowledged the image: the figures of a cutover that handed nothing over."""
        frozen_s = max(0.0, figures.get("unfrozen_at", 0.0) - figures.get("frozen_at", 0.0))
        stats.downtime_ms = int(frozen_s * 1000)
        stats.downtime_bytes = int(figures.get("wire_bytes", 0))
        sent = int(figures.get("pages_sent", 0))
        stats.cutover_pages = int(figures.get("image_pages", 0))  # as V reports them after a move
        stats.skipped = max(0, stats.cutover_pages - sent)
        stats.total_time_ms = int((time.time() - self.started_wall) * 1000)
        detail = (f"rehearsal complete, P runs on: frozen {stats.downtime_ms} ms until V had verified the "
                  f"image ({stats.cutover_pages} pages: {sent} sent, {stats.skipped} from V's store, "
                  f"{stats.downtime_bytes} B on the wire{pass_note(figures)}); a cutover adds "
                  f"the VM's restore and resume; cutover phase {time.time() - t0:.1f}s")
        await self._abort_remote("rehearsal complete: nothing is handed over",  # V drops its VM and copy
                                 attempts=AFTER_SNAPSHOT_ATTEMPTS)
        await self._phase("rehearsal", detail, fraction=1.0, state=common_pb2.MIGRATION_STATE_COMPLETED,
                          stats=stats)
        self._journal(rehearsed=True, figures=figures)

    async def _abort_remote(self, reason: str, attempts: int = 1) -> None:
        """Cancel the migration on V. After a snapshot, several `attempts`: P's traffic block dropped
        V's answers for seconds, and gRPC's keepalive may have closed the connection meanwhile (the
        rig: "Stream removed ... Connection timed out"); the channel then connects again."""
        if self.session is None or self.point_of_no_return:
            return
        request = common_pb2.CancelRequest(migration_id=self.id, reason=reason)
        for attempt in range(attempts):
            try:
                await self.session.stub.Cancel(request, timeout=5, wait_for_ready=attempt > 0)
                return
            except grpc.RpcError as exc:
                error = str(exc.details() if hasattr(exc, "details") else exc)
                log.warning("could not cancel on the destination",
                            extra={"migration": self.id, "error": error, "attempt": attempt + 1})
            except asyncio.CancelledError:
                return
            if attempt + 1 < attempts:
                await asyncio.sleep(1)

    async def cancel(self) -> None:
        if self.task and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


async def _ask_destination(address: str, tls: TlsConfig,
                           call: Callable[[destination_pb2_grpc.DestinationStub], Awaitable],
                           attempts: int, final: tuple[grpc.StatusCode, ...] = ()) -> object:
    """One call on a fresh channel to V (not this agent's: its TCP state may be the image's),
    retried `attempts` times unless V answers with a `final` code; raises RuntimeError with V's
    reason when it cannot be told."""
    channel = open_channel(address, tls)
    try:
        stub = destination_pb2_grpc.DestinationStub(channel)
        for attempt in range(attempts):
            try:
                return await call(stub)
            except grpc.RpcError as exc:
                if attempt + 1 == attempts or exc.code() in (grpc.StatusCode.NOT_FOUND,
                                                              grpc.StatusCode.PERMISSION_DENIED, *final):
                    raise RuntimeError(prepare.describe_rpc_error(exc, address)) from None
                await asyncio.sleep(1)
    finally:
        await channel.close()
    raise RuntimeError("no attempt made")


async def cancel_on_destination(address: str, migration_id: str, tls: TlsConfig, reason: str,
                                attempts: int = 3) -> str:
    """Tell V to drop a migration this agent no longer runs (an agent that restarted after dying
    mid-cutover: V still holds its waiting VM). Returns what V said; raises when it cannot be told."""
    request = common_pb2.CancelRequest(migration_id=migration_id, reason=reason)
    reply = await _ask_destination(
        address, tls, lambda stub: stub.Cancel(request, timeout=10, wait_for_ready=True), attempts)
    state = common_pb2.MigrationState.Name(reply.state).removeprefix("MIGRATION_STATE_").lower()  # type: ignore[attr-defined]
    return f"V told: migration {migration_id} {state}"


async def resolve_on_destination(address: str, migration_id: str, tls: TlsConfig, committed: bool,
                                 attempts: int = 3, timeout_s: float = 30.0) -> destination_pb2.ResolveReply:
    """P's word on a cutover whose helper went after V's ACK (ResolveCutover): V starts the VM if
    P `committed`, else drops it. V's answer binds P: `vm_runs` -> P powers off. Raises RuntimeError
    when V cannot tell (unreachable, its state directory lost, an older V): P then keeps to its own
    note (a V agent that restarted answers from its journal and GO mark). Each
    attempt may take `timeout_s` (V waits up to dest_agent.cutover.RESOLVE_WAIT_S for its receiver)."""
    request = destination_pb2.ResolveRequest(migration_id=migration_id, source_committed=committed)
    return await _ask_destination(  # type: ignore[return-value]
        address, tls, lambda stub: stub.ResolveCutover(request, timeout=timeout_s, wait_for_ready=True), attempts,
        final=(grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION))
