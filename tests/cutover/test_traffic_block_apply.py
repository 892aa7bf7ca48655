"""The traffic block's apply: one `tc -batch`, and on failure only what it added is removed.

The host kernel has clsact but no u32 classifier or gact action: apply fails part-way there, which is
exactly the path checked here (the passing path runs inside P: tests/rig/test_traffic_block.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from source_agent.traffic_block import (
    PRIO_DROP,
    PRIO_GATE,
    PRIO_V,
    TIGHTEN,
    applied_before,
    block_commands,
    open_path_commands,
)
from tests.agents import REPO
from tests.netns import can_use_netns, ip

NS = "p2vt-tcapply"


def test_applied_before_counts_only_commands_that_ran() -> None:
    cmds = block_commands(["eth0", "p2vbond0"], "10.0.0.2", 7000)
    per_interface = len(cmds) // 2
    assert applied_before(cmds, None) == ["eth0", "p2vbond0"]
    assert applied_before(cmds, 1) == []  # the first qdisc add failed: nothing is ours
    assert applied_before(cmds, 2) == ["eth0"]
    assert applied_before(cmds, per_interface + 1) == ["eth0"]
    assert applied_before(cmds, per_interface + 2) == ["eth0", "p2vbond0"]


def test_the_block_goes_in_open_and_tighten_closes_it() -> None:
    """apply installs every rule behind an open gate (P's peers are served until FREEZE); tighten
    removes the gate first, then V's wide pass rule: after it only the image stream and ARP pass."""
    cmds = block_commands(["eth0"], "10.0.0.2", 7000)
    assert cmds[0] == ["tc", "qdisc", "add", "dev", "eth0", "clsact"]
    for hook in ("egress", "ingress"):
        rules = [c for c in cmds[1:] if c[5] == hook]
        prios = [int(c[c.index("prio") + 1]) for c in rules]
        assert prios == sorted(prios) and prios[0] == PRIO_GATE and prios[-1] == PRIO_DROP
        assert rules[0][-4:] == ["all", "matchall", "action", "ok"]  # the gate: everything passes
        assert rules[-1][-4:] == ["all", "matchall", "action", "drop"]
    assert [prio for prio, _, _ in TIGHTEN] == [PRIO_GATE, PRIO_V]


def test_open_path_lets_one_port_of_v_through_and_refuses_bad_input() -> None:
    cmds = open_path_commands(["eth0", "p2vbond0"], "10.0.0.2", 7470)
    assert [c[4:6] for c in cmds] == [["eth0", "egress"], ["eth0", "ingress"],
                                      ["p2vbond0", "egress"], ["p2vbond0", "ingress"]]
    egress, ingress = cmds[0], cmds[1]
    assert egress[6:8] == ["prio", str(PRIO_V)] and egress[-2:] == ["action", "ok"]
    assert "dst" in egress and "10.0.0.2/32" in egress and egress[egress.index("dport") + 1] == "7470"
    assert "src" in ingress and ingress[ingress.index("sport") + 1] == "7470"
    for bad in ((["lo"], "10.0.0.2", 7470), (["eth0"], "v.example", 7470), (["eth0"], "10.0.0.2", 0),
                (["eth0; reboot"], "10.0.0.2", 7470)):
        with pytest.raises(ValueError):
            open_path_commands(*bad)


SNIPPET = """
import json, sys
sys.path.insert(0, {repo!r})
from source_agent import traffic_block as tb
try:
    tb.apply(["v0"], "10.99.0.2", 40000)
    print(json.dumps({{"error": ""}}))
except tb.BlockError as exc:
    print(json.dumps({{"error": str(exc)}}))
"""


def _run_apply() -> dict:
    out = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", SNIPPET.format(repo=str(REPO))],
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _qdiscs() -> str:
    return subprocess.run(["ip", "netns", "exec", NS, "tc", "qdisc", "show", "dev", "v0"],
                          capture_output=True, text=True, timeout=10).stdout


@pytest.fixture
def namespace():
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    ip("netns", "del", NS, check=False)
    ip("netns", "add", NS)
    try:
        ip("-n", NS, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip("-n", NS, "link", "set", "v0", "up")
        yield NS
    finally:
        ip("netns", "del", NS, check=False)


@pytest.mark.netns
def test_failed_apply_leaves_nothing_behind(namespace: str) -> None:
    result = _run_apply()
    if not result["error"]:
        pytest.skip("this kernel has u32 and gact: the block applies (checked in the rig instead)")
    assert "nothing left in place" in result["error"] and "filter add dev v0" in result["error"], result
    assert "clsact" not in _qdiscs()  # the qdisc apply added is gone again


@pytest.mark.netns
def test_failed_apply_keeps_a_clsact_that_was_there_before(namespace: str) -> None:
    subprocess.run(["ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", "v0", "clsact"], check=True, timeout=10)
    result = _run_apply()
    assert "qdisc add dev v0 clsact" in result["error"], result
    assert "clsact" in _qdiscs()  # not ours: left alone


LIFT = """
import json, sys
sys.path.insert(0, {repo!r})
from source_agent import traffic_block as tb
print(json.dumps([tb.lift(["v0", "gone0"]), tb.lift(["v0"])]))
"""


@pytest.mark.netns
def test_lift_removes_the_clsact_qdisc_by_plain_netlink(namespace: str) -> None:
    """The host has clsact (not u32): the qdisc `apply` adds is removed with its filters; an interface
    that is gone (P's NIC in the VM) or has no block is skipped, and nothing raises."""
    subprocess.run(["ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", "v0", "clsact"], check=True, timeout=10)
    assert "clsact" in _qdiscs()
    out = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", LIFT.format(repo=str(REPO))],
                         capture_output=True, text=True, timeout=60)
    first, again = json.loads(out.stdout.strip().splitlines()[-1])
    assert first == ["v0"] and again == [], out.stderr
    assert "clsact" not in _qdiscs()
