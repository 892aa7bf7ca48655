"""P's cutover route to V (widen_route / narrow_route) in network namespaces: a connection made over
it starts with the route's congestion window and retransmission floor, and the route goes again."""

from __future__ import annotations

import pytest

from tests.agents import REPO
from tests.netns import can_use_netns, netns_pair, ss_rto_ms

pytestmark = pytest.mark.netns

SNIPPET = """
import json, socket, subprocess, sys
sys.path.insert(0, {repo!r})
from source_agent.stream_path import narrow_route, widen_route

def routes():
    shown = subprocess.run(["ip", "route", "show", "exact", {ip!r} + "/32"], capture_output=True, text=True)
    return shown.stdout.strip()

def tcp_info(sock):
    return subprocess.run(["ss", "-tin", "dst", {ip!r}], capture_output=True, text=True).stdout

out = {{"before": routes()}}
spec = widen_route({ip!r}, 5000, 1500)
out["spec"] = [spec.dst, spec.oif > 0, spec.prefsrc]
out["route"] = routes()
with socket.create_connection(({ip!r}, {port})) as sock:
    out["ss"] = tcp_info(sock)
out["twice"] = widen_route({ip!r}, 5000, 1500) is not None  # p2v's own route to it (an earlier agent's): replaced
out["routes_after_twice"] = routes().count("proto 177")
narrow_route(spec)
out["after"] = routes()
with socket.create_connection(({ip!r}, {port})) as sock:
    out["ss_after"] = tcp_info(sock)
narrow_route(None)  # nothing to remove: no error
print(json.dumps(out))
"""


def test_cutover_route_widens_the_window_and_goes_again() -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("route", subnet="10.78.12") as pair:
        listener = ("import socket,time\n"
                    f"s=socket.create_server(('{pair.right_ip}', 7301))\n"
                    "s.settimeout(30)\n"
                    "for _ in range(2):\n"
                    "    c,_=s.accept(); time.sleep(0.3); c.close()\n")
        out = pair.run_json(SNIPPET.format(repo=str(REPO), ip=pair.right_ip, port=7301), server=listener)
    assert out["before"] == "", out
    assert out["spec"] == [pair.right_ip, True, pair.left_ip], out
    assert "initcwnd 5000" in out["route"] and "rto_min" in out["route"], out
    assert "cwnd:5000 " in out["ss"] and ss_rto_ms(out["ss"]) >= 1500, out
    assert out["twice"] and out["routes_after_twice"] == 1, out
    assert out["after"] == "", out
    assert "cwnd:10 " in out["ss_after"] and ss_rto_ms(out["ss_after"]) < 1500, out
