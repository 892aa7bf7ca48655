"""The bulk data plane's listener: page batches on plain (mutual-TLS) sockets beside gRPC.

gRPC-Python costs ~2x the CPU of a plain socket per byte here (HTTP/2 framing, copies into
and out of its byte buffers and protobuf messages), and sender and receiver share 2 cores;
see bench/README.md. The same batches on a socket reach the link's speed.

Protocol (common.page_wire): frames of a 4-byte little-endian length and one message. The
source opens with HELLO_MAGIC + the token from PrepareReply.bulk_token; we answer one
BatchAck (seq 0) saying OK or REJECTED. Then the source sends PageBatch frames and we answer
BatchAck frames, exactly as on a PushPages stream: the `apply` callable is the service's
PushPages intake (DestinationService._apply_group), so admission, replay detection, write,
group fdatasync and "ack only when durable" are the same code. One connection = one
PushPages call (its own per-stream seq bookkeeping). A zero-length frame ends the stream.

Frames are read straight into a buffer of their size (BufferedProtocol) and parsed in place
(common.page_wire.read_batch): the payload is not copied between the kernel and the page store.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Any

from common.page_wire import FRAME_HEADER, HELLO_MAGIC, WireError, cert_identities, read_batch
from p2v.v1 import destination_pb2

log = logging.getLogger(__name__)

ACK_GROUP_MAX = 16  # batches made durable by one fdatasync (as PushPages)
_SIZE_CLASS = 256 << 10
_END = object()
_LOST = object()

# apply(group, last_seq) -> acks, run in a worker thread; `authorize(token)` -> migration id or None.
ApplyFn = Callable[[list[Any], dict], list[destination_pb2.BatchAck]]
AuthorizeFn = Callable[[bytes], str | None]


def ack_frame(ack: destination_pb2.BatchAck) -> bytes:
    body = ack.SerializeToString()
    return FRAME_HEADER.pack(len(body)) + body


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, owner: BulkReceiver) -> None:
        self.owner = owner
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: Any = None
        self._header = bytearray(FRAME_HEADER.size)
        self._buf = self._header
        self._filled = 0
        self._length = 0
        # Frame buffers by size class, reused once their batches are applied: a fresh 1 MiB
        # bytearray per frame costs a memset and page faults (~10 % of the receiver's CPU).
        self._pool: dict[int, list[bytearray]] = {}
        self._paused = False
        self._task: asyncio.Task[None] | None = None

    # -- asyncio.BufferedProtocol ------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        self.transport = transport
        self.owner._connections.add(self)
        self._task = asyncio.create_task(self._serve(), name="bulk-intake")

    def get_buffer(self, sizehint: int) -> memoryview:
        end = len(self._header) if self._buf is self._header else self._length
        return memoryview(self._buf)[self._filled:end]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._buf is self._header:
            if self._filled < len(self._header):
                return
            (length,) = FRAME_HEADER.unpack(self._header)
            self._filled = 0
            if length == 0:
                self.queue.put_nowait(_END)
                return
            if length > self.owner.max_frame_bytes:
                log.warning("bulk frame too large, closing", extra={"bytes": length})
                self._close()
                return
            self._buf, self._length = self._take(length), length
            return
        if self._filled < self._length:
            return
        self.queue.put_nowait((self._buf, self._length))
        self._buf, self._filled = self._header, 0
        # The source's window bounds what is in flight; this only guards against a misbehaving peer.
        if self.queue.qsize() >= self.owner.max_queued and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.queue.put_nowait(_LOST)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(_LOST)
        self.owner._connections.discard(self)

    def _take(self, length: int) -> bytearray:
        size = -(-length // _SIZE_CLASS) * _SIZE_CLASS
        free = self._pool.get(size)
        return free.pop() if free else bytearray(size)

    def _recycle(self, buf: bytearray) -> None:
        free = self._pool.setdefault(len(buf), [])
        if len(free) < self.owner.max_queued:
            free.append(buf)

    # -- intake ------------------------------------------------------------------------------
    async def _get(self) -> Any:
        item = await self.queue.get()
        if self._paused and self.queue.qsize() < self.owner.max_queued // 2 and self.transport:
            self._paused = False
            self.transport.resume_reading()
        return item

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _send(self, ack: destination_pb2.BatchAck) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ack_frame(ack))

    async def _serve(self) -> None:
        try:
            migration_id = await self._hello()
            if migration_id is None:
                return
            await self._intake(migration_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bulk connection failed")
        finally:
            self._close()

    async def _hello(self) -> str | None:
        first = await self._get()
        if first is _END or first is _LOST:
            return None
        reason = ""
        migration_id = None
        buf, length = first
        hello = bytes(buf[:length])
        self._recycle(buf)
        if hello[:len(HELLO_MAGIC)] != HELLO_MAGIC:
            reason = "not a p2v bulk hello"
        else:
            names: list[str] = []
            if self.owner.tls:
                assert self.transport is not None
                names = cert_identities(self.transport.get_extra_info("peercert"))
                allowed = self.owner.allowed_peers
                if allowed and not any(n in allowed for n in names):
                    reason = f"peer {names} is not an allowed p2v agent"
            if not reason:
                migration_id = self.owner.authorize(hello[len(HELLO_MAGIC):])
                if migration_id is None:
                    reason = "unknown or expired bulk token"
        if migration_id is None:
            log.warning("bulk connection refused", extra={"reason": reason})
            self._send(destination_pb2.BatchAck(status=destination_pb2.ACK_STATUS_REJECTED, error=reason))
            return None
        self.owner.accepted += 1
        self._send(destination_pb2.BatchAck(status=destination_pb2.ACK_STATUS_OK))
        return migration_id

    async def _intake(self, migration_id: str) -> None:
        last_seq: dict[tuple[str, int], int] = {}
        for _ in range(1 << 62):  # until the source ends the stream or the connection drops
            item = await self._get()
            if item is _LOST:
                return
            group = [item]
            while not self.queue.empty() and len(group) < ACK_GROUP_MAX and group[-1] not in (_END, _LOST):
                group.append(await self._get())
            tail = group.pop() if group[-1] is _END or group[-1] is _LOST else None
            batches = []
            for buf, length in group:
                try:
                    batch = read_batch(memoryview(buf)[:length])
                except WireError as exc:
                    # Not a PageBatch at all: no seq to answer to; the source sees the stream end.
                    log.warning("bulk frame is not a PageBatch, closing", extra={"error": str(exc)})
                    return
                if batch.migration_id != migration_id:
                    self._send(destination_pb2.BatchAck(
                        stream_id=batch.stream_id, seq=batch.seq, batch_id=batch.batch_id,
                        status=destination_pb2.ACK_STATUS_REJECTED,
                        error=f"this connection's token is for migration {migration_id!r}"))
                    continue
                batches.append(batch)
            if batches:
                # Decode, write and fdatasync off the event loop; acks only after the sync.
                acks = await asyncio.to_thread(self.owner.apply, batches, last_seq)
                for ack in acks:
                    self._send(ack)
            # Applied (written, or refused): nothing refers to these frames any more.
            del batches
            for buf, _length in group:
                self._recycle(buf)
            if tail is _END:
                return
            if tail is _LOST:
                return


class BulkReceiver:
    """The listener. `apply` and `authorize` come from the service (or a test/bench sink)."""

    def __init__(self, apply: ApplyFn, authorize: AuthorizeFn, *, ssl: Any = None,
                 allowed_peers: list[str] | None = None, max_frame_bytes: int = 8 << 20,
                 max_queued: int = 64) -> None:
        self.apply = apply
        self.authorize = authorize
        self.tls = ssl
        self.allowed_peers = list(allowed_peers or [])
        self.max_frame_bytes = max_frame_bytes
        self.max_queued = max_queued
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self.port = 0
        self.accepted = 0  # connections past the hello (for tests and logs)

    async def start(self, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host or None, port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def started(self) -> bool:
        return self._server is not None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn._close()
            if conn._task is not None:
                conn._task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class TokenTable:
    """Bulk tokens handed out in PrepareReply: token -> migration id (constant-time compare)."""

    def __init__(self) -> None:
        self._tokens: dict[str, bytes] = {}

    def issue(self, migration_id: str) -> bytes:
        import secrets

        token = self._tokens.get(migration_id)
        if token is None:  # an idempotent Prepare retry gets the same token
            token = self._tokens[migration_id] = secrets.token_bytes(32)
        return token

    def revoke(self, migration_id: str) -> None:
        self._tokens.pop(migration_id, None)

    def lookup(self, token: bytes) -> str | None:
        for migration_id, known in self._tokens.items():
            if hmac.compare_digest(known, token):
                return migration_id
        return None
