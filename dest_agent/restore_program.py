"""The restore program of the waiting VM (runs in V's restore initramfs; standard library only).

It listens on the feed NIC, tells V what this VM is (kernel build, firmware map, memory), then takes
a hibernation image from V and writes it into /dev/snapshot as it arrives (the kernel validates the
header on the first page: wrong memory size or firmware map is refused right there). When the whole
image is in, it answers LOADED and waits for V's word: GO -> FREEZE + ATOMIC_RESTORE (P's kernel takes
over this machine and never returns here); ABORT -> the image is discarded (closing /dev/snapshot
frees it) and it waits for the next one. A connection lost while it waits for that word keeps the
loaded image: P may be off already (V's agent died between its ACK and P's COMMIT), and V's next agent
asks for it again with HELD and the same token; a new IMAGE discards it.

Feed protocol (one TCP connection from V at a time, lines are ASCII):
    VM -> V   P2VFEED1 <json facts, "holding": pages of a loaded image or 0>\\n
    V  -> VM  IMAGE <bytes> <token>\\n  then <bytes> of image  | HELD <token>\\n
    VM -> V   LOADED <pages>\\n | ERR <reason>\\n
    V  -> VM  GO\\n | ABORT\\n
    VM -> V   RESTORING\\n  (then the machine becomes P)  | ERR <reason>\\n
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

PAGE = 4096
SNAPSHOT_FREEZE = 0x3301
SNAPSHOT_ATOMIC_RESTORE = 0x3304
MAX_IMAGE_BYTES = 1 << 40
MAX_CONNECTIONS = 1000  # bounded: each is one attempt by V


def log(msg: str) -> None:
    sys.stderr.write(f"P2V-RESTORE [{time.monotonic():.3f}] {msg}\n")
    sys.stderr.flush()


def read_memmap(root: str = "/sys/firmware/memmap") -> list[list]:
    out = []
    try:
        names = sorted((n for n in os.listdir(root) if n.isdigit()), key=int)
    except OSError:
        return out
    for n in names:
        vals = []
        for f in ("start", "end", "type"):
            with open(f"{root}/{n}/{f}") as fh:
                vals.append(fh.read().strip())
        out.append([int(vals[0], 16), int(vals[1], 16) + 1, vals[2]])
    return out


def present_pages() -> int:
    total = 0
    with open("/proc/zoneinfo") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "present":
                total += int(parts[1])
    return total


def mem_free_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    return 0


def facts() -> dict:
    u = os.uname()
    return {"release": u.release, "version": u.version, "machine": u.machine, "memmap": read_memmap(),
            "present_pages": present_pages(), "mem_free_bytes": mem_free_bytes()}


class Feed:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def line(self, limit: int = 4096) -> str:
        while b"\n" not in self.buf:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("V closed the feed")
            self.buf += chunk
            if len(self.buf) > limit and b"\n" not in self.buf:
                raise ValueError("line too long")
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("ascii", "replace").strip()

    def send(self, text: str) -> None:
        self.conn.sendall(text.encode() + b"\n")


def cpu_busy_s(stat: str = "/proc/stat") -> float:
    """Seconds this machine's CPUs were not idle since boot (/proc/stat), 0.0 if unreadable: with the
    program's own CPU time it tells how much of the VM's load was the network's receive path (the
    kernel's work on packets is often accounted to other contexts)."""
    try:
        with open(stat) as f:
            fields = f.readline().split()[1:]
        ticks = [int(x) for x in fields[:8]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        return 0.0


def write_pages(fd: int, pages: list[memoryview], count: int) -> None:
    """Write pages[0:count] into /dev/snapshot. It takes at most one page per write(); writev with
    page-sized vectors makes the kernel call it once per vector: one system call for many pages.
    The vectors are made once by the caller: made per call they cost a Python object per page,
    which an emulated CPU pays dearly for (P's reading side went 0.9 -> 0.3 s with the same change)."""
    done = 0
    for _ in range(count + 2):  # bounded: every pass makes progress or fails
        if done >= count:
            return
        n = os.writev(fd, pages[done:min(count, done + 1024)])
        if n <= 0 or n % PAGE:
            raise OSError(f"/dev/snapshot took {n} bytes of a page-aligned write")
        done += n // PAGE
    raise OSError("/dev/snapshot writes made no progress")


def load_image(feed: Feed, size: int, spent: dict[str, float] | None = None,
               device: str = "/dev/snapshot") -> tuple[int, int]:
    """Stream `size` bytes from V into /dev/snapshot. Returns (fd, pages); `spent` gets the seconds
    spent waiting for the network ("recv") and writing into the kernel ("write"), and this thread's
    CPU time in each ("recv_cpu", "write_cpu")."""
    spent = spent if spent is not None else {}
    spent["recv"] = spent["write"] = spent["recv_cpu"] = spent["write_cpu"] = 0.0
    fd = os.open(device, os.O_WRONLY)
    try:
        buf = bytearray(max(4 << 20, len(feed.buf) + PAGE))
        view = memoryview(buf)
        pages = [view[i:i + PAGE] for i in range(0, len(buf) - PAGE + 1, PAGE)]
        held = len(feed.buf)  # bytes at the start of buf not yet written
        view[:held] = feed.buf
        feed.buf = b""
        received = held
        done = 0
        while True:
            whole = (min(held, size - done) // PAGE) * PAGE
            if whole:
                t0, c0 = time.monotonic(), time.thread_time()
                try:
                    write_pages(fd, pages, whole // PAGE)
                except OSError as exc:
                    raise RuntimeError(f"/dev/snapshot refused page {done // PAGE}: {exc} "
                                       "(see the kernel log: memory size or firmware map mismatch?)") from None
                spent["write"] += time.monotonic() - t0
                spent["write_cpu"] += time.thread_time() - c0
                view[:held - whole] = view[whole:held]  # less than a page (or the tail after the image)
                held -= whole
                done += whole
            if done >= size:
                break
            t0, c0 = time.monotonic(), time.thread_time()
            n = feed.conn.recv_into(view[held:])
            spent["recv"] += time.monotonic() - t0
            spent["recv_cpu"] += time.thread_time() - c0
            if not n:
                raise ConnectionError(f"V closed the feed after {received} of {size} bytes")
            held += n
            received += n
        feed.buf = bytes(view[:held])
        return fd, done // PAGE
    except BaseException:
        os.close(fd)
        raise


class Held:
    """A loaded image nobody decided on yet: its /dev/snapshot descriptor (closing it frees it)."""

    def __init__(self, fd: int, pages: int) -> None:
        self.fd, self.pages = fd, pages

    def discard(self) -> None:
        os.close(self.fd)


def serve_one(conn: socket.socket, token: str, held: Held | None = None,
              device: str = "/dev/snapshot") -> Held | None:
    """One connection from V. Returns the image still held (loaded, undecided) for the next one."""
    feed = Feed(conn)
    feed.send("P2VFEED1 " + json.dumps({**facts(), "holding": held.pages if held else 0}))
    words = feed.line().split()
    if len(words) == 2 and words[0] == "HELD":
        if words[1] != token:
            feed.send("ERR bad token")
            return held
        if held is None:
            feed.send("ERR no image held")
            return None
        log(f"V asks again for the image held: {held.pages} pages")
        feed.send(f"LOADED {held.pages}")
        return decide(feed, held)
    if len(words) != 3 or words[0] != "IMAGE" or not words[1].isdigit():
        feed.send("ERR expected IMAGE <bytes> <token> or HELD <token>")
        return held
    if words[2] != token:
        feed.send("ERR bad token")
        return held
    size = int(words[1])
    if size <= 0 or size % PAGE or size > MAX_IMAGE_BYTES:
        feed.send(f"ERR bad image size {size}")
        return held
    if held is not None:
        log("a new image: the one held is discarded")
        held.discard()
    t0, busy0 = time.monotonic(), cpu_busy_s()
    spent: dict[str, float] = {}
    try:
        fd, pages = load_image(feed, size, spent, device=device)
    except (RuntimeError, OSError) as exc:
        log(str(exc))
        try:
            feed.send(f"ERR {exc}")
        except OSError:
            pass
        return None
    log(f"image loaded: {pages} pages in {time.monotonic() - t0:.3f}s "
        f"(waiting for V {spent['recv']:.3f}s, writing {spent['write']:.3f}s; CPU: receiving "
        f"{spent['recv_cpu']:.3f}s, writing {spent['write_cpu']:.3f}s, the VM busy {cpu_busy_s() - busy0:.2f}s)")
    try:
        feed.send(f"LOADED {pages}")
    except OSError:
        pass  # V went: the word comes on its next connection
    return decide(feed, Held(fd, pages))


def decide(feed: Feed, held: Held) -> Held | None:
    """V's word on a loaded image. GO restores P (never returns when it works); ABORT discards; a
    lost connection keeps it for V's next agent (HELD)."""
    try:
        word = feed.line()
    except (ConnectionError, OSError, ValueError) as exc:
        log(f"feed lost while the image waits for V's word ({exc}): image kept")
        return held
    if word != "GO":
        log(f"V said {word!r}: image discarded")
        held.discard()
        return None
    try:  # V said GO (and marked it durably first): a feed lost now does not stop the restore
        feed.send("RESTORING")
    except OSError:
        pass
    try:
        log("FREEZE + ATOMIC_RESTORE")
        fcntl.ioctl(held.fd, SNAPSHOT_FREEZE)
        fcntl.ioctl(held.fd, SNAPSHOT_ATOMIC_RESTORE)
        feed.send("ERR ATOMIC_RESTORE returned")  # only reached when the restore failed
    except OSError as exc:
        log(f"restore failed: {exc}")
        try:
            feed.send(f"ERR {exc}")
        except OSError:
            pass
    held.discard()  # a failed restore: the image is of no further use
    return None


def main(argv: list[str]) -> int:
    port = int(argv[1])
    token = argv[2]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    log(f"P2V-RESTORE-LISTENING port {port} facts {json.dumps(facts())}")
    held: Held | None = None
    for _ in range(MAX_CONNECTIONS):
        conn, peer = srv.accept()
        log(f"feed from {peer[0]}")
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            held = serve_one(conn, token, held)
        except (ConnectionError, ValueError, OSError) as exc:
            log(f"feed ended: {exc}")
        finally:
            conn.close()
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
