"""V's ARP entry survives P's link loss during CREATE_IMAGE (real neighbour table, in namespaces)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.agents import REPO
from tests.netns import can_use_netns, netns_pair

pytestmark = pytest.mark.netns

SNIPPET = """
import json, subprocess, sys
sys.path.insert(0, {repo!r})
from source_agent.stream_path import pin_neighbour, unpin_neighbour

def show():
    return subprocess.run(["ip", "neigh", "show", {ip!r}], capture_output=True, text=True).stdout.strip()

import socket, time
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(50):  # bounded: a datagram makes the kernel resolve V (ARP), as P's traffic had
    udp.sendto(b"x", ({ip!r}, 9))
    if "lladdr" in show():
        break
    time.sleep(0.1)
out = {{"before": show()}}
pin = pin_neighbour({ip!r}, {ifname!r})
out["pinned"] = show()
def carrier_loss():
    # the peer end goes down: our link stays up, its carrier drops (as P's NIC's does); returns
    # what the table holds while the carrier is off
    subprocess.run(["ip", "-n", {peer_ns!r}, "link", "set", {peer_if!r}, "down"], check=True)
    for _ in range(30):  # bounded: the kernel's link watcher flushes the table shortly after
        time.sleep(0.1)
        seen = show()
        if "lladdr" not in seen:
            break
    subprocess.run(["ip", "-n", {peer_ns!r}, "link", "set", {peer_if!r}, "up"], check=True)
    time.sleep(0.3)
    return seen

out["after_link_loss"] = carrier_loss()
unpin_neighbour(pin)
out["unpinned"] = show()
out["unpinned_after_link_loss"] = carrier_loss()
out["nothing_to_pin"] = pin_neighbour("10.78.9.9", {ifname!r}) is None
print(json.dumps(out))
"""


def test_pinned_entry_survives_carrier_loss_and_is_released() -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("pin", subnet="10.78.9") as pair:
        code = SNIPPET.format(repo=str(REPO), ip=pair.right_ip, ifname=pair.left_if, peer_ns=pair.right,
                              peer_if=pair.right_if)
        res = subprocess.run([*pair.exec_prefix(pair.left), sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    mac_state = out["before"].split()
    assert "lladdr" in mac_state, out  # the ping resolved V
    assert "PERMANENT" in out["pinned"], out
    assert "PERMANENT" in out["after_link_loss"], out  # an ordinary entry would be gone here
    assert "STALE" in out["unpinned"] and "PERMANENT" not in out["unpinned"], out
    assert "lladdr" not in out["unpinned_after_link_loss"], out  # what happens without the pin
    assert out["nothing_to_pin"]
