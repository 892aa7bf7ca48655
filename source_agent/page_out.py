"""The agent's file pages out of P's hibernation image, just before the snapshot.

The image holds every page in use, the page cache of mapped files too (`drop_caches` drops only what
no process maps). The agent maps gRPC, protobuf, OpenSSL, SQLite and uvloop, and the pages of them
that it alone maps were ~20 MiB of the rig's image (5k of ~58k pages; gRPC's core alone 11.6 MiB).
Every image page costs inside the downtime: the snapshot's copy, P's read and hash, the VM's load.

The cutover helper asks the kernel to reclaim them (`process_madvise(MADV_PAGEOUT)` on the agent's
private file mappings) right before FREEZE. The kernel only takes pages that no other process maps
(the helper's, the workloads' stay) and that are clean; the agent, frozen soon after, reads back
what it touches from disk when it runs again: in the VM after the move, outside the downtime, or
on P after an abort. Anonymous memory is left alone (no swap: the kernel could not take it anyway).

Best effort: a kernel without process_madvise (before 5.10) just leaves the image as large as it was.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from common.procfs import status_kib

MADV_PAGEOUT = 21  # include/uapi/asm-generic/mman-common.h
SYS_PROCESS_MADVISE = 440  # the same number on every architecture (the unified syscall table)
IOV_MAX = 1024  # vectors per call (UIO_MAXIOV)


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """/proc/PID/maps as Mappings (lines it cannot read are skipped). Pure."""
    out = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        try:
            lo, _, hi = parts[0].partition("-")
            start, end = int(lo, 16), int(hi, 16)
        except ValueError:
            continue
        out.append(Mapping(start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def pageout_ranges(maps: list[Mapping]) -> list[tuple[int, int]]:
    """(start, length) of the private mappings of regular files: shared mappings would be written
    back, device files have no page cache to reclaim, and a deleted file's pages are left alone.
    Pure."""
    return [(m.start, m.end - m.start) for m in maps
            if len(m.perms) == 4 and m.perms[3] == "p" and m.end > m.start
            and m.path.startswith("/") and not m.path.startswith("/dev/") and not m.path.endswith("(deleted)")]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@dataclass
class PageOut:
    ranges: int = 0
    advised_bytes: int = 0
    rss_file_before_kib: int = 0
    rss_file_after_kib: int = 0
    error: str = ""

    @property
    def released_mib(self) -> float:
        """How much of the process's file-backed memory the kernel took (RssFile before - after)."""
        return max(0, self.rss_file_before_kib - self.rss_file_after_kib) / 1024


def rss_file_kib(pid: int, proc: str = "/proc") -> int:
    """The process's resident file-backed memory (RssFile, /proc/PID/status); 0 if unreadable."""
    return status_kib(pid, "RssFile", proc) or 0


def page_out(pid: int, proc: str = "/proc") -> PageOut:
    """Ask the kernel to reclaim process `pid`'s private file pages that only it maps. Never raises:
    what could not be done is in `error`."""
    res = PageOut(rss_file_before_kib=rss_file_kib(pid, proc))
    try:
        with open(f"{proc}/{pid}/maps") as f:
            ranges = pageout_ranges(parse_maps(f.read()))
    except OSError as exc:
        res.error = f"cannot read the mappings of {pid}: {exc}"
        return res
    res.ranges = len(ranges)
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError) as exc:
        res.error = f"pidfd_open({pid}): {exc}"
        return res
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    try:
        at = 0
        while at < len(ranges):  # bounded: every pass moves `at` on by at least one range
            batch = ranges[at:at + IOV_MAX]
            iov = (_Iovec * len(batch))(*[_Iovec(start, length) for start, length in batch])
            n = libc.syscall(ctypes.c_long(SYS_PROCESS_MADVISE), ctypes.c_int(pidfd), iov,
                             ctypes.c_size_t(len(batch)), ctypes.c_int(MADV_PAGEOUT), ctypes.c_uint(0))
            if n < 0:
                err = ctypes.get_errno()
                if at == 0 and err in (38, 22, 1):  # ENOSYS, EINVAL (advice unknown), EPERM: not here
                    res.error = f"process_madvise: {os.strerror(err)}"
                    return res
                at += 1  # a range that went away meanwhile (the agent still runs): skip it
                continue
            res.advised_bytes += n
            done, left = 0, n
            for _, length in batch:  # the call stops at the first range it could not advise
                if left < length:
                    break
                left -= length
                done += 1
            at += done if done == len(batch) else done + 1  # past the range it stopped at
    finally:
        os.close(pidfd)
    res.rss_file_after_kib = rss_file_kib(pid, proc)
    return res
