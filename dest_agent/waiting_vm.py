"""One migration's waiting VM on V: build it, boot it, hold the feed to its restore program, check it
against P, receive P's image into it (lifecycle step 5, V's side).

    WaitingVm.start()      restore initramfs + disk + libvirt domain; a thread connects the feed
    WaitingVm.readiness()  (ready, why not): the restore program answered, and its kernel build,
                           firmware map and memory are P's
    WaitingVm.receiver()   an ImageReceiver on V's image socket, feeding this VM
    WaitingVm.destroy()    before the point of no return only (afterwards the VM *is* P)
    AdoptedVm              the same VM found again by the next run of V's agent (the image it holds)
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common import commit_gate
from common.atomicfile import read_json, write_json_atomic
from common.config import DestVmConfig
from common.preflight import installed_ram_bytes, memmap_difference
from p2v.v1 import destination_pb2

from . import restore_initramfs, vm_builder
from .image_receiver import ExpectedKernel, ImageReceiver

log = logging.getLogger(__name__)

FEED_RETRY_S = 0.5


class FeedError(RuntimeError):
    pass


def ring_path_of(vm_name: str) -> Path:
    """The feed's shared memory file of a waiting VM on V."""
    return vm_builder.RING_DIR / f"{vm_name}-feed"


class FeedRing:
    """V's side of the feed's shared memory (restore_program's ring): the file in /dev/shm that QEMU
    maps as the waiting VM's ivshmem-plain device."""

    def __init__(self, path: Path, size: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            if st.st_size != size or size <= 0 or size % mmap.PAGESIZE:
                raise FeedError(f"{path} has {st.st_size} bytes, the VM maps {size}")
            if st.st_mode & 0o077:  # it is going to hold P's memory (vm_builder.create_ring_file)
                raise FeedError(f"{path} is open to other users (mode {st.st_mode & 0o777:o})")
            self.memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path, self.size = path, size

    def put(self, position: int, data: memoryview) -> None:
        """Copy `data` (at most up to the ring's end) to the image's byte `position`."""
        at = position % self.size
        self.memory[at:at + len(data)] = data

    def clear(self) -> None:
        """Give the ring's memory back to the host (tmpfs frees the pages; QEMU's mapping reads
        zeros): it held pages of P's memory."""
        try:
            self.memory.madvise(mmap.MADV_REMOVE)
        except (OSError, ValueError, AttributeError):
            pass

    def close(self) -> None:
        self.clear()
        self.memory.close()


class FeedClient:
    """V's side of the feed to the restore program (dest_agent/restore_program.py). With `ring_path`
    (the feed's shared memory on V) the image goes through the ring when the VM has it too."""

    def __init__(self, host: str, port: int, token: str, timeout_s: float = 120.0,
                 ring_path: Path | None = None) -> None:
        self.host, self.port, self.token = host, port, token
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.buf = b""
        self.facts: dict = {}
        self.ring_path = ring_path
        self.ring: FeedRing | None = None
        self.head = self.announced = self.freed = 0  # image bytes put in the ring, said (DATA), free again
        #: P's resume waits at the commit gate for this record (common/commit_gate.py); None = no gate
        self.gate_record: bytes | None = None
        self.restoring = False  # GO went to the restore program: the VM is not a waiting VM any more

    def connect(self, connect_timeout_s: float = 2.0) -> dict:
        sock = socket.create_connection((self.host, self.port), timeout=connect_timeout_s)
        sock.settimeout(self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, b""
        self.gate_record, self.restoring = None, False  # a restore program: nothing restored
        line = self._line()
        if not line.startswith("P2VFEED1 "):
            self.close()
            raise FeedError(f"unexpected greeting from the waiting VM: {line[:200]!r}")
        self.facts = json.loads(line[len("P2VFEED1 "):])
        self._open_ring()
        return self.facts

    def _open_ring(self) -> None:
        vm_ring = self.facts.get("ring")
        if self.ring is not None or self.ring_path is None or not isinstance(vm_ring, dict):
            return
        try:
            self.ring = FeedRing(self.ring_path, int(vm_ring.get("bytes", 0)))
        except (OSError, ValueError, FeedError) as exc:
            log.warning("the feed's shared memory is unusable, the image goes over the network: %s", exc)

    def _line(self) -> str:
        assert self.sock is not None
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise FeedError("the waiting VM closed the feed")
            self.buf += chunk
            if len(self.buf) > 1 << 20:
                raise FeedError("the waiting VM sent an overlong line")
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        if self.sock is None:
            raise FeedError("the feed is not connected")
        try:
            self.sock.sendall(data)
        except OSError as exc:
            reason = ""
            try:  # the restore program says why it stopped taking data
                self.sock.settimeout(2)
                reason = self._line()
            except (OSError, FeedError):
                pass
            raise FeedError(f"the waiting VM stopped taking the image: {reason or exc}") from None

    @property
    def through_ring(self) -> bool:
        return self.ring is not None

    @property
    def commit_gate_address(self) -> int:
        """Where P's resumed OS can read the ring (the restore program checked /dev/mem in this
        kernel build), 0 = no commit gate: V then restores only after P's COMMIT."""
        ring = self.facts.get("ring")
        if self.ring is None or not isinstance(ring, dict) or ring.get("devmem") is not True:
            return 0
        address = ring.get("phys")
        return address if isinstance(address, int) and address > 0 and address % mmap.PAGESIZE == 0 else 0

    # VmFeed
    def begin(self, size: int) -> None:
        self.head = self.announced = self.freed = 0
        self._send(f"IMAGE {size} {self.token}{' RING' if self.ring else ''}\n".encode())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.ring is None:
            self._send(data)
            return
        view = memoryview(data).cast("B")
        while view:
            room = min(self.freed + self.ring.size - self.head, self.ring.size - self.head % self.ring.size)
            if room <= 0:
                self._announce()  # the VM writes what it has, then frees
                self._await_free()
                continue
            n = min(room, len(view))
            self.ring.put(self.head, view[:n])
            self.head += n
            view = view[n:]
        self._announce()

    def _announce(self) -> None:
        if self.head > self.announced:
            self._send(f"DATA {self.head}\n".encode())
            self.announced = self.head

    def _await_free(self) -> None:
        line = self._line()
        words = line.split()
        if len(words) != 2 or words[0] != "FREE" or not words[1].isdigit() or int(words[1]) > self.head:
            raise FeedError(f"waiting VM: {line[:500]}")
        self.freed = max(self.freed, int(words[1]))

    def finish(self) -> int:
        for _ in range(1 << 20):  # bounded: the FREE lines of the end of the image, then LOADED
            line = self._line()
            if not line.startswith("FREE "):
                break
        if self.ring is not None:
            self.ring.clear()
        if not line.startswith("LOADED "):
            raise FeedError(f"waiting VM: {line[:500]}")
        return int(line.split()[1])

    def gate(self, record: bytes) -> None:
        """P's resume waits at the commit gate: go() must write `record` into the ring."""
        self.gate_record = record

    def restored_earlier(self, record: bytes) -> None:
        """An earlier run of V's agent had the VM restore ahead (its restore program is gone, P's OS
        waits at the gate): go() only writes `record`."""
        self.gate_record, self.restoring = record, True

    def restore_ahead(self) -> None:
        """GO before P's COMMIT (only with a gate): the VM restores P's image now and its resumed OS
        waits at the gate, off the network, until go() writes the record."""
        if self.gate_record is None:
            raise FeedError("no commit gate: the VM may restore only after P's COMMIT")
        self._restore()

    def _restore(self) -> None:
        self.restoring = True  # from the GO on: the restore program may be gone whatever it answers
        self._send(b"GO\n")
        line = self._line()
        if line != "RESTORING":
            raise FeedError(f"waiting VM did not restore: {line[:500]}")

    def go(self) -> None:
        """P committed: the VM restores P (or, restored ahead, passes the commit gate)."""
        if not self.restoring:
            try:
                self._restore()
            finally:
                self._release_gate()
            return
        self._release_gate()

    def _release_gate(self) -> None:
        if self.gate_record is not None:
            if self.ring is not None:
                memory, own = self.ring.memory, False
            elif self.ring_path is not None:
                memory, own = commit_gate.open_ring_page(self.ring_path), True
            else:
                raise FeedError("P's resume waits at the commit gate and V has no ring to release it")
            try:
                commit_gate.write_record(memory, self.gate_record)
            except BaseException:
                if own:
                    memory.close()
                raise
            commit_gate.clock_beacon(memory, close=own)  # V's clock for P's, whenever the VM looks
        if self.ring_path is not None:  # read no more (QEMU keeps its mapping, the VM becomes P)
            self.ring_path.unlink(missing_ok=True)

    def held(self) -> int:
        """After connect(): ask the VM again for the image it kept loaded when an earlier run of V's
        agent lost the feed before GO or ABORT. Returns its pages; the VM then waits for GO or ABORT."""
        if not self.facts.get("holding"):
            raise FeedError("the waiting VM holds no image")
        self._send(f"HELD {self.token}\n".encode())
        return self.finish()

    def abort(self, reason: str) -> None:
        try:
            if self.sock is not None:
                self.sock.sendall(b"ABORT\n")
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        if self.ring is not None:
            if self.restoring and self.gate_record is not None:
                self.ring.memory.close()  # its record may be what the resumed OS waits for: kept
            else:
                self.ring.close()
            self.ring = None


@dataclass
class AdoptedVm:
    """A waiting VM an earlier run of V's agent started, found again from what that run recorded
    (`record`): enough to feed it its word on the image it holds, or to destroy it."""
    name: str
    feed: FeedClient
    disk: Path

    def save(self, path: Path) -> None:
        """What a later run needs to find this VM again (its feed token is a secret: 0600)."""
        write_json_atomic(path, {"name": self.name, "feed_host": self.feed.host, "feed_port": self.feed.port,
                                 "feed_token": self.feed.token, "disk": str(self.disk)})

    @classmethod
    def load(cls, path: Path) -> AdoptedVm:
        d = read_json(path)
        return cls(d["name"], FeedClient(d["feed_host"], int(d["feed_port"]), d["feed_token"],
                                         ring_path=ring_path_of(d["name"])), Path(d["disk"]))

    def rearm(self) -> None:
        """No further attempt goes to an adopted VM (its migration failed): it goes."""
        self.destroy()

    def destroy(self) -> None:
        """The domain, if it exists, and its local disk (nothing was written to it before the move)."""
        self.feed.close()
        try:
            vm_builder.destroy(self.name)
        except Exception as exc:  # libvirt down: the operator's teardown finds it by its name
            log.error("cannot destroy the waiting VM %s: %s", self.name, exc)
        self.disk.unlink(missing_ok=True)
        ring_path_of(self.name).unlink(missing_ok=True)


@dataclass
class SourceFacts:
    """What P told V at Prepare (what the waiting VM must reproduce)."""
    memory_bytes: int
    kernel_release: str
    kernel_version: str
    firmware_memmap: list
    nic_macs: list[str]
    reserved_slots: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_prepare(cls, req: destination_pb2.PrepareRequest) -> SourceFacts:
        # the VM gets P's installed RAM (from its firmware map), not P's MemTotal
        ram = installed_ram_bytes(req.firmware_memmap) or -(-req.memory_bytes // (1 << 20)) * (1 << 20)
        return cls(ram, req.kernel_release, req.kernel_version, list(req.firmware_memmap),
                   [m.lower() for m in req.nic_macs])


def check_facts(source: SourceFacts, vm: dict) -> str:
    """'' when the waiting VM reproduces P, else why not. Pure."""
    if vm.get("release") != source.kernel_release:
        return f"the waiting VM runs kernel {vm.get('release')}, P runs {source.kernel_release}"
    if source.kernel_version and vm.get("version") != source.kernel_version:
        return f"the waiting VM's kernel build {vm.get('version')!r} is not P's {source.kernel_version!r}"
    vm_map = [destination_pb2.MemoryRange(start=s, end=e, type=t) for s, e, t in vm.get("memmap", [])]
    diff = memmap_difference(source.firmware_memmap, vm_map)
    if diff:
        return f"the waiting VM's firmware memory map differs from P's: {diff}"
    return ""


def available_kernels(kernel_dir: str, modules_base: str) -> list[str]:
    releases = []
    for p in sorted(Path(kernel_dir).glob("vmlinuz-*")):
        rel = p.name[len("vmlinuz-"):]
        if (Path(modules_base) / "lib/modules" / rel / "modules.dep").exists():
            releases.append(rel)
    return releases


def parse_shared_disk(spec: str, index: int) -> vm_builder.VmDisk:
    parts = spec.split(":")
    if len(parts) not in (3, 4, 5) or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"vm.shared_ide_disks[{index}] {spec!r}: expected path:bus:unit[:format[:model]]")
    fmt = parts[3] if len(parts) >= 4 else "raw"
    model = parts[4] if len(parts) == 5 else ""
    return vm_builder.VmDisk(path=parts[0], target=f"hd{'abcd'[int(parts[1]) * 2 + int(parts[2])]}", bus="ide",
                             fmt=fmt, ide_position=(int(parts[1]), int(parts[2])), shareable=True, model=model)


class WaitingVm:
    def __init__(self, config: DestVmConfig, migration_id: str, source: SourceFacts, work_dir: Path) -> None:
        if not config.image_address or not config.feed_vm_ip:
            raise ValueError("vm.image_address and vm.feed_vm_ip must be configured for cutover")
        self.config = config
        self.migration_id = migration_id
        self.source = source
        self.work_dir = work_dir
        self.name = f"{config.name_prefix}{migration_id}"
        self.feed_token = secrets.token_hex(16)
        self.feed = FeedClient(config.feed_vm_ip.split("/")[0], config.feed_port, self.feed_token,
                               ring_path=self.ring_path)
        self.started = False
        self.error = ""
        self.booted_at = 0.0
        self.feed_pci_address = ""  # where the feed NIC sits in the VM (set when built)
        self.pci_layout: vm_builder.PciLayout | None = None
        self._feed_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    @property
    def disk_path(self) -> Path:
        """The VM's local disk (md takes it in after the move)."""
        return self.work_dir / f"{self.name}-vda.img"

    @property
    def ring_path(self) -> Path | None:
        """The feed's shared memory on V (None: the image goes over the feed NIC)."""
        return ring_path_of(self.name) if self.config.feed_ring_mib else None

    @property
    def console_log(self) -> str:
        return self.config.console_log or str(self.work_dir / f"{self.name}.console.log")

    def spec(self, initrd: Path) -> vm_builder.WaitingVmSpec:
        c = self.config
        kernel = Path(c.kernel_dir) / f"vmlinuz-{self.source.kernel_release}"
        disks = [parse_shared_disk(s, i) for i, s in enumerate(c.shared_ide_disks)]
        if c.disk_bytes:
            disks.append(vm_builder.VmDisk(path=str(self.disk_path), target="vda",
                                           serial=c.disk_serial))
        # init_on_free=1: the restore kernel zeroes its free memory at boot (off the critical path) so
        # that /dev/snapshot's prepare_image, which takes a zeroed page for every image page once
        # the image's header is in (inside the downtime), skips the memset (mm: post_alloc_hook)
        cmdline = (f"console=ttyS0,115200 quiet panic=-1 init_on_free=1 p2v.feedmac={c.feed_vm_mac} "
                   f"p2v.feedip={c.feed_vm_ip} p2v.port={c.feed_port} p2v.token={self.feed_token}")
        return vm_builder.WaitingVmSpec(
            name=self.name, uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"p2v:{self.migration_id}")),
            memory_bytes=self.source.memory_bytes, vcpus=c.vcpus, kernel=str(kernel), initrd=str(initrd),
            cmdline=cmdline, nics=tuple(vm_builder.VmNic(m, c.bridge) for m in self.source.nic_macs),
            feed_nic=vm_builder.VmNic(c.feed_vm_mac, c.bridge), feed_ring=self.ring_path.name if self.ring_path else "",
            feed_ring_mib=c.feed_ring_mib, disks=tuple(disks), console_log=self.console_log,
            control_socket=c.control_socket, reserved_slots=self.source.reserved_slots,
            run_as_root=c.run_as_root, cpu_model=c.cpu_model, cpu_features=tuple(c.cpu_features))

    def start(self) -> None:
        """Blocking (seconds): build, then start the domain; the feed connects in the background."""
        c = self.config
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.chmod(0o755)
        initrd = restore_initramfs.build(self.source.kernel_release, self.work_dir / "initramfs-cache",
                                         modules_base=Path(c.modules_base))
        if c.disk_bytes:
            disk = self.disk_path
            if not disk.exists():
                with disk.open("wb") as f:
                    f.truncate(c.disk_bytes)
        vm_builder.destroy(self.name)  # a leftover of an earlier attempt with the same id
        spec = self.spec(initrd)
        self.pci_layout = vm_builder.pci_layout(spec)
        self.feed_pci_address = vm_builder.PciLayout.address(self.pci_layout.feed)
        vm_builder.start(spec)
        self.started = True
        if self._stop.is_set():  # destroy() came while this was building: it did not see a domain
            self.destroy()
            return
        self.booted_at = time.time()
        self.connect_feed_in_background()

    def connect_feed_in_background(self) -> None:
        self._feed_thread = threading.Thread(target=self._connect_feed, name=f"feed-{self.name}", daemon=True)
        self._feed_thread.start()

    def _connect_feed(self) -> None:
        deadline = time.monotonic() + self.config.boot_timeout_s
        last = ""
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                facts = self.feed.connect()
                log.info("waiting VM answered", extra={"vm": self.name, "release": facts.get("release")})
                with self._lock:
                    self.error = ""
                return
            except (OSError, FeedError, ValueError) as exc:
                last = str(exc)
                self._stop.wait(FEED_RETRY_S)
        with self._lock:
            self.error = f"the waiting VM did not answer within {self.config.boot_timeout_s}s ({last})"

    def wait_ready(self, timeout_s: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok, why = self.readiness()
            if ok or (why and "did not answer" in why) or (why and "differs" in why) or "kernel" in why:
                return ok, why
            time.sleep(0.2)
        return self.readiness()

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            if self.error:
                return False, self.error
        if not self.started:
            return False, "the waiting VM was not started"
        if not self.feed.facts or self.feed.sock is None:
            return False, "the waiting VM is still booting"
        why = check_facts(self.source, self.feed.facts)
        return (not why), why

    def receiver(self, store, image_path: Path, token: bytes, go_mark: Path, ack_mark: Path) -> ImageReceiver:
        return ImageReceiver(self.migration_id, token, store, self.feed, image_path,
                             expected_kernel=ExpectedKernel(self.feed.facts.get("release", ""),
                                                            self.feed.facts.get("version", "")),
                             bind=(self.config.image_address, self.config.image_port), go_mark=go_mark,
                             ack_mark=ack_mark)

    def rearm(self) -> None:
        """After an aborted cutover: the restore program waits for the next image; reconnect. A VM
        that restored ahead (commit gate) holds P's OS, stopped at the gate, and P runs on: it is
        never released; a new waiting VM replaces it (in the background: a boot takes a while)."""
        restored = self.feed.restoring
        self.feed.close()
        self.feed.facts = {}
        if not restored:
            self.connect_feed_in_background()
            return
        log.warning("the waiting VM had restored P's image ahead of P's COMMIT, and P runs on: a new "
                    "waiting VM replaces it", extra={"vm": self.name})
        self.started = False
        self._feed_thread = threading.Thread(target=self._restart, name=f"restart-{self.name}", daemon=True)
        self._feed_thread.start()

    def _restart(self) -> None:
        try:
            self.start()  # destroys the domain of the same name first
        except Exception as exc:  # readiness says why: the next Cutover is refused with it
            with self._lock:
                self.error = f"rebuilding the waiting VM failed: {exc}"
            log.error("waiting VM: %s", self.error)

    def destroy(self) -> None:
        """Before the point of no return only: the domain goes, and so does its local disk (nothing
        was written to it yet: md takes it in only after the move), else every cancelled attempt
        leaves one behind (the rig's V had gathered 190 of them, 50 GB)."""
        self._stop.set()
        self.feed.close()
        if self.started:
            vm_builder.destroy(self.name)
            self.started = False
        self.disk_path.unlink(missing_ok=True)
        ring_path_of(self.name).unlink(missing_ok=True)

    def qemu_command_line(self) -> str:
        """For diagnostics: the QEMU command line libvirt used."""
        try:
            text = Path(f"/var/log/libvirt/qemu/{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if "qemu-system" in ln]
        return lines[-1] if lines else ""


def host_has_libvirt() -> bool:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False
    return subprocess.run(["which", "virsh"], capture_output=True).returncode == 0
