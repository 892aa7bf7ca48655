"""Lifecycle step 6, resume: inside the VM, right after CREATE_IMAGE returned with in_suspend == 0,
while every other task is still frozen. Only in-process work (sysfs writes, netlink, a raw socket):
no child processes and no module loading, because user-mode helpers are disabled while frozen.

The steps are data: `plan_resume` (pure) turns what the agent knew before cutover into a list of
named actions (a "late" one runs after UNFREEZE: outside the downtime); `run_resume` executes them
in order, each bounded in time, each failure recorded and the rest still attempted (the OS is in
the VM now: the only way is forward) — except after a failed commit gate, where going forward could
make a second live copy of P: there the steps stop and the OS stays frozen (`halted`).

    enable-slots      probe the VM's NICs only: their PCI slots are enabled one by one (ACPI
                      hotplug; the kernel scans that slot alone), so the feed NIC is never probed;
                      the virtio disks' slots the same way, late. Without hotplug slots: rescan-pci
    rescan-pci        probe all of the VM's devices (drivers were loaded on P beforehand); the feed
                      NIC's function is removed before any driver binds it
    prune-stale-pci   remove every PCI function whose config space reads all-ones (device gone);
                      late: after UNFREEZE (plan_resume says why)
    remove-feed-nic   the restore program's NIC is not P's: remove its PCI function
    await-commit      the commit gate (common/commit_gate.py): V restored the image before P's COMMIT
                      reached it; wait here, before any step that puts a frame on the network, for V's
                      record of that COMMIT in the feed's shared memory. No timeout: P may be off
    adopt-nic         bond: enslave the virtual NIC (found by MAC); no bond: move the addresses and
                      routes the physical NIC had onto the virtual NIC
    lift-block        remove the traffic block
    announce          gratuitous ARP for P's addresses from the NIC that now carries them
    kick-peers        ICMP host unreachable quoting each peer's oldest unacknowledged segment (captured
                      by the helper while the block dropped it): peers resend now, not after their
                      backed-off timers (RFC 6069; added by the helper, after announce)
    fail-md-leg       md member on a physical disk -> faulty by SET_DISK_FAULTY (cancel removes it later:
                      "remove" waits for md's lock, held while md writes superblocks to the network
                      leg; measured on the rig, that froze the whole OS in the VM for minutes)
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import commit_gate
from source_agent.discovery import hw_info

log = logging.getLogger(__name__)

SYS = Path("/sys")


@dataclass
class ResumeAction:
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    late: bool = False  # after UNFREEZE (the OS runs again), not inside the downtime


@dataclass
class ActionResult:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class NicFacts:
    """What the agent knew about one of P's NICs before cutover (for adopt-nic)."""
    name: str  # the physical NIC (e.g. eth0)
    mac: str
    bond: str = ""  # the p2v bond the NIC is a slave of ("" = not bonded)
    addresses: list[tuple[str, int]] = field(default_factory=list)  # on the NIC itself (no bond)
    routes: list[tuple[str, int, str]] = field(default_factory=list)  # (dst, dst_len, gateway)


def plan_resume(nics: list[NicFacts], md_legs: list[tuple[str, str]], blocked: list[str], feed_mac: str,
                announce_ips: list[tuple[str, str]], feed_address: str = "", vm_nics: list[str] | None = None,
                vm_disks: list[str] | None = None, commit_gate: dict[str, Any] | None = None,
                slot_power: dict[str, str] | None = None) -> list[ResumeAction]:
    """The resume steps, in order. Pure.

    md_legs: (md kernel name, member name) of physical disks in p2v's arrays;
    announce_ips: (interface after adopt or "" = whichever carries the address, IPv4) to announce;
    vm_nics / vm_disks: the VM's PCI functions (V's layout; without them: one rescan of all);
    commit_gate: await_commit's arguments when V restores before P's COMMIT (None: V waits for it);
    slot_power: the hotplug slot `power` file of each VM function, found on P (slot_power_files):
    the same kernel state in the VM, where looking them up again is a scan of every slot inside the
    downtime."""
    def power_of(addresses: list[str]) -> dict[str, Any]:  # enable_slots' `power` argument, if any is known
        power = {a: slot_power[a] for a in addresses if slot_power and a in slot_power}
        return {"power": power} if power else {}

    # probe before pruning: the VM's NICs register while P's vanished ones still hold their names,
    # so no virtual NIC takes a physical NIC's name (cancellation tells them apart by name)
    if vm_nics:
        actions = [ResumeAction("enable-slots", {"addresses": list(vm_nics), "later": list(vm_disks or []),
                                                 "skip": feed_address, **power_of([*vm_nics, *(vm_disks or [])])})]
    else:
        actions = [ResumeAction("rescan-pci", {"skip": feed_address} if feed_address else {})]
    if feed_mac:  # (when rescan already removed it unprobed, this only checks it is gone)
        actions.append(ResumeAction("remove-feed-nic", {"mac": feed_mac, **({"address": feed_address}
                                                                            if feed_address else {})}))
    if commit_gate:  # before the first step that may send: until P committed, P may still run
        actions.append(ResumeAction("await-commit", dict(commit_gate)))
    for nic in nics:
        actions.append(ResumeAction("adopt-nic", asdict(nic)))
    actions.append(ResumeAction("lift-block", {"interfaces": list(blocked)}))
    for ifname, ip in announce_ips:
        actions.append(ResumeAction("announce", {"interface": ifname, "ip": ip}))
    # only now: failing a leg makes md write its superblock to the network leg, which needs the
    # virtual NIC in service and the block lifted (else md's lock is held until nbd times out)
    actions += [ResumeAction("fail-md-leg", {"md": md, "member": member}) for md, member in md_legs]
    # late: removing P's dead functions costs 0.2-0.3 s under TCG (the e1000's unregistering) and
    # nothing before UNFREEZE needs them gone: the NIC is down since the snapshot (link_cycle: no
    # watchdog touches the dead device), the bond's new slave took over, the VM's devices never
    # sit on P's slots (vm_builder)
    actions.append(ResumeAction("prune-stale-pci", late=True))
    if vm_nics and vm_disks:  # only cancellation needs them (md's local leg in the VM)
        actions.append(ResumeAction("enable-slots", {"addresses": list(vm_disks), **power_of(vm_disks)}, late=True))
    return actions


# --- actions ---------------------------------------------------------------------------------------

def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


SET_DISK_FAULTY = 0x929  # _IO(MD_MAJOR, 0x29), linux/raid/md_u.h


def encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev(): how md's ioctls take a device number."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def fail_md_leg(md: str, member: str) -> str:
    base = SYS / "block" / md / "md" / f"dev-{member}"
    if not base.exists():
        return f"{member} is no member of {md} any more"
    # SET_DISK_FAULTY, as `mdadm --fail` does: md handles it without the array's reconfiguration lock,
    # which md's own thread holds while it writes superblocks to the NBD leg (its TCP connection still
    # in retransmission backoff right after the move: the sysfs "faulty" write waited 3.5 s for it)
    major, minor = (int(x) for x in (base / "block" / "dev").read_text().split(":"))
    fd = os.open(f"/dev/{md}", os.O_RDONLY)
    try:
        fcntl.ioctl(fd, SET_DISK_FAULTY, encode_dev(major, minor))
    finally:
        os.close(fd)
    return f"{member} of {md} failed"


def _config_dead(dev: Path) -> bool:
    try:
        with open(dev / "config", "rb") as f:
            head = f.read(4)
    except OSError:
        return True
    return head == b"\xff\xff\xff\xff"


def prune_stale_pci() -> str:
    removed = []
    for dev in sorted((SYS / "bus/pci/devices").iterdir()):
        if _config_dead(dev):
            try:
                _write(dev / "remove", "1")
                removed.append(dev.name)
            except OSError as exc:
                log.warning("removing %s: %s", dev.name, exc)
    return "removed " + (", ".join(removed) if removed else "nothing")


def rescan_pci(skip: str = "") -> str:
    """Find the VM's devices. `skip`: a PCI function (the waiting VM's feed NIC, not P's) removed
    before a driver makes a NIC of it: registering a netdev and unregistering it again costs ~0.3 s
    of the downtime under TCG. PCI binds new functions whatever drivers_autoprobe says, but the
    virtio bus honours its own: with it off, virtio-pci binds and the virtio devices wait; the feed
    NIC's function goes; the others are probed."""
    if not skip:
        _write(SYS / "bus/pci/rescan", "1")
        return "rescanned"
    virtio = SYS / "bus/virtio"
    before = {d.name for d in (virtio / "devices").iterdir()}
    _write(virtio / "drivers_autoprobe", "0")
    try:
        _write(SYS / "bus/pci/rescan", "1")
        removed = ""
        function = SYS / "bus/pci/devices" / skip
        if function.exists():
            _write(function / "remove", "1")
            removed = f", {skip} removed unprobed"
    finally:
        _write(virtio / "drivers_autoprobe", "1")
    probed = []
    for dev in sorted(d for d in (virtio / "devices").iterdir() if d.name not in before):
        try:
            _write(virtio / "drivers_probe", dev.name)
        except OSError as exc:
            log.info("probing %s: %s", dev.name, exc)
        if (dev / "driver").exists():
            probed.append(dev.name)
    return f"rescanned{removed}; probed {', '.join(probed) or 'nothing'}"


def slot_power_files(addresses: list[str]) -> dict[str, Path] | None:
    """The hotplug slot `power` file of each bus-0 function's slot; None when one has none."""
    slots = SYS / "bus/pci/slots"
    by_slot: dict[str, Path] = {}
    for d in (slots.iterdir() if slots.is_dir() else ()):
        try:
            by_slot[(d / "address").read_text().strip()] = d / "power"
        except OSError:
            continue
    out = {}
    for address in addresses:
        power = by_slot.get(address.rsplit(".", 1)[0])  # "0000:00:0a.0" sits in slot "0000:00:0a"
        if power is None:
            return None
        out[address] = power
    return out


def enable_slots(addresses: list[str], later: list[str] | None = None, skip: str = "",
                 power: dict[str, str] | None = None) -> str:
    """Probe just these functions: their slots are enabled one by one (ACPI hotplug: the kernel scans
    that slot, binds its driver and the virtio bus probes the device, all inside the write). A PCI
    rescan instead probes every new function: under TCG ~110-175 ms of virtio-pci probe each (rig,
    initcall_debug), the feed NIC's and the disk's included. Without hotplug slots for all of
    `addresses` and `later`: rescan_pci(skip), which finds everything now. `power`: the slots' files as
    found before the cutover (plan_resume); looked up here when one is missing."""
    wanted = [*addresses, *(later or [])]
    files = {a: Path(power[a]) for a in wanted if power and a in power}
    if len(files) < len(wanted) or not all(f.exists() for f in files.values()):
        files = slot_power_files(wanted)
    if files is None:
        return rescan_pci(skip) + " (no hotplug slots)"
    pending = [a for a in addresses if not (SYS / "bus/pci/devices" / a).exists()]
    for address in pending:
        _write(files[address], "1")
    missing = [a for a in pending if not (SYS / "bus/pci/devices" / a).exists()]
    if missing:
        raise RuntimeError(f"slot enabled, no function at {', '.join(missing)}")
    return "enabled " + (", ".join(pending) if pending else "nothing (all present)")


def _netdev_by_mac(mac: str, exclude_masters: bool = True, exclude: str = "") -> str | None:
    for d in sorted((SYS / "class/net").iterdir()):
        if d.name == exclude:
            continue
        try:
            addr = (d / "address").read_text().strip().lower()
        except OSError:
            continue
        is_physical = (d / "device").exists()
        if addr == mac.lower() and (is_physical or not exclude_masters):
            # a bond's slaves report the bond's MAC: the VM's NIC is the one not yet enslaved
            if not (d / "master").exists():
                return d.name
    return None


def wait_netdev_by_mac(mac: str, timeout_s: float = 10.0, exclude: str = "") -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        name = _netdev_by_mac(mac, exclude=exclude)
        if name:
            return name
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new NIC with MAC {mac} appeared within {timeout_s:.0f}s")
        time.sleep(0.05)


def remove_feed_nic(mac: str, address: str = "") -> str:
    if address and not (SYS / "bus/pci/devices" / address).exists():
        return f"feed NIC {address} absent: never probed, or removed before a driver bound it"
    name = _netdev_by_mac(mac)
    if not name:
        try:
            name = wait_netdev_by_mac(mac, timeout_s=3)
        except TimeoutError:
            return "feed NIC not present"
    # the netdev's device is the virtio device; the PCI function that can be removed is above it
    address = hw_info(SYS.parent, SYS / "class/net" / name / "device").pci_address
    if not address:
        raise RuntimeError(f"{name} sits on no PCI function")
    _write(SYS / "bus/pci/devices" / address / "remove", "1")
    return f"removed {name} ({address})"


def _change_addresses(ipr, op: str, index: int, ifname: str, addresses: list) -> None:
    """Add or delete IPv4 addresses on one link; one that is already there (or gone) is logged."""
    for address, prefixlen in addresses:
        try:
            ipr.addr(op, index=index, address=address, prefixlen=int(prefixlen))
        except Exception as exc:
            log.info("address %s/%s %s on %s: %s", address, prefixlen, op, ifname, exc)


def adopt_nic(name: str, mac: str, bond: str = "", addresses: list | None = None,
              routes: list | None = None) -> str:
    """The VM's NIC (P's MAC) takes P's NIC `name`'s place: in p2v's bond, or with its IPv4
    addresses and gateway routes. P's NIC is still there, dead (its PCI function goes after
    UNFREEZE) and with P's MAC too: it is never the one adopted, and without a bond it is taken
    down and its addresses off, else P's subnet would still route through it."""
    new = wait_netdev_by_mac(mac, exclude=name)
    if bond:
        # ioctls and sysfs only: this runs inside the downtime, and pyroute2's IPRoute (an asyncio
        # core of its own) costs ~0.1 s under TCG before it sends anything (lift-block measured
        # 85 -> 11 ms on the same change)
        from source_agent.link_cycle import set_admin_up

        set_admin_up(new, False)  # bonding enslaves only a link that is down, and then opens it
        _write(SYS / "class/net" / bond / "bonding/slaves", f"+{new}")
        set_admin_up(new, True)
        return f"{new} enslaved in {bond}"
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=new)[0]
        for old in ipr.link_lookup(ifname=name):
            ipr.link("set", index=old, state="down")
            _change_addresses(ipr, "del", old, name, addresses or [])
        ipr.link("set", index=idx, state="up")
        _change_addresses(ipr, "add", idx, new, addresses or [])
        for dst, dst_len, gateway in routes or []:
            try:
                kw = {"dst": f"{dst}/{dst_len}"} if dst else {"dst": "0.0.0.0/0"}
                ipr.route("replace", oif=idx, gateway=gateway or None, **kw)
            except Exception as exc:
                log.info("route %s via %s on %s: %s", dst, gateway, new, exc)
        return f"{new} carries {name}'s addresses"


def lift_block(interfaces: list[str]) -> str:
    from source_agent import traffic_block

    lifted = traffic_block.lift(interfaces)
    return "lifted on " + (", ".join(lifted) if lifted else "nothing")


def garp_frame(mac: str, ip: str) -> bytes:
    """An ARP request announcing ip at mac (sender = target = ip), broadcast."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = socket.inet_aton(ip)
    eth = b"\xff" * 6 + hw + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + addr + b"\x00" * 6 + addr
    return eth + arp


def _interface_with(ip: str) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            if a.get_attr("IFA_ADDRESS") == ip:
                return ipr.get_links(a["index"])[0].get_attr("IFLA_IFNAME")
    raise LookupError(f"no interface carries {ip}")


def announce(ip: str, interface: str = "", count: int = 3) -> str:
    """Gratuitous ARP for ip, from `interface` or whichever interface carries ip now."""
    interface = interface or _interface_with(ip)
    mac = (SYS / "class/net" / interface / "address").read_text().strip()
    frame = garp_frame(mac, ip)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((interface, 0))
        for _ in range(count):
            s.send(frame)
    return f"{count} gratuitous ARP for {ip} from {interface} ({mac})"


#: the largest step the gate makes to P's clock: the restore's error is a second or two; a larger
#: one means something else is off (V's clock jumped since P measured its offset): left alone
MAX_CLOCK_STEP_S = 60.0


def clock_at_gate(v_now_ns: int | None, p_minus_v_s: float | None, since_s: float,
                  now_s: float) -> tuple[float | None, str]:
    """What P's wall clock should read now: V's clock as its beacon last wrote it next to the commit
    record (half a beacon period old on average), plus P's offset from V's clock (taken at
    ANNOUNCE), plus the time since that reading. The restore advanced P's clocks by the time it was
    away in whole seconds of the CMOS clock (rig: 0.3-1.5 s short). (None, why) when that is not
    known to a few ms: no offset, or no live beacon (an older V, or a gate reached after it
    stopped). Pure."""
    if p_minus_v_s is None:
        return None, "no offset from V's clock"
    if not v_now_ns:
        return None, "no live clock from V next to its record"
    target = v_now_ns / 1e9 + commit_gate.BEACON_PERIOD_S / 2 + p_minus_v_s + since_s
    if abs(target - now_s) > MAX_CLOCK_STEP_S:
        return None, f"a step of {target - now_s:+.1f} s is more than the restore's error"
    return target, ""


def set_realtime(seconds: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, seconds)


def await_commit(address: int, token: str, migration_id: str, memory_path: str = "/dev/mem",
                 retry_s: float = 1.0, p_minus_v_s: float | None = None,
                 set_clock: Callable[[float], None] = set_realtime) -> str:
    """The commit gate (common/commit_gate.py): returns once V's record of P's COMMIT is in the ring.
    Never gives up, not even when the ring cannot be mapped (V checked /dev/mem in the restore
    kernel, the same build): going on without P's word could make two live copies of the OS. Then
    P's wall clock is set from V's (clock_at_gate), before anything reads it in the VM."""
    if address < 0 or address % mmap.PAGESIZE:
        raise ValueError(f"the ring's address {address:#x} is not a page's")
    t0, faults = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    record = commit_gate.commit_record(bytes.fromhex(token), migration_id)  # only now: not in the image
    while True:
        try:
            memory = commit_gate.map_physical(address, memory_path)
            break
        except OSError as exc:
            log.error("the commit gate cannot map the ring at %#x (%s); retrying", address, exc)
            time.sleep(retry_s)
    v_now_ns = None
    try:
        commit_gate.await_record(memory, record)
        if p_minus_v_s is not None:
            try:
                v_now_ns = commit_gate.v_clock_now_ns(memory)
            except Exception as exc:  # the clock is a nicety: the gate has opened, whatever happens to it
                log.warning("V's clock next to the record unreadable: %s", exc)
        seen = time.monotonic()
    finally:
        memory.close()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults  # pages read back from disk
    said = f"V's record of P's COMMIT after {(time.monotonic() - t0) * 1000:.0f} ms ({faults} major faults)"
    if p_minus_v_s is None:
        return said
    target, why = clock_at_gate(v_now_ns, p_minus_v_s, time.monotonic() - seen, time.time())
    if target is None:
        return f"{said}; clock left as restored: {why}"
    step = target - time.time()
    try:
        set_clock(target)
    except Exception as exc:  # never a reason to stop at the gate: the clock stays as the restore left it
        return f"{said}; clock left as restored (off by {step:+.3f} s): {exc}"
    return f"{said}; clock set from V's ({step:+.3f} s)"


def kick_peers(quotes: list[str]) -> str:
    """Cut the peers' retransmission backoff short (source_agent/peer_kick.py)."""
    from source_agent import peer_kick

    sent = peer_kick.kick(bytes.fromhex(q) for q in quotes)
    return f"{sent} ICMP for {len(quotes)} peer connection(s)"


ACTIONS: dict[str, Callable[..., str]] = {
    "fail-md-leg": fail_md_leg, "prune-stale-pci": prune_stale_pci, "rescan-pci": rescan_pci,
    "enable-slots": enable_slots,
    "remove-feed-nic": remove_feed_nic, "await-commit": await_commit, "adopt-nic": adopt_nic,
    "lift-block": lift_block,
    "announce": announce, "kick-peers": kick_peers,
}


#: Steps whose failure ends the resume: what follows them is safe only once they succeeded (the commit
#: gate: without V's record of P's COMMIT, P may still run, and the next steps put P's addresses on
#: the network). A dead VM is the lesser harm: the operator resolves the cutover (p2vctl resolve).
STOP_ON_FAILURE = frozenset({"await-commit"})
NOT_RUN = "not run: an earlier step the rest depends on failed"


def kernel_log_marker(path: str = "/dev/kmsg") -> Callable[[str], None]:
    """A writer of "p2v-resume: ..." lines into the kernel's log: the VM's dmesg then shows each resume
    step between the kernel's own messages on one clock (what the restore of P's devices, the
    probing of the VM's and the steps each took). Never raises; a no-op where the log cannot be opened."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return lambda text: None

    def mark(text: str) -> None:
        try:
            os.write(fd, f"<6>p2v-resume: {text}\n".encode())
        except OSError:
            pass

    return mark


def run_resume(actions: list[ResumeAction], registry: dict[str, Callable[..., str]] | None = None,
               mark: Callable[[str], None] | None = None) -> list[ActionResult]:
    """Run the steps in order (see the module's docstring); `mark` hears how each ended (only that: the
    kernel lets a burst of ten lines through /dev/kmsg, and a step starts where the one before ended)."""
    registry = registry or ACTIONS
    mark = mark or (lambda text: None)
    results: list[ActionResult] = []
    for i, action in enumerate(actions):
        t0 = time.monotonic()
        fn = registry.get(action.name)
        if fn is None:
            results.append(ActionResult(action.name, False, "unknown action", 0.0))
        else:
            try:
                detail = fn(**action.args)
                results.append(ActionResult(action.name, True, detail, time.monotonic() - t0))
            except Exception as exc:
                results.append(ActionResult(action.name, False, f"{type(exc).__name__}: {exc}",
                                            time.monotonic() - t0))
        mark(describe(results[-1:])[0])
        if action.name in STOP_ON_FAILURE and not results[-1].ok:
            results += [ActionResult(rest.name, False, NOT_RUN, 0.0) for rest in actions[i + 1:]]
            break
    return results


def halted(results: list[ActionResult]) -> bool:
    """A step in STOP_ON_FAILURE failed: the OS must stay frozen (no UNFREEZE). Pure."""
    return any(r.name in STOP_ON_FAILURE and not r.ok for r in results)


def describe(results: list[ActionResult]) -> list[str]:
    return [f"{r.name}: {'ok' if r.ok else 'FAILED'} {r.detail} ({r.seconds * 1000:.0f} ms)" for r in results]


def pid_is_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
