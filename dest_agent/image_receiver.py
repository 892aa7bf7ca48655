"""V's end of the plain image socket (lifecycle step 5): assemble P's exact hibernation image.

P's cutover helper sends the header, the PFN metadata and only the data pages V does not hold; V
takes the others from its page store by PFN, forwards the assembled image to the waiting VM as it
goes (the VM writes it into /dev/snapshot, whose kernel checks header and PFN list on the way),
keeps a copy on disk, and compares P's checksum of the image with its own over the assembled bytes.
Only when the image is byte-identical, loaded in the VM and durable does V send ACK. The VM is told
GO only after P's COMMIT (P will power off and never unfreeze): there are never two live copies.
With the commit gate (P's hello says "gate", common/commit_gate.py) the VM restores right after the
ACK instead, and P's resumed OS waits, off the network, for V's record of that COMMIT in the ring.

Authentication: a one-time token (from the Cutover RPC, over mutual TLS) is the first thing on the
socket; a wrong token gets NACK and changes nothing; the right one is consumed by its first use.
"""

from __future__ import annotations

import hmac
import json
import logging
import mmap
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import zstandard

from common import commit_gate, faults
from common import image_wire as W
from common.atomicfile import write_json_atomic
from common.hibernate_image import PAGE_SIZE, ImageFormatError, parse_header, parse_pfns
from common.page_wire import WireError as BatchWireError
from common.page_wire import read_batch
from common.pagecodec import BatchError, DecodedBatch, decode_batch, new_checksum, page_hashes
from dest_agent.page_store import start_writeback

log = logging.getLogger(__name__)

MAX_AUTH_ATTEMPTS = 5
MAX_CHUNK_PAGES = 4096


class ReceiveError(RuntimeError):
    """The image was not accepted; P was told so (NACK) and the waiting VM discarded it."""


class VmFeed(Protocol):
    """Where the assembled image goes (the waiting VM's restore program, or a test double)."""

    #: the image goes through the feed's shared memory (else over the VM's network)
    through_ring: bool

    def begin(self, size: int) -> None: ...

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def finish(self) -> int: ...  # the VM holds the whole image loaded: returns its page count

    def go(self) -> None: ...  # the VM restores P's image (never called before P's COMMIT)

    # the commit gate (common/commit_gate.py): P's resume waits until go() writes `record`
    def gate(self, record: bytes) -> None: ...

    def restore_ahead(self) -> None: ...  # after the ACK, with a gate: the VM restores now

    def abort(self, reason: str) -> None: ...  # the VM discards the image


class PageSource(Protocol):
    max_pfn: int

    def gather(self, pfns: np.ndarray) -> np.ndarray: ...  # (n, PAGE_SIZE) pages at these PFNs

    def hashes(self, start_pfn: int = 0, end_pfn: int | None = None) -> np.ndarray: ...  # 0 = not held

    def write(self, batch: DecodedBatch) -> int: ...  # the pass before FREEZE (PASS frames)

    def pages_held(self) -> int: ...  # PFNs with a page (what the image will be about)

    def warm(self) -> None: ...  # gather() made fast now, while P still runs


class BackgroundFeed:
    """A VmFeed whose writes go out from a thread of their own, in order: receiving from P,
    assembling and storing never wait for the waiting VM, which loads the image at its own pace
    (the VM's /dev/snapshot writes are the slowest step of the transfer: an emulated CPU). A failure
    of the VM's side surfaces at the next call, `finish` at the latest."""

    _END = object()

    def __init__(self, inner: VmFeed, max_queued: int = 256,
                 recycle: Callable[[bytes | bytearray], None] | None = None) -> None:
        self.inner = inner
        self.recycle = recycle  # gets each written buffer back once the VM's feed is done with it
        self.queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self.error: BaseException | None = None
        self.busy_s = 0.0  # in the inner feed: copying into the ring, waiting for the VM to free room
        self.thread = threading.Thread(target=self._run, name="vm-feed", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if self.error is not None:
                continue  # drain: the failure is reported by the caller's next call
            kind, data = item
            t0 = time.monotonic()
            try:
                if kind == "begin":
                    self.inner.begin(data)
                else:
                    self.inner.write(data)
            except BaseException as exc:  # handed to the receiving thread
                self.error = exc
            self.busy_s += time.monotonic() - t0
            if self.recycle is not None and kind == "write":
                self.recycle(data)

    @property
    def through_ring(self) -> bool:
        return self.inner.through_ring

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _put(self, item: object) -> None:
        self._raise()
        self.queue.put(item)

    def begin(self, size: int) -> None:
        self._put(("begin", size))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._put(("write", bytes(data) if isinstance(data, memoryview) else data))

    def _stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(self._END)
            self.thread.join()

    def finish(self) -> int:
        self._stop()
        self._raise()
        return self.inner.finish()

    def go(self) -> None:
        self.inner.go()

    def gate(self, record: bytes) -> None:
        self.inner.gate(record)

    def restore_ahead(self) -> None:
        self.inner.restore_ahead()

    def abort(self, reason: str) -> None:
        self.error = self.error or RuntimeError("aborted")  # the thread drops what is still queued
        self.inner.abort(reason)  # first: closing the feed ends a write the thread is blocked in
        self._stop()


@dataclass
class ReceiveResult:
    migration_id: str
    image_bytes: int = 0
    image_pages: int = 0  # data pages
    pages_sent: int = 0  # data pages that came over the wire
    pages_from_store: int = 0  # by PFN or by content
    pages_by_hash: int = 0  # of those, by content (held at another PFN)
    vm_feed: str = ""  # how the image reached the waiting VM: "ring" (shared memory) or "network"
    wire_bytes: int = 0  # bytes received on the image socket for the image (WARM padding not counted)
    warm_bytes: int = 0  # WARM padding received before the snapshot
    pass_pages: int = 0  # pages of P's pass before the snapshot (PASS frames), written to the store
    pass_bytes: int = 0  # their bytes on the image socket (not in wire_bytes: P still ran)
    checksum: int = 0
    acked: bool = False
    committed: bool = False
    #: P said ABORT after the ACK (a rehearsal): P runs on, by its own word — not undecided
    aborted_after_ack: bool = False
    started_at: float = 0.0
    acked_at: float = 0.0
    committed_at: float = 0.0
    go_at: float = 0.0
    #: the VM restored the image at the ACK, P's resume waiting at the commit gate (0.0 = it did not)
    restored_ahead_at: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    source_timings: dict[str, float] = field(default_factory=dict)
    #: where V's receiving thread spent the image's time (seconds): waiting for P's bytes, and each
    #: step of assembling a chunk; "feed_wait" is its wait for room in the VM's feed queue
    receiver_timings: dict[str, float] = field(default_factory=dict)
    #: the image file's page cache filled before the snapshot: {"bytes", "seconds"} (empty = not done)
    prepared: dict[str, float] = field(default_factory=dict)


#: what the ACK mark keeps of the receive: a restarted agent that adopts the image still reports them
ACK_FIGURES = ("image_bytes", "image_pages", "pages_sent", "pages_from_store", "pages_by_hash", "wire_bytes",
               "checksum")


@dataclass
class ExpectedKernel:
    release: str
    version: str


MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
#: written image bytes between two starts of their writeback (start_writeback)
WRITEBACK_EVERY = 32 << 20
#: chunk buffers made before P's snapshot (ChunkBuffers): the VM's feed is rarely more behind
CHUNK_BUFFERS_STOCKED = 16


class ChunkBuffers:
    """The assembled chunks' buffers, used again once the VM's feed has copied them. A fresh buffer
    per chunk is memory the host hands out page by page inside P's downtime (rig's host, 55k pages
    in 1024-page chunks: 0.13 s of allocating when the chunks stay queued, nothing from a pool).
    Thread-safe: the feed's thread gives, the receiving thread takes."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep  # per size: more than that are left to the garbage collector
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of `size` bytes, with whatever it held before: the caller overwrites all of it."""
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return bytearray(size)

    def give(self, buf: bytes | bytearray) -> None:
        if not isinstance(buf, bytearray):
            return
        with self._lock:
            free = self._free.setdefault(len(buf), [])
            if len(free) < self.keep:
                free.append(buf)

    def stock(self, size: int, count: int) -> None:
        """`count` buffers of `size` bytes made now (before P's snapshot)."""
        for _ in range(count):
            self.give(bytearray(size))


def expected_image_bytes(pages_held: int, max_pfn: int) -> int:
    """A generous guess of P's image size before its header comes: about the pages V holds (what P
    had in use at the last round), a quarter more, and the metadata; never more than P's memory.
    Pure."""
    pages = min(pages_held + pages_held // 4 + 256, max_pfn + max_pfn // 500 + 2)
    return pages * PAGE_SIZE


def populate_page_cache(fd: int, size: int) -> None:
    """The first `size` bytes of a file at least that long (extended by ftruncate) as clean pages in
    the page cache, before they are written: a read-only shared mapping with MAP_POPULATE reads its
    holes as zero pages, without writing anything to disk. Written later, each page is a copy into
    memory the host already gave: on the rig's host, 216 MB written into a new file took 0.38-0.70 s,
    and 0.05 s into populated pages (the populating 0.4 s, before P's snapshot)."""
    with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | MAP_POPULATE, prot=mmap.PROT_READ):
        pass


SO_RCVBUFFORCE = 33
TCP_THIN_LINEAR_TIMEOUTS = getattr(socket, "TCP_THIN_LINEAR_TIMEOUTS", 16)
RECEIVE_BUFFER = 32 << 20


def _widen_receive_buffer(listener: socket.socket, size: int = RECEIVE_BUFFER) -> None:
    """A receive buffer the image fits in, set before P connects (the window scale is chosen at
    the handshake): after its snapshot P may have to send megabytes before it can hear an
    acknowledgement (WARM in image_wire). Beyond net.core.rmem_max only as root."""
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            listener.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def fault_point(point: str) -> None:
    """SIGKILL this agent here when $P2V_FAULT is "dest-killed-<point>", or SIGTERM it (a graceful
    stop, as `systemctl stop`) when it is "dest-stopped-<point>": how the rig tests what a restarted
    V makes of a cutover its predecessor left (as the cutover helper's fault points on P). Nothing
    happens otherwise."""
    fault = faults.requested(f"dest-killed-{point}", f"dest-stopped-{point}")
    if fault:
        log.critical("%s=%s: %s this agent", faults.FAULT_ENV, fault, "stopping" if "stopped" in fault else "killing")
        os.kill(os.getpid(), signal.SIGTERM if "stopped" in fault else signal.SIGKILL)


def commit_image(res: ReceiveResult, feed: VmFeed, go_mark: Path | None) -> None:
    """Tell the VM holding the acknowledged image to restore it, once; the GO mark goes to disk first."""
    if not res.acked or res.committed or res.aborted_after_ack:
        raise ReceiveError("nothing to commit: no image acknowledged and still held")
    res.committed, res.committed_at = True, time.time()
    if go_mark is not None:
        try:  # before GO: an agent restarting after it must know that the VM may be P
            write_json_atomic(go_mark, {"migration": res.migration_id, "committed_at": res.committed_at})
        except OSError as exc:  # P is past its point of no return: the VM must start all the same
            log.error("cannot record the GO durably; a restart of this agent would not know the VM is P",
                      extra={"migration": res.migration_id, "error": str(exc)})
    feed.go()
    res.go_at = time.time()


class HeldImage:
    """The acknowledged image a waiting VM kept loaded across a restart of V's agent, found again
    (restore_program HELD): what that run's receiver would still do with it, commit or drop."""

    #: what V's stop asks of a receive (CutoverDesk.stop_receiving): this one ended in an earlier run
    connected = False

    def __init__(self, migration_id: str, feed: VmFeed, pages: int, go_mark: Path,
                 figures: dict | None = None) -> None:
        self.feed = feed
        self.go_mark = go_mark
        self.result = ReceiveResult(migration_id, image_pages=pages, acked=True)
        for key, value in (figures or {}).items():  # the ACK mark's (ACK_FIGURES): that run's receive
            if key in ACK_FIGURES and isinstance(value, int):
                setattr(self.result, key, value)

    def abandon(self, reason: str) -> None:
        """Nothing left to abandon: the VM keeps the image, as it did across the restart."""

    def commit(self) -> None:
        commit_image(self.result, self.feed, self.go_mark)


class ImageReceiver:
    def __init__(self, migration_id: str, token: bytes, store: PageSource, feed: VmFeed, image_path: Path,
                 expected_kernel: ExpectedKernel | None = None, bind: tuple[str, int] = ("127.0.0.1", 0),
                 accept_timeout_s: float = 600.0, io_timeout_s: float = 120.0,
                 commit_timeout_s: float = 60.0, go_mark: Path | None = None, ack_mark: Path | None = None) -> None:
        self.migration_id = migration_id
        self.go_mark, self.ack_mark = go_mark, ack_mark
        self._token: bytes | None = token
        self.gate_record: bytes | None = None  # P's resume waits at the commit gate (hello's "gate")
        self.store = store
        self.feed = feed
        self._buffers = ChunkBuffers()
        self._written = self._writeback_from = 0  # image file bytes written; from where writeback waits
        self.image_path = image_path
        self.expected_kernel = expected_kernel
        self.accept_timeout_s = accept_timeout_s
        self.io_timeout_s = io_timeout_s
        self.commit_timeout_s = commit_timeout_s
        self.listener = socket.create_server(bind, reuse_port=False)
        self.listener.settimeout(accept_timeout_s)
        _widen_receive_buffer(self.listener)
        self.result = ReceiveResult(migration_id)
        self._closed = False
        self._conn: socket.socket | None = None  # P's helper, once authenticated
        self.abandoned = ""  # why V's agent gave this receive up (it is stopping)
        self._content: tuple[np.ndarray, np.ndarray] | None = None  # store hashes sorted, their PFNs

    @property
    def endpoint(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:  # shutdown wakes a thread blocked in accept(); close alone does not
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self.listener.close()
            except OSError:
                pass

    @property
    def connected(self) -> bool:
        """P's helper is authenticated: its cutover is under way (P frozen soon, or already)."""
        return self._conn is not None

    def abandon(self, reason: str) -> None:
        """V's agent stops (SIGTERM) while this receive is not over: the image socket closes as if
        the agent had died. Before the ACK, P gets none and runs on; after it, the waiting VM keeps
        the image (undecided) for P's word, to this run or the next. Thread-safe: wakes `serve`."""
        self.abandoned = reason
        self.close()
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- the one connection ---------------------------------------------------------------------
    def serve(self) -> ReceiveResult:
        """Accept P's helper, receive, ACK, wait for COMMIT, tell the VM to GO. Blocking; raises
        ReceiveError when the image is refused or P aborts (the VM then discards it)."""
        try:
            for _ in range(MAX_AUTH_ATTEMPTS):
                try:
                    conn, peer = self.listener.accept()
                except TimeoutError:
                    raise ReceiveError(f"no cutover helper connected within {self.accept_timeout_s:.0f}s") from None
                except OSError as exc:
                    raise ReceiveError(f"image socket closed: {exc}") from None
                with conn:
                    conn.settimeout(self.io_timeout_s)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    # V sends little on it (OK, ACK): a lost ACK may be resent at the same timeout, not a
                    # doubling one, once the socket has left its initial slow start (see cutover.ack_route)
                    conn.setsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 1)
                    if not self._authenticate(conn, peer):
                        continue
                    self._conn = conn
                    if self.abandoned:  # abandon() came between accept and here
                        raise ReceiveError(self.abandoned)
                    self._index_content()  # P still runs (it sends WARM next): not in the downtime
                    self.store.warm()
                    return self._receive(conn)
            raise ReceiveError(f"{MAX_AUTH_ATTEMPTS} connections without the right token")
        finally:
            self.close()

    def _nack(self, conn: socket.socket, reason: str) -> None:
        try:
            W.send_frame(conn, W.NACK, reason.encode())
        except OSError:
            pass

    def _authenticate(self, conn: socket.socket, peer: tuple) -> bool:
        try:
            kind, payload = W.recv_frame(conn, max_payload=64 << 10)
            if kind != W.HELLO:
                raise W.WireError(f"expected HELLO, got {W.NAMES[kind]}")
            hello = json.loads(payload)
            token = bytes.fromhex(str(hello.get("token", "")))
        except (W.WireError, ValueError, OSError) as exc:
            log.warning("image socket: bad hello from %s: %s", peer, exc)
            self._nack(conn, f"bad hello: {exc}")
            return False
        if self._token is None or not hmac.compare_digest(token, self._token) \
                or hello.get("migration_id") != self.migration_id:
            log.warning("image socket: wrong token or migration from %s", peer)
            self._nack(conn, "wrong token or migration id")
            return False
        if hello.get("gate") is True:  # P's resume waits for V's record of its COMMIT (common/commit_gate.py)
            self.gate_record = commit_gate.commit_record(self._token, self.migration_id)
            self.feed.gate(self.gate_record)
        self._token = None  # one-time: consumed by its first use
        if self.expected_kernel is not None and (
                hello.get("release") != self.expected_kernel.release
                or hello.get("version") != self.expected_kernel.version):
            reason = (f"the waiting VM runs kernel {self.expected_kernel.release} "
                      f"{self.expected_kernel.version!r}, P runs {hello.get('release')} {hello.get('version')!r}")
            self._nack(conn, reason)
            raise ReceiveError(reason)
        W.send_frame(conn, W.OK, b"{}")
        return True

    def _receive(self, conn: socket.socket) -> ReceiveResult:
        res = self.result
        res.started_at = time.time()
        hasher = new_checksum()
        fd = os.open(self.image_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        began = False
        populating = self._populate_image_file(fd)
        try:
            try:
                kind, payload = self._next(conn)
                while kind in (W.WARM, W.PASS, W.PASSED):  # before P's snapshot
                    res.wire_bytes -= 5 + len(payload)
                    if kind == W.WARM:  # padding that opened TCP's windows
                        res.warm_bytes += 5 + len(payload)
                        if res.warm_bytes > W.MAX_WARM:
                            raise ReceiveError(f"more than {W.MAX_WARM} bytes of WARM padding")
                    elif kind == W.PASS:
                        self._pass(payload)
                    else:  # the pass is over: P still runs, so the content index is rebuilt now
                        self._content = None
                        self._index_content()
                        self.store.warm()  # the pages the pass added
                    kind, payload = self._next(conn)
                if kind != W.HEADER:
                    raise ReceiveError(f"expected HEADER, got {W.NAMES[kind]}")
                try:
                    header = parse_header(bytes(payload[:PAGE_SIZE]))
                    pfns = parse_pfns(bytes(payload[PAGE_SIZE:]), header.image_pages, max_pfn=self.store.max_pfn)
                except ImageFormatError as exc:
                    raise ReceiveError(f"image refused: {exc}") from None
                res.image_bytes, res.image_pages = header.size, header.image_pages
                res.steps["header"] = time.time()  # P's first bytes after CREATE_IMAGE (its NIC is back)
                res.receiver_timings.clear()  # the image's figures only: not the pass, not P's snapshot
                self.feed = background = BackgroundFeed(self.feed, recycle=self._buffers.give)
                res.vm_feed = "ring" if self.feed.through_ring else "network"
                self.feed.begin(header.size)
                began = True
                hasher.update(payload)
                self._emit(fd, payload)
                next_index = 0
                while True:
                    kind, payload = self._next(conn)
                    if kind == W.END:
                        break
                    if kind not in (W.CHUNK, W.ZCHUNK):
                        raise ReceiveError(f"expected CHUNK or END, got {W.NAMES[kind]}")
                    next_index = self._chunk(fd, hasher, payload, pfns, next_index, kind == W.ZCHUNK)
                if len(payload) < W.END_BODY.size:
                    raise ReceiveError("short END")
                size, checksum = W.END_BODY.unpack_from(payload, 0)
                try:  # optional: where P's time went
                    res.source_timings = json.loads(bytes(payload[W.END_BODY.size:]) or b"{}")
                except ValueError:
                    res.source_timings = {}
                if next_index != header.image_pages:
                    raise ReceiveError(f"END after {next_index} of {header.image_pages} data pages")
                if size != header.size or checksum != hasher.intdigest():
                    raise ReceiveError(f"assembled image differs from P's: size {size} vs {header.size}, "
                                       f"checksum {checksum:#x} vs {hasher.intdigest():#x}")
                res.checksum = checksum
                res.steps["received"] = time.time()
                if populating is not None:
                    populating.join()
                os.ftruncate(fd, header.size)  # the guess of _populate_image_file may have been larger
                os.fdatasync(fd)  # while the VM is still loading
                res.steps["durable"] = time.time()
                loaded = self.feed.finish()
                res.steps["loaded"] = time.time()
                res.receiver_timings["feed"] = background.busy_s
                res.receiver_timings = {k: round(v, 4) for k, v in res.receiver_timings.items()}
            except (ReceiveError, W.WireError, OSError, RuntimeError) as exc:
                reason = str(exc) if isinstance(exc, ReceiveError) else f"image transfer failed: {exc}"
                self._nack(conn, reason)
                if began:
                    self.feed.abort(reason)
                raise ReceiveError(reason) from None
            if self.ack_mark is not None:  # before the ACK: a VM found holding an image without it was never acked
                write_json_atomic(self.ack_mark, {"migration": self.migration_id, "pages": header.pages,
                                                  "figures": {k: getattr(res, k) for k in ACK_FIGURES},
                                                  **({"gate": self.gate_record.hex()} if self.gate_record else {})})
            try:
                W.send_frame(conn, W.ACK, json.dumps({"pages": header.pages, "loaded": loaded}).encode())
            except OSError as exc:  # not all of it went: P never reads a whole ACK, so it runs on
                if self.ack_mark is not None:
                    self.ack_mark.unlink(missing_ok=True)
                self.feed.abort("the ACK could not be sent")
                raise ReceiveError(f"the ACK could not be sent ({exc}): P runs on") from None
            res.acked, res.acked_at = True, time.time()
            log.info("image acknowledged", extra={"migration": self.migration_id, "pages": header.pages})
            fault_point("after-ack")  # P's COMMIT finds V's agent gone: the waiting VM keeps the image
            if self.gate_record is not None:
                self._restore_ahead()
            self._await_commit(conn)
            return res
        finally:
            if populating is not None:
                populating.join()
            os.close(fd)

    def _populate_image_file(self, fd: int) -> threading.Thread | None:
        """Fill the image file's page cache while P still runs (populate_page_cache), in a thread:
        the warm-up and the pass come first on the socket. An optimisation only: a failure leaves
        the writes to allocate their pages as they go."""
        size = expected_image_bytes(self.store.pages_held(), self.store.max_pfn)
        try:
            os.ftruncate(fd, size)  # here, not in the thread: it could cut what the receive wrote meanwhile
        except OSError as exc:
            log.info("image file not prepared: %s", exc, extra={"migration": self.migration_id})
            return None

        def populate() -> None:  # and the chunk buffers, in the same thread
            self._buffers.stock(W.CHUNK_PAGES * PAGE_SIZE, CHUNK_BUFFERS_STOCKED)
            t0 = time.monotonic()
            try:
                populate_page_cache(fd, size)
            except (OSError, ValueError) as exc:
                log.info("image file not prepared: %s", exc, extra={"migration": self.migration_id})
                return
            self.result.prepared = {"bytes": size, "seconds": round(time.monotonic() - t0, 3)}

        thread = threading.Thread(target=populate, name="image-file", daemon=True)
        thread.start()
        return thread

    def _restore_ahead(self) -> None:
        """The VM restores the image now, while P's COMMIT is on its way (P's NIC may not hear the
        ACK at once): P's resumed OS waits at the commit gate, off the network, until commit()."""
        try:
            self.feed.restore_ahead()
        except (OSError, RuntimeError) as exc:  # GO went or not: commit() sends it again if it did not
            log.warning("the VM did not confirm restoring ahead of P's COMMIT: %s", exc,
                        extra={"migration": self.migration_id})
            return
        self.result.restored_ahead_at = time.time()

    def _await_commit(self, conn: socket.socket) -> None:
        res = self.result
        conn.settimeout(self.commit_timeout_s)
        try:
            kind, payload = W.recv_frame(conn, max_payload=1 << 16)
        except (W.WireError, OSError) as exc:
            # P may or may not have sent COMMIT (its helper died, or the frame was lost): starting the
            # VM could make a second live copy, dropping it could lose the OS if P powers off. The VM
            # keeps the image loaded until P's agent says which (ResolveCutover) or V drops it.
            raise ReceiveError(f"no COMMIT from P after ACK ({exc}); the waiting VM holds the image until "
                               "P's agent resolves the cutover — check whether P still runs before anything "
                               "else") from None
        if kind != W.COMMIT:
            res.aborted_after_ack = kind == W.ABORT
            self.feed.abort(f"P sent {W.NAMES[kind]} instead of COMMIT")
            raise ReceiveError(f"P sent {W.NAMES[kind]} after ACK: {bytes(payload)[:200]!r}")
        self.commit()

    def commit(self) -> None:
        """P committed: the VM restores P's image (after COMMIT on the socket, or P's agent's word
        through ResolveCutover when the socket went silent after the ACK). Only ever once."""
        commit_image(self.result, self.feed, self.go_mark)

    def _next(self, conn: socket.socket) -> tuple[bytes, bytearray]:
        t0 = time.monotonic()
        kind, payload = W.recv_frame(conn)
        self._spent("wait", t0)
        self.result.wire_bytes += 5 + len(payload)
        if kind == W.ABORT:
            raise ReceiveError(f"P aborted the cutover: {bytes(payload).decode(errors='replace')}")
        return kind, payload

    def _pass(self, payload: bytearray) -> None:
        """One batch of P's pass before FREEZE (final_pass): checked as a pre-copy batch is, then into
        the store. Refused: the receive ends, P runs on; what earlier batches wrote stays (valid pages)."""
        res = self.result
        try:
            batch = read_batch(payload)
            if batch.migration_id != self.migration_id:
                raise ReceiveError(f"PASS batch refused: it is migration {batch.migration_id!r}'s, "
                                   f"not {self.migration_id!r}'s")
            decoded = decode_batch(batch, max_pfn=self.store.max_pfn, max_raw_bytes=W.MAX_FRAME)
        except (BatchWireError, BatchError) as exc:
            raise ReceiveError(f"PASS batch refused: {exc}") from None
        res.pass_pages += int(decoded.pfns.size)
        res.pass_bytes += 5 + len(payload)
        if res.pass_pages > 2 * self.store.max_pfn:  # a pass sends each page at most once
            raise ReceiveError(f"more PASS pages ({res.pass_pages}) than twice P's memory")
        self.store.write(decoded)
        self._content = None  # stale: rebuilt at PASSED, or at the first lookup by content

    def _index_content(self) -> None:
        """The store's hashes sorted, with their PFNs: CHUNK flag 2 names a page by its hash (a sort
        of 8 bytes per PFN: ~10 ms for 1 GiB here, seconds for tens of GiB)."""
        if self._content is None:
            held = self.store.hashes(0, self.store.max_pfn)
            order = np.argsort(held, kind="stable")
            self._content = (held[order], order)

    def _pfns_of(self, refs: np.ndarray) -> np.ndarray:
        """Where the store holds each of these page hashes."""
        self._index_content()
        assert self._content is not None
        ordered, pfn_of = self._content
        wanted = refs.astype(np.uint64)
        at = np.minimum(np.searchsorted(ordered, wanted), max(ordered.size - 1, 0))
        if ordered.size == 0 or np.any((ordered[at] != wanted) | (wanted == 0)):
            missing = wanted[(ordered[at] != wanted) | (wanted == 0)] if ordered.size else wanted
            raise ReceiveError(f"CHUNK refers to a page V does not hold (hash {int(missing[0]):#x})")
        return pfn_of[at]

    def _spent(self, step: str, since: float) -> float:
        """Adds the time since `since` to the receive's figure `step`; returns now."""
        now = time.monotonic()
        timings = self.result.receiver_timings
        timings[step] = timings.get(step, 0.0) + now - since
        return now

    def _emit(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        t0 = time.monotonic()
        self.feed.write(data)
        t0 = self._spent("feed_wait", t0)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        self._written += len(data)
        if self._written - self._writeback_from >= WRITEBACK_EVERY:  # the final fdatasync waits for less
            start_writeback(fd, self._writeback_from, self._written - self._writeback_from)
            self._writeback_from = self._written
        self._spent("write", t0)

    def _chunk(self, fd: int, hasher, payload: bytearray, pfns: np.ndarray, next_index: int,
               compressed: bool = False) -> int:
        if len(payload) < W.CHUNK_HEAD.size:
            raise ReceiveError("short CHUNK")
        first, count = W.CHUNK_HEAD.unpack_from(payload, 0)
        if first != next_index or count == 0 or count > MAX_CHUNK_PAGES or first + count > pfns.size:
            raise ReceiveError(f"CHUNK of pages {first}+{count} out of order or range "
                               f"(expected {next_index}, image has {pfns.size})")
        flags = np.frombuffer(payload, dtype=np.uint8, count=count, offset=W.CHUNK_HEAD.size)
        if np.any(flags > W.PAGE_BY_HASH):
            raise ReceiveError("CHUNK flags must be 0, 1 or 2")
        literal = int(np.count_nonzero(flags == W.PAGE_FOLLOWS))
        n_refs = int(np.count_nonzero(flags == W.PAGE_BY_HASH))
        refs_off = W.CHUNK_HEAD.size + count
        if len(payload) < refs_off + 8 * n_refs:
            raise ReceiveError("short CHUNK: page hashes missing")
        refs = np.frombuffer(payload, dtype="<u8", count=n_refs, offset=refs_off)
        ref_pfns = self._pfns_of(refs) if n_refs else refs
        src = memoryview(payload)[refs_off + 8 * n_refs:]
        t0 = time.monotonic()
        if compressed:
            try:
                src = memoryview(zstandard.ZstdDecompressor().decompress(
                    bytes(src), max_output_size=literal * PAGE_SIZE))
            except zstandard.ZstdError as exc:
                raise ReceiveError(f"ZCHUNK does not decompress: {exc}") from None
        t0 = self._spent("decompress", t0)
        if len(src) != literal * PAGE_SIZE:
            raise ReceiveError(f"CHUNK carries {len(src)} bytes for {literal} pages")
        # one copy per kind of page, not a step per page: a chunk is up to 1024 pages
        # the VM's feed keeps it without a copy, then hands it back; every page of it is written below
        assembled = self._buffers.take(count * PAGE_SIZE)
        out = np.frombuffer(assembled, dtype=np.uint8).reshape(count, PAGE_SIZE)
        follows = flags == W.PAGE_FOLLOWS
        by_hash = flags == W.PAGE_BY_HASH
        held = ~(follows | by_hash)
        out[follows] = np.frombuffer(src, dtype=np.uint8).reshape(literal, PAGE_SIZE)
        if n_refs:
            out[by_hash] = self.store.gather(ref_pfns)
        if literal + n_refs < count:
            out[held] = self.store.gather(pfns[first:first + count][held])
        self.result.pages_by_hash += n_refs
        self.result.pages_sent += literal
        self.result.pages_from_store += count - literal
        t0 = self._spent("assemble", t0)
        hasher.update(W.page_hash_bytes(page_hashes(out)))  # over every assembled byte (image_wire)
        self._spent("hash", t0)
        self._emit(fd, assembled)
        return first + count
