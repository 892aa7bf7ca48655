"""Source side of the namespace test: runs inside the source namespace, prints one JSON line.

    python netns_peer.py <dest address> <workdir> <ifname> <down seconds>

Pre-copies a region with a workload running; at 30 % of round 1 it takes its own link down
for <down seconds>, then up again, and carries on.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc

from common.pagecodec import PAGE_SIZE
from p2v.v1 import destination_pb2, destination_pb2_grpc
from source_agent.memory import FileSource, Workload, fill_region
from source_agent.precopy import PrecopyConfig, run_precopy
from source_agent.transport import CHANNEL_OPTIONS
from tests.memory.harness import digest_array

MiB = 1 << 20


async def main(address: str, workdir: Path, ifname: str, down_s: float) -> dict:
    src = FileSource.create(workdir / "memory", 32 * MiB)
    fill_region(src.array, "random", seed=11, zero_fraction=0.2)
    workload = Workload(src.array, 4 * MiB, seed=12, tick_s=0.002)
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    stub = destination_pb2_grpc.DestinationStub(channel)
    reply = await stub.Prepare(destination_pb2.PrepareRequest(
        source_host_id="netns-source", memory_bytes=src.max_pfn * PAGE_SIZE, page_size=PAGE_SIZE,
        max_pfn=src.max_pfn, streams=3), wait_for_ready=True, timeout=30)
    events: list[str] = []
    restore: list[asyncio.Task] = []

    async def link(state: str) -> None:
        proc = await asyncio.create_subprocess_exec("ip", "link", "set", ifname, state)
        if await proc.wait() != 0:
            raise RuntimeError(f"ip link set {ifname} {state} failed")
        events.append(state)

    async def link_flap() -> None:
        await link("down")
        await asyncio.sleep(down_s)
        await link("up")

    async def on_status(stats, round_no, fraction):
        if round_no == 1 and fraction >= 0.3 and not restore:
            restore.append(asyncio.create_task(link_flap()))

    config = PrecopyConfig(streams=3, window=reply.window, max_batch_bytes=reply.max_batch_bytes,
                           zstd_level=None, max_rounds=6, on_max_rounds="force", chunk_pages=512,
                           max_bandwidth_bytes=40 * MiB, status_interval_s=0, ack_timeout_s=3.0,
                           resume_timeout_s=60.0)
    workload.start()
    try:
        result = await asyncio.wait_for(
            run_precopy(src, channel, reply.migration_id, reply, config, on_status, pause=workload.pause), 120)
    finally:
        workload.stop()
        for task in restore:
            await task
        if events and events[-1] != "up":
            await link("up")
    await channel.close()
    out = {
        "migration_id": reply.migration_id,
        "digest": digest_array(src.array),
        "max_pfn": src.max_pfn,
        "outcome": result.outcome,
        "rounds": result.rounds,
        "resent_bytes": result.resent_bytes,
        "stream_failures": result.stream_failures,
        "window": config.window,
        "max_batch_bytes": config.max_batch_bytes,
        "events": events,
    }
    src.close()
    return out


if __name__ == "__main__":
    address, workdir, ifname, down = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    print(json.dumps(asyncio.run(main(address, workdir, ifname, down))))
