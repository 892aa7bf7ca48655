"""What the cutover changes on P for the snapshot, and how P gets it back when the helper cannot.

The cutover helper (cutover_helper) blocks P's traffic, takes its NIC down, holds the bond's timers,
raises image_size, shortens the per-CPU free page lists, adds a host route to V and pins V's ARP
entry, and the agent raises the request timeout of md's NBD legs; the helper puts all of it back
itself whenever P runs on. If it dies without a word (killed, out of memory), the agent does
(`restore_host_settings`, from what `read_host_settings` saw before the hand-over). If the agent
dies too, the next agent does, at its start (`recover_interrupted_cutover`): before the hand-over
the agent writes what it saw, and who the helper is, to `<state_dir>/cutover-pending.json`, and
whoever ends the cutover (the helper, in P or in the VM, or the agent) removes it.

That file is not synced: a reboot undoes every one of these settings, so a file from another boot is
only dropped (`recovery_verdict`, pure). Nothing is repaired past the point of no return: a helper
that said "committed" and died leaves its agent to power P off (cutover.helper_verdict), and right
before COMMIT leaves the helper marks the file committed (`write_commit_note`), so that an agent
started after both died powers P off too instead of putting it back next to the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from common.atomicfile import write_atomic
from common.procfs import process_started

log = logging.getLogger(__name__)

PENDING_FILE = "cutover-pending.json"
#: in the runtime dir (tmpfs): the peers' quoted segments, written by the helper right after the
#: snapshot (in P only: not in the image), so that whoever puts P back kicks them (peer_kick)
PEER_NOTE_FILE = "cutover-peers.json"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@dataclass
class HostSettings:
    """What the helper changes on P for the snapshot, read by the agent before it hands over. The
    helper puts all of it back itself when P runs on; if it dies without a word (killed, out of
    memory), the agent does — else P would run on cut off (traffic block applied, its NIC down)."""

    blocked: list[str]
    admin_up: list[str]  # interfaces up before the cutover
    bonds: dict[str, dict[str, str]]  # bond -> its miimon and downdelay
    image_size: str
    v_host: str = ""  # V's image socket: the helper adds a host route to it and pins its ARP entry
    v_route: bool = False  # a /32 route to V was there before (then it is not the helper's)
    v_pinned: bool = False  # V's neighbour entry was permanent before
    io_timeouts: dict[str, str] = field(default_factory=dict)  # md's NBD legs: the agent raises them
    pcp_high_fraction: str = ""  # /proc/sys/vm/percpu_pagelist_high_fraction ("" = unknown)


PCP_HIGH_FRACTION_PATH = "/proc/sys/vm/percpu_pagelist_high_fraction"


def set_io_timeouts(devices: list[str], timeout_ms: int | None, saved: dict[str, str] | None = None,
                    block_root: str = "/sys/block") -> dict[str, str]:
    """Set (or, with `saved`, restore) the block layer's request timeout of these devices (md's NBD
    legs: long enough for the cutover's blocked seconds). Returns the values it replaced."""
    old: dict[str, str] = {}
    for dev in devices:
        path = Path(block_root) / dev / "queue/io_timeout"
        try:
            old[dev] = path.read_text().strip()
            path.write_text(saved[dev] if saved is not None else str(timeout_ms))
        except (OSError, KeyError) as exc:
            log.warning("io_timeout of %s: %s", dev, exc)
    return old


def read_host_settings(blocked: list[str], root: str = "/sys/class/net",
                       image_size_path: str = "/sys/power/image_size", v_host: str = "",
                       pcp_path: str = PCP_HIGH_FRACTION_PATH) -> HostSettings:
    from source_agent.link_cycle import IFF_UP, link_flags
    from source_agent.stream_path import bond_timers, host_route, pinned_neighbour

    up = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            if link_flags(name) & IFF_UP:
                up.append(name)
        except OSError:
            continue
    bonds = {name: timers for name in blocked if (timers := bond_timers(name, root)) is not None}
    image_size, pcp = (_read_setting(path) for path in (image_size_path, pcp_path))
    route = host_route(v_host) if v_host else None
    return HostSettings(list(blocked), up, bonds, image_size, v_host,
                        v_route=route is not None and not route.ours,  # p2v's (a killed helper's) is not the host's
                        v_pinned=bool(v_host) and pinned_neighbour(v_host) is not None, pcp_high_fraction=pcp)


def _read_setting(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def swap_sysctl(path: str, value: str) -> str:
    """Write `value`, return the old one ("" when it cannot be read or written: every setting the
    cutover makes this way is an optimisation only). Never raises."""
    try:
        with open(path) as f:
            old = f.read().strip()
        with open(path, "w") as f:
            f.write(value + "\n")
        return old
    except OSError as exc:
        print(f"cutover helper: cannot set {path}: {exc}", file=sys.stderr, flush=True)
        return ""


def peer_note_path(runtime_dir: str) -> str:
    """Where the helper notes the peers ("" = nowhere: no runtime dir, or it cannot be made). Never raises."""
    if not runtime_dir:
        return ""
    try:
        os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        log.warning("no runtime dir %s (no note of the peers to kick): %s", runtime_dir, exc)
        return ""
    return str(Path(runtime_dir) / PEER_NOTE_FILE)


def write_peer_note(path: str | Path, quotes: list[str]) -> None:
    """The helper's note of the peers' quoted segments (hex). Raises OSError."""
    write_atomic(Path(path), json.dumps({"quotes": quotes}).encode(), durable=False)  # tmpfs: this boot only


def take_peer_note(path: str | Path) -> list[bytes]:
    """The quotes in the helper's note, which goes (a note read is a note used: stale quotes are
    ignored by the peers anyway, RFC 6069). [] when there is none, or it is not one (said so)."""
    if not path:
        return []
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("peer note %s unreadable: %s", path, exc)
        return []
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    try:
        quotes = [bytes.fromhex(q) for q in json.loads(raw)["quotes"]]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("peer note %s is not one, no peer kicked: %s", path, exc)
        return []
    # an IPv4 header (20-60 bytes) carrying TCP, and the first 8 bytes of the TCP header
    if not all(28 <= len(q) <= 68 and q[0] >> 4 == 4 and q[9] == socket.IPPROTO_TCP for q in quotes):
        log.warning("peer note %s holds a quote that is not an IPv4 TCP segment's: no peer kicked", path)
        return []
    return quotes


def kick_noted_peers(path: str | Path, interfaces: list[str], root: str = "/sys/class/net",
                     kick: Callable[[list[bytes]], int] | None = None, carrier_wait_s: float = 4.0) -> str:
    """After P's settings are back: the peers the helper noted resend now instead of after their
    backed-off timers (up to TCP's 120 s when P stayed blocked long), once `interfaces` have their
    link back (bounded: an ICMP on a dead link is lost). "" when nothing was noted. Never raises."""
    from source_agent.stream_path import carrier_check

    quotes = take_peer_note(path)
    if not quotes:
        return ""
    checks = [c for c in (carrier_check(name, root) for name in interfaces) if c is not None]
    deadline = time.monotonic() + carrier_wait_s
    while not all(up() for up in checks) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        if kick is None:
            from source_agent.peer_kick import kick
        sent = kick(quotes)
    except OSError as exc:
        log.warning("kicking P's peers: %s", exc)
        return f"peers not kicked: {exc}"
    return f"{sent} ICMP for {len(quotes)} peer connection(s)"


def restore_host_settings(saved: HostSettings, root: str = "/sys/class/net",
                          image_size_path: str = "/sys/power/image_size", block_root: str = "/sys/block",
                          pcp_path: str = PCP_HIGH_FRACTION_PATH, peer_note: str = "") -> list[str]:
    """Put back what `read_host_settings` saw (the helper is gone), then kick the peers the helper
    noted (`peer_note`). Returns what it did; never raises."""
    from source_agent import traffic_block
    from source_agent.link_cycle import IFF_UP, link_flags, set_admin_up
    from source_agent.stream_path import (
        host_route,
        narrow_route,
        pinned_neighbour,
        release_bond_slaves,
        unpin_neighbour,
    )

    done = [f"block lifted on {name}" for name in traffic_block.lift(saved.blocked)]
    for name in saved.admin_up:
        try:
            if not link_flags(name) & IFF_UP:
                set_admin_up(name, True)
                done.append(f"{name} up")
        except OSError as exc:
            log.warning("bringing %s up: %s", name, exc)
    release_bond_slaves(saved.bonds, root)
    done += [f"{name}'s timers" for name in saved.bonds]
    if saved.image_size:
        swap_sysctl(image_size_path, saved.image_size)
    if saved.pcp_high_fraction:
        swap_sysctl(pcp_path, saved.pcp_high_fraction)
    if saved.io_timeouts:
        set_io_timeouts(list(saved.io_timeouts), None, saved.io_timeouts, block_root)
        done.append(f"io_timeout of {', '.join(saved.io_timeouts)}")
    if saved.v_host and not saved.v_route and (route := host_route(saved.v_host)) is not None and route.ours:
        narrow_route(route)
        done.append(f"route to {saved.v_host} removed")
    if saved.v_host and not saved.v_pinned and (pin := pinned_neighbour(saved.v_host)) is not None:
        unpin_neighbour(pin)
        done.append(f"{saved.v_host}'s neighbour entry unpinned")
    if kicked := kick_noted_peers(peer_note, saved.blocked, root):
        done.append(kicked)
    return done



# --- a cutover the agent did not see to its end ---------------------------------------------------

#: how long the next agent lets a helper that outlived its agent go on (the agent's own limit, and a
#: margin); then it is killed, as the agent would have
HELPER_WAIT_S = 900.0 + 60.0
REPAIR, WAIT, OTHER_BOOT, POWER_OFF = "repair", "wait", "other-boot", "power-off"


class PendingError(ValueError):
    """The pending-cutover file is not one: it is left where it is, and said so."""


@dataclass(frozen=True)
class PendingCutover:
    settings: HostSettings
    boot_id: str
    migration_id: str = ""  # V's id of the migration: V is told to drop it after the repair
    destination: str = ""  # V's agent (host:port)
    helper_pid: int = 0  # 0: not forked yet
    helper_started: int = 0  # the helper's start time (/proc/<pid>/stat): a reused pid is not the helper
    committed: bool = False  # the helper was about to send COMMIT: V may run the OS now
    peer_note: str = ""  # where the helper notes the peers to kick once P runs again ("" = none)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PendingCutover:
        try:
            fields = json.loads(raw)
            settings = HostSettings(**fields.pop("settings"))
            pending = cls(settings=settings, **fields)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PendingError(f"not a pending cutover: {type(exc).__name__}: {exc}") from None
        if not isinstance(pending.boot_id, str) or not isinstance(pending.helper_pid, int) or pending.helper_pid < 0:
            raise PendingError("not a pending cutover: boot_id or helper_pid malformed")
        if not isinstance(pending.committed, bool):
            raise PendingError("not a pending cutover: committed is not a boolean")
        return pending


def pending_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / PENDING_FILE


def write_pending(path: Path, pending: PendingCutover) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pending.to_json(), durable=False)  # only this boot needs it


def read_pending(path: Path) -> PendingCutover | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return PendingCutover.from_json(raw)


def commit_note(path: Path | str, pid: int | None = None) -> bytes:
    """The pending file as it must read once COMMIT may have left: committed, and naming the
    helper (`pid`, default this process) itself, since the agent's own note of it may come later
    than the helper reads the file. Made before FREEZE, so that writing it costs no parsing then."""
    pending = read_pending(Path(path))
    if pending is None:
        raise PendingError(f"no pending cutover at {path}")
    pid = os.getpid() if pid is None else pid
    return replace(pending, helper_pid=pid, helper_started=process_started(pid) or 0, committed=True).to_json()


def write_commit_note(path: Path | str, note: bytes) -> None:
    write_atomic(Path(path), note, durable=False)  # only this boot needs it, as write_pending


def clear_pending(path: Path | str) -> bool:
    """Remove the file; True if it was there."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def current_boot_id(path: str = BOOT_ID_PATH) -> str:
    return Path(path).read_text().strip()


def recovery_verdict(pending: PendingCutover, boot_id: str, helper_started_now: int | None) -> str:
    """What the next agent does with a pending cutover. Pure.

    OTHER_BOOT: the machine restarted since, and that undid every setting: only drop the file.
    WAIT: the helper outlived its agent and still works; it ends the cutover itself if it can.
    POWER_OFF: the helper is gone after it marked the cutover committed: COMMIT may have reached V,
    which then runs the OS; P must not run on beside it.
    REPAIR: the helper is gone (or was never recorded) before that: put P back now."""
    if pending.boot_id != boot_id:
        return OTHER_BOOT
    if pending.helper_pid and helper_started_now is not None and helper_started_now == pending.helper_started:
        return WAIT
    return POWER_OFF if pending.committed else REPAIR


async def recover_interrupted_cutover(
        state_dir: str | Path, after_repair: Callable[[PendingCutover], Awaitable[str]] | None = None, *,
        wait_s: float = HELPER_WAIT_S, poll_s: float = 1.0, boot_id: str | None = None, proc: str = "/proc",
        root: str = "/sys/class/net", image_size_path: str = "/sys/power/image_size",
        block_root: str = "/sys/block", pcp_path: str = PCP_HIGH_FRACTION_PATH,
        power_off: Callable[[], object] | None = None,
        vm_runs: Callable[[PendingCutover], Awaitable[bool]] | None = None) -> list[str]:
    """At the agent's start: put P back after a cutover whose helper and agent both died, then
    `after_repair` (best effort: the agent marks its journal and tells V to drop its waiting VM).
    If the helper had marked the cutover committed, P is powered off instead (`power_off`, default
    the kernel's) unless `vm_runs` (V's answer, source_agent.cutover.vm_runs_after_commit) says V
    holds no image and never starts one. Returns what was done (empty: nothing was pending). Never
    raises for a bad file: it is left in place and reported."""
    path = pending_path(state_dir)
    boot = boot_id if boot_id is not None else current_boot_id()
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            pending = read_pending(path)
        except (PendingError, OSError) as exc:
            log.error("interrupted cutover: %s left as it is: %s", path, exc)
            return [f"{path} left as it is: {exc}"]
        if pending is None:
            return ["the cutover helper ended the cutover itself"] if waited else []
        started = process_started(pending.helper_pid, proc) if pending.helper_pid else None
        verdict = recovery_verdict(pending, boot, started)
        if verdict == OTHER_BOOT:
            clear_pending(path)
            return ["a pending cutover from an earlier boot dropped (the restart undid its settings)"]
        if verdict == POWER_OFF:
            if vm_runs is None or await vm_runs(pending):
                return power_off_committed(pending, power_off)
            log.warning("interrupted cutover: V dropped the image its helper had committed: P runs on")
            break
        if verdict == REPAIR:
            break
        if time.monotonic() > deadline:
            log.error("interrupted cutover: helper %d still running after %.0f s: killing it",
                      pending.helper_pid, wait_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pending.helper_pid, signal.SIGKILL)
            await asyncio.sleep(poll_s)  # until it is gone (zombies of a dead parent are reaped by init)
            continue
        if not waited:
            log.warning("interrupted cutover: its helper (pid %d) still runs; waiting for it", pending.helper_pid)
        waited = True
        await asyncio.sleep(poll_s)
    # in a thread: pyroute2 runs an event loop of its own
    done = await asyncio.to_thread(restore_host_settings, pending.settings, root, image_size_path, block_root,
                                   pcp_path, pending.peer_note)
    clear_pending(path)
    log.warning("interrupted cutover (agent and helper gone): P's settings put back: %s", ", ".join(done) or "nothing")
    done = [f"P's settings put back: {', '.join(done) or 'nothing to do'}"]
    if after_repair is not None and pending.migration_id:
        try:
            done.append(await after_repair(pending))
        except Exception as exc:  # V may be the reason the cutover failed
            log.warning("interrupted cutover: could not tell V: %s", exc)
            done.append(f"V not told: {exc}")
    return done


def power_off_past_commit(why: str, power_off: Callable[[], object] | None = None) -> str:
    """P runs although COMMIT may have reached V: power it off, as the helper would have (`power_off`,
    default the kernel's, which does not return). The traffic block stays: if the kernel refuses, P at
    least stays cut off. Returns the refusal ("" when a stand-in power-off returned)."""
    if power_off is None:
        from source_agent.snapshot_device import power_off
    log.critical("%s: powering P off (V runs the OS now)", why)
    try:
        power_off()
    except OSError as exc:
        log.critical("P could not power itself off: %s", exc)
        return f"P could not power itself off ({exc}): P stays cut off by its traffic block; power it off by hand"
    return ""


def power_off_committed(pending: PendingCutover, power_off: Callable[[], object] | None = None) -> list[str]:
    """The next agent's half of power_off_past_commit: the file stays, so that should the kernel
    refuse, the agent after it tries again."""
    what = f"past the point of no return (the helper had sent COMMIT for {pending.migration_id})"
    refusal = power_off_past_commit(f"interrupted cutover: {what}", power_off)
    return [f"{what}, and {refusal}" if refusal else f"{what}: P powered off"]
