"""P's NIC cycled around the snapshot (source_agent/link_cycle.py): the policy and the path on a
fake /sys/class/net, the cycle's bookkeeping with the kernel calls stood in for, and the real ioctls
on a veth in a network namespace. The e1000 case itself runs in the rig's whole-OS test."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from source_agent import link_cycle as LC
from tests.agents import REPO
from tests.netns import can_use_netns, netns_pair


def _nic(root: Path, name: str, driver: str = "", lowers: tuple[str, ...] = ()) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    if driver:
        (root / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        (root / name / "device").mkdir()
        (root / name / "device" / "driver").symlink_to(root / "drivers" / driver)
    for lower in lowers:
        (root / name / f"lower_{lower}").symlink_to(root / lower)


def test_path_goes_down_through_vlan_and_bond_to_the_nics(tmp_path: Path) -> None:
    _nic(tmp_path, "eth0", "e1000")
    _nic(tmp_path, "eth1", "igb")
    _nic(tmp_path, "p2vbond0", lowers=("eth0", "eth1"))
    _nic(tmp_path, "p2vbond0.7", lowers=("p2vbond0",))
    path = LC.path_nics("p2vbond0.7", root=str(tmp_path))
    assert path == [LC.PathNic("p2vbond0.7", ""), LC.PathNic("p2vbond0", ""),
                    LC.PathNic("eth0", "e1000"), LC.PathNic("eth1", "igb")]
    assert LC.nics_to_cycle(path) == ["eth0"]  # igb: not measured, its own thaw path applies
    assert LC.path_nics("", root=str(tmp_path)) == []
    assert LC.path_nics("gone0", root=str(tmp_path)) == [LC.PathNic("gone0", "")]


def _ethtool_cmd(speed: int, lp_advertising: int = 0) -> bytes:
    cmd = bytearray(44)  # struct ethtool_cmd
    struct.pack_into("IIIH", cmd, 0, LC.ETHTOOL_GSET, 0xEF, 0xEF, speed & 0xFFFF)
    struct.pack_into("H", cmd, 28, speed >> 16)
    struct.pack_into("I", cmd, 32, lp_advertising)
    return bytes(cmd)


def test_speed_is_read_from_speed_and_speed_hi() -> None:
    assert LC.speed_of(_ethtool_cmd(1000, lp_advertising=0xEF)) == 1000
    assert LC.speed_of(_ethtool_cmd(100_000)) == 100_000  # above 65535: speed_hi counts
    assert LC.speed_of(_ethtool_cmd(0xFFFFFFFF, lp_advertising=0xEF)) == 0  # SPEED_UNKNOWN: no link
    assert LC.speed_of(_ethtool_cmd(0)) == 0


class FakeLinks:
    """Stands in for the two ioctls (pure bookkeeping under test, not the kernel)."""

    def __init__(self, up: dict[str, bool], speed: dict[str, int]) -> None:
        self.up, self.speed_of, self.calls = dict(up), dict(speed), []

    def flags(self, name: str) -> int:
        if name not in self.up:
            raise OSError(19, "No such device")
        return LC.IFF_UP if self.up[name] else 0

    def set_up(self, name: str, up: bool) -> None:
        self.calls.append((name, up))
        self.up[name] = up

    def speed(self, name: str) -> int:
        return self.speed_of[name]


def _cycle(links: FakeLinks, names: list[str]) -> LC.LinkCycle:
    return LC.LinkCycle(names, set_up=links.set_up, flags=links.flags, speed=links.speed)


def test_cycle_brings_each_nic_up_when_its_phy_has_link() -> None:
    links = FakeLinks({"eth0": True, "eth1": True, "eth2": False}, {"eth0": 0, "eth1": 0, "eth2": 0})
    cycle = _cycle(links, ["eth0", "eth1", "eth2", "gone0"])
    cycle.take_down()
    assert cycle.down == ["eth0", "eth1"]  # eth2 was down already: not ours to bring up
    assert links.calls == [("eth0", False), ("eth1", False)]
    assert not cycle.poll() and not cycle.poll()  # negotiating: nothing touched
    assert links.calls == [("eth0", False), ("eth1", False)]
    links.speed_of["eth1"] = 1000
    assert not cycle.poll()
    assert links.up == {"eth0": False, "eth1": True, "eth2": False}
    links.speed_of["eth0"] = 100
    assert cycle.poll()
    assert set(cycle.raised) == {"eth0", "eth1"}
    calls = len(links.calls)
    assert cycle.poll() and len(links.calls) == calls  # done: no more ioctls
    cycle.restore()
    assert len(links.calls) == calls  # nothing left to restore


def test_abort_restores_what_was_taken_down_only() -> None:
    links = FakeLinks({"eth0": True, "eth2": False}, {"eth0": 0, "eth2": 0})
    cycle = _cycle(links, ["eth0", "eth2"])
    cycle.take_down()
    cycle.restore()
    assert links.up == {"eth0": True, "eth2": False}


SNIPPET = """
import json, subprocess, sys
sys.path.insert(0, {repo!r})
from source_agent import link_cycle as LC

def state():
    return json.loads(subprocess.run(["ip", "-j", "link", "show", {ifname!r}], capture_output=True,
                                     text=True, check=True).stdout)[0]["flags"]

out = {{"speed": LC.phy_speed({ifname!r}), "flags_up": bool(LC.link_flags({ifname!r}) & LC.IFF_UP)}}
cycle = LC.LinkCycle([{ifname!r}, "lo"])
cycle.take_down()
out["down"] = cycle.down
out["after_down"] = state()
out["speed_while_down"] = LC.phy_speed({ifname!r})  # a veth always reports its speed
out["poll"] = cycle.poll()
out["after_poll"] = state()
try:
    LC.phy_speed("nosuchnic0")
    out["missing"] = "no error"
except OSError as exc:
    out["missing"] = exc.errno
print(json.dumps(out))
"""


@pytest.mark.netns
def test_real_ioctls_take_a_veth_down_and_up() -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("cyc", subnet="10.78.11") as pair:
        out = pair.run_json(SNIPPET.format(repo=str(REPO), ifname=pair.left_if))
    assert out["flags_up"] and out["speed"] > 0, out
    assert out["down"] == [pair.left_if, "lo"], out  # lo: up in the namespace, taken down too
    assert "UP" not in out["after_down"], out
    assert out["speed_while_down"] > 0 and out["poll"], out
    assert "UP" in out["after_poll"], out
    assert out["missing"] == 19, out  # ENODEV
