"""The helper's link handling around CREATE_IMAGE, on a fake /sys/class/net: the bond keeps its
slave through the link loss, and the stream waits for a slave with carrier."""

from __future__ import annotations

from pathlib import Path

from source_agent.stream_path import carrier_check, hold_bond_slaves, release_bond_slaves


def _bond(root: Path, name: str, miimon: str, downdelay: str, slaves: list[str]) -> None:
    (root / name / "bonding").mkdir(parents=True)
    (root / name / "bonding" / "miimon").write_text(miimon + "\n")
    (root / name / "bonding" / "downdelay").write_text(downdelay + "\n")
    (root / name / "carrier").write_text("1\n")
    for slave in slaves:
        (root / slave).mkdir()
        (root / slave / "carrier").write_text("1\n")
        (root / name / f"lower_{slave}").symlink_to(root / slave)


def test_bond_downdelay_held_and_given_back(tmp_path: Path) -> None:
    _bond(tmp_path, "p2vbond0", "100", "0", ["eth0"])
    _bond(tmp_path, "arpbond", "0", "0", ["eth1"])  # ARP-monitored: left alone
    _bond(tmp_path, "fastbond", "5", "15", ["eth2"])  # polls faster than the hold's interval already
    saved = hold_bond_slaves(["eth0", "p2vbond0", "arpbond", "fastbond", "gone0"], root=str(tmp_path),
                             hold_ms=9995)
    assert saved == {"p2vbond0": {"miimon": "100", "downdelay": "0"},
                     "fastbond": {"miimon": "5", "downdelay": "15"}}
    assert (tmp_path / "p2vbond0/bonding/miimon").read_text() == "10\n"
    assert (tmp_path / "p2vbond0/bonding/downdelay").read_text() == "10000\n"  # a multiple of miimon
    assert (tmp_path / "fastbond/bonding/miimon").read_text() == "5\n"
    assert (tmp_path / "fastbond/bonding/downdelay").read_text() == "9995\n"
    assert (tmp_path / "arpbond/bonding/downdelay").read_text() == "0\n"
    release_bond_slaves(saved, root=str(tmp_path))
    assert (tmp_path / "p2vbond0/bonding/miimon").read_text() == "100\n"
    assert (tmp_path / "p2vbond0/bonding/downdelay").read_text() == "0\n"
    assert (tmp_path / "fastbond/bonding/downdelay").read_text() == "15\n"
    release_bond_slaves({"gone0": {"miimon": "100", "downdelay": "0"}}, root=str(tmp_path))  # never raises


def test_link_is_back_when_a_slave_has_carrier(tmp_path: Path) -> None:
    _bond(tmp_path, "p2vbond0", "100", "0", ["eth0"])
    up = carrier_check("p2vbond0", root=str(tmp_path))
    assert up is not None and up()
    (tmp_path / "eth0" / "carrier").write_text("0\n")  # the bond holds its carrier, the NIC's is down
    assert not up()
    (tmp_path / "eth0" / "carrier").write_text("1\n")
    (tmp_path / "p2vbond0" / "carrier").write_text("0\n")
    assert not up()
