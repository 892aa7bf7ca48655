"""In-process destination (the real DestinationService on loopback) and helpers for e2e tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import xxhash

from common.config import DestConfig
from common.pagecodec import PAGE_SIZE
from dest_agent.service import DestinationService
from p2v.v1 import destination_pb2, destination_pb2_grpc
from source_agent.transport import CHANNEL_OPTIONS

MESSAGE_LIMIT = 8 << 20


@dataclass
class Destination:
    service: DestinationService
    server: grpc.aio.Server
    address: str
    channel: grpc.aio.Channel
    stub: destination_pb2_grpc.DestinationStub

    async def prepare(self, max_pfn: int, streams: int = 3) -> destination_pb2.PrepareReply:
        return await self.stub.Prepare(destination_pb2.PrepareRequest(
            source_host_id="test-source", memory_bytes=max_pfn * PAGE_SIZE, page_size=PAGE_SIZE,
            max_pfn=max_pfn, streams=streams))

    def image_digest(self, migration_id: str) -> str:
        store = self.service.migrations[migration_id].store
        return digest_pages(store.read, store.max_pfn)


def digest_pages(read, max_pfn: int, chunk: int = 4096) -> str:
    h = xxhash.xxh3_128()
    for pfn in range(0, max_pfn, chunk):
        h.update(read(pfn, min(chunk, max_pfn - pfn)))
    return h.hexdigest()


def digest_array(region: np.ndarray) -> str:
    return xxhash.xxh3_128(memoryview(region)).hexdigest()


def dest_config(state_dir: Path, *, max_batch_bytes: int = 256 << 10, window: int = 4) -> DestConfig:
    config = DestConfig()
    config.agent.state_dir = str(state_dir)
    config.tls.insecure = True
    config.agent.listen = "127.0.0.1:0"  # the bulk data plane listens on this host (ephemeral port)
    config.limits.max_batch_bytes = max_batch_bytes
    config.limits.window = window
    return config


@contextlib.asynccontextmanager
async def destination(state_dir: Path, *, service_cls: type[DestinationService] = DestinationService,
                      channel_target: str | None = None, **limits) -> AsyncIterator[Destination]:
    service = service_cls(dest_config(state_dir, **limits), "test-dest")
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MESSAGE_LIMIT),
                                      ("grpc.max_send_message_length", MESSAGE_LIMIT)])
    destination_pb2_grpc.add_DestinationServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(channel_target or address, options=[
        *CHANNEL_OPTIONS, ("grpc.max_send_message_length", MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", MESSAGE_LIMIT)])
    try:
        yield Destination(service, server, address, channel, destination_pb2_grpc.DestinationStub(channel))
    finally:
        await channel.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(service.shutdown(), 10)
        await server.stop(None)


class CuttableProxy:
    """A loopback TCP proxy whose connections can all be cut at once (a whole-connection drop)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.cuts = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self.writers |= {client_writer, server_writer}
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))
        self.writers -= {client_writer, server_writer}

    def cut(self) -> None:
        """Reset every connection through the proxy; new connections are accepted again."""
        self.cuts += 1
        for writer in list(self.writers):
            transport = writer.transport
            transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
