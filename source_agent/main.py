"""p2v-source: the source agent daemon (the physical host P)."""

from __future__ import annotations

import logging

from common.agent_cli import base_parser, flag_overrides, load_config, machine_id, run_daemon
from common.config import SourceConfig
from common.heap import fix_mmap_threshold
from common.rpc import AgentServer
from p2v.v1 import source_pb2, source_pb2_grpc

from .service import SourceService

log = logging.getLogger("p2v.source")
DEFAULT_CONFIG = "/etc/p2v/source.toml"


async def serve(config: SourceConfig, *, ready_file: str | None = None) -> None:
    service = SourceService(config, machine_id())
    server = AgentServer("p2v-source")
    source_pb2_grpc.add_SourceServicer_to_server(service, server.server)
    if config.agent.listen_unix:
        server.listen_unix(config.agent.listen_unix)
    if config.agent.listen_tcp:
        server.listen_tcp(config.agent.listen_tcp, config.tls)
    if not server.ports:
        raise ValueError("nothing to listen on: set agent.listen_unix and/or agent.listen_tcp")
    await server.start([source_pb2.DESCRIPTOR.services_by_name["Source"].full_name])
    service.start_recovery()
    await server.run_until_stopped(on_stop=service.shutdown, ready_file=ready_file)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("p2v-source", __doc__, DEFAULT_CONFIG)
    parser.add_argument("--listen-unix", help="local socket for p2vctl (default /run/p2v/source.sock)")
    parser.add_argument("--listen-tcp", help="host:port for remote tooling (always mutual TLS)")
    parser.add_argument("--state-dir", help="where journals live")
    args = parser.parse_args(argv)
    extra = flag_overrides(args, {"listen_unix": "agent.listen_unix", "listen_tcp": "agent.listen_tcp",
                                  "state_dir": "agent.state_dir"})
    config = load_config(SourceConfig, args, DEFAULT_CONFIG, extra)
    fix_mmap_threshold()  # freed pre-copy buffers must not stay in P's image (common/heap.py)
    run_daemon(args, config.agent.log_level, serve(config, ready_file=args.ready_file), log)


if __name__ == "__main__":
    main()
