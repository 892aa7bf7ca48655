"""Both agents as real processes in their own network namespaces, talking gRPC over mutual TLS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import version
from tests.agents import REPO, AgentProcess
from tests.foundation.conftest import dest_config
from tests.netns import netns_pair

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("needs_netns")]
PEER = str(Path(__file__).with_name("peer.py"))


@pytest.fixture
def two_hosts(short_tmp, tls_dir):
    with netns_pair("fnd", "10.78.0") as pair:
        address = f"{pair.right_ip}:7470"
        dest = AgentProcess("dest_agent.main", ["--config", str(dest_config(short_tmp, tls_dir, address))],
                            short_tmp, netns=pair.right, name="dest")
        try:
            dest.wait_ready()
            yield pair, dest, address
        finally:
            dest.stop()


def run_peer(pair, scenario: str, address: str, tls_dir: Path, cert: str = "p2v-source",
             timeout: float = 60) -> dict:
    proc = subprocess.run(["ip", "netns", "exec", pair.left, sys.executable, PEER, scenario, address,
                           str(tls_dir), cert], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_session_over_mutual_tls(two_hosts, tls_dir):
    pair, dest, address = two_hosts
    out = run_peer(pair, "session", address, tls_dir)
    assert out["negotiated"]["protocol"] == version.PROTOCOL_VERSION
    assert "zstd" in out["negotiated"]["caps"]
    assert "p2v-source" in out["negotiated"]["peer_identity"]
    assert out["catalog"], "the destination serves a non-empty virtual device catalog"
    assert out["prepare"]["id"] and out["prepare"]["window"] == 8
    assert out["acks"] == ["ACK_STATUS_OK"] * 8
    assert out["pages_written"] == 512
    assert out["round"] == {"durable": True, "pages_held": 512}
    assert out["hashes_match"] is True
    assert out["status"] == {"state": "MIGRATION_STATE_ACTIVE", "normal": 384, "duplicate": 128}
    assert out["cancel"] == "MIGRATION_STATE_CANCELLED"
    assert out["after_cancel"] == ["ACK_STATUS_REJECTED"]
    assert dest.proc.poll() is None


@pytest.mark.parametrize("scenario,cert", [("rogue", "p2v-source"), ("nocert", "p2v-source")])
def test_untrusted_client_is_refused(two_hosts, tls_dir, scenario, cert):
    pair, dest, address = two_hosts
    out = run_peer(pair, scenario, address, tls_dir, cert)
    assert out["negotiate"]["code"] == "UNAVAILABLE", out
    assert dest.proc.poll() is None


def test_unknown_peer_identity_is_refused(two_hosts, tls_dir):
    """Signed by our CA but not an allowed agent identity (p2vctl's certificate)."""
    pair, _dest, address = two_hosts
    out = run_peer(pair, "unknown-peer", address, tls_dir, "p2vctl")
    assert out["negotiate"]["code"] == "PERMISSION_DENIED"
    assert "not an allowed p2v agent" in out["negotiate"]["details"]


def test_unsupported_protocol_version(two_hosts, tls_dir):
    pair, _dest, address = two_hosts
    out = run_peer(pair, "version", address, tls_dir)
    assert out["negotiate"]["code"] == "FAILED_PRECONDITION"
    assert "unsupported protocol version 99" in out["negotiate"]["details"]
    assert out["hello"]["code"] == "FAILED_PRECONDITION"
    assert "no common protocol version" in out["hello"]["details"]


def test_malformed_and_oversized_messages(two_hosts, tls_dir):
    pair, dest, address = two_hosts
    out = run_peer(pair, "malformed", address, tls_dir)
    statuses = [a[0] for a in out["acks"]]
    assert statuses == ["ACK_STATUS_OK"] + ["ACK_STATUS_REJECTED"] * 4, out["acks"]
    errors = [a[1] for a in out["acks"][1:]]
    assert "checksum" in errors[0]
    assert "range" in errors[1] or "max_pfn" in errors[1]
    assert "replayed" in errors[2]
    assert errors[3]
    assert out["held_ok"] is True, "rejected batches changed the store"
    assert out["oversized"]["code"] == "RESOURCE_EXHAUSTED"
    # gRPC itself refuses a request it cannot deserialize; our handler never runs.
    assert out["garbage_prepare"]["code"] in ("INTERNAL", "UNKNOWN", "INVALID_ARGUMENT"), out["garbage_prepare"]
    assert "error parsing message" in out["garbage_prepare"]["details"].lower(), out["garbage_prepare"]
    assert out["alive"] == "MIGRATION_STATE_ACTIVE"
    assert dest.proc.poll() is None


def test_sigterm_during_push(two_hosts, tls_dir, short_tmp):
    pair, dest, address = two_hosts
    peer = subprocess.Popen(["ip", "netns", "exec", pair.left, sys.executable, PEER, "push-forever", address,
                             str(tls_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = peer.stdout.readline()
        assert line.strip() == "PUSHING"
        elapsed = dest.terminate()
        assert dest.proc.returncode == 0, dest.output()
        assert elapsed < 5.0, f"daemon took {elapsed:.1f} s to stop"
        result = json.loads(peer.communicate(timeout=30)[0].strip().splitlines()[-1])
        assert result["acked"] >= 20
        assert result["ended"] != "stream completed"
    finally:
        peer.kill()
    meta = json.loads((short_tmp / "dest-state" / "migrations" / "sigterm-test" / "meta.json").read_text())
    assert meta["state"] == "failed"
    assert meta["durable_round"] == 0, "an interrupted round must not be recorded as complete"
    assert "stopped" in meta["error"]
    time.sleep(0)
