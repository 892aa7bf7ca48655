"""p2vctl: the thin command line over the source agent's gRPC API (and, for `resolve` and `list`, the
destination agent's).

Exit codes: 0 ok; 1 the operation failed or the check refused; 2 usage or configuration error;
3 the agent is unreachable; 4 the migration was cancelled or rolled back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf.json_format import MessageToDict

from common.config import TlsConfig
from common.cutover_marker import marker_path, remove, socket_path, watcher_path
from common.migration_state import FINAL_STATES
from common.rpc import open_channel, unreachable, wait_for_agent
from p2v.v1 import common_pb2, destination_pb2, destination_pb2_grpc, source_pb2, source_pb2_grpc

from . import render

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_CANCELLED = 0, 1, 2, 3, 4
DEFAULT_AGENT = "unix:/run/p2v/source.sock"


def as_dict(message: Any) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        agent = args.agent
        if not agent.startswith("unix:") and ":" not in agent:
            agent = f"unix:{agent}"
        tls = TlsConfig(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name,
                        insecure=args.insecure)
        self.address = agent
        self.channel = open_channel(agent, tls)
        self.stub = source_pb2_grpc.SourceStub(self.channel)
        self.destination = destination_pb2_grpc.DestinationStub(self.channel)  # `resolve`, `list` on V

    async def close(self) -> None:
        await self.channel.close()


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=None if not sys.stdout.isatty() else 2, sort_keys=True))


async def cmd_discover(client: Client, args: argparse.Namespace) -> int:
    inventory = await client.stub.Discover(source_pb2.DiscoverRequest(), timeout=args.timeout)
    if args.json:
        emit_json(as_dict(inventory))
    else:
        render.inventory(inventory)
    return EXIT_OK


async def cmd_check(client: Client, args: argparse.Namespace) -> int:
    verdict = await client.stub.Check(source_pb2.CheckRequest(destination=args.destination),
                                      timeout=args.timeout)
    if args.json:
        emit_json(as_dict(verdict))
    else:
        render.verdict(verdict)
    return EXIT_OK if verdict.ok else EXIT_FAILED


def _exit_for(status: common_pb2.MigrationStatus) -> int:
    if status.state == common_pb2.MIGRATION_STATE_COMPLETED:
        return EXIT_OK
    if status.state in (common_pb2.MIGRATION_STATE_CANCELLED, common_pb2.MIGRATION_STATE_ROLLED_BACK):
        return EXIT_CANCELLED
    return EXIT_FAILED


class MigrationLost(Exception):
    """The agent came back without the migration being followed."""


class SteppingOut(Exception):
    """The agent's cutover began: p2vctl leaves P's memory image until it is over (p2vctl.step_out)."""

    def __init__(self, marker: Path, migration_id: str) -> None:
        super().__init__(str(marker))
        self.marker = marker
        self.migration_id = migration_id


def _steps_out(client: Client, status: common_pb2.MigrationStatus, args: argparse.Namespace) -> Path | None:
    """The agent's cutover marker when this p2vctl should step out of P's image now: it follows a
    cutover of an agent on this host (unix socket) that keeps the marker."""
    if args.no_step_out or status.state != common_pb2.MIGRATION_STATE_CUTOVER or not status.migration_id:
        return None
    socket = socket_path(client.address)
    marker = marker_path(socket, status.migration_id) if socket else None
    return marker if marker is not None and marker.exists() else None


async def _statuses(client: Client, migration_id: str, args: argparse.Namespace
                    ) -> AsyncIterator[common_pb2.MigrationStatus]:
    """The migration's statuses until a final one. When the agent goes away mid-way (a crash, a
    restart: the next agent in the VM serves a move's last steps again under the same id), wait for
    it up to --reattach-timeout and follow the same migration again."""
    final = reattached = False
    while True:
        try:
            async for status in client.stub.Watch(common_pb2.MigrationRef(migration_id=migration_id)):
                migration_id = status.migration_id or migration_id
                final = status.state in FINAL_STATES
                if args.stepped_out:  # back after a cutover: the agent need not wait for this p2vctl now
                    remove(watcher_path(Path(args.stepped_out), os.getpid()))
                    args.stepped_out = ""
                yield status
                if not final and (marker := _steps_out(client, status, args)) is not None:
                    raise SteppingOut(marker, migration_id)
            return
        except grpc.RpcError as exc:
            if reattached and exc.code() == grpc.StatusCode.NOT_FOUND:
                raise MigrationLost(f"the agent came back without migration {migration_id}: it did not survive "
                                    "the restart (the agent's log says what became of it)") from None
            if final or not migration_id or not unreachable(exc) or args.reattach_timeout <= 0:
                raise
            print(f"p2vctl: lost the agent ({exc.details() if hasattr(exc, 'details') else exc}); waiting up to "
                  f"{args.reattach_timeout:g} s to follow migration {migration_id} again", file=sys.stderr)
        await wait_for_agent(client.channel, args.reattach_timeout)
        reattached = True


def follow_again_argv(args: argparse.Namespace, migration_id: str, marker: Path) -> list[str]:
    """p2vctl's arguments for following `migration_id` again after the cutover, as this one does
    (--stepped-out: an agent gone by then is waited for as a re-attach would, reach_agent_after_cutover)."""
    argv = ["watch", migration_id, "--agent", args.agent, "--timeout", f"{args.timeout:g}",
            "--connect-timeout", f"{args.connect_timeout:g}",
            "--reattach-timeout", f"{args.reattach_timeout:g}", "--ca", args.ca, "--cert", args.cert,
            "--key", args.key, "--server-name", args.server_name, "--stepped-out", str(marker)]
    return argv + ["--insecure"] * args.insecure + ["--json"] * args.json


def step_out(args: argparse.Namespace, out: SteppingOut) -> NoReturn:
    """Replace this process with the waiter (same pid, same output); it becomes `watch` again."""
    if not args.json:
        render.console.print(f"[dim]cutover:[/] p2vctl steps out of P's memory image (pid {os.getpid()}) "
                             "and follows again when the cutover is over")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "p2vctl.step_out", str(out.marker), "--",
                              *follow_again_argv(args, out.migration_id, out.marker)])


async def _follow(client: Client, migration_id: str, args: argparse.Namespace) -> int:
    last = None
    stream = _statuses(client, migration_id, args)
    try:
        if args.json:
            async for status in stream:
                last = status
                emit_json(as_dict(status))
        else:
            last = await render.follow(stream)
    except MigrationLost as exc:
        _error(args, str(exc), grpc.StatusCode.NOT_FOUND)
        return EXIT_FAILED
    except SteppingOut as out:
        await client.close()  # the agent sees this follower leave
        step_out(args, out)
    if last is None:
        return EXIT_FAILED
    return _exit_for(last)


async def cmd_migrate(client: Client, args: argparse.Namespace) -> int:
    request = source_pb2.MigrateRequest(
        destination=args.destination, streams=args.streams, downtime_limit_ms=args.downtime_limit_ms,
        max_bandwidth_bytes=args.max_bandwidth, no_compression=args.no_compression,
        max_rounds=args.max_rounds, dry_run=args.dry_run, rehearse=args.rehearse,
        memory_source=args.memory_source or "")
    status = await client.stub.Migrate(request, timeout=args.timeout)
    if args.detach:
        emit_json(as_dict(status)) if args.json else print(status.migration_id)
        return EXIT_OK
    return await _follow(client, status.migration_id, args)


async def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    return await _follow(client, args.migration_id or "", args)


async def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    reply = await client.stub.Cancel(common_pb2.CancelRequest(migration_id=args.migration_id or "",
                                                              reason=args.reason), timeout=args.timeout)
    if args.json:
        emit_json(as_dict(reply))
    else:
        print(f"migration {reply.migration_id}: {common_pb2.MigrationState.Name(reply.state)}"
              + (f" ({reply.detail})" if reply.detail else ""))
    return EXIT_OK


async def cmd_resolve(client: Client, args: argparse.Namespace) -> int:
    """On V, when P's agent could not resolve a cutover its helper left undecided (V acknowledged the
    image, COMMIT never came): the operator, who can see P, says whether P is off or runs on."""
    reply = await client.destination.ResolveCutover(destination_pb2.ResolveRequest(
        migration_id=args.migration_id, source_committed=args.p_is_off), timeout=args.timeout)
    if args.json:
        emit_json(as_dict(reply))
    else:
        verdict = "the VM runs the OS: keep P off" if reply.vm_runs else "P runs the OS: V never starts this image"
        print(f"migration {args.migration_id}: {verdict} ({reply.detail})")
    return EXIT_OK


async def cmd_rollback(client: Client, args: argparse.Namespace) -> int:
    reply = await client.stub.Rollback(common_pb2.MigrationRef(migration_id=args.migration_id or ""),
                                       timeout=args.timeout)
    if args.json:
        emit_json(as_dict(reply))
    else:
        print(f"migration {reply.migration_id or '(none)'}: rolled back "
              f"{len(reply.undone)} configuration(s): {', '.join(reply.undone) or 'nothing to undo'}")
        for failed in reply.failed:
            print(f"p2vctl: rollback: left in place: {failed} (run the rollback again once the cause is gone)",
                  file=sys.stderr)
    return EXIT_FAILED if reply.failed else EXIT_OK


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    """The source agent's migrations, or V's when --agent names a destination agent (its server has
    no Source service)."""
    request = common_pb2.ListRequest(unfinished_only=args.unfinished)
    try:
        listed = await client.stub.List(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        listed = await client.destination.List(request, timeout=args.timeout)
    if args.json:
        emit_json(as_dict(listed))
    else:
        render.migrations(listed)
    return EXIT_OK


def cmd_certs(args: argparse.Namespace) -> int:
    from common.tls import issue_cert, make_ca

    out = Path(args.out)
    ca, _ = make_ca(out)
    made = {"ca": str(ca)}
    for name in args.name:
        cert, _key = issue_cert(out, name, extra_sans=args.san)
        made[name] = str(cert)
    if args.json:
        emit_json(made)
    else:
        for name, path in made.items():
            print(f"{name:12} {path}")
        print(f"keys are in {out} (mode 0600); copy ca.pem plus each agent's .pem/.key to its host")
    return EXIT_OK


COMMANDS = {"discover": cmd_discover, "check": cmd_check, "migrate": cmd_migrate, "watch": cmd_watch,
            "cancel": cmd_cancel, "rollback": cmd_rollback, "resolve": cmd_resolve, "list": cmd_list}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--agent", default=DEFAULT_AGENT,
                        help="source agent: unix socket path or host:port (TLS) [%(default)s]")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per call [%(default)s]")
    common.add_argument("--connect-timeout", type=float, default=20.0,
                        help="seconds to wait for a connection to the agent [%(default)s]")
    common.add_argument("--reattach-timeout", type=float, default=120.0,
                        help="migrate/watch: seconds to wait for an agent that went away mid-way "
                             "(0: give up at once) [%(default)s]")
    common.add_argument("--no-step-out", action="store_true",
                        help="migrate/watch with a local agent: stay in P's memory during the cutover "
                             "(p2vctl is then ~20 MiB of P's image, each page of it copied inside the downtime)")
    common.add_argument("--stepped-out", default="", help=argparse.SUPPRESS)  # set by p2vctl.step_out
    common.add_argument("--ca", default="/etc/p2v/tls/ca.pem")
    common.add_argument("--cert", default="/etc/p2v/tls/p2vctl.pem")
    common.add_argument("--key", default="/etc/p2v/tls/p2vctl.key")
    common.add_argument("--server-name", default="p2v-source", help="name in the agent's certificate")
    common.add_argument("--insecure", action="store_true", help="plaintext TCP (development only)")

    parser = argparse.ArgumentParser(prog="p2vctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("discover", parents=[common], help="show P's devices, memory map, CPU")
    p = sub.add_parser("check", parents=[common], help="pre-flight verdict and device plan")
    p.add_argument("destination", help="destination agent host:port")
    p = sub.add_parser("migrate", parents=[common], help="start a migration and follow it")
    p.add_argument("destination", help="destination agent host:port")
    p.add_argument("--streams", type=int, default=0)
    p.add_argument("--downtime-limit-ms", type=int, default=0)
    p.add_argument("--max-bandwidth", type=int, default=0, help="bytes/s, 0 = unlimited")
    p.add_argument("--no-compression", action="store_true")
    p.add_argument("--max-rounds", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="pre-copy only, no cutover")
    p.add_argument("--rehearse", action="store_true",
                   help="cutover up to V's verified image, then P runs on: the downtime, measured; "
                        "nothing handed over")
    p.add_argument("--memory-source", help='override the memory source, e.g. "file:/path"')
    p.add_argument("--detach", action="store_true", help="print the migration id and return")
    for name, text in (("watch", "follow a migration's progress"), ("cancel", "abort a migration"),
                       ("rollback", "undo P's redundancy (bond, md leg, drivers) from the agent's journal")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("migration_id", nargs="?", help="default: the current or last migration")
        if name == "cancel":
            p.add_argument("--reason", default="cancelled by the operator")
    p = sub.add_parser("list", parents=[common],
                       help="the migrations an agent runs or journaled, and what needs you (also V's: "
                            "--agent V's agent --server-name p2v-dest)")
    p.add_argument("--unfinished", action="store_true", help="only those not ended, or needing you")
    p = sub.add_parser("resolve", parents=[common],
                       help="on V: decide a cutover left undecided (--agent V's agent, --server-name p2v-dest)")
    p.add_argument("migration_id", help="V's id of the migration (its status says 'cutover undecided')")
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--p-is-off", action="store_true", help="P is powered off: V starts the VM from the image")
    side.add_argument("--p-runs-on", action="store_true", help="P still runs: V drops the image for good")
    p = sub.add_parser("certs", help="make a CA and agent certificates for mutual TLS")
    p.add_argument("--out", default="/etc/p2v/tls")
    p.add_argument("--name", action="append", default=[],
                   help="certificate to issue (repeatable; default p2v-source, p2v-dest, p2vctl)")
    p.add_argument("--san", action="append", default=[], help="extra DNS name or IP for the certificates")
    p.add_argument("--json", action="store_true")
    return parser


def _error(args: argparse.Namespace, message: str, code: grpc.StatusCode) -> None:
    if args.json:
        emit_json({"error": message, "code": code.name})
    else:
        print(f"p2vctl: {args.command}: {message}", file=sys.stderr)


def _unreachable(args: argparse.Namespace, client: Client, message: str, code: grpc.StatusCode) -> int:
    _error(args, message, code)
    if not args.json:
        which = {"resolve": "destination", "list": "source (or destination)"}.get(args.command, "source")
        print(f"p2vctl: is the {which} agent running and listening on {client.address}?", file=sys.stderr)
    return EXIT_UNREACHABLE


#: how long a p2vctl back from stepping out gives the agent to answer before it says it lost it
AFTER_CUTOVER_GRACE_S = 10.0


async def reach_agent_after_cutover(client: Client, args: argparse.Namespace) -> None:
    """Back from stepping out (p2vctl.step_out): the agent that ran the cutover answers at once,
    unless it died in the cutover or in the VM right after it. Then say so, as a p2vctl that kept its
    connection does, and wait up to --reattach-timeout for the next agent."""
    try:
        await wait_for_agent(client.channel, min(args.connect_timeout, AFTER_CUTOVER_GRACE_S))
        return
    except grpc.RpcError as exc:
        if not unreachable(exc) or args.reattach_timeout <= 0:
            raise
    print(f"p2vctl: lost the agent: it does not answer after the cutover; waiting up to "
          f"{args.reattach_timeout:g} s to follow migration {args.migration_id} again", file=sys.stderr, flush=True)
    await wait_for_agent(client.channel, args.reattach_timeout)


async def run(args: argparse.Namespace) -> int:
    client = Client(args)
    try:
        if args.stepped_out:
            await reach_agent_after_cutover(client, args)
        else:
            await wait_for_agent(client.channel, args.connect_timeout)
        return await COMMANDS[args.command](client, args)
    except grpc.RpcError as exc:
        code = exc.code()
        message = exc.details() or str(code)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return _unreachable(args, client, message, code)
        _error(args, message, code)
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            return EXIT_USAGE
        return EXIT_FAILED
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "certs":
        if not args.name:
            args.name = ["p2v-source", "p2v-dest", "p2vctl"]
        raise SystemExit(cmd_certs(args))
    try:
        code = asyncio.run(run(args))
    except ValueError as exc:  # e.g. unreadable TLS files
        print(f"p2vctl: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
