"""The VM's NIC takes P's NIC's place after resume (source_agent/resume.py adopt_nic), without a
bond: real netlink in a network namespace the test made. P's NIC is still there at that point (dead,
with P's MAC: its PCI function goes only after UNFREEZE), so the new NIC must be told from it, and
P's subnet must route through the new NIC. A rig run without redundancy found both wrong: the step
picked P's dead NIC, and the VM's stayed down without P's address. (With a bond, the rig's whole-OS
test covers it.) /sys/class/net is a fake (a veth has no PCI device); everything else is real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agents import REPO
from tests.netns import can_use_netns, ip, netns_pair

MAC = "52:54:00:78:13:01"

SNIPPET = """
import json, subprocess, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from source_agent import resume

resume.SYS = Path({sys_root!r})
said = resume.adopt_nic({old!r}, {mac!r}, addresses=[({ip!r}, 24)], routes=[])
links = {{l["ifname"]: l for l in json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True,
                                                          check=True).stdout)}}
route = subprocess.run(["ip", "-j", "route", "get", {peer!r}], capture_output=True, text=True, check=True).stdout
import socket, time
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the peer's ARP answer comes back
    s.sendto(b"x", ({peer!r}, 9))                              # only through a live NIC
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    neigh = json.loads(subprocess.run(["ip", "-j", "neigh", "show", {peer!r}], capture_output=True, text=True,
                                      check=True).stdout)
    if neigh and neigh[0].get("lladdr"):
        break
    time.sleep(0.05)
ping = {{"dev": neigh[0]["dev"], "lladdr": neigh[0].get("lladdr", "")}} if neigh else {{}}
print(json.dumps({{"said": said, "route_dev": json.loads(route)[0]["dev"], "ping": ping,
                  "announced": resume.announce({ip!r}, count=1),
                  "old": {{"up": "UP" in links[{old!r}]["flags"],
                          "v4": [a["local"] for a in links[{old!r}]["addr_info"] if a["family"] == "inet"]}},
                  "new": {{"up": "UP" in links[{new!r}]["flags"],
                          "v4": [a["local"] for a in links[{new!r}]["addr_info"] if a["family"] == "inet"]}}}}))
"""


def fake_sys(root: Path, nics: dict[str, str]) -> Path:
    """/sys/class/net with a PCI device under each NIC (what _netdev_by_mac reads)."""
    for name, mac in nics.items():
        (root / "class/net" / name / "device").mkdir(parents=True)
        (root / "class/net" / name / "address").write_text(mac + "\n")
    return root


@pytest.mark.netns
def test_without_a_bond_the_vm_nic_takes_p_s_address_and_p_s_dead_nic_lets_go(tmp_path: Path) -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("adopt", subnet="10.78.13") as pair:
        # P's NIC (left_if) keeps P's address and MAC but its wire is dead (the peer end is down);
        # the VM's NIC is a second veth with P's MAC, down, its peer holding the address P talks to
        old, new, peer_end = pair.left_if, "p2vtadoptn", "p2vtadoptm"
        ip("-n", pair.left, "link", "set", old, "address", MAC)
        ip("-n", pair.right, "link", "set", pair.right_if, "down")
        ip("-n", pair.right, "addr", "del", f"{pair.right_ip}/24", "dev", pair.right_if)
        ip("link", "add", new, "netns", pair.left, "type", "veth", "peer", "name", peer_end, "netns", pair.right)
        ip("-n", pair.left, "link", "set", new, "address", MAC)
        ip("-n", pair.right, "addr", "add", f"{pair.right_ip}/24", "dev", peer_end)
        ip("-n", pair.right, "link", "set", peer_end, "up")
        peer_mac = json.loads(ip("-n", pair.right, "-j", "link", "show", peer_end).stdout)[0]["address"]
        sys_root = fake_sys(tmp_path / "sys", {old: MAC, new: MAC})
        code = SNIPPET.format(repo=str(REPO), sys_root=str(sys_root), old=old, new=new, mac=MAC,
                              ip=pair.left_ip, peer=pair.right_ip)
        res = subprocess.run([*pair.exec_prefix(pair.left), sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["said"] == f"{new} carries {old}'s addresses", out
    assert out["new"] == {"up": True, "v4": [pair.left_ip]}, out
    assert out["old"] == {"up": False, "v4": []}, out
    # P's subnet goes through the VM's NIC, and the peer answers there
    assert out["route_dev"] == new and out["ping"] == {"dev": new, "lladdr": peer_mac}, out
    assert f"from {new}" in out["announced"], out  # the gratuitous ARP leaves by the live NIC
