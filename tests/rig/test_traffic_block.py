"""The cutover's traffic block with real packets, inside P (the host kernel lacks tc's gact action):
a namespace in P stands in for V, with an "image" port, NBD's and V's agent's, and for one of P's
peers (another address). Before FREEZE all pass, the peer too (the block is in place but its gate
is open: P's services answer until FREEZE); after `tighten` only the image stream passes; `open_path`
(an agent resolving a cutover its helper left) lets V's agent through and nothing else; `lift`
restores everything."""

from __future__ import annotations

import json

import pytest

from rig import Rig
from rig import config as C

pytestmark = [pytest.mark.rig, pytest.mark.timeout(600)]

SCRIPT = r"""
set -e
ip netns del p2vt-v 2>/dev/null || true
ip netns add p2vt-v
ip link add p2vt-a type veth peer name p2vt-b netns p2vt-v
ip addr add 10.99.0.1/24 dev p2vt-a && ip link set p2vt-a up
ip -n p2vt-v addr add 10.99.0.2/24 dev p2vt-b && ip -n p2vt-v addr add 10.99.0.3/24 dev p2vt-b
ip -n p2vt-v link set p2vt-b up && ip -n p2vt-v link set lo up
ip netns exec p2vt-v timeout 120 python3 -c '
import socket, threading
def serve(host, port):
    s = socket.create_server((host, port))
    while True:
        c, _ = s.accept(); c.sendall(b"hi"); c.close()
for h, p in (("10.99.0.2", 40000), ("10.99.0.2", 10809), ("10.99.0.2", 7470), ("10.99.0.3", 5000)):
    threading.Thread(target=serve, args=(h, p), daemon=True).start()
threading.Event().wait(115)
' &
sleep 1
cd OPT && timeout 90 python3 - <<'PY'
import json, socket
from source_agent import traffic_block as tb

def reach(port, host="10.99.0.2"):
    try:
        with socket.create_connection((host, port), timeout=1.5) as s:
            return s.recv(2) == b"hi"
    except OSError:
        return False

def all_ports():
    return [reach(40000), reach(10809), reach(7470), reach(5000, "10.99.0.3")]

out = {"before": all_ports()}
blocked = tb.apply(["p2vt-a"], "10.99.0.2", 40000)
out["applied_on"] = blocked
out["applied"] = all_ports()
tb.tighten(blocked)
out["tightened"] = all_ports()
tb.open_path(blocked, "10.99.0.2", 7470)
out["opened"] = all_ports()
out["lifted_on"] = tb.lift(blocked)
out["lifted"] = all_ports()
print(json.dumps(out))
PY
"""


def test_block_passes_only_the_image_stream_after_tighten(rig: Rig) -> None:
    try:
        res = rig.run(SCRIPT.replace("OPT", C.P_PROJECT_DIR), timeout=180)
    finally:
        rig.run("kill %1 2>/dev/null; ip link del p2vt-a 2>/dev/null; ip netns del p2vt-v 2>/dev/null; true",
                timeout=60)
    assert res.rc == 0, res.err
    out = json.loads(res.out.strip().splitlines()[-1])
    assert out["before"] == [True, True, True, True]
    assert out["applied_on"] == ["p2vt-a"]
    assert out["applied"] == [True, True, True, True]  # open until FREEZE: NBD's sync, P's peers
    assert out["tightened"] == [True, False, False, False]  # then nothing but the image stream
    assert out["opened"] == [True, False, True, False]  # V's agent, and still neither NBD nor peers
    assert out["lifted_on"] == ["p2vt-a"]
    assert out["lifted"] == [True, True, True, True]
