"""page_out: a process's private file pages leave memory (process_madvise MADV_PAGEOUT) before the
snapshot; pages another process maps stay, and the process reads its data back unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from source_agent.page_out import PageOut, page_out, pageout_ranges, parse_maps, rss_file_kib

MAPS = """\
55d0c0a00000-55d0c0a2c000 r--p 00000000 fe:01 1311 /usr/bin/python3.11
55d0c0a2c000-55d0c0d0b000 r-xp 0002c000 fe:01 1311 /usr/bin/python3.11
55d0c1b4e000-55d0c1d6a000 rw-p 00000000 00:00 0                          [heap]
7f3b60000000-7f3b60347000 rw-p 00000000 00:00 0
7f3b8b600000-7f3b8b800000 rw-s 00000000 00:05 4242 /SYSV00000000 (deleted)
7f3b90000000-7f3b90001000 rw-s 00000000 fe:01 77 /var/lib/p2v/journal.db-shm
7f3b91000000-7f3b91100000 r-xp 00000000 fe:01 88 /usr/lib/grpc/cygrpc.so
7f3b92000000-7f3b92001000 r--p 00000000 fe:01 99 /opt/old/lib.so (deleted)
7f3b93000000-7f3b93001000 rw-p 00000000 00:05 5 /dev/zero
7f3b94000000-7f3b94002000 r--p 00000000 00:05 6 /memfd:buffer (deleted)
7ffd1c9e0000-7ffd1ca01000 rw-p 00000000 00:00 0                          [stack]
7ffd1cbf6000-7ffd1cbf8000 r-xp 00000000 00:00 0                          [vdso]
garbage line
"""


def test_only_private_mappings_of_regular_files_are_paged_out() -> None:
    maps = parse_maps(MAPS)
    assert len(maps) == 12  # the garbage line is skipped
    assert maps[2].path == "[heap]" and maps[3].path == ""
    ranges = pageout_ranges(maps)
    assert ranges == [(0x55D0C0A00000, 0x2C000), (0x55D0C0A2C000, 0x2DF000), (0x7F3B91000000, 0x100000)]


def test_a_process_that_cannot_be_read_is_an_error_not_an_exception(tmp_path: Path) -> None:
    res = page_out(2**22 + 12345, proc=str(tmp_path))
    assert res.error.startswith("cannot read the mappings") and res.advised_bytes == 0


def _mapper(path: Path, shared_with: bool = False) -> subprocess.Popen:
    """A process that maps `path` privately, touches every page and answers the data's crc32 on
    each line it reads."""
    code = f"""
import mmap, sys, zlib
f = open({str(path)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
for i in range(0, len(m), 4096):
    m[i]
print(zlib.crc32(m), flush=True)
for _ in sys.stdin:
    print(zlib.crc32(m), flush=True)
"""
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ask(proc: subprocess.Popen) -> int:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    return int(proc.stdout.readline())


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "data.bin"
    data = os.urandom(32 << 20)
    path.write_bytes(data)
    return path, zlib.crc32(data)


def test_the_kernel_takes_the_pages_only_that_process_maps_and_it_reads_them_back(data_file) -> None:
    path, crc = data_file
    proc = _mapper(path)
    try:
        assert proc.stdout is not None and int(proc.stdout.readline()) == crc
        res = page_out(proc.pid)
        if res.error.startswith("process_madvise"):
            pytest.skip(f"this kernel cannot: {res.error}")
        assert res.error == "" and res.ranges > 1
        assert res.advised_bytes >= 32 << 20
        # the 32 MiB file was resident; what the kernel took is at least most of it
        assert res.released_mib >= 24, res
        assert rss_file_kib(proc.pid) < res.rss_file_before_kib - 24 * 1024
        assert _ask(proc) == crc  # read back from the file, unchanged
    finally:
        proc.kill()
        proc.wait()


def test_pages_another_process_maps_stay(data_file) -> None:
    path, crc = data_file
    first, second = _mapper(path), _mapper(path)
    try:
        assert first.stdout is not None and second.stdout is not None
        assert int(first.stdout.readline()) == crc and int(second.stdout.readline()) == crc
        res = page_out(first.pid)
        if res.error.startswith("process_madvise"):
            pytest.skip(f"this kernel cannot: {res.error}")
        # the data file's 8192 pages are mapped by both: none of them goes (the interpreter's
        # own pages, mapped by the first alone, may)
        data_kib = 32 << 10
        assert rss_file_kib(first.pid) >= data_kib, res
        assert _ask(first) == crc and _ask(second) == crc
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


def test_released_is_never_negative() -> None:
    assert PageOut(rss_file_before_kib=100, rss_file_after_kib=300).released_mib == 0
    assert PageOut(rss_file_before_kib=3072, rss_file_after_kib=1024).released_mib == 2


def test_status_fields_come_from_proc(tmp_path: Path) -> None:
    from common.procfs import status_kib

    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\tpython3\nVmRSS:\t   40960 kB\nRssFile:\t  1024 kB\n")
    assert status_kib(7, "VmRSS", str(tmp_path)) == 40960 and status_kib(7, "RssFile", str(tmp_path)) == 1024
    assert status_kib(7, "RssShmem", str(tmp_path)) is None and status_kib(8, "VmRSS", str(tmp_path)) is None
    assert rss_file_kib(8, str(tmp_path)) == 0
    assert (status_kib(os.getpid(), "VmRSS") or 0) > 0  # this process's
