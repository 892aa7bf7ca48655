from __future__ import annotations

from common.planning import Plan, PlanPolicy, plan
from dest_agent.catalog import CatalogSpec, build_catalog
from p2v.v1 import destination_pb2 as d
from p2v.v1 import source_pb2 as s

GiB = 1 << 30


def inventory(*, nics: list[s.Nic] | None = None, blocks: list[s.BlockDevice] | None = None) -> s.Inventory:
    inv = s.Inventory(host_id="p")
    inv.nics.add(name="lo", mac="00:00:00:00:00:00", up=True, addresses=["127.0.0.1/8"])
    inv.nics.extend(
        nics
        if nics is not None
        else [
            s.Nic(
                name="ens3",
                mac="52:54:00:aa:bb:cc",
                driver="e1000",
                pci_address="0000:00:03.0",
                pci_id="8086:100e",
                up=True,
                addresses=["10.77.0.10/24"],
            ),
        ]
    )
    inv.block_devices.extend(
        blocks
        if blocks is not None
        else [
            s.BlockDevice(
                name="sda",
                kind="disk",
                size_bytes=4 * GiB,
                driver="ata_piix",
                pci_address="0000:00:01.1",
                holders=["md0"],
            ),
            s.BlockDevice(name="md0", kind="md", md_level="raid1", md_members=["sda"], size_bytes=4 * GiB - (1 << 20)),
            s.BlockDevice(name="loop0", kind="loop"),
        ]
    )
    return inv


def catalog(**kw: object) -> d.VirtualDeviceCatalog:
    devices = kw.get("devices") or [
        {"type": "nic", "device_id": "1af4:1000", "name": "vnet0", "driver": "virtio_net"},
        {
            "type": "disk",
            "device_id": "1af4:1001",
            "name": "vdb",
            "driver": "virtio_blk",
            "size": "8G",
            "export_uri": "nbd://10.77.0.2:10809/vdb",
        },
    ]
    return build_catalog(CatalogSpec.from_dict({"devices": devices}), "v")


def codes(p: Plan) -> list[str]:
    return [r.code for r in p.reasons]


def test_simple_plan_pairs_nic_and_md() -> None:
    p = plan(inventory(), catalog())
    assert p.ok, p.reasons
    nic, disk = p.pairs
    assert (nic.kind, nic.physical, nic.virtual, nic.scheme_label) == (
        "nic",
        "ens3",
        "vnet0",
        "bond-active-backup",
    )
    assert nic.members == ("ens3",) and nic.mac == "52:54:00:aa:bb:cc" and not nic.existing
    assert (disk.kind, disk.physical, disk.virtual, disk.scheme_label) == ("disk", "md0", "vdb", "md-raid1")
    assert disk.members == ("sda",) and disk.export_uri == "nbd://10.77.0.2:10809/vdb"
    assert p.drivers() == ["virtio_pci", "virtio_net", "virtio_blk"]
    v = p.to_verdict()
    assert v.ok and [(x.physical, x.virtual, x.scheme) for x in v.plan] == [
        ("ens3", "vnet0", "bond-active-backup"),
        ("md0", "vdb", "md-raid1"),
    ]


def test_partition_members_and_uncovered_partition_blocks() -> None:
    blocks = [
        s.BlockDevice(name="sda", kind="disk", size_bytes=4 * GiB, driver="ata_piix"),
        s.BlockDevice(name="sda1", kind="partition", parent="sda", size_bytes=3 * GiB, holders=["md0"]),
        s.BlockDevice(name="sda2", kind="partition", parent="sda", size_bytes=GiB),
        s.BlockDevice(name="md0", kind="md", md_level="raid1", md_members=["sda1"], size_bytes=3 * GiB),
    ]
    p = plan(inventory(blocks=blocks), catalog())
    assert [x.physical for x in p.pairs] == ["ens3", "md0"]
    assert not p.ok and "disk-not-in-md" in codes(p)
    assert any(u.startswith("sda: sda2 not in an md raid1") for u in p.unpaired)
    # the administrator may leave it behind
    p2 = plan(inventory(blocks=blocks), catalog(), PlanPolicy(ignore=frozenset({"sda"})))
    assert p2.ok and "ignored" in codes(p2)


def test_disk_outside_md_blocks() -> None:
    blocks = [s.BlockDevice(name="sda", kind="disk", size_bytes=GiB, driver="ata_piix")]
    p = plan(inventory(blocks=blocks), catalog())
    assert not p.ok and codes(p).count("disk-not-in-md") == 1
    assert "virtual-unused" in codes(p)  # vdb found no partner


def test_virtual_disk_too_small() -> None:
    devices = [
        {"type": "nic", "device_id": "1af4:1000", "name": "vnet0", "driver": "virtio_net"},
        {
            "type": "disk",
            "device_id": "1af4:1001",
            "name": "vdb",
            "driver": "virtio_blk",
            "size": "1G",
            "export_uri": "nbd://h/vdb",
        },
    ]
    p = plan(inventory(), catalog(devices=devices))
    assert not p.ok and "disk-too-small" in codes(p)
    assert [x.kind for x in p.pairs] == ["nic"]


def test_raid5_refused() -> None:
    blocks = [
        s.BlockDevice(name="sda", kind="disk", size_bytes=GiB, driver="ahci"),
        s.BlockDevice(name="sdb", kind="disk", size_bytes=GiB, driver="ahci"),
        s.BlockDevice(name="sdc", kind="disk", size_bytes=GiB, driver="ahci"),
        s.BlockDevice(name="md1", kind="md", md_level="raid5", md_members=["sda", "sdb", "sdc"]),
    ]
    p = plan(inventory(blocks=blocks), catalog())
    assert not p.ok and "md-level-unsupported" in codes(p)
    assert "disk-not-in-md" not in codes(p)  # the members are reported once, through their array


def test_two_physical_nics_one_virtual() -> None:
    nics = [
        s.Nic(name="eno1", mac="52:54:00:00:00:01", driver="e1000", up=True, addresses=["10.0.0.1/24"]),
        s.Nic(name="eno2", mac="52:54:00:00:00:02", driver="e1000", up=True, addresses=["10.1.0.1/24"]),
        s.Nic(name="eno3", mac="52:54:00:00:00:03", driver="e1000", up=False),
        s.Nic(name="veth0", kind="veth", mac="02:00:00:00:00:09", up=True, addresses=["10.2.0.1/24"]),
    ]
    p = plan(inventory(nics=nics), catalog())
    assert [x.physical for x in p.pairs if x.kind == "nic"] == ["eno1"]
    assert "nic-no-virtual" in codes(p) and not p.ok
    assert any(u.startswith("eno3: down") for u in p.unpaired)
    assert not any("veth0" in u for u in p.unpaired)  # software links move with the OS


def test_mac_match_preferred() -> None:
    devices = [
        {
            "type": "nic",
            "device_id": "1af4:1000",
            "name": "va",
            "driver": "virtio_net",
            "mac": "52:54:00:00:00:99",
        },
        {"type": "nic", "device_id": "1af4:1000", "name": "vb", "driver": "virtio_net"},
        {
            "type": "nic",
            "device_id": "1af4:1000",
            "name": "vc",
            "driver": "virtio_net",
            "mac": "52:54:00:00:00:01",
        },
    ]
    nics = [s.Nic(name="eno1", mac="52:54:00:00:00:01", driver="e1000", up=True)]
    p = plan(inventory(nics=nics, blocks=[]), catalog(devices=devices))
    assert [x.virtual for x in p.pairs] == ["vc"]


def test_existing_admin_bond_is_joined_not_recreated() -> None:
    nics = [
        s.Nic(
            name="bond0",
            kind="bond",
            bond_mode="active-backup",
            mac="52:54:00:00:00:01",
            up=True,
            addresses=["10.0.0.1/24"],
        ),
        s.Nic(name="eno1", mac="52:54:00:00:00:01", driver="e1000", master="bond0", up=True),
        s.Nic(name="eno2", mac="52:54:00:00:00:02", driver="e1000", master="bond0", up=True),
    ]
    p = plan(inventory(nics=nics, blocks=[]), catalog())
    assert p.ok
    (pair,) = [x for x in p.pairs if x.kind == "nic"]
    assert pair.physical == "bond0" and pair.existing and pair.members == ("eno1", "eno2")


def test_lacp_bond_and_bridge_port_refused() -> None:
    nics = [
        s.Nic(name="bond0", kind="bond", bond_mode="802.3ad", up=True),
        s.Nic(name="eno1", driver="e1000", master="bond0", up=True),
        s.Nic(name="br0", kind="bridge", up=True, addresses=["10.0.0.1/24"]),
        s.Nic(name="eno2", driver="e1000", master="br0", up=True),
    ]
    p = plan(inventory(nics=nics, blocks=[]), catalog())
    assert not p.ok
    assert {"bond-mode-unsupported", "nic-master-unsupported"} <= set(codes(p))


def test_bad_catalog_entries() -> None:
    cat = d.VirtualDeviceCatalog(host_id="v")
    cat.devices.add(type=d.DEVICE_TYPE_UNSPECIFIED, name="x", device_id="1234:5678")
    cat.devices.add(type=d.DEVICE_TYPE_NIC, name="vnet0", scheme=d.REDUNDANCY_SCHEME_MD_RAID1)
    cat.devices.add(type=d.DEVICE_TYPE_DISK, name="vdb", scheme=d.REDUNDANCY_SCHEME_MD_RAID1, size_bytes=8 * GiB)
    p = plan(inventory(), cat)
    assert not p.ok
    assert {"catalog-unknown-type", "catalog-scheme-mismatch", "catalog-no-export"} <= set(codes(p))
    assert p.pairs == [] or all(x.kind == "disk" for x in p.pairs)


def test_scheme_none_means_no_pairing() -> None:
    spec = CatalogSpec.from_dict({"schemes": {"nic": "none", "disk": "none"}})
    p = plan(inventory(), build_catalog(spec, "v"))
    assert p.pairs == [] and not p.ok
    assert codes(p).count("virtual-no-redundancy") == 2


def test_empty_inventory_is_ok_with_notes() -> None:
    p = plan(inventory(nics=[], blocks=[]), catalog())
    assert p.ok and p.pairs == [] and codes(p) == ["virtual-unused", "virtual-unused"]


def test_plan_is_pure() -> None:
    inv, cat = inventory(), catalog()
    before = (inv.SerializeToString(), cat.SerializeToString())
    assert plan(inv, cat) == plan(inv, cat)
    assert (inv.SerializeToString(), cat.SerializeToString()) == before
