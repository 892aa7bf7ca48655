"""A scripted peer of the destination agent, run inside the source test namespace.

    python tests/foundation/peer.py SCENARIO ADDRESS TLS_DIR [CERT_NAME]

Prints one JSON object with what happened (the tests assert on it).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
import numpy as np

from common import version
from common.config import TlsConfig
from common.pagecodec import encode_batch, page_hashes
from common.rpc import open_channel
from p2v.v1 import common_pb2, destination_pb2, destination_pb2_grpc

MAX_PFN = 2048


def tls_for(tls_dir: Path, name: str, ca: str = "ca.pem") -> TlsConfig:
    return TlsConfig(ca=str(tls_dir / ca), cert=str(tls_dir / f"{name}.pem"), key=str(tls_dir / f"{name}.key"),
                     server_name="p2v-dest")


def hello(protocol: int = version.PROTOCOL_VERSION, minimum: int = version.MIN_PROTOCOL_VERSION):
    return common_pb2.Hello(protocol_version=protocol, min_protocol_version=minimum,
                            capabilities=list(version.CAPABILITIES), host_id="peer-test", role="source")


def pages_for(pfns: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(len(pfns), 4096), dtype=np.uint8)
    data[::4] = 0  # every fourth page is a zero page
    return data


def err(exc: grpc.RpcError) -> dict:
    return {"code": exc.code().name, "details": exc.details()}


async def prepare(stub, migration_id: str = "") -> destination_pb2.PrepareReply:
    await stub.Negotiate(hello(), timeout=10)
    return await stub.Prepare(destination_pb2.PrepareRequest(
        source_host_id="peer-test", memory_bytes=MAX_PFN * 4096, page_size=4096, max_pfn=MAX_PFN,
        migration_id=migration_id, streams=1), timeout=10)


async def push(stub, batches: list[destination_pb2.PageBatch]) -> list[destination_pb2.BatchAck]:
    call = stub.PushPages(iter(batches))
    return [ack async for ack in call]


async def session(stub) -> dict:
    out: dict = {}
    reply = await stub.Negotiate(hello(), timeout=10)
    out["negotiated"] = {"protocol": reply.protocol_version, "caps": list(reply.capabilities),
                         "peer_identity": reply.peer_identity}
    catalog = await stub.GetCatalog(destination_pb2.CatalogRequest(), timeout=10)
    out["catalog"] = [d.name for d in catalog.devices]
    prep = await prepare(stub)
    mid = prep.migration_id
    out["prepare"] = {"id": mid, "window": prep.window, "max_batch_bytes": prep.max_batch_bytes}
    pfns = np.arange(0, 512, dtype=np.uint64)
    pages = pages_for(pfns, 1)
    batches = [encode_batch(pfns[i:i + 64], pages[i:i + 64], migration_id=mid, stream_id=0, seq=n + 1,
                            round=1, batch_id=n + 1, zstd_level=1) for n, i in enumerate(range(0, 512, 64))]
    acks = await push(stub, batches)
    out["acks"] = [destination_pb2.AckStatus.Name(a.status) for a in acks]
    out["pages_written"] = sum(a.pages_written for a in acks)
    round_ack = await stub.EndRound(destination_pb2.RoundMark(migration_id=mid, round=1,
                                                              batches=len(batches)), timeout=10)
    out["round"] = {"durable": round_ack.durable, "pages_held": round_ack.pages_held}
    held = b"".join([c.hashes async for c in stub.HeldHashes(
        destination_pb2.HeldHashesRequest(migration_id=mid, start_pfn=0, end_pfn=512))])
    held_arr = np.frombuffer(held, dtype="<u8")
    expect = page_hashes(pages)
    nonzero = ~(pages == 0).all(axis=1)
    out["hashes_match"] = bool((held_arr[nonzero] == expect[nonzero]).all())
    status = await stub.Status(common_pb2.MigrationRef(migration_id=mid), timeout=10)
    out["status"] = {"state": common_pb2.MigrationState.Name(status.state),
                     "normal": status.stats.normal, "duplicate": status.stats.duplicate}
    cancel = await stub.Cancel(common_pb2.CancelRequest(migration_id=mid, reason="test"), timeout=10)
    out["cancel"] = common_pb2.MigrationState.Name(cancel.state)
    try:
        late = await push(stub, [encode_batch(pfns[:1], pages[:1], migration_id=mid, stream_id=0, seq=1,
                                              round=2, batch_id=99, zstd_level=None)])
        out["after_cancel"] = [destination_pb2.AckStatus.Name(a.status) for a in late]
    except grpc.RpcError as exc:
        out["after_cancel"] = err(exc)
    return out


async def malformed(stub) -> dict:
    out: dict = {}
    prep = await prepare(stub)
    mid = prep.migration_id
    pfns = np.arange(0, 8, dtype=np.uint64)
    pages = pages_for(pfns, 2)
    pages[:] = np.arange(1, 9, dtype=np.uint8)[:, None]  # no zero pages
    good = encode_batch(pfns, pages, migration_id=mid, stream_id=0, seq=1, round=1, batch_id=1, zstd_level=None)
    corrupt = destination_pb2.PageBatch()
    corrupt.CopyFrom(good)
    corrupt.seq, corrupt.batch_id = 2, 2
    corrupt.payload = b"\xff" + good.payload[1:]
    out_of_range = encode_batch(np.array([MAX_PFN + 5], dtype=np.uint64), pages[:1], migration_id=mid,
                                stream_id=0, seq=3, round=1, batch_id=3, zstd_level=None)
    replay = destination_pb2.PageBatch()
    replay.CopyFrom(good)  # same seq 1 again, after seq 3
    garbage = destination_pb2.PageBatch(migration_id=mid, stream_id=0, seq=4, round=1, pfns=b"\x01\x02\x03",
                                        flags=b"\x00", batch_id=4)
    acks = await push(stub, [good, corrupt, out_of_range, replay, garbage])
    out["acks"] = [(destination_pb2.AckStatus.Name(a.status), a.error) for a in acks]
    held = b"".join([c.hashes async for c in stub.HeldHashes(
        destination_pb2.HeldHashesRequest(migration_id=mid, start_pfn=0, end_pfn=16))])
    held_arr = np.frombuffer(held, dtype="<u8")
    out["held_ok"] = bool((held_arr[:8] == page_hashes(pages)).all()) and int(held_arr[8:].sum()) == 0
    # Oversized: a message above the server's receive limit is refused by gRPC itself.
    big = destination_pb2.PageBatch(migration_id=mid, stream_id=1, seq=1, round=1, batch_id=10,
                                    payload=b"\x00" * (9 << 20))
    try:
        acks = await push(stub, [big])
        out["oversized"] = [destination_pb2.AckStatus.Name(a.status) for a in acks]
    except grpc.RpcError as exc:
        out["oversized"] = err(exc)
    # Not JSON-decodable protobuf at all: raw bytes through a generic call.
    raw = stub_channel.unary_unary("/p2v.v1.Destination/Prepare", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    try:
        await raw(b"\xff\xff\xff\xff\x0f", timeout=10)
        out["garbage_prepare"] = "accepted"
    except grpc.RpcError as exc:
        out["garbage_prepare"] = err(exc)
    status = await stub.Status(common_pb2.MigrationRef(migration_id=mid), timeout=10)
    out["alive"] = common_pb2.MigrationState.Name(status.state)
    return out


async def push_forever(stub) -> dict:
    prep = await prepare(stub, migration_id="sigterm-test")
    mid = prep.migration_id
    pfns_all = np.arange(0, MAX_PFN, dtype=np.uint64)
    pages_all = pages_for(pfns_all, 3)
    acked = 0

    def gen():
        seq = 0
        for _ in range(10_000):  # bounded; the daemon is killed long before
            for i in range(0, MAX_PFN, 128):
                seq += 1
                yield encode_batch(pfns_all[i:i + 128], pages_all[i:i + 128], migration_id=mid, stream_id=0,
                                   seq=seq, round=1, batch_id=seq, zstd_level=None)

    try:
        async for _ack in stub.PushPages(gen()):
            acked += 1
            if acked == 20:
                print("PUSHING", flush=True)
        return {"acked": acked, "ended": "stream completed"}
    except grpc.RpcError as exc:
        return {"acked": acked, "ended": err(exc)}


async def main() -> None:
    global stub_channel
    scenario, address, tls_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    name = sys.argv[4] if len(sys.argv) > 4 else "p2v-source"
    protocol = version.PROTOCOL_VERSION
    if scenario == "rogue":
        tls = tls_for(tls_dir / "rogue", name)
        tls.ca = str(tls_dir / "ca.pem")  # trusts the real server, presents a foreign certificate
    else:
        tls = tls_for(tls_dir, name)
    if scenario == "version":
        protocol = 99
    if scenario == "nocert":  # TLS that trusts the server but presents no certificate
        creds = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "ca.pem").read_bytes())
        stub_channel = grpc.aio.secure_channel(address, creds,
                                               options=[("grpc.ssl_target_name_override", "p2v-dest")])
    else:
        stub_channel = open_channel(address, tls, protocol=protocol)
    stub = destination_pb2_grpc.DestinationStub(stub_channel)
    try:
        if scenario == "session":
            result = await session(stub)
        elif scenario == "malformed":
            result = await malformed(stub)
        elif scenario == "push-forever":
            result = await push_forever(stub)
        elif scenario in ("rogue", "nocert", "version", "unknown-peer"):
            try:
                await stub.Negotiate(hello(), timeout=10)
                result = {"negotiate": "accepted"}
            except grpc.RpcError as exc:
                result = {"negotiate": err(exc)}
            if scenario == "version":
                # Right metadata, but a Hello that only speaks a future version.
                ok_channel = open_channel(address, tls)
                try:
                    await destination_pb2_grpc.DestinationStub(ok_channel).Negotiate(hello(99, 99), timeout=10)
                    result["hello"] = "accepted"
                except grpc.RpcError as exc:
                    result["hello"] = err(exc)
                finally:
                    await ok_channel.close()
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        await stub_channel.close()
    print(json.dumps(result), flush=True)


stub_channel: grpc.aio.Channel

if __name__ == "__main__":
    asyncio.run(main())
