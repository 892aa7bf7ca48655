"""Pre-copy between two network namespaces with the link taken down and up mid-round.

The destination is the real p2v-dest daemon in one namespace; the source runs in the other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agents import REPO, AgentProcess
from tests.memory.harness import digest_pages
from tests.netns import can_use_netns, netns_pair

pytestmark = pytest.mark.netns
PEER = str(Path(__file__).with_name("netns_peer.py"))


@pytest.fixture
def short_tmp():
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="p2vt-mem-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not can_use_netns(), reason="needs root and iproute2 for network namespaces")
def test_link_down_up_mid_round(short_tmp) -> None:
    with netns_pair("mem", "10.79.0") as pair:
        address = f"{pair.right_ip}:7471"
        cfg = short_tmp / "dest.toml"
        cfg.write_text(f"""
[agent]
listen = "{address}"
state_dir = "{short_tmp / 'dest-state'}"
[tls]
insecure = true
[limits]
max_batch_bytes = 262144
window = 4
""")
        dest = AgentProcess("dest_agent.main", ["--config", str(cfg)], short_tmp, netns=pair.right, name="dest")
        try:
            dest.wait_ready()
            (short_tmp / "src").mkdir()
            proc = subprocess.run(
                ["ip", "netns", "exec", pair.left, sys.executable, PEER, address, str(short_tmp / "src"),
                 pair.left_if, "6"],
                capture_output=True, text=True, timeout=180, cwd=REPO)
            assert proc.returncode == 0, proc.stderr[-3000:] + dest.output()
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        finally:
            dest.stop()
    assert out["events"] == ["down", "up"]
    assert out["outcome"] == "completed"
    assert out["stream_failures"] >= 1, "the link was down for longer than the ack timeout"
    max_wire = out["max_batch_bytes"] + out["max_batch_bytes"] // 4096 * 9 + 256
    assert out["resent_bytes"] <= out["stream_failures"] * out["window"] * max_wire
    image = short_tmp / "dest-state" / "migrations" / out["migration_id"] / "memory.img"
    with open(image, "rb") as f:
        def read(pfn: int, count: int) -> bytes:
            f.seek(pfn * 4096)
            return f.read(count * 4096)

        assert digest_pages(read, out["max_pfn"]) == out["digest"]
