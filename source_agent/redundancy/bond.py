"""NIC redundancy: a bond in active-backup over P's physical NIC, with pyroute2.

``build_bond`` creates ``p2vbondN`` (mode active-backup, miimon, fail_over_mac=none, gratuitous ARP /
unsolicited NA count, the physical NIC as primary and active slave, the NIC's MAC and MTU), then moves
P's addresses and routes from the NIC onto the bond. The NIC's configuration before the change is
journaled; ``undo_bond`` puts it back exactly and checks that it did.

The virtual NIC does not exist on P: its slot is recorded in the entry (name and MAC from the
catalog); the resume step enslaves it inside the VM.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from source_agent.redundancy.journal import Entry, Journal

log = logging.getLogger(__name__)

BOND_MODE_ACTIVE_BACKUP = 1
FAIL_OVER_MAC_NONE = 0
RT_TABLE_LOCAL = 255
RTPROT_KERNEL = 2
RTPROT_RA = 9
IFA_F_PERMANENT = 0x80
IFF_UP = 1


class BondError(RuntimeError):
    pass


def _ipr(netns: str | None = None):
    from pyroute2 import IPRoute, NetNS

    return NetNS(netns) if netns else IPRoute()


@dataclass
class AddrConf:
    family: int
    address: str
    prefixlen: int
    broadcast: str = ""
    scope: int = 0
    flags: int = 0
    label: str = ""


@dataclass
class RouteConf:
    family: int
    dst: str  # "" = default
    dst_len: int
    gateway: str = ""
    table: int = 254
    priority: int = 0
    proto: int = 4
    scope: int = 0
    type: int = 1
    prefsrc: str = ""
    tos: int = 0


@dataclass
class NicConf:
    name: str
    index: int
    mac: str
    mtu: int
    up: bool
    master: int
    addresses: list[AddrConf] = field(default_factory=list)
    routes: list[RouteConf] = field(default_factory=list)

    def comparable(self) -> dict[str, Any]:
        d = asdict(self)
        d["addresses"] = sorted((tuple(a.values()) for a in d["addresses"]), key=repr)
        d["routes"] = sorted((tuple(r.values()) for r in d["routes"]), key=repr)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NicConf:
        return cls(
            **{
                **d,
                "addresses": [AddrConf(**a) for a in d.get("addresses", [])],
                "routes": [RouteConf(**r) for r in d.get("routes", [])],
            }
        )


def _link_by_name(ipr, name: str):
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        return None
    return ipr.get_links(idx[0])[0]


def snapshot(ipr, name: str) -> NicConf:
    """The configuration of one NIC that the bond takes over (and rollback must restore).

    Addresses: permanent (statically configured) ones, IPv6 link-local excluded (the kernel makes
    them from the MAC). Routes: every table but the local one, kernel- and RA-made routes excluded
    (they come back with the addresses).
    """
    link = _link_by_name(ipr, name)
    if link is None:
        raise BondError(f"NIC {name} does not exist (any more)")
    index = link["index"]
    conf = NicConf(
        name=name,
        index=index,
        mac=str(link.get("IFLA_ADDRESS") or ""),
        mtu=int(link.get("IFLA_MTU") or 0),
        up=bool(link["flags"] & IFF_UP),
        master=int(link.get("IFLA_MASTER") or 0),
    )
    for a in ipr.get_addr(index=index):
        flags = int(a.get("IFA_FLAGS") or a["flags"])
        address = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
        if a["family"] == socket.AF_INET6 and (address.lower().startswith("fe80:") or not flags & IFA_F_PERMANENT):
            continue
        conf.addresses.append(
            AddrConf(
                family=a["family"],
                address=address,
                prefixlen=a["prefixlen"],
                broadcast=str(a.get("IFA_BROADCAST") or ""),
                scope=a["scope"],
                flags=flags & IFA_F_PERMANENT,
                label=str(a.get("IFA_LABEL") or ""),
            )
        )
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=family, table=0):  # table=0: all tables
            if r.get("RTA_OIF") != index:
                continue
            table = int(r.get("RTA_TABLE") or r["table"])
            if table == RT_TABLE_LOCAL or r["proto"] in (RTPROT_KERNEL, RTPROT_RA):
                continue
            if r["type"] != 1:  # unicast only
                continue
            conf.routes.append(
                RouteConf(
                    family=family,
                    dst=str(r.get("RTA_DST") or ""),
                    dst_len=r["dst_len"],
                    gateway=str(r.get("RTA_GATEWAY") or ""),
                    table=table,
                    priority=int(r.get("RTA_PRIORITY") or 0),
                    proto=r["proto"],
                    scope=r["scope"],
                    type=r["type"],
                    prefsrc=str(r.get("RTA_PREFSRC") or ""),
                    tos=r["tos"],
                )
            )
    return conf


def _add_addr(ipr, index: int, a: AddrConf) -> None:
    kw: dict[str, Any] = {"index": index, "address": a.address, "prefixlen": a.prefixlen, "family": a.family}
    if a.broadcast:
        kw["broadcast"] = a.broadcast
    if a.family == socket.AF_INET6:
        kw["IFA_FLAGS"] = 0x200  # IFA_F_NODAD: the address is ours already, no duplicate detection gap
    _ignore_exists(lambda: ipr.addr("add", **kw))


def _add_route(ipr, index: int, r: RouteConf) -> None:
    kw: dict[str, Any] = {
        "family": r.family,
        "oif": index,
        "table": r.table,
        "proto": r.proto,
        "scope": r.scope,
        "type": r.type,
        "tos": r.tos,
        "dst_len": r.dst_len,
    }
    if r.dst:
        kw["dst"] = r.dst
    if r.gateway:
        kw["gateway"] = r.gateway
    if r.priority:
        kw["priority"] = r.priority
    if r.prefsrc:
        kw["prefsrc"] = r.prefsrc
    _ignore_exists(lambda: ipr.route("add", **kw))


def _ignore_exists(fn) -> None:
    from pyroute2 import NetlinkError

    try:
        fn()
    except NetlinkError as e:
        if e.code != 17:  # EEXIST
            raise


def free_bond_name(ipr, prefix: str = "p2vbond") -> str:
    for i in range(64):
        if not ipr.link_lookup(ifname=f"{prefix}{i}"):
            return f"{prefix}{i}"
    raise BondError("no free bond name")


def build_bond(
    journal: Journal,
    nic: str,
    virtual: str = "",
    virtual_mac: str = "",
    miimon_ms: int = 100,
    num_grat_arp: int = 5,
    bond_name: str = "",
    netns: str | None = None,
) -> Entry:
    """Create the bond over ``nic`` and move its addresses and routes onto it."""
    from pyroute2 import NetlinkError

    if not 1 <= num_grat_arp <= 255:
        raise BondError(f"num_grat_arp {num_grat_arp}: must be 1..255")
    if not 10 <= miimon_ms <= 10000:
        raise BondError(f"miimon {miimon_ms} ms: must be 10..10000")
    with _ipr(netns) as ipr:
        before = snapshot(ipr, nic)
        if before.master:
            raise BondError(f"NIC {nic} is enslaved already (master index {before.master}); not touching it")
        name = bond_name or free_bond_name(ipr)
        if ipr.link_lookup(ifname=name):
            raise BondError(f"an interface named {name} exists already")
        entry = journal.begin(
            "bond",
            physical=nic,
            virtual=virtual,
            bond=name,
            nic=asdict(before),
            virtual_mac=virtual_mac,
            miimon_ms=miimon_ms,
            num_grat_arp=num_grat_arp,
            netns=netns or "",
        )
        try:
            ipr.link(
                "add",
                ifname=name,
                kind="bond",
                bond_mode=BOND_MODE_ACTIVE_BACKUP,
                bond_miimon=miimon_ms,
                bond_fail_over_mac=FAIL_OVER_MAC_NONE,
                bond_num_peer_notif=num_grat_arp,
            )
        except NetlinkError as e:
            raise BondError(f"creating bond {name}: {e} (is the bonding module available?)") from None
        bidx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=bidx, address=before.mac, mtu=before.mtu)
        ipr.link("set", index=bidx, state="up")
        # --- the gap starts: addresses leave the NIC
        t0 = time.monotonic()
        for a in before.addresses:
            try:
                ipr.addr("del", index=before.index, address=a.address, prefixlen=a.prefixlen, family=a.family)
            except NetlinkError as e:
                if e.code != 99:  # EADDRNOTAVAIL: gone already
                    raise
        ipr.link("set", index=before.index, state="down")
        ipr.link("set", index=before.index, master=bidx)
        _set_primary(name, nic, netns)
        ipr.link("set", index=before.index, state="up")
        for a in before.addresses:
            _add_addr(ipr, bidx, a)
        for r in before.routes:
            _add_route(ipr, bidx, r)
        gap_ms = (time.monotonic() - t0) * 1000
        # --- the gap ends once the bond has carrier (miimon)
        carrier_ms = _wait_carrier(ipr, bidx, timeout_s=10)
        journal.done(
            entry,
            bond_index=bidx,
            netlink_gap_ms=round(gap_ms, 1),
            carrier_ms=round(carrier_ms, 1) if carrier_ms is not None else None,
        )
        if carrier_ms is None:
            log.warning("bond %s: no carrier after 10 s", name)
        log.info("bond %s over %s: addresses moved in %.1f ms", name, nic, gap_ms)
        return entry


def _set_primary(bond: str, nic: str, netns: str | None) -> None:
    """primary = the physical NIC (it stays active as long as it is there)."""
    from pyroute2 import NetlinkError

    with _ipr(netns) as ipr:
        bidx = ipr.link_lookup(ifname=bond)[0]
        nidx = ipr.link_lookup(ifname=nic)[0]
        try:
            ipr.link("set", index=bidx, kind="bond", bond_primary=nidx)
        except NetlinkError as e:
            log.warning("bond %s: setting primary %s: %s", bond, nic, e)


def _wait_carrier(ipr, index: int, timeout_s: float) -> float | None:
    t0 = time.monotonic()
    for _ in range(int(timeout_s / 0.02) + 1):
        link = ipr.get_links(index)[0]
        if link.get("IFLA_CARRIER") == 1:
            return (time.monotonic() - t0) * 1000
        time.sleep(0.02)
    return None


def undo_bond(entry: Entry) -> None:
    """Release the NIC, delete the bond, and put the NIC's configuration back exactly."""
    from pyroute2 import NetlinkError

    before = NicConf.from_dict(entry.detail["nic"])
    name = entry.detail["bond"]
    netns = entry.detail.get("netns") or None
    with _ipr(netns) as ipr:
        bidx = ipr.link_lookup(ifname=name)
        nic = _link_by_name(ipr, before.name)
        if nic is None:
            raise BondError(f"NIC {before.name} is gone: cannot give it its configuration back")
        if bidx:
            if nic.get("IFLA_MASTER") == bidx[0]:
                ipr.link("set", index=nic["index"], master=0)
            try:
                ipr.link("del", index=bidx[0])
            except NetlinkError as e:
                if e.code != 19:  # ENODEV
                    raise
        ipr.link("set", index=nic["index"], mtu=before.mtu, address=before.mac)
        if before.up:
            ipr.link("set", index=nic["index"], state="up")
        for a in before.addresses:
            _add_addr(ipr, nic["index"], a)
        for r in before.routes:
            _add_route(ipr, nic["index"], r)
        after = snapshot(ipr, before.name)
    if after.comparable() != before.comparable():
        raise BondError(f"NIC {before.name} after rollback differs from before: {after} != {before}")


def release_gone_and_dissolve(entry: Entry) -> str:
    """Cancellation inside the VM: leave the NIC on the virtual device.

    Stale (vanished) slaves drop out of the bond by themselves when their PCI function is removed.
    If the bond's only slave is now a NIC whose own MAC equals the bond's, the bond is dissolved:
    addresses and routes move onto that NIC (the same gap as when the bond was built). Otherwise the
    bond is kept with the virtual NIC as its active slave. Returns what was done.
    """
    name = entry.detail["bond"]
    netns = entry.detail.get("netns") or None
    with _ipr(netns) as ipr:
        bidx = ipr.link_lookup(ifname=name)
        if not bidx:
            raise BondError(f"bond {name} does not exist")
        bond = ipr.get_links(bidx[0])[0]
        slaves = [link for link in ipr.get_links() if link.get("IFLA_MASTER") == bidx[0]]
        physical = entry.physical
        if any(s.get("IFLA_IFNAME") == physical for s in slaves):
            raise BondError(f"physical NIC {physical} is still a slave of {name}: not inside the VM yet?")
        if len(slaves) != 1:
            names = [s.get("IFLA_IFNAME") for s in slaves]
            raise BondError(f"bond {name} has slaves {names}; expected exactly the virtual NIC")
        slave = slaves[0]
        sname = slave.get("IFLA_IFNAME")
        perm = str(slave.get("IFLA_PERM_ADDRESS") or "")
        bond_mac = str(bond.get("IFLA_ADDRESS") or "")
        if perm.lower() != bond_mac.lower():
            return f"kept bond {name} with {sname} as its only slave (own MAC {perm} is not {bond_mac})"
        conf = snapshot(ipr, name)
        t0 = time.monotonic()
        ipr.link("set", index=slave["index"], master=0)
        ipr.link("del", index=bidx[0])
        ipr.link("set", index=slave["index"], mtu=conf.mtu)
        ipr.link("set", index=slave["index"], state="up")
        for a in conf.addresses:
            _add_addr(ipr, slave["index"], a)
        for r in conf.routes:
            _add_route(ipr, slave["index"], r)
        gap_ms = (time.monotonic() - t0) * 1000
    return f"dissolved bond {name}: addresses and routes on {sname} ({gap_ms:.0f} ms)"
