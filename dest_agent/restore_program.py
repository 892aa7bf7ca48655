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
    VM -> V   P2VFEED1 <json facts, "holding": pages of a loaded image or 0,
                        "ring": {"pci", "bytes"} when the VM has the feed's shared memory>\\n
    V  -> VM  IMAGE <bytes> <token>\\n  then <bytes> of image  | HELD <token>\\n
              | IMAGE <bytes> <token> RING\\n  then the image through the ring (below)
    VM -> V   LOADED <pages>\\n | ERR <reason>\\n
    V  -> VM  GO\\n | ABORT\\n
    VM -> V   RESTORING\\n  (then the machine becomes P)  | ERR <reason>\\n

The ring: an ivshmem-plain PCI device whose BAR 2 is a file in V's /dev/shm. Byte b of the image sits
at b mod the ring's size. V writes into the ring, then says DATA <bytes of the image in it so far>; the
VM says FREE <bytes of the image written into /dev/snapshot> as it goes, and V reuses only what is
free. Under TCG the VM's network stack cost ~10 us of its CPU per image page (receiving 52k pages took
0.5 s of a single vCPU that also writes them into /dev/snapshot); through the ring a page costs the
one copy into the kernel.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import sys
import time

PAGE = 4096
SNAPSHOT_FREEZE = 0x3301
SNAPSHOT_ATOMIC_RESTORE = 0x3304
MAX_IMAGE_BYTES = 1 << 40
MAX_CONNECTIONS = 1000  # bounded: each is one attempt by V
IVSHMEM = ("0x1af4", "0x1110")  # PCI vendor and device of QEMU's ivshmem-plain
RING_FREE_EVERY = 1024  # pages written into /dev/snapshot between two FREE lines


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


class Ring:
    """The feed's shared memory, mapped: `pages` are its page-sized views, made once at start (made
    while the image comes they would cost a Python object per page on an emulated CPU)."""

    def __init__(self, address: str, memory: mmap.mmap | bytearray, physical: int = 0,
                 devmem: bool = False) -> None:
        self.address = address
        self.memory = memory
        self.physical, self.devmem = physical, devmem
        self.size = len(memory) // PAGE * PAGE
        view = memoryview(memory)
        self.pages = [view[i:i + PAGE] for i in range(0, self.size, PAGE)]

    def facts(self) -> dict:
        """"phys" and "devmem": where the resumed OS finds the ring for the commit gate (P's kernel,
        this same build, will not know the device: it reads the ring through /dev/mem)."""
        return {"pci": self.address, "bytes": self.size, "phys": self.physical, "devmem": self.devmem}


def bar_address(device: str, bar: int = 2) -> int:
    """The physical address of a PCI function's BAR (sysfs `resource`: one "start end flags" line each)."""
    with open(f"{device}/resource") as f:
        lines = f.read().splitlines()
    return int(lines[bar].split()[0], 16)


def devmem_reads(physical: int, expected: bytes, path: str = "/dev/mem") -> bool:
    """Whether /dev/mem maps the page at `physical` and shows `expected` there (the commit gate's
    way to the ring after the restore: this kernel's build decides whether /dev/mem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_SYNC)
        try:
            memory = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=physical)
        finally:
            os.close(fd)
        try:
            return memory[:len(expected)] == expected
        finally:
            memory.close()
    except (OSError, ValueError):
        return False


def find_ring(root: str = "/sys/bus/pci/devices", memory_path: str = "/dev/mem") -> Ring | None:
    """The ivshmem-plain device's BAR 2 mapped read-only, or None (then the image comes over TCP);
    `memory_path`: where devmem_reads looks for it by its physical address (a file in tests)."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    for name in names:
        dev = f"{root}/{name}"
        try:
            with open(f"{dev}/vendor") as v, open(f"{dev}/device") as d:
                if (v.read().strip(), d.read().strip()) != IVSHMEM:
                    continue
            with open(f"{dev}/enable", "w") as e:  # no driver binds it: turn its memory decoding on
                e.write("1")
            fd = os.open(f"{dev}/resource2", os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
            physical = bar_address(dev)
            return Ring(name, memory, physical, devmem_reads(physical, bytes(memory[:64]), memory_path))
        except (OSError, ValueError) as exc:
            log(f"feed ring at {name} unusable ({exc}): the image comes over the network")
    return None


def facts(ring: Ring | None = None) -> dict:
    u = os.uname()
    out = {"release": u.release, "version": u.version, "machine": u.machine, "memmap": read_memmap(),
           "present_pages": present_pages(), "mem_free_bytes": mem_free_bytes()}
    if ring is not None:
        out["ring"] = ring.facts()
    return out


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


def write_pages(fd: int, pages: list[memoryview], count: int, start: int = 0) -> None:
    """Write pages[start:start + count] into /dev/snapshot. It takes at most one page per write(); writev with
    page-sized vectors makes the kernel call it once per vector: one system call for many pages.
    The vectors are made once by the caller: made per call they cost a Python object per page,
    which an emulated CPU pays dearly for (P's reading side went 0.9 -> 0.3 s with the same change)."""
    done = 0
    for _ in range(count + 2):  # bounded: every pass makes progress or fails
        if done >= count:
            return
        n = os.writev(fd, pages[start + done:start + min(count, done + 1024)])
        if n <= 0 or n % PAGE:
            raise OSError(f"/dev/snapshot took {n} bytes of a page-aligned write")
        done += n // PAGE
    raise OSError("/dev/snapshot writes made no progress")


def write_timed(fd: int, pages: list[memoryview], count: int, start: int, image_page: int,
                spent: dict[str, float]) -> None:
    """write_pages, its seconds and CPU time added to spent["write"] and spent["write_cpu"]; a
    refusal names the image's page (`image_page` is the first one written here)."""
    t0, c0 = time.monotonic(), time.thread_time()
    try:
        write_pages(fd, pages, count, start)
    except OSError as exc:
        raise RuntimeError(f"/dev/snapshot refused page {image_page}: {exc} "
                           "(see the kernel log: memory size or firmware map mismatch?)") from None
    spent["write"] += time.monotonic() - t0
    spent["write_cpu"] += time.thread_time() - c0


def load_image(feed: Feed, size: int, spent: dict[str, float] | None = None,
               device: str = "/dev/snapshot", ring: Ring | None = None) -> tuple[int, int]:
    """Stream `size` bytes from V into /dev/snapshot, through `ring` when given. Returns (fd, pages);
    `spent` gets the seconds spent waiting for V ("recv") and writing into the kernel ("write"),
    and this thread's CPU time in each ("recv_cpu", "write_cpu")."""
    spent = spent if spent is not None else {}
    spent["recv"] = spent["write"] = spent["recv_cpu"] = spent["write_cpu"] = 0.0
    fd = os.open(device, os.O_WRONLY)
    try:
        if ring is not None:
            return fd, load_from_ring(feed, size, ring, fd, spent)
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
                write_timed(fd, pages, whole // PAGE, 0, done // PAGE, spent)
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


def load_from_ring(feed: Feed, size: int, ring: Ring, fd: int, spent: dict[str, float]) -> int:
    """The image through the ring (see the module's docstring): V's DATA lines say how far it has
    filled it, FREE lines tell V how far it may refill. Returns the pages written."""
    done = avail = 0  # bytes written into /dev/snapshot; bytes V put in the ring
    ring_pages = len(ring.pages)
    while done < size:
        whole = min(avail - done, size - done) // PAGE
        if not whole:
            t0, c0 = time.monotonic(), time.thread_time()
            words = feed.line().split()
            spent["recv"] += time.monotonic() - t0
            spent["recv_cpu"] += time.thread_time() - c0
            if len(words) != 2 or words[0] != "DATA" or not words[1].isdigit():
                raise RuntimeError(f"expected DATA <bytes> from V, got {' '.join(words)[:80]!r}")
            upto = int(words[1])
            if upto <= avail or upto > size or upto - done > ring.size:
                raise RuntimeError(f"DATA {upto} out of order or beyond the ring (V had {avail} bytes in it, "
                                   f"{done} written, image {size}, ring {ring.size})")
            avail = upto
            continue
        start = (done % ring.size) // PAGE
        count = min(whole, ring_pages - start, RING_FREE_EVERY)
        write_timed(fd, ring.pages, count, start, done // PAGE, spent)
        done += count * PAGE
        feed.send(f"FREE {done}")
    return done // PAGE


class Held:
    """A loaded image nobody decided on yet: its /dev/snapshot descriptor (closing it frees it)."""

    def __init__(self, fd: int, pages: int) -> None:
        self.fd, self.pages = fd, pages

    def discard(self) -> None:
        os.close(self.fd)


def serve_one(conn: socket.socket, token: str, held: Held | None = None,
              device: str = "/dev/snapshot", ring: Ring | None = None) -> Held | None:
    """One connection from V. Returns the image still held (loaded, undecided) for the next one."""
    feed = Feed(conn)
    feed.send("P2VFEED1 " + json.dumps({**facts(ring), "holding": held.pages if held else 0}))
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
    if len(words) not in (3, 4) or words[0] != "IMAGE" or not words[1].isdigit() or words[3:] not in ([], ["RING"]):
        feed.send("ERR expected IMAGE <bytes> <token> [RING] or HELD <token>")
        return held
    if words[3:] and ring is None:
        feed.send("ERR this VM has no feed ring")
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
        fd, pages = load_image(feed, size, spent, device=device, ring=ring if words[3:] else None)
    except (RuntimeError, OSError) as exc:
        log(str(exc))
        try:
            feed.send(f"ERR {exc}")
        except OSError:
            pass
        return None
    log(f"image loaded{' through the ring' if words[3:] else ''}: {pages} pages in {time.monotonic() - t0:.3f}s "
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
        t0 = time.monotonic()
        fcntl.ioctl(held.fd, SNAPSHOT_FREEZE)
        log(f"frozen in {time.monotonic() - t0:.3f}s: ATOMIC_RESTORE")  # the VM's console keeps it
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
    ring = find_ring()
    log(f"P2V-RESTORE-LISTENING port {port} facts {json.dumps(facts(ring))}")
    held: Held | None = None
    for _ in range(MAX_CONNECTIONS):
        conn, peer = srv.accept()
        log(f"feed from {peer[0]}")
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            held = serve_one(conn, token, held, ring=ring)
        except (ConnectionError, ValueError, OSError) as exc:
            log(f"feed ended: {exc}")
        finally:
            conn.close()
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
