"""Lifecycle step 2, check: the pre-flight verdict. Reads only; changes nothing on P or V."""

from __future__ import annotations

import grpc

from common.config import SourceConfig
from common.planning import plan
from common.preflight import check_carrier, installed_ram_bytes, merge_into_verdict
from common.rpc import open_channel
from p2v.v1 import destination_pb2, source_pb2

from . import prepare


async def run_check(config: SourceConfig, destination: str, host_id: str,
                    inventory: source_pb2.Inventory) -> source_pb2.CheckVerdict:
    channel = open_channel(destination, config.tls)
    try:
        try:
            session = await prepare.open_session(channel, destination, host_id)
            # the catalog again, now with P's memory size: V predicts its VM's firmware map for it
            catalog = await session.stub.GetCatalog(
                destination_pb2.CatalogRequest(
                    memory_bytes=installed_ram_bytes(inventory.firmware_memmap) or inventory.memory_bytes),
                timeout=15)
        except prepare.PeerError as exc:
            return source_pb2.CheckVerdict(
                ok=False, reasons=[source_pb2.Reason(code="destination", message=str(exc), blocking=True)])
        except grpc.RpcError as exc:
            return source_pb2.CheckVerdict(ok=False, reasons=[source_pb2.Reason(
                code="destination", message=prepare.describe_rpc_error(exc, destination), blocking=True)])
        verdict = plan(inventory, catalog).to_verdict()
        return merge_into_verdict(verdict, check_carrier(inventory, catalog))
    finally:
        await channel.close()
