"""Convergence: pre-copy of a region with a 2 % hot set rewritten continuously; idle and
incompressible regions for the wire cost.

    python -m bench.converge [--size-mib 4096] [--incompressible-mib 1024] [--hot-rate-mbps 400]

The destination is the real p2v-dest daemon (subprocess, loopback, state in /dev/shm); the
source region is a /dev/shm file and pre-copy runs in this process with a workload thread.
  hotset:         text-like pages (30 % zero), 2 % of the pages rewritten at --hot-rate-mbps
                  during the rounds; the final round runs with the workload paused. Policy:
                  300 ms downtime limit, raised on each stalled round (to 2 s), then force.
  idle:           97 % zero pages, 3 % text-like, nothing running (a freshly booted machine).
  incompressible: random pages, nothing running; printed per round.
Last line: {"rounds", "final_delta_bytes", "wire_ratio_hotset", "wire_ratio_idle"}
(rounds and final_delta_bytes of the hot-set run; final delta = bytes of the pages the final,
paused round had to send, before compression).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import REPO, env, run_async
from common.convergence import linear_downtime_schedule
from common.pagecodec import PAGE_SIZE
from p2v.v1 import common_pb2, destination_pb2, destination_pb2_grpc
from source_agent.memory import FileSource, Workload, fill_region
from source_agent.precopy import PrecopyConfig, run_precopy
from source_agent.transport import CHANNEL_OPTIONS

MiB = 1 << 20
PORT = 7481


class Dest:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.address = f"127.0.0.1:{port}"
        cfg = workdir / "dest.toml"
        cfg.write_text(f"""
[agent]
listen = "{self.address}"
state_dir = "{workdir / 'state'}"
log_level = "warning"
[tls]
insecure = true
[limits]
max_batch_bytes = 1048576
window = 8
""")
        self.ready = workdir / "ready"
        self.log = open(workdir / "dest.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "dest_agent.main", "--config", str(cfg),
                                      "--ready-file", str(self.ready)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env(), cwd=REPO)
        deadline = time.monotonic() + 30
        while not (self.ready.exists() and self.ready.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"destination did not start: {(workdir / 'dest.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def precopy(address: str, src: FileSource, workload: Workload | None, label: str) -> dict:
    channel = grpc.aio.insecure_channel(address, options=[*CHANNEL_OPTIONS,
                                                          ("grpc.max_send_message_length", 8 << 20)])
    stub = destination_pb2_grpc.DestinationStub(channel)
    reply = await stub.Prepare(destination_pb2.PrepareRequest(
        source_host_id=f"bench-{label}", memory_bytes=src.max_pfn * PAGE_SIZE, page_size=PAGE_SIZE,
        max_pfn=src.max_pfn, streams=3), wait_for_ready=True, timeout=60)
    # vdsm/nova-style: each stalled round raises the allowed downtime, then force.
    schedule = linear_downtime_schedule(300, 2000, 3, then="force")
    config = PrecopyConfig(streams=3, window=reply.window, max_batch_bytes=reply.max_batch_bytes,
                           zstd_level=1, max_rounds=10, on_max_rounds="force", schedule=schedule)
    if workload is not None:
        workload.start()
    try:
        result = await run_precopy(src, channel, reply.migration_id, reply, config,
                                   pause=workload.pause if workload else (lambda: None))
    finally:
        if workload is not None:
            workload.stop()
    await stub.Cancel(common_pb2.CancelRequest(migration_id=reply.migration_id,
                                                                 reason="benchmark done"), timeout=30)
    await channel.close()
    size = src.max_pfn * PAGE_SIZE
    rounds = [
        {"round": r.round, "pages": r.dirty_pages, "wire_MiB": round(r.wire_bytes / MiB, 2),
         "wire_ratio": round(r.wire_bytes / size, 4), "seconds": round(r.duration_s, 2)}
        for r in result.history
    ]
    final = result.history[-1]
    return {
        "label": label,
        "rounds": result.rounds,
        "precopy_rounds": result.rounds - 1,
        "final_delta_bytes": final.dirty_pages * PAGE_SIZE,
        "final_wire_bytes": final.wire_bytes,
        "wire_ratio": result.stats.transferred / size,
        "decision": result.decision.reason,
        "per_round": rounds,
        "expected_downtime_ms": round(result.decision.expected_downtime_ms),
        "bandwidth_MBps": round(result.decision.bandwidth_Bps / 1e6, 1),
        "total_s": round(result.stats.total_time_ms / 1000, 1),
        "downtime_ms": result.stats.downtime_ms,
    }


def region(directory: str, name: str, size: int) -> tuple[FileSource, str]:
    path = os.path.join(directory, f"p2v-bench-{name}-{os.getpid()}")
    return FileSource.create(path, size), path


async def run_all(args: argparse.Namespace, address: str, directory: str) -> list[dict]:
    out = []
    size = args.size_mib * MiB
    src, path = region(directory, "hot", size)
    try:
        fill_region(src.array, "text", seed=1, zero_fraction=0.3)
        workload = Workload(src.array, args.hot_rate_mbps * MiB, pattern="hotset", hot_fraction=0.02, seed=2)
        out.append(await precopy(address, src, workload, "hotset"))
    finally:
        src.close()
        os.unlink(path)
    src, path = region(directory, "idle", size)
    try:
        # a freshly booted machine: mostly never-touched (zero) pages
        pages = src.array.reshape(-1, PAGE_SIZE)
        used = pages[: max(1, pages.shape[0] * 3 // 100)]
        fill_region(used.reshape(-1), "text", seed=3)
        out.append(await precopy(address, src, None, "idle"))
    finally:
        src.close()
        os.unlink(path)
    src, path = region(directory, "random", args.incompressible_mib * MiB)
    try:
        fill_region(src.array, "random", seed=4)
        out.append(await precopy(address, src, None, "incompressible"))
    finally:
        src.close()
        os.unlink(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=4096)
    parser.add_argument("--incompressible-mib", type=int, default=1024)
    parser.add_argument("--hot-rate-mbps", type=int, default=400, help="MiB/s the hot set is rewritten at")
    parser.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args()
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    workdir = Path(tempfile.mkdtemp(prefix="p2v-bench-dest-", dir=directory))
    dest = Dest(workdir, args.port)
    try:
        results = run_async(run_all(args, dest.address, directory))
    finally:
        dest.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for r in results:
        print(json.dumps(r))
    hot, idle = results[0], results[1]
    print(json.dumps({"rounds": hot["rounds"], "final_delta_bytes": hot["final_delta_bytes"],
                      "wire_ratio_hotset": round(hot["wire_ratio"], 4),
                      "wire_ratio_idle": round(idle["wire_ratio"], 4)}))


if __name__ == "__main__":
    main()
