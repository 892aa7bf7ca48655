"""V's route to P while the image comes (dest_agent.cutover.ack_route), in network namespaces: a
connection made over it retransmits after 50 ms instead of the kernel's 200 ms, and the route goes
again. And the gRPC peer strings it is made from."""

from __future__ import annotations

import pytest

from common.net_route import peer_ipv4
from tests.agents import REPO
from tests.netns import can_use_netns, netns_pair, ss_rto_ms

SNIPPET = """
import json, socket, subprocess, sys, time
sys.path.insert(0, {repo!r})
from dest_agent.cutover import ack_route, drop_ack_route

def routes():
    shown = subprocess.run(["ip", "route", "show", "exact", {ip!r} + "/32"], capture_output=True, text=True)
    return shown.stdout.strip()

def rto_after_a_round_trip():
    with socket.create_connection(({ip!r}, {port})) as sock:
        sock.sendall(b"x")
        sock.recv(1)  # the peer's echo: V's data was acknowledged, the RTO is set from the RTT
        return subprocess.run(["ss", "-tin", "dst", {ip!r}], capture_output=True, text=True).stdout

out = {{"none": ack_route("") is None}}
route = ack_route({ip!r})
out["route"] = routes()
out["ss"] = rto_after_a_round_trip()
out["twice"] = ack_route({ip!r}) is None  # a host route exists now: not ours to replace
drop_ack_route(route)
out["after"] = routes()
out["ss_after"] = rto_after_a_round_trip()
drop_ack_route(None)
print(json.dumps(out))
"""


@pytest.mark.netns
def test_v_route_to_p_resends_after_50_ms_and_goes_again() -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("ackrt", subnet="10.78.13") as pair:
        echo = ("import socket\n"
                f"s=socket.create_server(('{pair.right_ip}', 7302))\n"
                "s.settimeout(30)\n"
                "for _ in range(2):\n"
                "    c,_=s.accept(); c.sendall(c.recv(1)); c.recv(1); c.close()\n")
        out = pair.run_json(SNIPPET.format(repo=str(REPO), ip=pair.right_ip, port=7302), server=echo)
    assert out["none"], out
    assert "rto_min lock 50ms" in out["route"], out
    assert ss_rto_ms(out["ss"]) < 100, out
    assert out["twice"], out
    assert out["after"] == "", out
    assert ss_rto_ms(out["ss_after"]) >= 200, out


def test_only_an_ipv4_peer_gets_a_route() -> None:
    assert peer_ipv4("ipv4:10.77.0.10:51234") == "10.77.0.10"
    assert peer_ipv4("ipv6:[::1]:51234") == ""
    assert peer_ipv4("unix:/run/p2v/dest.sock") == ""
    assert peer_ipv4("ipv4:not-an-address:1") == ""
    assert peer_ipv4("") == ""
