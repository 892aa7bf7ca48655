"""The agent's safety net when the cutover helper dies without a word (killed, out of memory): what
the helper changes on P for the snapshot is read before the hand-over and put back after
(source_agent/cutover.py: read_host_settings / restore_host_settings). Real interfaces and a real
clsact qdisc in a network namespace; the bond's and the kernel's files on a stand-in tree (the host
kernel has no bonding)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.agents import REPO
from tests.netns import can_use_netns, netns_pair

SNIPPET = """
import json, os, subprocess, sys
sys.path.insert(0, {repo!r})
from source_agent import cutover
from source_agent.link_cycle import set_admin_up

root, nic = {root!r}, {ifname!r}
os.makedirs(f"{{root}}/{{nic}}", exist_ok=True)
os.makedirs(f"{{root}}/bond9/bonding", exist_ok=True)
for option, value in (("miimon", "100"), ("downdelay", "0")):
    open(f"{{root}}/bond9/bonding/{{option}}", "w").write(value + "\\n")
size = f"{{root}}/image_size"
open(size, "w").write("412000000\\n")
saved = cutover.read_host_settings([nic, "bond9"], root=root, image_size_path=size)
# what the helper does for the snapshot, then it dies
subprocess.run(["tc", "qdisc", "add", "dev", nic, "clsact"], check=True)
set_admin_up(nic, False)
open(f"{{root}}/bond9/bonding/miimon", "w").write("10\\n")
open(f"{{root}}/bond9/bonding/downdelay", "w").write("10000\\n")
open(size, "w").write("1007353856\\n")
done = cutover.restore_host_settings(saved, root=root, image_size_path=size)
qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", nic], capture_output=True, text=True).stdout
flags = json.loads(subprocess.run(["ip", "-j", "link", "show", nic], capture_output=True, text=True).stdout)[0]["flags"]
print(json.dumps({{"saved_up": saved.admin_up, "bonds": saved.bonds, "done": done, "qdiscs": qdiscs, "flags": flags,
                  "miimon": open(f"{{root}}/bond9/bonding/miimon").read().strip(),
                  "downdelay": open(f"{{root}}/bond9/bonding/downdelay").read().strip(),
                  "image_size": open(size).read().strip()}}))
"""


@pytest.mark.netns
def test_agent_puts_p_settings_back_after_a_silent_helper(tmp_path) -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("hset", subnet="10.78.12") as pair:
        code = SNIPPET.format(repo=str(REPO), root=str(tmp_path / "net"), ifname=pair.left_if)
        res = subprocess.run([*pair.exec_prefix(pair.left), sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["saved_up"] == [pair.left_if], out  # bond9 is no interface here: only read as a bond
    assert out["bonds"] == {"bond9": {"miimon": "100", "downdelay": "0"}}, out
    assert "clsact" not in out["qdiscs"] and "UP" in out["flags"], out
    assert (out["miimon"], out["downdelay"], out["image_size"]) == ("100", "0", "412000000"), out
    assert f"block lifted on {pair.left_if}" in out["done"] and f"{pair.left_if} up" in out["done"], out
