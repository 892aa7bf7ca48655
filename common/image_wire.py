"""Framing of the plain image socket between P's cutover helper and V's image receiver.

Every frame: 1 byte type, 4 bytes little-endian payload length, payload. Frames in order:

    P -> V  HELLO   json {"migration_id", "token" (hex), "release", "version"}
    V -> P  OK      json {}                  | NACK utf-8 reason (and V closes)
    P -> V  WARM    padding V discards, any number of them (at most MAX_WARM bytes in all), before
                    the snapshot: they open TCP's windows (P's congestion window, V's receive
                    window) so that right after CREATE_IMAGE P can send megabytes without waiting
                    for acknowledgements (the rig's e1000 receives nothing for 1 s after it is
                    brought up: see source_agent/link_cycle.py)
    P -> V  PASS    a page batch (p2v.v1.PageBatch wire bytes, common.page_wire), any number of them,
                    before the snapshot: the pages that changed since pre-copy's last round, read by
                    the helper right before FREEZE (source_agent/final_pass.py). V writes them into
                    its page store as a round's batch, so the image finds them held.
    P -> V  PASSED  empty: the pass is over (V indexes its store's content again now, while P runs)
    P -> V  HEADER  the image's header page + its PFN metadata pages (raw)
    P -> V  CHUNK   u32 first data page index, u32 count, count flag bytes (1 = page follows,
                    0 = V takes the page from its store by PFN, 2 = V takes the page from its store
                    by content), then the little-endian hash of each flag-2 page (8 bytes each),
                    then the pages that follow
    ...
    P -> V  ZCHUNK  the same, the pages that follow compressed as one zstd frame (P's network is the
                    bottleneck at cutover; kernel memory compresses well)
    P -> V  END     u64 image bytes, u64 image checksum, optionally followed by a JSON object of
                    P's timings. The checksum is xxh64 over the header and metadata pages, then
                    over the little-endian page hash of every data page in image order: P hashes each
                    page once (for dedup and checksum alike) and V checks every byte it assembled
    V -> P  ACK     json {"pages", "loaded"}  | NACK reason   (ACK: V holds the exact image, loaded
                    into the waiting VM; P may power off — the point of no return)
    P -> V  COMMIT  empty: P will power off now and never unfreeze (V may start the VM)
    P -> V  ABORT   utf-8 reason, at any time before COMMIT (P unfreezes and runs on)
"""

from __future__ import annotations

import socket
import struct

import numpy as np

HELLO, OK, NACK, WARM, PASS, PASSED, HEADER, CHUNK, ZCHUNK, END, ACK, COMMIT, ABORT = (
    b"h", b"o", b"n", b"W", b"P", b"p", b"H", b"C", b"Z", b"E", b"A", b"M", b"X")
NAMES = {HELLO: "HELLO", OK: "OK", NACK: "NACK", WARM: "WARM", PASS: "PASS", PASSED: "PASSED", HEADER: "HEADER",
         CHUNK: "CHUNK", ZCHUNK: "ZCHUNK", END: "END", ACK: "ACK", COMMIT: "COMMIT", ABORT: "ABORT"}
_FRAME = struct.Struct("<cI")
CHUNK_HEAD = struct.Struct("<II")
END_BODY = struct.Struct("<QQ")
#: Largest payload a receiver accepts (a chunk of 256 pages is 1 MiB + flags).
MAX_FRAME = 64 << 20
#: Most WARM padding a receiver accepts in all, before the header.
MAX_WARM = 256 << 20
#: CHUNK flag values
PAGE_HELD, PAGE_FOLLOWS, PAGE_BY_HASH = 0, 1, 2
#: The data pages of P's CHUNKs (the last one may have fewer): 4 MiB, so that per-chunk work (numpy
#: calls, a frame) is paid per chunk, not per page. V makes its buffers for chunks this large early.
CHUNK_PAGES = 1024


def page_hash_bytes(hashes: np.ndarray) -> bytes:
    """The per-page hashes as they enter the image checksum (little-endian u64)."""
    return hashes.astype("<u8", copy=False).tobytes()


class WireError(RuntimeError):
    pass


def frame(kind: bytes, *parts: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
    """One frame as buffers to send in order; its payload is the parts joined (without copying them)."""
    views = [v.cast("B") if v.nbytes else memoryview(b"") for v in map(memoryview, parts)]  # cast refuses empty
    return [_FRAME.pack(kind, sum(v.nbytes for v in views)), *views]


def send_frame(sock: socket.socket, kind: bytes, *parts: bytes | bytearray | memoryview) -> int:
    """Send one frame whose payload is `parts` joined (blocking until all of it is with the kernel)."""
    views = frame(kind, *parts)
    size = sum(v.nbytes if isinstance(v, memoryview) else len(v) for v in views)
    if size < 65536:
        sock.sendall(b"".join(views))
        return size
    for view in views:
        sock.sendall(view)
    return size


def recv_exact(sock: socket.socket, n: int, into: bytearray | None = None) -> bytearray:
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:n], n - got)
        if r == 0:
            raise WireError(f"connection closed after {got} of {n} bytes")
        got += r
    return buf


def recv_frame(sock: socket.socket, max_payload: int = MAX_FRAME) -> tuple[bytes, bytearray]:
    head = recv_exact(sock, _FRAME.size)
    kind, length = _FRAME.unpack(head)
    if kind not in NAMES:
        raise WireError(f"unknown frame type {kind!r}")
    if length > max_payload:
        raise WireError(f"{NAMES[kind]} frame of {length} bytes exceeds {max_payload}")
    return kind, recv_exact(sock, length)
