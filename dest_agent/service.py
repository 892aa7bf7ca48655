"""The destination agent's gRPC service (host V): negotiation, catalog, page intake, status."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from common import version
from common.config import DestConfig
from common.net_route import peer_ipv4
from common.rpc import require_peer
from p2v.v1 import common_pb2, destination_pb2, destination_pb2_grpc

from . import source_lease
from .migration_record import STATE_NAMES, MigrationRecord

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
HASHES_PER_CHUNK = 1 << 16
ACK_GROUP_MAX = 16  # batches made durable by one fdatasync


class DestinationService(destination_pb2_grpc.DestinationServicer):
    """One instance per agent process; migrations are kept by id."""

    def __init__(self, config: DestConfig, host_id: str) -> None:
        self.config = config
        self.host_id = host_id
        self.root = Path(config.agent.state_dir) / "migrations"
        self.root.mkdir(parents=True, exist_ok=True)
        self.migrations: dict[str, MigrationRecord] = {}
        from dest_agent.cutover import CutoverDesk

        self.cutover = CutoverDesk(config, Path(config.agent.state_dir))
        self._settling: asyncio.Task | None = None
        self._lease_watch: asyncio.Task | None = None
        self._orphans = self._reload()
        # Bulk data plane beside gRPC (dest_agent.bulk_receiver), started on the first Prepare.
        self._bulk = None
        self._bulk_failed = False
        from dest_agent.bulk_receiver import TokenTable

        self._bulk_tokens = TokenTable()
        self._catalog_spec = None
        if config.catalog:
            self._catalog_spec = self._parse_catalog(config.catalog)  # fail at start-up, not at use

    def _reload(self) -> list[MigrationRecord]:
        """Migrations an earlier run of this agent journaled (CutoverDesk.reload decides what each
        is now). Returns the interrupted ones: their waiting VMs are found again in start()."""
        from dest_agent.cutover import INTERRUPTED, VM_IS_P

        interrupted: list[MigrationRecord] = []
        for meta_path in sorted(self.root.glob("*/meta.json")):
            try:
                record = MigrationRecord.reload(self.root, MigrationRecord.load_meta(meta_path))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("cannot reload a migration's journal", extra={"path": str(meta_path), "error": str(exc)})
                continue
            self.migrations[record.id] = record
            verdict = self.cutover.reload(record)
            if verdict == VM_IS_P:
                log.warning("reloaded a migration past its point of no return: the VM is P",
                            extra={"migration": record.id})
            elif verdict == INTERRUPTED:
                interrupted.append(record)
                log.warning("reloaded an interrupted migration as failed", extra={"migration": record.id})
        return interrupted

    async def start(self) -> None:
        """After the server is up: the waiting VMs an earlier run left are adopted (one that still
        holds an acknowledged image) or destroyed, in the background (CutoverDesk.settle_orphans),
        and the routes to P it left are removed (sweep_ack_routes)."""
        from dest_agent.cutover import sweep_ack_routes

        await asyncio.to_thread(sweep_ack_routes)
        if self._orphans:
            orphans, self._orphans = self._orphans, []
            self._settling = asyncio.create_task(asyncio.to_thread(self.cutover.settle_orphans, orphans))
        if self.config.limits.source_silence_s > 0:
            self._lease_watch = asyncio.create_task(self._watch_leases(), name="source-lease")

    async def _watch_leases(self) -> None:
        """Fail the migrations whose source fell silent before the point of no return, and destroy
        their waiting VMs (dest_agent.source_lease)."""
        lease_s = self.config.limits.source_silence_s
        while True:
            await asyncio.sleep(source_lease.watch_period_s(lease_s))
            await self._settled()
            for record in list(self.migrations.values()):
                reason = source_lease.abandon_reason(
                    record.silent_s(), lease_s, finished=record.finished,
                    past_point_of_no_return=self.cutover.past_point_of_no_return(record.id),
                    receiving=self.cutover.receiving(record.id))
                if not reason:
                    continue
                log.error("source silent: migration given up", extra={"migration": record.id, "error": reason})
                with record.lock:  # at once, in the loop: a call of P's that comes while the VM goes is refused
                    record.state, record.error = common_pb2.MIGRATION_STATE_FAILED, reason
                try:
                    await asyncio.to_thread(self._close, record, common_pb2.MIGRATION_STATE_FAILED, reason)
                except Exception:  # the watch goes on for the others
                    log.exception("giving up a silent source's migration failed", extra={"migration": record.id})

    async def _settled(self) -> None:
        """Before anything decides on a cutover: what an earlier run left is known (adopted or gone)."""
        if self._settling is not None:
            await asyncio.shield(self._settling)

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _parse_catalog(data: dict):
        from dest_agent.catalog import CatalogSpec

        return CatalogSpec.from_dict(data)

    async def _peer(self, context: grpc.aio.ServicerContext) -> list[str]:
        return await require_peer(context, self.config.tls)

    async def _migration(self, migration_id: str, context: grpc.aio.ServicerContext, *,
                         from_source: bool = True) -> MigrationRecord:
        """The migration a call names. A call from its source (every one but Status and List) renews
        the source's lease on it (dest_agent.source_lease)."""
        record = self.migrations.get(migration_id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown migration {migration_id!r}")
        if from_source:
            record.heard()
        return record

    async def _open_migration(self, migration_id: str, context: grpc.aio.ServicerContext) -> MigrationRecord:
        """A migration whose page store is still open (it takes pages and answers for them)."""
        record = await self._migration(migration_id, context)
        if record.store is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"migration {record.id} is {STATE_NAMES[record.state]}"
                                + (f": {record.error}" if record.error else ""))
        return record

    # -- RPCs ------------------------------------------------------------------------------
    async def Negotiate(self, request: common_pb2.Hello, context: grpc.aio.ServicerContext):
        names = await self._peer(context)
        lo = max(request.min_protocol_version or request.protocol_version, version.MIN_PROTOCOL_VERSION)
        hi = min(request.protocol_version, version.PROTOCOL_VERSION)
        if lo > hi or request.protocol_version == 0:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no common protocol version: peer speaks {request.min_protocol_version}.."
                f"{request.protocol_version}, this agent {version.MIN_PROTOCOL_VERSION}.."
                f"{version.PROTOCOL_VERSION}",
            )
        if request.role and request.role != "source":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a destination agent talks to source agents, not {request.role!r}")
        caps = [c for c in version.CAPABILITIES if c in set(request.capabilities)]
        log.info("negotiated", extra={"peer": names, "peer_host": request.host_id, "protocol": hi})
        return common_pb2.HelloReply(protocol_version=hi, capabilities=caps,
                                     agent_version=version.AGENT_VERSION, host_id=self.host_id,
                                     peer_identity=",".join(names))

    async def GetCatalog(self, request, context):
        await self._peer(context)
        from dest_agent.catalog import CatalogSpec, build_catalog

        spec = self._catalog_spec or CatalogSpec.default()
        catalog = build_catalog(spec, self.host_id)
        catalog.max_memory_bytes = self.config.limits.max_memory_bytes
        catalog.free_disk_bytes = shutil.disk_usage(self.root).free
        self.cutover.catalog_facts(catalog, request.memory_bytes)
        return catalog

    async def Prepare(self, request: destination_pb2.PrepareRequest, context):
        peer = await self._peer(context)
        limits = self.config.limits
        page_size = request.page_size or PAGE_SIZE
        if page_size != PAGE_SIZE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page size {page_size} unsupported")
        if request.max_pfn == 0 or request.memory_bytes == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "memory_bytes and max_pfn are required")
        if request.memory_bytes > limits.max_memory_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"source memory {request.memory_bytes} B exceeds this host's limit "
                f"{limits.max_memory_bytes} B")
        if request.max_pfn * PAGE_SIZE > 4 * max(request.memory_bytes, 1 << 30):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"max_pfn {request.max_pfn} is implausible for {request.memory_bytes} B")
        free = shutil.disk_usage(self.root).free
        if request.memory_bytes > free:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"not enough space for the page store: need {request.memory_bytes} B, "
                                f"{free} B free under {self.root}")
        migration_id = request.migration_id or uuid.uuid4().hex[:16]
        if migration_id in self.migrations:
            existing = self.migrations[migration_id]
            if existing.source_host_id != request.source_host_id or existing.max_pfn != request.max_pfn:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                    f"migration {migration_id} exists with other parameters")
            if existing.store is None:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                    f"migration {migration_id} is {STATE_NAMES[existing.state]}; start a new one")
            record = existing  # idempotent retry of Prepare
            record.heard()
        else:
            try:
                record = MigrationRecord(self.root, migration_id, source_host_id=request.source_host_id,
                                         memory_bytes=request.memory_bytes, max_pfn=request.max_pfn,
                                         page_size=page_size, peer=peer)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            from dest_agent.page_store import PageStore

            record.dir.mkdir(parents=True, exist_ok=True)
            record.store = await asyncio.to_thread(PageStore, record.image_path, request.max_pfn)
            record.state = common_pb2.MIGRATION_STATE_ACTIVE
            record.round = 1
            record.journal()
            self.migrations[migration_id] = record
            log.info("prepared", extra={"migration": migration_id, "max_pfn": request.max_pfn,
                                        "memory_bytes": request.memory_bytes})
        self.cutover.prepare(record, request)
        streams = min(request.streams or 1, limits.max_streams)
        bulk_port = await self._bulk_port()
        return destination_pb2.PrepareReply(migration_id=migration_id, max_batch_bytes=limits.max_batch_bytes,
                                            window=limits.window, streams=streams, bulk_port=bulk_port,
                                            bulk_token=self._bulk_tokens.issue(migration_id) if bulk_port else b"")

    async def _bulk_port(self) -> int:
        """The bulk listener's port, starting it on first use; 0 = not offered (PushPages only)."""
        if self._bulk is not None:
            return self._bulk.port
        host = self.config.agent.listen.rpartition(":")[0].strip("[]")
        if self._bulk_failed or not self.config.agent.listen:
            return 0
        from common.page_wire import server_ssl_context
        from common.rpc import MAX_MESSAGE_BYTES
        from dest_agent.bulk_receiver import BulkReceiver

        tls = self.config.tls
        try:
            bulk = BulkReceiver(self._apply_group, self._bulk_tokens.lookup,
                                ssl=None if tls.insecure else server_ssl_context(tls),
                                allowed_peers=tls.allowed_peers,
                                max_frame_bytes=max(MAX_MESSAGE_BYTES, self.config.limits.max_batch_bytes + (1 << 20)))
            await bulk.start(host)
        except (OSError, ValueError) as exc:
            self._bulk_failed = True  # PushPages still works; don't retry on every Prepare
            log.warning("bulk data plane unavailable", extra={"error": str(exc)})
            return 0
        self._bulk = bulk
        log.info("bulk data plane listening", extra={"host": host, "port": bulk.port, "tls": not tls.insecure})
        return bulk.port

    async def PushPages(self, request_iterator: AsyncIterator[destination_pb2.PageBatch], context
                        ) -> AsyncIterator[destination_pb2.BatchAck]:
        await self._peer(context)
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.config.limits.window * 2)
        end = object()

        async def receive() -> None:
            try:
                async for batch in request_iterator:
                    await queue.put(batch)
            finally:
                await queue.put(end)

        receiver = asyncio.create_task(receive())
        last_seq: dict[tuple[str, int], int] = {}
        try:
            done = False
            while not done:
                group = [await queue.get()]
                while not queue.empty() and len(group) < ACK_GROUP_MAX:
                    group.append(queue.get_nowait())
                if group[-1] is end:
                    group.pop()
                    done = True
                if group:
                    # Decode, write and fdatasync off the event loop; acks only after the sync.
                    for ack in await asyncio.to_thread(self._apply_group, group, last_seq):
                        yield ack
        finally:
            receiver.cancel()

    def _apply_group(self, group: list[destination_pb2.PageBatch],
                     last_seq: dict[tuple[str, int], int]) -> list[destination_pb2.BatchAck]:
        from common.pagecodec import BatchError, decode_batch

        acks: list[destination_pb2.BatchAck] = []
        to_sync: dict[str, MigrationRecord] = {}
        written: list[tuple[MigrationRecord, int, destination_pb2.BatchAck]] = []
        entered: list[MigrationRecord] = []
        try:
            self._apply_batches(group, last_seq, acks, to_sync, written, entered, decode_batch, BatchError)
            for record in to_sync.values():
                record.store.sync()
        finally:
            for record in entered:
                record.leave_io()
        for _record, pages, ack in written:
            ack.status, ack.pages_written = destination_pb2.ACK_STATUS_OK, pages
        return acks

    def _apply_batches(self, group, last_seq, acks, to_sync, written, entered, decode_batch, BatchError
                       ) -> None:
        for batch in group:
            ack = destination_pb2.BatchAck(stream_id=batch.stream_id, seq=batch.seq, batch_id=batch.batch_id)
            acks.append(ack)
            record = self.migrations.get(batch.migration_id)
            if record is None:
                ack.status, ack.error = destination_pb2.ACK_STATUS_REJECTED, \
                    f"unknown migration {batch.migration_id!r}"
                continue
            record.heard()
            if record not in entered:
                if not record.enter_io():
                    ack.status, ack.error = destination_pb2.ACK_STATUS_REJECTED, \
                        f"migration {record.id} is {STATE_NAMES[record.state]}" + \
                        (f": {record.error}" if record.error else "")
                    continue
                entered.append(record)
            with record.lock:
                reason = self._admission(record, batch, last_seq)
                if reason is None and batch.batch_id in record.written_batch_ids:
                    # A resend after a lost ack: already written, nothing to do but make it durable.
                    ack.status = destination_pb2.ACK_STATUS_DUPLICATE
                    record.counters.duplicates += 1
                    to_sync[record.id] = record
                    continue
            if reason is not None:
                ack.status, ack.error = destination_pb2.ACK_STATUS_REJECTED, reason
                record.counters.rejected += 1
                log.warning("batch rejected", extra={"migration": record.id, "stream": batch.stream_id,
                                                     "seq": batch.seq, "reason": reason})
                continue
            try:
                decoded = decode_batch(batch, max_pfn=record.max_pfn,
                                       max_raw_bytes=self.config.limits.max_batch_bytes)
            except BatchError as exc:
                ack.status, ack.error = destination_pb2.ACK_STATUS_REJECTED, str(exc)
                record.counters.rejected += 1
                log.warning("batch rejected", extra={"migration": record.id, "stream": batch.stream_id,
                                                     "seq": batch.seq, "reason": str(exc)})
                continue
            pages = record.store.write(decoded)
            with record.lock:
                record.written_batch_ids.add(batch.batch_id)
                record.round_batches[batch.round] = record.round_batches.get(batch.round, 0) + 1
                c = record.counters
                c.batches += 1
                c.pages += len(decoded.pfns)
                c.zero_pages += int(np.count_nonzero(decoded.zero))
                c.wire_bytes += batch.ByteSize()
                c.raw_bytes += batch.raw_size
            to_sync[record.id] = record
            written.append((record, pages, ack))

    @staticmethod
    def _admission(record: MigrationRecord, batch: destination_pb2.PageBatch,
                   last_seq: dict[tuple[str, int], int]) -> str | None:
        """Why this batch may not be written (None = it may). Caller holds record.lock."""
        if record.state not in (common_pb2.MIGRATION_STATE_ACTIVE, common_pb2.MIGRATION_STATE_CUTOVER):
            return f"migration {record.id} is {common_pb2.MigrationState.Name(record.state)}"
        key = (record.id, batch.stream_id)
        if batch.seq <= last_seq.get(key, 0):
            return f"replayed or out-of-order seq {batch.seq} on stream {batch.stream_id}"
        last_seq[key] = batch.seq
        if batch.round < record.round:
            return f"batch of round {batch.round} arrived after round {record.round - 1} was closed"
        if batch.round > record.round:
            return f"batch of round {batch.round} before round {record.round} was closed"
        return None

    async def EndRound(self, request: destination_pb2.RoundMark, context):
        await self._peer(context)
        record = await self._open_migration(request.migration_id, context)
        if request.round == record.durable_round and request.round:
            # A retry after a lost reply: that round is already closed and durable.
            return destination_pb2.RoundAck(round=request.round, pages_held=record.store.pages_held(),
                                            durable=True)
        if request.round != record.round:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"round {request.round} is not the open round {record.round}")
        received = record.round_batches.get(request.round, 0)
        if request.batches and received < request.batches:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"round {request.round}: {received} of {request.batches} batches arrived")
        await asyncio.to_thread(record.store.sync)
        with record.lock:
            record.durable_round = request.round
            record.round += 1
        await asyncio.to_thread(record.journal)
        return destination_pb2.RoundAck(round=request.round, pages_held=record.store.pages_held(),
                                        durable=True)

    async def HeldHashes(self, request: destination_pb2.HeldHashesRequest, context):
        await self._peer(context)
        record = await self._open_migration(request.migration_id, context)
        end = request.end_pfn or record.max_pfn
        if request.start_pfn > end or end > record.max_pfn:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"range {request.start_pfn}..{end} outside 0..{record.max_pfn}")
        for start in range(request.start_pfn, end, HASHES_PER_CHUNK):
            stop = min(start + HASHES_PER_CHUNK, end)
            hashes = np.asarray(record.store.hashes(start, stop), dtype="<u8")
            yield destination_pb2.HashChunk(start_pfn=start, hashes=hashes.tobytes())

    async def ReportRedundancy(self, request: destination_pb2.RedundancyReport, context):
        await self._peer(context)
        record = await self._migration(request.migration_id, context)
        seen = {e["id"] for e in record.redundancy}
        for entry in request.entries:
            if not entry.id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "redundancy entry without id")
        for entry in request.entries:
            if entry.id not in seen:
                record.redundancy.append({"id": entry.id, "kind": entry.kind, "physical": entry.physical,
                                          "virtual": entry.virtual, "detail": entry.detail})
        await asyncio.to_thread(record.journal)
        return destination_pb2.RedundancyAck(accepted=len(request.entries))

    async def Cutover(self, request: destination_pb2.CutoverRequest, context):
        await self._peer(context)
        record = await self._migration(request.migration_id, context)
        if request.phase == destination_pb2.CutoverRequest.PHASE_ABORT:
            if record.state == common_pb2.MIGRATION_STATE_CUTOVER:
                record.set_state(common_pb2.MIGRATION_STATE_ACTIVE)
            self.cutover.abort(record)
            return destination_pb2.CutoverReply(ready=False)
        if request.phase != destination_pb2.CutoverRequest.PHASE_ANNOUNCE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown cutover phase {request.phase}")
        if record.state not in (common_pb2.MIGRATION_STATE_ACTIVE, common_pb2.MIGRATION_STATE_CUTOVER):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"migration {record.id} is {common_pb2.MigrationState.Name(record.state)}")
        return await self.cutover.announce(record, peer_ipv4(context.peer()))

    async def ResolveCutover(self, request: destination_pb2.ResolveRequest, context):
        await self._peer(context)
        record = await self._migration(request.migration_id, context)
        await self._settled()
        from dest_agent.cutover import ResolveError

        try:
            return await self.cutover.resolve(record, request.source_committed)
        except ResolveError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def Resumed(self, request: destination_pb2.ResumedRequest, context):
        await self._peer(context)
        record = await self._migration(request.migration_id, context)
        reply = self.cutover.resumed(record, request)
        log.info("resumed in the VM", extra={"migration": record.id, "steps": list(request.resume_steps)})
        return reply

    async def Complete(self, request: destination_pb2.CompletionReport, context):
        await self._peer(context)
        record = await self._migration(request.migration_id, context)
        self.cutover.complete(record, request)
        await asyncio.to_thread(record.journal)
        log.info("migration complete", extra={"migration": record.id, "cancelled": list(request.cancelled),
                                              "failed": list(request.failed)})
        return self.status_of(record)

    def status_of(self, record: MigrationRecord) -> common_pb2.MigrationStatus:
        c = record.counters
        stats = common_pb2.MigrationStats(
            transferred=c.wire_bytes, total=record.max_pfn * PAGE_SIZE, duplicate=c.zero_pages,
            normal=c.pages - c.zero_pages, normal_bytes=(c.pages - c.zero_pages) * PAGE_SIZE,
            dirty_sync_count=record.durable_round,
            total_time_ms=int((time.time() - record.created) * 1000))
        status = common_pb2.MigrationStatus(
            migration_id=record.id, state=record.state, stats=stats, error=record.error,
            round=record.round, timestamp_ms=int(time.time() * 1000))
        self.cutover.fill_status(record, status)
        return status

    async def Status(self, request: common_pb2.MigrationRef, context):
        await self._peer(context)
        return self.status_of(await self._migration(request.migration_id, context, from_source=False))

    async def List(self, request: common_pb2.ListRequest, context):
        await self._peer(context)
        listed = []
        for record in sorted(self.migrations.values(), key=lambda r: (r.created, r.id)):
            peer = f"{','.join(record.peer)} {record.source_host_id[:12]}".strip()  # TLS identity, host id
            summary = common_pb2.MigrationSummary(
                status=self.status_of(record), peer=peer, started_ms=int(record.created * 1000),
                updated_ms=int(record.updated * 1000), live=True, attention=self.cutover.attention(record))
            if not request.unfinished_only or summary.attention or not record.finished:
                listed.append(summary)
        return common_pb2.MigrationList(migrations=listed)

    async def Cancel(self, request: common_pb2.CancelRequest, context):
        await self._peer(context)
        record = await self._migration(request.migration_id, context)
        await self._settled()
        if self.cutover.past_point_of_no_return(record.id):  # e.g. an agent in the VM that found an old note
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"migration {record.id} is past its point of no return: P committed, the VM is P")
        # P's word that it runs on: also for one that failed (space freed; an undecided image dropped)
        if not record.finished or record.state == common_pb2.MIGRATION_STATE_FAILED:
            await asyncio.to_thread(self._close, record, common_pb2.MIGRATION_STATE_CANCELLED,
                                    request.reason or "cancelled by the source")
        log.info("cancelled", extra={"migration": record.id, "reason": request.reason})
        return common_pb2.CancelReply(migration_id=record.id, state=record.state,
                                      detail=record.error)

    def _close(self, record: MigrationRecord, state: int, error: str) -> None:
        self.cutover.close(record.id)  # before the point of no return only; afterwards the VM is P
        with record.lock:
            record.state = state  # new batches are refused from here on
            record.error = error
        if not record.wait_idle(timeout=10):
            log.error("writers still busy after 10 s", extra={"migration": record.id})
        with record.lock:
            store, record.store = record.store, None
        if store is not None:
            store.close()
        if state == common_pb2.MIGRATION_STATE_CANCELLED:
            # The copy is worthless without the source; free the space, keep the journal.
            record.image_path.unlink(missing_ok=True)
            for extra in record.dir.glob("memory.img*"):
                extra.unlink(missing_ok=True)
        record.journal()

    async def shutdown(self) -> None:
        """SIGTERM: stop taking pages; journal every unfinished migration as interrupted."""
        if self._lease_watch is not None:
            self._lease_watch.cancel()
        if self._bulk is not None:
            await self._bulk.close()
        # a cutover under way ends (or is abandoned) first: an acknowledged image is never dropped
        await asyncio.gather(*(self.cutover.stop_receiving(r) for r in self.migrations.values()))
        for record in self.migrations.values():
            # past its point of no return the VM is P: its report is still due, to the next run
            if not record.finished and not self.cutover.past_point_of_no_return(record.id):
                await asyncio.to_thread(self._close, record, common_pb2.MIGRATION_STATE_FAILED,
                                        f"destination agent stopped during round {record.round}")
