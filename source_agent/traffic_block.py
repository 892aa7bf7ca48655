"""Block P's traffic so that P's kernel acknowledges nothing after the snapshot that the VM will not
know about (a peer's data acknowledged by P but not in the image would be lost; data P does not
acknowledge is sent again by the peer, and then reaches the VM).

A clsact qdisc on every interface, per direction:
    prio 1  everything (the gate)                                                   pass
    prio 2  the image stream with V (V's address and the image socket's port)      pass
    prio 3  anything else with V (md's NBD leg: the sync inside FREEZE writes to it) pass
    prio 4  ARP                                                                     pass
    prio 5  everything else                                                         drop
`apply` installs it before FREEZE, open: the gate lets everything through, so P's services answer
until FREEZE (its lead over FREEZE, ~0.1 s under TCG, was part of every peer's outage). `tighten`
closes it right after FREEZE: it removes the gate and prio 3 (nothing runs any more; replies still in
flight from V are then not acknowledged by P, V resends them to the VM). What P's kernel
acknowledged before that is in the snapshot, taken later. `lift` removes the whole block (in the VM,
or when the cutover is aborted). The block is part of P's memory, so the OS wakes up in the VM with
it still in place; resume lifts it once the virtual NIC is in service.

`block_commands` is pure (tc argv lists, run by one `tc -batch`); `apply` and `lift` are the I/O.
`tighten` and `lift` speak plain netlink from this process: they run while every other task is
frozen (no `tc` to start), `lift` in the VM inside the downtime.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import struct
import subprocess
from collections.abc import Sequence

log = logging.getLogger(__name__)
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
PRIO_GATE, PRIO_IMAGE, PRIO_V, PRIO_ARP, PRIO_DROP = 1, 2, 3, 4, 5
ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800
#: clsact's parents (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS))
PARENT_INGRESS, PARENT_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
#: the clsact qdisc itself (TC_H_CLSACT as parent, TC_H_MAKE(TC_H_CLSACT, 0) as handle)
CLSACT_PARENT, CLSACT_HANDLE = 0xFFFFFFF1, 0xFFFF0000
# rtnetlink (linux/netlink.h, linux/rtnetlink.h): header and struct tcmsg
RTM_DELQDISC, RTM_DELTFILTER, NLMSG_ERROR = 37, 45, 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BBHiIII")


class BlockError(RuntimeError):
    pass


#: per direction: tc's hook, and the u32 keys naming V's side (its address, its port)
DIRECTIONS = (("egress", "dst", "dport"), ("ingress", "src", "sport"))


def _checked(interfaces: Sequence[str], ip: str, port: int) -> None:
    ipaddress.IPv4Address(ip)  # raises ValueError on anything else
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    for ifname in interfaces:
        if not _IFNAME.match(ifname) or ifname == "lo":
            raise ValueError(f"interface name {ifname!r} refused")


def _pass_with(ifname: str, direction: int, prio: int, ip: str, port: int | None = None) -> list[str]:
    """The u32 rule that lets traffic with `ip` (and `port` on its side) pass at `prio`."""
    hook, addr_key, port_key = DIRECTIONS[direction]
    argv = ["tc", "filter", "add", "dev", ifname, hook, "prio", str(prio), "protocol", "ip", "u32",
            "match", "ip", addr_key, f"{ip}/32"]
    if port is not None:
        argv += ["match", "ip", port_key, str(port), "0xffff"]
    return [*argv, "action", "ok"]


def block_commands(interfaces: Sequence[str], v_ip: str, v_port: int) -> list[list[str]]:
    _checked(interfaces, v_ip, v_port)
    cmds: list[list[str]] = []
    for ifname in interfaces:
        cmds.append(["tc", "qdisc", "add", "dev", ifname, "clsact"])
        for direction, (hook, _, _) in enumerate(DIRECTIONS):  # the gate first: nothing is dropped until tighten
            base = ["tc", "filter", "add", "dev", ifname, hook]
            cmds.append([*base, "prio", str(PRIO_GATE), "protocol", "all", "matchall", "action", "ok"])
            cmds.append(_pass_with(ifname, direction, PRIO_IMAGE, v_ip, v_port))
            cmds.append(_pass_with(ifname, direction, PRIO_V, v_ip))
            cmds.append([*base, "prio", str(PRIO_ARP), "protocol", "arp", "matchall", "action", "ok"])
            cmds.append([*base, "prio", str(PRIO_DROP), "protocol", "all", "matchall", "action", "drop"])
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


def applied_before(commands: Sequence[Sequence[str]], failed_line: int | None) -> list[str]:
    """The interfaces whose clsact qdisc `tc -batch` added before it stopped at `failed_line`
    (1-based; None = every command ran). Pure: an abort must remove these and only these (a clsact
    qdisc that was there before is not ours to delete)."""
    ran = commands if failed_line is None else commands[:max(0, failed_line - 1)]
    return [argv[4] for argv in ran if argv[1] == "qdisc"]


_BATCH_FAILED = re.compile(r"Command failed -:(\d+)")


def apply(interfaces: Sequence[str], v_ip: str, v_port: int, timeout_s: float = 20.0) -> list[str]:
    """Install the block; on any failure remove what was installed and raise BlockError.

    One `tc -batch` process for all the rules (before: one per rule, 18 forks, seconds on a slow P;
    pages the agent dirties meanwhile travel at cutover)."""
    commands = block_commands(interfaces, v_ip, v_port)
    script = "".join(" ".join(argv[1:]) + "\n" for argv in commands)
    try:
        res = subprocess.run(["tc", "-batch", "-"], input=script, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        lift(applied_before(commands, None) if isinstance(exc, subprocess.TimeoutExpired) else [])
        raise BlockError(f"traffic block failed, nothing left in place: {exc}") from None
    if res.returncode != 0:
        m = _BATCH_FAILED.search(res.stderr)
        failed = int(m.group(1)) if m else 1
        lift(applied_before(commands, failed))
        why = res.stderr.strip().splitlines()[0] if res.stderr.strip() else f"tc exited {res.returncode}"
        cmd = " ".join(commands[failed - 1]) if 0 < failed <= len(commands) else "tc -batch"
        raise BlockError(f"traffic block failed, nothing left in place: {cmd}: {why}")
    return applied_before(commands, None)


def open_path_commands(interfaces: Sequence[str], ip: str, port: int) -> list[list[str]]:
    """tc argv lists that let one TCP service of V's (its agent) through a block in place: the pass
    rule at PRIO_V, narrowed to that port. Pure."""
    _checked(interfaces, ip, port)
    return [_pass_with(ifname, direction, PRIO_V, ip, port)
            for ifname in interfaces for direction in range(len(DIRECTIONS))]


def open_path(interfaces: Sequence[str], ip: str, port: int, timeout_s: float = 20.0) -> None:
    """After a helper went past COMMIT without powering P off: the agent must ask V's agent what
    became of the image (ResolveCutover) while P stays cut off from everything else, md's NBD leg
    included (P's disk must not move past the image's). Raises BlockError."""
    script = "".join(" ".join(argv[1:]) + "\n" for argv in open_path_commands(interfaces, ip, port))
    try:
        res = subprocess.run(["tc", "-batch", "-"], input=script, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BlockError(f"opening the path to {ip}:{port}: {exc}") from None
    if res.returncode != 0:
        raise BlockError(f"opening the path to {ip}:{port}: {res.stderr.strip() or f'tc exited {res.returncode}'}")


#: what `tighten` removes, in this order: the gate (P's peers are cut off), then V's wide pass rule
TIGHTEN = ((PRIO_GATE, ETH_P_ALL, "the gate"), (PRIO_V, ETH_P_IP, "the V pass rule"))


def tighten(interfaces: Sequence[str]) -> None:
    """Close the block after FREEZE: remove the gate, then the "anything with V" pass rule, on every
    interface, both directions. Raises BlockError unless the kernel acknowledged each deletion: a
    gate left open lets P's kernel acknowledge its peers' data after the snapshot, a V rule lets it
    keep talking to V (md's superblock writes over NBD did), and V's TCP state then runs ahead of the
    image's. Plain netlink from this process: it runs while everything is frozen."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(5.0)
        seq = 0
        for prio, protocol, what in TIGHTEN:
            info = (prio << 16) | socket.htons(protocol)
            for name in interfaces:
                try:
                    index = socket.if_nametoindex(name)
                except OSError:
                    raise BlockError(f"interface {name} vanished") from None
                for parent in (PARENT_EGRESS, PARENT_INGRESS):
                    seq += 1
                    error = _netlink_request(nl, RTM_DELTFILTER, seq, _TCMSG.pack(
                        socket.AF_UNSPEC, 0, 0, index, 0, parent, info))
                    if error:
                        raise BlockError(f"removing {what} on {name} ({parent:#x}): {os.strerror(error)}")


def _netlink_request(nl: socket.socket, msg_type: int, seq: int, body: bytes) -> int:
    """Send one rtnetlink request with NLM_F_ACK; return the kernel's errno (0 = done)."""
    nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
    for _ in range(16):  # bounded: the answer to our request is the next error/ack message
        data = nl.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, rseq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if kind == NLMSG_ERROR and rseq == seq:
                return -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
            offset += max((length + 3) & ~3, _NLMSGHDR.size)
    raise BlockError("no answer from rtnetlink")


def lift(interfaces: Sequence[str]) -> list[str]:
    """Remove our clsact qdiscs (with their filters) where the interfaces still exist. Returns the
    interfaces it was removed from. Never raises: lifting must not stop a resume or an abort.
    Plain netlink, as `tighten`: in the VM it runs inside the downtime (pyroute2's IPRoute took
    ~85 ms there under TCG)."""
    lifted: list[str] = []
    if not interfaces:
        return lifted
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
            nl.settimeout(5.0)
            for seq, name in enumerate(interfaces, start=1):
                try:
                    index = socket.if_nametoindex(name)
                except OSError:
                    continue  # gone (P's NIC in the VM): nothing to lift
                error = _netlink_request(nl, RTM_DELQDISC, seq, _TCMSG.pack(
                    socket.AF_UNSPEC, 0, 0, index, CLSACT_HANDLE, CLSACT_PARENT, 0))
                if error:
                    log.warning("lifting the block on %s: %s", name, os.strerror(error))
                else:
                    lifted.append(name)
    except (OSError, BlockError) as exc:
        log.warning("netlink lift failed (%s); trying tc", exc)
        for name in interfaces:
            if name in lifted:
                continue
            res = subprocess.run(["tc", "qdisc", "del", "dev", name, "clsact"], capture_output=True, timeout=10)
            if res.returncode == 0:
                lifted.append(name)
    return lifted
