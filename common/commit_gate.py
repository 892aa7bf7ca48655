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
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time

MAGIC = b"P2VGO\x00\x00\x01"
RECORD_BYTES = 32
#: where in the ring the record sits (the ring is idle once the VM has loaded the image)
RECORD_OFFSET = 0


def commit_record(token: bytes, migration_id: str) -> bytes:
    """What V writes into the ring when P committed (32 bytes). Pure."""
    digest = hashlib.sha256(b"p2v commit gate\x00" + token + b"\x00" + migration_id.encode()).digest()
    return MAGIC + digest[:RECORD_BYTES - len(MAGIC)]


def write_record(memory: mmap.mmap, record: bytes) -> None:
    """The digest first, the magic last: a reader that sees the magic sees the whole record."""
    if len(record) != RECORD_BYTES:
        raise ValueError(f"a commit record has {RECORD_BYTES} bytes, not {len(record)}")
    memory[RECORD_OFFSET + len(MAGIC):RECORD_OFFSET + RECORD_BYTES] = record[len(MAGIC):]
    memory[RECORD_OFFSET:RECORD_OFFSET + len(MAGIC)] = record[:len(MAGIC)]


def write_record_to_file(path: str | os.PathLike, record: bytes) -> None:
    """write_record into the ring's file on V (the VM sees it at once: QEMU maps the same pages)."""
    fd = os.open(path, os.O_RDWR)
    try:
        memory = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
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
                 timeout_s: float | None = None, poll_s: float = 0.001, max_poll_s: float = 0.02) -> float:
    """Wait until the record is at `offset`; returns the seconds waited. Polls (the ring raises no
    interrupt the resumed kernel would know of), quickly at first. Raises TimeoutError after
    `timeout_s` (None: waits for ever — P may be off, and only V's word may release the OS)."""
    start = time.monotonic()
    want = bytes(record)
    sleep = poll_s
    while bytes(memory[offset:offset + len(want)]) != want:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no commit record after {timeout_s:.1f}s")
        time.sleep(sleep)
        sleep = min(max_poll_s, sleep * 1.5)
    return time.monotonic() - start
