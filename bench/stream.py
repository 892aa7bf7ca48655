"""Page-stream throughput: PageTransport (N PushPages streams) vs raw asyncio TCP, same link, same run.

    python -m bench.stream [--total-mib 1024] [--streams 4] [--batch-kib 1024] [--repeat 3]

With root the sender and receiver run in two network namespaces joined by a veth pair;
without, both use loopback. The receiver verifies every batch (decode_batch: sizes, PFN
range, xxh3 checksum) and acknowledges it; it does not store pages (that is the page store's
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
import time

import numpy as np

from bench.common import env, last_json, netns_pair, python_cmd, run_async
from common.pagecodec import PAGE_SIZE, decode_batch, encode_batch

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


# -- receiver -----------------------------------------------------------------------------------

async def receiver(host: str, port: int) -> None:
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
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    raw_server.close()
    await server.stop(None)


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
                      connections: int = 1) -> float:
    import grpc

    from source_agent.transport import CHANNEL_OPTIONS, OutgoingBatch, PageTransport, TransportConfig

    pages = batch_bytes // PAGE_SIZE
    data = np.random.default_rng(2).integers(0, 256, size=batch_bytes, dtype=np.uint8)
    templates = [
        encode_batch(np.arange(i * pages, (i + 1) * pages, dtype=np.uint64), data, migration_id="bench",
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
    transport = PageTransport(channel, TransportConfig(streams=streams, window=window), extra_channels=channels[1:])
    await transport.start()
    start = time.perf_counter()
    wire = 0
    for i in range(count):
        msg = type(templates[0])()
        msg.CopyFrom(templates[i % len(templates)])
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
    await page_stream(host, port, 64 << 20, args.streams, args.batch_kib << 10, args.window, args.connections)
    for _ in range(args.repeat):  # interleaved, so both see the same machine state
        raws.append(await raw_tcp(host, port, total))
        streams.append(await page_stream(host, port, total, args.streams, args.batch_kib << 10, args.window,
                                         args.connections))
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
    parser.add_argument("--connections", type=int, default=1, help="TCP connections the streams spread over")
    args = parser.parse_args()
    if args.role == "receiver":
        run_async(receiver(args.host, args.port))
        return
    if args.role == "sender":
        print(json.dumps(run_async(sender(args.host, args.port, args))))
        return

    passthrough = ["--total-mib", str(args.total_mib), "--streams", str(args.streams), "--batch-kib",
                   str(args.batch_kib), "--window", str(args.window), "--repeat", str(args.repeat),
                   "--connections", str(args.connections)]
    with netns_pair("bst") as pair:
        left, right, _, right_ip = pair if pair else (None, None, None, "127.0.0.1")
        where = f"veth between network namespaces {left} -> {right}" if pair else "loopback (no root)"
        print(f"bench.stream: {where}; {args.total_mib} MiB x {args.repeat}, {args.streams} streams, "
              f"{args.batch_kib} KiB batches, window {args.window}", flush=True)
        recv = subprocess.Popen(python_cmd("bench.stream", "--role", "receiver", "--host", right_ip, "--port",
                                           str(args.port), netns=right),
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
    raw = float(np.median(runs["raw_runs"]))
    stream = float(np.median(runs["stream_runs"]))
    print(f"raw TCP runs (MB/s): {[round(x) for x in runs['raw_runs']]}")
    print(f"page stream runs (MB/s): {[round(x) for x in runs['stream_runs']]}")
    print(json.dumps({"stream_MBps": round(stream, 1), "raw_tcp_MBps": round(raw, 1),
                      "ratio": round(stream / raw, 3)}))


if __name__ == "__main__":
    main()
