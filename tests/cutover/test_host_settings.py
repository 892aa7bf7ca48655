"""The agent's safety net when the cutover helper dies without a word (killed, out of memory): what
the helper changes on P for the snapshot is read before the hand-over and put back after
(source_agent/host_settings.py: read_host_settings / restore_host_settings). Real interfaces and a real
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
import json, os, socket, struct, subprocess, sys
sys.path.insert(0, {repo!r})
from source_agent import host_settings as hs
from source_agent.stream_path import pin_neighbour, widen_route
from source_agent.link_cycle import set_admin_up

root, uplink, v_host = {root!r}, {ifname!r}, {v_host!r}
nic = "hsa0"  # the NIC the helper takes down: not the uplink, whose ARP entries admin-down would flush
subprocess.run(["ip", "link", "add", nic, "type", "veth", "peer", "name", "hsb0"], check=True)
subprocess.run(["ip", "link", "set", nic, "up"], check=True)
os.makedirs(f"{{root}}/{{uplink}}", exist_ok=True)
# V's ARP entry as traffic to it leaves one (no packet is sent)
subprocess.run(["ip", "neigh", "replace", v_host, "lladdr", "52:54:00:78:12:02", "dev", uplink, "nud", "reachable"],
               check=True)
os.makedirs(f"{{root}}/{{nic}}", exist_ok=True)
os.makedirs(f"{{root}}/bond9/bonding", exist_ok=True)
for option, value in (("miimon", "100"), ("downdelay", "0")):
    open(f"{{root}}/bond9/bonding/{{option}}", "w").write(value + "\\n")
size, pcp = f"{{root}}/image_size", f"{{root}}/percpu_pagelist_high_fraction"
open(size, "w").write("412000000\\n")
open(pcp, "w").write("0\\n")
saved = hs.read_host_settings([nic, "bond9"], root=root, image_size_path=size, v_host=v_host, pcp_path=pcp)
# what the helper does for the snapshot, then it dies
route, pin = widen_route(v_host, 40, 200), pin_neighbour(v_host, uplink)
subprocess.run(["tc", "qdisc", "add", "dev", nic, "clsact"], check=True)
set_admin_up(nic, False)
open(f"{{root}}/bond9/bonding/miimon", "w").write("10\\n")
open(f"{{root}}/bond9/bonding/downdelay", "w").write("10000\\n")
open(size, "w").write("1007353856\\n")
open(pcp, "w").write("100000\\n")
for name in (nic, "bond9"):  # their links back (the stand-in tree's word: the kick waits for it)
    open(f"{{root}}/{{name}}/carrier", "w").write("1\\n")
# the helper's note, right after the snapshot: V's side of a connection waits on segment 1000
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, socket.IPPROTO_TCP, 0, socket.inet_aton(v_host),
                 socket.inet_aton("10.78.12.1"))
note = root + "/peers.json"
hs.write_peer_note(note, [(ip + struct.pack("!HHI", 7000, 40000, 1000)).hex()])
{repair}
qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", nic], capture_output=True, text=True).stdout
flags = json.loads(subprocess.run(["ip", "-j", "link", "show", nic], capture_output=True, text=True).stdout)[0]["flags"]
routes = subprocess.run(["ip", "route", "show", v_host], capture_output=True, text=True).stdout
neigh = subprocess.run(["ip", "neigh", "show", v_host], capture_output=True, text=True).stdout
print(json.dumps({{"helper_route": route is not None, "helper_pin": pin is not None, "routes": routes, "neigh": neigh,
                  "saved_up": saved.admin_up, "bonds": saved.bonds, "done": done, "qdiscs": qdiscs, "flags": flags,
                  "miimon": open(f"{{root}}/bond9/bonding/miimon").read().strip(),
                  "downdelay": open(f"{{root}}/bond9/bonding/downdelay").read().strip(),
                  "image_size": open(size).read().strip(), "pcp": open(pcp).read().strip(),
                  "note_left": os.path.exists(note)}}))
"""


#: the agent repairs P itself (its helper died)
REPAIR_BY_AGENT = ("done = hs.restore_host_settings(saved, root=root, image_size_path=size, pcp_path=pcp, "
                   "peer_note=note)")
#: the agent died too: what it saw was written down before the hand-over, and a new agent process,
#: started in the same boot, repairs P from that file alone
REPAIR_BY_NEXT_AGENT = """
hs.write_pending(hs.pending_path(root + "/state"), hs.PendingCutover(saved, hs.current_boot_id(), helper_pid=0,
                                                                     peer_note=note))
later = subprocess.run([sys.executable, "-c", "import asyncio, json, sys; sys.path.insert(0, " + repr({repo!r}) + "); "
                        "from source_agent import host_settings as hs; "
                        "print(json.dumps(asyncio.run(hs.recover_interrupted_cutover(sys.argv[1], root=sys.argv[2], "
                        "image_size_path=sys.argv[3], pcp_path=sys.argv[4]))))", root + "/state", root, size, pcp],
                       capture_output=True, text=True, check=True)
done = [d.strip() for d in json.loads(later.stdout)[0].split(":", 1)[1].split(",")]
assert not os.path.exists(hs.pending_path(root + "/state"))
"""


@pytest.mark.netns
@pytest.mark.parametrize("repair", [REPAIR_BY_AGENT, REPAIR_BY_NEXT_AGENT], ids=["agent", "next-agent"])
def test_agent_puts_p_settings_back_after_a_silent_helper(tmp_path, repair: str) -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("hset", subnet="10.78.12") as pair:
        code = SNIPPET.format(repo=str(REPO), root=str(tmp_path / "net"), ifname=pair.left_if, v_host=pair.right_ip,
                              repair=repair.format(repo=str(REPO)))
        res = subprocess.run([*pair.exec_prefix(pair.left), sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["saved_up"] == ["hsa0", pair.left_if], out  # bond9 is no interface here: only read as a bond
    assert out["bonds"] == {"bond9": {"miimon": "100", "downdelay": "0"}}, out
    assert "clsact" not in out["qdiscs"] and "UP" in out["flags"], out
    assert (out["miimon"], out["downdelay"], out["image_size"], out["pcp"]) == ("100", "0", "412000000", "0"), out
    assert "block lifted on hsa0" in out["done"] and "hsa0 up" in out["done"], out
    # the helper's host route to V and its pinned ARP entry: gone, and only those
    assert out["helper_route"] and out["helper_pin"], out
    assert out["routes"].strip() == "", out  # `ip route show V` lists the /32 route to V only
    assert "PERMANENT" not in out["neigh"] and "52:54:00:78:12:02" in out["neigh"], out
    assert f"route to {pair.right_ip} removed" in out["done"], out
    assert f"{pair.right_ip}'s neighbour entry unpinned" in out["done"], out
    # the peer the helper noted is kicked (raw ICMP to V's side, real sockets), and the note is used up
    assert "8 ICMP for 1 peer connection(s)" in out["done"] and not out["note_left"], out


SNIPPET_OWN_ROUTE = """
import json, subprocess, sys
sys.path.insert(0, {repo!r})
from source_agent import host_settings as hs

nic, v_host = {ifname!r}, {v_host!r}
subprocess.run(["ip", "route", "add", v_host + "/32", "dev", nic], check=True)  # the admin's own route
subprocess.run(["ip", "neigh", "replace", v_host, "lladdr", "52:54:00:78:12:02", "dev", nic, "nud", "permanent"],
               check=True)
saved = hs.read_host_settings([], root={root!r}, image_size_path={root!r} + "/none", v_host=v_host,
                              pcp_path={root!r} + "/none")
done = hs.restore_host_settings(saved, root={root!r}, image_size_path={root!r} + "/none", pcp_path={root!r} + "/none")
print(json.dumps({{"done": done, "routes": subprocess.run(["ip", "route", "show", v_host], capture_output=True,
                                                        text=True).stdout,
                  "neigh": subprocess.run(["ip", "neigh", "show", v_host], capture_output=True, text=True).stdout}}))
"""


@pytest.mark.netns
def test_agent_leaves_routes_and_entries_it_did_not_see_made(tmp_path) -> None:
    """A host route to V and a permanent ARP entry that were there before the cutover are P's own."""
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    (tmp_path / "net").mkdir()
    with netns_pair("hown", subnet="10.78.13") as pair:
        code = SNIPPET_OWN_ROUTE.format(repo=str(REPO), root=str(tmp_path / "net"), ifname=pair.left_if,
                                        v_host=pair.right_ip)
        res = subprocess.run([*pair.exec_prefix(pair.left), sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    assert pair.right_ip in out["routes"] and "PERMANENT" in out["neigh"], out
    assert not any("route" in d or "neighbour" in d for d in out["done"]), out


SNIPPET_LEFTOVER_ROUTE = """
import json, subprocess, sys
sys.path.insert(0, {repo!r})
from source_agent import host_settings as hs
from source_agent.stream_path import widen_route

v_host = {v_host!r}
widen_route(v_host, 40, 200)  # an earlier helper's, killed with its agent before anything put P back
saved = hs.read_host_settings([], root={root!r}, image_size_path={root!r} + "/none", v_host=v_host,
                              pcp_path={root!r} + "/none")
done = hs.restore_host_settings(saved, root={root!r}, image_size_path={root!r} + "/none", pcp_path={root!r} + "/none")
print(json.dumps({{"v_route": saved.v_route, "done": done,
                  "routes": subprocess.run(["ip", "route", "show", v_host], capture_output=True, text=True).stdout}}))
"""


@pytest.mark.netns
def test_agent_takes_an_earlier_helpers_route_for_p2vs_not_ps(tmp_path) -> None:
    """A route to V with p2v's mark (common.net_route.RTPROT_P2V) found before the cutover was left by
    a killed helper: it is not P's own, and the safety net removes it."""
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    (tmp_path / "net").mkdir()
    with netns_pair("hleft", subnet="10.78.15") as pair:
        code = SNIPPET_LEFTOVER_ROUTE.format(repo=str(REPO), root=str(tmp_path / "net"), v_host=pair.right_ip)
        res = subprocess.run([*pair.exec_prefix(pair.left), sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["v_route"] is False, out
    assert f"route to {pair.right_ip} removed" in out["done"], out
    assert out["routes"].strip() == "", out
