"""Lifecycle step 1, prepare: contact V's agent, agree on a protocol, fetch the catalog, reserve."""

from __future__ import annotations

import dataclasses

import grpc

from common import version
from p2v.v1 import common_pb2, destination_pb2, destination_pb2_grpc, source_pb2


class PeerError(RuntimeError):
    """The destination refused us or cannot be reached; nothing has been changed on P."""


def describe_rpc_error(exc: grpc.RpcError, address: str) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"destination {address} unreachable: {details}"
    name = code.name if code is not None else "ERROR"
    return f"destination {address}: {name}: {details}"


@dataclasses.dataclass
class Session:
    """What a negotiated connection to the destination gives us."""
    channel: grpc.aio.Channel
    stub: destination_pb2_grpc.DestinationStub
    hello: common_pb2.HelloReply
    catalog: destination_pb2.VirtualDeviceCatalog


async def open_session(channel: grpc.aio.Channel, address: str, host_id: str, *,
                       timeout: float = 15.0) -> Session:
    stub = destination_pb2_grpc.DestinationStub(channel)
    hello = common_pb2.Hello(
        protocol_version=version.PROTOCOL_VERSION, min_protocol_version=version.MIN_PROTOCOL_VERSION,
        capabilities=list(version.CAPABILITIES), agent_version=version.AGENT_VERSION,
        host_id=host_id, role="source")
    try:
        reply = await stub.Negotiate(hello, timeout=timeout, wait_for_ready=True)
        catalog = await stub.GetCatalog(destination_pb2.CatalogRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise PeerError(describe_rpc_error(exc, address)) from None
    return Session(channel=channel, stub=stub, hello=reply, catalog=catalog)


def prepare_request(inventory: source_pb2.Inventory, *, max_pfn: int, streams: int,
                    migration_id: str = "") -> destination_pb2.PrepareRequest:
    return destination_pb2.PrepareRequest(
        source_host_id=inventory.host_id,
        memory_bytes=inventory.memory_bytes or max_pfn * 4096,
        page_size=4096,
        max_pfn=max_pfn,
        firmware_memmap=[destination_pb2.MemoryRange(start=e.start, end=e.end, type=e.type)
                         for e in inventory.firmware_memmap],
        kernel_release=inventory.kernel_release,
        cpu_model=inventory.cpu_model,
        migration_id=migration_id,
        streams=streams,
    )


async def reserve(session: Session, request: destination_pb2.PrepareRequest, address: str,
                  timeout: float = 60.0) -> destination_pb2.PrepareReply:
    try:
        return await session.stub.Prepare(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise PeerError(describe_rpc_error(exc, address)) from None
