"""p2vctl steps out of P's memory image for the cutover (common.cutover_marker, p2vctl.step_out).

Every page in use at the snapshot is part of P's image and costs inside the downtime; a `p2vctl
migrate` following the move from inside P was ~20 MiB of it. Here: the real source agent's service
on a unix socket, a migration whose status the test moves through the cutover as the agent's
lifecycle does (marker first, then the phase; the marker goes when the cutover is over), and a real
p2vctl process: it replaces itself with the bare waiter (same pid, gRPC no longer loaded), follows
again once the marker is gone, and the agent waits for it before it would unload."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common import cutover_marker as cm
from common.config import SourceAgentSection, SourceConfig, TlsConfig
from common.rpc import AgentServer
from p2v.v1 import common_pb2, source_pb2, source_pb2_grpc
from source_agent.migration import SourceMigration
from source_agent.service import SourceService
from tests.agents import REPO


# -- the marker, pure and on files -------------------------------------------------------------------
def test_socket_paths_of_grpc_addresses() -> None:
    assert cm.socket_path("unix:/run/p2v/source.sock") == "/run/p2v/source.sock"
    assert cm.socket_path("unix:///run/p2v/source.sock") == "/run/p2v/source.sock"
    assert cm.socket_path("/run/p2v/source.sock") == "/run/p2v/source.sock"
    assert cm.socket_path("p.example:7460") == ""  # an agent elsewhere: p2vctl is not in its image


def test_a_marker_counts_only_while_its_agent_lives(tmp_path: Path) -> None:
    marker = cm.marker_path(str(tmp_path / "source.sock"), "m1")
    assert not cm.cutover_running(marker)
    cm.create_marker(marker)
    assert cm.cutover_running(marker)  # this process made it
    dead = subprocess.Popen(["true"])
    dead.wait()
    marker.write_text(json.dumps({"agent_pid": dead.pid, "agent_started": 1}))
    assert not cm.cutover_running(marker)  # an agent that died in its cutover keeps no one waiting
    marker.write_text("{not json")
    assert not cm.cutover_running(marker)
    cm.announce_watcher(marker)
    assert cm.watcher_waiting(marker)
    assert cm.leftovers(str(tmp_path / "source.sock")) == [marker, cm.watcher_path(marker, os.getpid())]
    assert cm.leftovers("") == []


# -- the real agent service, real p2vctl processes ----------------------------------------------------
def anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise AssertionError("no Anonymous line")


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def grpc_loaded(pid: int) -> bool:
    return "cygrpc" in Path(f"/proc/{pid}/maps").read_text()


def watchers(sock: Path, migration_id: str, extra: dict[str, list[str]]) -> dict[str, subprocess.Popen]:
    return {name: subprocess.Popen([sys.executable, "-m", "p2vctl.cli", "watch", migration_id, "--agent", str(sock),
                                    "--json", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            for name, argv in extra.items()}


async def until(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_p2vctl_steps_out_for_the_cutover_and_follows_again(tmp_path: Path) -> None:
    sock = Path(tempfile.mkdtemp(prefix="p2vt-")) / "source.sock"  # short: unix socket paths
    config = SourceConfig(agent=SourceAgentSection(state_dir=str(tmp_path / "p"), listen_unix=str(sock)),
                          tls=TlsConfig(insecure=True))
    service = SourceService(config, "test-source")
    server = AgentServer("p2v-source")
    source_pb2_grpc.add_SourceServicer_to_server(service, server.server)
    server.listen_unix(str(sock))
    await server.start([source_pb2.DESCRIPTOR.services_by_name["Source"].full_name])
    migration = SourceMigration(config, source_pb2.MigrateRequest(destination="v.example:7470"),
                                source_pb2.Inventory, "test-source", "m-step-out")
    service.migrations[migration.id] = migration
    await migration.feed.publish(state=common_pb2.MIGRATION_STATE_ACTIVE,
                                 progress=common_pb2.Progress(phase="precopy", fraction=0.5, detail="round 1"))
    procs = watchers(sock, migration.id, {"stepping": [], "stepping-too": [], "staying": ["--no-step-out"]})
    try:
        for proc in procs.values():
            await until(lambda p=proc: grpc_loaded(p.pid), "p2vctl to follow")
        await asyncio.sleep(1.0)  # both are in their Watch stream (the first status came)
        following_kib = anon_kib(procs["stepping"].pid)

        marker = migration._mark_cutover()  # as _cutover: the marker, then the phase
        assert marker == cm.marker_path(str(sock), migration.id) and cm.cutover_running(marker)
        await migration.feed.publish(state=common_pb2.MIGRATION_STATE_CUTOVER,
                                     progress=common_pb2.Progress(phase="cutover", detail="snapshot"))
        stepping = procs["stepping"].pid
        for proc in (procs["stepping"], procs["stepping-too"]):
            await until(lambda p=proc: "p2vctl.step_out" in cmdline(p.pid), "p2vctl to step out")
        await until(lambda: len(cm.watcher_paths(marker)) == 2 and cm.watcher_waiting(marker), "their notes")
        waiting_kib = anon_kib(stepping)
        assert not grpc_loaded(stepping), cmdline(stepping)  # only the bare interpreter is left in the image
        assert "p2vctl.cli" in cmdline(procs["staying"].pid)  # --no-step-out: stays as it was
        await asyncio.sleep(1.0)
        assert "p2vctl.step_out" in cmdline(stepping)  # it waits while the cutover runs

        # in the VM: the cutover is over; the agent, about to unload, waits for the stepped-out p2vctl
        await migration.feed.publish(progress=common_pb2.Progress(phase="resume", detail="resume steps"))
        cm.remove(marker)
        await asyncio.wait_for(migration._wait_for_stepped_out_watcher(), 60)
        assert not cm.watcher_paths(marker)
        for proc in (procs["stepping"], procs["stepping-too"]):  # both follow again, same pids
            assert "p2vctl.cli watch" in cmdline(proc.pid) and "--stepped-out" in cmdline(proc.pid)
        await migration.feed.publish(state=common_pb2.MIGRATION_STATE_COMPLETED,
                                     progress=common_pb2.Progress(phase="cancel", fraction=1.0, detail="done"))
        outputs = {}
        for name, proc in procs.items():
            out, err = await asyncio.to_thread(proc.communicate, timeout=60)
            assert proc.returncode == 0, (name, out, err)
            outputs[name] = [json.loads(line) for line in out.splitlines()]
            assert outputs[name][-1]["state"] == "MIGRATION_STATE_COMPLETED", (name, out)
        for name in ("stepping", "stepping-too"):
            phases = [s["progress"]["phase"] for s in outputs[name]]
            # one JSON status per line throughout (--json: nothing else on stdout), before and after
            assert phases[:2] == ["precopy", "cutover"] and phases[-2:] == ["resume", "cancel"], phases
        print(f"p2vctl following: {following_kib} KiB anonymous; stepped out: {waiting_kib} KiB")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        await server.server.stop(None)


def test_p2vctl_follows_at_once_when_the_agent_died_in_its_cutover(tmp_path: Path) -> None:
    """The waiter does not wait for a marker whose agent is gone: the watch it becomes waits for
    the next agent (here none: it says the agent is unreachable, with the migration's id)."""
    sock = Path(tempfile.mkdtemp(prefix="p2vt-")) / "source.sock"
    marker = cm.marker_path(str(sock), "m-dead")
    dead = subprocess.Popen(["true"])
    dead.wait()
    marker.write_text(json.dumps({"agent_pid": dead.pid, "agent_started": 1}))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "p2vctl.step_out", str(marker), "--", "watch", "m-dead",
                          "--agent", str(sock), "--connect-timeout", "1", "--reattach-timeout", "2",
                          "--stepped-out", str(marker)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res  # EXIT_UNREACHABLE, from `p2vctl watch`
    # first what a p2vctl that kept its connection says (the rig's tests wait for these words)
    assert "p2vctl: lost the agent: it does not answer" in res.stderr and "follow migration m-dead" in res.stderr
    assert "p2vctl: watch:" in res.stderr and str(sock) in res.stderr, res.stderr
    assert time.monotonic() - t0 < 60  # not the waiter's 16 minutes


@pytest.mark.parametrize("argv", [[], ["only-a-marker"], ["m", "watch"]])
def test_the_waiter_refuses_a_malformed_command_line(argv: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "p2vctl.step_out", *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr


def test_follow_again_keeps_the_callers_options() -> None:
    from p2vctl.cli import build_parser, follow_again_argv

    args = build_parser().parse_args(["migrate", "v:7470", "--agent", "/run/p2v/source.sock", "--json",
                                      "--timeout", "30", "--reattach-timeout", "300"])
    again = build_parser().parse_args(follow_again_argv(args, "m1", Path("/run/p2v/source.sock.cutover-m1")))
    assert (again.command, again.migration_id, again.agent, again.json) == ("watch", "m1", args.agent, True)
    assert again.timeout == 30 and again.reattach_timeout == 300
    assert again.connect_timeout == 20  # then, should the agent be gone, up to --reattach-timeout
    assert again.stepped_out == "/run/p2v/source.sock.cutover-m1" and not again.insecure
    assert os.path.basename(again.ca) == "ca.pem"
