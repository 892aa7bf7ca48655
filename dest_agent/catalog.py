"""The virtual device catalog: the devices of the VM that V will build (the patent's virtual device
information store), from the destination's configuration.

TOML shape (the ``[catalog]`` table of the destination config, passed here as a dict)::

    [catalog]
    max_memory_bytes = 0            # optional, 0 = not stated
    free_disk_bytes = 0             # optional
    [catalog.schemes]               # optional, per type
    nic = "bond-active-backup"
    disk = "md-raid1"
    [[catalog.devices]]
    type = "nic"                    # "nic" | "disk"
    device_id = "1af4:1000"         # PCI vendor:device
    name = "vnet0"
    mac = ""                        # "" = the source NIC's MAC
    driver = "virtio_net"
    [[catalog.devices]]
    type = "disk"
    device_id = "1af4:1001"
    name = "vda"
    serial = "p2v-data"
    size = "8G"                     # bytes or with K/M/G/T suffix (binary); 0 = sized to fit
    driver = "virtio_blk"
    export_uri = "nbd://10.77.0.2:10809/vda"
    scheme = "md-raid1"             # optional per-device override
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from p2v.v1 import destination_pb2

DeviceType = destination_pb2.DeviceType
Scheme = destination_pb2.RedundancyScheme

TYPE_NAMES: dict[str, int] = {
    "nic": destination_pb2.DEVICE_TYPE_NIC,
    "disk": destination_pb2.DEVICE_TYPE_DISK,
}
SCHEME_NAMES: dict[str, int] = {
    "none": destination_pb2.REDUNDANCY_SCHEME_NONE,
    "bond-active-backup": destination_pb2.REDUNDANCY_SCHEME_BOND_ACTIVE_BACKUP,
    "md-raid1": destination_pb2.REDUNDANCY_SCHEME_MD_RAID1,
}
SCHEME_LABELS: dict[int, str] = {v: k for k, v in SCHEME_NAMES.items()}
# Which schemes make sense for which type.
ALLOWED_SCHEMES: dict[str, frozenset[str]] = {
    "nic": frozenset({"none", "bond-active-backup"}),
    "disk": frozenset({"none", "md-raid1"}),
}
DEFAULT_SCHEMES: dict[str, str] = {"nic": "bond-active-backup", "disk": "md-raid1"}

_DEVICE_KEYS = {"type", "device_id", "name", "mac", "serial", "size", "driver", "export_uri", "scheme"}
_TOP_KEYS = {"devices", "schemes", "max_memory_bytes", "free_disk_bytes"}
_PCI_ID_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_DRIVER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def scheme_label(scheme: int) -> str:
    """ "bond-active-backup" etc. for a ``RedundancyScheme`` value."""
    return SCHEME_LABELS.get(scheme, "unspecified")


def parse_size(value: Any, where: str = "size") -> int:
    """Bytes from an int or a string like "8G" / "512MiB" (binary multiples)."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{where}: must not be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    raise ValueError(f"{where}: expected bytes or a size like '8G', got {value!r}")


@dataclass(frozen=True)
class VirtualDeviceSpec:
    type: str  # "nic" | "disk"
    device_id: str
    name: str
    driver: str
    mac: str = ""
    serial: str = ""
    size_bytes: int = 0
    export_uri: str = ""
    scheme: str = ""  # "" = the per-type scheme of the spec


def _default_devices() -> list[VirtualDeviceSpec]:
    return [
        VirtualDeviceSpec(type="nic", device_id="1af4:1000", name="vnet0", driver="virtio_net"),
        VirtualDeviceSpec(type="disk", device_id="1af4:1001", name="vda", driver="virtio_blk"),
    ]


@dataclass(frozen=True)
class CatalogSpec:
    devices: list[VirtualDeviceSpec] = field(default_factory=_default_devices)
    schemes: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SCHEMES))
    max_memory_bytes: int = 0
    free_disk_bytes: int = 0

    @classmethod
    def default(cls) -> CatalogSpec:
        """One virtio-net (1af4:1000, virtio_net) and one virtio-blk (1af4:1001, virtio_blk)."""
        return cls()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CatalogSpec:
        """Validate a ``[catalog]`` table. Raises ``ValueError`` naming the offending entry."""
        if not isinstance(d, Mapping):
            raise ValueError(f"catalog: expected a table, got {type(d).__name__}")
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise ValueError(f"catalog: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")

        schemes = dict(DEFAULT_SCHEMES)
        raw_schemes = d.get("schemes", {})
        if not isinstance(raw_schemes, Mapping):
            raise ValueError("catalog.schemes: expected a table like {nic = 'bond-active-backup'}")
        for type_name, scheme in raw_schemes.items():
            if type_name not in TYPE_NAMES:
                raise ValueError(f"catalog.schemes: unknown device type {type_name!r}; known: {sorted(TYPE_NAMES)}")
            _check_scheme(type_name, scheme, f"catalog.schemes.{type_name}")
            schemes[type_name] = scheme

        raw_devices = d.get("devices")
        if raw_devices is None:
            devices = _default_devices()
        elif not isinstance(raw_devices, list):
            raise ValueError("catalog.devices: expected a list of tables ([[catalog.devices]])")
        else:
            devices = [_device_from_dict(i, dev) for i, dev in enumerate(raw_devices)]
        names = [dev.name for dev in devices]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"catalog.devices: duplicate names {dups}")
        macs = [dev.mac.lower() for dev in devices if dev.mac]
        dup_macs = sorted({m for m in macs if macs.count(m) > 1})
        if dup_macs:
            raise ValueError(f"catalog.devices: duplicate MACs {dup_macs}")
        return cls(
            devices=devices,
            schemes=schemes,
            max_memory_bytes=parse_size(d.get("max_memory_bytes", 0), "catalog.max_memory_bytes"),
            free_disk_bytes=parse_size(d.get("free_disk_bytes", 0), "catalog.free_disk_bytes"),
        )

    def scheme_for(self, dev: VirtualDeviceSpec) -> str:
        return dev.scheme or self.schemes.get(dev.type, DEFAULT_SCHEMES[dev.type])


def _check_scheme(type_name: str, scheme: Any, where: str) -> None:
    if scheme not in SCHEME_NAMES:
        raise ValueError(f"{where}: unknown redundancy scheme {scheme!r}; known: {sorted(SCHEME_NAMES)}")
    if scheme not in ALLOWED_SCHEMES[type_name]:
        raise ValueError(
            f"{where}: scheme {scheme!r} does not apply to a {type_name}; allowed: {sorted(ALLOWED_SCHEMES[type_name])}"
        )


def _device_from_dict(i: int, dev: Any) -> VirtualDeviceSpec:
    where = f"catalog.devices[{i}]"
    if not isinstance(dev, Mapping):
        raise ValueError(f"{where}: expected a table, got {type(dev).__name__}")
    unknown = set(dev) - _DEVICE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_DEVICE_KEYS)}")
    type_name = dev.get("type")
    if type_name not in TYPE_NAMES:
        raise ValueError(f"{where}: unknown device type {type_name!r}; known: {sorted(TYPE_NAMES)}")
    where = f"{where} ({type_name} {dev.get('name', '?')!r})"
    for key in ("device_id", "name", "driver"):
        if not isinstance(dev.get(key), str) or not dev.get(key):
            raise ValueError(f"{where}: {key} is required (a non-empty string)")
    for key in ("mac", "serial", "export_uri", "scheme"):
        if key in dev and not isinstance(dev[key], str):
            raise ValueError(f"{where}: {key} must be a string")
    if not _PCI_ID_RE.match(dev["device_id"]):
        raise ValueError(f"{where}: device_id {dev['device_id']!r} is not a PCI vendor:device like '1af4:1000'")
    if not _NAME_RE.match(dev["name"]):
        raise ValueError(f"{where}: name {dev['name']!r} must be 1-15 characters of [A-Za-z0-9_.-]")
    if not _DRIVER_RE.match(dev["driver"]):
        raise ValueError(f"{where}: driver {dev['driver']!r} is not a kernel module name")
    mac = dev.get("mac", "")
    serial = dev.get("serial", "")
    export_uri = dev.get("export_uri", "")
    size = parse_size(dev.get("size", 0), f"{where}: size")
    if type_name == "nic":
        if mac and not _MAC_RE.match(mac):
            raise ValueError(f"{where}: mac {mac!r} is not a MAC address like 52:54:00:12:34:56")
        if mac and int(mac.split(":")[0], 16) & 1:
            raise ValueError(f"{where}: mac {mac!r} is a multicast address")
        for key in ("serial", "size", "export_uri"):
            if dev.get(key):
                raise ValueError(f"{where}: {key} does not apply to a nic")
    else:
        if mac:
            raise ValueError(f"{where}: mac does not apply to a disk")
        if export_uri:
            _check_export_uri(export_uri, where)
        if len(serial) > 20:
            raise ValueError(f"{where}: serial {serial!r} is longer than 20 characters (virtio-blk limit)")
    scheme = dev.get("scheme", "")
    if scheme:
        _check_scheme(type_name, scheme, f"{where}: scheme")
    return VirtualDeviceSpec(
        type=type_name,
        device_id=dev["device_id"].lower(),
        name=dev["name"],
        driver=dev["driver"],
        mac=mac.lower(),
        serial=serial,
        size_bytes=size,
        export_uri=export_uri,
        scheme=scheme,
    )


def _check_export_uri(uri: str, where: str) -> None:
    parsed = urlparse(uri)
    if parsed.scheme != "nbd":
        raise ValueError(f"{where}: export_uri {uri!r} must be nbd://host[:port]/export")
    if not parsed.hostname:
        raise ValueError(f"{where}: export_uri {uri!r} has no host")
    try:
        parsed.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise ValueError(f"{where}: export_uri {uri!r}: {e}") from None


def build_catalog(spec: CatalogSpec, host_id: str) -> destination_pb2.VirtualDeviceCatalog:
    """The public catalog for ``spec`` (already validated by :meth:`CatalogSpec.from_dict`)."""
    out = destination_pb2.VirtualDeviceCatalog(
        host_id=host_id, max_memory_bytes=spec.max_memory_bytes, free_disk_bytes=spec.free_disk_bytes
    )
    for dev in spec.devices:
        out.devices.add(
            type=TYPE_NAMES[dev.type],
            device_id=dev.device_id,
            name=dev.name,
            mac=dev.mac,
            serial=dev.serial,
            size_bytes=dev.size_bytes,
            scheme=SCHEME_NAMES[spec.scheme_for(dev)],
            driver=dev.driver,
            export_uri=dev.export_uri,
        )
    return out
