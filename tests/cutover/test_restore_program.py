"""The waiting VM's restore program, its image loading against a file instead of /dev/snapshot."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from dest_agent import restore_program
from dest_agent.restore_program import PAGE, Feed, load_image
from dest_agent.waiting_vm import FeedClient, FeedError


def _load(tmp_path: Path, payload: bytes, size: int, first: bytes = b"") -> tuple[bytes, int, Feed, dict]:
    target = tmp_path / "snapshot"
    target.write_bytes(b"")
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: (b.sendall(payload), b.close()))
    sender.start()
    feed = Feed(a)
    feed.buf = first  # what arrived with the IMAGE line
    spent: dict[str, float] = {}
    try:
        fd, pages = load_image(feed, size, spent, device=str(target))
        os.close(fd)
    finally:
        sender.join(10)
        a.close()
    return target.read_bytes(), pages, feed, spent


def test_image_lands_whole_and_what_follows_stays_for_the_next_line(tmp_path: Path) -> None:
    image = os.urandom(300 * PAGE)
    # part of the image came with the IMAGE line; V's next line arrives right behind the image
    written, pages, feed, spent = _load(tmp_path, image[5000:] + b"GO\n", len(image), first=image[:5000])
    assert written == image and pages == 300
    assert feed.line() == "GO"
    assert spent["write"] >= 0 and spent["recv"] >= 0
    assert 0 <= spent["write_cpu"] <= spent["write"] + 0.01 and 0 <= spent["recv_cpu"] <= spent["recv"] + 0.01


def test_feed_cut_short_is_an_error(tmp_path: Path) -> None:
    image = os.urandom(20 * PAGE)
    with pytest.raises(ConnectionError, match="after"):
        _load(tmp_path, image[:-1], len(image))


class FakeRestoreIoctls:
    """Stands in for the kernel's FREEZE and ATOMIC_RESTORE on the file the tests use as
    /dev/snapshot (a real ATOMIC_RESTORE never returns; the rig's whole-OS test runs it)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, fd: int, request: int, *args) -> int:
        self.calls.append(request)
        if request == restore_program.SNAPSHOT_ATOMIC_RESTORE:
            raise OSError("test: no kernel to restore into")
        return 0


def feed_vm(tmp_path: Path, monkeypatch, connections: int = 5
            ) -> tuple[tuple[str, int], FakeRestoreIoctls, threading.Thread, list]:
    """The restore program's connection loop (main's), on loopback, writing into a file; returns its
    address, the ioctls it made, its thread and what it held after each connection."""
    ioctls = FakeRestoreIoctls()
    monkeypatch.setattr(restore_program.fcntl, "ioctl", ioctls)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "snapshot").write_bytes(b"")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    holding: list = []

    def serve() -> None:
        held = None
        with listener:
            for _ in range(connections):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    try:
                        held = restore_program.serve_one(conn, "tok", held, device=str(tmp_path / "snapshot"))
                    except (ConnectionError, ValueError, OSError):
                        pass
                holding.append(held.pages if held else 0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname(), ioctls, thread, holding


def test_loaded_image_outlives_the_feed_until_v_decides(tmp_path: Path, monkeypatch) -> None:
    """V's agent goes between LOADED and its word: the image stays loaded; the next agent's HELD with
    the token finds it (a wrong token does not), GO restores it; a new IMAGE replaces a held one."""
    (host, port), ioctls, thread, holding = feed_vm(tmp_path, monkeypatch)
    image = os.urandom(40 * PAGE)

    first = FeedClient(host, port, "tok")
    assert first.connect()["holding"] == 0
    first.begin(len(image))
    first.write(image)
    assert first.finish() == 40
    first.close()  # V's agent died: no GO, no ABORT

    wrong = FeedClient(host, port, "not-the-token")
    assert wrong.connect()["holding"] == 40
    with pytest.raises(FeedError, match="bad token"):
        wrong.held()
    wrong.close()

    again = FeedClient(host, port, "tok")
    assert again.connect()["holding"] == 40
    assert again.held() == 40  # LOADED once more: waiting for V's word
    again.go()  # RESTORING: FREEZE + ATOMIC_RESTORE on the image held (right after this answer)
    again.close()
    assert (tmp_path / "snapshot").read_bytes() == image

    # after a failed restore nothing is held; a new image, then ABORT: discarded
    later = FeedClient(host, port, "tok")
    assert later.connect()["holding"] == 0
    with pytest.raises(FeedError, match="holds no image"):
        later.held()
    later.begin(len(image))
    later.write(image)
    later.finish()
    later.abort("test")
    last = FeedClient(host, port, "tok")
    assert last.connect()["holding"] == 0
    last.close()
    thread.join(10)
    assert ioctls.calls == [restore_program.SNAPSHOT_FREEZE, restore_program.SNAPSHOT_ATOMIC_RESTORE]
    assert holding == [40, 40, 0, 0, 0]  # after the lost feed, the wrong token, the GO, the ABORT, the last


def test_cpu_busy_counts_all_but_idle_and_iowait(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal
    stat.write_text(f"cpu  {hz} 0 {2 * hz} {50 * hz} {7 * hz} 0 {hz} 0 0 0\ncpu0 1 2 3\n")
    assert restore_program.cpu_busy_s(str(stat)) == 4.0
    assert restore_program.cpu_busy_s(str(tmp_path / "absent")) == 0.0
    assert restore_program.cpu_busy_s() > 0  # this machine's


def ring_pair(tmp_path: Path, pages: int) -> tuple[Path, restore_program.Ring]:
    """The feed's shared memory as both sides map it: a file V opens (QEMU's /dev/shm file) and the
    same file mapped as the restore program maps the ivshmem device's BAR."""
    import mmap

    path = tmp_path / "ring"
    path.write_bytes(b"\0" * pages * PAGE)
    path.chmod(0o600)  # as V makes it (vm_builder.create_ring_file): V refuses one others may read
    with path.open("rb") as f:
        memory = mmap.mmap(f.fileno(), pages * PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
    return path, restore_program.Ring("0000:00:09.0", memory)


def serve_with_ring(tmp_path: Path, ring: restore_program.Ring | None
                    ) -> tuple[tuple[str, int], threading.Thread, list]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    (tmp_path / "snapshot").write_bytes(b"")
    held: list = []

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                try:
                    held.append(restore_program.serve_one(conn, "tok", None, device=str(tmp_path / "snapshot"),
                                                          ring=ring))
                except (ConnectionError, ValueError, OSError) as exc:
                    held.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname(), thread, held


def test_image_through_a_ring_smaller_than_it_arrives_whole(tmp_path: Path) -> None:
    """V fills the ring, waits for the VM's FREE, wraps around: /dev/snapshot gets the exact image,
    and the ring no longer holds P's pages once the image is loaded."""
    path, ring = ring_pair(tmp_path, 16)
    (host, port), thread, held = serve_with_ring(tmp_path, ring)
    image = os.urandom(100 * PAGE)
    feed = FeedClient(host, port, "tok", ring_path=path)
    assert feed.connect()["ring"] == {"pci": "0000:00:09.0", "bytes": 16 * PAGE, "phys": 0, "devmem": False}
    assert feed.commit_gate_address == 0  # no /dev/mem way to the ring: V waits for P's COMMIT
    assert feed.through_ring
    feed.begin(len(image))
    for at in (0, 3 * PAGE, 10 * PAGE, 41 * PAGE, 60 * PAGE):  # writes of any size, the ring's at most
        feed.write(image[at:{0: 3, 3: 10, 10: 41, 41: 60, 60: 100}[at // PAGE] * PAGE])
    assert feed.finish() == 100
    assert path.read_bytes() == b"\0" * 16 * PAGE  # cleared (MADV_REMOVE)
    feed.abort("test")
    thread.join(10)
    assert (tmp_path / "snapshot").read_bytes() == image
    assert held == [None]  # ABORT: discarded


def test_ring_data_beyond_what_v_may_fill_is_refused(tmp_path: Path) -> None:
    path, ring = ring_pair(tmp_path, 4)
    (host, port), thread, held = serve_with_ring(tmp_path, ring)
    feed = FeedClient(host, port, "tok", ring_path=path)
    feed.connect()
    feed.begin(10 * PAGE)
    feed._send(f"DATA {5 * PAGE}\n".encode())  # more than the ring holds: V would have overwritten pages
    with pytest.raises(FeedError, match="beyond the ring"):
        feed.finish()
    thread.join(10)
    assert held == [None]


def test_ring_on_one_side_only_means_the_network(tmp_path: Path) -> None:
    """A VM without the device, or a ring file V cannot use: the image goes over TCP as before."""
    path, ring = ring_pair(tmp_path, 4)
    image = os.urandom(9 * PAGE)
    for vm_ring, v_path in ((None, path), (ring, tmp_path / "absent"), (ring, None)):
        (host, port), thread, held = serve_with_ring(tmp_path, vm_ring)
        feed = FeedClient(host, port, "tok", ring_path=v_path)
        feed.connect()
        assert not feed.through_ring
        feed.begin(len(image))
        feed.write(image)
        assert feed.finish() == 9
        feed.abort("test")
        thread.join(10)
        assert (tmp_path / "snapshot").read_bytes() == image and held == [None]


def test_find_ring_maps_the_ivshmem_device(tmp_path: Path) -> None:
    root = tmp_path / "devices"
    for name, ids in (("0000:00:03.0", ("0x1af4", "0x1041")), ("0000:00:07.0", restore_program.IVSHMEM)):
        d = root / name
        d.mkdir(parents=True)
        (d / "vendor").write_text(ids[0] + "\n")
        (d / "device").write_text(ids[1] + "\n")
        (d / "enable").write_text("0\n")
        (d / "resource2").write_bytes(b"\x01" * 8 * PAGE)
        (d / "resource").write_text("".join(f"{bar * 0x10000:#018x} {bar * 0x10000 + 8 * PAGE - 1:#018x} 0x0\n"
                                            for bar in range(6)))
    memory = tmp_path / "mem"  # physical memory as /dev/mem shows it: the BAR at 0x20000
    memory.write_bytes(b"\0" * 0x20000 + b"\x01" * PAGE)
    ring = restore_program.find_ring(str(root), str(memory))
    assert ring is not None
    assert ring.facts() == {"pci": "0000:00:07.0", "bytes": 8 * PAGE, "phys": 0x20000, "devmem": True}
    memory.write_bytes(b"\0" * 0x21000)  # /dev/mem shows something else there: no commit gate
    assert restore_program.find_ring(str(root), str(memory)).facts()["devmem"] is False
    assert restore_program.find_ring(str(root), str(tmp_path / "no-mem")).facts()["devmem"] is False
    assert len(ring.pages) == 8 and bytes(ring.pages[7]) == b"\x01" * PAGE
    assert (root / "0000:00:07.0/enable").read_text() == "1" and (root / "0000:00:03.0/enable").read_text() == "0\n"
    assert restore_program.find_ring(str(tmp_path / "nothing")) is None


def test_the_restore_initramfs_carries_every_module_the_program_imports() -> None:
    """The initramfs holds only RESTORE_IMPORTS of Python's standard library (and what they import):
    a module the program imports beyond them stops the waiting VM at boot (seen on the rig)."""
    import ast

    from dest_agent import restore_initramfs

    tree = ast.parse(Path(restore_program.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(restore_initramfs.RESTORE_IMPORTS), imported - set(restore_initramfs.RESTORE_IMPORTS)


def test_go_removes_the_ring_file(tmp_path: Path, monkeypatch) -> None:
    """Once the VM restores P's image nothing reads the ring again: its file on V goes (QEMU keeps
    its mapping); an adopted VM's feed knows the file by the VM's name."""
    from dest_agent.waiting_vm import AdoptedVm, ring_path_of

    monkeypatch.setattr(restore_program.fcntl, "ioctl", FakeRestoreIoctls())
    path, ring = ring_pair(tmp_path, 8)
    (host, port), thread, _ = serve_with_ring(tmp_path, ring)
    feed = FeedClient(host, port, "tok", ring_path=path)
    feed.connect()
    feed.begin(3 * PAGE)
    feed.write(os.urandom(3 * PAGE))
    assert feed.finish() == 3
    feed.go()  # RESTORING (the stand-in kernel's ATOMIC_RESTORE then fails: the VM says ERR)
    feed.close()
    thread.join(10)
    assert not path.exists()
    vm = AdoptedVm("p2v-vm-x", feed, tmp_path / "disk")
    vm.save(tmp_path / "vm.json")
    assert AdoptedVm.load(tmp_path / "vm.json").feed.ring_path == ring_path_of("p2v-vm-x")


def test_restore_ahead_then_only_p_s_commit_record_opens_the_gate(tmp_path: Path) -> None:
    """The commit gate over the real feed: V loads the image through the ring, has the VM restore it
    at once (GO, RESTORING), and the resumed OS's gate (resume.await_commit, reading the ring as the
    VM reads it through /dev/mem) opens only when V's go() writes P's COMMIT record."""
    import time

    from common import commit_gate
    from source_agent import resume

    path, ring = ring_pair(tmp_path, 16)
    ring.physical, ring.devmem = 0x40000, True
    (host, port), thread, held = serve_with_ring(tmp_path, ring)
    feed = FeedClient(host, port, "tok", ring_path=path)
    feed.connect()
    assert feed.commit_gate_address == 0x40000  # what V offers P in its Cutover reply
    token = b"t" * 32
    feed.gate(commit_gate.commit_record(token, "mig"))
    image = os.urandom(40 * PAGE)  # more than the ring: it wraps, and image bytes stay in it
    feed.begin(len(image))
    feed.write(image)
    assert feed.finish() == 40
    feed.restore_ahead()  # the restore program answers RESTORING (its ioctls then fail on a plain file)
    assert feed.restoring
    opened: list = []
    gate = threading.Thread(target=lambda: opened.append(
        resume.await_commit(0, token.hex(), "mig", memory_path=str(path))), daemon=True)
    gate.start()
    time.sleep(0.3)
    assert gate.is_alive() and not opened  # restored, waiting: P has not committed
    feed.go()  # P's COMMIT came: V writes the record
    gate.join(5)
    assert not gate.is_alive() and "COMMIT" in opened[0]
    assert not path.exists()  # the ring file is V's no more (QEMU keeps its mapping)
    feed.close()
    thread.join(10)
    assert held == [None]


def test_a_gate_for_another_migration_stays_shut(tmp_path: Path) -> None:
    from common import commit_gate

    memory_file = tmp_path / "ring"
    memory_file.write_bytes(b"\0" * PAGE)
    commit_gate.write_record_to_file(memory_file, commit_gate.commit_record(b"t" * 32, "other"))
    import mmap

    with memory_file.open("rb") as f:
        memory = mmap.mmap(f.fileno(), PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
    with pytest.raises(TimeoutError):
        commit_gate.await_record(memory, commit_gate.commit_record(b"t" * 32, "mig"), timeout_s=0.2)
    assert commit_gate.await_record(memory, commit_gate.commit_record(b"t" * 32, "other"), timeout_s=0.2) < 0.2
    assert commit_gate.commit_record(b"u" * 32, "other") != commit_gate.commit_record(b"t" * 32, "other")
    with pytest.raises(ValueError, match="32 bytes"):
        commit_gate.write_record(memory, b"short")
