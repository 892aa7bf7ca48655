"""KcoreSource for real, inside P (a QEMU guest with Debian's kernel and /proc/kcore).

A page of known content is pinned in a process inside P; its PFN comes from
/proc/self/pagemap; reading that PFN through KcoreSource must return the same bytes.
The direct-map ranges must lie inside /proc/iomem's "System RAM" and cover nearly all of it.
"""

from __future__ import annotations

import json

import pytest

from rig import config as C

pytestmark = pytest.mark.rig

CHECK = r"""
import ctypes, json, mmap, os, struct, sys, time
sys.path.insert(0, ".")
import numpy as np
from common.pagecodec import PAGE_SIZE, page_hashes
from source_agent.memory import KcoreSource

src = KcoreSource()
ranges = src.ranges()
ram = []
for line in open("/proc/iomem"):
    if line.startswith(" "):
        continue
    span, _, name = line.strip().partition(" : ")
    if name == "System RAM":
        a, b = (int(x, 16) for x in span.split("-"))
        ram.append((-(-a // PAGE_SIZE), (b + 1) // PAGE_SIZE))
inside = all(any(rs <= s and e <= re_ for rs, re_ in ram) for s, e in ranges)

npages = 4
buf = mmap.mmap(-1, npages * PAGE_SIZE)
pattern = os.urandom(npages * PAGE_SIZE)
buf[:] = pattern
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL("libc.so.6", use_errno=True)
locked = libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(npages * PAGE_SIZE)) == 0
pfns, matches = [], []
with open("/proc/self/pagemap", "rb") as pm:
    for i in range(npages):
        pm.seek((addr // PAGE_SIZE + i) * 8)
        entry = struct.unpack("<Q", pm.read(8))[0]
        pfn = entry & ((1 << 55) - 1)
        pfns.append(pfn)
        matches.append(bool(entry >> 63) and src.read(pfn, 1) == pattern[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
skipped = 0
ours_skipped = False
for s, e in ranges:
    mask = src.skip_mask(s, e)
    if mask is not None:
        skipped += int(mask.sum())
        for p in pfns:
            if s <= p < e:
                ours_skipped |= bool(mask[p - s])
start, end = ranges[-1]
count = min(end - start, 16384)
t = time.perf_counter()
page_hashes(src.read(start, count))
rate = count * PAGE_SIZE / (time.perf_counter() - t) / 1e6
print(json.dumps({
    "ranges": ranges, "ram": ram, "inside": inside, "locked": locked, "matches": matches, "pfns": pfns,
    "covered": sum(e - s for s, e in ranges), "ram_pages": sum(e - s for s, e in ram),
    "max_pfn": src.max_pfn, "skipped": skipped, "ours_skipped": ours_skipped, "read_hash_MBps": rate,
}))
"""


def test_kcore_reads_physical_pages_by_pfn(rig) -> None:
    probe = rig.run("python3 -c 'import numpy'", timeout=120)
    assert probe.rc == 0, (
        f"numpy does not run in P (rc {probe.rc}: {probe.err.strip()}): numpy >= 2.3 wheels need an "
        "x86-64-v2 CPU and the rig boots P with -cpu qemu64; give P (and the target VM) "
        "-cpu qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt or pin an older numpy in P"
    )
    res = rig.run(f"cd {C.P_PROJECT_DIR} && python3 -", stdin=CHECK, timeout=300)
    assert res.rc == 0, f"rc {res.rc}\n{res.err}\n{res.out}"
    out = json.loads(res.out.strip().splitlines()[-1])
    assert out["ranges"], "no direct-map RAM found in /proc/kcore"
    assert out["inside"], f"kcore ranges {out['ranges']} not inside System RAM {out['ram']}"
    assert out["covered"] >= 0.9 * out["ram_pages"], out
    assert out["locked"]
    assert out["matches"] == [True] * 4, f"PFNs {out['pfns']} read back other bytes"
    assert not out["ours_skipped"], "an in-use page was reported free"
    assert out["skipped"] > 0, "an idle guest has free pages; kpageflags found none"
