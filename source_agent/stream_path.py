"""The image stream's network path on P: the socket's figures, V's route and neighbour entry, and the
bond's timers, each set for the cutover before FREEZE and put back when P runs on or in the VM (by
the helper, or by the agent's safety net: host_settings). The route, neighbour and bond tweaks are
optimisations only: none of them raises, so that none stops an abort or a resume."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.net_route import HostRoute, add_host_route, attempt, delete_host_route, find_host_route

SO_SNDBUFFORCE = 32
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in a TCP socket's send queue not yet acknowledged


def unacknowledged(sock: socket.socket) -> int:
    """Bytes the socket sent that V has not acknowledged yet. Raises OSError."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), SIOCOUTQ, buf)
    return buf[0]


#: struct tcp_info (linux/tcp.h): name -> (offset, struct format) of the fields the stream reports
TCP_INFO_FIELDS = {"unacked": (24, "I"), "snd_cwnd": (80, "I"), "total_retrans": (100, "I"),
                   "notsent_bytes": (144, "I"), "busy_us": (168, "Q"), "rwnd_limited_us": (176, "Q"),
                   "sndbuf_limited_us": (184, "Q"), "snd_wnd": (228, "I")}


def tcp_figures(sock: socket.socket) -> dict[str, int]:
    """What the kernel's TCP says of the image stream now (TCP_INFO; the fields an older kernel lacks
    are left out): where the stream waited, on V's window, its own buffer or (busy, neither) the
    congestion window."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return {}
    return {name: struct.unpack_from(fmt, raw, off)[0] for name, (off, fmt) in TCP_INFO_FIELDS.items()
            if off + struct.calcsize(fmt) <= len(raw)}


T = TypeVar("T")


def _netlink(what: str, op: Callable[[Any], T], default: T) -> T:
    """`op(IPRoute)`, or `default` when it fails: every route, neighbour and link tweak of the
    cutover is an optimisation only, and its undoing must never stop an abort or a resume. Never
    raises. (pyroute2 is loaded by warm_up: nothing is read from disk while frozen.)"""
    return attempt(what, op, default, lambda why: print(f"cutover helper: {why}", file=sys.stderr, flush=True))


def egress_interface(host: str) -> str:
    """The interface the kernel routes `host` through ("" when it cannot tell: then nothing waits
    for a link). Before FREEZE."""
    def lookup(ipr: Any) -> str:
        route = ipr.route("get", dst=host)[0]
        return ipr.get_links(route.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME") or ""

    return _netlink(f"no egress interface for {host}", lookup, "")


def widen_route(host: str, initcwnd: int, rto_min_ms: int) -> HostRoute | None:
    """A host route to V with the same path as the kernel's, whose connections start (and restart
    after idling) with `initcwnd` segments and never retransmit before `rto_min_ms`. None when
    nothing was added (V has a host route of its own, or the kernel refused). Before connecting to
    V. Netlink, not `ip`: in the VM its removal runs with everything frozen, and a program read
    from disk then could wait on P's stale disks (4.4 s in the rig)."""
    return _netlink(f"no cutover route to {host}",
                    lambda ipr: add_host_route(ipr, host, initcwnd=initcwnd, rto_min_ms=rto_min_ms), None)


def host_route(host: str) -> HostRoute | None:
    """The /32 route to `host` in the main table, if there is one (the agent's safety net: it was
    there before the hand-over, or the helper added it). Never raises."""
    return _netlink(f"cannot read the routes to {host}", lambda ipr: find_host_route(ipr, host), None)


def narrow_route(route: HostRoute | None) -> None:
    """Remove widen_route's route (P runs on, or in the VM). Never raises."""
    if route is not None:
        _netlink(f"cannot remove the cutover route to {route.dst}", lambda ipr: delete_host_route(ipr, route), None)


NUD_STALE, NUD_PERMANENT = 0x04, 0x80


@dataclass
class PinnedNeighbour:
    ip: str
    mac: str
    ifindex: int


def pin_neighbour(host: str, interface: str) -> PinnedNeighbour | None:
    """Make V's ARP entry permanent for the cutover. CREATE_IMAGE takes P's NIC down and the kernel
    flushes the interface's ARP entries on carrier loss: the first packet after the link is back
    would wait for ARP, and a lost first request costs ARP's 1 s retransmit (seen in the rig: link
    back 2.05 s, first packet through 3.07 s). Before FREEZE; None when there is nothing to pin."""
    if not interface:
        return None

    def pin(ipr: Any) -> PinnedNeighbour | None:
        index = ipr.link_lookup(ifname=interface)[0]
        for entry in ipr.get_neighbours(family=socket.AF_INET, ifindex=index):
            mac = entry.get_attr("NDA_LLADDR")
            if entry.get_attr("NDA_DST") == host and mac and entry["state"] != NUD_PERMANENT:
                ipr.neigh("replace", dst=host, lladdr=mac, ifindex=index, state=NUD_PERMANENT)
                return PinnedNeighbour(host, mac, index)
        return None

    return _netlink("cannot pin V's neighbour entry (ARP then resolves V as usual)", pin, None)


def pinned_neighbour(host: str) -> PinnedNeighbour | None:
    """`host`'s permanent neighbour entry, if there is one (the agent's safety net). Never raises."""
    def find(ipr: Any) -> PinnedNeighbour | None:
        for entry in ipr.get_neighbours(family=socket.AF_INET):
            mac = entry.get_attr("NDA_LLADDR")
            if entry.get_attr("NDA_DST") == host and mac and entry["state"] == NUD_PERMANENT:
                return PinnedNeighbour(host, mac, entry["ifindex"])
        return None

    return _netlink(f"cannot read the neighbour entries of {host}", find, None)


def unpin_neighbour(pin: PinnedNeighbour | None) -> None:
    """Back to an ordinary entry (stale: the kernel confirms it on next use). Never raises."""
    if pin is not None:
        _netlink("cannot unpin V's neighbour entry",
                 lambda ipr: ipr.neigh("replace", dst=pin.ip, lladdr=pin.mac, ifindex=pin.ifindex, state=NUD_STALE),
                 None)


BOND_HOLD_MS = 10_000
BOND_HOLD_MIIMON_MS = 10


def bond_timers(name: str, root: str = "/sys/class/net") -> dict[str, str] | None:
    """A bond's MII polling interval and downdelay as sysfs has them (None: not a bond, or gone)."""
    try:
        return {option: Path(f"{root}/{name}/bonding/{option}").read_text().strip()
                for option in ("miimon", "downdelay")}
    except OSError:
        return None


def hold_bond_slaves(interfaces: list[str], root: str = "/sys/class/net", hold_ms: int = BOND_HOLD_MS,
                     miimon_ms: int = BOND_HOLD_MIIMON_MS) -> dict[str, dict[str, str]]:
    """Give p2v's bonds a downdelay long enough to ride out the snapshot's link loss, and a short
    MII polling interval so that the bond sees its slave's link back within 10 ms instead of up to
    its usual 100; returns the old values to put back. Without the downdelay the bond drops its
    slave when the snapshot takes the NIC down and re-activates it when the link returns,
    reprogramming the NIC's receive filters: the rig's e1000 (QEMU) then refuses to receive for 1 s
    (seen as V's ACKs ignored for 1.0 s right after the link came back), and every failover is
    another burst of gratuitous ARP. (The bond's own carrier still drops while its slave is "going
    down": only a slave whose link is up counts for it.) Before FREEZE."""
    saved: dict[str, dict[str, str]] = {}
    for name in interfaces:
        bonding = f"{root}/{name}/bonding"
        old = bond_timers(name, root)
        try:
            if old is None or int(old["miimon"] or 0) <= 0:
                continue  # not a bond, or ARP monitoring: no downdelay to set
            poll = min(int(old["miimon"]), miimon_ms)
            # the kernel keeps the delays in polling intervals: interval first, then the delay
            with open(f"{bonding}/miimon", "w") as f:
                f.write(f"{poll}\n")
            saved[name] = old
            with open(f"{bonding}/downdelay", "w") as f:
                f.write(f"{-(-hold_ms // poll) * poll}\n")  # a multiple of miimon
        except (OSError, ValueError):
            continue  # not a bond, or gone: nothing to hold
    return saved


def release_bond_slaves(saved: dict[str, dict[str, str]], root: str = "/sys/class/net") -> None:
    """Put the bonds' polling interval and downdelay back, in that order (the kernel keeps the
    delay in intervals). P runs on, or in the VM. Never raises."""
    for name, old in saved.items():
        for option in ("miimon", "downdelay"):
            try:
                with open(f"{root}/{name}/bonding/{option}", "w") as f:
                    f.write(f"{old[option]}\n")
            except (OSError, KeyError) as exc:
                print(f"cutover helper: cannot restore {name}'s {option}: {exc}", file=sys.stderr, flush=True)


def carrier_check(interface: str, root: str = "/sys/class/net") -> Callable[[], bool] | None:
    """A cheap "is the link up" for the outbox (sysfs: no netlink socket while frozen)."""
    if not interface:
        return None
    def has_carrier(name: str) -> bool:
        try:
            with open(f"{root}/{name}/carrier") as f:
                return f.read(1) == "1"
        except OSError:  # EINVAL while the interface is down
            return False

    # a bond holding its slave (hold_bond_slaves) may keep its carrier while the slave's link is
    # still down: the link is back when a lower device has carrier too
    try:
        lower = [n[len("lower_"):] for n in os.listdir(f"{root}/{interface}") if n.startswith("lower_")]
    except OSError:
        lower = []

    def up() -> bool:
        return has_carrier(interface) and (not lower or any(has_carrier(n) for n in lower))

    return up
