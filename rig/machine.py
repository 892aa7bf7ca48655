"""P as a QEMU guest: the device set of a "physical" box, its serial console log, QMP, and the control
channel (a second ISA serial port with a command server inside P, see rig/guest/ctl_server.py)."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from rig import config as C
from rig.build import BuildResult
from rig.procs import PidRegistry, kill_pid, pid_alive, spawn
from rig.qmp import QMP, QMPError

log = logging.getLogger(__name__)

KERNEL_CMDLINE = "console=ttyS0,115200 quiet panic=-1 tsc=reliable"


@dataclass
class CommandResult:
    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class ControlError(RuntimeError):
    pass


class ControlChannel:
    """Host side of P's serial command channel (QEMU chardev unix socket). One connection per
    command, so that several host processes can use it one after the other."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._next_id = int(time.time() * 1000) % 1_000_000_000

    def run(self, cmd: str, timeout: float = 60.0, stdin: str = "",
            transfer_s: float = 15.0) -> CommandResult:
        """Run cmd in P (sh -c); timeout bounds the command, transfer_s the serial transfer."""
        self._next_id += 1
        req_id = str(self._next_id)
        payload = base64.b64encode(json.dumps({"cmd": cmd, "timeout": timeout, "stdin": stdin}).encode())
        deadline = time.monotonic() + timeout + transfer_s
        prefix = f"P2VRES {req_id} ".encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket_path))
                sock.sendall(b"\nP2VCMD " + req_id.encode() + b" " + payload + b"\n")
                buf = b""
                while time.monotonic() < deadline:
                    sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        raise ControlError("control channel closed by QEMU")
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        line = line.strip()
                        if line.startswith(prefix):
                            res = json.loads(base64.b64decode(line[len(prefix):]))
                            return CommandResult(res["rc"], res["out"], res["err"])
        except OSError as e:
            raise ControlError(f"control channel {self.socket_path}: {e}") from e
        raise ControlError(f"no reply to {cmd!r} within {timeout + transfer_s:.0f}s")

    def ping(self, timeout: float = 5.0) -> bool:
        try:
            return self.run("echo p2v-pong", timeout=timeout, transfer_s=0).out.strip() == "p2v-pong"
        except ControlError:
            return False


@dataclass
class Disks:
    # raw sparse copy of the cached root image (not a qcow2 overlay): the migration target VM opens
    # the same file while P still runs ("shared storage" for P's root); a second qcow2 opener would
    # cache stale metadata, raw has none
    root: Path
    data: Path  # raw; md RAID1 leg inside P
    spare: Path  # raw; free for tests (e.g. a degraded md)


def create_disks(run_dir: Path, root_image: Path, data_mib: int, spare_mib: int,
                 prefix: str = "") -> Disks:
    disks = Disks(run_dir / f"{prefix}root.img", run_dir / f"{prefix}data.img",
                  run_dir / f"{prefix}spare.img")
    for p in (disks.root, disks.data, disks.spare):
        p.unlink(missing_ok=True)
    subprocess.run(["cp", "--sparse=always", str(root_image), str(disks.root)], check=True, capture_output=True,
                   timeout=120)
    for p, mib in ((disks.data, data_mib), (disks.spare, spare_mib)):
        with p.open("wb") as f:
            f.truncate(mib << 20)
    return disks


@dataclass
class Machine:
    """One QEMU process with P's device set. `incoming` makes it a migration target."""

    name: str
    run_dir: Path
    build: BuildResult
    disks: Disks
    memory_mib: int = 1024
    smp: int = 1
    tap: str = C.P_TAP
    mac: str = C.P_MAC
    incoming: str | None = None
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pids = PidRegistry(self.run_dir / "pids")
        self.ctl = ControlChannel(self.ctl_socket)
        self.qmp_client = QMP(self.qmp_socket)

    # --- paths -------------------------------------------------------------------------------------
    @property
    def console_log(self) -> Path:
        return self.run_dir / f"{self.name}.console.log"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / f"{self.name}.qmp.sock"

    @property
    def ctl_socket(self) -> Path:
        return self.run_dir / f"{self.name}.ctl.sock"

    @property
    def stderr_log(self) -> Path:
        return self.run_dir / f"{self.name}.qemu.log"

    # --- lifecycle ---------------------------------------------------------------------------------
    def qemu_argv(self) -> list[str]:
        def ide(drive_id: str, path: Path, fmt: str, bus: str, unit: int, model: str,
                shared: bool = False) -> list[str]:
            share = ",share-rw=on" if shared else ""  # the migration target VM opens it too
            return ["-drive", f"file={path},format={fmt},if=none,id={drive_id}",
                    "-device", f"ide-hd,drive={drive_id},bus={bus},unit={unit},model={model}{share}"]

        argv = [
            "qemu-system-x86_64", "-name", f"{self.name},process={self.name}",
            "-accel", "tcg", "-machine", "pc", "-cpu", C.qemu_cpu_arg(), "-m", str(self.memory_mib),
            # all of P's RAM backed by the host from the start, as a physical machine's is: else the
            # first time P's kernel touches a page (CREATE_IMAGE's preallocation, say) costs a fault
            # in the host that real hardware does not have
            "-mem-prealloc",
            "-smp", str(self.smp), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-rtc", "base=utc", "-boot", "strict=on",
            "-kernel", str(self.build.kernel), "-initrd", str(self.build.initrd),
            "-append", KERNEL_CMDLINE,
            *ide("root", self.disks.root, "raw", "ide.0", 0, "P2V-ROOT", shared=True),
            *ide("data", self.disks.data, "raw", "ide.0", 1, C.DISK_MODEL_DATA, shared=True),
            *ide("spare", self.disks.spare, "raw", "ide.1", 0, C.DISK_MODEL_SPARE),
            "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
            "-device", f"e1000,netdev=net0,mac={self.mac}",
            # ttyS0: console, appended to a file (append survives a restore into another machine)
            "-chardev", f"file,id=con0,path={self.console_log},append=on",
            "-device", "isa-serial,chardev=con0,index=0",
            # ttyS1: the control channel
            "-chardev", f"socket,id=ctl0,path={self.ctl_socket},server=on,wait=off",
            "-device", "isa-serial,chardev=ctl0,index=1",
            "-chardev", f"socket,id=qmp0,path={self.qmp_socket},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
        ]
        if self.incoming:
            argv += ["-incoming", self.incoming]
        return argv + self.extra_args

    def start(self) -> None:
        for p in (self.qmp_socket, self.ctl_socket):
            p.unlink(missing_ok=True)
        self.console_log.unlink(missing_ok=True)
        self.console_log.touch()
        spawn(self.pids, self.name, self.qemu_argv(), self.stderr_log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.qmp_socket.exists() and self.ctl_socket.exists():
                return
            if not self.alive():
                break
            time.sleep(0.05)
        raise RuntimeError(f"QEMU {self.name} did not start: {self.stderr_log.read_text()[-2000:]}")

    @property
    def pid(self) -> int | None:
        return self.pids.get(self.name)

    def alive(self) -> bool:
        pid = self.pid
        return pid is not None and pid_alive(pid)

    def qmp(self, command: str, arguments: dict | None = None, timeout_s: float = 10.0) -> object:
        return self.qmp_client.execute(command, arguments, timeout_s=timeout_s)

    def power_state(self) -> str:
        """'off' when QEMU is gone, else QEMU's run state ('running', 'paused', 'postmigrate', ...)."""
        if not self.alive():
            return "off"
        try:
            status = self.qmp("query-status", timeout_s=5)
        except (OSError, QMPError):
            return "off" if not self.alive() else "unknown"
        return str(status["status"])  # type: ignore[index]

    def stop(self, timeout_s: float = 10.0) -> None:
        pid = self.pid
        if pid is None:
            self.pids.forget(self.name)
            return
        try:
            self.qmp("quit", timeout_s=3)
        except (OSError, QMPError):
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
        kill_pid(pid, 2)
        self.pids.forget(self.name)

    # --- console -----------------------------------------------------------------------------------
    def console_text(self) -> str:
        try:
            return self.console_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern: str, timeout_s: float, require_alive: bool = True) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            m = regex.search(self.console_text())
            if m:
                return m
            if require_alive and not self.alive():
                raise RuntimeError(f"{self.name} exited while waiting for {pattern!r}; console tail:\n"
                                   + self.console_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {pattern!r} not on the console after {timeout_s:.0f}s; "
                                   "console tail:\n" + self.console_text()[-3000:])
            time.sleep(0.2)

    # --- commands inside P -------------------------------------------------------------------------
    def run(self, cmd: str, timeout: float = 60.0, check: bool = False, stdin: str = "") -> CommandResult:
        res = self.ctl.run(cmd, timeout=timeout, stdin=stdin)
        if check and res.rc != 0:
            raise ControlError(f"in {self.name}: {cmd!r} -> rc={res.rc}\n{res.out}\n{res.err}")
        return res

    def wait_control(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ctl.ping(timeout=2):
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited before its control channel answered")
        raise TimeoutError(f"{self.name}: control channel silent for {timeout_s:.0f}s")


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None
