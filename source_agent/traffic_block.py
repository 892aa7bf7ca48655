"""Block all of P's traffic except with V, so that P's kernel acknowledges nothing to a client after
the snapshot (a client's data acknowledged by P but not in the image would be lost).

A clsact qdisc on every interface with three filters per direction: traffic with V passes (the image
stream; also the md network leg's NBD connection, which the sync inside FREEZE may still need — V is
not a client of P's services), ARP passes, everything else is dropped. The block is
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
        for direction, addr_key in (("egress", "dst"), ("ingress", "src")):
            base = ["tc", "filter", "add", "dev", ifname, direction]
            cmds.append([*base, "prio", "1", "protocol", "ip", "u32", "match", "ip", addr_key, f"{v_ip}/32",
                         "action", "ok"])
            cmds.append([*base, "prio", "2", "protocol", "arp", "matchall", "action", "ok"])
            cmds.append([*base, "prio", "3", "protocol", "all", "matchall", "action", "drop"])
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
