"""p2vctl against a real source agent (unix socket), human and --json output, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.agents import REPO, AgentProcess
from tests.foundation.conftest import dest_config, source_config
from tests.netns import netns_pair

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("needs_netns")]


def p2vctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2vctl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.fixture
def agents(short_tmp, tls_dir):
    memory = short_tmp / "memory.bin"
    memory.write_bytes(b"\x00" * (4 << 20))
    with netns_pair("ctl", "10.78.1") as pair:
        address = f"{pair.right_ip}:7470"
        dest = AgentProcess("dest_agent.main", ["--config", str(dest_config(short_tmp, tls_dir, address))],
                            short_tmp, netns=pair.right, name="dest")
        source = AgentProcess("source_agent.main",
                              ["--config", str(source_config(short_tmp, tls_dir, f"file:{memory}"))],
                              short_tmp, netns=pair.left, name="source")
        try:
            dest.wait_ready()
            source.wait_ready()
            yield str(short_tmp / "source.sock"), address, source, dest
        finally:
            source.stop()
            dest.stop()


def test_discover_human_and_json(agents):
    sock, _, source, _ = agents
    human = p2vctl("discover", "--agent", sock)
    assert human.returncode == 0, human.stderr
    assert "Network interfaces" in human.stdout and "p2vtctla" in human.stdout
    machine = p2vctl("discover", "--agent", sock, "--json")
    assert machine.returncode == 0, machine.stderr
    inventory = json.loads(machine.stdout)
    names = {n["name"] for n in inventory["nics"]}
    assert "p2vtctla" in names  # the veth inside the source namespace, seen by the agent
    assert int(inventory["memory_bytes"]) > 0
    assert source.proc.poll() is None


def test_check_talks_to_destination(agents):
    sock, address, _, _ = agents
    result = p2vctl("check", address, "--agent", sock, "--json")
    verdict = json.loads(result.stdout)
    assert "reasons" in verdict and "plan" in verdict
    assert result.returncode == (0 if verdict["ok"] else 1)
    human = p2vctl("check", address, "--agent", sock)
    assert ("check passed" in human.stdout) == verdict["ok"]
    assert ("check refused" in human.stdout) == (not verdict["ok"])


def test_check_unreachable_destination_is_a_reason(agents):
    sock, _, _, _ = agents
    result = p2vctl("check", "10.78.1.99:7470", "--agent", sock, "--json", timeout=90)
    verdict = json.loads(result.stdout)
    assert result.returncode == 1
    assert verdict["ok"] is False
    assert verdict["reasons"][0]["code"] == "destination"


def test_watch_without_migration_and_unreachable_agent(agents, short_tmp):
    sock, _, _, _ = agents
    result = p2vctl("watch", "--agent", sock, "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)["code"] == "NOT_FOUND"
    gone = p2vctl("discover", "--agent", str(short_tmp / "nothing.sock"), "--connect-timeout", "2")
    assert gone.returncode == 3
    assert "is the source agent running" in gone.stderr


def test_p2vctl_waits_for_an_agent_that_is_still_starting(short_tmp, tls_dir):
    """A call made while the agent is not (yet) listening is not an error until --connect-timeout:
    p2vctl retries its connection (a failed connect attempt otherwise fails the first call at once)."""
    memory = short_tmp / "memory.bin"
    memory.write_bytes(b"\x00" * (4 << 20))
    sock = short_tmp / "source.sock"
    ctl = subprocess.Popen([sys.executable, "-m", "p2vctl.cli", "discover", "--json", "--agent", str(sock),
                            "--connect-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin"})
    with netns_pair("ctw", "10.78.2") as pair:
        time.sleep(2)  # p2vctl has tried and failed by now
        assert ctl.poll() is None, ctl.communicate()
        source = AgentProcess("source_agent.main",
                              ["--config", str(source_config(short_tmp, tls_dir, f"file:{memory}"))],
                              short_tmp, netns=pair.left, name="source")
        try:
            source.wait_ready()
            out, err = ctl.communicate(timeout=60)
        finally:
            ctl.kill()
            source.stop()
    assert ctl.returncode == 0, err
    assert "p2vtctwa" in {n["name"] for n in json.loads(out)["nics"]}


def test_certs_command(short_tmp):
    out = short_tmp / "tls"
    result = p2vctl("certs", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    assert set(made) == {"ca", "p2v-source", "p2v-dest", "p2vctl"}
    assert (out / "p2v-dest.key").stat().st_mode & 0o777 == 0o600


def test_migrate_dry_run_human_and_json(agents, short_tmp):
    """p2vctl migrate --dry-run: negotiate, catalog, prepare, pre-copy rounds over mutual TLS, summary."""
    import hashlib

    sock, address, source, dest = agents
    memory = short_tmp / "memory.bin"
    data = bytearray(hashlib.sha256(str(i).encode()).digest()[i % 32] for i in range(1 << 20)) * 4
    memory.write_bytes(bytes(data))
    human = p2vctl("migrate", address, "--agent", sock, "--dry-run", timeout=120)
    assert human.returncode == 0, human.stdout + human.stderr
    assert "completed" in human.stdout and "rounds" in human.stdout
    machine = p2vctl("migrate", address, "--agent", sock, "--dry-run", "--json", "--no-compression", timeout=120)
    assert machine.returncode == 0, machine.stdout + machine.stderr
    statuses = [json.loads(line) for line in machine.stdout.splitlines()]
    final = statuses[-1]
    assert final["state"] == "MIGRATION_STATE_COMPLETED"
    assert int(final["stats"]["total"]) == len(data)
    assert int(final["stats"]["transferred"]) >= len(data)  # incompressible and sent without compression
    # The destination holds exactly the source's bytes.
    mid = final["migration_id"]
    image = short_tmp / "dest-state" / "migrations" / mid / "memory.img"
    with open(image, "rb") as f:  # page `pfn` lives at offset pfn * 4096 (dest_agent/page_store.py)
        assert f.read(len(data)) == bytes(data)
    assert source.proc.poll() is None and dest.proc.poll() is None


def test_dry_run_and_rehearsal_together_are_refused(agents):
    """Pre-copy only and a cutover rehearsal exclude each other: a clear refusal, nothing started."""
    sock, address, source, _ = agents
    res = p2vctl("migrate", address, "--agent", sock, "--dry-run", "--rehearse", "--json")
    assert res.returncode != 0
    assert "exclude each other" in res.stdout + res.stderr, res.stdout + res.stderr
    watched = p2vctl("watch", "--agent", sock, "--json")  # the agent's latest migration: none
    assert watched.returncode != 0 and "no migration has been started" in watched.stdout + watched.stderr
    assert source.proc.poll() is None


def test_watch_follows_rounds_live(agents, short_tmp):
    """migrate --detach returns at once; watch then streams the rounds until the end."""
    sock, address, _, _ = agents
    memory = short_tmp / "memory.bin"
    memory.write_bytes(bytes(range(256)) * (4 << 12))  # 4 MiB, compressible
    started = p2vctl("migrate", address, "--agent", sock, "--dry-run", "--detach", "--no-compression",
                     "--max-bandwidth", str(2 << 20))
    assert started.returncode == 0, started.stderr
    migration_id = started.stdout.strip()
    watched = p2vctl("watch", migration_id, "--agent", sock, "--json", timeout=120)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    statuses = [json.loads(line) for line in watched.stdout.splitlines()]
    assert {s["migration_id"] for s in statuses} == {migration_id}
    sent = [int(s["stats"]["transferred"]) for s in statuses if s["state"] == "MIGRATION_STATE_ACTIVE"]
    assert len(sent) >= 3, "watch should show progress while the rounds run"
    assert sent == sorted(sent)
    assert statuses[-1]["state"] == "MIGRATION_STATE_COMPLETED"
    human = p2vctl("watch", migration_id, "--agent", sock)
    assert "completed" in human.stdout and "transferred" in human.stdout


def test_summary_of_a_whole_os_move_names_precopy_cutover_and_dedup(monkeypatch) -> None:
    from rich.console import Console

    from p2v.v1 import common_pb2
    from p2vctl import render

    out = Console(record=True, width=160)
    monkeypatch.setattr(render, "console", out)
    status = common_pb2.MigrationStatus(migration_id="m1", state=common_pb2.MIGRATION_STATE_COMPLETED)
    s = status.stats
    s.dirty_sync_count, s.precopy_bytes, s.downtime_bytes = 5, 360 << 20, 32 << 20
    s.cutover_pages, s.skipped, s.downtime_ms, s.total_time_ms = 100_000, 75_000, 14990, 146_350
    render.summary(status)
    text = out.export_text()
    assert "pre-copy" in text and "360.0 MiB" in text
    assert "32.0 MiB on the wire for a 390.6 MiB image (8.2%)" in text
    assert "75000 of 100000 pages from V's store (75.0%)" in text
    assert "14990 ms (OS frozen)" in text
    assert "rehearsal" not in text


def test_summary_of_a_rehearsal_says_nothing_was_handed_over(monkeypatch) -> None:
    from rich.console import Console

    from p2v.v1 import common_pb2
    from p2vctl import render

    out = Console(record=True, width=160)
    monkeypatch.setattr(render, "console", out)
    status = common_pb2.MigrationStatus(migration_id="m2", state=common_pb2.MIGRATION_STATE_COMPLETED)
    status.progress.phase = "rehearsal"
    status.stats.cutover_pages, status.stats.skipped, status.stats.downtime_ms = 70_000, 60_000, 3044
    render.summary(status)
    text = out.export_text()
    assert "migration m2: completed (a rehearsal: P runs on, nothing was handed over)" in text
    assert "3044 ms (OS frozen until V had verified the image)" in text
