"""The image on its way out of P: read from /dev/snapshot into one buffer, framed chunks queued to V
as the link and the socket take them, and whether a chunk is compressed."""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Callable
from typing import Any

from common.hibernate_image import PAGE_SIZE

IOV_MAX = 1024  # vectors per readv (the kernel's UIO_MAXIOV)
COMPRESSION_MODES = ("adaptive", "always", "never")


class CutoverAborted(RuntimeError):
    """Before the point of no return: P was (or will be) unfrozen and runs on."""


def compress_chunk(mode: str, network_behind: bool, link_up: bool = True) -> bool:
    """Whether a chunk's literal pages are compressed as it is encoded. Pure. "adaptive": only while
    P's link is up and the network behind (slower than P's CPU). While the link is still down after
    CREATE_IMAGE the chunks wait as they are, and are compressed only once all of them are read and
    the link is still down, when P's CPU has nothing else to do (Helper._compress_backlog): under TCG
    reading and hashing outlast the e1000's autonegotiation, and compressing meanwhile delayed the
    image (rig: header -> whole image at V, median 0.93 s compressing while down, 0.78 s never)."""
    return mode == "always" or (mode == "adaptive" and link_up and network_behind)


class PageReader:
    """Reads the image from /dev/snapshot into one reusable buffer.

    /dev/snapshot hands out at most one page per read(); readv with page-sized vectors makes the
    kernel call it once per vector: one system call per IOV_MAX pages. The vectors are made once:
    built per chunk they cost more than the reading itself in an emulated P (a Python object per page)."""

    def __init__(self, snap: Any, capacity: int) -> None:
        self.snap = snap
        self.capacity = capacity
        self.buf = bytearray(capacity * PAGE_SIZE)
        self.view = memoryview(self.buf)
        self.pages = [self.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(capacity)]

    def read(self, count: int) -> memoryview:
        want = count * PAGE_SIZE
        done = 0
        for _ in range(count * 2 + 2):  # bounded: every pass makes progress or fails
            if done >= want:
                return self.view[:want]
            start, partial = divmod(done, PAGE_SIZE)
            vectors = [self.pages[start][partial:]] if partial else []
            first_full = start + (1 if partial else 0)
            vectors += self.pages[first_full:min(count, first_full + IOV_MAX - len(vectors))]
            n = self.snap.read_pages(vectors)
            if n <= 0:
                raise CutoverAborted(f"/dev/snapshot ended early ({done} of {want} bytes)")
            done += n
        raise CutoverAborted("/dev/snapshot reads made no progress")


class Outbox:
    """Frames to V, sent as far as the socket takes them without waiting, up to `limit` bytes held.

    CREATE_IMAGE suspends and resumes every device: P's NIC comes back with its link down for a
    few seconds. Reading, hashing and compressing the image go on meanwhile; only a full outbox or
    the end of the image waits for the network. Nothing is handed to TCP before `link_up()` says
    the egress link is back: a segment lost to a dead link is resent only on TCP's backed-off
    timer (measured in the rig: carrier back 2.05 s after CREATE_IMAGE, first packet through at
    3.07 s when sending all along)."""

    def __init__(self, sock: socket.socket, limit: int = 64 << 20,
                 link_up: Callable[[], bool] | None = None, poll_s: float = 0.005) -> None:
        self.sock = sock
        self.limit = limit
        self.queue: collections.deque[memoryview] = collections.deque()
        self.held = 0
        self.waited_s = 0.0  # time spent blocked on the network
        self.link_up = link_up or (lambda: True)
        self.link_seen_at = 0.0  # monotonic time the link was first seen up (0 = not yet)
        self.poll_s = poll_s

    def link_ready(self) -> bool:
        """Whether the link is back (polled: the link cycle raises P's NIC once its PHY has link)."""
        return self._link()

    def _link(self) -> bool:
        if not self.link_seen_at:
            if not self.link_up():
                return False
            self.link_seen_at = time.monotonic()
        return True

    def push(self, parts: list[bytes | memoryview]) -> int:
        size = 0
        for part in parts:
            view = memoryview(part).cast("B")
            if view.nbytes:
                self.queue.append(view)
                self.held += view.nbytes
                size += view.nbytes
        self.pump()
        if self.held > self.limit:
            self._drain(until=self.limit // 2)
        return size

    def pump(self) -> None:
        """Send what the socket takes now."""
        if not self._link():
            return
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            while self.queue:
                try:
                    n = self.sock.send(self.queue[0])
                except (BlockingIOError, InterruptedError):
                    return
                self._sent(n)
        finally:
            self.sock.settimeout(timeout)

    def behind(self) -> bool:
        """The network has not taken everything pushed so far (after sending what it takes now)."""
        self.pump()
        return self.held > 0

    def flush(self) -> None:
        self._drain(until=0)

    def _drain(self, until: int) -> None:
        t0 = time.monotonic()
        deadline = t0 + (self.sock.gettimeout() or 120.0)
        while not self._link():
            if time.monotonic() > deadline:
                raise TimeoutError("the network link did not come back")
            time.sleep(self.poll_s)
        while self.held > until:
            self._sent(self.sock.send(self.queue[0]))  # blocking, bounded by the socket's timeout
        self.waited_s += time.monotonic() - t0

    def _sent(self, n: int) -> None:
        head = self.queue[0]
        self.held -= n
        if n >= head.nbytes:
            self.queue.popleft()
        else:
            self.queue[0] = head[n:]
