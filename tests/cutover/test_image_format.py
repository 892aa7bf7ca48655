"""Pure parts of the hibernation carrier: header and PFN list parsing, ioctl numbers, the e820
checksum, dedup planning."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from common import hibernate_image as H
from tests.cutover.imagegen import make_image


def test_ioctl_numbers_match_the_kernel_header() -> None:
    # values of linux/suspend_ioctls.h as compiled by gcc on x86_64
    assert H.SNAPSHOT_FREEZE == 0x3301
    assert H.SNAPSHOT_UNFREEZE == 0x3302
    assert H.SNAPSHOT_ATOMIC_RESTORE == 0x3304
    assert H.SNAPSHOT_FREE == 0x3305
    assert H.SNAPSHOT_GET_IMAGE_SIZE == 0x8008330E
    assert H.SNAPSHOT_POWER_OFF == 0x3310
    assert H.SNAPSHOT_CREATE_IMAGE == 0x40043311
    assert H.SNAPSHOT_PREF_IMAGE_SIZE == 0x3312


def test_header_and_pfns_roundtrip() -> None:
    pfns = [*list(range(10, 600)), 5000, 5001, 9000]
    image, want, _ = make_image(pfns)
    hdr = H.parse_header(image[:4096])
    assert hdr.image_pages == len(pfns)
    assert hdr.meta_pages == 2  # 593 PFNs at 512 per page
    assert hdr.pages * 4096 == len(image) == hdr.size
    assert hdr.e820_checksum == 0x3DF3DAC1
    got = H.parse_pfns(image[4096:hdr.data_offset], hdr.image_pages, max_pfn=10_000)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("mutate, reason", [
    (lambda h: struct.pack_into("<Q", h, 24, 0x1234), "magic"),
    (lambda h: struct.pack_into("<Q", h, 424, 99), "inconsistent page counts"),
    (lambda h: struct.pack_into("<Q", h, 432, 4096), "size"),
    (lambda h: struct.pack_into("<Q", h, 400, 1), "exceeds num_physpages"),
])
def test_bad_headers_are_refused(mutate, reason) -> None:
    image, _, _ = make_image(range(100))
    head = bytearray(image[:4096])
    mutate(head)
    with pytest.raises(H.ImageFormatError, match=reason):
        H.parse_header(bytes(head))
    with pytest.raises(H.ImageFormatError):
        H.parse_header(image[:100])


def test_bad_pfn_lists_are_refused() -> None:
    image, _, _ = make_image([3, 2, 7])
    with pytest.raises(H.ImageFormatError, match="increasing"):
        H.parse_pfns(image[4096:8192], 3)
    image, _, _ = make_image([1, 2, 3])
    meta = bytearray(image[4096:8192])
    struct.pack_into("<Q", meta, 8, 2 | (1 << 63))
    with pytest.raises(H.ImageFormatError, match="flag bits"):
        H.parse_pfns(bytes(meta), 3)
    with pytest.raises(H.ImageFormatError, match="beyond max_pfn"):
        H.parse_pfns(image[4096:8192], 3, max_pfn=3)
    meta = bytearray(image[4096:8192])
    struct.pack_into("<Q", meta, 24, 5)
    with pytest.raises(H.ImageFormatError, match="end-of-map"):
        H.parse_pfns(bytes(meta), 3)


def test_e820_checksum_matches_the_kernels() -> None:
    # a 512 MiB QEMU pc guest; 0x3df3dac1 is what that kernel wrote into its image header
    # (shared/research/hibernate-carrier/logs/q7-A.log)
    m = [H.MemmapEntry(0, 0x9FC00, "System RAM"), H.MemmapEntry(0x9FC00, 0xA0000, "Reserved"),
         H.MemmapEntry(0xF0000, 0x100000, "Reserved"), H.MemmapEntry(0x100000, 0x1FFE0000, "System RAM"),
         H.MemmapEntry(0x1FFE0000, 0x20000000, "Reserved"), H.MemmapEntry(0xFFFC0000, 0x100000000, "Reserved"),
         H.MemmapEntry(0xFD00000000, 0x10000000000, "Reserved")]
    assert H.e820_checksum(m) == 0x3DF3DAC1
    shifted = [*m[:3], H.MemmapEntry(0x100000, 0x1FFDD000, "System RAM"),
               H.MemmapEntry(0x1FFDD000, 0x20000000, "Reserved"), *m[5:]]
    assert H.e820_checksum(shifted) != 0x3DF3DAC1


def test_dedup_plan() -> None:
    pfns = np.array([1, 2, 3, 10, 20], dtype=np.uint64)
    hashes = np.array([11, 22, 33, 44, 55], dtype=np.uint64)
    held = np.zeros(16, dtype=np.uint64)
    held[1], held[2], held[3], held[10] = 11, 99, 0, 44  # same, changed, not held, same; 20 beyond
    plan = H.plan_dedup(pfns, hashes, held)
    assert plan.send.tolist() == [False, True, True, False, True]
    assert (plan.pages, plan.sent_pages, plan.skipped_pages) == (5, 3, 2)
    with pytest.raises(ValueError):
        H.plan_dedup(pfns, hashes[:2], held)


def test_dedup_plan_by_content() -> None:
    pfns = np.array([1, 2, 3, 10, 20], dtype=np.uint64)
    hashes = np.array([11, 22, 33, 44, 55], dtype=np.uint64)
    held = np.zeros(16, dtype=np.uint64)
    held[1], held[2], held[5], held[10], held[15] = 11, 99, 33, 44, 55  # 33 and 55 moved, 22 is new
    content = H.held_content(held)
    assert content.tolist() == [11, 33, 44, 55, 99]  # sorted, unique, no 0
    plan = H.plan_dedup(pfns, hashes, held, content)
    assert plan.send.tolist() == [False, True, False, False, False]
    assert plan.by_hash is not None and plan.by_hash.tolist() == [False, False, True, False, True]
    assert (plan.sent_pages, plan.by_hash_pages, plan.skipped_pages) == (1, 2, 2)
    assert H.plan_dedup(pfns, hashes, held, H.held_content(np.zeros(4, np.uint64))).by_hash_pages == 0
    top = np.array([2**64 - 1], dtype=np.uint64)  # beyond every held hash: searchsorted's end
    assert H.plan_dedup(np.array([1], np.uint64), top, held, content).send.tolist() == [True]
