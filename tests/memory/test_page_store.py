"""The destination page store: writes, zero pages, hashes, durability markers, reopen, recovery."""

from __future__ import annotations

import os

import numpy as np
import pytest

from common.pagecodec import PAGE_SIZE, ZERO_PAGE_HASH, decode_batch, encode_batch, page_hashes
from dest_agent.page_store import PageStore, PageStoreError, index_path

MAX_PFN = 4096


def batch(pfns, pages):
    msg = encode_batch(
        np.asarray(pfns, dtype=np.uint64), pages, migration_id="m", stream_id=1, seq=1, round=1, batch_id=1,
        zstd_level=1,
    )
    return decode_batch(msg, max_pfn=MAX_PFN, max_raw_bytes=1 << 22)


def random_pages(rng, count):
    return rng.integers(1, 256, size=(count, PAGE_SIZE), dtype=np.uint8)


def test_write_read_hashes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    store = PageStore(tmp_path / "img", MAX_PFN)
    assert store.pages_held() == 0
    pages = random_pages(rng, 8)
    pages[3] = 0
    pfns = [100, 101, 102, 103, 7, 4095, 50, 51]  # runs and scattered PFNs
    assert store.write(batch(pfns, pages.tobytes())) == 8
    store.sync()
    assert store.pages_held() == 8
    for pfn, page in zip(pfns, pages, strict=True):
        assert store.read(pfn, 1) == page.tobytes()
    held = store.hashes(0, MAX_PFN)
    assert held[pfns].tolist() == page_hashes(pages.tobytes()).tolist()
    assert held[103] == ZERO_PAGE_HASH
    assert np.count_nonzero(held) == 8
    assert store.hashes(100, 102).tolist() == held[100:102].tolist()
    assert store.hashes(4000, 0).size == MAX_PFN - 4000  # 0 = to the end
    assert store.verify() == 0
    store.close()


def test_gather_returns_pages_in_the_asked_order_and_sees_later_writes(tmp_path) -> None:
    rng = np.random.default_rng(1)
    store = PageStore(tmp_path / "img", MAX_PFN)
    pages = random_pages(rng, 4)
    store.write(batch([9, 4095, 10, 0], pages.tobytes()))
    got = store.gather(np.array([10, 9, 0, 4095, 10], dtype=np.uint64))
    assert got.shape == (5, PAGE_SIZE)
    assert [bytes(p) for p in got] == [pages[2].tobytes(), pages[0].tobytes(), pages[3].tobytes(),
                                        pages[1].tobytes(), pages[2].tobytes()]
    newer = random_pages(rng, 1)
    store.write(batch([9], newer.tobytes()))  # through the fd, after the mapping was made
    assert bytes(store.gather(np.array([9]))[0]) == newer.tobytes()
    assert store.gather(np.array([], dtype=np.uint64)).shape == (0, PAGE_SIZE)
    with pytest.raises(PageStoreError, match="outside"):
        store.gather(np.array([1, MAX_PFN]))
    kept = store.gather(np.array([0]))  # a copy: it outlives the store
    store.close()
    assert bytes(kept[0]) == pages[3].tobytes()
    with pytest.raises(PageStoreError, match="closed"):
        store.gather(np.array([0]))


def test_warm_maps_the_held_pages_and_gather_still_sees_later_writes(tmp_path) -> None:
    rng = np.random.default_rng(2)
    store = PageStore(tmp_path / "img", MAX_PFN)
    store.warm()  # nothing held: nothing to map
    pages = random_pages(rng, 3)
    store.write(batch([5, 6, 4000], pages.tobytes()))
    store.warm()
    newer = random_pages(rng, 2)
    store.write(batch([6, 7], newer.tobytes()))  # a held page rewritten and a hole filled, after warm
    got = store.gather(np.array([5, 6, 7, 4000], dtype=np.uint64))
    assert [bytes(p) for p in got] == [pages[0].tobytes(), newer[0].tobytes(), newer[1].tobytes(),
                                        pages[2].tobytes()]
    store.close()
    with pytest.raises(PageStoreError, match="closed"):
        store.warm()


def test_zero_page_over_data_becomes_zero_and_sparse(tmp_path) -> None:
    rng = np.random.default_rng(1)
    with PageStore(tmp_path / "img", MAX_PFN) as store:
        store.write(batch(range(0, 256), random_pages(rng, 256).tobytes()))
        store.sync()
        blocks_full = os.stat(tmp_path / "img").st_blocks
        store.write(batch(range(0, 256), bytes(256 * PAGE_SIZE)))
        store.sync()
        assert store.read(0, 256) == bytes(256 * PAGE_SIZE)
        assert (store.hashes(0, 256) == ZERO_PAGE_HASH).all()
        assert os.stat(tmp_path / "img").st_blocks < blocks_full  # holes punched, not zeros written
        assert store.verify() == 0


def test_out_of_range_write_refused(tmp_path) -> None:
    rng = np.random.default_rng(2)
    with PageStore(tmp_path / "img", MAX_PFN) as store:
        good = batch([1], random_pages(rng, 1).tobytes())
        good.pfns = np.array([MAX_PFN], dtype=np.uint64)
        with pytest.raises(PageStoreError):
            store.write(good)
        assert store.pages_held() == 0


def test_reopen_clean(tmp_path) -> None:
    rng = np.random.default_rng(3)
    pages = random_pages(rng, 4).tobytes()
    with PageStore(tmp_path / "img", MAX_PFN) as store:
        store.write(batch([9, 10, 11, 2000], pages))
        before = store.hashes()
    again = PageStore.open(tmp_path / "img")
    assert again.max_pfn == MAX_PFN and not again.recovered
    assert again.hashes().tolist() == before.tolist()
    assert again.read(9, 3) == pages[: 3 * PAGE_SIZE]
    again.close()
    with pytest.raises(PageStoreError):
        PageStore(tmp_path / "img", MAX_PFN + 1)
    # same max_pfn through the constructor also reopens
    with PageStore(tmp_path / "img", MAX_PFN) as third:
        assert third.pages_held() == 4


def test_store_is_exclusive(tmp_path) -> None:
    with PageStore(tmp_path / "img", MAX_PFN), pytest.raises(PageStoreError, match="in use"):
        PageStore(tmp_path / "img", MAX_PFN)


def test_unclean_reopen_rehashes_from_image(tmp_path) -> None:
    rng = np.random.default_rng(4)
    store = PageStore(tmp_path / "img", MAX_PFN)
    store.write(batch([5, 6, 7], random_pages(rng, 3).tobytes()))
    store.sync()
    # A crash: the index says what was written, but the image holds other bytes at PFN 6
    # (as if a later write reached the image but not the index, or the reverse).
    other = random_pages(rng, 1).tobytes()
    with open(tmp_path / "img", "r+b") as f:
        f.seek(6 * PAGE_SIZE)
        f.write(other)
    del store  # not closed: the header still says "open"
    reopened = PageStore(tmp_path / "img", MAX_PFN)
    assert reopened.recovered
    assert reopened.hashes(6, 7).tolist() == page_hashes(other).tolist()
    assert reopened.verify() == 0
    assert reopened.pages_held() == 3
    reopened.close()


def test_not_a_store(tmp_path) -> None:
    (tmp_path / "img").write_bytes(b"")
    index_path(tmp_path / "img").write_bytes(b"garbage" * 1000)
    with pytest.raises(PageStoreError):
        PageStore.open(tmp_path / "img")
