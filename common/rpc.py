"""gRPC plumbing shared by both agents: event loop, channels, servers, protocol guard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common import tls as tlsmod
from common import version
from common.config import TlsConfig
from common.sdnotify import notify

log = logging.getLogger(__name__)

# Generous enough for a 1 MiB batch plus its PFN list and flags; anything larger is refused
# by gRPC itself with RESOURCE_EXHAUSTED before our code sees it.
MAX_MESSAGE_BYTES = 4 << 20

# Agent-to-agent channels: keepalives notice a dead link within seconds, and reconnect backoff
# stays short (gRPC's default grows to 120 s) so a stream resumes soon after the link returns.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (measured ~1.5x grpc.aio throughput here), else None."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Awaitable[Any]) -> Any:
    """asyncio.run on uvloop when available. The global policy is left alone on purpose:
    libraries that make their own loop in worker threads (pyroute2) do not work on uvloop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def unreachable(exc: BaseException) -> bool:
    """The peer did not answer (down, restarting, the path not back yet), as opposed to its refusal.
    Pure."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return isinstance(exc, OSError)


async def until_reachable(call: Callable[[], Awaitable[Any]], within_s: float, *, first_delay_s: float = 1.0,
                          max_delay_s: float = 15.0,
                          on_retry: Callable[[int, BaseException], None] | None = None) -> Any:
    """`call()` until the peer answers, retried with a growing pause while it is unreachable, for up to
    `within_s`. A refusal, or the last unreachable error once the time is up, is raised as it came:
    the caller words it. Only for calls that are safe to repeat."""
    deadline = asyncio.get_running_loop().time() + within_s
    delay, attempt = first_delay_s, 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if not unreachable(exc) or asyncio.get_running_loop().time() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay_s)


async def wait_for_agent(channel: grpc.aio.Channel, within_s: float) -> None:
    """Wait until the agent behind `channel` answers its health service. gRPC fails a call at once
    when a connect attempt failed (an agent still starting; a transient 'handshaker shutdown' seen on
    the local socket right after a rehearsal); a health check is safe to repeat, a Migrate is not."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        await until_reachable(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5), within_s,
                              first_delay_s=0.2, max_delay_s=2.0)
    except grpc.RpcError as exc:
        if unreachable(exc):
            raise
        # any other answer (a server without the health service) still says it is there


class _ProtocolMetadata(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                        grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    """Stamp every outgoing call with our protocol version."""

    def __init__(self, protocol: int) -> None:
        self._item = (version.PROTOCOL_METADATA_KEY, str(protocol))

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._item)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[override]
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[override]
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[override]
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[override]
        return await continuation(self._details(details), request_iterator)


def open_channel(address: str, tls: TlsConfig, *, protocol: int = version.PROTOCOL_VERSION,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A channel to another agent: mutual TLS unless tls.insecure, or a unix socket."""
    opts = [*CHANNEL_OPTIONS, *options]
    interceptors = [_ProtocolMetadata(protocol)]
    if address.startswith("unix:") or tls.insecure:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(
        address, tlsmod.channel_credentials(tls), options=opts, interceptors=interceptors
    )


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    async def abort_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort_unary)


class ProtocolGuard(grpc.aio.ServerInterceptor):
    """Refuse calls from peers that speak an unsupported protocol version, before any handler runs.

    Calls without the metadata (health checks, p2vctl on the local socket) pass; agent-to-agent
    calls always carry it (see open_channel).
    """

    async def intercept_service(self, continuation: Callable[..., Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key != version.PROTOCOL_METADATA_KEY:
                continue
            try:
                peer_version = int(value)
            except ValueError:
                peer_version = -1
            if handler is not None and not version.supported(peer_version):
                return _abort_handler(
                    handler,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"unsupported protocol version {value}: this agent speaks "
                    f"{version.MIN_PROTOCOL_VERSION}..{version.PROTOCOL_VERSION}",
                )
        return handler


async def require_peer(context: grpc.aio.ServicerContext, tls: TlsConfig) -> list[str]:
    """Abort with PERMISSION_DENIED unless the TLS peer is an allowed identity."""
    names = tlsmod.peer_identities(context)
    if tls.insecure or context.peer().startswith("unix:"):
        return names
    if not tlsmod.peer_allowed(names, tls.allowed_peers):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"peer {names or context.peer()} is not an allowed p2v agent")
    return names


class AgentServer:
    """A grpc.aio server with health service, TLS/unix listeners and graceful shutdown."""

    def __init__(self, name: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.name = name
        self.server = grpc.aio.server(
            interceptors=[ProtocolGuard()],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                # Accept the clients' 2 s keepalive pings (see CHANNEL_OPTIONS) without GOAWAY.
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._stopping = asyncio.Event()
        self.ports: list[str] = []

    def listen_tcp(self, address: str, tls: TlsConfig) -> int:
        if tls.insecure:
            log.warning("listening on %s WITHOUT TLS (--insecure): development only", address)
            port = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, tlsmod.server_credentials(tls))
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.ports.append(f"{address.rsplit(':', 1)[0]}:{port}")
        return port

    def listen_unix(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.server.add_insecure_port(f"unix:{path}")
        self.ports.append(f"unix:{path}")

    async def start(self, service_names: Sequence[str]) -> None:
        await self.server.start()
        for name in (*service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def request_stop(self) -> None:
        self._stopping.set()

    async def run_until_stopped(self, *, grace: float = 3.0,
                                on_stop: Callable[[], Awaitable[None]] | None = None,
                                ready_file: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        notify("READY=1")
        if ready_file:
            await asyncio.to_thread(Path(ready_file).write_text, " ".join(self.ports) + "\n")
        log.info("ready", extra={"agent": self.name, "listen": self.ports})
        await self._stopping.wait()
        notify("STOPPING=1")
        log.info("stopping", extra={"agent": self.name})
        await self.health.enter_graceful_shutdown()
        if on_stop is not None:
            await on_stop()
        await self.server.stop(grace)
        if ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready_file)
        log.info("stopped", extra={"agent": self.name})
