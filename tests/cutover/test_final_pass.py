"""The helper's pass before FREEZE (source_agent/final_pass.py) over a real file-backed memory source:
what it sends is exactly what differs from V's held hashes, and `held` afterwards says what V holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.page_wire import WireBatch, read_batch
from common.pagecodec import PAGE_SIZE, decode_batch, page_hashes
from source_agent.final_pass import final_pass
from source_agent.memory.file_source import FileSource

PAGES = 3000


class FreePagesSource(FileSource):
    """A file source whose every third page is free (kpageflags would say so on a real host)."""

    def skip_mask(self, start_pfn: int, end_pfn: int) -> np.ndarray:
        return np.arange(start_pfn, end_pfn) % 3 == 0


def memory(tmp_path: Path, cls: type[FileSource] = FileSource) -> tuple[FileSource, np.ndarray]:
    rng = np.random.default_rng(5)
    pages = rng.integers(0, 256, size=(PAGES, PAGE_SIZE), dtype=np.uint8)
    pages[100:200] = 0  # zero pages travel as flags
    path = tmp_path / "mem.raw"
    path.write_bytes(pages.tobytes())
    return cls(path), page_hashes(pages)


def collect(into: dict[int, int]):
    def send(batch: WireBatch) -> None:  # through the wire encoding and V's own checks
        decoded = decode_batch(read_batch(b"".join(bytes(p) for p in batch.parts())), max_pfn=PAGES,
                               max_raw_bytes=64 << 20)
        hashes = np.zeros(decoded.pfns.size, dtype=np.uint64)
        hashes[~decoded.zero] = page_hashes(decoded.data) if decoded.data else []
        hashes[decoded.zero] = page_hashes(bytes(PAGE_SIZE))[0]
        for pfn, h in zip(decoded.pfns.tolist(), hashes.tolist(), strict=True):
            assert pfn not in into, f"PFN {pfn} sent twice"
            into[pfn] = h
    return send


def test_sends_exactly_what_v_does_not_hold_and_records_it(tmp_path: Path) -> None:
    source, truth = memory(tmp_path)
    held = truth.copy()
    held[:500] = 0  # never sent
    held[1000:1010] ^= 1  # stale
    sent: dict[int, int] = {}
    figures = final_pass(source, held, collect(sent), "m", chunk_pages=256)
    assert sorted(sent) == list(range(500)) + list(range(1000, 1010))
    assert all(sent[pfn] == truth[pfn] for pfn in sent)  # the pages' content as read
    assert np.array_equal(held, truth)  # held now says what V holds
    assert figures.pages == 510 and figures.zero_pages == 100 and figures.scanned == PAGES
    assert figures.raw_bytes == 410 * PAGE_SIZE and not figures.cut_short


def test_free_pages_and_pfns_beyond_held_stay_out(tmp_path: Path) -> None:
    source, _ = memory(tmp_path, FreePagesSource)
    held = np.zeros(2000, dtype=np.uint64)  # V's memory ends at PFN 2000
    sent: dict[int, int] = {}
    final_pass(source, held, collect(sent), "m", chunk_pages=512)
    assert sorted(sent) == [pfn for pfn in range(2000) if pfn % 3]


def test_the_time_limit_ends_it_with_held_still_true(tmp_path: Path) -> None:
    source, _ = memory(tmp_path)
    held = np.zeros(PAGES, dtype=np.uint64)
    sent: dict[int, int] = {}
    figures = final_pass(source, held, collect(sent), "m", chunk_pages=256, time_limit_s=1e-9)
    assert figures.cut_short and figures.scanned < PAGES
    changed = np.flatnonzero(held)
    assert sorted(sent) == changed.tolist()  # held changed exactly where something was sent
    assert all(held[pfn] == h for pfn, h in sent.items())


def test_a_send_that_fails_ends_the_pass(tmp_path: Path) -> None:
    source, _ = memory(tmp_path)

    def broken(batch: WireBatch) -> None:
        raise BrokenPipeError("V went away")

    with pytest.raises(BrokenPipeError):
        final_pass(source, np.zeros(PAGES, dtype=np.uint64), broken, "m")


def test_held_must_be_the_trackers_shape() -> None:
    from source_agent.memory.tracker import HashTracker

    with pytest.raises(ValueError, match="uint64"):
        HashTracker(10, sent=np.zeros(10, dtype=np.int64))
    held = np.zeros(10, dtype=np.uint64)
    assert HashTracker(10, sent=held).sent is held  # tracked in place


@pytest.mark.parametrize(("offered", "enabled", "expected"), [
    (True, True, "kcore"), (False, True, ""), (True, False, ""),
])
def test_the_agent_asks_for_the_pass_only_when_v_takes_it_and_it_is_on(offered: bool, enabled: bool,
                                                                       expected: str) -> None:
    from common import version
    from common.config import SourceConfig
    from p2v.v1 import common_pb2, source_pb2
    from source_agent.migration import SourceMigration
    from source_agent.prepare import Session

    config = SourceConfig()
    config.migration.final_pass = enabled
    migration = SourceMigration(config, source_pb2.MigrateRequest(destination="v:7470"), source_pb2.Inventory, "h")
    caps = [c for c in version.CAPABILITIES if offered or c != version.IMAGE_PASS_CAPABILITY]
    hello = common_pb2.HelloReply(protocol_version=version.PROTOCOL_VERSION, capabilities=caps)
    migration.session = Session(channel=None, stub=None, hello=hello, catalog=None)  # type: ignore[arg-type]
    assert migration._final_pass_source() == expected
