"""P's NIC around the snapshot: down right after FREEZE, up as soon as its PHY has link again.

CREATE_IMAGE freezes and thaws every device. A running e1000 comes back from the thaw with its PHY
reset (autonegotiation starts over), checks its link once, at once, and then only every 2 s from
its watchdog: the link it finds still negotiating at that first check is reported 2 s later,
although the PHY had it after ~0.5 s (rig, P's e1000 under QEMU: PHY link 0.50-0.58 s, carrier
2.04-2.11 s after CREATE_IMAGE). An interface that is down through the snapshot comes back from the
thaw without that check; bringing it up once the PHY reports a speed makes the driver's first check
find the link (rig: carrier 0.52-0.55 s after CREATE_IMAGE; taking it down costs ~60 ms).

Down only after FREEZE: FREEZE syncs, and md's network leg (NBD to V) needs the link for that.
In the VM the cycled NIC is stale hardware and stays down until resume removes it.

The kernel interfaces are the classic ioctls (SIOCGIFFLAGS/SIOCSIFFLAGS, SIOCETHTOOL): no netlink
socket, nothing to import, usable from the helper at any point of the cutover.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: Drivers whose thaw leaves the link to a periodic watchdog, measured on the rig. A driver not
#: listed keeps its own thaw path: cycling one whose open() resets the PHY again would be slower.
CYCLED_DRIVERS = frozenset({"e1000"})

SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCETHTOOL = 0x8913, 0x8914, 0x8946
IFF_UP = 0x1
ETHTOOL_GSET = 0x1
SPEED_UNKNOWN = (0, 0xFFFF, 0xFFFFFFFF)


@dataclass(frozen=True)
class PathNic:
    name: str
    driver: str  # "" for a virtual device (bond, vlan, veth, ...)


def nics_to_cycle(path: list[PathNic]) -> list[str]:
    """The NICs on the image's path whose driver is worth cycling. Pure."""
    return [nic.name for nic in path if nic.driver in CYCLED_DRIVERS]


def path_nics(egress: str, root: str = "/sys/class/net", depth: int = 4) -> list[PathNic]:
    """The egress interface and the devices under it (a bond's slaves, a VLAN's parent), with
    their drivers ("" = virtual). Before FREEZE."""
    out: list[PathNic] = []
    todo, seen = [(egress, 0)], set()
    while todo:
        name, level = todo.pop(0)
        if not name or name in seen or level > depth:
            continue
        seen.add(name)
        try:
            driver = os.path.basename(os.readlink(f"{root}/{name}/device/driver"))
        except OSError:
            driver = ""
        out.append(PathNic(name, driver))
        try:
            lowers = sorted(n[len("lower_"):] for n in os.listdir(f"{root}/{name}") if n.startswith("lower_"))
        except OSError:
            lowers = []
        todo.extend((lower, level + 1) for lower in lowers)
    return out


# --- the kernel's side -------------------------------------------------------------------------------

def _ifreq(name: str, tail: bytes) -> bytearray:
    return bytearray(struct.pack("16s", name.encode()) + tail.ljust(24, b"\0"))


def link_flags(name: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        ifr = _ifreq(name, b"")
        fcntl.ioctl(ctl, SIOCGIFFLAGS, ifr)
        return struct.unpack_from("H", ifr, 16)[0]


def set_admin_up(name: str, up: bool) -> None:
    """`ip link set NAME up|down` in two ioctls."""
    flags = link_flags(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        fcntl.ioctl(ctl, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", (flags | IFF_UP) if up else (flags & ~IFF_UP))))


def phy_speed(name: str) -> int:
    """The link speed the NIC reports (Mb/s; 0 = unknown). For an e1000 this reads the MAC's link
    bit, whether or not the interface is up (ETHTOOL_GLINK answers "no link" for a down one)."""
    cmd = ctypes.create_string_buffer(struct.pack("I", ETHTOOL_GSET) + bytes(40))  # struct ethtool_cmd
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        fcntl.ioctl(ctl, SIOCETHTOOL, _ifreq(name, struct.pack("P", ctypes.addressof(cmd))))
    return speed_of(cmd.raw)


def speed_of(ethtool_cmd: bytes) -> int:
    """The speed in an ETHTOOL_GSET answer (Mb/s; 0 = unknown). Pure. struct ethtool_cmd: speed
    (u16) at offset 12, speed_hi (u16) at 28 (lp_advertising follows at 32)."""
    speed = struct.unpack_from("H", ethtool_cmd, 12)[0] | (struct.unpack_from("H", ethtool_cmd, 28)[0] << 16)
    return 0 if speed in SPEED_UNKNOWN else speed


# --- the cycle -----------------------------------------------------------------------------------------

@dataclass
class LinkCycle:
    """Takes `names` down (those that were up) and brings each up again when its PHY has link."""

    names: list[str]
    set_up: Callable[[str, bool], None] = set_admin_up
    flags: Callable[[str], int] = link_flags
    speed: Callable[[str], int] = phy_speed
    down: list[str] = field(default_factory=list)  # taken down by us, in order
    raised: dict[str, float] = field(default_factory=dict)  # name -> monotonic time brought up
    down_s: float = 0.0

    def take_down(self) -> None:
        """After FREEZE. A NIC that cannot be taken down is left alone (the thaw path then applies)."""
        t0 = time.monotonic()
        for name in self.names:
            try:
                if not self.flags(name) & IFF_UP:
                    continue
                self.set_up(name, False)
                self.down.append(name)
            except OSError as exc:
                print(f"cutover helper: cannot take {name} down for the snapshot: {exc}", file=sys.stderr, flush=True)
        self.down_s = time.monotonic() - t0

    def poll(self) -> bool:
        """Bring up each NIC whose PHY reports a speed; True once all are up. Cheap: one ioctl per
        NIC still waiting. A NIC that cannot be read is brought up at once."""
        for name in self.down:
            if name in self.raised:
                continue
            try:
                ready = self.speed(name) > 0
            except OSError:
                ready = True
            if ready:
                self._raise(name)
        return len(self.raised) == len(self.down)

    def restore(self) -> None:
        """Every NIC we took down is up again (P runs on). Never raises."""
        for name in self.down:
            if name not in self.raised:
                self._raise(name)

    def _raise(self, name: str) -> None:
        try:
            self.set_up(name, True)
        except OSError as exc:
            print(f"cutover helper: cannot bring {name} up: {exc}", file=sys.stderr, flush=True)
        self.raised[name] = time.monotonic()
