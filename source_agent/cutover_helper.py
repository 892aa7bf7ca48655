"""The cutover helper: one single-threaded process that takes the snapshot of P and sends it.

The agent forks it (source_agent/cutover.py, HelperProcess) and calls `run` in the child.
Everything else on P gets frozen by SNAPSHOT_FREEZE (the agent and its gRPC threads included), so
this process depends on nothing but its own memory, /dev/snapshot and one plain TCP socket to V's
image receiver, negotiated by the agent beforehand (endpoint + one-time token in the config).

    connect + authenticate  -> block traffic (open) -> the pass: what changed since pre-copy's last
                               round goes to V while P runs (final_pass) -> page-out -> FREEZE
                               -> close the block -> CREATE_IMAGE
    in P  (in_suspend == 1): read the image, send header + PFN metadata + the data pages whose hash
                             differs from V's, END with the image checksum, wait for ACK
                             ACK  -> COMMIT, POWER_OFF (the point of no return has passed)
                             else -> FREE, UNFREEZE, lift the block: P runs on as before
    in the VM (in_suspend == 0): resume actions while everything is still frozen, UNFREEZE (never
                             after a failed commit gate: "halted", the OS stays frozen)

Its parts, each a module: the kernel's interface (snapshot_device), the image's reading and queueing
(image_stream), V's hashes around the snapshot (dedup_tables), the network path's settings
(stream_path); this module runs them in order.

The outcome is one JSON line on stdout ("aborted" / "resumed"; a powered-off P prints nothing
after "committed").
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from common import commit_gate, faults
from common import image_wire as W
from common.heap import hold_freed_memory, trim_heap
from common.hibernate_image import (
    PAGE_SIZE,
    meta_pages_for,
    parse_header,
    parse_pfns,
    plan_dedup,
)
from common.net_route import HostRoute
from common.pagecodec import hash_page_views, new_checksum
from common.procfs import stat_counters, status_kib
from source_agent import peer_kick, resume, traffic_block
from source_agent.dedup_tables import DedupTables, discard_stash
from source_agent.final_pass import final_pass
from source_agent.host_settings import (
    PendingError,
    clear_pending,
    commit_note,
    swap_sysctl,
    write_commit_note,
    write_peer_note,
)
from source_agent.image_stream import COMPRESSION_MODES, CutoverAborted, Outbox, PageReader, compress_chunk
from source_agent.link_cycle import LinkCycle, nics_to_cycle, path_nics
from source_agent.memory import MemorySourceError, open_memory_source
from source_agent.page_out import page_out
from source_agent.snapshot_device import Snapshot, SnapshotDevice
from source_agent.stream_path import (
    SO_SNDBUFFORCE,
    PinnedNeighbour,
    carrier_check,
    egress_interface,
    hold_bond_slaves,
    narrow_route,
    pin_neighbour,
    release_bond_slaves,
    tcp_figures,
    unacknowledged,
    unpin_neighbour,
    widen_route,
)

NBD_CLEAR_SOCK = 0xAB04  # _IO(0xab, 4), linux/nbd.h


def stream_cpu(before: dict[str, float], after: dict[str, float], self_before: resource.struct_rusage,
               self_after: resource.struct_rusage) -> dict[str, float]:
    """Where P's CPU went while it streamed the image: the whole machine's states (cpu_*), its
    interrupts and network softirqs (counts), and this process's own user and system time
    (helper_*). What the machine spent beyond the helper is the kernel's work for others. The
    tick cannot land in a hard interrupt handler, so their time shows in whatever ran. Pure."""
    out = {f"cpu_{k}": after[k] - before[k] for k in ("user", "system", "irq", "softirq", "idle") if k in before}
    out.update({k: after[k] - before[k] for k in ("interrupts", "net_rx", "net_tx") if k in before and k in after})
    out["helper_user"] = self_after.ru_utime - self_before.ru_utime
    out["helper_system"] = self_after.ru_stime - self_before.ru_stime
    return out


def release_network_legs(devices: list[str]) -> list[str]:
    """After COMMIT: cut P's NBD legs loose (NBD_CLEAR_SOCK), so that P's requests to V fail at once.
    The traffic block drops them (V and the VM must never see P's late writes), and md's shutdown,
    which writes superblocks, would otherwise wait for the cutover's long request timeout. The
    socket's FIN is dropped by the block too: V's end stays the VM's. Best effort; returns what failed."""
    failed = []
    for name in devices:
        try:
            fd = os.open(f"/dev/{name}", os.O_RDWR)
            try:
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)
            finally:
                os.close(fd)
        except OSError as exc:
            failed.append(f"{name}: {exc}")
    return failed


# --- configuration -------------------------------------------------------------------------------



def refusal(sock: socket.socket, exc: OSError) -> str:
    """V's NACK reason when it refused what P sent and closed the socket, else the socket's error."""
    try:
        sock.settimeout(2.0)
        kind, payload = W.recv_frame(sock, max_payload=1 << 16)
    except (OSError, W.WireError):
        return str(exc)
    return f"V refused it: {bytes(payload).decode(errors='replace')}" if kind == W.NACK else str(exc)


@dataclass
class HelperConfig:
    migration_id: str
    endpoint: str  # host:port of V's image socket
    token: str  # hex
    block_interfaces: list[str] = field(default_factory=list)
    resume_actions: list[dict[str, Any]] = field(default_factory=list)
    snapshot_device: str = "/dev/snapshot"
    connect_timeout_s: float = 15.0
    ack_timeout_s: float = 120.0
    #: P's NBD devices (md's network legs): cut loose after COMMIT, before power-off
    network_legs: list[str] = field(default_factory=list)
    #: rehearsal: after ACK do not power off; send ABORT, unfreeze and run on (p2vctl migrate --rehearse)
    rehearse: bool = False
    #: zstd level for the pages that travel (0 = uncompressed)
    zstd_level: int = 1
    #: "adaptive": compress a chunk only while the network is slower than P's CPU, or while P's NIC
    #: is still coming back after CREATE_IMAGE once every chunk is read (compress_chunk); "always";
    #: "never". In the rig's P under TCG zstd-1 runs at 66 MiB/s and TCP at 81 MiB/s: compressing a
    #: chunk the network would take at once costs more than it saves.
    compression: str = "adaptive"
    #: sync and drop clean caches just before FREEZE: while P still runs, so the image (which every
    #: later step, the VM's load included, scales with) loses the page cache the VM can re-read
    drop_caches: bool = True
    drop_caches_path: str = "/proc/sys/vm/drop_caches"
    #: raised to all of RAM for the snapshot: below the image's size the kernel first preallocates
    #: every free page to squeeze memory (several times the work, inside the downtime); the old
    #: value comes back when P runs on, and in the VM
    image_size_path: str = "/sys/power/image_size"
    #: The kernel counts the pages on its per-CPU free lists as in use when it preallocates the
    #: image's copies (it drains them only before the copy), and zeroes every page it preallocates:
    #: the rig's P had 6-14k pages there at FREEZE (its one CPU's lists may hold 13 856), preallocated
    #: 64-68k pages for 54k copied, CREATE_IMAGE 1.10-1.20 s. With the lists kept short from the
    #: helper's start (percpu_pagelist_high_fraction = this; each free beyond it goes back to the
    #: buddy lists): 54.3k preallocated, CREATE_IMAGE 0.43-0.61 s. 0 = leave it alone.
    pcp_high_fraction: int = 100_000
    pcp_high_fraction_path: str = "/proc/sys/vm/percpu_pagelist_high_fraction"
    meminfo_path: str = "/proc/meminfo"
    sys_class_net: str = "/sys/class/net"
    #: capture the peers' dropped segments and kick their retransmission timers after the move
    kick_peers: bool = True
    #: the agent's note of this cutover (host_settings): removed once the helper has ended it
    pending_file: str = ""
    #: the agent's pid: its private file pages (gRPC, OpenSSL, ...) leave P's memory right before
    #: FREEZE, so that the image does not carry them (page_out); 0 = none
    agent_pid: int = 0
    #: take P's NIC down after FREEZE and up when its PHY has link after CREATE_IMAGE (link_cycle)
    cycle_links: bool = True
    #: WARM padding sent (and acknowledged) before the snapshot, so that V's receive window is
    #: open when the image follows (0 = none)
    warm_bytes: int = 16 << 20
    #: P's route to V for the cutover: TCP may send this many segments at once after the idle
    #: snapshot, and retransmits nothing for this long (the rig's e1000 hears no acknowledgement for
    #: 1 s after it is brought up); 0 = leave the route alone
    stream_initcwnd: int = 40_000
    stream_rto_min_ms: int = 1_500
    #: P's send buffer for the image (root only beyond net.core.wmem_max), so that several
    #: megabytes of the image go to TCP before V's first acknowledgement gets through (64 MiB
    #: measured no better in the rig: sending then costs P CPU while it still reads and hashes)
    stream_sndbuf: int = 16 << 20
    #: when the agent's pre-copy ended (time.time(); 0 = unknown): pages changed since then travel
    #: in the downtime, so the figures say how long P ran on after it
    precopy_ended_at: float = 0.0
    #: the agent's steps from pre-copy's end to the hand-over (seconds), for the figures
    agent_setup: dict[str, float] = field(default_factory=dict)
    #: the memory source pre-copy read ("kcore", ...) for the pass right before FREEZE (final_pass);
    #: "" = no pass (V does not take PASS frames, or the operator turned it off)
    final_pass_source: str = ""
    #: a file on disk (not tmpfs) that holds the dedup tables (V's hash per PFN and the sorted set of
    #: them) from just before FREEZE until CREATE_IMAGE has returned: out of P's memory meanwhile, so
    #: that the image does not carry them (DedupTables); "" = they stay in memory
    dedup_stash: str = ""
    #: where the peers' quotes are noted right after the snapshot (tmpfs; host_settings.PEER_NOTE_FILE):
    #: should this helper die, whoever puts P back kicks them as the helper's abort would; "" = no note
    peer_note: str = ""

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSION_MODES:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSION_MODES)}, not {self.compression!r}")

    @property
    def commit_gated(self) -> bool:
        """The resume waits at the commit gate (common/commit_gate.py): then, and only then, V may
        restore the image before P's COMMIT reaches it. Never in a rehearsal (P aborts after the ACK)."""
        return not self.rehearse and any(a.get("name") == "await-commit" for a in self.resume_actions)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.endpoint.rpartition(":")
        return host, int(port)


@dataclass
class Figures:
    blocked_at: float = 0.0  # P's peers hear nothing from here on (the block closed, after FREEZE)
    frozen_at: float = 0.0
    freeze_s: float = 0.0  # SNAPSHOT_FREEZE itself (sync, then every task frozen)
    image_created_at: float = 0.0
    image_bytes: int = 0
    image_pages: int = 0
    pages_sent: int = 0
    pages_skipped: int = 0
    pages_by_hash: int = 0  # V holds their content at another PFN: sent as hashes
    wire_bytes: int = 0
    pass_pages: int = 0  # sent by the pass before FREEZE (final_pass), while P ran
    pass_bytes: int = 0  # their bytes on the image socket (not in wire_bytes)
    sent_at: float = 0.0
    acked_at: float = 0.0
    drop_caches_s: float = 0.0
    warm_s: float = 0.0
    resumed_at: float = 0.0
    unfrozen_at: float = 0.0
    resume_steps: list[str] = field(default_factory=list)
    peer_packets: int = 0  # TCP segments with peers the capture saw from the block to the snapshot
    peer_flows: int = 0  # connections whose peer waits on an unacknowledged segment


def fault_point(point: str) -> None:
    """SIGKILL ourselves here when $P2V_FAULT is "helper-killed-<point>", and our agent (the parent)
    first when it is "agent-and-helper-killed-<point>": a helper killed mid-cutover (the OOM killer,
    an admin) is how the rig tests the agent's safety net, both killed how it tests the next
    agent's (host_settings.recover_interrupted_cutover). Nothing happens otherwise."""
    fault = faults.requested(f"helper-killed-{point}", f"agent-and-helper-killed-{point}")
    if not fault:
        return
    with_agent = fault.startswith("agent-")
    print(f"cutover helper: {faults.FAULT_ENV}={fault}: killing {'the agent and ' if with_agent else ''}myself",
          file=sys.stderr, flush=True)
    if with_agent:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def emit(outcome: str, figures: Figures, **extra: Any) -> None:
    line = json.dumps({"outcome": outcome, **figures.__dict__, **extra})
    os.write(1, line.encode() + b"\n")


def with_peer_kick(actions: list[dict[str, Any]], quotes: list[str]) -> list[dict[str, Any]]:
    """The resume steps with kick-peers right after the last announce (the VM's path to the peers
    must be back first; nothing after it is worth the peers' wait), else after the last step before
    UNFREEZE. Pure."""
    kick = {"name": "kick-peers", "args": {"quotes": list(quotes)}}
    now = [i for i, a in enumerate(actions) if not a.get("late")]
    announced = [i for i in now if actions[i].get("name") == "announce"]
    at = (announced or now or [-1])[-1] + 1
    return [*actions[:at], kick, *actions[at:]]


def memory_facts(meminfo: str = "/proc/meminfo", proc: str = "/proc") -> dict[str, float]:
    """What the image will be made of, in MiB, read just before FREEZE: the image holds every page
    in use, so the agent's and the helper's own memory is downtime (V keeps these figures)."""
    out: dict[str, float] = {}
    wanted = {"MemTotal": "mem_total_mib", "MemFree": "mem_free_mib", "AnonPages": "mem_anon_mib",
              "Slab": "mem_slab_mib", "Cached": "mem_cached_mib", "Shmem": "mem_shmem_mib"}
    try:
        with open(meminfo) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in wanted:
                    out[wanted[key]] = int(rest.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass  # figures only
    for name, pid in (("helper", os.getpid()), ("agent", os.getppid())):
        rss = status_kib(pid, "VmRSS", proc)
        if rss is not None:
            out[f"{name}_rss_mib"] = rss / 1024
        try:  # what is the process's own: the forked helper shares the rest with the agent
            with open(f"{proc}/{pid}/smaps_rollup") as f:
                own = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Dirty:", "Private_Clean:")))
            out[f"{name}_private_mib"] = own / 1024
        except (OSError, ValueError, IndexError):
            pass
    return out


# --- the helper -----------------------------------------------------------------------------------

class Helper:
    def __init__(self, cfg: HelperConfig, snapshot: Snapshot, held: np.ndarray,
                 block: Any = traffic_block, resume_runner: Any = None, uname: os.uname_result | None = None
                 ) -> None:
        self.cfg = cfg
        self.snap = snapshot
        self.dedup = DedupTables(held)  # before FREEZE: a sort of every hash V holds
        self.block = block
        self.mark: Callable[[str], None] = lambda text: None  # the kernel log's, once in the VM
        self.resume_runner = resume_runner or (lambda actions: resume.run_resume(
            [resume.ResumeAction(a["name"], a.get("args", {}), a.get("late", False)) for a in actions],
            mark=self.mark))
        self.uname = uname or os.uname()
        self.fig = Figures()
        self.sock: socket.socket | None = None
        self.outbox: Outbox | None = None
        self.blocked: list[str] = []
        self.frozen = False
        self.compressor = zstandard.ZstdCompressor(level=cfg.zstd_level) if cfg.zstd_level else None
        self.memory: dict[str, float] = {}
        self.major_faults_at_freeze = 0
        self.saved_image_size = ""
        self.saved_pcp_fraction = ""
        self.stream_route: HostRoute | None = None
        self.egress = ""  # the interface the image stream leaves by ("" = unknown: no link gate)
        self.pinned: PinnedNeighbour | None = None
        self.reader: PageReader | None = None
        self.bond_hold: dict[str, dict[str, str]] = {}
        self.capture: socket.socket | None = None
        self.peer_waits = peer_kick.PeerWaits()
        self.local_ips: frozenset[str] = frozenset()
        self.cycle: LinkCycle | None = None
        self.commit_note: bytes | None = None

    def run(self) -> str:
        """'aborted' (P runs on), 'resumed' (we are in the VM), 'rehearsed'; power-off never returns."""
        try:
            self._prepare_commit_note()
            self._shorten_free_lists()  # first: the frees from here to FREEZE then drain them
            self._connect()
            if self.cfg.drop_caches:
                self._drop_caches()
            host, port = self.cfg.host_port
            if self.cfg.block_interfaces:
                self._start_capture(host)  # first: P's last acknowledgements are what it is after
                self.blocked = self.block.apply(self.cfg.block_interfaces, host, port)  # open until tighten
            if self.cfg.agent_pid:  # the code the cutover runs from here on, mapped before the pass sees memory
                self._warm_stream_code()
                self._warm_commit_gate()
            self._final_pass()
            self.dedup.update_content()  # V's hashes as the pass left them (sorted once, here)
            self._page_out_agent()
            self.bond_hold = hold_bond_slaves(self.cfg.block_interfaces, self.cfg.sys_class_net)
            if self.cfg.cycle_links and self.egress:
                self.cycle = LinkCycle(nics_to_cycle(path_nics(self.egress, self.cfg.sys_class_net)))
            # last: what this process freed since the fork (its setup's temporaries, the netlink
            # sockets' buffers of the block and the link cycle) leaves the image
            self._stash_dedup_tables()
            trim_heap()
            self.memory.update(memory_facts(self.cfg.meminfo_path))
            self._raise_image_size()  # from memory_facts' MemTotal
            self.major_faults_at_freeze = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            t_freeze = time.monotonic()
            self.snap.freeze()
            self.frozen = True
            self.fig.frozen_at = time.time()
            self.fig.freeze_s = time.monotonic() - t_freeze
            if self.blocked:
                self.block.tighten(self.blocked)  # from now on P acknowledges nothing but the image stream
                self.fig.blocked_at = time.time()
            if self.cycle is not None:
                self.cycle.take_down()  # after FREEZE's sync: md's network leg needs the link for it
            self._collect_peer_heads()
            in_suspend = self._create_image()
            if not in_suspend:
                return self._resumed()
            self._note_peers()
            fault_point("after-image")  # P frozen, traffic blocked, its NIC down
            self.fig.image_created_at = time.time()
            self.dedup.prefetch()  # read back when the first chunk is planned (_encode_chunk)
            self._send_image()
            self._await_ack()
        except Exception as exc:  # a bug too: before the ACK, whatever goes wrong, P runs on
            if self.fig.resumed_at:
                raise  # in the VM: there is no P to go back to
            expected = (CutoverAborted, OSError, W.WireError, ValueError, RuntimeError)
            self._abort(str(exc) if isinstance(exc, expected) else f"cutover helper error: {exc!r}")
            return "aborted"
        if self.cfg.rehearse:
            self._abort("rehearsal: not powering off", outcome="rehearsed")
            return "rehearsed"
        self._commit_and_power_off()
        return "powered-off"  # only a test double's power_off returns

    # -- steps ---------------------------------------------------------------------------------------
    def _connect(self) -> None:
        host, port = self.cfg.host_port
        if self.cfg.stream_initcwnd > 0:  # before connecting: the socket takes its route's metrics then
            self.stream_route = widen_route(host, self.cfg.stream_initcwnd, self.cfg.stream_rto_min_ms)
        try:
            self.sock = socket.create_connection((host, port), timeout=self.cfg.connect_timeout_s)
        except OSError as exc:
            raise CutoverAborted(f"cannot reach V's image socket {self.cfg.endpoint}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.cfg.ack_timeout_s)
        self.egress = egress_interface(host)
        self.pinned = pin_neighbour(host, self.egress)
        hello = {"migration_id": self.cfg.migration_id, "token": self.cfg.token,
                 "release": self.uname.release, "version": self.uname.version,
                 # the resume waits at the commit gate: V may restore the image at its ACK
                 "gate": self.cfg.commit_gated}
        W.send_frame(self.sock, W.HELLO, json.dumps(hello).encode())
        kind, payload = W.recv_frame(self.sock, max_payload=1 << 16)
        if kind != W.OK:
            raise CutoverAborted(f"V refused the helper: {bytes(payload).decode(errors='replace')}")
        if self.cfg.warm_bytes > 0:
            self._warm_stream()

    def _warm_stream(self, settle_s: float = 5.0) -> None:
        """Open V's receive window before the snapshot. After CREATE_IMAGE the rig's e1000 receives
        nothing for 1 s (link_cycle): what P may send without an acknowledgement is then all it
        sends. V's window starts at 10 segments and grows only with data received: WARM padding
        grows it (P's side: the route's initcwnd, widen_route, and a large send buffer). Waits
        (bounded) until V has acknowledged all of it: nothing of it may be in flight when the link
        goes down."""
        assert self.sock is not None
        t0 = time.monotonic()
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self.cfg.stream_sndbuf)
        except OSError:
            pass  # not root (tests): the kernel's own send buffer sizing applies
        pad = memoryview(bytes(min(self.cfg.warm_bytes, 1 << 20)))
        left = self.cfg.warm_bytes
        while left > 0:
            part = pad[:min(left, pad.nbytes)]
            W.send_frame(self.sock, W.WARM, part)
            left -= part.nbytes
        deadline = time.monotonic() + settle_s
        while unacknowledged(self.sock) and time.monotonic() < deadline:
            time.sleep(0.002)
        self.fig.warm_s = time.monotonic() - t0

    def _start_capture(self, v_host: str) -> None:
        """Watch P's last acknowledgements and the peers' segments the block drops (peer_kick);
        optional. Read now and then so that V's bulk traffic cannot fill it meanwhile."""
        if not self.cfg.kick_peers:
            return
        try:
            self.local_ips = peer_kick.local_ipv4_addresses()
            self.capture = peer_kick.open_capture(exclude_ip=v_host)
        except OSError as exc:
            print(f"cutover helper: no peer capture: {exc}", file=sys.stderr, flush=True)

    def _note_peers(self) -> None:
        """The quotes of kick-peers, for whoever puts P back should this process die (host_settings
        .kick_noted_peers). After the snapshot: the VM has no such note. tmpfs: nothing waits on a
        disk or its journal while everything is frozen. Never raises."""
        quotes = [q for a in self.cfg.resume_actions if a.get("name") == "kick-peers" for q in a["args"]["quotes"]]
        if not (self.cfg.peer_note and quotes):
            return
        try:
            write_peer_note(self.cfg.peer_note, quotes)
        except OSError as exc:
            print(f"cutover helper: no note of the peers: {exc}", file=sys.stderr, flush=True)

    def _collect_peer_heads(self) -> None:
        """Right before the snapshot: what the peers are waiting on becomes a resume step."""
        if self.capture is None:
            return
        try:
            self.fig.peer_packets += peer_kick.drain(self.capture, self.peer_waits, self.local_ips)
        except OSError as exc:
            print(f"cutover helper: peer capture: {exc}", file=sys.stderr, flush=True)
        finally:
            self.capture.close()
            self.capture = None
        quotes = self.peer_waits.quotes()
        self.fig.peer_flows = len(quotes)
        if quotes:
            self.cfg.resume_actions = with_peer_kick(self.cfg.resume_actions, [q.hex() for q in quotes])

    def _drop_caches(self) -> None:
        t0 = time.monotonic()
        os.sync()  # FREEZE syncs too, inside the downtime: what is written now is not written then
        try:
            with open(self.cfg.drop_caches_path, "w") as f:
                f.write("3\n")
        except OSError as exc:  # an optimisation only: the image is just larger
            print(f"cutover helper: cannot drop caches: {exc}", file=sys.stderr, flush=True)
        self.fig.drop_caches_s = time.monotonic() - t0

    def _final_pass(self) -> None:
        """The pages changed since pre-copy's last round go to V now, while P runs (final_pass).
        Before the agent's page-out: after it, the pass's own code (numpy's, mapped only by the agent
        until then) comes back from disk (rig: pass 5.4-5.9 s instead of 2.7-3.2 s, for ~0.9k fewer
        pages left to the image)."""
        if not self.cfg.final_pass_source:
            return
        assert self.sock is not None
        sock = self.sock
        try:
            memory = open_memory_source(self.cfg.final_pass_source)
        except (OSError, ValueError) as exc:  # an optimisation only: the image carries these pages then
            print(f"cutover helper: no pass before FREEZE: {exc}", file=sys.stderr, flush=True)
            return

        def send(batch: Any) -> None:
            self.fig.pass_bytes += W.send_frame(sock, W.PASS, *batch.parts())

        try:
            try:
                figures = final_pass(memory, self.dedup.held, send, self.cfg.migration_id)
            except MemorySourceError as exc:  # what was sent is in held: the image carries the rest
                print(f"cutover helper: the pass before FREEZE stopped: {exc}", file=sys.stderr, flush=True)
                figures = None
            W.send_frame(sock, W.PASSED)
        except OSError as exc:  # V refused a batch and closed: its reason says more than the socket's error
            raise CutoverAborted(f"the pass before FREEZE failed: {refusal(sock, exc)}") from None
        finally:
            memory.close()
        if figures is not None:
            self.fig.pass_pages = figures.pages
            self.memory.update(figures.as_dict())

    def _stash_dedup_tables(self) -> None:
        if not self.cfg.dedup_stash:
            return
        t0 = time.monotonic()
        try:
            self.dedup.stash(self.cfg.dedup_stash)
        except OSError as exc:  # an optimisation only: the image carries them then
            discard_stash(self.cfg.dedup_stash)
            print(f"cutover helper: the dedup tables stay in memory: {exc}", file=sys.stderr, flush=True)
            return
        self.memory["stash_s"] = time.monotonic() - t0

    def _unstash_dedup_tables(self) -> None:
        t0 = time.monotonic()
        try:
            self.dedup.unstash()
        except OSError as exc:
            raise CutoverAborted(f"cannot read the dedup tables back: {exc}") from None
        self.memory["unstash_s"] = time.monotonic() - t0

    def _page_out_agent(self) -> None:
        if not self.cfg.agent_pid:
            return
        t0 = time.monotonic()
        res = page_out(self.cfg.agent_pid)
        if res.error:
            print(f"cutover helper: the agent's file pages stay in the image: {res.error}", file=sys.stderr, flush=True)
            return
        self.memory["page_out_s"] = time.monotonic() - t0
        self.memory["agent_paged_out_mib"] = res.released_mib

    def _raise_image_size(self) -> None:
        total_kib = self.memory.get("mem_total_mib", 0.0) * 1024
        if total_kib <= 0:  # unknown: 0 would make the kernel squeeze memory inside the downtime
            return
        self.saved_image_size = swap_sysctl(self.cfg.image_size_path, str(int(total_kib) * 1024))

    def _shorten_free_lists(self) -> None:
        if self.cfg.pcp_high_fraction > 0:
            self.saved_pcp_fraction = swap_sysctl(self.cfg.pcp_high_fraction_path, str(self.cfg.pcp_high_fraction))

    def _undo_settings(self) -> None:
        """What the cutover set for the snapshot goes back, P running on or in the VM (V's MAC is the
        same seen from the VM; there the physical slave, down since the snapshot, is then dropped by
        its bond and removed after UNFREEZE). Never raises."""
        if self.saved_image_size:
            swap_sysctl(self.cfg.image_size_path, self.saved_image_size)
        if self.saved_pcp_fraction:
            swap_sysctl(self.cfg.pcp_high_fraction_path, self.saved_pcp_fraction)
        narrow_route(self.stream_route)
        unpin_neighbour(self.pinned)
        release_bond_slaves(self.bond_hold, self.cfg.sys_class_net)

    def _create_image(self) -> int:
        try:
            return self.snap.create_image()
        except OSError as exc:
            hint = " (the image does not fit in free RAM)" if exc.errno == 12 else ""
            raise CutoverAborted(f"CREATE_IMAGE failed: {exc}{hint}") from None

    def _read_pages(self, count: int) -> memoryview:
        """The next `count` pages of the image, in a buffer reused by the next call."""
        if self.reader is None or self.reader.capacity < count:
            self.reader = PageReader(self.snap, max(count, W.CHUNK_PAGES))
        return self.reader.read(count)

    def _send(self, kind: bytes, *parts: bytes | bytearray | memoryview) -> None:
        assert self.outbox is not None
        self.fig.wire_bytes += self.outbox.push(W.frame(kind, *parts))

    def _link_check(self) -> Callable[[], bool] | None:
        """The outbox's "is the link back": the cycled NICs brought up once their PHY has link,
        then carrier on the egress (and a lower device)."""
        carrier = carrier_check(self.egress, self.cfg.sys_class_net)
        cycle = self.cycle
        if cycle is None or not cycle.down:
            return carrier

        def link_up() -> bool:
            return cycle.poll() and (carrier is None or carrier())

        return link_up

    def _encode_chunk(self, first: int, pfns: np.ndarray, data: memoryview, views: list[memoryview], whole: Any,
                      compress: Callable[[], bool], spent: dict[str, float]
                      ) -> tuple[bytes, bytes, bytes | np.ndarray, Any]:
        """One chunk of data pages as (frame kind, chunk head, literal pages, dedup plan): hashed (into
        `whole` too), planned against V's hashes, its literal pages compressed if `compress()`.
        Adds its seconds to spent["hash"] and spent["compress"]."""
        t0 = time.monotonic()
        count = len(views)
        hashes = hash_page_views(views)
        whole.update(W.page_hash_bytes(hashes))
        plan = plan_dedup(pfns, hashes, self.dedup.held, self.dedup.content)
        pages = np.frombuffer(data, dtype=np.uint8).reshape(count, PAGE_SIZE)
        flags = plan.send.astype(np.uint8)  # W.PAGE_FOLLOWS or W.PAGE_HELD
        refs = b""
        if plan.by_hash_pages:
            assert plan.by_hash is not None
            flags[plan.by_hash] = W.PAGE_BY_HASH
            refs = W.page_hash_bytes(hashes[plan.by_hash])
        literal: bytes | np.ndarray = pages[plan.send]  # one copy, contiguous
        t1 = time.monotonic()
        kind = W.CHUNK
        if self.compressor is not None and literal.size and compress():
            literal, kind = self.compressor.compress(literal), W.ZCHUNK
        spent["hash"] = spent.get("hash", 0.0) + t1 - t0
        spent["compress"] = spent.get("compress", 0.0) + time.monotonic() - t1
        return kind, W.CHUNK_HEAD.pack(first, count) + flags.tobytes() + refs, literal, plan

    def _warm_stream_code(self, pages: int = 16) -> None:
        """Run the stream's per-chunk steps on a few scratch pages (noise, zeros, and pages that
        compress like memory does) before the agent's file pages go (page_out): the code they run
        (numpy, xxhash, zstd) is then mapped by this process too and the kernel leaves it. Else the
        helper reads it back from disk while P is frozen (measured on the rig: 14 reads, ~450 pages,
        inside the stream; 3 after a warm-up of two pages). Both of plan_dedup's paths are taken.
        Before the pass before FREEZE: the pages the warm-up brings in then reach V in that pass."""
        # os.urandom, not numpy.random: its generators run code from ~400 pages of its modules that
        # nothing had touched before (rig: 380-480 pages sent literally in the image)
        like_memory = np.tile(np.frombuffer(os.urandom(64), dtype=np.uint8), PAGE_SIZE // 64 * (pages - 2))
        like_memory[::97] = np.frombuffer(os.urandom(like_memory[::97].size), dtype=np.uint8)
        scratch = bytearray(os.urandom(PAGE_SIZE)) + bytearray(PAGE_SIZE) + bytearray(like_memory.tobytes())
        view = memoryview(scratch)
        views = [view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(pages)]
        beyond = len(self.dedup.held)  # PFNs V cannot hold
        for pfns in (np.arange(pages, dtype=np.uint64), np.arange(pages, dtype=np.uint64) + beyond):
            self._encode_chunk(0, pfns, view, views, new_checksum(), lambda: True, {})
        W.frame(W.CHUNK, b"", bytes(PAGE_SIZE))

    def _warm_commit_gate(self) -> None:
        """Run the commit gate's code (resume.await_commit: OpenSSL's SHA-256, mmap, the poll) before
        the agent's file pages go, for the reason _warm_stream_code gives: in the VM, a page of it
        read back from disk waited for the ATA error handling of P's vanished disk (rig: the gate
        took 4.9 s for a record that was there after 0.03 s)."""
        if not self.cfg.commit_gated:
            return
        commit_gate.commit_record(bytes(32), "warm-up")
        bytes.fromhex("00")
        memory = commit_gate.map_physical(0, "/dev/zero")
        try:
            commit_gate.await_record(memory, bytes(commit_gate.RECORD_BYTES), timeout_s=0.01)
            try:
                commit_gate.await_record(memory, b"\1" * commit_gate.RECORD_BYTES, timeout_s=0.005)
            except TimeoutError:
                pass  # the poll's sleeping path, run once
        finally:
            memory.close()

    def _send_image(self) -> None:
        assert self.sock is not None
        self.outbox = Outbox(self.sock, link_up=self._link_check())
        whole = new_checksum()
        spent = {"read": 0.0, "hash": 0.0, "compress": 0.0, "send": 0.0}
        compressed = 0
        t_start = time.monotonic()
        cpu_at_start, self_at_start = stat_counters(), resource.getrusage(resource.RUSAGE_SELF)
        tcp_at_start = tcp_figures(self.sock)
        head = bytes(self._read_pages(1))  # copies: the reader reuses its buffer, the outbox keeps these
        header = parse_header(head)
        meta = bytes(self._read_pages(meta_pages_for(header.image_pages)))
        pfns = parse_pfns(meta, header.image_pages)
        self.fig.image_bytes, self.fig.image_pages = header.size, header.image_pages
        whole.update(head)
        whole.update(meta)
        self._send(W.HEADER, head, meta)
        spent["header"] = time.monotonic() - t_start
        # the image checksum covers the data pages through their hashes (image_wire): one pass
        backlog: list[list[Any]] = []  # [kind, head, literal] of chunks read while P's link is down
        backlog_bytes = 0
        for first in range(0, header.image_pages, W.CHUNK_PAGES):
            count = min(W.CHUNK_PAGES, header.image_pages - first)
            t0 = time.monotonic()
            data = self._read_pages(count)
            t1 = time.monotonic()
            if self.dedup.stashed:  # the first chunk's plan needs them: as late as can be (DedupTables.prefetch)
                self._unstash_dedup_tables()
            assert self.reader is not None
            link_up = self.outbox.link_ready()
            kind, head, literal, plan = self._encode_chunk(
                first, pfns[first:first + count], data, self.reader.pages[:count], whole,
                lambda up=link_up: compress_chunk(self.cfg.compression, self.outbox.behind(), up), spent)
            t2 = time.monotonic()
            compressed += kind == W.ZCHUNK
            backlog.append([kind, head, literal])
            backlog_bytes += len(head) + memoryview(literal).nbytes
            if link_up or backlog_bytes > self.outbox.limit:  # else it waits: maybe compressed later
                self._send_backlog(backlog)
                backlog_bytes = 0
            spent["read"] += t1 - t0
            spent["send"] += time.monotonic() - t2
            self.fig.pages_sent += plan.sent_pages
            self.fig.pages_skipped += plan.skipped_pages
            self.fig.pages_by_hash += plan.by_hash_pages
        compressed += self._compress_backlog(backlog, spent)
        t2 = time.monotonic()
        self._send_backlog(backlog)
        spent["send"] += time.monotonic() - t2
        # where P's time went (P powers off: V keeps these figures)
        spent["total"] = time.monotonic() - t_start
        spent["create_image"] = self.fig.image_created_at - self.fig.frozen_at
        spent["drop_caches"] = self.fig.drop_caches_s
        spent["warm"] = self.fig.warm_s
        spent["freeze"] = self.fig.freeze_s
        if self.cfg.precopy_ended_at:
            spent["precopy_to_freeze"] = self.fig.frozen_at - self.cfg.precopy_ended_at
        spent.update({f"agent_{step}": s for step, s in self.cfg.agent_setup.items()})
        if self.fig.blocked_at:
            spent["frozen_to_blocked"] = self.fig.blocked_at - self.fig.frozen_at
        spent["waited_for_network"] = self.outbox.waited_s  # so far: the flush below is not counted
        if self.outbox.link_seen_at:  # after CREATE_IMAGE, as P saw its egress link come back
            spent["link_back"] = self.outbox.link_seen_at - t_start
        if self.cycle is not None and self.cycle.down:
            spent["nic_down"] = self.cycle.down_s
            if self.cycle.raised:
                spent["nic_up"] = max(self.cycle.raised.values()) - t_start
        spent["compressed_chunks"] = compressed
        tcp_now = tcp_figures(self.sock)
        spent.update({f"tcp_{k}_start": tcp_at_start[k] for k in ("snd_cwnd", "snd_wnd", "unacked")
                      if k in tcp_at_start})
        spent.update({f"tcp_{k}": tcp_now[k] for k in ("snd_cwnd", "unacked", "notsent_bytes", "total_retrans")
                      if k in tcp_now})
        spent.update({f"tcp_{k.removesuffix('_us')}_s": (tcp_now[k] - tcp_at_start.get(k, 0)) / 1e6
                      for k in ("busy_us", "rwnd_limited_us", "sndbuf_limited_us") if k in tcp_now})
        spent.update(stream_cpu(cpu_at_start, stat_counters(), self_at_start, resource.getrusage(resource.RUSAGE_SELF)))
        # pages this process read from disk while P was frozen (what page_out took that it needed)
        spent["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - self.major_faults_at_freeze
        spent.update(self.memory)
        trailer = json.dumps({k: round(v, 3) for k, v in spent.items()}).encode()
        self._send(W.END, W.END_BODY.pack(header.size, whole.intdigest()) + trailer)
        self.outbox.flush()
        self.fig.sent_at = time.time()

    def _send_backlog(self, backlog: list[list[Any]]) -> None:
        for kind, head, literal in backlog:
            self._send(kind, head, literal)
        backlog.clear()

    def _compress_backlog(self, backlog: list[list[Any]], spent: dict[str, float]) -> int:
        """Every chunk is read and P's link is still down: compress the waiting chunks, oldest first,
        until the link is back (compress_chunk). Returns how many were compressed."""
        if self.cfg.compression != "adaptive" or self.compressor is None:
            return 0
        done = 0
        t0 = time.monotonic()
        for entry in backlog:
            if self.outbox is None or self.outbox.link_ready():
                break
            kind, _, literal = entry
            if kind == W.CHUNK and memoryview(literal).nbytes:
                entry[0], entry[2] = W.ZCHUNK, self.compressor.compress(literal)
                done += 1
        spent["compress"] = spent.get("compress", 0.0) + time.monotonic() - t0
        return done

    def _await_ack(self) -> None:
        assert self.sock is not None
        try:
            kind, payload = W.recv_frame(self.sock, max_payload=1 << 16)
        except (TimeoutError, W.WireError, OSError) as exc:
            raise CutoverAborted(f"no acknowledgement from V: {exc}") from None
        if kind != W.ACK:
            raise CutoverAborted(f"V did not accept the image: {bytes(payload).decode(errors='replace')}")
        self.fig.acked_at = time.time()
        fault_point("after-ack")  # V may have restored the image ahead: its VM must stay at the commit gate

    def _prepare_commit_note(self) -> None:
        if not self.cfg.pending_file:
            return
        try:
            self.commit_note = commit_note(self.cfg.pending_file)
        except (PendingError, OSError) as exc:  # then only the agent can tell that COMMIT went
            print(f"cutover helper: no commit note: {exc}", file=sys.stderr, flush=True)

    def _commit_and_power_off(self) -> None:
        # The point of no return: V holds the exact image, loaded into the waiting VM. The agent
        # hears "committed" before COMMIT leaves, and the pending file says so: if this helper then
        # dies without powering P off, the agent does, or the next one if the agent is gone too (a P
        # that runs on next to the VM would be a second copy of the OS).
        if self.commit_note is not None:
            try:
                write_commit_note(self.cfg.pending_file, self.commit_note)
            except OSError as exc:
                print(f"cutover helper: commit note: {exc}", file=sys.stderr, flush=True)
        emit("committed", self.fig)
        fault_point("before-commit")  # V holds the image undecided: the agent resolves it with V
        try:
            assert self.sock is not None
            W.send_frame(self.sock, W.COMMIT)
            fault_point("after-commit")
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.close()
        except OSError:
            pass  # V starts the VM only on COMMIT, or on the agent's word (vm_runs_after_commit)
        for problem in release_network_legs(self.cfg.network_legs):
            print(f"cutover helper: {problem}", file=sys.stderr, flush=True)
        self.snap.power_off()

    def _abort(self, reason: str, outcome: str = "aborted") -> None:
        """Back to P running as it was; never raises."""
        discard_stash(self.dedup.stashed)
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        if self.sock is not None:
            try:  # not after a frame cut in half: closing the socket tells V just as well
                if self.outbox is None or self.outbox.held == 0:
                    W.send_frame(self.sock, W.ABORT, reason.encode()[:4000])
            except OSError:
                pass
            try:
                self.sock.close()
            except OSError:
                pass
        if self.frozen:
            for step in (self.snap.free, self.snap.unfreeze):
                try:
                    step()
                except OSError:
                    pass
            self.frozen = False
            self.fig.unfrozen_at = time.time()
        if self.blocked:
            self.block.lift(self.blocked)
        self._bring_links_back()
        self._undo_settings()
        # the peers backed off while P was frozen: their next retransmission would come seconds
        # after P runs on again (the same kick as in the VM; only captured after FREEZE)
        kick = [a for a in self.cfg.resume_actions if a.get("name") == "kick-peers"]
        if kick:
            self.fig.resume_steps += [f"after abort: {d}" for d in resume.describe(self.resume_runner(kick))]
        emit(outcome, self.fig, reason=reason)

    def _bring_links_back(self, wait_s: float = 4.0) -> None:
        """P runs on: the NICs taken down come up, and the bonds get their slaves' carrier back
        before their downdelay returns to normal (else each fails over once more). Bounded."""
        if self.cycle is None or not self.cycle.down:
            return
        self.cycle.restore()
        carrier = carrier_check(self.egress, self.cfg.sys_class_net)
        deadline = time.monotonic() + wait_s
        while carrier is not None and not carrier() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _hold_frozen(self) -> None:
        """A resume step the rest depends on failed (resume.STOP_ON_FAILURE: the commit gate): the OS
        stays frozen and off the network for good, a dead VM rather than a second live P. This
        process keeps the snapshot device open (closing it would thaw every task) and never returns;
        V sees no report and the operator resolves the cutover."""
        emit("halted", self.fig)
        while True:
            time.sleep(3600)

    def _resumed(self) -> str:
        self.fig.resumed_at = time.time()
        self.mark = resume.kernel_log_marker()
        self.mark("P's OS runs in the VM; the resume steps start")
        if self.sock is not None:  # P's image connection does not exist in this world
            try:
                self.sock.close()
            except OSError:
                pass
        now = [a for a in self.cfg.resume_actions if not a.get("late")]
        late = [a for a in self.cfg.resume_actions if a.get("late")]
        results = self.resume_runner(now)
        self.fig.resume_steps = resume.describe(results)
        if resume.halted(results):
            self._hold_frozen()
        t0 = time.monotonic()
        for step in (self.snap.free, self.snap.unfreeze):
            try:
                step()
            except OSError:
                pass
        self.frozen = False
        self.fig.unfrozen_at = time.time()
        self.mark("unfrozen")
        t1 = time.monotonic()
        # the cutover's settings go back once the OS runs: nothing before UNFREEZE needs them gone
        self._undo_settings()
        discard_stash(self.dedup.stashed)  # P's, on the disk the VM shares
        self.fig.resume_steps += [f"unfreeze: ok ({(t1 - t0) * 1000:.0f} ms)",
                                  f"after unfreeze: undo-settings: ok ({(time.monotonic() - t1) * 1000:.0f} ms)"]
        if late:  # the OS runs again: outside the downtime
            self.fig.resume_steps += [f"after unfreeze: {d}" for d in resume.describe(self.resume_runner(late))]
        emit("resumed", self.fig)
        return "resumed"


def warm_up() -> None:
    """Load now what the cutover needs later, in the agent: the forked helper then shares it, and
    once frozen (or in the VM) nothing waits on imports."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.get_links()
        ipr.get_addr()


def run(raw: dict[str, Any], held: np.ndarray) -> int:
    """The helper's whole life in its process: `raw` is a HelperConfig's fields, `held` V's hash per
    PFN (0 = not held). The outcome goes to stdout as one JSON line (emit). Returns the exit code."""
    cfg = HelperConfig(**raw)
    hold_freed_memory()  # the agent's fixed threshold (common/heap.py) would cost the downtime here
    try:
        snap = SnapshotDevice(cfg.snapshot_device)
    except (OSError, ValueError, OverflowError) as exc:
        emit("aborted", Figures(), reason=f"cannot open {cfg.snapshot_device}: {exc}")
        code = 2
    else:
        outcome = Helper(cfg, snap, held).run()
        code = 0 if outcome in ("resumed", "rehearsed") else 3
    if cfg.pending_file:  # P runs on as it was, or lives in the VM: nothing is left for an agent to repair
        clear_pending(cfg.pending_file)
    return code
