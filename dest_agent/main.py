"""p2v-dest: the destination agent daemon (host V)."""

from __future__ import annotations

import logging

from common.agent_cli import base_parser, flag_overrides, load_config, machine_id, run_daemon
from common.config import DestConfig
from common.rpc import MAX_MESSAGE_BYTES, AgentServer
from p2v.v1 import destination_pb2, destination_pb2_grpc

from .service import DestinationService

log = logging.getLogger("p2v.dest")
DEFAULT_CONFIG = "/etc/p2v/dest.toml"


async def serve(config: DestConfig, *, ready_file: str | None = None) -> None:
    service = DestinationService(config, machine_id())
    # Room for the largest batch plus its PFN list and flags (9 bytes per page).
    max_message = max(MAX_MESSAGE_BYTES, config.limits.max_batch_bytes * 2 + (1 << 16))
    server = AgentServer("p2v-dest", max_message_bytes=max_message)
    destination_pb2_grpc.add_DestinationServicer_to_server(service, server.server)
    if config.agent.listen:
        server.listen_tcp(config.agent.listen, config.tls)
    if config.agent.listen_unix:
        server.listen_unix(config.agent.listen_unix)
    await server.start([destination_pb2.DESCRIPTOR.services_by_name["Destination"].full_name])
    await service.start()
    await server.run_until_stopped(on_stop=service.shutdown, ready_file=ready_file)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("p2v-dest", __doc__, DEFAULT_CONFIG)
    parser.add_argument("--listen", help="host:port for the agents' mutual-TLS API")
    parser.add_argument("--state-dir", help="where page stores and journals live")
    args = parser.parse_args(argv)
    extra = flag_overrides(args, {"listen": "agent.listen", "state_dir": "agent.state_dir"})
    config = load_config(DestConfig, args, DEFAULT_CONFIG, extra)
    run_daemon(args, config.agent.log_level, serve(config, ready_file=args.ready_file), log)


if __name__ == "__main__":
    main()
