"""V exports the VM's disk image over NBD for the source's md network leg.

``qemu-nbd`` serves one raw image under an export name, bound to the migration network address only
(never the wildcard), started with ``--fork`` so that start returns once the socket listens, tracked
by its pid file. ``stop`` checks that the pid still is that qemu-nbd serving that image before it
signals anything (a recycled pid is never killed).

DESIGN.md's caution: the file exported here must not also be the disk the VM's md array already
uses as a member; the VM gets a separate local disk that md rebuilds from this network leg.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class DiskExport:
    image: Path
    bind: str
    port: int
    name: str
    pid_file: Path
    netns: str = ""

    @property
    def uri(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"nbd://{host}:{self.port}/{self.name}"

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and _is_our_qemu_nbd(pid, self.image)


def create_image(path: Path, size_bytes: int) -> Path:
    """A sparse raw image of ``size_bytes`` (refuses to overwrite an existing file)."""
    if size_bytes <= 0 or size_bytes % 512:
        raise ExportError(f"image size {size_bytes}: must be a positive multiple of 512")
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    return path


def _check_bind(bind: str) -> None:
    try:
        ip = ipaddress.ip_address(bind)
    except ValueError:
        raise ExportError(f"bind address {bind!r} is not an IP address") from None
    if ip.is_unspecified:
        raise ExportError(f"bind address {bind}: the export must be bound to the migration network address only")


def _is_our_qemu_nbd(pid: int, image: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]).startswith(b"qemu-nbd") and str(image).encode() in argv


def start_export(
    image: Path,
    bind: str,
    port: int = 10809,
    name: str = "vda",
    state_dir: Path = Path("/run/p2v"),
    netns: str = "",
    timeout_s: float = 30.0,
) -> DiskExport:
    """Serve ``image`` as ``nbd://bind:port/name``; returns once it listens."""
    image = Path(image).resolve()
    _check_bind(bind)
    if not _NAME_RE.match(name):
        raise ExportError(f"export name {name!r}: use 1-64 characters of [A-Za-z0-9_.-]")
    if not 1 <= port <= 65535:
        raise ExportError(f"port {port} out of range")
    if not image.is_file():
        raise ExportError(f"image {image} does not exist")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    exp = DiskExport(image, bind, port, name, state_dir / f"nbd-export-{name}.pid", netns)
    if exp.running():
        raise ExportError(f"export {name} is already served (pid {exp.pid()})")
    exp.pid_file.unlink(missing_ok=True)
    argv = [
        "qemu-nbd",
        "--fork",
        f"--pid-file={exp.pid_file}",
        "--persistent",
        "--shared=2",
        "--format=raw",
        "--cache=none",
        "--aio=threads",
        f"--bind={bind}",
        f"--port={port}",
        f"--export-name={name}",
        str(image),
    ]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ExportError(f"qemu-nbd did not start within {timeout_s:g} s") from None
    if res.returncode != 0:
        raise ExportError(f"qemu-nbd failed (rc {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    for _ in range(100):  # --fork returns after listen(); the pid file is written just before
        if exp.running():
            log.info("disk export %s: %s (pid %s)", exp.uri, image, exp.pid())
            return exp
        time.sleep(0.05)
    raise ExportError(f"qemu-nbd for {image} started but its pid file {exp.pid_file} is not right")


def stop_export(exp: DiskExport, timeout_s: float = 10.0) -> bool:
    """Stop the export. Returns False if it was not running."""
    pid = exp.pid()
    if pid is None or not _is_our_qemu_nbd(pid, exp.image):
        exp.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _is_our_qemu_nbd(pid, exp.image):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not _is_our_qemu_nbd(pid, exp.image):
                break
            time.sleep(0.05)
    exp.pid_file.unlink(missing_ok=True)
    return True
