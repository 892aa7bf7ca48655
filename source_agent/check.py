"""Lifecycle step 2, check: the pre-flight verdict. Reads only; changes nothing on P or V."""

from __future__ import annotations

from common.config import SourceConfig
from common.planning import plan
from common.rpc import open_channel
from p2v.v1 import source_pb2

from . import prepare


async def run_check(config: SourceConfig, destination: str, host_id: str,
                    inventory: source_pb2.Inventory) -> source_pb2.CheckVerdict:
    channel = open_channel(destination, config.tls)
    try:
        try:
            session = await prepare.open_session(channel, destination, host_id)
        except prepare.PeerError as exc:
            return source_pb2.CheckVerdict(
                ok=False, reasons=[source_pb2.Reason(code="destination", message=str(exc), blocking=True)])
        return plan(inventory, session.catalog).to_verdict()
    finally:
        await channel.close()
