"""V's NBD export, for real: qemu-nbd in a namespace of its own, read and written from another one."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dest_agent import disk_export

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("qemu-nbd") or not shutil.which("qemu-io"),
    reason="needs root, qemu-nbd and qemu-io",
)


@pytest.fixture
def two_ns() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:5]
    v, p = f"p2vt-red-v{tag}", f"p2vt-red-p{tag}"
    try:
        for ns in (v, p):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "-n", v, "link", "add", "ev", "type", "veth", "peer", "name", "ep", "netns", p], check=True
        )
        subprocess.run(["ip", "-n", v, "addr", "add", "10.99.7.2/24", "dev", "ev"], check=True)
        subprocess.run(["ip", "-n", p, "addr", "add", "10.99.7.10/24", "dev", "ep"], check=True)
        subprocess.run(["ip", "-n", v, "link", "set", "ev", "up"], check=True)
        subprocess.run(["ip", "-n", p, "link", "set", "ep", "up"], check=True)
        yield v, p
    finally:
        for ns in (v, p):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _in(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60, check=check)


def test_export_serves_image_and_stops(tmp_path: Path, two_ns: tuple[str, str]) -> None:
    v, p = two_ns
    image = disk_export.create_image(tmp_path / "vm-disk.raw", 8 << 20)
    with pytest.raises(disk_export.ExportError, match="does not exist"):
        disk_export.start_export(tmp_path / "nope.raw", "10.99.7.2", state_dir=tmp_path, netns=v)
    exp = disk_export.start_export(image, "10.99.7.2", 10809, "vda", state_dir=tmp_path, netns=v)
    try:
        assert exp.running() and exp.uri == "nbd://10.99.7.2:10809/vda"
        with pytest.raises(disk_export.ExportError, match="already served"):
            disk_export.start_export(image, "10.99.7.2", 10809, "vda", state_dir=tmp_path, netns=v)
        # P writes through the export; the bytes land in V's image
        _in(p, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 2M", "nbd://10.99.7.2:10809/vda")
        data = image.read_bytes()
        assert data[1 << 20 : 3 << 20] == b"\xab" * (2 << 20) and data[: 1 << 20] == b"\0" * (1 << 20)
        # and reads it back block for block
        out = tmp_path / "readback.raw"
        _in(p, "qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd://10.99.7.2:10809/vda", str(out))
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        # bound to the migration address only: not reachable on the namespace's loopback
        r = _in(v, "qemu-img", "info", "nbd://127.0.0.1:10809/vda", check=False)
        assert r.returncode != 0
    finally:
        stopped = disk_export.stop_export(exp)
    assert stopped and not exp.running() and not exp.pid_file.exists()
    assert disk_export.stop_export(exp) is False  # idempotent
    r = _in(p, "qemu-img", "info", "nbd://10.99.7.2:10809/vda", check=False)
    assert r.returncode != 0


def test_bad_input_refused(tmp_path: Path) -> None:
    image = disk_export.create_image(tmp_path / "d.raw", 1 << 20)
    with pytest.raises(disk_export.ExportError, match="migration network address only"):
        disk_export.start_export(image, "0.0.0.0", state_dir=tmp_path)
    with pytest.raises(disk_export.ExportError, match="not an IP address"):
        disk_export.start_export(image, "example.org", state_dir=tmp_path)
    with pytest.raises(disk_export.ExportError, match="export name"):
        disk_export.start_export(image, "127.0.0.1", name="a/b", state_dir=tmp_path)
    with pytest.raises(disk_export.ExportError, match="multiple of 512"):
        disk_export.create_image(tmp_path / "e.raw", 1000)
    with pytest.raises(FileExistsError):
        disk_export.create_image(image, 1 << 20)
    assert not list(tmp_path.glob("*.pid"))
