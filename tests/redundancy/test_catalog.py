from __future__ import annotations

import tomllib

import pytest

from dest_agent.catalog import CatalogSpec, build_catalog, parse_size
from p2v.v1 import destination_pb2 as d

GOOD = """
[catalog]
max_memory_bytes = "2G"
[catalog.schemes]
nic = "bond-active-backup"
[[catalog.devices]]
type = "nic"
device_id = "1AF4:1000"
name = "vnet0"
mac = "52:54:00:12:34:56"
driver = "virtio_net"
[[catalog.devices]]
type = "disk"
device_id = "1af4:1001"
name = "vda"
serial = "p2v-data"
size = "8G"
driver = "virtio_blk"
export_uri = "nbd://10.77.0.2:10809/vda"
"""


def test_default_spec() -> None:
    cat = build_catalog(CatalogSpec.default(), "host-v")
    assert cat.host_id == "host-v"
    assert [(x.type, x.device_id, x.driver, x.scheme) for x in cat.devices] == [
        (d.DEVICE_TYPE_NIC, "1af4:1000", "virtio_net", d.REDUNDANCY_SCHEME_BOND_ACTIVE_BACKUP),
        (d.DEVICE_TYPE_DISK, "1af4:1001", "virtio_blk", d.REDUNDANCY_SCHEME_MD_RAID1),
    ]
    assert CatalogSpec.from_dict({}) == CatalogSpec.default()


def test_from_toml() -> None:
    spec = CatalogSpec.from_dict(tomllib.loads(GOOD)["catalog"])
    cat = build_catalog(spec, "v")
    nic, disk = cat.devices
    assert nic.device_id == "1af4:1000" and nic.mac == "52:54:00:12:34:56"
    assert disk.size_bytes == 8 << 30 and disk.serial == "p2v-data"
    assert disk.export_uri == "nbd://10.77.0.2:10809/vda"
    assert disk.scheme == d.REDUNDANCY_SCHEME_MD_RAID1
    assert cat.max_memory_bytes == 2 << 30


def test_scheme_per_type_and_override() -> None:
    spec = CatalogSpec.from_dict(
        {
            "schemes": {"nic": "none"},
            "devices": [
                {"type": "nic", "device_id": "1af4:1041", "name": "a", "driver": "virtio_net"},
                {
                    "type": "nic",
                    "device_id": "1af4:1041",
                    "name": "b",
                    "driver": "virtio_net",
                    "scheme": "bond-active-backup",
                },
            ],
        }
    )
    a, b = build_catalog(spec, "v").devices
    assert a.scheme == d.REDUNDANCY_SCHEME_NONE and b.scheme == d.REDUNDANCY_SCHEME_BOND_ACTIVE_BACKUP


NIC = {"type": "nic", "device_id": "1af4:1000", "name": "vnet0", "driver": "virtio_net"}
DISK = {"type": "disk", "device_id": "1af4:1001", "name": "vda", "driver": "virtio_blk"}


@pytest.mark.parametrize(
    ("doc", "msg"),
    [
        ({"devices": [{**NIC, "type": "gpu"}]}, "unknown device type 'gpu'"),
        ({"devices": [{**NIC, "type": None}]}, "unknown device type None"),
        ({"schemes": {"gpu": "none"}}, "unknown device type 'gpu'"),
        ({"schemes": {"nic": "md-raid1"}}, "does not apply to a nic"),
        ({"schemes": {"disk": "raid5"}}, "unknown redundancy scheme 'raid5'"),
        ({"devices": [{**NIC, "colour": "red"}]}, "unknown keys ['colour']"),
        ({"device": []}, "unknown keys ['device']"),
        ({"devices": [{**NIC, "device_id": "virtio"}]}, "is not a PCI vendor:device"),
        ({"devices": [{**NIC, "mac": "52:54:00:12:34"}]}, "is not a MAC address"),
        ({"devices": [{**NIC, "mac": "01:00:5e:00:00:01"}]}, "multicast"),
        ({"devices": [{**NIC, "size": "1G"}]}, "size does not apply to a nic"),
        ({"devices": [{**DISK, "mac": "52:54:00:12:34:56"}]}, "mac does not apply to a disk"),
        ({"devices": [{**DISK, "size": "lots"}]}, "expected bytes or a size"),
        ({"devices": [{**DISK, "size": -1}]}, "must not be negative"),
        ({"devices": [{**DISK, "export_uri": "http://x/y"}]}, "must be nbd://"),
        ({"devices": [{**DISK, "export_uri": "nbd://h:99999/y"}]}, "out of range"),
        ({"devices": [{**DISK, "name": ""}]}, "name is required"),
        ({"devices": [{**DISK, "driver": "virtio blk"}]}, "not a kernel module name"),
        ({"devices": [DISK, DISK]}, "duplicate names ['vda']"),
        (
            {
                "devices": [
                    {**NIC, "mac": "52:54:00:00:00:01"},
                    {**NIC, "name": "x", "mac": "52:54:00:00:00:01"},
                ]
            },
            "duplicate MACs",
        ),
        ({"devices": {"type": "nic"}}, "expected a list"),
        ({"devices": ["nic"]}, "expected a table"),
    ],
)
def test_bad_input_is_refused_clearly(doc: dict, msg: str) -> None:
    with pytest.raises(ValueError) as e:
        CatalogSpec.from_dict(doc)
    assert msg in str(e.value)


def test_parse_size() -> None:
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1 g") == 1 << 30
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size(True)
