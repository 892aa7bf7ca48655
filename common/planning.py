"""Planning: pair P's physical devices with the target VM's virtual devices (pure policy).

``plan(inventory, catalog)`` takes the source's ``Inventory`` and the destination's
``VirtualDeviceCatalog`` and returns a :class:`Plan`: one :class:`Pair` per redundant configuration
to build, with its scheme, and a reason for every physical device left unpaired. No I/O.

Rules:
- NIC: a physical NIC (has a bus device, no link kind) that is up or carries addresses gets a
  virtual NIC with scheme bond-active-backup: a new bond with the physical NIC as active slave.
  A physical NIC already enslaved to an administrator's active-backup bond is covered by joining
  the virtual NIC to that bond (``Pair.existing``). Bridge ports and other bond modes are refused.
  A virtual NIC whose MAC equals the physical one is preferred, then one with MAC "" (take P's).
- Disk: a physical disk is carried only through md RAID1: each raid1 array with physical members
  gets a virtual disk (at least as large as its largest member; size 0 = V sizes it to fit) as a
  network leg. A physical disk (or partition) outside any raid1 array cannot be mirrored live.
- Loopback and software links (veth, bridge, bond, ...) and software block devices live in memory
  or on top of the above and move with the OS: they are not planned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from p2v.v1 import destination_pb2, source_pb2

NIC = destination_pb2.DEVICE_TYPE_NIC
DISK = destination_pb2.DEVICE_TYPE_DISK
BOND = destination_pb2.REDUNDANCY_SCHEME_BOND_ACTIVE_BACKUP
RAID1 = destination_pb2.REDUNDANCY_SCHEME_MD_RAID1
NONE = destination_pb2.REDUNDANCY_SCHEME_NONE

SCHEME_LABEL = {BOND: "bond-active-backup", RAID1: "md-raid1", NONE: "none"}
EXPECTED_SCHEME = {NIC: BOND, DISK: RAID1}
VIRTIO_PCI_VENDOR = "1af4"


@dataclass(frozen=True)
class Reason:
    code: str
    message: str
    blocking: bool
    device: str = ""


@dataclass(frozen=True)
class Pair:
    kind: str  # "nic" | "disk"
    physical: str  # NIC name, admin bond name (existing=True), or md array name
    virtual: str  # virtual device name from the catalog
    scheme: int  # destination_pb2.RedundancyScheme
    members: tuple[str, ...] = ()  # physical NIC(s) / md member devices
    mac: str = ""  # NIC: the MAC the bond keeps (P's)
    virtual_mac: str = ""  # NIC: the catalog's MAC ("" = P's)
    driver: str = ""  # the virtual device's kernel module
    device_id: str = ""  # the virtual device's PCI vendor:device
    export_uri: str = ""  # disk: V's NBD export
    size_bytes: int = 0  # disk: virtual disk size (0 = sized to fit)
    serial: str = ""  # disk: the virtual disk's serial (finds it inside the VM)
    existing: bool = False  # joins a configuration the administrator made (never cancelled)

    @property
    def scheme_label(self) -> str:
        return SCHEME_LABEL.get(self.scheme, "unspecified")


@dataclass(frozen=True)
class PlanPolicy:
    # Physical devices the administrator chose to leave behind (not migrated): a warning, not a block.
    ignore: frozenset[str] = frozenset()


@dataclass
class Plan:
    pairs: list[Pair] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)  # "name: why"

    @property
    def ok(self) -> bool:
        return not any(r.blocking for r in self.reasons)

    def drivers(self) -> list[str]:
        """Kernel modules the source must load (in order, without repeats). Virtio devices on PCI
        (vendor 1af4) need the transport, virtio_pci, besides their own driver."""
        out: list[str] = []
        for p in self.pairs:
            if p.device_id.lower().startswith(VIRTIO_PCI_VENDOR + ":") and "virtio_pci" not in out:
                out.insert(0, "virtio_pci")
            if p.driver and p.driver not in out:
                out.append(p.driver)
        return out

    def to_dict(self) -> dict:
        return {
            "pairs": [{**asdict(p), "members": list(p.members)} for p in self.pairs],
            "reasons": [asdict(r) for r in self.reasons],
            "unpaired": list(self.unpaired),
            "ok": self.ok,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """Inverse of :meth:`to_dict` (a saved plan; ``build`` re-checks it against the system)."""
        try:
            return cls(
                pairs=[Pair(**{**p, "members": tuple(p.get("members", ()))}) for p in d.get("pairs", [])],
                reasons=[Reason(**r) for r in d.get("reasons", [])],
                unpaired=list(d.get("unpaired", [])),
            )
        except TypeError as e:
            raise ValueError(f"not a saved plan: {e}") from None

    def to_verdict(self) -> source_pb2.CheckVerdict:
        v = source_pb2.CheckVerdict(ok=self.ok, unpaired=self.unpaired)
        for r in self.reasons:
            v.reasons.add(code=r.code, message=r.message, blocking=r.blocking)
        for p in self.pairs:
            v.plan.add(physical=p.physical, virtual=p.virtual, scheme=p.scheme_label)
        return v


class _Pool:
    """Virtual devices still free, in catalog order."""

    def __init__(self, devices: list[destination_pb2.VirtualDevice]) -> None:
        self.free = list(devices)

    def take(self, dev_type: int, want_mac: str = "", min_size: int = 0) -> destination_pb2.VirtualDevice | None:
        candidates = [d for d in self.free if d.type == dev_type and d.scheme == EXPECTED_SCHEME[dev_type]]
        if dev_type == NIC and want_mac:
            exact = [d for d in candidates if d.mac.lower() == want_mac.lower()]
            blank = [d for d in candidates if not d.mac]
            candidates = exact + blank + [d for d in candidates if d not in exact and d not in blank]
        if dev_type == DISK:
            candidates = [d for d in candidates if d.size_bytes == 0 or d.size_bytes >= min_size]
        if not candidates:
            return None
        self.free.remove(candidates[0])
        return candidates[0]

    def has(self, dev_type: int) -> bool:
        return any(d.type == dev_type and d.scheme == EXPECTED_SCHEME[dev_type] for d in self.free)


def _is_physical_nic(n: source_pb2.Nic) -> bool:
    return n.name != "lo" and not n.kind and bool(n.driver or n.pci_address)


def _is_physical_disk(b: source_pb2.BlockDevice) -> bool:
    kind = b.kind or ("md" if b.md_level else "disk")
    return kind == "disk" and bool(b.driver or b.pci_address)


def plan(
    inventory: source_pb2.Inventory,
    catalog: destination_pb2.VirtualDeviceCatalog,
    policy: PlanPolicy | None = None,
) -> Plan:
    """Pair physical devices with virtual ones. Pure: inventory + catalog -> plan."""
    policy = policy or PlanPolicy()
    out = Plan()
    _check_catalog(catalog, out)
    pool = _Pool([d for d in catalog.devices if d.type in EXPECTED_SCHEME and d.scheme == EXPECTED_SCHEME[d.type]])
    _plan_nics(inventory, pool, policy, out)
    _plan_disks(inventory, pool, policy, out)
    for d in pool.free:
        out.reasons.append(
            Reason(
                "virtual-unused",
                f"virtual device {d.name} ({d.device_id}) has no physical partner",
                False,
                d.name,
            )
        )
    return out


def _check_catalog(catalog: destination_pb2.VirtualDeviceCatalog, out: Plan) -> None:
    seen: set[str] = set()
    for d in catalog.devices:
        if d.name in seen:
            out.reasons.append(Reason("catalog-duplicate", f"catalog lists {d.name!r} twice", True, d.name))
        seen.add(d.name)
        if d.type not in EXPECTED_SCHEME:
            out.reasons.append(
                Reason(
                    "catalog-unknown-type",
                    f"catalog device {d.name!r} has unknown type {d.type}; only NIC and DISK are supported",
                    True,
                    d.name,
                )
            )
        elif d.scheme == NONE:
            out.reasons.append(
                Reason("virtual-no-redundancy", f"virtual device {d.name} asks for no redundancy", False, d.name)
            )
        elif d.scheme != EXPECTED_SCHEME[d.type]:
            kind = "NIC" if d.type == NIC else "disk"
            out.reasons.append(
                Reason(
                    "catalog-scheme-mismatch",
                    f"catalog device {d.name!r}: scheme {SCHEME_LABEL.get(d.scheme, d.scheme)} "
                    f"does not apply to a {kind} (expected {SCHEME_LABEL[EXPECTED_SCHEME[d.type]]})",
                    True,
                    d.name,
                )
            )
        elif d.type == DISK and not d.export_uri:
            out.reasons.append(
                Reason(
                    "catalog-no-export",
                    f"virtual disk {d.name!r} has no export_uri for the network leg",
                    True,
                    d.name,
                )
            )


def _leave(out: Plan, policy: PlanPolicy, name: str, code: str, why: str, blocking: bool) -> None:
    if name in policy.ignore:
        code, why, blocking = "ignored", f"{why} (left behind by policy)", False
    out.unpaired.append(f"{name}: {why}")
    out.reasons.append(Reason(code, f"{name}: {why}", blocking, name))


def _plan_nics(inv: source_pb2.Inventory, pool: _Pool, policy: PlanPolicy, out: Plan) -> None:
    links = {n.name: n for n in inv.nics}
    bonds_done: set[str] = set()
    for n in sorted((n for n in inv.nics if _is_physical_nic(n)), key=lambda n: n.name):
        if n.master:
            master = links.get(n.master)
            if master is None or master.kind != "bond":
                kind = master.kind if master is not None else "unknown"
                _leave(
                    out,
                    policy,
                    n.name,
                    "nic-master-unsupported",
                    f"enslaved to {n.master} ({kind}); only bonds can take the virtual NIC",
                    True,
                )
                continue
            if master.bond_mode and master.bond_mode != "active-backup":
                _leave(
                    out,
                    policy,
                    n.name,
                    "bond-mode-unsupported",
                    f"enslaved to bond {master.name} in mode {master.bond_mode}; only active-backup "
                    "can fail over to the virtual NIC",
                    True,
                )
                continue
            if master.name in bonds_done:
                continue  # the bond's virtual NIC is already planned
            slaves = tuple(sorted(s.name for s in inv.nics if s.master == master.name and _is_physical_nic(s)))
            if master.name in policy.ignore:
                _leave(out, policy, master.name, "ignored", "bond left behind", False)
                bonds_done.add(master.name)
                continue
            v = pool.take(NIC, want_mac=master.mac)
            bonds_done.add(master.name)
            if v is None:
                _leave(out, policy, master.name, "nic-no-virtual", "no virtual NIC left in the catalog", True)
                continue
            out.pairs.append(_nic_pair(master.name, slaves, master.mac, v, existing=True))
            continue
        if not n.up and not n.addresses:
            out.unpaired.append(f"{n.name}: down and without addresses, left as it is")
            out.reasons.append(Reason("nic-unused", f"{n.name} is down and has no addresses", False, n.name))
            continue
        if n.name in policy.ignore:
            _leave(out, policy, n.name, "ignored", "NIC left behind", False)
            continue
        v = pool.take(NIC, want_mac=n.mac)
        if v is None:
            _leave(out, policy, n.name, "nic-no-virtual", "no virtual NIC left in the catalog", True)
            continue
        out.pairs.append(_nic_pair(n.name, (n.name,), n.mac, v, existing=False))


def _nic_pair(
    physical: str, members: tuple[str, ...], mac: str, v: destination_pb2.VirtualDevice, existing: bool
) -> Pair:
    return Pair(
        kind="nic",
        physical=physical,
        virtual=v.name,
        scheme=v.scheme,
        members=members,
        mac=mac,
        virtual_mac=v.mac,
        driver=v.driver,
        device_id=v.device_id,
        existing=existing,
    )


def _plan_disks(inv: source_pb2.Inventory, pool: _Pool, policy: PlanPolicy, out: Plan) -> None:
    blocks = {b.name: b for b in inv.block_devices}

    def disk_of(name: str) -> str:
        b = blocks.get(name)
        if b is None:
            return ""
        return b.parent if (b.kind == "partition" and b.parent) else name

    physical = sorted(b.name for b in inv.block_devices if _is_physical_disk(b))
    covered: set[str] = set()  # physical disks or partitions that are members of a paired array
    arrays = sorted((b for b in inv.block_devices if b.md_level or b.kind == "md"), key=lambda b: b.name)
    for md in arrays:
        phys_members = tuple(m for m in md.md_members if disk_of(m) in physical)
        if not phys_members:
            continue  # an array of software devices: moves with what is below it
        if md.md_level != "raid1":
            for m in phys_members:
                covered.add(m)
            _leave(
                out,
                policy,
                md.name,
                "md-level-unsupported",
                f"md array level {md.md_level or 'unknown'}: only raid1 can take a network mirror leg",
                True,
            )
            continue
        covered.update(phys_members)
        if md.name in policy.ignore:
            _leave(out, policy, md.name, "ignored", "md array left behind", False)
            continue
        need = max((blocks[m].size_bytes for m in phys_members if m in blocks), default=0)
        v = pool.take(DISK, min_size=need)
        if v is None:
            why = "no virtual disk left in the catalog"
            code = "disk-no-virtual"
            if pool.has(DISK):
                why, code = (
                    f"every free virtual disk is smaller than its members ({need} bytes)",
                    "disk-too-small",
                )
            _leave(out, policy, md.name, code, why, True)
            continue
        out.pairs.append(
            Pair(
                kind="disk",
                physical=md.name,
                virtual=v.name,
                scheme=v.scheme,
                members=phys_members,
                driver=v.driver,
                device_id=v.device_id,
                export_uri=v.export_uri,
                size_bytes=v.size_bytes,
                serial=v.serial,
            )
        )
    for disk in physical:
        b = blocks[disk]
        parts = [p.name for p in inv.block_devices if p.kind == "partition" and p.parent == disk]
        units = parts or [disk]
        if b.removable:
            out.unpaired.append(f"{disk}: removable, left as it is")
            out.reasons.append(Reason("disk-removable", f"{disk} is removable and is not migrated", False, disk))
            continue
        loose = [u for u in units if u not in covered and not (u != disk and disk in covered)]
        if disk in covered or not loose:
            continue
        _leave(
            out,
            policy,
            disk,
            "disk-not-in-md",
            f"{', '.join(loose)} not in an md raid1 array: it cannot be mirrored to the VM live",
            True,
        )
