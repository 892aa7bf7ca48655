"""Pure parts of the mechanisms: initramfs module list editing, md state parsing, nbd URIs; and the
real driver/module readers on this host."""

from __future__ import annotations

from pathlib import Path

import pytest

from source_agent.redundancy import drivers, mdmirror
from source_agent.redundancy.journal import Journal
from tests.redundancy import fakesys as fs

ORIG = "# List of modules\n# comment\nloop\nvirtio_net  # already\n"


def test_modules_block_round_trip() -> None:
    new, added = drivers.add_modules_block(
        ORIG, "p2v-m-001-initramfs-modules", ["virtio_pci", "virtio-net", "virtio_blk"]
    )
    assert added == ["virtio_pci", "virtio_blk"]
    assert new.startswith(ORIG) and "# p2v p2v-m-001-initramfs-modules begin\nvirtio_pci\nvirtio_blk\n" in new
    assert drivers.remove_modules_block(new, "p2v-m-001-initramfs-modules") == ORIG
    assert drivers.remove_modules_block(ORIG, "p2v-m-001-initramfs-modules") == ORIG
    same, none = drivers.add_modules_block(new, "other", ["virtio_pci"])
    assert same == new and none == []


def test_ensure_initramfs_on_fake_root(tmp_path: Path) -> None:
    fs.write(tmp_path, drivers.ITOOLS_MODULES, ORIG)
    j = Journal.create(tmp_path / "j.json", "m")
    e = drivers.ensure_initramfs(j, ["virtio_pci", "virtio_blk"], root=tmp_path, rebuild=False, release="6.1.0-x")
    assert e is not None and e.detail["added"] == ["virtio_pci", "virtio_blk"] and not e.detail["rebuilt"]
    text = (tmp_path / drivers.ITOOLS_MODULES.lstrip("/")).read_text()
    assert "virtio_blk" in text
    e.detail["config"] = str(tmp_path / drivers.ITOOLS_MODULES.lstrip("/"))
    drivers.undo_initramfs(e)
    assert (tmp_path / drivers.ITOOLS_MODULES.lstrip("/")).read_text() == ORIG


def test_builtin_modules_are_left_alone(tmp_path: Path) -> None:
    fs.write(tmp_path, "/lib/modules/6.1.0-x/modules.builtin", "kernel/drivers/net/virtio_net.ko\n")
    fs.write(tmp_path, drivers.ITOOLS_MODULES, ORIG)
    assert drivers.is_builtin("virtio-net", tmp_path, "6.1.0-x")
    j = Journal.create(tmp_path / "j.json", "m")
    assert drivers.ensure_initramfs(j, ["virtio_net"], root=tmp_path, rebuild=False, release="6.1.0-x") is None
    assert j.entries == []


def test_bad_module_names() -> None:
    with pytest.raises(drivers.DriverError, match="not a kernel module name"):
        drivers._check_names(["virtio_net; rm -rf /"])


def test_real_module_readers_on_this_host() -> None:
    mods = drivers.loaded_modules()
    if Path("/proc/modules").exists():
        assert mods == [line.split()[0] for line in Path("/proc/modules").read_text().splitlines()]
    else:
        assert mods == []
    # this host's virtio drivers are built in: load() would journal nothing for them
    for m in ("virtio_net", "virtio_blk"):
        if Path(f"/sys/module/{m}").is_dir() and m not in mods:
            assert drivers.is_builtin(m)


def _md(
    root: Path,
    members: dict[str, tuple[str, str]],
    action: str = "idle",
    completed: str = "none",
    bitmap: str = "+8",
    raid_disks: int = 2,
) -> None:
    base = "/sys/block/md127/md"
    fs.write(root, f"{base}/level", "raid1\n")
    fs.write(root, f"{base}/raid_disks", f"{raid_disks}\n")
    fs.write(root, f"{base}/degraded", "0\n")
    fs.write(root, f"{base}/bitmap/location", bitmap + "\n")
    fs.write(root, f"{base}/sync_action", action + "\n")
    fs.write(root, f"{base}/sync_completed", completed + "\n")
    for name, (state, slot) in members.items():
        fs.write(root, f"{base}/dev-{name}/state", state + "\n")
        fs.write(root, f"{base}/dev-{name}/slot", slot + "\n")


def test_leg_status_recovering_then_ready(tmp_path: Path) -> None:
    _md(tmp_path, {"sdb": ("in_sync", "0"), "nbd0": ("write_mostly", "1")}, "recover", "262144 / 1048576")
    st = mdmirror.array_state("md127", tmp_path)
    s = mdmirror.leg_status(st, "nbd0")
    assert s.present and s.write_mostly and s.bitmap and s.recovering and not s.ready()
    assert s.fraction == pytest.approx(0.25) and "recovering 25.0%" in s.describe()
    _md(tmp_path, {"sdb": ("in_sync", "0"), "nbd0": ("in_sync,write_mostly", "1")})
    s = mdmirror.leg_status(mdmirror.array_state("md127", tmp_path), "nbd0")
    assert s.ready() and s.fraction == 1.0
    assert mdmirror.array_state("md127", tmp_path).shape() == {
        "members": ["nbd0", "sdb"],
        "raid_disks": 2,
        "bitmap": "yes",
        "level": "raid1",
    }


def test_leg_status_faulty_and_gone(tmp_path: Path) -> None:
    _md(tmp_path, {"sdb": ("in_sync", "0"), "nbd0": ("faulty,write_mostly", "1")}, "idle")
    s = mdmirror.leg_status(mdmirror.array_state("md127", tmp_path), "nbd0")
    assert s.faulty and not s.ready() and "failed (faulty)" in s.describe()
    s = mdmirror.leg_status(mdmirror.array_state("md127", tmp_path), "nbd1")
    assert not s.present and "no longer a member" in s.describe()
    with pytest.raises(mdmirror.MirrorError, match="does not exist"):
        mdmirror.array_state("md9", tmp_path)


def test_free_nbd(tmp_path: Path) -> None:
    fs.write(tmp_path, "/sys/block/nbd0/size", "1048576\n")
    fs.write(tmp_path, "/sys/block/nbd1/size", "0\n")
    fs.write(tmp_path, "/sys/block/nbd1/pid", "123\n")
    fs.write(tmp_path, "/sys/block/nbd10/size", "0\n")
    fs.write(tmp_path, "/sys/block/nbd2/size", "0\n")
    assert mdmirror.free_nbd(tmp_path) == "/dev/nbd2"


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("nbd://10.77.0.2:10809/vda", ("10.77.0.2", 10809, "vda")),
        ("nbd://host/x", ("host", 10809, "x")),
        ("nbd://[fd00::2]:1234/d", ("fd00::2", 1234, "d")),
    ],
)
def test_parse_nbd_uri(uri: str, want: tuple) -> None:
    u = mdmirror.parse_nbd_uri(uri)
    assert (u.host, u.port, u.export) == want


@pytest.mark.parametrize("uri", ["http://h/x", "nbd:///x", "nbd://h:99999/x"])
def test_parse_nbd_uri_bad(uri: str) -> None:
    with pytest.raises(mdmirror.MirrorError):
        mdmirror.parse_nbd_uri(uri)


def test_free_slots(tmp_path: Path) -> None:
    _md(tmp_path, {"sdb": ("in_sync", "0")})
    assert mdmirror.free_slots(mdmirror.array_state("md127", tmp_path)) == 1
    _md(tmp_path, {"sdb": ("in_sync", "0"), "nbd0": ("write_mostly", "none")})  # a new member before recovery
    assert mdmirror.free_slots(mdmirror.array_state("md127", tmp_path)) == 1
    _md(tmp_path, {"sda": ("in_sync", "0"), "sdb": ("in_sync", "1")})
    assert mdmirror.free_slots(mdmirror.array_state("md127", tmp_path)) == 0
