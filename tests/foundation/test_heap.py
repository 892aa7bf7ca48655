"""common/heap.py for real: glibc's allocator in a fresh interpreter. Large blocks freed by a worker
thread stay resident under glibc's dynamic mmap threshold (the pattern of pre-copy's buffers),
and go back to the kernel with the threshold fixed, as the source agent does at its start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.agents import REPO

PATTERN = """
import re, sys, threading
sys.path.insert(0, {repo!r})
from common.heap import fix_mmap_threshold
if {fix}:
    assert fix_mmap_threshold()

def anon_kib() -> int:
    return int(re.search(r"Anonymous:\\s+(\\d+)", open("/proc/self/smaps_rollup").read()).group(1))

first = bytearray(16 << 20)  # mapped on its own, then freed: glibc raises its threshold to 16 MiB
del first
before = anon_kib()

def worker() -> None:
    blocks = [bytearray(8 << 20) for _ in range(4)]  # 32 MiB, written (zeroed) in a thread
    del blocks

t = threading.Thread(target=worker)
t.start()
t.join()
print(anon_kib() - before)
"""


def kept_kib(fix: bool) -> int:
    out = subprocess.run([sys.executable, "-c", PATTERN.format(repo=str(REPO), fix=fix)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_freed_large_blocks_leave_the_process_with_the_threshold_fixed() -> None:
    dynamic = kept_kib(fix=False)
    if dynamic < 16 << 10:
        pytest.skip(f"this libc returns freed blocks anyway ({dynamic} KiB kept): nothing to show")
    assert kept_kib(fix=True) < 4 << 10, "32 MiB freed by a thread stayed resident"


HELD = """
import re, sys
sys.path.insert(0, {repo!r})
from common.heap import hold_freed_memory, trim_heap

def anon_kib() -> int:
    return int(re.search(r"Anonymous:\\s+(\\d+)", open("/proc/self/smaps_rollup").read()).group(1))

assert hold_freed_memory()
before = anon_kib()
blocks = [bytearray(8 << 20) for _ in range(4)]
del blocks
held = anon_kib() - before
assert trim_heap()
print(held, anon_kib() - before)
"""


def test_the_helper_keeps_freed_memory_for_reuse_until_trimmed() -> None:
    """The cutover helper's setting: freed blocks stay in the heap (the next chunk reuses them,
    no page faults in the downtime), and trim_heap still hands them back before the snapshot."""
    out = subprocess.run([sys.executable, "-c", HELD.format(repo=str(REPO))], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    held, trimmed = (int(x) for x in out.stdout.split())
    assert held > 24 << 10, "freed blocks left the process: the helper would fault them in again"
    assert trimmed < 4 << 10, "trim_heap did not give the held blocks back"
