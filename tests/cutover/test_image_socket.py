"""The image socket for real: P's cutover helper (with a snapshot device that plays back a synthetic
image) against V's image receiver over TCP on loopback, with a real page store holding part of the
image from "pre-copy". What the waiting VM would get must be byte-identical to the image; every
failure before the point of no return must end with P unfrozen and the block lifted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from common import commit_gate
from common.pagecodec import decode_batch, encode_batch
from dest_agent.cutover import undecided
from dest_agent.image_receiver import (
    ChunkBuffers,
    ExpectedKernel,
    ImageReceiver,
    ReceiveError,
    ReceiveResult,
    expected_image_bytes,
    populate_page_cache,
)
from dest_agent.page_store import PageStore
from source_agent import host_settings as hs
from source_agent import page_out as page_out_mod
from source_agent.cutover_helper import Helper, HelperConfig
from source_agent.host_settings import HostSettings, PendingCutover
from tests.cutover.imagegen import make_image

MAX_PFN = 8192
TOKEN = bytes(range(32))


class PlaybackSnapshot:
    """A /dev/snapshot double: FREEZE/CREATE_IMAGE/read()/FREE/UNFREEZE/POWER_OFF on a byte string."""

    def __init__(self, image: bytes, in_suspend: int = 1, create_errno: int | None = None) -> None:
        self.image = image
        self.pos = 0
        self.in_suspend = in_suspend
        self.create_errno = create_errno
        self.calls: list[str] = []
        self.watch: Path | None = None
        self.image_size_seen = ""
        self.watch_pcp: Path | None = None
        self.pcp_seen = ""
        self.watch_note: Path | None = None  # a file whose existence at CREATE_IMAGE is recorded
        self.note_at_snapshot: bool | None = None

    def freeze(self) -> None:
        self.calls.append("freeze")

    def create_image(self) -> int:
        self.calls.append("create_image")
        if self.watch is not None:  # what the kernel would see as /sys/power/image_size
            self.image_size_seen = self.watch.read_text().strip()
        if self.watch_pcp is not None:  # ... and as /proc/sys/vm/percpu_pagelist_high_fraction
            self.pcp_seen = self.watch_pcp.read_text().strip()
        if self.watch_note is not None:  # in the image, or not
            self.note_at_snapshot = self.watch_note.exists()
        if self.create_errno:
            raise OSError(self.create_errno, "Cannot allocate memory")
        return self.in_suspend

    def read_pages(self, buffers: list[memoryview]) -> int:
        total = 0
        for buf in buffers:  # like the kernel's loop over the vectors: one page per read at most
            n = min(len(buf), 4096, len(self.image) - self.pos)
            buf[:n] = self.image[self.pos:self.pos + n]
            self.pos += n
            total += n
            if n < len(buf):
                break
        return total

    def free(self) -> None:
        self.calls.append("free")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def power_off(self) -> None:
        self.calls.append("power_off")


class RecordingBlock:
    def __init__(self) -> None:
        self.applied: list[str] = []
        self.lifted: list[str] = []

    def apply(self, interfaces, host, port):
        self.applied = list(interfaces)
        return list(interfaces)

    def tighten(self, interfaces):
        self.tightened = list(interfaces)

    def lift(self, interfaces):
        self.lifted = list(interfaces)
        return list(interfaces)


class RecordingFeed:
    def __init__(self, refuse_at_finish: str = "") -> None:
        self.data = bytearray()
        self.size = 0
        self.events: list[str] = []
        self.refuse_at_finish = refuse_at_finish
        self.go_mark: Path | None = None  # V's GO mark: it must be durable before the VM hears GO

    through_ring = False

    def begin(self, size: int) -> None:
        self.size = size
        self.events.append("begin")

    def write(self, data) -> None:
        self.data += data

    def finish(self) -> int:
        if self.refuse_at_finish:
            raise RuntimeError(self.refuse_at_finish)
        self.events.append("loaded")
        return len(self.data) // 4096

    def go(self) -> None:
        self.events.append("go" if self.go_mark is None or self.go_mark.exists() else "go-before-the-mark")

    def abort(self, reason: str) -> None:
        self.events.append("abort")

    gate_record: bytes | None = None

    def gate(self, record: bytes) -> None:
        self.gate_record = record
        self.events.append("gate")

    def restore_ahead(self) -> None:
        self.events.append("restore-ahead")


UNAME = type("U", (), {"release": "6.1.0-56-amd64", "version": "#1 SMP Debian 6.1.158-1"})()


MOVED_BASE_PFN = 6000  # below MAX_PFN, above every test image's PFNs


def precopied_store(tmp_path: Path, pfns: np.ndarray, data: np.ndarray, held_fraction: float,
                    moved: int = 0) -> PageStore:
    """A page store holding the first `held_fraction` of the image's pages as they are, and an older
    version of a few others (pages that changed after pre-copy); with `moved`, the next pages are
    held at other PFNs (the kernel moved them after pre-copy)."""
    store = PageStore(tmp_path / "memory.img", MAX_PFN)
    n_held = int(pfns.size * held_fraction)
    stale = data[n_held:n_held + 5].copy()
    stale[:, 0] ^= 0xFF
    moved_pfns = np.arange(MOVED_BASE_PFN, MOVED_BASE_PFN + moved, dtype=np.uint64)
    held_pfns = np.concatenate([pfns[:n_held], pfns[n_held:n_held + 5], moved_pfns])
    held_data = np.concatenate([data[:n_held], stale, data[n_held + 5:n_held + 5 + moved]])
    msg = encode_batch(held_pfns, held_data.tobytes(), migration_id="m", stream_id=1, seq=1, round=1,
                       batch_id=1, zstd_level=None)
    store.write(decode_batch(msg, max_pfn=MAX_PFN, max_raw_bytes=1 << 26))
    store.sync()
    return store


def image_size_file(tmp_path: Path) -> Path:
    path = tmp_path / "image_size"
    if not path.exists():
        path.write_text("412000000\n")  # the kernel's default: 2/5 of RAM
    return path


def pcp_fraction_file(tmp_path: Path) -> Path:
    path = tmp_path / "percpu_pagelist_high_fraction"
    if not path.exists():
        path.write_text("0\n")  # the kernel's default: its own sizing
    return path


def meminfo_file(tmp_path: Path) -> Path:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:        1000000 kB\nMemFree:          700000 kB\n")
    return path


def make_helper(tmp_path: Path, endpoint: str, snap: PlaybackSnapshot, store: PageStore, *, token: bytes = TOKEN,
                rehearse: bool = False, compression: str = "adaptive", claim_held: dict[int, int] | None = None,
                resume_actions: list[dict] | None = None, resume_runner=None,
                pending_file: str = "", migration_id: str = "mig1",
                agent_pid: int = 0, final_pass_source: str = "",
                dedup_stash: str = "", peer_note: str = "") -> tuple[Helper, RecordingBlock]:
    """P's real cutover helper on a playback snapshot, for V's image socket at `endpoint`."""
    snap.watch, snap.watch_pcp = image_size_file(tmp_path), pcp_fraction_file(tmp_path)
    block = RecordingBlock()
    cfg = HelperConfig(migration_id=migration_id, endpoint=endpoint, token=token.hex(),
                       block_interfaces=["eth0", "p2vbond0"], rehearse=rehearse, ack_timeout_s=20,
                       drop_caches_path=str(tmp_path / "drop_caches"), compression=compression,
                       image_size_path=str(image_size_file(tmp_path)), meminfo_path=str(meminfo_file(tmp_path)),
                       pcp_high_fraction_path=str(pcp_fraction_file(tmp_path)),
                       stream_initcwnd=0,  # the host's routes are not the test's (tests/cutover/test_stream_route.py)
                       resume_actions=list(resume_actions or []), pending_file=pending_file, agent_pid=agent_pid,
                       final_pass_source=final_pass_source, dedup_stash=dedup_stash, peer_note=peer_note)
    held = store.hashes(0, MAX_PFN)
    for pfn, page_hash in (claim_held or {}).items():  # what P believes V holds (tests of bad input)
        held[pfn] = page_hash
    helper = Helper(cfg, snap, held, block=block, uname=UNAME,  # type: ignore[arg-type]
                    resume_runner=resume_runner)
    return helper, block


def serve_in_thread(receiver: ImageReceiver) -> tuple[threading.Thread, dict]:
    """V's receiver serving in a thread; the dict gets its "result" or its "error"."""
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["result"] = receiver.serve()
        except ReceiveError as exc:
            outcome["error"] = str(exc)

    t = threading.Thread(target=serve)
    t.start()
    return t, outcome


def run_pair(tmp_path: Path, image: bytes, store: PageStore, feed: RecordingFeed, *, token: bytes = TOKEN,
             snapshot: PlaybackSnapshot | None = None, rehearse: bool = False,
             expected: ExpectedKernel | None = None, compression: str = "adaptive",
             claim_held: dict[int, int] | None = None, resume_actions: list[dict] | None = None,
             resume_runner=None, pending_file: str = "", agent_pid: int = 0, final_pass_source: str = "",
             peer_note: str = ""):
    feed.go_mark = tmp_path / "go.json"
    receiver = ImageReceiver("mig1", TOKEN, store, feed, tmp_path / "image.bin", expected_kernel=expected,
                             accept_timeout_s=30, io_timeout_s=30, commit_timeout_s=10, go_mark=feed.go_mark,
                             ack_mark=tmp_path / "ack.json")
    host, port = receiver.endpoint
    t, outcome = serve_in_thread(receiver)
    outcome["receiver"] = receiver
    snap = snapshot or PlaybackSnapshot(image)
    helper, block = make_helper(tmp_path, f"{host}:{port}", snap, store, token=token, rehearse=rehearse,
                                compression=compression, claim_held=claim_held, resume_actions=resume_actions,
                                resume_runner=resume_runner, pending_file=pending_file, agent_pid=agent_pid,
                                final_pass_source=final_pass_source, peer_note=peer_note)
    result = helper.run()
    if result == "aborted" and t.is_alive():
        receiver.close()
    t.join(30)
    assert not t.is_alive()
    return result, helper, snap, block, outcome


@pytest.mark.parametrize("compression", ["adaptive", "always", "never"])
def test_full_cutover_sends_only_changed_pages(tmp_path: Path, compression: str) -> None:
    pfns = np.array(sorted(set(range(100, 1100)) | set(range(4000, 4600))), dtype=np.uint64)
    image, pfns, data = make_image(pfns, seed=1)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.9)
    feed = RecordingFeed()
    result, helper, snap, block, outcome = run_pair(
        tmp_path, image, store, feed, expected=ExpectedKernel(UNAME.release, UNAME.version),
        compression=compression)
    assert result == "powered-off"
    assert snap.calls == ["freeze", "create_image", "power_off"]  # never unfrozen after the ACK
    assert block.lifted == []
    assert bytes(feed.data) == image  # the VM gets P's exact image
    assert (tmp_path / "image.bin").read_bytes() == image  # prepared larger, then cut to the image
    assert res_prepared_bytes(outcome) > len(image)
    assert feed.events == ["begin", "loaded", "go"]
    assert json.loads((tmp_path / "ack.json").read_text())["migration"] == "mig1"  # durable before the ACK
    res = outcome["result"]
    assert res.committed and res.acked
    n_held = int(pfns.size * 0.9)
    assert res.pages_sent == pfns.size - n_held  # the 5 stale pages and the never-sent ones
    assert res.pages_from_store == n_held
    assert helper.fig.pages_sent == res.pages_sent and helper.fig.pages_skipped == n_held
    assert helper.fig.wire_bytes < len(image) * 0.2
    assert res.warm_bytes == 16 * ((1 << 20) + 5)  # WARM padding: received, not counted as the image's
    assert res.wire_bytes == helper.fig.wire_bytes  # header to END, both sides
    assert (tmp_path / "drop_caches").read_text() == "3\n"  # caches dropped (before the freeze: P ran)
    assert snap.image_size_seen == str(1000000 * 1024)  # all of RAM: no squeezing inside the downtime
    assert snap.pcp_seen == "100000"  # short per-CPU free lists: the kernel preallocates no more than it copies
    compressed = res.source_timings["compressed_chunks"]  # P's figures reach V in the END frame
    assert res.source_timings["link_back"] >= 0  # the egress (lo here) was found and seen up
    if compression == "always":  # ZCHUNKs, decoded by V into the exact image (checked above)
        assert compressed >= 1
    elif compression == "never":
        assert compressed == 0


def test_dedup_tables_are_on_disk_not_in_p_memory_at_the_snapshot(tmp_path: Path) -> None:
    """The tables the stream dedups with leave P's memory before FREEZE (they would travel in the
    image): at CREATE_IMAGE they are in the stash file only; afterwards they are back, the stream
    dedups as before and the file is gone."""
    pfns = np.array(sorted(set(range(100, 1100)) | set(range(4000, 4600))), dtype=np.uint64)
    image, pfns, data = make_image(pfns, seed=3)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.9)
    feed = RecordingFeed()
    stash = tmp_path / "state" / "cutover-dedup.bin"
    stash.parent.mkdir()
    seen: dict = {}

    class Watched(PlaybackSnapshot):
        def create_image(self) -> int:
            seen["file_bytes"] = stash.stat().st_size if stash.exists() else 0
            seen["in_memory"] = bool(helper.dedup.held.any() or helper.dedup.content.any())
            return super().create_image()

    receiver = ImageReceiver("mig1", TOKEN, store, feed, tmp_path / "image.bin", accept_timeout_s=30, io_timeout_s=30,
                             commit_timeout_s=10, go_mark=tmp_path / "go.json", ack_mark=tmp_path / "ack.json")
    feed.go_mark = tmp_path / "go.json"
    host, port = receiver.endpoint
    t, outcome = serve_in_thread(receiver)
    snap = Watched(image)
    helper, _ = make_helper(tmp_path, f"{host}:{port}", snap, store, dedup_stash=str(stash))
    held_before = helper.dedup.held.copy()
    assert held_before.any()
    assert helper.run() == "powered-off"
    t.join(30)
    content_bytes = -(-helper.dedup.content.nbytes // 4096) * 4096
    assert seen == {"file_bytes": MAX_PFN * 8 + content_bytes, "in_memory": False}, seen
    assert not stash.exists()
    assert np.array_equal(helper.dedup.held, held_before)  # back as they were
    assert bytes(feed.data) == image
    n_held = int(pfns.size * 0.9)
    assert outcome["result"].pages_from_store == n_held and helper.fig.pages_skipped == n_held
    assert "unstash_s" in helper.memory and "stash_s" in helper.memory


def test_dedup_tables_go_back_in_memory_without_a_stash_file(tmp_path: Path) -> None:
    """No file can be written: the tables stay in memory (the image is larger), the cutover goes on."""
    image, pfns, data = make_image(np.arange(100, 400, dtype=np.uint64), seed=4)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.5)
    receiver = ImageReceiver("mig1", TOKEN, store, RecordingFeed(), tmp_path / "image.bin", accept_timeout_s=30,
                             io_timeout_s=30, commit_timeout_s=10, ack_mark=tmp_path / "ack.json")
    host, port = receiver.endpoint
    t, outcome = serve_in_thread(receiver)
    helper, _ = make_helper(tmp_path, f"{host}:{port}", PlaybackSnapshot(image), store,
                            dedup_stash=str(tmp_path / "absent-dir" / "dedup.bin"))
    assert helper.run() == "powered-off"
    t.join(30)
    assert outcome["result"].acked and "stash_s" not in helper.memory
    assert outcome["result"].pages_from_store == int(pfns.size * 0.5)


def res_prepared_bytes(outcome: dict) -> int:
    return outcome["result"].prepared["bytes"]


def test_the_image_file_is_prepared_from_a_guess_and_holds_the_exact_image_either_way(tmp_path: Path) -> None:
    assert expected_image_bytes(0, 1000) == 256 * 4096
    assert expected_image_bytes(4000, 100_000) == (4000 + 1000 + 256) * 4096
    assert expected_image_bytes(262_144, 262_144) == (262_144 + 524 + 2) * 4096  # never beyond P's memory
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 64 * 4096)
        populate_page_cache(fd, 64 * 4096)
        assert os.fstat(fd).st_size == 64 * 4096 and os.fstat(fd).st_blocks == 0  # nothing written
    finally:
        os.close(fd)
    # a store holding few pages guesses too small: the image is still written whole
    pfns = np.arange(10, 700, dtype=np.uint64)
    image, pfns, data = make_image(pfns, seed=4)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.1)
    feed = RecordingFeed()
    result, *_, outcome = run_pair(tmp_path, image, store, feed)
    assert result == "powered-off"
    assert res_prepared_bytes(outcome) < len(image)
    assert (tmp_path / "image.bin").read_bytes() == image


def test_chunk_buffers_come_back_for_reuse_by_size() -> None:
    pool = ChunkBuffers(keep=2)
    first = pool.take(8192)
    assert len(first) == 8192 and pool.take(8192) is not first  # nothing given back yet: a new one
    pool.give(first)
    assert pool.take(4096) is not first and pool.take(8192) is first  # by size
    for _ in range(3):
        pool.give(bytearray(16))
    pool.give(b"not reusable")  # bytes are immutable: never handed out again
    assert len({id(pool.take(16)) for _ in range(2)}) == 2 and len(pool._free[16]) == 0  # kept 2 of 3


def test_reused_chunk_buffers_never_carry_a_page_into_the_next_image(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # every buffer V assembles into starts full of another image's bytes: each page must be overwritten
    monkeypatch.setattr(ChunkBuffers, "stock", lambda self, size, count: [
        self.give(bytearray(b"\xab" * size)) for _ in range(count)])
    pfns = np.arange(10, 4500, dtype=np.uint64)  # five chunks of held, sent and by-hash pages
    image, pfns, data = make_image(pfns, seed=5)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.6, moved=20)
    feed = RecordingFeed()
    result, *_, outcome = run_pair(tmp_path, image, store, feed)
    assert result == "powered-off"
    res = outcome["result"]
    assert res.pages_by_hash == 20 and 0 < res.pages_sent < pfns.size
    assert bytes(feed.data) == image
    assert (tmp_path / "image.bin").read_bytes() == image


def test_the_agents_own_file_pages_leave_before_the_freeze(tmp_path: Path) -> None:
    """A real process stands in for the agent: it maps a 16 MiB file and touches every page. The
    helper pages them out before FREEZE (source_agent/page_out.py), and the image still arrives
    exact."""
    lib = tmp_path / "lib.so"
    lib.write_bytes(np.random.default_rng(7).bytes(16 << 20))
    agent = subprocess.Popen([sys.executable, "-c", f"""
import mmap, sys
f = open({str(lib)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
print(sum(m[i] for i in range(0, len(m), 4096)), flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdout.readline()
        before = page_out_mod.rss_file_kib(agent.pid)
        pfns = np.arange(200, 700, dtype=np.uint64)
        image, pfns, data = make_image(pfns, seed=3)
        store = precopied_store(tmp_path, pfns, data, held_fraction=0.5)
        feed = RecordingFeed()
        result, *_, outcome = run_pair(tmp_path, image, store, feed, agent_pid=agent.pid)
        assert result == "powered-off" and bytes(feed.data) == image
        timings = outcome["result"].source_timings
        if "agent_paged_out_mib" not in timings:
            pytest.skip("this kernel cannot page out another process's memory")
        assert timings["agent_paged_out_mib"] >= 12  # most of the 16 MiB the stand-in alone maps
        assert page_out_mod.rss_file_kib(agent.pid) < before - 12 * 1024
        assert timings["major_faults"] >= 0 and timings["page_out_s"] >= 0
    finally:
        agent.kill()
        agent.wait()


class NoteAtPowerOff(PlaybackSnapshot):
    """What the pending file said when P went off (and in the meantime: when the ACK came)."""

    def __init__(self, image: bytes, pending: Path) -> None:
        super().__init__(image)
        self.pending = pending
        self.at_power_off: PendingCutover | None = None

    def power_off(self) -> None:
        super().power_off()
        self.at_power_off = hs.read_pending(self.pending)


@pytest.mark.parametrize("rehearse", [False, True], ids=["commit", "rehearsal"])
def test_the_pending_file_says_committed_once_commit_leaves(tmp_path: Path, rehearse: bool) -> None:
    """If agent and helper die after COMMIT, the next agent must power P off, not put it back next
    to the VM: the helper marks the agent's note committed before COMMIT leaves (never on a
    rehearsal, which hands nothing over)."""
    pfns = np.arange(100, 300, dtype=np.uint64)
    image, pfns, data = make_image(pfns, seed=4)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.9)
    pending = hs.pending_path(tmp_path / "state")
    hs.write_pending(pending, PendingCutover(HostSettings([], [], {}, ""), "boot", "mig1", "10.0.0.2:7470"))
    snap = NoteAtPowerOff(image, pending)
    result, *_ = run_pair(tmp_path, image, store, RecordingFeed(), snapshot=snap, rehearse=rehearse,
                          pending_file=str(pending))
    if rehearse:
        assert result == "rehearsed" and snap.at_power_off is None
        assert hs.read_pending(pending).committed is False
    else:
        assert result == "powered-off"
        assert snap.at_power_off is not None and snap.at_power_off.committed
        assert snap.at_power_off.helper_pid == os.getpid()  # the helper (here: this process) named itself


def test_pages_v_holds_at_other_pfns_travel_as_hashes(tmp_path: Path) -> None:
    image, pfns, data = make_image(range(100, 700), seed=3)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.5, moved=40)
    feed = RecordingFeed()
    result, helper, _, _, outcome = run_pair(tmp_path, image, store, feed)
    assert result == "powered-off"
    assert bytes(feed.data) == image  # assembled from pages found by content
    res = outcome["result"]
    assert res.pages_by_hash == helper.fig.pages_by_hash == 40
    assert res.pages_sent == 600 - 300 - 40  # the 5 stale pages travel; the 40 moved ones do not
    assert res.pages_from_store == 300 + 40


def test_reference_to_content_v_lacks_is_refused(tmp_path: Path) -> None:
    from common.pagecodec import page_hashes

    image, pfns, data = make_image(range(100, 300), seed=4)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.5)
    feed = RecordingFeed()
    # P wrongly believes V holds the last page's content at a spare PFN
    claim = {MOVED_BASE_PFN: int(page_hashes(data[-1].tobytes())[0])}
    result, _, snap, _, outcome = run_pair(tmp_path, image, store, feed, claim_held=claim)
    assert result == "aborted"
    assert "does not hold" in outcome["error"]
    assert snap.calls[-2:] == ["free", "unfreeze"] and "power_off" not in snap.calls
    assert feed.events[-1] == "abort"


def memory_file(tmp_path: Path, pfns: np.ndarray, data: np.ndarray, changed_after_pass: int = 0) -> Path:
    """P's memory as the pass before FREEZE reads it (a `file:` memory source): the image's data pages
    at their PFNs, zeros elsewhere; the first `changed_after_pass` image pages hold other bytes (they
    change again between the pass and the snapshot)."""
    memory = np.zeros((MAX_PFN, 4096), dtype=np.uint8)
    memory[pfns.astype(np.intp)] = data
    memory[pfns[:changed_after_pass].astype(np.intp), 7] ^= 0x5A
    path = tmp_path / "p-memory.raw"
    path.write_bytes(memory.tobytes())
    return path


def test_the_pass_before_freeze_leaves_the_image_only_what_changed_after_it(tmp_path: Path) -> None:
    """The helper's pass (final_pass) over a file standing in for P's memory, for real over the image
    socket into V's page store: the image then sends literally only the pages that changed after the
    pass, and V still assembles P's exact image (some of it from pages the pass wrote)."""
    from common.pagecodec import page_hashes

    image, pfns, data = make_image(sorted(set(range(100, 900)) | set(range(5000, 5300))), seed=11)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.4)
    memory = memory_file(tmp_path, pfns, data, changed_after_pass=7)
    feed = RecordingFeed()
    result, helper, _, _, outcome = run_pair(tmp_path, image, store, feed, final_pass_source=f"file:{memory}")
    assert result == "powered-off"
    assert bytes(feed.data) == image
    res = outcome["result"]
    n_held = int(pfns.size * 0.4)
    # the pass: every image page V lacked or held stale, the zero pages V had not been told of, and
    # the 7 (held) pages as they were at the pass
    assert res.pass_pages == helper.memory["pass_pages"] == (pfns.size - n_held) + (MAX_PFN - pfns.size) + 7
    assert helper.memory["pass_zero_pages"] == MAX_PFN - pfns.size
    assert helper.memory["pass_scanned"] == MAX_PFN and not helper.memory["pass_cut_short"]
    assert res.pages_sent == helper.fig.pages_sent == 7  # the image: only what changed after the pass
    assert res.pages_from_store == pfns.size - 7
    assert res.pass_bytes > (pfns.size - n_held) * 4096  # before the snapshot: not the image's bytes
    assert (helper.fig.pass_pages, helper.fig.pass_bytes) == (res.pass_pages, res.pass_bytes)  # P's report
    assert res.wire_bytes == helper.fig.wire_bytes < 8 * 4096 + len(image) - pfns.size * 4096
    # V's store holds what the pass sent: P's memory at the pass, changed pages included
    later = np.concatenate([pfns[:7], pfns[n_held:]]).astype(np.intp)
    expected = page_hashes(np.fromfile(memory, dtype=np.uint8).reshape(MAX_PFN, 4096)[later])
    assert np.array_equal(store.hashes(0, MAX_PFN)[later], expected)


@pytest.mark.parametrize("fault", ["another migration", "checksum", "pfn beyond V's memory", "not a batch"])
def test_a_bad_pass_batch_is_refused_and_nothing_is_written(tmp_path: Path, fault: str) -> None:
    import socket as socket_mod

    from common import image_wire as W
    from common.pagecodec import encode_wire_batch

    _, pfns, data = make_image(range(100, 200), seed=12)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.5)
    before = store.hashes(0, MAX_PFN)
    receiver = ImageReceiver("mig1", TOKEN, store, RecordingFeed(), tmp_path / "image.bin", accept_timeout_s=30,
                             io_timeout_s=30)
    t, outcome = serve_in_thread(receiver)
    target = np.array([150, 151], dtype=np.uint64) if fault != "pfn beyond V's memory" else \
        np.array([150, MAX_PFN], dtype=np.uint64)
    batch = encode_wire_batch(target, np.full((2, 4096), 9, dtype=np.uint8),
                              migration_id="mig2" if fault == "another migration" else "mig1",
                              stream_id=0, seq=0, round=0, batch_id=1, zstd_level=None)
    body = bytearray(b"".join(bytes(p) for p in batch.parts()))
    if fault == "checksum":
        body[-200] ^= 1  # a byte of the second page
    elif fault == "not a batch":
        body = bytearray(b"\xff" * 64)
    with socket_mod.create_connection(receiver.endpoint, timeout=10) as sock:
        W.send_frame(sock, W.HELLO, json.dumps({"migration_id": "mig1", "token": TOKEN.hex()}).encode())
        assert W.recv_frame(sock)[0] == W.OK
        W.send_frame(sock, W.PASS, body)
        kind, reason = W.recv_frame(sock)
    t.join(30)
    assert kind == W.NACK and "PASS batch refused" in reason.decode() and "PASS" in outcome["error"]
    assert np.array_equal(store.hashes(0, MAX_PFN), before)


def test_compression_policy() -> None:
    from source_agent.image_stream import compress_chunk

    assert compress_chunk("adaptive", network_behind=True) and not compress_chunk("adaptive", network_behind=False)
    # while P's link is down the chunks wait as they are (compressed later, if P's CPU has time)
    assert not compress_chunk("adaptive", network_behind=True, link_up=False)
    assert compress_chunk("always", network_behind=False, link_up=False)
    assert compress_chunk("always", network_behind=False) and not compress_chunk("never", network_behind=True)
    with pytest.raises(ValueError, match="compression must be one of"):
        HelperConfig(migration_id="m", endpoint="h:1", token="00", compression="lz4")


@pytest.mark.parametrize("link_back_after", [0, 3, 300])
def test_chunks_read_while_the_link_is_down_are_compressed_only_once_all_are_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link_back_after: int) -> None:
    """"adaptive": a chunk read while P's link is down waits uncompressed; once every chunk is read,
    the waiting ones are compressed until the link is back. Link back at once: nothing compressed;
    back after the reading (3 more polls): the first few compressed; never back while compressing
    (up 300 polls after the reading, ~1.5 s): all. V gets P's exact image in every case, in order."""
    from source_agent.cutover_helper import Helper

    pfns = np.arange(100, 100 + 6 * 1024, dtype=np.uint64)  # six chunks
    image, pfns, data = make_image(pfns, seed=3)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.0)  # every page travels
    polls: list[int] = []
    reading_done: list[bool] = []

    def link_check(self):  # down while the image is read; up `link_back_after` polls after that
        def up() -> bool:
            if not reading_done:
                return link_back_after == 0
            polls.append(1)
            return len(polls) > link_back_after
        return up

    original = Helper._compress_backlog

    def compress_backlog(self, backlog, spent):
        reading_done.append(True)
        return original(self, backlog, spent)

    monkeypatch.setattr(Helper, "_link_check", link_check)
    monkeypatch.setattr(Helper, "_compress_backlog", compress_backlog)
    feed = RecordingFeed()
    result, helper, _, _, outcome = run_pair(tmp_path, image, store, feed, compression="adaptive")
    assert result == "powered-off" and bytes(feed.data) == image
    compressed = outcome["result"].source_timings["compressed_chunks"]
    assert compressed == {0: 0, 3: 3, 300: 6}[link_back_after]
    assert helper.fig.pages_sent == pfns.size


def test_wrong_token_is_refused_and_p_runs_on(tmp_path: Path) -> None:
    image, pfns, data = make_image(range(10, 50))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    feed = RecordingFeed()
    result, _, snap, block, _outcome = run_pair(tmp_path, image, store, feed, token=b"x" * 32)
    assert result == "aborted"
    assert snap.calls == []  # refused before anything was frozen
    assert block.applied == []
    assert feed.events == []


def test_kernel_mismatch_is_refused_before_freezing(tmp_path: Path) -> None:
    image, pfns, data = make_image(range(10, 50))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    feed = RecordingFeed()
    result, _, snap, _, outcome = run_pair(tmp_path, image, store, feed,
                                           expected=ExpectedKernel("6.1.0-57-amd64", UNAME.version))
    assert result == "aborted" and snap.calls == []
    assert "6.1.0-57-amd64" in outcome["error"]


def test_store_page_that_differs_from_its_hash_fails_the_checksum(tmp_path: Path) -> None:
    image, pfns, data = make_image(range(10, 300), seed=3)
    store = precopied_store(tmp_path, pfns, data, 1.0)
    # the store's data for one PFN rots after its hash was recorded: V would assemble a wrong image
    with open(tmp_path / "memory.img", "r+b") as f:
        f.seek(int(pfns[7]) * 4096)
        f.write(b"\x00" * 16)
    feed = RecordingFeed()
    result, _, snap, block, outcome = run_pair(tmp_path, image, store, feed)
    assert result == "aborted"
    assert snap.calls == ["freeze", "create_image", "free", "unfreeze"]
    assert block.lifted == ["eth0", "p2vbond0"]
    assert "checksum" in outcome["error"]
    assert feed.events[-1] == "abort" and "go" not in feed.events  # what was still queued for the VM is dropped
    assert not (tmp_path / "go.json").exists()  # never marked: a restarted V lets P run on
    assert not (tmp_path / "ack.json").exists()  # refused, never acknowledged


def test_vm_refusing_the_image_aborts_the_cutover(tmp_path: Path) -> None:
    image, pfns, data = make_image(range(10, 300), seed=4)
    store = precopied_store(tmp_path, pfns, data, 0.5)
    feed = RecordingFeed(refuse_at_finish="waiting VM: /dev/snapshot refused page 0: memory size")
    result, _, snap, _block, outcome = run_pair(tmp_path, image, store, feed)
    assert result == "aborted"
    assert snap.calls[-2:] == ["free", "unfreeze"] and "power_off" not in snap.calls
    assert "memory size" in outcome["error"]
    assert feed.events == ["begin", "abort"]


def test_create_image_enomem_unfreezes(tmp_path: Path) -> None:
    image, pfns, data = make_image(range(10, 50))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    feed = RecordingFeed()
    result, _helper, snap, block, outcome = run_pair(
        tmp_path, image, store, feed, snapshot=PlaybackSnapshot(image, create_errno=12))
    assert result == "aborted"
    assert snap.calls == ["freeze", "create_image", "free", "unfreeze"]
    assert block.lifted == ["eth0", "p2vbond0"]
    assert "does not fit in free RAM" in outcome["error"]
    assert snap.image_size_seen == str(1000000 * 1024)
    assert image_size_file(tmp_path).read_text() == "412000000\n"  # P runs on with its own setting
    assert snap.pcp_seen == "100000" and pcp_fraction_file(tmp_path).read_text() == "0\n"


class BuggySnapshot(PlaybackSnapshot):
    def read_pages(self, buffers):  # a bug in P's code path after CREATE_IMAGE, not an I/O error
        raise KeyError("bug")


def test_a_bug_in_the_helper_before_the_ack_still_lets_p_run_on(tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    image, pfns, data = make_image(range(10, 50))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    result, _helper, snap, block, _ = run_pair(tmp_path, image, store, RecordingFeed(),
                                               snapshot=BuggySnapshot(image))
    assert result == "aborted"
    assert snap.calls[-2:] == ["free", "unfreeze"] and block.lifted == ["eth0", "p2vbond0"]
    assert image_size_file(tmp_path).read_text() == "412000000\n"
    said = json.loads([ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert said["outcome"] == "aborted" and "KeyError" in said["reason"]


def test_endless_warm_padding_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common import image_wire

    monkeypatch.setattr(image_wire, "MAX_WARM", 3 << 20)  # the helper sends 16 MiB of it
    image, pfns, data = make_image(range(10, 200))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    feed = RecordingFeed()
    result, _, snap, _, outcome = run_pair(tmp_path, image, store, feed)
    assert result == "aborted"
    assert "WARM padding" in outcome["error"]
    assert feed.events == []  # refused before any image reached the VM
    assert "power_off" not in snap.calls


def test_ack_without_commit_never_starts_the_vm(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    image, pfns, data = make_image(range(10, 200))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    feed = RecordingFeed()
    result, _, snap, _, outcome = run_pair(tmp_path, image, store, feed, rehearse=True)
    assert result == "rehearsed"
    said = json.loads([ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert said["outcome"] == "rehearsed" and said["acked_at"] > said["frozen_at"] > 0  # what the agent reads
    assert snap.calls[-2:] == ["free", "unfreeze"]
    assert "go" not in feed.events and feed.events[-1] == "abort"
    assert "after ACK" in outcome["error"]
    # P's ABORT after the ACK is P's word that it runs on: V may drop its VM (not "undecided")
    got = outcome["receiver"].result
    assert got.acked and not got.committed and got.aborted_after_ack and not undecided(got)


GATE_ACTION = {"name": "await-commit", "args": {"address": 1 << 20, "token": TOKEN.hex(), "migration_id": "mig1"}}


@pytest.mark.parametrize("rehearse", [False, True])
def test_a_gated_resume_lets_v_restore_at_its_ack(tmp_path: Path, rehearse: bool) -> None:
    """P's resume waits at the commit gate: V has the VM restore right after its ACK and releases the
    gate (go) only at P's COMMIT, with the record only the token's holders can make. A rehearsal
    never gates (P aborts after the ACK: the VM must still hold the image, unrestored)."""
    image, pfns, data = make_image(range(10, 300))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    feed = RecordingFeed()
    result, helper, _, _, outcome = run_pair(tmp_path, image, store, feed, rehearse=rehearse,
                                             resume_actions=[GATE_ACTION])
    mark = json.loads((tmp_path / "ack.json").read_text())
    if rehearse:
        assert result == "rehearsed" and not helper.cfg.commit_gated
        assert feed.events == ["begin", "loaded", "abort"] and feed.gate_record is None and "gate" not in mark
        return
    assert result == "powered-off" and helper.cfg.commit_gated
    assert feed.events == ["gate", "begin", "loaded", "restore-ahead", "go"]
    assert feed.gate_record == commit_gate.commit_record(TOKEN, "mig1") != commit_gate.commit_record(TOKEN, "mig2")
    assert mark["gate"] == feed.gate_record.hex()  # a restarted V can still release the gate
    res = outcome["result"]
    assert res.committed and res.acked_at <= res.restored_ahead_at <= res.committed_at


def test_only_an_ack_without_p_s_answer_is_undecided() -> None:
    def result(acked: bool, committed: bool, aborted: bool) -> ReceiveResult:
        return ReceiveResult("m", acked=acked, committed=committed, aborted_after_ack=aborted)

    assert undecided(result(True, False, False))  # COMMIT lost or P gone: P may be off or running
    assert not undecided(result(True, False, True))  # P said ABORT: it runs on
    assert not undecided(result(False, False, False))  # no ACK: P runs on
    assert not undecided(result(True, True, False))  # committed: the VM is P


def test_p_running_on_after_freeze_kicks_its_peers(tmp_path: Path) -> None:
    """The peers' TCP backed off while P was frozen: after an abort (here a rehearsal) P kicks them,
    once unfrozen, as the VM would have; no other resume step runs. Their quotes were noted right
    after the snapshot (not in the image), for the agent should this helper have died."""
    image, pfns, data = make_image(range(10, 200))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    ran: list[tuple[list[str], list[str]]] = []
    note = tmp_path / "run" / "cutover-peers.json"
    note.parent.mkdir()

    def runner(actions):
        ran.append(([a["name"] for a in actions], list(snap.calls)))
        return []

    snap = PlaybackSnapshot(image)
    snap.watch_note = note
    kick = {"name": "kick-peers", "args": {"quotes": ["00"]}}
    actions = [{"name": "adopt-nic", "args": {}}, kick]
    result, _, _, block, _ = run_pair(tmp_path, image, store, RecordingFeed(), snapshot=snap, rehearse=True,
                                      resume_actions=actions, resume_runner=runner, peer_note=str(note))
    assert result == "rehearsed"
    assert len(ran) == 1 and ran[0][0] == ["kick-peers"]
    assert ran[0][1][-2:] == ["free", "unfreeze"]  # after P runs again
    assert block.lifted
    assert snap.note_at_snapshot is False and json.loads(note.read_text()) == {"quotes": ["00"]}


def test_peers_are_kicked_right_after_the_announce() -> None:
    from source_agent.cutover_helper import with_peer_kick

    def names(actions: list[dict]) -> list[str]:
        return [a["name"] for a in actions]

    plan = [{"name": n, "args": {}} for n in ("adopt-nic", "lift-block", "announce", "announce", "fail-md-leg")]
    plan.append({"name": "prune-stale-pci", "args": {}, "late": True})
    kicked = with_peer_kick(plan, ["ab"])
    assert names(kicked) == ["adopt-nic", "lift-block", "announce", "announce", "kick-peers", "fail-md-leg",
                             "prune-stale-pci"]
    assert kicked[4]["args"] == {"quotes": ["ab"]} and names(plan)[4] == "fail-md-leg"  # a new list
    no_announce = with_peer_kick(plan[:2] + plan[5:], ["ab"])
    assert names(no_announce) == ["adopt-nic", "lift-block", "kick-peers", "prune-stale-pci"]
    assert names(with_peer_kick([], ["ab"])) == ["kick-peers"]


def test_resumed_side_runs_actions_then_unfreezes(tmp_path: Path) -> None:
    image, pfns, data = make_image(range(10, 50))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    receiver = ImageReceiver("mig1", TOKEN, store, RecordingFeed(), tmp_path / "i.bin", accept_timeout_s=5)
    host, port = receiver.endpoint
    errors: list[str] = []

    def serve() -> None:
        try:
            receiver.serve()
        except ReceiveError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=serve)
    t.start()
    ran: list[str] = []
    snap = PlaybackSnapshot(image, in_suspend=0)
    cfg = HelperConfig(migration_id="mig1", endpoint=f"{host}:{port}", token=TOKEN.hex(),
                       resume_actions=[{"name": "rescan-pci"}, {"name": "prune-stale-pci", "late": True},
                                       {"name": "lift-block"}],
                       drop_caches_path=str(tmp_path / "drop_caches"),
                       image_size_path=str(image_size_file(tmp_path)), meminfo_path=str(meminfo_file(tmp_path)),
                       pcp_high_fraction_path=str(pcp_fraction_file(tmp_path)),
                       stream_initcwnd=0)  # the host's routes are not the test's (tests/cutover/test_stream_route.py)
    from source_agent import resume

    def runner(actions):
        ran.extend(f"{a['name']}@{snap.calls[-1]}" for a in actions)  # what the snapshot saw last
        return [resume.ActionResult(a["name"], True, "done", 0.0) for a in actions]

    helper = Helper(cfg, snap, np.zeros(0, np.uint64), block=RecordingBlock(), resume_runner=runner,
                    uname=UNAME)  # type: ignore[arg-type]
    assert helper.run() == "resumed"
    # frozen ones first, the late one after UNFREEZE
    assert ran == ["rescan-pci@create_image", "lift-block@create_image", "prune-stale-pci@unfreeze"]
    assert helper.fig.resume_steps[-1].startswith("after unfreeze: prune-stale-pci")
    assert snap.calls == ["freeze", "create_image", "free", "unfreeze"]
    assert image_size_file(tmp_path).read_text() == "412000000\n"  # in the VM too
    receiver.close()
    t.join(10)


def test_resumed_side_stays_frozen_after_a_failed_commit_gate(tmp_path: Path) -> None:
    """In the VM the gate's step failed: the helper never UNFREEZEs (nor FREEs) and holds the OS."""
    image, pfns, data = make_image(range(10, 50))
    store = precopied_store(tmp_path, pfns, data, 0.5)
    receiver = ImageReceiver("mig1", TOKEN, store, RecordingFeed(), tmp_path / "i.bin", accept_timeout_s=5)
    host, port = receiver.endpoint
    t = threading.Thread(target=lambda: _serve_quietly(receiver))
    t.start()
    snap = PlaybackSnapshot(image, in_suspend=0)
    cfg = HelperConfig(migration_id="mig1", endpoint=f"{host}:{port}", token=TOKEN.hex(),
                       resume_actions=[{"name": "await-commit"}, {"name": "lift-block"},
                                       {"name": "prune-stale-pci", "late": True}],
                       drop_caches_path=str(tmp_path / "drop_caches"),
                       image_size_path=str(image_size_file(tmp_path)), meminfo_path=str(meminfo_file(tmp_path)),
                       pcp_high_fraction_path=str(pcp_fraction_file(tmp_path)), stream_initcwnd=0)
    from source_agent import resume

    def runner(actions):  # the real run_resume; the gate fails as a malformed record would make it
        def gate(**_):
            raise ValueError("bad token")
        return resume.run_resume([resume.ResumeAction(a["name"], a.get("args", {})) for a in actions],
                                 {"await-commit": gate, "lift-block": lambda: "lifted",
                                  "prune-stale-pci": lambda: "pruned"})

    class Held(Exception):
        pass

    helper = Helper(cfg, snap, np.zeros(0, np.uint64), block=RecordingBlock(), resume_runner=runner,
                    uname=UNAME)  # type: ignore[arg-type]
    helper._hold_frozen = lambda: (_ for _ in ()).throw(Held())  # type: ignore[method-assign]
    with pytest.raises(Held):
        helper.run()
    assert snap.calls == ["freeze", "create_image"]  # no FREE, no UNFREEZE
    assert helper.fig.resume_steps[0].startswith("await-commit: FAILED")
    assert helper.fig.resume_steps[1] == f"lift-block: FAILED {resume.NOT_RUN} (0 ms)"
    receiver.close()
    t.join(10)


def _serve_quietly(receiver: ImageReceiver) -> None:
    try:
        receiver.serve()
    except ReceiveError:
        pass


def test_outbox_queues_while_the_network_is_down_and_delivers_in_order() -> None:
    import socket as socketmod

    from source_agent.image_stream import Outbox

    a, b = socketmod.socketpair()
    a.settimeout(20)
    frames = [bytes([i]) * (200_000 + i) for i in range(12)]  # ~2.4 MB: far more than the socket buffers
    total = sum(map(len, frames))
    box = Outbox(a, limit=8 << 20)
    t0 = time.monotonic()
    for f in frames:
        box.push([f])
    assert time.monotonic() - t0 < 2.0  # nobody reads yet: queued, not waited for
    assert box.held > 0 and box.waited_s == 0.0
    got = bytearray()

    def read_all() -> None:
        while len(got) < total:
            chunk = b.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    box.flush()
    reader.join(20)
    assert box.held == 0 and bytes(got) == b"".join(frames)
    a.close()
    b.close()


def test_memory_facts_read_before_freeze(tmp_path: Path) -> None:
    import os

    from source_agent.cutover_helper import memory_facts

    (tmp_path / "meminfo").write_text("MemTotal: 983744 kB\nMemFree: 813748 kB\nAnonPages: 48376 kB\n"
                                      "Slab: 19832 kB\nShmem: 84 kB\n")
    for pid, rss in ((os.getpid(), 40960), (os.getppid(), 102400)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "status").write_text(f"Name: python3\nVmRSS:\t  {rss} kB\n")
    facts = memory_facts(str(tmp_path / "meminfo"), str(tmp_path))
    assert facts["mem_free_mib"] == 813748 / 1024 and facts["mem_anon_mib"] == 48376 / 1024
    assert facts["helper_rss_mib"] == 40.0 and facts["agent_rss_mib"] == 100.0
    assert "mem_cached_mib" not in facts  # absent lines stay absent
    # figures only: never raises, and what can be read is kept
    assert memory_facts(str(tmp_path / "nothing"), str(tmp_path)) == {"helper_rss_mib": 40.0, "agent_rss_mib": 100.0}
    assert memory_facts(str(tmp_path / "nothing"), str(tmp_path / "nothing")) == {}


def test_outbox_hands_nothing_to_tcp_before_the_link_is_back() -> None:
    import socket as socketmod

    from source_agent.image_stream import Outbox

    a, b = socketmod.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    link = {"up": False, "polls": 0}

    def link_up() -> bool:
        link["polls"] += 1
        if link["polls"] > 20:  # the link comes back while flush() waits for it
            link["up"] = True
        return link["up"]

    box = Outbox(a, limit=1 << 20, link_up=link_up, poll_s=0.001)
    box.push([b"header", b"x" * 1000])
    assert box.behind() and box.held == 1006 and not box.link_seen_at
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(10)  # nothing reached the socket while the link was down
    b.setblocking(True)
    box.flush()
    assert box.link_seen_at and box.held == 0
    assert b.recv(2000) == b"header" + b"x" * 1000
    a.close()
    b.close()


def test_carrier_check_reads_sysfs(tmp_path: Path) -> None:
    from source_agent.stream_path import carrier_check

    (tmp_path / "p2vbond0").mkdir()
    (tmp_path / "p2vbond0" / "carrier").write_text("0\n")
    up = carrier_check("p2vbond0", root=str(tmp_path))
    assert up is not None and not up()
    (tmp_path / "p2vbond0" / "carrier").write_text("1\n")
    assert up()
    assert not carrier_check("gone0", root=str(tmp_path))()  # type: ignore[misc]  # unreadable = down
    assert carrier_check("") is None


def test_a_pass_v_refuses_aborts_before_the_freeze_with_v_s_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """V's refusal of a PASS batch (its checks: test_a_bad_pass_batch_is_refused_and_nothing_is_written)
    reaches P's operator as V's reason, and P never freezes."""
    image, pfns, data = make_image(range(100, 400), seed=13)
    store = precopied_store(tmp_path, pfns, data, held_fraction=0.2)
    memory = memory_file(tmp_path, pfns, data)

    def refuse(self, payload) -> None:
        raise ReceiveError("PASS batch refused: checksum: a test's refusal")

    monkeypatch.setattr(ImageReceiver, "_pass", refuse)
    feed = RecordingFeed()
    result, _, snap, block, outcome = run_pair(tmp_path, image, store, feed, final_pass_source=f"file:{memory}")
    assert result == "aborted"
    assert "freeze" not in snap.calls and block.lifted == ["eth0", "p2vbond0"]
    assert feed.events == []
    assert "a test's refusal" in outcome["error"]
    said = json.loads(capfd.readouterr().out.strip().splitlines()[-1])  # the helper's last word to its agent
    assert said["reason"] == ("the pass before FREEZE failed: V refused it: "
                              "PASS batch refused: checksum: a test's refusal")
