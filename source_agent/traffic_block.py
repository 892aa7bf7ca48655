"""Block P's traffic so that P's kernel acknowledges nothing after the snapshot that the VM will not
know about (a peer's data acknowledged by P but not in the image would be lost; data P does not
acknowledge is sent again by the peer, and then reaches the VM).

A clsact qdisc on every interface, per direction:
    prio 1  the image stream with V (V's address and the image socket's port)      pass
    prio 2  anything else with V (md's NBD leg: the sync inside FREEZE writes to it) pass
    prio 3  ARP                                                                     pass
    prio 4  everything else                                                         drop
`apply` installs it before FREEZE; `tighten` removes prio 2 right after FREEZE (nothing runs any
more; replies still in flight from V are then not acknowledged by P, V resends them to the VM);
`lift` removes the whole block (in the VM, or when the cutover is aborted). The block is
part of P's memory, so the OS wakes up in the VM with it still in place; resume lifts it once the
virtual NIC is in service.

`block_commands` is pure (tc argv lists); `apply` and `lift` are the I/O. `lift` uses netlink from
this process (pyroute2), because it also runs while every other task is frozen.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from collections.abc import Sequence

log = logging.getLogger(__name__)
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
PRIO_V = 2
ETH_P_IP = 0x0800
#: clsact's parents (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS))
PARENT_INGRESS, PARENT_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3


class BlockError(RuntimeError):
    pass


def block_commands(interfaces: Sequence[str], v_ip: str, v_port: int) -> list[list[str]]:
    ipaddress.IPv4Address(v_ip)  # raises ValueError on anything else
    if not 0 < v_port < 65536:
        raise ValueError(f"port {v_port} out of range")
    cmds: list[list[str]] = []
    for ifname in interfaces:
        if not _IFNAME.match(ifname) or ifname == "lo":
            raise ValueError(f"interface name {ifname!r} refused")
        cmds.append(["tc", "qdisc", "add", "dev", ifname, "clsact"])
        for direction, addr_key, port_key in (("egress", "dst", "dport"), ("ingress", "src", "sport")):
            base = ["tc", "filter", "add", "dev", ifname, direction]
            cmds.append([*base, "prio", "1", "protocol", "ip", "u32", "match", "ip", addr_key, f"{v_ip}/32",
                         "match", "ip", port_key, str(v_port), "0xffff", "action", "ok"])
            cmds.append([*base, "prio", str(PRIO_V), "protocol", "ip", "u32", "match", "ip", addr_key,
                         f"{v_ip}/32", "action", "ok"])
            cmds.append([*base, "prio", "3", "protocol", "arp", "matchall", "action", "ok"])
            cmds.append([*base, "prio", "4", "protocol", "all", "matchall", "action", "drop"])
    return cmds


def interfaces_to_block() -> list[str]:
    """Every interface except loopback that is up (physical NICs, bonds, their slaves)."""
    from pyroute2 import IPRoute

    names = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name != "lo" and link["flags"] & 1:
                names.append(name)
    return sorted(names)


def apply(interfaces: Sequence[str], v_ip: str, v_port: int, timeout_s: float = 10.0) -> list[str]:
    """Install the block; on any failure remove what was installed and raise BlockError."""
    done: list[str] = []
    try:
        for argv in block_commands(interfaces, v_ip, v_port):
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
            if res.returncode != 0:
                raise BlockError(f"{' '.join(argv)}: {res.stderr.strip()}")
            if argv[2] == "qdisc":
                done.append(argv[4])
    except (BlockError, OSError, subprocess.TimeoutExpired) as exc:
        lift(done)
        raise BlockError(f"traffic block failed, nothing left in place: {exc}") from None
    return done


def tighten(interfaces: Sequence[str]) -> None:
    """Drop the "anything with V" pass rule (netlink from this process: it runs while frozen)."""
    import socket

    from pyroute2 import IPRoute

    info = (PRIO_V << 16) | socket.htons(ETH_P_IP)
    with IPRoute() as ipr:
        for name in interfaces:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                raise BlockError(f"interface {name} vanished")
            for parent in (PARENT_EGRESS, PARENT_INGRESS):
                ipr.tc("del-filter", index=idx[0], parent=parent, info=info)


def lift(interfaces: Sequence[str]) -> list[str]:
    """Remove our clsact qdiscs (with their filters) where the interfaces still exist. Returns the
    interfaces it was removed from. Never raises: lifting must not stop a resume or an abort."""
    lifted: list[str] = []
    if not interfaces:
        return lifted
    try:
        from pyroute2 import IPRoute, NetlinkError

        with IPRoute() as ipr:
            for name in interfaces:
                idx = ipr.link_lookup(ifname=name)
                if not idx:
                    continue
                try:
                    ipr.tc("del", "clsact", idx[0])
                    lifted.append(name)
                except NetlinkError as exc:
                    log.warning("lifting the block on %s: %s", name, exc)
    except Exception as exc:
        log.warning("netlink lift failed (%s); trying tc", exc)
        for name in interfaces:
            if name in lifted:
                continue
            res = subprocess.run(["tc", "qdisc", "del", "dev", name, "clsact"], capture_output=True, timeout=10)
            if res.returncode == 0:
                lifted.append(name)
    return lifted
