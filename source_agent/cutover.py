"""Lifecycle steps 5-7 on P's agent: cutover, then (in the VM) resume report, cancel, unload.

    before: V's held hashes (dedup), virtio drivers loaded, Cutover ANNOUNCE -> endpoint + token
    helper: the single-threaded cutover helper process does the freeze/snapshot/send (see
            source_agent/cutover_helper.py); this agent is frozen with everything else
    after:  "aborted"  -> P runs on (the caller reports the failure)
            "resumed"  -> this agent woke up inside the VM: report to V, cancel the redundancy ids V
                          names, report completion; the caller then unloads the agent

`plan_for` (pure) derives the resume steps from the inventory and the redundancy journal.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import NoReturn

import grpc
import numpy as np

from common.cutover_marker import HELPER_TIMEOUT_S
from common.heap import trim_heap
from common.procfs import process_started
from common.rpc import unreachable, until_reachable
from p2v.v1 import destination_pb2, source_pb2

from . import resume
from .host_settings import (
    PendingCutover,
    clear_pending,
    current_boot_id,
    peer_note_path,
    pending_path,
    power_off_past_commit,
    read_host_settings,
    restore_host_settings,
    set_io_timeouts,
    write_pending,
)

log = logging.getLogger(__name__)

VIRTIO_DRIVERS = ("virtio_pci", "virtio_net", "virtio_blk")


class CutoverAborted(RuntimeError):
    """Before the point of no return: P runs on unchanged."""


class PastPointOfNoReturn(RuntimeError):
    """The helper sent COMMIT (V runs the OS now) but P did not go off, and could not be powered
    off by the agent either: P must not run on; it stays cut off by its traffic block."""


def power_off_after_commit() -> NoReturn:
    """P still runs after its helper sent COMMIT: power it off now (host_settings.power_off_past_commit);
    PastPointOfNoReturn if the kernel refuses."""
    refusal = power_off_past_commit("the cutover helper sent COMMIT but P still runs")
    raise PastPointOfNoReturn(f"V runs the OS now, and {refusal or 'P did not go off'}")


#: the helper's dedup tables on disk around the snapshot (dedup_tables.DedupTables), in the state dir
DEDUP_STASH = "cutover-dedup.bin"


#: V's answer to P's word on a cutover (source_agent.migration.resolve_on_destination, bound to the TLS
#: config): (V's agent "host:port", migration id, committed) -> does the VM run?
ResolveCall = Callable[[str, str, bool], Awaitable[object]]


async def vm_runs_after_commit(destination: str, migration_id: str, blocked: list[str],
                               resolve: ResolveCall | None) -> bool:
    """The helper marked the cutover committed, then went without powering P off: between its mark
    and COMMIT on the wire, V may hold the acknowledged image undecided. Ask V (through a hole in
    the traffic block for V's agent only) to start the VM from it. True: the VM runs (or COMMIT had
    reached V): P powers off. False: V holds no image and never starts one: P runs on. When V
    cannot answer, True: the helper's mark is all P knows, and a second live copy is worse than none."""
    from source_agent import traffic_block

    if resolve is None or not destination or not migration_id:
        return True
    host, _, port = destination.rpartition(":")
    host = host.strip("[]")
    try:
        await asyncio.to_thread(traffic_block.open_path, blocked, host, int(port))
    except (ValueError, traffic_block.BlockError) as exc:  # no block left, or V named by a host name
        log.warning("no path opened through the traffic block to V's agent (%s): asking anyway", exc)
    try:
        reply = await resolve(destination, migration_id, True)
    except Exception as exc:
        log.critical("V could not say whether it runs the OS (%s): P keeps to its helper's mark", exc)
        return True
    log.critical("V on the cutover its helper left: %s", getattr(reply, "detail", reply))
    return bool(getattr(reply, "vm_runs", True))


def helper_verdict(result: dict, rehearse: bool) -> str:
    """What the agent does with the helper's outcome. Pure.

    "resumed": this process runs in the VM now. "rehearsed": P runs on after a rehearsal.
    "power-off": the helper said "committed" (it does so right before COMMIT leaves) and yet this P
    still runs: it died, or the kernel's power-off failed; the agent powers P off. Anything else:
    the helper ended the cutover before the point of no return and put P back."""
    outcome = result.get("outcome")
    if outcome == "resumed":
        return "resumed"
    if outcome == "committed":
        return "power-off"
    if rehearse and outcome == "rehearsed":
        return "rehearsed"
    return "aborted"


@dataclass
class CutoverOutcome:
    outcome: str  # "resumed"
    figures: dict
    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    completion: object | None = None


def enrich_prepare(request: destination_pb2.PrepareRequest, inventory: source_pb2.Inventory,
                   waiting_vm: bool) -> None:
    """What V needs to build the waiting VM: P's NIC MACs, PCI slots, kernel build."""
    for nic in physical_nics(inventory):
        request.nic_macs.append(nic.mac.lower())
    addrs = {n.pci_address for n in inventory.nics if n.pci_address}
    addrs |= {b.pci_address for b in inventory.block_devices if b.pci_address}
    request.pci_addresses.extend(sorted(addrs))
    request.kernel_version = os.uname().version
    request.waiting_vm = waiting_vm


def physical_nics(inventory: source_pb2.Inventory) -> list[source_pb2.Nic]:
    return [n for n in inventory.nics if n.pci_address and not n.kind and n.mac]


def _live(entries: list, kind: str) -> list:
    """The journal's entries of `kind` that are in place (not undone)."""
    return [e for e in entries if e.kind == kind and e.state in ("done", "pending")]


def commit_gate_args(address: int, token: bytes, migration_id: str, rehearse: bool,
                     p_minus_v_s: float | None = None) -> dict | None:
    """The resume's commit gate (common/commit_gate.py) when V offers one: V then restores the image
    at its ACK, before P's COMMIT. Not for a rehearsal (P aborts after the ACK: the VM must still
    hold the image, unrestored). `p_minus_v_s`: P's clock minus V's (clock_offset), for the gate to
    set P's clock from V's. Pure."""
    if rehearse or address <= 0 or address % 4096:
        return None
    return {"address": address, "token": token.hex(), "migration_id": migration_id,
            **({"p_minus_v_s": p_minus_v_s} if p_minus_v_s is not None else {})}


def clock_offset(replied_at_s: float, dest_wall_ns: int) -> float | None:
    """P's wall clock minus V's, from V's stamp on its reply and P's clock when the reply was in
    (None: V sent no stamp). High by the reply's one-way trip, a few ms on a LAN. Pure."""
    return replied_at_s - dest_wall_ns / 1e9 if dest_wall_ns else None


def plan_for(inventory: source_pb2.Inventory, journal_entries: list, blocked: list[str], feed_mac: str,
             feed_address: str = "", vm_nics: list[str] | None = None,
             vm_disks: list[str] | None = None, commit_gate: dict | None = None,
             slot_power: dict[str, str] | None = None) -> list[resume.ResumeAction]:
    """Resume steps from P's inventory and p2v's redundancy journal entries. Pure.

    NIC: bonded by p2v -> the virtual NIC joins that bond; otherwise it takes over the NIC's IPv4
    addresses and routes. Disk: only physical legs of arrays that p2v gave a network leg are failed
    (an array without another leg would lose its only member)."""
    bonds = {e.physical: e.detail.get("bond", "") for e in _live(journal_entries, "bond")}
    nics: list[resume.NicFacts] = []
    announce_ips: list[tuple[str, str]] = []
    for nic in physical_nics(inventory):
        bond = bonds.get(nic.name, "")
        facts = resume.NicFacts(name=nic.name, mac=nic.mac.lower(), bond=bond)
        if bond:
            bond_nic = next((n for n in inventory.nics if n.name == bond), None)
            cidrs = list(bond_nic.addresses) if bond_nic else []
        else:
            cidrs = list(nic.addresses)
            for r in inventory.routes:
                if r.device == nic.name and r.gateway:
                    dst, _, plen = r.destination.partition("/")
                    facts.routes.append(("" if r.destination == "default" else dst,
                                         int(plen or 0), r.gateway))
        for cidr in cidrs:
            ip, _, plen = cidr.partition("/")
            if ":" in ip:
                continue  # IPv6 comes back by itself (SLAAC / link-local); ARP is IPv4
            if not bond:
                facts.addresses.append((ip, int(plen or 32)))
            announce_ips.append((bond, ip))
        nics.append(facts)
    md_legs: list[tuple[str, str]] = []
    by_name = {b.name: b for b in inventory.block_devices}
    for e in _live(journal_entries, "md-leg"):
        md = e.detail.get("md", "")
        leg = os.path.basename(e.detail.get("leg", ""))
        array = by_name.get(md)
        for member in (array.md_members if array else []):
            if member == leg or member.startswith("nbd"):
                continue
            disk = by_name.get(member)
            parent = by_name.get(disk.parent) if disk and disk.parent else disk
            if parent is not None and parent.pci_address:
                md_legs.append((md, member))
    return resume.plan_resume(nics, md_legs, blocked, feed_mac, announce_ips, feed_address, vm_nics, vm_disks,
                              commit_gate, slot_power)


def load_journal_entries(state_dir: str) -> tuple[object | None, list]:
    try:
        from source_agent.redundancy.journal import Journal, default_path
    except ImportError:
        return None, []
    path = default_path(state_dir)
    if not path.exists():
        return None, []
    journal = Journal.load(path)
    return journal, list(journal.entries)


#: md's network legs must outlast the cutover: V resends what P stopped acknowledging only after its
#: retransmission back-off (tens of seconds after a long freeze), and nbd fails a request that takes
#: longer than its timeout (10 s by default) — the array would lose its only remaining leg.
NBD_CUTOVER_TIMEOUT_MS = 180_000


def nbd_legs(entries: list) -> list[str]:
    return [os.path.basename(e.detail["device"]) for e in _live(entries, "nbd") if e.detail.get("device")]


def _leg_status(md: str, leg: str) -> object:
    """mdmirror's LegStatus of md's member `leg` (a name, as in sysfs)."""
    from source_agent.redundancy.mdmirror import array_state, leg_status

    return leg_status(array_state(md), leg)


def mirror_problems(entries: list, status: Callable[[str, str], object] | None = None) -> list[str]:
    """Why md's network legs cannot carry P's disk into the VM (empty: they can). After the move the
    VM's arrays keep only their network leg: one that is faulty, gone or still recovering would
    leave the OS with a stale or no disk. `status(md, leg)` is mdmirror's LegStatus (tests pass
    their own); the verdict is the leg's own `ready`."""
    from source_agent.redundancy.mdmirror import MirrorError

    problems = []
    for e in _live(entries, "md-leg"):
        try:
            leg = (status or _leg_status)(e.detail["md"], os.path.basename(e.detail["leg"]))
        except (MirrorError, OSError) as exc:
            problems.append(str(exc))
            continue
        if not leg.ready():  # type: ignore[attr-defined]
            problems.append(leg.describe())  # type: ignore[attr-defined]
    return problems


def heal_mirrors(entries: list, status: Callable[[str, str], object] | None = None,
                 heal: Callable[[str, str, str], list[str]] | None = None) -> list[str]:
    """Bring back md's network legs that failed or went (an NBD connection that timed out while P
    was blocked, an operator's --fail) before a migration relies on them; what was done, or why it
    could not be (mirror_problems then refuses the migration). `status` and `heal` stand in for
    mdmirror's in tests."""
    from source_agent.redundancy import mdmirror

    uris = {e.detail.get("device"): e.detail.get("uri", "") for e in _live(entries, "nbd")}
    said = []
    for e in _live(entries, "md-leg"):
        md, leg = e.detail["md"], e.detail["leg"]
        try:
            if (status or _leg_status)(md, os.path.basename(leg)).ready():  # type: ignore[attr-defined]
                continue
            if not uris.get(leg):
                said.append(f"{leg} of {md}: no nbd export recorded for it; not brought back")
                continue
            steps = (heal or mdmirror.heal_leg)(md, leg, uris[leg])
            said.append(f"{os.path.basename(leg)} of {md} brought back ({', '.join(steps)})")
        except (mdmirror.MirrorError, OSError) as exc:
            said.append(f"{os.path.basename(leg)} of {md} could not be brought back: {exc}")
    return said


async def check_mirrors(entries: list, error: type[Exception] = CutoverAborted, tried: list[str] | None = None
                        ) -> None:
    """Raises `error` if md's network legs cannot carry P's disk into the VM (mirror_problems);
    `tried` says what heal_mirrors did before."""
    if problems := await asyncio.to_thread(mirror_problems, entries):
        raise error(f"md's network legs cannot carry P's disk into the VM: {'; '.join(problems)}"
                    + (f" ({'; '.join(tried)})" if tried else "")
                    + "; bring the leg back (mdadm --re-add, or roll the redundancy back and build it again: "
                      "python3 -m source_agent.redundancy), then migrate again")


async def held_hashes(stub, migration_id: str, max_pfn: int) -> np.ndarray:
    held = np.zeros(max_pfn, dtype=np.uint64)
    async for chunk in stub.HeldHashes(destination_pb2.HeldHashesRequest(migration_id=migration_id), timeout=120):
        values = np.frombuffer(chunk.hashes, dtype="<u8")
        held[chunk.start_pfn:chunk.start_pfn + values.size] = values
    return held


async def load_drivers(modules: tuple[str, ...] = VIRTIO_DRIVERS) -> None:
    """The VM's devices must find their drivers loaded: nothing can be loaded while frozen."""
    proc = await asyncio.create_subprocess_exec("modprobe", "-a", *modules, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise CutoverAborted(f"cannot load the VM's drivers {modules}: {err.decode().strip()}")


def return_free_memory() -> None:
    """Give the agent's freed memory back to the kernel before the snapshot: the image holds every
    page in use, and glibc keeps freed heap (pre-copy's buffers, gRPC's) mapped until trimmed."""
    gc.collect()
    trim_heap()



class HelperProcess:
    """The cutover helper, forked from this agent when the cutover starts, not started afresh: the
    interpreter, numpy, pyroute2 and our modules are in memory already and stay shared
    copy-on-write, so the snapshot carries one copy of them instead of two (a fresh helper was
    35 MiB of P's image). The child runs `cutover_helper.run`; its outcome is the last JSON line on
    its stdout, a pipe, and its stderr, another pipe, explains a death."""

    def __init__(self) -> None:
        self.pid: int | None = None

    async def warm_up(self) -> None:
        """Load what the helper runs while pre-copy still goes on: these pages reach V before the
        snapshot, and the child finds them loaded."""
        from source_agent import cutover_helper

        await asyncio.to_thread(cutover_helper.warm_up)

    async def run(self, config: dict, held: np.ndarray, timeout_s: float = HELPER_TIMEOUT_S,
                  on_forked: Callable[[int], None] | None = None) -> dict:
        """Fork the helper with `config` (HelperConfig's fields) and V's hash per PFN; its outcome.
        `on_forked(pid)` runs in this process right after the fork."""
        from source_agent import cutover_helper

        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        gc.collect()
        gc.freeze()  # the child's collector would otherwise touch, and so copy, every object
        pid = os.fork()
        if pid == 0:
            _helper_child(cutover_helper.run, config, held, out_w, err_w, (out_r, err_r))
        gc.unfreeze()
        self.pid = pid
        if on_forked is not None:
            try:
                on_forked(pid)
            except Exception:  # the helper runs: its outcome matters more than the note
                log.exception("after forking the cutover helper")
        os.close(out_w)
        os.close(err_w)
        reading = asyncio.gather(asyncio.to_thread(_read_to_end, out_r), asyncio.to_thread(_read_to_end, err_r))
        try:
            out, err = await asyncio.wait_for(asyncio.shield(reading), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            os.kill(pid, signal.SIGKILL)  # its pipes close: the readers end
            await reading
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise CutoverAborted("the cutover helper did not finish in time") from None
        finally:
            status = (await asyncio.to_thread(os.waitpid, pid, 0))[1]
            self.pid = None
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            tail = err.decode(errors="replace")[-2000:].strip()
            raise CutoverAborted(f"the cutover helper failed (rc={os.waitstatus_to_exitcode(status)}): {tail}")
        if err:
            log.info("cutover helper stderr: %s", err.decode(errors="replace")[-2000:])
        return json.loads(lines[-1])

def _read_to_end(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _helper_child(target: Callable[[dict, np.ndarray], int], config: dict, held: np.ndarray, out_w: int, err_w: int,
                  close: tuple[int, ...]) -> NoReturn:
    """In the forked child: stdout and stderr to the agent's pipes, default signal handling (the
    agent's event loop is not ours), no garbage collection (it would copy the agent's objects), run
    the helper, and leave without the agent's exit handlers."""
    code = 70
    try:
        for fd in close:
            os.close(fd)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # the pipes, whatever sys.stdout was
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()
        code = target(config, held)
    except BaseException:  # whatever it is, it goes to the agent through stderr
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


async def cutover(stub, remote_id: str, inventory: source_pb2.Inventory, max_pfn: int, state_dir: str,
                  helper: HelperProcess | None = None, rehearse: bool = False, destination: str = "",
                  resolve: ResolveCall | None = None, precopy_ended_at: float = 0.0,
                  final_pass_source: str = "", runtime_dir: str = "") -> dict:
    """Up to and including the helper. Returns the helper's figures when this process wakes up in
    the VM, or (rehearse) when P runs on after V acknowledged the image; raises CutoverAborted when
    P runs on otherwise. `destination` (V's agent) is written down for an agent that would have to
    finish this after a crash (host_settings.recover_interrupted_cutover); `resolve` asks V about a
    cutover the helper left past its commit mark (vm_runs_after_commit). `runtime_dir` (tmpfs) holds
    the helper's note of the peers to kick should it die ("" = no note)."""
    from source_agent import traffic_block

    setup: dict[str, float] = {}  # seconds of each step from pre-copy's end to the hand-over (P runs meanwhile)
    mark = time.monotonic()

    def lap(step: str) -> None:
        nonlocal mark
        now = time.monotonic()
        setup[step], mark = round(now - mark, 3), now

    journal, entries = load_journal_entries(state_dir)
    healed = await asyncio.to_thread(heal_mirrors, entries)  # again: a leg can fail during pre-copy
    await check_mirrors(entries, tried=healed)
    lap("mirrors")
    if journal is not None:
        # the ids V will name for cancellation after the move (only these are ever cancelled)
        report = journal.report()  # type: ignore[attr-defined]
        report.migration_id = remote_id
        await stub.ReportRedundancy(report, timeout=30)
    lap("report_redundancy")
    held = await held_hashes(stub, remote_id, max_pfn)
    lap("held_hashes")
    await load_drivers()
    lap("load_drivers")
    reply = await stub.Cutover(destination_pb2.CutoverRequest(
        migration_id=remote_id, phase=destination_pb2.CutoverRequest.PHASE_ANNOUNCE), timeout=600)
    p_minus_v_s = clock_offset(time.time(), reply.dest_wall_ns)
    lap("announce")
    if not reply.ready:
        raise CutoverAborted(f"the destination is not ready for cutover: {reply.detail}")
    blocked = await asyncio.to_thread(traffic_block.interfaces_to_block)
    vm_functions = [*reply.vm_nic_pci_addresses, *reply.vm_disk_pci_addresses]
    slot_power = await asyncio.to_thread(resume.slot_power_files, vm_functions) if vm_functions else None
    actions = plan_for(inventory, entries, blocked, reply.feed_mac, reply.feed_pci_address,
                       list(reply.vm_nic_pci_addresses), list(reply.vm_disk_pci_addresses),
                       commit_gate_args(reply.commit_gate_address, reply.token, remote_id, rehearse, p_minus_v_s),
                       {a: str(f) for a, f in (slot_power or {}).items()})
    legs = nbd_legs(entries)
    v_host = reply.endpoint.rpartition(":")[0]
    settings = await asyncio.to_thread(read_host_settings, blocked, v_host=v_host)
    settings = replace(settings, io_timeouts=set_io_timeouts(legs, NBD_CUTOVER_TIMEOUT_MS))
    lap("host_settings")
    pending = PendingCutover(settings, current_boot_id(), remote_id, destination,
                             peer_note=await asyncio.to_thread(peer_note_path, runtime_dir))
    peer_note = pending.peer_note
    pending_file = pending_path(state_dir)

    def helper_forked(pid: int) -> None:  # a later agent must know whether the helper still works
        write_pending(pending_file, replace(pending, helper_pid=pid, helper_started=process_started(pid) or 0))

    committed = False
    stash = str(pending_file.with_name(DEDUP_STASH))
    try:
        write_pending(pending_file, pending)
        config = {"migration_id": remote_id, "endpoint": reply.endpoint, "token": reply.token.hex(),
                  "block_interfaces": blocked, "network_legs": legs, "rehearse": rehearse,
                  "pending_file": str(pending_file), "agent_pid": os.getpid(), "precopy_ended_at": precopy_ended_at,
                  "dedup_stash": stash, "peer_note": peer_note,
                  "agent_setup": setup,  # its last lap is added below, before the fork
                  "final_pass_source": final_pass_source,
                  "resume_actions": [{"name": a.name, "args": a.args, "late": a.late} for a in actions]}
        return_free_memory()
        lap("return_free_memory")
        result = await (helper or HelperProcess()).run(config, held, on_forked=helper_forked)
        committed = helper_verdict(result, rehearse) == "power-off"
    except (CutoverAborted, asyncio.CancelledError) as exc:  # the helper died, hung or was cancelled (killed)
        # in a thread: pyroute2 runs an event loop of its own (the thread finishes even if cancelled again)
        done = await asyncio.shield(asyncio.to_thread(restore_host_settings, settings, peer_note=peer_note))
        if isinstance(exc, asyncio.CancelledError):
            log.warning("cutover cancelled; the agent put P's settings back: %s", ", ".join(done) or "nothing to do")
            raise
        raise CutoverAborted(f"{exc}; the agent put P's settings back: {', '.join(done) or 'nothing to do'}"
                             ) from None
    except BaseException:
        set_io_timeouts(legs, None, settings.io_timeouts)
        raise
    finally:
        if not committed:  # the helper's outcome is in (it cleared it already if it could)
            clear_pending(pending_file)
        from source_agent.dedup_tables import discard_stash

        discard_stash(stash)  # a helper killed before its read-back leaves it
        if not committed:  # the helper's own abort kicked the peers, or the safety net used its note
            discard_stash(peer_note)
    verdict = helper_verdict(result, rehearse)
    if verdict == "power-off":
        # the note stays, committed (also if the helper could not mark it): should this agent die
        # now, the next one powers P off
        write_pending(pending_file, replace(pending, committed=True))
        if await vm_runs_after_commit(destination, remote_id, blocked, resolve):
            power_off_after_commit()
        done = await asyncio.to_thread(restore_host_settings, settings, peer_note=peer_note)
        clear_pending(pending_file)
        result = {**result, "reason": "the helper went after its commit mark, and V dropped the image it held: "
                                      f"P runs on (settings put back: {', '.join(done) or 'nothing to do'})"}
        verdict = "aborted"
    if verdict != "resumed":
        set_io_timeouts(legs, None, settings.io_timeouts)  # P runs on as it was
        if verdict == "rehearsed":
            return result  # the agent cancels the migration on V next: no re-arming it first
        for attempt in range(3):  # as after a rehearsal: the connection may have died under the block
            try:
                await stub.Cutover(destination_pb2.CutoverRequest(
                    migration_id=remote_id, phase=destination_pb2.CutoverRequest.PHASE_ABORT), timeout=10,
                    wait_for_ready=attempt > 0)
                break
            except Exception as exc:  # the destination may be the reason we failed
                log.warning("could not tell V about the abort (attempt %d): %s", attempt + 1, exc)
        raise CutoverAborted(f"cutover aborted, P runs on: {result.get('reason', result.get('outcome'))}")
    return result


#: how long the agent in the VM keeps asking V to take its reports (Resumed, Complete): V's agent may
#: be restarting (its unit does so in seconds; an operator's stop, a repair of V's host, can last
#: hours), and without them P's redundancy is never cancelled in the VM. After that the migration
#: reads failed, `p2vctl list` says so, and a restart of the agent reports again.
REPORT_PATIENCE_S = 24 * 3600.0
#: the longest pause between two asks: V's agent back after a restart is heard within a minute
REPORT_MAX_DELAY_S = 60.0


async def patiently(call: Callable[[], Awaitable], what: str, patience_s: float = REPORT_PATIENCE_S,
                    first_delay_s: float = 1.0, max_delay_s: float = REPORT_MAX_DELAY_S):
    """`call()` until V answers, retried with a growing pause for up to `patience_s` while V is
    unreachable; then, or at once when V refuses, a RuntimeError naming `what`."""
    retries = 0

    def retried(attempt: int, exc: BaseException) -> None:
        nonlocal retries
        retries = attempt
        log.warning("%s (attempt %d): %s", what, attempt, exc)

    try:
        return await until_reachable(call, patience_s, first_delay_s=first_delay_s, max_delay_s=max_delay_s,
                                     on_retry=retried)
    except Exception as exc:
        if not unreachable(exc):
            why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
            raise RuntimeError(f"{what}: V refused: {why}") from None
        raise RuntimeError(f"{what}: no answer from V after {retries + 1} attempts in "
                           f"{patience_s:.0f}s: {exc}") from None


def split_cancel_ids(entries: list, ids: list[str]) -> tuple[list[str], list[str]]:
    """V's ids to cancel: (those still to do, those this host's journal has cancelled already). A
    report made again after the agent in the VM died or gave up finds part of it done. Pure."""
    cancelled = {e.id for e in entries if e.state == "cancelled"}
    return [i for i in ids if i not in cancelled], [i for i in ids if i in cancelled]


async def after_resume(stub, remote_id: str, host_id: str, figures: dict, state_dir: str,
                       patience_s: float = REPORT_PATIENCE_S) -> CutoverOutcome:
    """Inside the VM: report to V, cancel what V names, report completion."""
    req = destination_pb2.ResumedRequest(
        migration_id=remote_id, host_id=host_id, resumed_at=figures.get("resumed_at", 0.0),
        unfrozen_at=figures.get("unfrozen_at", 0.0), frozen_at=figures.get("frozen_at", 0.0),
        resume_steps=figures.get("resume_steps", []))
    # the network path may need a moment after the NIC switch, V's agent longer after a restart
    reply = await patiently(lambda: stub.Resumed(req, timeout=5, wait_for_ready=True),
                            "reporting the resume to V", patience_s)
    outcome = CutoverOutcome("resumed", figures)
    journal, entries = load_journal_entries(state_dir)
    if reply.cancel_ids and journal is not None:
        from source_agent.redundancy import cancel as cancel_mod

        live, already = split_cancel_ids(entries, list(reply.cancel_ids))
        outcome.cancelled = already  # by an earlier agent whose reports did not reach V
        if live:
            try:
                result = await asyncio.to_thread(cancel_mod.cancel, journal, live)
                outcome.cancelled += [i for i, _ in result.done]
                outcome.failed = [f"{i}: {why}" for i, why in result.failed]
            except cancel_mod.CancelError as exc:  # nothing was changed
                outcome.failed = [f"{', '.join(live)}: {exc}"]
    elif reply.cancel_ids:
        outcome.failed = [f"{i}: no redundancy journal on this host" for i in reply.cancel_ids]
    report = destination_pb2.CompletionReport(
        migration_id=remote_id, cancelled=outcome.cancelled, failed=outcome.failed,
        detail="; ".join(figures.get("resume_steps", [])))
    outcome.completion = await patiently(lambda: stub.Complete(report, timeout=30, wait_for_ready=True),
                                         "reporting the completion to V", patience_s)
    return outcome
