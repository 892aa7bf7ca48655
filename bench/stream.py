"""Page-stream throughput: PageTransport (N streams) vs raw asyncio TCP, same link, same run.

    python -m bench.stream [--total-mib 1024] [--streams 4] [--batch-kib 1024] [--repeat 3]
                           [--plane bulk|grpc] [--tls] [--copy-payload] [--connections 1]

The page stream runs on the bulk data plane by default (one plain socket per stream, PageBatch
frames, dest_agent.bulk_receiver), as the agents do when both offer "bulk-socket"; --plane grpc
measures the PushPages fallback. No TLS on either side unless --tls (bulk sockets only).
With root the sender and receiver run in two network namespaces joined by a veth pair;
without, both use loopback. The receiver verifies every batch (decode_batch: sizes, PFN
range, xxh64 checksum) and acknowledges it; it does not store pages (that is the page store's
cost, not the stream's). The raw TCP baseline sends the same number of bytes, in 64 KiB
writes, to a receiver that reads and discards them. Both use uvloop when installed.
Last line: {"stream_MBps", "raw_tcp_MBps", "ratio"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import env, last_json, netns_pair, python_cmd, run_async
from common.page_wire import WireBatch
from common.pagecodec import PAGE_SIZE, decode_batch, encode_batch, encode_wire_batch

PORT = 7480
RAW_CHUNK = 64 << 10
# Larger TCP reads and HTTP/2 frames on the receiver: fewer wake-ups per MiB.
SERVER_TUNING = [
    ("grpc.experimental.tcp_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 16),
    ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
]
CLIENT_TUNING = [("grpc.http2.max_frame_size", (1 << 24) - 1)]
BULK_TOKEN = b"bench-token"


# -- receiver -----------------------------------------------------------------------------------

async def receiver(host: str, port: int, tls_dir: str = "") -> None:
    import grpc

    from p2v.v1 import destination_pb2, destination_pb2_grpc

    class Sink(destination_pb2_grpc.DestinationServicer):
        async def PushPages(self, request_iterator, context):
            async for batch in request_iterator:
                decode_batch(batch, max_pfn=1 << 40, max_raw_bytes=64 << 20)
                yield destination_pb2.BatchAck(stream_id=batch.stream_id, seq=batch.seq, batch_id=batch.batch_id,
                                               status=destination_pb2.ACK_STATUS_OK,
                                               pages_written=len(batch.pfns) // 8)

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20), *SERVER_TUNING])
    destination_pb2_grpc.add_DestinationServicer_to_server(Sink(), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()

    async def raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(8)
        remaining = int.from_bytes(header, "little")
        while remaining > 0:
            data = await reader.read(min(remaining, 1 << 20))
            if not data:
                break
            remaining -= len(data)
        writer.write(b"k")
        await writer.drain()
        writer.close()

    raw_server = await asyncio.start_server(raw, host, port + 1)

    from dest_agent.bulk_receiver import BulkReceiver

    def sink(group: list, last_seq: dict) -> list:
        acks = []
        for batch in group:
            decode_batch(batch, max_pfn=1 << 40, max_raw_bytes=64 << 20)
            acks.append(destination_pb2.BatchAck(stream_id=batch.stream_id, seq=batch.seq, batch_id=batch.batch_id,
                                                 status=destination_pb2.ACK_STATUS_OK,
                                                 pages_written=len(batch.pfns) // 8))
        return acks

    from common.page_wire import server_ssl_context

    tls = server_ssl_context(_tls_config(tls_dir, "p2v-dest")) if tls_dir else None
    bulk = BulkReceiver(sink, lambda token: "bench" if token == BULK_TOKEN else None, ssl=tls)
    await bulk.start(host, port + 2)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    raw_server.close()
    await bulk.close()
    await server.stop(None)


def _tls_config(tls_dir: str, name: str) -> Any:
    from common.config import TlsConfig

    return TlsConfig(ca=f"{tls_dir}/ca.pem", cert=f"{tls_dir}/{name}.pem", key=f"{tls_dir}/{name}.key")


def copy_batch(template: Any, copy_payload: bool) -> Any:
    """A fresh batch per send, as the pre-copy scanner hands the transport one per batch.

    A protobuf message must be copied whole (the transport sets its stream_id and seq). A
    WireBatch's payload is immutable and the transport never copies it, so it is shared
    unless copy_payload: then one 1 MiB copy per batch stands in for the scanner's copy of
    the pages out of memory (not the stream's cost, but reported in bench/README.md)."""
    if isinstance(template, WireBatch):
        batch = WireBatch()
        for name in WireBatch.__slots__:
            setattr(batch, name, getattr(template, name))
        if copy_payload:
            batch.payload = bytes(memoryview(template.payload))
        return batch
    msg = type(template)()
    msg.CopyFrom(template)
    return msg


# -- sender -------------------------------------------------------------------------------------

async def raw_tcp(host: str, port: int, total: int) -> float:
    reader, writer = await asyncio.open_connection(host, port + 1)
    chunk = np.random.default_rng(1).integers(0, 256, size=RAW_CHUNK, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    writer.write(total.to_bytes(8, "little"))
    sent = 0
    while sent < total:
        writer.write(chunk)
        sent += len(chunk)
        await writer.drain()
    await reader.readexactly(1)
    elapsed = time.perf_counter() - start
    writer.close()
    return total / elapsed / 1e6


async def page_stream(host: str, port: int, total: int, streams: int, batch_bytes: int, window: int,
                      connections: int = 1, plane: str = "bulk", copy_payload: bool = False,
                      tls_dir: str = "") -> float:
    import grpc

    from source_agent.transport import CHANNEL_OPTIONS, BulkEndpoint, OutgoingBatch, PageTransport, TransportConfig

    pages = batch_bytes // PAGE_SIZE
    data = np.random.default_rng(2).integers(0, 256, size=batch_bytes, dtype=np.uint8)
    encode = encode_wire_batch if plane == "bulk" else encode_batch
    templates = [
        encode(np.arange(i * pages, (i + 1) * pages, dtype=np.uint64), data, migration_id="bench",
               stream_id=0, seq=0, round=1, batch_id=0, zstd_level=None)
        for i in range(4)
    ]
    count = max(1, total // batch_bytes)
    channels = [
        grpc.aio.insecure_channel(f"{host}:{port}", options=[
            *CHANNEL_OPTIONS, ("grpc.max_send_message_length", 64 << 20), ("p2v.connection", i),
            *CLIENT_TUNING])
        for i in range(connections)
    ]
    for c in channels:
        await c.channel_ready()
    channel = channels[0]
    bulk = None
    if plane == "bulk":
        bulk = BulkEndpoint(host, port + 2, BULK_TOKEN)
        if tls_dir:
            from common.page_wire import client_ssl_context

            bulk.ssl, bulk.server_hostname = client_ssl_context(_tls_config(tls_dir, "p2v-source")), "p2v-dest"
    transport = PageTransport(channel, TransportConfig(streams=streams, window=window), extra_channels=channels[1:],
                              bulk=bulk)
    await transport.start()
    start = time.perf_counter()
    wire = 0
    for i in range(count):
        msg = copy_batch(templates[i % len(templates)], copy_payload)
        msg.batch_id = i + 1
        batch = OutgoingBatch(msg=msg, pages=pages, zero_pages=0, raw_bytes=batch_bytes)
        await transport.submit(batch)
        wire += batch.wire_bytes
    await transport.flush()
    elapsed = time.perf_counter() - start
    await transport.close()
    for c in channels:
        await c.close()
    return wire / elapsed / 1e6


async def sender(host: str, port: int, args: argparse.Namespace) -> dict:
    total = args.total_mib << 20
    raws, streams = [], []
    await raw_tcp(host, port, 64 << 20)  # warm-up
    await page_stream(host, port, 64 << 20, args.streams, args.batch_kib << 10, args.window, args.connections,
                      args.plane, args.copy_payload, args.tls_dir)
    for _ in range(args.repeat):  # interleaved, so both see the same machine state
        raws.append(await raw_tcp(host, port, total))
        streams.append(await page_stream(host, port, total, args.streams, args.batch_kib << 10, args.window,
                                         args.connections, args.plane, args.copy_payload,
                                         args.tls_dir))
    return {"raw_runs": raws, "stream_runs": streams}


# -- orchestration ------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["main", "receiver", "sender"], default="main")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--total-mib", type=int, default=1024)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batch-kib", type=int, default=1024)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1,
                        help="TCP connections the gRPC streams spread over")
    parser.add_argument("--plane", choices=["bulk", "grpc"], default="bulk",
                        help="page batches on bulk sockets (default) or gRPC PushPages streams")
    parser.add_argument("--tls", action="store_true",
                        help="mutual TLS 1.3 on the bulk sockets (the raw TCP baseline stays plaintext)")
    parser.add_argument("--tls-dir", default="", help=argparse.SUPPRESS)  # roles: where the certificates are
    parser.add_argument("--copy-payload", action="store_true",
                        help="copy each bulk batch's payload before sending (the scanner's copy, for reference)")
    args = parser.parse_args()
    if args.role == "receiver":
        run_async(receiver(args.host, args.port, args.tls_dir))
        return
    if args.role == "sender":
        print(json.dumps(run_async(sender(args.host, args.port, args))))
        return

    passthrough = ["--total-mib", str(args.total_mib), "--streams", str(args.streams), "--batch-kib",
                   str(args.batch_kib), "--window", str(args.window), "--repeat", str(args.repeat),
                   "--connections", str(args.connections), "--plane", args.plane,
                   *(["--copy-payload"] if args.copy_payload else [])]
    tls_tmp = tempfile.TemporaryDirectory(prefix="p2v-bench-tls-") if args.tls else None
    if tls_tmp is not None:
        from common import tls as tlsmod

        for name in ("p2v-dest", "p2v-source"):
            tlsmod.issue_cert(Path(tls_tmp.name), name)
        passthrough += ["--tls-dir", tls_tmp.name]
    with netns_pair("bst") as pair:
        left, right, _, right_ip = pair if pair else (None, None, None, "127.0.0.1")
        where = f"veth between network namespaces {left} -> {right}" if pair else "loopback (no root)"
        print(f"bench.stream: {where}; {args.plane} plane, "
              f"{'mutual TLS 1.3 on the bulk sockets' if args.tls else 'no TLS'} (raw TCP: no TLS); "
              f"{args.total_mib} MiB x {args.repeat}, "
              f"{args.streams} streams, "
              f"{args.batch_kib} KiB batches, window {args.window}", flush=True)
        recv = subprocess.Popen(python_cmd("bench.stream", "--role", "receiver", "--host", right_ip, "--port",
                                           str(args.port), *passthrough[-2:] if tls_tmp else (), netns=right),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
        try:
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != "ready":
                raise SystemExit("receiver did not start")
            out = subprocess.run(python_cmd("bench.stream", "--role", "sender", "--host", right_ip, "--port",
                                            str(args.port), *passthrough, netns=left),
                                 capture_output=True, text=True, env=env(), timeout=600)
            if out.returncode != 0:
                raise SystemExit(f"sender failed: {out.stderr[-2000:]}")
            runs = last_json(out.stdout)
        finally:
            if recv.stdin:
                recv.stdin.close()
            try:
                recv.wait(15)
            except subprocess.TimeoutExpired:
                recv.kill()
            if tls_tmp is not None:
                tls_tmp.cleanup()
    raw = float(np.median(runs["raw_runs"]))
    stream = float(np.median(runs["stream_runs"]))
    print(f"raw TCP runs (MB/s): {[round(x) for x in runs['raw_runs']]}")
    print(f"page stream runs (MB/s): {[round(x) for x in runs['stream_runs']]}")
    print(json.dumps({"stream_MBps": round(stream, 1), "raw_tcp_MBps": round(raw, 1),
                      "ratio": round(stream / raw, 3)}))


if __name__ == "__main__":
    main()
