"""V's route to P while the image comes (dest_agent.cutover.ack_route), in network namespaces: a
connection made over it retransmits after 50 ms instead of the kernel's 200 ms, and the route goes
again. One that a killed agent left is found by p2v's mark: replaced by the next cutover's, removed
at the next agent's start (sweep_ack_routes); the host's own /32 is never touched. And the gRPC peer
strings it is made from."""

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
out["twice"] = ack_route({ip!r}) is not None  # p2v's own route to it (an earlier agent's): replaced
out["routes_after_twice"] = routes().count("proto 177")
drop_ack_route(route)
out["after"] = routes()
out["ss_after"] = rto_after_a_round_trip()
drop_ack_route(None)
print(json.dumps(out))
"""

LEFTOVER = """
import json, subprocess, sys
sys.path.insert(0, {repo!r})
from dest_agent.cutover import ack_route, drop_ack_route, sweep_ack_routes

def routes():
    shown = subprocess.run(["ip", "route", "show", "exact", {ip!r} + "/32"], capture_output=True, text=True)
    return shown.stdout.strip()

out = {{}}
ack_route({ip!r})  # the agent is killed here: its route stays
out["left"] = routes()
again = ack_route({ip!r})  # the next cutover's: replaces the leftover
out["replaced"] = again is not None
out["after_replace"] = routes()
ack_route({ip!r})  # killed again
out["swept"] = sweep_ack_routes()
out["after_sweep"] = routes()
out["swept_again"] = sweep_ack_routes()
# the host's own /32 to P: neither replaced nor swept
subprocess.run(["ip", "route", "add", {ip!r} + "/32", "dev", {dev!r}, "proto", "static"], check=True)
out["host_route_kept"] = ack_route({ip!r}) is None
out["host_swept"] = sweep_ack_routes()
out["host_after"] = routes()
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
    assert out["twice"] and out["routes_after_twice"] == 1, out
    assert out["after"] == "", out
    assert ss_rto_ms(out["ss_after"]) >= 200, out


@pytest.mark.netns
def test_a_killed_agents_route_is_replaced_then_swept_and_the_hosts_own_kept() -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("ackrt2", subnet="10.78.14") as pair:
        out = pair.run_json(LEFTOVER.format(repo=str(REPO), ip=pair.right_ip, dev=pair.left_if))
    assert "proto 177" in out["left"] and "rto_min lock 50ms" in out["left"], out
    assert out["replaced"], out
    assert out["after_replace"].count(pair.right_ip) == 1 and "proto 177" in out["after_replace"], out
    assert out["swept"] == [pair.right_ip], out
    assert out["after_sweep"] == "", out
    assert out["swept_again"] == [], out
    assert out["host_route_kept"], out
    assert out["host_swept"] == [], out
    assert "proto static" in out["host_after"] and "rto_min" not in out["host_after"], out


def test_only_an_ipv4_peer_gets_a_route() -> None:
    assert peer_ipv4("ipv4:10.77.0.10:51234") == "10.77.0.10"
    assert peer_ipv4("ipv6:[::1]:51234") == ""
    assert peer_ipv4("unix:/run/p2v/dest.sock") == ""
    assert peer_ipv4("ipv4:not-an-address:1") == ""
    assert peer_ipv4("") == ""
