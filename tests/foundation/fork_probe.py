"""Spawn N short children (asyncio subprocesses, as the agents do) while gRPC calls run in the same
process; print how many children did not exit cleanly. `python -m tests.foundation.fork_probe N`.
Imports the project first, as the agents' entry points do."""

from __future__ import annotations

import asyncio
import sys

import common  # noqa: F401 - before grpc, as in the agents' packages: grpc reads its settings on import

# isort: split
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.rpc import run


async def probe(children: int) -> int:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stopping = False
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def load() -> None:
            while not stopping:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

        callers = [asyncio.create_task(load()) for _ in range(8)]
        failed = 0
        for _ in range(children):
            child = await asyncio.create_subprocess_exec("true")
            if await child.wait() != 0:
                failed += 1
        stopping = True
        await asyncio.gather(*callers)
    await server.stop(0)
    return failed


def main() -> int:
    children = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    failed = run(probe(children))
    print(f"failed {failed} of {children}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
