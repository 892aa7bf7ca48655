"""The pass right before FREEZE: pages changed since pre-copy's last round go to V while P still runs.

Pre-copy's last round ends seconds before the snapshot, and the cutover's own set-up changes pages
in between: the agent's steps, the helper forked from it, the kernel's work for both. Without this
pass each of them travels inside the downtime. On the rig (1 GiB P, bond + md leg), of the ~13k pages
an image sent literally, ~10.6k had the same content right before FREEZE as in the image: sent by
this pass they are held by V when the image is read, and cost only their hash in the downtime.

It is one more pre-copy round, scanned by pre-copy's ChunkScanner over the same memory source,
with V's held hashes as what was sent (updated in place: the helper's dedup plan then sees what this
pass sent). It runs in the cutover helper, single-threaded, after the helper's set-up and before
the agent's page-out; its batches go on the image socket as PASS frames (common.image_wire), and V
writes them into its page store. Uncompressed: P's CPU under TCG is slower at zstd than its
network (image_stream.COMPRESSION_MODES).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.page_wire import WireBatch
from source_agent.memory.base import MemorySource
from source_agent.memory.tracker import HashTracker
from source_agent.precopy import ChunkScanner, PrecopyConfig

#: pages read and hashed at a time (the scanner's buffer: 4 MiB, freed after the pass)
PASS_CHUNK_PAGES = 1024
#: the round number the pass's batches carry (pre-copy's rounds count from 1)
PASS_ROUND = 0
#: the pass stops after this long (what is left travels in the image, as without a pass): it runs
#: while V's image socket waits for the header, and P's workloads change pages meanwhile
PASS_TIME_LIMIT_S = 20.0


@dataclass
class PassFigures:
    scanned: int = 0  # pages read and hashed
    pages: int = 0  # pages sent (zero pages included)
    zero_pages: int = 0
    raw_bytes: int = 0  # data pages' bytes, before framing
    seconds: float = 0.0
    send_s: float = 0.0  # of which handing batches to the socket
    cut_short: bool = False  # the time limit ended it before the last chunk

    def as_dict(self) -> dict[str, float]:
        return {"pass_s": self.seconds, "pass_send_s": self.send_s, "pass_pages": self.pages,
                "pass_zero_pages": self.zero_pages, "pass_scanned": self.scanned,
                "pass_cut_short": float(self.cut_short)}


def final_pass(memory: MemorySource, held: np.ndarray, send: Callable[[WireBatch], None], migration_id: str,
               chunk_pages: int = PASS_CHUNK_PAGES, time_limit_s: float = PASS_TIME_LIMIT_S) -> PassFigures:
    """Send (through `send`) every in-use page of `memory` whose hash differs from `held` (V's hash per
    PFN, 0 = not held), and record what was sent in `held`. `held` covers PFNs [0, len(held)): pages
    beyond it cannot be held by V and are left to the image. Stops after `time_limit_s` (0 = none)
    between chunks, `held` then still true. Raises what `send` or the source raise."""
    t0 = time.monotonic()
    deadline = t0 + time_limit_s if time_limit_s > 0 else float("inf")
    figures = PassFigures()
    tracker = HashTracker(held.size, sent=held)
    config = PrecopyConfig(zstd_level=None, chunk_pages=chunk_pages, skip_free_pages=True)
    scanner = ChunkScanner(memory, tracker, config, migration_id)  # its buffer goes with this call
    for start, end in memory.ranges():
        end = min(end, held.size)
        for pfn in range(start, end, chunk_pages):
            if time.monotonic() > deadline:
                figures.cut_short = True
                break
            result = scanner.scan(pfn, min(chunk_pages, end - pfn), PASS_ROUND)
            figures.scanned += result.scanned
            for encoded in result.batches:
                t_send = time.monotonic()
                send(encoded.batch.msg)
                figures.send_s += time.monotonic() - t_send
                figures.pages += encoded.batch.pages
                figures.zero_pages += encoded.batch.zero_pages
                figures.raw_bytes += encoded.batch.raw_bytes
        if figures.cut_short:
            break
    figures.seconds = time.monotonic() - t0
    return figures
