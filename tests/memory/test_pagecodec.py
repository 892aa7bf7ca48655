"""The page batch codec: round trips, zero pages, compression, and every refusal."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xxhash

from common.pagecodec import (
    MAX_PAGES_PER_BATCH,
    PAGE_SIZE,
    ZERO_PAGE_HASH,
    BatchError,
    decode_batch,
    encode_batch,
    page_hashes,
)
from p2v.v1 import destination_pb2

MAX_PFN = 1 << 20
LIMIT = 1 << 20


def make_pages(rng: np.random.Generator, count: int, zero_every: int = 3, compressible: bool = False):
    if compressible:
        pages = np.repeat(rng.integers(0, 4, size=(count, PAGE_SIZE // 64), dtype=np.uint8), 64, axis=1)
    else:
        pages = rng.integers(0, 256, size=(count, PAGE_SIZE), dtype=np.uint8)
    if zero_every:
        pages[::zero_every] = 0
    return pages.tobytes()


def encode(pfns, pages, level=1, **kw):
    args = dict(migration_id="m", stream_id=1, seq=1, round=1, batch_id=7, zstd_level=level)
    args.update(kw)
    return encode_batch(pfns, pages, **args)


def test_page_hashes_match_xxh64_per_page() -> None:
    rng = np.random.default_rng(1)
    buf = make_pages(rng, 37)
    expected = [xxhash.xxh64_intdigest(buf[i : i + PAGE_SIZE]) for i in range(0, len(buf), PAGE_SIZE)]
    got = page_hashes(buf)
    assert got.dtype == np.uint64
    assert got.tolist() == expected
    assert page_hashes(bytes(PAGE_SIZE)).tolist() == [ZERO_PAGE_HASH]
    with pytest.raises(ValueError):
        page_hashes(b"x" * 100)


@pytest.mark.parametrize("level", [None, 1, 3])
@pytest.mark.parametrize("compressible", [False, True])
def test_round_trip(level, compressible) -> None:
    rng = np.random.default_rng(2)
    count = 64
    pages = make_pages(rng, count, compressible=compressible)
    pfns = rng.choice(MAX_PFN, size=count, replace=False).astype(np.uint64)
    msg = encode(pfns, pages, level=level)
    assert msg.flags == bytes([1 if i % 3 == 0 else 0 for i in range(count)])
    data_pages = count - len(range(0, count, 3))
    assert msg.raw_size == data_pages * PAGE_SIZE
    if level is not None and compressible:
        assert msg.compression == destination_pb2.COMPRESSION_ZSTD
        assert len(msg.payload) < msg.raw_size
    if not compressible:
        # random pages do not shrink: sent raw
        assert msg.compression == destination_pb2.COMPRESSION_NONE
    # survives the wire
    msg = destination_pb2.PageBatch.FromString(msg.SerializeToString())
    out = decode_batch(msg, max_pfn=MAX_PFN, max_raw_bytes=LIMIT)
    assert out.pfns.tolist() == pfns.tolist()
    assert out.zero.tolist() == [i % 3 == 0 for i in range(count)]
    arr = np.frombuffer(pages, dtype=np.uint8).reshape(count, PAGE_SIZE)
    assert out.data == arr[~out.zero].tobytes()


def test_all_zero_batch_has_no_payload() -> None:
    msg = encode(np.arange(100, dtype=np.uint64), bytes(100 * PAGE_SIZE))
    assert msg.raw_size == 0 and msg.payload == b""
    out = decode_batch(msg, max_pfn=MAX_PFN, max_raw_bytes=LIMIT)
    assert out.zero.all() and out.data == b""


def good_batch() -> destination_pb2.PageBatch:
    rng = np.random.default_rng(3)
    return encode(np.arange(10, 26, dtype=np.uint64), make_pages(rng, 16, compressible=True))


def expect(code: str, msg, **kw) -> BatchError:
    with pytest.raises(BatchError) as info:
        decode_batch(msg, max_pfn=kw.get("max_pfn", MAX_PFN), max_raw_bytes=kw.get("max_raw_bytes", LIMIT))
    assert info.value.code == code, str(info.value)
    return info.value


def test_checksum_mismatch_in_payload() -> None:
    msg = good_batch()
    raw = decode_batch(msg, max_pfn=MAX_PFN, max_raw_bytes=LIMIT).data
    tampered = bytearray(raw)
    tampered[5000] ^= 0xFF
    msg.compression = destination_pb2.COMPRESSION_NONE
    msg.payload = bytes(tampered)
    err = expect("checksum", msg)
    assert "batch 7" in str(err)


def test_checksum_covers_pfns_and_checksum_field() -> None:
    msg = good_batch()
    pfns = bytearray(msg.pfns)
    pfns[0] ^= 1  # PFN 10 -> 11 would write the page to the wrong place
    msg.pfns = bytes(pfns)
    expect("malformed", msg)  # now PFN 11 appears twice
    msg = good_batch()
    pfns = np.frombuffer(msg.pfns, dtype="<u8").copy()
    pfns[0] = 5000
    msg.pfns = pfns.tobytes()
    expect("checksum", msg)
    msg = good_batch()
    msg.checksum ^= 1
    expect("checksum", msg)


def test_flags_swapped_is_caught() -> None:
    msg = good_batch()
    flags = bytearray(msg.flags)
    i, j = flags.index(0), flags.index(1)
    flags[i], flags[j] = flags[j], flags[i]
    msg.flags = bytes(flags)
    expect("checksum", msg)


def test_malformed_shapes() -> None:
    msg = good_batch()
    msg.pfns = msg.pfns[:-3]
    expect("malformed", msg)
    msg = good_batch()
    msg.flags = msg.flags[:-1]
    expect("malformed", msg)
    msg = good_batch()
    msg.flags = b"\x02" + msg.flags[1:]
    expect("malformed", msg)
    msg = good_batch()
    msg.raw_size += PAGE_SIZE
    expect("malformed", msg)
    msg = good_batch()
    msg.compression = 7
    expect("malformed", msg)
    expect("malformed", destination_pb2.PageBatch())


def test_pfn_out_of_range() -> None:
    msg = good_batch()
    err = expect("pfn-range", msg, max_pfn=20)
    assert "25" in str(err)


def test_too_large() -> None:
    msg = good_batch()
    expect("too-large", msg, max_raw_bytes=PAGE_SIZE)
    n = MAX_PAGES_PER_BATCH + 1
    big = destination_pb2.PageBatch(pfns=np.arange(n, dtype="<u8").tobytes(), flags=b"\x01" * n)
    expect("too-large", big, max_pfn=1 << 30)


def test_compression_errors() -> None:
    msg = good_batch()
    assert msg.compression == destination_pb2.COMPRESSION_ZSTD
    msg.payload = b"not zstd at all"
    expect("compression", msg)
    # a frame that declares more than raw_size (decompression bomb) is refused up front
    import zstandard

    msg = good_batch()
    msg.payload = zstandard.ZstdCompressor().compress(bytes(msg.raw_size * 64))
    expect("compression", msg)
    msg = good_batch()
    msg.payload = msg.payload[: len(msg.payload) // 2]
    expect("compression", msg)


def test_hash_page_views_equals_page_hashes() -> None:
    from common.pagecodec import hash_page_views

    buf = bytearray(os.urandom(PAGE_SIZE * 5))
    view = memoryview(buf)
    views = [view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(5)]
    assert hash_page_views(views).tolist() == page_hashes(buf).tolist()
    assert hash_page_views([]).size == 0
