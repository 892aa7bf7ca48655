"""The bulk data plane: PageBatch wire bytes by hand, bulk sockets beside gRPC, mutual TLS.

The hand-built wire bytes must equal protobuf's, so any protobuf client interoperates; the
bulk sockets must keep PushPages' rules (ack after durability, replay/corruption/range
refused with the store consistent, resume with resends bounded by the window).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import pytest

from common import tls as tlsmod
from common.config import TlsConfig
from common.page_wire import (
    FRAME_HEADER,
    WireError,
    client_ssl_context,
    encode_parts,
    read_batch,
    server_ssl_context,
)
from common.pagecodec import PAGE_SIZE, decode_batch, encode_batch, encode_wire_batch
from dest_agent.bulk_receiver import BulkReceiver
from p2v.v1 import destination_pb2
from source_agent.memory import FileSource, Workload
from source_agent.precopy import run_precopy
from source_agent.transport import BulkEndpoint, TransportError, _BulkCall, _StreamBroken, bulk_endpoint
from tests.memory.harness import CuttableProxy, destination
from tests.memory.test_precopy_e2e import (
    BATCH,
    WINDOW,
    assert_identical,
    make_region,
    max_wire_batch,
    precopy_config,
)

MiB = 1 << 20


# -- wire bytes ---------------------------------------------------------------------------------

def _pages(n: int, zero_every: int = 0, seed: int = 0) -> np.ndarray:
    pages = np.random.default_rng(seed).integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)
    if zero_every:
        pages[::zero_every] = 0
    return pages


CASES = [
    dict(n=1, zero_every=0, zstd=None, ids=(1, 1, 1, 1)),
    dict(n=64, zero_every=3, zstd=None, ids=(3, 2**40, 7, 2**63 + 5)),
    dict(n=64, zero_every=0, zstd=1, ids=(0, 0, 0, 0)),  # proto3 defaults left out
    dict(n=16, zero_every=1, zstd=None, ids=(2, 9, 1, 12)),  # only zero pages: no payload
]


@pytest.mark.parametrize("case", CASES)
def test_hand_built_bytes_equal_protobuf(case) -> None:
    pages = _pages(case["n"], case["zero_every"])
    if case["zstd"]:
        pages[:, ::2] = 7  # compressible
    pfns = np.arange(100, 100 + case["n"], dtype=np.uint64) * 3
    stream_id, seq, round_no, batch_id = case["ids"]
    kw = dict(migration_id="mig-é" if round_no else "", stream_id=stream_id, seq=seq, round=round_no,
              batch_id=batch_id, zstd_level=case["zstd"])
    msg = encode_batch(pfns, pages, **kw)
    wire = encode_wire_batch(pfns, pages, **kw)
    expected = msg.SerializeToString()
    assert b"".join(bytes(p) for p in wire.parts()) == expected
    assert wire.ByteSize() == msg.ByteSize() == len(expected)
    # A protobuf reader takes the hand-built bytes; our reader takes protobuf's.
    assert destination_pb2.PageBatch.FromString(b"".join(bytes(p) for p in wire.parts())) == msg
    lazy = read_batch(expected)
    assert lazy.to_message() == msg
    assert lazy.ByteSize() == len(expected)
    a = decode_batch(msg, max_pfn=1 << 20, max_raw_bytes=1 << 20)
    b = decode_batch(lazy, max_pfn=1 << 20, max_raw_bytes=1 << 20)
    assert np.array_equal(a.pfns, b.pfns) and np.array_equal(a.zero, b.zero) and bytes(a.data) == bytes(b.data)


def test_reader_takes_any_valid_encoding() -> None:
    msg = encode_batch(np.arange(4, dtype=np.uint64), _pages(4), migration_id="m", stream_id=1, seq=2, round=1,
                       batch_id=5, zstd_level=None)
    # Fields in reverse order plus unknown fields of every wire type (as a newer peer may send).
    unknown = bytes([0x60 | 0, 0x05]) + bytes([0x6A, 2, 1, 2]) + bytes([0x71]) + bytes(8) + bytes([0x7D]) + bytes(4)
    fields = [f for f in msg.ListFields()]
    reordered = b"".join(destination_pb2.PageBatch(**{fd.name: v}).SerializeToString() for fd, v in reversed(fields))
    assert read_batch(reordered + unknown).to_message() == msg
    parsed = destination_pb2.PageBatch.FromString(reordered + unknown)
    parsed.DiscardUnknownFields()  # protobuf keeps them; our reader skips them
    assert parsed == msg


@pytest.mark.parametrize("bad", [b"\x0a\x05ab", b"\x18", b"\x51\x00\x00", b"\x2a" + b"\xff" * 10,
                                 b"\x10\x02", b"\x0a\x02\xff\xfe", b"\x00\x01"])
def test_reader_refuses_malformed(bad: bytes) -> None:
    data = bad if bad != b"\x10\x02" else b"\x12\x00"  # stream_id with a length-delimited wire type
    with pytest.raises(WireError):
        read_batch(data)


def test_encode_parts_empty_payload() -> None:
    head, payload, tail = encode_parts(migration_id="", stream_id=0, seq=0, round=0, pfns=b"", flags=b"",
                                       compression=0, payload=b"", raw_size=0, checksum=0, batch_id=0)
    assert head == payload == tail == b""


# -- bulk sockets against the real service -------------------------------------------------------

async def migrate_bulk(dest, src: FileSource, config, workload: Workload | None = None, *, via: int | None = None,
                       hook=None):
    reply = await dest.prepare(src.max_pfn, streams=config.streams)
    assert reply.bulk_port and len(reply.bulk_token) == 32
    bulk = bulk_endpoint(reply, ["bulk-socket"], dest.address, TlsConfig(insecure=True))
    assert bulk is not None and bulk.ssl is None
    if via is not None:
        bulk.port = via

    async def on_status(stats, round_no, fraction):
        if hook is not None:
            await hook(round_no, fraction)

    if workload is not None:
        workload.start()
    try:
        result = await asyncio.wait_for(
            run_precopy(src, dest.channel, reply.migration_id, reply, config, on_status, bulk=bulk,
                        pause=workload.pause if workload is not None else (lambda: None)), timeout=90)
    finally:
        if workload is not None:
            workload.stop()
    return reply, result


@pytest.mark.parametrize("compress", [1, None])
async def test_bulk_precopy_identical_with_workload(tmp_path, compress) -> None:
    src = make_region(tmp_path, 16 * MiB, seed=5)
    workload = Workload(src.array, 8 * MiB, pattern="hotset", hot_fraction=0.05, seed=1, tick_s=0.002)
    async with destination(tmp_path / "dest", max_batch_bytes=BATCH, window=WINDOW) as dest:
        reply, result = await migrate_bulk(dest, src, precopy_config(zstd_level=compress), workload)
        assert result.outcome == "completed" and result.rounds >= 2
        assert dest.service._bulk.accepted >= 3  # one socket per stream (no fallback to PushPages)
        assert_identical(dest, reply.migration_id, src)
        record = dest.service.migrations[reply.migration_id]
        assert record.counters.rejected == 0 and record.counters.batches > 0
        assert result.stats.resent_bytes == 0
    src.close()


async def test_bulk_connection_cut_resumes(tmp_path) -> None:
    src = make_region(tmp_path, 16 * MiB, fill="random")
    workload = Workload(src.array, 4 * MiB, seed=3, tick_s=0.002)
    async with destination(tmp_path / "dest", max_batch_bytes=BATCH, window=WINDOW) as dest:
        proxy = None
        try:
            port = await dest.service._bulk_port()
            proxy = CuttableProxy("127.0.0.1", port)
            await proxy.start()

            async def hook(round_no, fraction):
                if round_no == 1 and fraction >= 0.3 and proxy.cuts == 0:
                    proxy.cut()

            reply, result = await migrate_bulk(dest, src, precopy_config(zstd_level=None, status_interval_s=0),
                                               workload, via=proxy.port, hook=hook)
            assert proxy.cuts == 1
            assert result.stream_failures >= 1
            assert 0 < result.resent_bytes <= result.stream_failures * WINDOW * max_wire_batch()
            assert_identical(dest, reply.migration_id, src)
        finally:
            if proxy is not None:
                await proxy.close()
    src.close()


async def test_unreachable_bulk_port_falls_back_to_grpc(tmp_path, caplog) -> None:
    src = make_region(tmp_path, 4 * MiB, seed=9)
    async with destination(tmp_path / "dest", max_batch_bytes=BATCH, window=WINDOW) as dest:
        closed = CuttableProxy("127.0.0.1", 1)  # bind and release a port nobody listens on
        await closed.start()
        port = closed.port
        await closed.close()
        reply, result = await migrate_bulk(dest, src, precopy_config(), via=port)
        assert dest.service._bulk.accepted == 0 and result.stream_failures >= 2
        assert "bulk sockets unreachable, pages go over gRPC" in caplog.text
        assert dest.service.migrations[reply.migration_id].counters.batches > 0
        assert_identical(dest, reply.migration_id, src)
    src.close()


async def _open(dest, reply, token: bytes | None = None) -> _BulkCall:
    call = _BulkCall(BulkEndpoint("127.0.0.1", reply.bulk_port, reply.bulk_token if token is None else token))
    await call.open()
    return call


async def test_bulk_rejects_corrupt_replayed_out_of_range(tmp_path) -> None:
    max_pfn = 256
    async with destination(tmp_path / "dest") as dest:
        reply = await dest.prepare(max_pfn)
        mid = reply.migration_id
        store = dest.service.migrations[mid].store
        pages = _pages(8, seed=4)
        pfns = np.arange(8, dtype=np.uint64)
        call = await _open(dest, reply)
        try:
            good = encode_wire_batch(pfns, pages, migration_id=mid, stream_id=1, seq=1, round=1, batch_id=1,
                                     zstd_level=None)
            await call.write(good)
            ack = await call.read()
            assert ack.status == destination_pb2.ACK_STATUS_OK and ack.pages_written == 8
            digest_before = bytes(store.read(0, max_pfn))

            corrupt = encode_wire_batch(pfns + 8, pages, migration_id=mid, stream_id=1, seq=2, round=1, batch_id=2,
                                        zstd_level=None)
            corrupt.checksum ^= 1
            await call.write(corrupt)
            assert (await call.read()).status == destination_pb2.ACK_STATUS_REJECTED

            replay = encode_wire_batch(pfns + 16, pages, migration_id=mid, stream_id=1, seq=1, round=1,
                                       batch_id=3, zstd_level=None)
            await call.write(replay)
            ack = await call.read()
            assert ack.status == destination_pb2.ACK_STATUS_REJECTED and "replayed" in ack.error

            far = encode_wire_batch(np.array([max_pfn + 3], dtype=np.uint64), pages[:1], migration_id=mid,
                                    stream_id=1, seq=4, round=1, batch_id=4, zstd_level=None)
            await call.write(far)
            ack = await call.read()
            assert ack.status == destination_pb2.ACK_STATUS_REJECTED and "pfn-range" in ack.error

            foreign = encode_wire_batch(pfns, pages, migration_id="someone-else", stream_id=1, seq=5, round=1,
                                        batch_id=5, zstd_level=None)
            await call.write(foreign)
            assert (await call.read()).status == destination_pb2.ACK_STATUS_REJECTED

            # A normal protobuf-built message is accepted on the same socket.
            msg = encode_batch(pfns + 32, pages, migration_id=mid, stream_id=1, seq=6, round=1, batch_id=6,
                               zstd_level=None)
            await call.write(msg)
            assert (await call.read()).status == destination_pb2.ACK_STATUS_OK
            await call.done_writing()
            assert await call.read() is not None  # the destination closes after the last ack
        finally:
            call.cancel()
        assert bytes(store.read(0, 32)) == digest_before[:32 * PAGE_SIZE]
        assert bytes(store.read(8, 24)) == bytes(24 * PAGE_SIZE)  # nothing of the refused batches
        assert bytes(store.read(32, 8)) == pages.tobytes()
        assert store.verify() == 0
        record = dest.service.migrations[mid]
        assert record.counters.rejected == 3  # corrupt, replay, range (foreign: refused before intake)

        # A resend of an acknowledged batch on a new socket (after a lost ack) is a DUPLICATE.
        call = await _open(dest, reply)
        try:
            await call.write(good)
            assert (await call.read()).status == destination_pb2.ACK_STATUS_DUPLICATE
        finally:
            call.cancel()


async def test_bulk_refuses_unknown_token(tmp_path) -> None:
    async with destination(tmp_path / "dest") as dest:
        reply = await dest.prepare(64)
        with pytest.raises(TransportError, match="unknown or expired bulk token"):
            await _open(dest, reply, token=b"x" * 32)


def test_bulk_endpoint_needs_capability_and_offer() -> None:
    reply = destination_pb2.PrepareReply(bulk_port=7000, bulk_token=b"t" * 32)
    insecure = TlsConfig(insecure=True)
    assert bulk_endpoint(reply, ["zstd"], "10.0.0.2:7470", insecure) is None
    assert bulk_endpoint(destination_pb2.PrepareReply(), ["bulk-socket"], "10.0.0.2:7470", insecure) is None
    assert bulk_endpoint(reply, ["bulk-socket"], "unix:/run/x.sock", insecure) is None
    ep = bulk_endpoint(reply, ["bulk-socket"], "[fd00::2]:7470", insecure)
    assert ep is not None and (ep.host, ep.port, ep.ssl) == ("fd00::2", 7000, None)


# -- mutual TLS ----------------------------------------------------------------------------------

def _tls(tmp: Path, name: str, server_name: str, ca_dir: Path | None = None) -> TlsConfig:
    ca_dir = ca_dir or tmp
    cert, key = tlsmod.issue_cert(ca_dir, name)
    return TlsConfig(ca=str(ca_dir / "ca.pem"), cert=str(cert), key=str(key), server_name=server_name)


@contextlib.asynccontextmanager
async def tls_receiver(tmp_path: Path, allowed: list[str]):
    server_tls = _tls(tmp_path / "pki", "p2v-dest", "p2v-source")
    applied: list[int] = []

    def apply(group, last_seq):
        out = []
        for batch in group:
            decoded = decode_batch(batch, max_pfn=1 << 20, max_raw_bytes=1 << 20)
            applied.append(len(decoded.pfns))
            out.append(destination_pb2.BatchAck(stream_id=batch.stream_id, seq=batch.seq, batch_id=batch.batch_id,
                                                status=destination_pb2.ACK_STATUS_OK))
        return out

    receiver = BulkReceiver(apply, lambda token: "m" if token == b"k" * 32 else None,
                            ssl=server_ssl_context(server_tls), allowed_peers=allowed)
    port = await receiver.start("127.0.0.1")
    try:
        yield port, applied
    finally:
        await receiver.close()


async def _push_one(port: int, client_tls: TlsConfig) -> destination_pb2.BatchAck:
    ep = BulkEndpoint("127.0.0.1", port, b"k" * 32, ssl=client_ssl_context(client_tls),
                      server_hostname=client_tls.server_name, connect_timeout_s=5)
    call = _BulkCall(ep)
    try:
        await call.open()
        await call.write(encode_wire_batch(np.arange(2, dtype=np.uint64), _pages(2), migration_id="m", stream_id=1,
                                           seq=1, round=1, batch_id=1, zstd_level=None))
        return await call.read()
    finally:
        call.cancel()


async def test_bulk_mtls_accepts_our_certificate(tmp_path) -> None:
    async with tls_receiver(tmp_path, ["p2v-source"]) as (port, applied):
        client = _tls(tmp_path / "pki", "p2v-source", "p2v-dest")
        ack = await _push_one(port, client)
        assert ack.status == destination_pb2.ACK_STATUS_OK and applied == [2]


async def test_bulk_mtls_refuses_foreign_certificate(tmp_path) -> None:
    async with tls_receiver(tmp_path, ["p2v-source"]) as (port, applied):
        # Signed by another CA: the destination's handshake refuses it (TLS 1.3: the client
        # sees the socket closed; the transport would retry like on a handshake failure in gRPC).
        foreign = _tls(tmp_path / "other-pki", "p2v-source", "p2v-dest")
        foreign.ca = str(tmp_path / "pki" / "ca.pem")  # the client itself trusts the real destination
        with pytest.raises((_StreamBroken, OSError, asyncio.IncompleteReadError)):
            await _push_one(port, foreign)
        # Our CA, but a name the destination does not allow: refused at the hello.
        stranger = _tls(tmp_path / "pki", "p2vctl", "p2v-dest")
        with pytest.raises(TransportError, match="not an allowed p2v agent"):
            await _push_one(port, stranger)
        # A destination whose certificate our CA did not sign: the source refuses it.
        imposter_ca = _tls(tmp_path / "other-pki", "p2v-source", "p2v-dest")
        with pytest.raises(TransportError, match="certificate refused"):
            await _push_one(port, imposter_ca)
        assert applied == []


async def test_frame_too_large_closes(tmp_path) -> None:
    receiver = BulkReceiver(lambda g, s: [], lambda token: "m", max_frame_bytes=1024)
    port = await receiver.start("127.0.0.1")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(FRAME_HEADER.pack(1 << 30))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await receiver.close()
