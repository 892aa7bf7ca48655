"""Page batches to the destination over N parallel PushPages streams (like QEMU's multifd).

Per stream: a bounded window of unacknowledged batches, acks read concurrently with writes.
All streams share one token bucket (the bandwidth cap) and one queue of batches.

Resumption: a batch belongs to the stream that first sent it, with its seq, until it is
acknowledged. When a stream fails (the call errors, the server ends it early, or no ack
arrives for ack_timeout_s while batches are outstanding) the stream opens a new call and
writes its unacknowledged batches again, unchanged and in seq order, then carries on. The
destination acknowledges a batch it had already written as DUPLICATE, so nothing is written
twice, nothing acknowledged is sent again, and at most `window` batches per stream are
resent per failure (counted in resent_bytes).

Two carriers for a stream, with the same rules: a gRPC PushPages call, or (when the
destination offers it: capability "bulk-socket", PrepareReply.bulk_port/bulk_token) a plain
socket per stream carrying the same PageBatch and BatchAck messages length-prefixed, with
mutual TLS unless the migration is insecure (`BulkEndpoint`, dest_agent/bulk_receiver.py).
gRPC-Python costs about twice the CPU per byte of a socket on the 2-core boxes this runs on
(bench/README.md, bench.stream), which is why the bulk plane exists; gRPC stays the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from common import rpc
from common.page_wire import FRAME_HEADER, HELLO_MAGIC, WireBatch
from p2v.v1 import destination_pb2, destination_pb2_grpc

log = logging.getLogger(__name__)

# One set of channel options for every agent-to-agent channel (keepalive, short reconnect backoff).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [o for o in rpc.CHANNEL_OPTIONS if "message_length" not in o[0]]

# Status codes after which retrying cannot help: the destination refuses us.
FATAL_CODES = frozenset({
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
})


class TransportError(RuntimeError):
    pass


class BatchRejected(TransportError):
    def __init__(self, ack: destination_pb2.BatchAck) -> None:
        super().__init__(f"destination rejected batch {ack.batch_id} (stream {ack.stream_id} seq {ack.seq}): "
                         f"{ack.error}")
        self.ack = ack


class _StreamBroken(Exception):
    """This call is unusable; reconnect and resend the window."""


@dataclass
class BulkEndpoint:
    """Where and how to open the bulk sockets: the destination's host, PrepareReply.bulk_port and
    .bulk_token; `ssl` = a client context (common.page_wire.client_ssl_context) or None when the
    migration is insecure; `server_hostname` = the name the destination's certificate must carry."""

    host: str
    port: int
    token: bytes
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None
    connect_timeout_s: float = 10.0


class _BulkCall:
    """One stream on a bulk socket, with the subset of a grpc.aio stream-stream call that
    PageTransport uses (write, read -> ack or grpc.aio.EOF, done_writing, cancel)."""

    def __init__(self, endpoint: BulkEndpoint) -> None:
        self.endpoint = endpoint
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        ep = self.endpoint
        try:
            self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(
                ep.host, ep.port, ssl=ep.ssl, server_hostname=ep.server_hostname if ep.ssl else None,
                limit=1 << 20), ep.connect_timeout_s)
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(f"bulk socket {ep.host}:{ep.port}: destination certificate refused: {exc}") \
                from None
        except (TimeoutError, OSError) as exc:
            raise _StreamBroken(f"bulk socket {ep.host}:{ep.port}: {exc!r}") from None
        # Room for a couple of batches in user space, so the next one is queued while the
        # kernel sends the previous (drain() waits above the high-water mark).
        self._writer.transport.set_write_buffer_limits(high=4 << 20)
        self._writer.writelines([FRAME_HEADER.pack(len(HELLO_MAGIC) + len(ep.token)), HELLO_MAGIC, ep.token])
        reply = await self.read()
        if reply is grpc.aio.EOF:
            # With TLS 1.3 a destination refusing our certificate looks like this too.
            raise _StreamBroken("bulk socket closed during the hello")
        if reply.status != destination_pb2.ACK_STATUS_OK:
            raise TransportError(f"destination refused the bulk socket: {reply.error}")

    async def write(self, msg: destination_pb2.PageBatch | WireBatch) -> None:
        assert self._writer is not None
        if isinstance(msg, WireBatch):
            head, payload, tail = msg.parts()  # the payload goes out from where it is, not copied
            size = len(head) + len(payload) + len(tail)
            self._writer.writelines([FRAME_HEADER.pack(size) + head, payload, tail])
        else:
            body = msg.SerializeToString()
            self._writer.writelines([FRAME_HEADER.pack(len(body)), body])
        await self._writer.drain()

    async def read(self) -> Any:
        assert self._reader is not None
        try:
            header = await self._reader.readexactly(FRAME_HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return grpc.aio.EOF  # closed between frames: the destination ended the stream
            raise
        (length,) = FRAME_HEADER.unpack(header)
        return destination_pb2.BatchAck.FromString(await self._reader.readexactly(length))

    async def done_writing(self) -> None:
        assert self._writer is not None
        self._writer.write(FRAME_HEADER.pack(0))  # end of stream (TLS cannot half-close)
        await self._writer.drain()

    def cancel(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()


def bulk_endpoint(reply: destination_pb2.PrepareReply, capabilities: Any, address: str, tls: Any
                  ) -> BulkEndpoint | None:
    """The bulk sockets to use for this migration, or None for PushPages: both agents must
    have negotiated "bulk-socket" and the destination must have offered a port. The host is
    the one the gRPC channel dials (`address`, host:port); mutual TLS with the agent's
    certificates unless `tls.insecure`."""
    from common.page_wire import BULK_CAPABILITY, client_ssl_context

    if BULK_CAPABILITY not in set(capabilities) or not reply.bulk_port or not reply.bulk_token:
        return None
    if address.startswith("unix:") or ":" not in address:
        return None
    host = address.rpartition(":")[0].strip("[]")
    if tls.insecure:
        return BulkEndpoint(host, reply.bulk_port, reply.bulk_token)
    return BulkEndpoint(host, reply.bulk_port, reply.bulk_token, ssl=client_ssl_context(tls),
                        server_hostname=tls.server_name)


def _for_call(call: Any, msg: Any) -> Any:
    """The generated gRPC stub serialises with PageBatch.SerializeToString, which takes only
    real messages: a WireBatch becomes one for a PushPages call."""
    if isinstance(msg, WireBatch) and not isinstance(call, _BulkCall):
        return msg.to_message()
    return msg


class TokenBucket:
    """Average rate_Bps with bursts up to burst_bytes. A request larger than the burst is let
    through as soon as the bucket is full and leaves a debt, so the long-run rate holds."""

    def __init__(self, rate_Bps: float, burst_bytes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate_Bps)
        self.burst = float(max(burst_bytes, 1))
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    def delay(self, nbytes: int) -> float:
        """Seconds to wait before nbytes may go; 0 = take them now (and they are taken)."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(float(nbytes), self.burst)
        if self.tokens >= need:
            self.tokens -= nbytes
            return 0.0
        return (need - self.tokens) / self.rate

    async def take(self, nbytes: int) -> None:
        for _ in range(10_000):  # bounded; each wait is exactly what the bucket lacks
            wait = self.delay(nbytes)
            if wait <= 0:
                return
            await asyncio.sleep(wait)
        raise TransportError("token bucket never filled (clock not advancing?)")


@dataclass
class OutgoingBatch:
    msg: destination_pb2.PageBatch | WireBatch  # WireBatch: cheaper on bulk sockets (no payload copies)
    pages: int
    zero_pages: int
    raw_bytes: int
    wire_bytes: int = 0
    sends: int = 0
    stream_id: int = 0


@dataclass
class TransportConfig:
    streams: int = 3
    window: int = 8
    max_bandwidth_Bps: float = 0.0
    burst_bytes: int = 0  # 0 = a tenth of a second at the capped rate (at least 64 KiB)
    ack_timeout_s: float = 30.0  # no ack for this long while batches are outstanding: stream is dead
    resume_timeout_s: float = 120.0  # a stream that cannot make progress for this long fails the transfer
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0


@dataclass
class TransportCounters:
    batches_acked: int = 0
    duplicates: int = 0
    wire_bytes_acked: int = 0
    resent_bytes: int = 0
    resent_batches: int = 0
    stream_failures: int = 0
    failures: list[str] = field(default_factory=list)


class PageTransport:
    """Submit batches, flush to wait for their acks, close at the end."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        config: TransportConfig,
        *,
        on_ack: Callable[[OutgoingBatch, destination_pb2.BatchAck], None] | None = None,
        on_resend: Callable[[OutgoingBatch], None] | None = None,
        stub: Any = None,
        extra_channels: Any = (),
        bulk: BulkEndpoint | None = None,
    ) -> None:
        if config.streams < 1 or config.window < 1:
            raise ValueError("need at least one stream and a window of at least one batch")
        self.config = config
        self.stub = stub or destination_pb2_grpc.DestinationStub(channel)
        # Stream i uses stubs[i % len]: extra channels mean extra TCP connections (multifd-like).
        self._stubs = [self.stub, *(destination_pb2_grpc.DestinationStub(c) for c in extra_channels)]
        self.bulk = bulk  # set: every stream is a bulk socket instead of a PushPages call
        self._bulk_opened = False  # a bulk socket was opened once: failures from then on are link trouble
        self.on_ack = on_ack
        self.on_resend = on_resend
        self.counters = TransportCounters()
        burst = config.burst_bytes or max(config.max_bandwidth_Bps * 0.1, 64 << 10)
        self.bucket = TokenBucket(config.max_bandwidth_Bps, burst)
        self._queue: asyncio.Queue[OutgoingBatch | None] = asyncio.Queue(maxsize=config.streams * config.window)
        self._outstanding = 0
        # Time with at least one batch outstanding: what the link was busy for, so that
        # bandwidth = bytes / busy time is not diluted by time spent scanning.
        self._busy_since: float | None = None
        self._busy_total = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self._failed: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.last_progress = time.monotonic()

    # -- public ----------------------------------------------------------------------------

    async def start(self) -> None:
        bulk = self.bulk
        log.info("page transport", extra={
            "carrier": "bulk-socket" if bulk else "grpc", "streams": self.config.streams,
            **({"endpoint": f"{bulk.host}:{bulk.port}", "tls": bulk.ssl is not None} if bulk else {})})
        self._failed = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._stream_main(sid), name=f"push-pages-{sid}")
            for sid in range(1, self.config.streams + 1)
        ]

    def _raise_if_failed(self) -> None:
        assert self._failed is not None, "start() first"
        if self._failed.done():
            raise self._failed.exception() or TransportError("transport failed")

    async def submit(self, batch: OutgoingBatch) -> None:
        """Queue a batch; waits while every stream's window and the queue are full."""
        self._raise_if_failed()
        batch.wire_bytes = batch.msg.ByteSize()
        if self._outstanding == 0:
            self._busy_since = time.monotonic()
        self._outstanding += 1
        self._idle.clear()
        if not self._queue.full():
            self._queue.put_nowait(batch)
            return
        await self._wait_or_fail(self._queue.put(batch))

    async def flush(self) -> None:
        """Wait until every submitted batch is acknowledged."""
        self._raise_if_failed()
        if self._outstanding:
            await self._wait_or_fail(self._idle.wait())

    async def close(self) -> None:
        """Flush, then end every stream cleanly."""
        try:
            await self.flush()
        finally:
            self._closing = True
            for _ in self._tasks:
                try:
                    self._queue.put_nowait(None)
                except asyncio.QueueFull:
                    break  # a failed flush left batches queued: the streams are cancelled below
            _done, pending = await asyncio.wait(self._tasks, timeout=10) if self._tasks else (set(), set())
            for task in pending:
                task.cancel()
            for task in pending:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    async def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    @property
    def busy_s(self) -> float:
        """Seconds so far with at least one batch outstanding."""
        extra = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_total + extra

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # -- internals ---------------------------------------------------------------------------

    async def _wait_or_fail(self, aw: Any) -> None:
        assert self._failed is not None
        task = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({task, self._failed}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            self._raise_if_failed()
        task.result()

    def _fail(self, exc: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)
            self._failed.exception()  # mark retrieved: callers see it through submit/flush

    async def _stream_main(self, sid: int) -> None:
        unacked: dict[int, OutgoingBatch] = {}  # seq -> batch, in seq order
        state = {"next_seq": 1, "closing": False}
        backoff = self.config.backoff_initial_s
        stuck_since: float | None = None
        try:
            for attempt in range(1_000_000):  # bounded below by resume_timeout_s
                call: Any
                if self.bulk is not None:
                    call = _BulkCall(self.bulk)
                else:
                    call = self._stubs[(sid - 1) % len(self._stubs)].PushPages(wait_for_ready=True)
                progress = {"acks": 0}
                try:
                    if isinstance(call, _BulkCall):
                        try:
                            await call.open()
                        except _StreamBroken:
                            # Never reachable (a firewall in front of the port, say): PushPages
                            # instead, rather than retrying a socket that may never open.
                            if not self._bulk_opened and attempt >= 2 and self.bulk is not None:
                                log.warning("bulk sockets unreachable, pages go over gRPC",
                                            extra={"endpoint": f"{self.bulk.host}:{self.bulk.port}"})
                                self.bulk = None
                            raise
                        self._bulk_opened = True
                    await self._run_call(sid, call, unacked, state, progress, resend=attempt > 0)
                    return
                except _StreamBroken as exc:
                    reason = str(exc)
                except (OSError, asyncio.IncompleteReadError) as exc:  # a bulk socket broke
                    reason = f"bulk socket: {exc!r}"
                except asyncio.InvalidStateError as exc:  # grpc.aio: a write raced the call's end
                    reason = f"call ended: {exc}"
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in FATAL_CODES:
                        raise TransportError(
                            f"stream {sid}: destination refused: {exc.code().name}: {exc.details()}"
                        ) from None
                    reason = f"{exc.code().name}: {exc.details()}"
                finally:
                    call.cancel()
                self.counters.stream_failures += 1
                self.counters.failures.append(f"stream {sid}: {reason}")
                now = time.monotonic()
                if progress["acks"]:
                    stuck_since, backoff = None, self.config.backoff_initial_s
                if stuck_since is None:
                    stuck_since = now
                elif now - stuck_since > self.config.resume_timeout_s:
                    raise TransportError(
                        f"stream {sid}: no progress for {now - stuck_since:.0f} s after failures; last: {reason}"
                    )
                log.warning("page stream failed, resuming", extra={
                    "stream": sid, "reason": reason, "unacked": len(unacked), "attempt": attempt + 1})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)
            raise TransportError(f"stream {sid}: too many reconnections")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _run_call(self, sid: int, call: Any, unacked: dict[int, OutgoingBatch], state: dict,
                        progress: dict, *, resend: bool) -> None:
        space = asyncio.Event()
        space.set()
        last_ack = [time.monotonic()]
        writer_done = asyncio.Event()

        async def writer() -> None:
            for seq in sorted(unacked):  # the window of the broken call, unchanged
                batch = unacked[seq]
                await self.bucket.take(batch.wire_bytes)
                batch.sends += 1
                self.counters.resent_bytes += batch.wire_bytes
                self.counters.resent_batches += 1
                if self.on_resend is not None:
                    self.on_resend(batch)
                await call.write(_for_call(call, batch.msg))
            last_ack[0] = time.monotonic()
            while not state["closing"]:
                while len(unacked) >= self.config.window:
                    space.clear()
                    await space.wait()
                batch = await self._queue.get()
                if batch is None:
                    state["closing"] = True
                    break
                seq = state["next_seq"]
                state["next_seq"] += 1
                batch.msg.stream_id = sid
                batch.msg.seq = seq
                batch.stream_id = sid
                if not unacked:
                    last_ack[0] = time.monotonic()  # the ack clock starts with the first outstanding batch
                unacked[seq] = batch
                await self.bucket.take(batch.wire_bytes)
                batch.sends += 1
                await call.write(_for_call(call, batch.msg))
            await call.done_writing()
            writer_done.set()

        async def reader() -> None:
            while True:
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    if unacked:
                        raise _StreamBroken(f"destination ended the stream with {len(unacked)} batches unacknowledged")
                    if not writer_done.is_set():
                        raise _StreamBroken("destination ended the stream early")
                    return
                batch = unacked.get(ack.seq)
                if batch is None or batch.msg.batch_id != ack.batch_id:
                    continue  # an ack for a batch we no longer wait for
                if ack.status == destination_pb2.ACK_STATUS_REJECTED:
                    raise BatchRejected(ack)
                if ack.status not in (destination_pb2.ACK_STATUS_OK, destination_pb2.ACK_STATUS_DUPLICATE):
                    raise _StreamBroken(f"unexpected ack status {ack.status} for batch {ack.batch_id}")
                del unacked[ack.seq]
                last_ack[0] = self.last_progress = time.monotonic()
                progress["acks"] += 1
                self.counters.batches_acked += 1
                self.counters.wire_bytes_acked += batch.wire_bytes
                if ack.status == destination_pb2.ACK_STATUS_DUPLICATE:
                    self.counters.duplicates += 1
                if self.on_ack is not None:
                    self.on_ack(batch, ack)
                self._outstanding -= 1
                if self._outstanding == 0:
                    self._idle.set()
                    if self._busy_since is not None:
                        self._busy_total += time.monotonic() - self._busy_since
                        self._busy_since = None
                space.set()

        async def watchdog() -> None:
            timeout = self.config.ack_timeout_s
            while True:
                await asyncio.sleep(min(1.0, timeout / 4))
                if unacked and time.monotonic() - last_ack[0] > timeout:
                    raise _StreamBroken(f"no acknowledgement for {timeout:.1f} s with {len(unacked)} outstanding")

        writer_task = asyncio.create_task(writer())
        reader_task = asyncio.create_task(reader())
        watchdog_task = asyncio.create_task(watchdog())
        pending = {writer_task, reader_task, watchdog_task}
        try:
            # The call is over when the reader has seen the server's end; the writer and the
            # watchdog can only end it early (by failing).
            while reader_task in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raises a failure
        finally:
            for task in (writer_task, reader_task, watchdog_task):
                task.cancel()
            await asyncio.gather(writer_task, reader_task, watchdog_task, return_exceptions=True)
