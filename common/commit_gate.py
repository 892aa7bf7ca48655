"""The commit gate: the waiting VM restores P's image as soon as V has acknowledged it, and the
resumed OS waits at the gate, before it touches the network, until V writes P's COMMIT into the
feed's shared memory (dest_agent/restore_program.py's ring).

Why: P's COMMIT reaches V one round trip after the ACK at best; on the rig, P's NIC is deaf for a
second after the snapshot (QEMU's e1000 after every receive-control write), the ACK is lost in it
and COMMIT comes 0.26-0.47 s later. The restore does not depend on P's word; only taking over P's
addresses does. So the VM restores and enables its NICs while the handshake finishes, and the
resumed OS adopts the NIC only once P has committed (P powers off, never unfreezes): there are never
two copies on the network. A restored VM whose P runs on after all (P never got the ACK) is
destroyed by V, never released.

The record: 8 bytes of magic and 24 of a digest of the cutover's one-time token and migration id,
at the ring's first byte. The resumed OS computes the digest only after the restore, so no copy of
it sits in P's memory (and through it in the image that passed through the ring); stale image bytes
cannot pass for it. The ring is a PCI BAR the resumed kernel never probed (its slot stays off):
the gate reads it through /dev/mem at the physical address the restore program found.

Next to the record V keeps its wall clock (8 bytes, ns since the epoch): written before the record,
then every 2 ms for a minute (`clock_beacon`), so that the resumed OS, whenever it reaches the gate,
reads V's time as of 2 ms ago at most. P's resume sets P's clock from it (source_agent/resume.py:
the restore advances the clocks by the time it was away in whole seconds of the CMOS clock, 0.3-1.5 s
wrong on the rig; the record itself is usually there before the resumed OS looks).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
import time

MAGIC = b"P2VGO\x00\x00\x01"
RECORD_BYTES = 32
#: where in the ring the record sits (the ring is idle once the VM has loaded the image)
RECORD_OFFSET = 0
#: V's wall clock, right after the record (little-endian ns; 0 = not written)
WALL_OFFSET = RECORD_OFFSET + RECORD_BYTES
#: how often V's beacon writes its clock, and for how long after the record (the resumed OS reaches
#: the gate within seconds of it; V's restarts release a VM that already waits there)
BEACON_PERIOD_S = 0.002
BEACON_S = 60.0


def commit_record(token: bytes, migration_id: str) -> bytes:
    """What V writes into the ring when P committed (32 bytes). Pure."""
    digest = hashlib.sha256(b"p2v commit gate\x00" + token + b"\x00" + migration_id.encode()).digest()
    return MAGIC + digest[:RECORD_BYTES - len(MAGIC)]


def write_record(memory: mmap.mmap, record: bytes) -> None:
    """V's clock, the digest, the magic last: a reader that sees the magic sees the whole record, and
    a time next to it (kept fresh by `clock_beacon`)."""
    if len(record) != RECORD_BYTES:
        raise ValueError(f"a commit record has {RECORD_BYTES} bytes, not {len(record)}")
    memory[WALL_OFFSET:WALL_OFFSET + 8] = struct.pack("<q", time.time_ns())
    memory[RECORD_OFFSET + len(MAGIC):RECORD_OFFSET + RECORD_BYTES] = record[len(MAGIC):]
    memory[RECORD_OFFSET:RECORD_OFFSET + len(MAGIC)] = record[:len(MAGIC)]


def record_wall_ns(memory: mmap.mmap) -> int:
    """V's clock as last written next to the record (0: an older V wrote none)."""
    return struct.unpack("<q", bytes(memory[WALL_OFFSET:WALL_OFFSET + 8]))[0]


def clock_beacon(memory: mmap.mmap, period_s: float = BEACON_PERIOD_S, duration_s: float = BEACON_S,
                 close: bool = False) -> threading.Thread:
    """A thread that keeps V's clock fresh next to the record for `duration_s` (then closes the
    mapping if `close`). Stops early, quietly, if the mapping is closed under it."""
    def run() -> None:
        deadline = time.monotonic() + duration_s
        try:
            while time.monotonic() < deadline:
                memory[WALL_OFFSET:WALL_OFFSET + 8] = struct.pack("<q", time.time_ns())
                time.sleep(period_s)
        except (ValueError, OSError):
            pass  # the mapping went with the migration
        finally:
            if close:
                memory.close()

    thread = threading.Thread(target=run, name="p2v-clock-beacon", daemon=True)
    thread.start()
    return thread


def v_clock_now_ns(memory: mmap.mmap, settle_s: float = 0.003, tries: int = 3) -> int | None:
    """V's clock as its beacon last wrote it, if the beacon runs: two readings `settle_s` apart that
    advance by less than 50 ms (a stopped beacon's, or an older V's, do not). None otherwise."""
    for _ in range(tries):
        first = record_wall_ns(memory)
        time.sleep(settle_s)
        second = record_wall_ns(memory)
        if 0 < second - first < 50_000_000:
            return second
    return None


def open_ring_page(path: str | os.PathLike) -> mmap.mmap:
    """The ring file's first page on V, writable (the VM sees writes at once: QEMU maps the same pages)."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def write_record_to_file(path: str | os.PathLike, record: bytes) -> None:
    """write_record into the ring's file on V."""
    memory = open_ring_page(path)
    try:
        write_record(memory, record)
    finally:
        memory.close()


def map_physical(address: int, path: str = "/dev/mem") -> mmap.mmap:
    """The page holding the record, read-only: `address` is the ring's physical address (the
    resumed kernel knows no device there; /dev/mem allows non-RAM ranges nobody claimed). `path`
    is a file in tests."""
    page = address - address % mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_SYNC", 0))
    try:
        return mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
    finally:
        os.close(fd)


def await_record(memory: mmap.mmap, record: bytes, offset: int = RECORD_OFFSET,
                 timeout_s: float | None = None, poll_s: float = 0.001, max_poll_s: float = 0.005) -> float:
    """Wait until the record is at `offset`; returns the seconds waited. Polls (the ring raises no
    interrupt the resumed kernel would know of), quickly at first, then every 5 ms. Raises
    TimeoutError after `timeout_s` (None: waits for ever — P may be off, and only V's word may
    release the OS)."""
    start = time.monotonic()
    want = bytes(record)
    sleep = poll_s
    while bytes(memory[offset:offset + len(want)]) != want:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no commit record after {timeout_s:.1f}s")
        time.sleep(sleep)
        sleep = min(max_poll_s, sleep * 1.5)
    return time.monotonic() - start
