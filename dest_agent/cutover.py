"""V's side of cutover, resume and completion for every migration (the service delegates here).

    prepared     -> the waiting VM is built and booted in the background (Prepare with waiting_vm)
    Cutover ANNOUNCE -> the VM is checked against P; an image socket with a one-time token opens
    image in     -> ACK (point of no return once P COMMITs), the VM restores P
    Resumed      -> the agent inside the VM reports; V answers with the redundancy ids to cancel
    Complete     -> V records the completion and its figures
An aborted or failed cutover puts the migration back to ACTIVE (P runs on) and re-arms the VM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import commit_gate
from common.atomicfile import write_json_atomic
from common.config import DestConfig
from common.net_route import HostRoute, add_host_route, attempt, delete_host_route, sweep_host_routes
from dest_agent import vm_builder
from p2v.v1 import common_pb2, destination_pb2

from .image_receiver import HeldImage, ImageReceiver, ReceiveError, ReceiveResult
from .migration_record import STATE_NAMES, MigrationRecord
from .waiting_vm import (
    AdoptedVm,
    FeedError,
    SourceFacts,
    WaitingVm,
    available_kernels,
    host_has_libvirt,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 240.0


def undecided(result: ReceiveResult) -> bool:
    """After a failed receive: whether P may be off or running (V acknowledged the image and heard
    neither COMMIT nor P's ABORT). Then nothing may start the VM, nor drop it, until P's agent
    resolves it (ResolveCutover). Pure."""
    return result.acked and not result.committed and not result.aborted_after_ack


#: how the journal of a migration whose image the VM held undecided begins its error
UNDECIDED_ERROR = "cutover undecided"

#: what a restarted agent makes of a migration an earlier run journaled (`restart_verdict`)
AS_JOURNALED, VM_IS_P, INTERRUPTED = "as-journaled", "vm-is-p", "interrupted"


def restart_verdict(finished: bool, failed: bool, error: str, go_marked: bool, receipt_committed: bool) -> str:
    """Pure. VM_IS_P: the earlier run told its VM to GO (the mark, or an older agent's receipt): past
    the point of no return. INTERRUPTED: under way, or its image held undecided: what the earlier run
    held is to be found again (CutoverDesk.settle_orphans) and the migration reads failed unless its
    VM still holds an acknowledged image. AS_JOURNALED: finished while that run lived."""
    if go_marked or receipt_committed:
        return VM_IS_P
    if not finished or (failed and error.startswith(UNDECIDED_ERROR)):
        return INTERRUPTED
    return AS_JOURNALED


#: what a waiting VM an earlier run of this agent left answers on its feed (`CutoverDesk._adopt`)
ADOPTED, EMPTY, SILENT = "adopted", "empty", "silent"

#: how long V's agent, told to stop, lets a cutover whose helper is connected run on (P is frozen:
#: the move ends in seconds, and ending it is better than making P wait out an abort)
STOP_WAIT_S = 10.0

#: V's verdicts on P's word about a cutover (`resolve_verdict`)
VM_RUNS, START_VM, DROP, NOTHING_HELD = "vm-runs", "start-vm", "drop", "nothing-held"
#: how long ResolveCutover waits for a receiver still waiting for COMMIT (P's helper is gone: its
#: socket's end comes soon); then P's agent asks again
RESOLVE_WAIT_S = 20.0


def resolve_verdict(result: ReceiveResult | None, point_of_no_return: bool, dropped: bool,
                    source_committed: bool) -> str:
    """What V does when P's agent resolves a cutover its helper left (ResolveCutover). Pure.

    VM_RUNS: COMMIT reached V before (or an earlier word): the VM is P; P must stay off, whatever
    it meant. START_VM / DROP: V holds an acknowledged image undecided: P's word decides, and binds
    V (P powers off / runs on after the answer). NOTHING_HELD: no image is held (never acknowledged,
    P said ABORT, or dropped since): V never starts one; P runs on."""
    if point_of_no_return or (result is not None and result.committed):
        return VM_RUNS
    if result is not None and undecided(result) and not dropped:
        return START_VM if source_committed else DROP
    return NOTHING_HELD


def operator_attention(migration_id: str, undecided_held: bool, silent_vm: str, cancel_failed: bool) -> str:
    """What V's operator must do about a migration (empty: nothing). Pure.

    An image held undecided waits for P's word: P's agent gives it when it can; only the operator
    can when P is off and its agent is gone. A waiting VM that did not answer after a restart of this
    agent may be P (a restored VM has no feed): only someone who can see it may destroy it."""
    if undecided_held:
        return (f"V holds P's acknowledged image undecided: P's agent resolves it when it can; if P is off, "
                f"run `p2vctl resolve {migration_id} --p-is-off` here (V starts the VM), if P runs, "
                f"`p2vctl resolve {migration_id} --p-runs-on`")
    if silent_vm:
        return (f"its waiting VM {silent_vm} did not answer after this agent restarted: it may be P; once you "
                f"know it is not, destroy it (virsh destroy {silent_vm})")
    if cancel_failed:
        return "the OS runs in the VM, but part of P's redundancy was not cancelled there: see the VM's agent log"
    return ""


class ResolveError(RuntimeError):
    """V cannot answer yet (still receiving) or could not start the VM: P's agent falls back to its
    own note (power off once committed)."""


@dataclass
class CutoverState:
    vm: WaitingVm | None = None
    vm_start: asyncio.Task | None = None
    vm_start_error: str = ""
    receive: asyncio.Task | None = None
    receiver: ImageReceiver | HeldImage | None = None  # the last attempt's (or the adopted image): it starts the VM
    result: ReceiveResult | None = None
    dropped: bool = False  # P's word (abort, cancel, resolve): the held image is never started
    last_error: str = ""
    point_of_no_return: bool = False
    resumed: destination_pb2.ResumedRequest | None = None
    resumed_received_at: float = 0.0
    completion: destination_pb2.CompletionReport | None = None
    completed_at: float = 0.0
    attempts: int = 0
    receipt: dict = field(default_factory=dict)  # the attempt's figures an earlier run of V's agent left (reload)
    silent_vm: str = ""  # the waiting VM an earlier run left, which did not answer on its feed
    ack_route: HostRoute | None = None  # V's route to P while the image comes (ack_route)


#: V's minimum retransmission timeout towards P while the image comes. The rig's e1000 drops what it
#: receives for 1 s after P brings it up after CREATE_IMAGE (and longer at times): an ACK of the image
#: that V sends in that second is lost and waited for the kernel's 200 ms minimum, then 400 ms more
#: (rig, real moves: ACK -> COMMIT 0.22 s instead of 0.01 s whenever the image came in under ~0.85 s).
#: With this route V resent it at 60, 120, 236 and 464 ms (one move; the backoff still doubles after
#: the second: the socket is still in its initial slow start, so the kernel's thin-stream linear
#: timeouts do not apply).
ACK_RTO_MIN_MS = 50


def ack_route(peer: str) -> HostRoute | None:
    """V's host route to P for the cutover (ACK_RTO_MIN_MS), added before P's helper connects: a
    connection takes its route's metrics when it is made. None when there is no IPv4 peer, V has a
    host route to P of its own, or netlink refused (then V keeps the kernel's timers)."""
    if not peer:
        return None
    return attempt(f"no quick-retransmit route to {peer}",
                   lambda ipr: add_host_route(ipr, peer, rto_min_ms=ACK_RTO_MIN_MS), None, log.info)


def drop_ack_route(route: HostRoute | None) -> None:
    if route is not None:
        attempt(f"cannot remove the route to {route.dst}", lambda ipr: delete_host_route(ipr, route), None,
                log.warning)


def sweep_ack_routes() -> list[str]:
    """Remove the routes to P an earlier agent, killed mid-cutover, left (common.net_route's mark):
    at V's start, before any cutover of this agent. Returns their destinations; never raises."""
    swept = attempt("cannot look for routes an earlier agent left", sweep_host_routes, [], log.warning)
    if swept:
        log.info("removed the routes to %s an earlier agent left", ", ".join(swept))
    return swept


def add_figures(path: Path, key: str, figures: dict) -> None:
    """Add one section to a figures file (cutover.json); figures only: a failure is logged."""
    try:
        current = json.loads(path.read_text()) if path.exists() else {}
        current[key] = figures
        write_json_atomic(path, current)
    except (OSError, ValueError) as exc:
        log.warning("cannot record %s figures in %s: %s", key, path, exc)


def ack_mark_of(path: Path) -> dict:
    """The ACK mark (image_receiver) as a dict: {} when absent or unreadable."""
    try:
        mark = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return mark if isinstance(mark, dict) else {}


def gate_of(mark: dict) -> bytes | None:
    """The commit gate's record an ACK mark keeps (P's resume waits for it), None = no gate. Pure."""
    try:
        record = bytes.fromhex(str(mark["gate"]))
    except (KeyError, ValueError):
        return None
    return record if len(record) == commit_gate.RECORD_BYTES else None


def read_receipt(path: Path) -> dict:
    """An attempt's figures (cutover.json); {} when there are none or they cannot be read."""
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return figures if isinstance(figures, dict) else {}


def receipt_says_committed(figures: dict) -> bool:
    """An attempt's figures (read_receipt) saying P committed or the VM resumed: what a run of V's
    agent from before the GO mark left of a migration whose VM is P. Pure."""
    return bool(figures.get("committed")) or "resumed" in figures


class CutoverDesk:
    def __init__(self, config: DestConfig, work_root: Path) -> None:
        self.config = config
        self.work_root = Path(config.vm.work_dir) if config.vm.work_dir else work_root / "vm"
        self.states: dict[str, CutoverState] = {}

    # -- facts for check ---------------------------------------------------------------------------
    def catalog_facts(self, catalog: destination_pb2.VirtualDeviceCatalog, memory_bytes: int) -> None:
        c = self.config.vm
        catalog.cutover_supported = bool(c.enabled and host_has_libvirt() and c.image_address and c.feed_vm_ip)
        catalog.kernel_releases.extend(available_kernels(c.kernel_dir, c.modules_base))
        catalog.vm_cpu_model = c.cpu_model_name
        if memory_bytes and memory_bytes % (1 << 20) == 0:
            catalog.vm_firmware_memmap.extend(
                destination_pb2.MemoryRange(start=e.start, end=e.end, type=e.type)
                for e in vm_builder.predict_memmap(memory_bytes))

    def state(self, migration_id: str) -> CutoverState:
        return self.states.setdefault(migration_id, CutoverState())

    # -- the waiting VM ------------------------------------------------------------------------------
    def prepare(self, record: MigrationRecord, request: destination_pb2.PrepareRequest) -> None:
        """Start building and booting the waiting VM (returns at once)."""
        if not (request.waiting_vm and self.config.vm.enabled):
            return
        st = self.state(record.id)
        if st.vm is not None:
            return  # idempotent Prepare retry
        facts = SourceFacts.from_prepare(request)
        facts.reserved_slots = frozenset(s for s in (vm_builder.slot_of(a) for a in request.pci_addresses)
                                         if s is not None)
        st.vm = WaitingVm(self.config.vm, record.id, facts, self.work_root)
        AdoptedVm(st.vm.name, st.vm.feed, st.vm.disk_path).save(record.waiting_vm_path)
        st.vm_start = asyncio.create_task(self._start_vm(st), name=f"waiting-vm-{record.id}")

    async def _start_vm(self, st: CutoverState) -> None:
        assert st.vm is not None
        try:
            await asyncio.to_thread(st.vm.start)
        except Exception as exc:  # reported to P through readiness: P runs on
            st.vm_start_error = f"building the waiting VM failed: {exc}"
            log.error("waiting VM: %s", st.vm_start_error)

    async def announce(self, record: MigrationRecord, peer: str = "") -> destination_pb2.CutoverReply:
        """Open the image socket for P's helper (`peer`: P's IPv4 address, "" = unknown)."""
        st = self.state(record.id)
        if st.point_of_no_return:
            return destination_pb2.CutoverReply(ready=False, detail="this migration has passed its point of no return")
        if st.receive is not None and not st.receive.done():
            return destination_pb2.CutoverReply(ready=False, detail="a cutover is in progress already")
        if st.vm is None:
            return destination_pb2.CutoverReply(
                ready=False, detail="no waiting VM: Prepare with waiting_vm (and vm.enabled on V) first")
        if st.vm_start is not None:
            await st.vm_start
        if st.vm_start_error:
            return destination_pb2.CutoverReply(ready=False, detail=st.vm_start_error)
        ok, why = await asyncio.to_thread(st.vm.wait_ready, READY_TIMEOUT_S)
        if not ok:
            return destination_pb2.CutoverReply(ready=False, detail=why)
        if record.store is None:
            return destination_pb2.CutoverReply(ready=False, detail="the page store is closed")
        token = secrets.token_bytes(32)
        try:
            record.ack_mark_path.unlink(missing_ok=True)  # an earlier attempt's (P ran on after it)
            receiver = st.vm.receiver(record.store, record.dir / "hibernation.img", token, record.go_mark_path,
                                      record.ack_mark_path)
        except OSError as exc:
            return destination_pb2.CutoverReply(ready=False, detail=f"cannot open the image socket: {exc}")
        st.attempts += 1
        st.receiver, st.result, st.dropped = receiver, None, False
        st.ack_route = await asyncio.to_thread(ack_route, peer)
        record.set_state(common_pb2.MIGRATION_STATE_CUTOVER)
        host, port = receiver.endpoint
        st.receive = asyncio.create_task(self._receive(record, st, receiver), name=f"image-{record.id}")
        log.info("image socket open", extra={"migration": record.id, "endpoint": f"{host}:{port}"})
        layout = st.vm.pci_layout
        address = vm_builder.PciLayout.address
        return destination_pb2.CutoverReply(
            endpoint=f"{host}:{port}", token=token, ready=True, feed_mac=self.config.vm.feed_vm_mac,
            feed_pci_address=st.vm.feed_pci_address,
            vm_nic_pci_addresses=[address(s) for s in layout.nics] if layout else [],
            vm_disk_pci_addresses=[address(s) for s in layout.disks] if layout else [],
            commit_gate_address=st.vm.feed.commit_gate_address, dest_wall_ns=time.time_ns())

    async def _receive(self, record: MigrationRecord, st: CutoverState, receiver) -> None:
        try:
            st.result = await asyncio.to_thread(receiver.serve)
            st.point_of_no_return = True
            log.info("P committed; the waiting VM restores P", extra={"migration": record.id})
        except ReceiveError as exc:
            st.last_error = str(exc)
            st.result = receiver.result
            if undecided(receiver.result):
                # ACK sent, COMMIT never came: P might run on or be off. The VM keeps the image
                # loaded; only P's agent's word (resolve) starts or drops it.
                record.set_state(common_pb2.MIGRATION_STATE_FAILED, f"{UNDECIDED_ERROR}: {exc}")
                log.error("cutover undecided: the waiting VM holds P's image until P's agent resolves it",
                          extra={"migration": record.id, "error": str(exc)})
                return
            log.warning("cutover failed before the point of no return; P runs on",
                        extra={"migration": record.id, "error": str(exc)})
            record.set_state(common_pb2.MIGRATION_STATE_ACTIVE)
            if st.vm is not None:
                st.vm.rearm()
        finally:
            route, st.ack_route = st.ack_route, None
            await asyncio.to_thread(drop_ack_route, route)
            await asyncio.to_thread(record.journal)
            if st.result is not None:
                await self._write_figures(record, st)

    @staticmethod
    async def _write_figures(record: MigrationRecord, st: CutoverState, **extra: object) -> None:
        """The figures of this attempt, for operators and benchmarks (cutover.json)."""
        assert st.result is not None
        figures = {**asdict(st.result), "error": st.last_error, "attempt": st.attempts, **extra}
        await asyncio.to_thread(write_json_atomic, record.dir / "cutover.json", figures)

    async def resolve(self, record: MigrationRecord, source_committed: bool) -> destination_pb2.ResolveReply:
        """P's agent's word on a cutover its helper left (see resolve_verdict); raises ResolveError
        when V cannot answer for sure."""
        st = self.states.get(record.id)
        if st is not None and st.receive is not None and not st.receive.done():
            try:  # the receiver still waits for COMMIT; its answer comes first
                await asyncio.wait_for(asyncio.shield(st.receive), RESOLVE_WAIT_S)
            except TimeoutError:
                raise ResolveError(f"V still waits for P's helper on the image socket after {RESOLVE_WAIT_S:.0f}s; "
                                   "ask again") from None
        verdict = resolve_verdict(st.result if st else None, bool(st and st.point_of_no_return),
                                  bool(st and st.dropped), source_committed)
        log.warning("cutover resolved by P's agent", extra={
            "migration": record.id, "source_committed": source_committed, "verdict": verdict})
        if verdict == VM_RUNS:
            return destination_pb2.ResolveReply(vm_runs=True, detail="COMMIT had reached V: the VM is P")
        if verdict == NOTHING_HELD:
            return destination_pb2.ResolveReply(
                vm_runs=False, detail="V holds no acknowledged image of this migration and never starts one: P runs on")
        assert st is not None and st.receiver is not None
        if verdict == DROP:
            self.abort(record)
            record.set_state(common_pb2.MIGRATION_STATE_ACTIVE)
            await asyncio.to_thread(record.journal)
            return destination_pb2.ResolveReply(vm_runs=False, detail="V dropped the image it held: P runs on")
        st.point_of_no_return = True  # from the GO on, whatever the VM answers: never drop it
        try:
            await asyncio.to_thread(st.receiver.commit)
        except Exception as exc:
            raise ResolveError(f"V told the waiting VM to restore P, and it did not confirm: {exc}") from None
        record.set_state(common_pb2.MIGRATION_STATE_CUTOVER)
        await asyncio.to_thread(record.journal)
        await self._write_figures(record, st, resolved_by_source=True)
        log.info("P committed through its agent; the waiting VM restores P", extra={"migration": record.id})
        return destination_pb2.ResolveReply(vm_runs=True, detail="V started the VM from the image it had acknowledged")

    @staticmethod
    def _drop(st: CutoverState, reason: str) -> None:
        """P's word that it runs on: the image is never started; a VM holding it discards it."""
        st.dropped = True
        if st.receiver is not None:
            st.receiver.feed.abort(reason)

    def abort(self, record: MigrationRecord) -> None:
        st = self.states.get(record.id)
        if st is None or st.point_of_no_return:
            return
        self._drop(st, "cutover aborted by the source")
        if st.vm is not None:
            st.vm.feed.abort("cutover aborted by the source")
            st.vm.rearm()

    def past_point_of_no_return(self, record_id: str) -> bool:
        """P committed: the VM is P now (or about to be), and nothing may cancel it."""
        st = self.states.get(record_id)
        return st is not None and st.point_of_no_return

    def receiving(self, record_id: str) -> bool:
        """An image socket is open for P's helper (P may be frozen at the other end)."""
        st = self.states.get(record_id)
        return st is not None and st.receive is not None and not st.receive.done()

    def close(self, record_id: str) -> None:
        """The migration was cancelled or failed before the point of no return: drop the VM."""
        st = self.states.get(record_id)
        if st is None or st.point_of_no_return:
            return
        self._drop(st, "migration cancelled")
        if st.vm is None:
            return
        vm = st.vm
        st.vm = None
        if st.vm_start is not None and not st.vm_start.done():  # close() may run in a worker thread
            st.vm_start.get_loop().call_soon_threadsafe(st.vm_start.cancel)
        vm.destroy()

    async def stop_receiving(self, record: MigrationRecord) -> None:
        """V's agent stops (SIGTERM): a receive that P's helper has joined may end first (bounded by
        STOP_WAIT_S); one still under way then, or not joined, is abandoned as if the agent had died
        (ImageReceiver.abandon). What is left follows the receive's usual outcomes: before the ACK,
        P runs on and the migration is closed as any other; after it, the image is held undecided,
        and the VM keeps it for the next run of this agent to adopt — never dropped by a stop."""
        st = self.states.get(record.id)
        if st is None or st.receive is None or st.receive.done():
            return
        receiver = st.receiver
        if receiver is None:
            return
        if receiver.connected:
            log.warning("stopping: the cutover under way may end first", extra={"migration": record.id})
            await asyncio.wait({st.receive}, timeout=STOP_WAIT_S)
        if not st.receive.done():
            receiver.abandon("the destination agent is stopping")
            await asyncio.wait({st.receive}, timeout=10)

    # -- after a restart of this agent ------------------------------------------------------------
    def reload(self, record: MigrationRecord) -> str:
        """A migration an earlier run of this agent left (`restart_verdict`). VM_IS_P: its agent's
        report is still awaited and nothing may cancel it. INTERRUPTED: it reads failed from here on
        (settle_orphans finds out whether its VM still holds an acknowledged image)."""
        receipt = read_receipt(record.dir / "cutover.json")
        verdict = restart_verdict(
            record.finished, record.state == common_pb2.MIGRATION_STATE_FAILED, record.error,
            record.go_mark_path.exists(), receipt_says_committed(receipt))
        if verdict == VM_IS_P:
            st = self.state(record.id)
            st.point_of_no_return = True
            st.receipt = receipt  # the image's figures, for the status
        elif verdict == INTERRUPTED:
            was = UNDECIDED_ERROR if record.finished else STATE_NAMES[record.state]
            record.set_state(common_pb2.MIGRATION_STATE_FAILED,
                             f"the destination agent restarted during the migration ({was}); V never "
                             "started its VM: P runs on, start a new migration")
        return verdict

    def settle_orphans(self, records: list[MigrationRecord]) -> None:
        """The waiting VMs of migrations an earlier run of this agent left without GO, asked on their
        feeds. One that kept the acknowledged image loaded when that run's feed closed is adopted: the
        migration is undecided again, and P's word (ResolveCutover, p2vctl resolve) starts or drops
        it as before — P may be off already. One that holds nothing, or an image V never acknowledged
        (P got no ACK and runs on: the VM discards it), is destroyed. One that does not
        answer is left running: it may be P (a restored VM has no feed), and destroying P would be
        far worse than leaving a dead waiting VM to the operator. Blocking (feed, libvirt); resolve
        and cancel wait for it."""
        can_destroy = self.config.vm.enabled and host_has_libvirt()
        for record in records:
            try:
                vm = AdoptedVm.load(record.waiting_vm_path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("no record of this migration's waiting VM (%s): left as it is", exc,
                            extra={"migration": record.id})
                continue
            answer = self._adopt(record, vm)
            if answer == ADOPTED:
                continue
            if answer == SILENT:
                self.state(record.id).silent_vm = vm.name
                log.error("the waiting VM an earlier run left does not answer on its feed: it may be P (a "
                          "restored VM has none) or broken; left running — destroy it by hand (virsh destroy) "
                          "once you know it is not P", extra={"migration": record.id, "vm": vm.name})
                continue
            if can_destroy:
                vm.destroy()
                log.warning("destroyed the waiting VM an earlier run left (it held no image)",
                            extra={"migration": record.id, "vm": vm.name})

    def _adopt(self, record: MigrationRecord, vm: AdoptedVm) -> str:
        """ADOPTED (it held the acknowledged image, or restored it ahead of P's COMMIT: undecided
        again), EMPTY (it answered, holding nothing or an image never acknowledged, now discarded)
        or SILENT."""
        mark = ack_mark_of(record.ack_mark_path)
        gate = gate_of(mark)
        try:
            facts = vm.feed.connect()
        except (OSError, FeedError, ValueError) as exc:
            log.info("the waiting VM's feed does not answer (%s)", exc, extra={"migration": record.id})
            if gate is None:
                return SILENT
            # that run restored the image ahead of P's COMMIT (commit gate): P's OS waits in the VM for
            # V's record, which only P's word may release (or, P running on, the VM goes)
            vm.feed.restored_earlier(gate)
            return self._held(record, vm, int(mark.get("pages", 0)), mark.get("figures"), restored=True)
        if not facts.get("holding"):
            vm.feed.close()
            return EMPTY
        try:
            pages = vm.feed.held()
        except (OSError, FeedError, ValueError) as exc:
            vm.feed.close()
            log.error("the waiting VM holds an image but did not give it back (%s)", exc,
                      extra={"migration": record.id})
            return SILENT
        if not record.ack_mark_path.exists():
            # loaded, never acknowledged: P's helper got no ACK, so it never committed and runs on
            vm.feed.abort("never acknowledged")
            log.warning("the waiting VM held an image V never acknowledged: discarded",
                        extra={"migration": record.id, "pages": pages})
            return EMPTY
        if gate is not None:
            vm.feed.gate(gate)  # P's resume will wait for the record after the restore
        return self._held(record, vm, pages, mark.get("figures"), restored=False)

    def _held(self, record: MigrationRecord, vm: AdoptedVm, pages: int, figures: object, restored: bool) -> str:
        st = self.state(record.id)
        st.vm = vm
        st.receiver = HeldImage(record.id, vm.feed, pages, record.go_mark_path,
                                figures if isinstance(figures, dict) else None)
        st.result = st.receiver.result
        where = ("P's OS, restored in the VM ahead of P's COMMIT, waits at the commit gate" if restored
                 else "the waiting VM still holds it")
        record.set_state(common_pb2.MIGRATION_STATE_FAILED,
                         f"{UNDECIDED_ERROR}: V's agent restarted after it acknowledged P's image; {where} "
                         "until P's agent resolves the cutover (p2vctl resolve ID --p-is-off if P is off)")
        what = ("P's OS, restored ahead of P's COMMIT, waits at the commit gate" if restored
                else "the waiting VM still holds P's acknowledged image")
        log.critical(f"{what}: undecided until P's agent (or `p2vctl resolve`) says whether P is off",
                     extra={"migration": record.id, "pages": pages})
        return ADOPTED

    # -- after the move --------------------------------------------------------------------------
    def resumed(self, record: MigrationRecord, request: destination_pb2.ResumedRequest) -> destination_pb2.ResumedReply:
        st = self.state(record.id)
        st.resumed, st.resumed_received_at = request, time.time()
        st.point_of_no_return = True
        # the VM's side of the timeline next to the image's (one file for operators and benchmarks)
        add_figures(record.dir / "cutover.json", "resumed", {
            "frozen_at": request.frozen_at, "resumed_at": request.resumed_at, "unfrozen_at": request.unfrozen_at,
            "reported_at": st.resumed_received_at, "steps": list(request.resume_steps)})
        ids = [e["id"] for e in record.redundancy]
        return destination_pb2.ResumedReply(cancel_ids=ids, unload=True)

    def complete(self, record: MigrationRecord, report: destination_pb2.CompletionReport) -> None:
        st = self.state(record.id)
        st.completion, st.completed_at = report, time.time()
        record.set_state(common_pb2.MIGRATION_STATE_COMPLETED if not report.failed
                         else common_pb2.MIGRATION_STATE_FAILED,
                         "" if not report.failed else "cancellation incomplete: " + "; ".join(report.failed))

    def attention(self, record: MigrationRecord) -> str:
        """What the operator must do about this migration (`operator_attention`)."""
        st = self.states.get(record.id)
        if st is None:
            return ""
        held = (st.result is not None and undecided(st.result) and not st.dropped and not st.point_of_no_return
                and st.receiver is not None)
        cancel_failed = st.completion is not None and bool(st.completion.failed)
        return operator_attention(record.id, held, st.silent_vm, cancel_failed)

    def fill_status(self, record: MigrationRecord, status: common_pb2.MigrationStatus) -> None:
        st = self.states.get(record.id)
        if st is None:
            return
        status.point_of_no_return = st.point_of_no_return
        if st.result is not None:
            status.stats.downtime_bytes = st.result.wire_bytes
            status.stats.skipped = st.result.pages_from_store
            status.stats.cutover_pages = st.result.image_pages
        elif st.receipt:  # the image came to an earlier run of this agent
            status.stats.downtime_bytes = int(st.receipt.get("wire_bytes", 0))
            status.stats.skipped = int(st.receipt.get("pages_from_store", 0))
            status.stats.cutover_pages = int(st.receipt.get("image_pages", 0))
        if st.resumed is not None and st.resumed.unfrozen_at:
            if st.resumed.frozen_at:
                status.stats.downtime_ms = int((st.resumed.unfrozen_at - st.resumed.frozen_at) * 1000)
        if st.last_error and not st.point_of_no_return:
            status.progress.detail = f"last cutover attempt: {st.last_error}"
