"""The mission in one module: P (a QEMU/TCG "physical" machine with an e1000 NIC, IDE disks, md on
its data disk and three workloads) moves into a waiting VM on V without a restart.

Order matters (one rig; after the last test P lives in the VM and the rig is restarted for later tests):
1. a check that must refuse (V cannot give P's memory size) says why and changes nothing;
2. a migration whose destination dies mid-pre-copy leaves P running unchanged;
3. a cutover whose agent and helper are killed right after the snapshot (fault injection,
   $P2V_FAULT): the agent started next puts P back;
4. a cutover whose helper is killed right after V acknowledged the image (V restored it ahead in
   the VM, which waits at the commit gate: V must drop that VM on P's word); with md's network leg
   failed, the migration is refused before pre-copy (the VM keeps only that leg), then the leg comes
   back; then a rehearsal (`migrate --rehearse`: FREEZE, snapshot, the image sent and verified on V,
   then P runs on). Each leaves P as it was: workloads, TCP session, addresses, traffic block, md,
   the NIC's link, the bond's timers, the cutover route and ARP pin, the image size;
5. the whole move, asserted from outside: same counter PID and no reset, the client's TCP session
   never reconnected and lost or duplicated no line, P's IP and MAC answer from the VM, file checksums
   on md match, P is powered off, in the VM the bond holds only the virtio NIC and md only the local
   virtio disk, the agent is no longer running.
Figures (downtime, client gap, bytes) are printed, not asserted (they go to bench/e2e.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from rig import Rig, libvirtd, observers, workloads
from rig import config as C
from rig import destination as cr
from rig.machine import ControlError
from rig.observers import parse_counter_file

P_NIC = "eth0"  # P's e1000 (the rig's "physical" NIC)

pytestmark = [pytest.mark.rig, pytest.mark.timeout(2400)]


def p_state(rig: Rig) -> dict:
    """What must not change when a migration is aborted."""
    out = rig.run("ip -br addr; echo '#'; tc qdisc show; echo '#'; cat /proc/mdstat; echo '#'; "
                  f"for n in counter echo filewriter; do cat {C.P_STATE_DIR}/$n.pid; done; echo '#';"
                  f"cat {C.P_AGENT_PIDFILE}", check=True, timeout=30).out
    parts = out.split("#\n")
    # md: without recovery progress, and without members' index numbers (a leg re-added may get another)
    md = re.sub(r"(\w)\[\d+\]", r"\1", re.sub(r"\[[=>.]*\].*", "", parts[2]))
    return {"addr": parts[0], "qdisc": parts[1], "md": md,
            "pids": parts[3], "agent": parts[4]}


def test_check_refuses_memory_size_v_cannot_give(rig: Rig) -> None:
    dest = cr.start_destination(rig, with_export=False, memory_mib=512)
    try:
        before = p_state(rig)
        res = rig.run(f"cd {C.P_PROJECT_DIR} && python3 -m p2vctl.cli check {dest.address} --json", timeout=120)
        verdict = json.loads(res.out)
        print("\ncheck verdict:", json.dumps(verdict, indent=1))
        assert verdict.get("ok") is not True
        codes = {r["code"]: r for r in verdict["reasons"]}
        assert "memory-size" in codes and codes["memory-size"]["blocking"]
        assert "512 MiB" in codes["memory-size"]["message"]
        # the carrier facts V gave are otherwise P's: map, kernel, CPU
        assert "firmware-map" not in codes and "kernel" not in codes, codes
        assert p_state(rig) == before  # a check changes nothing
    finally:
        cr.stop_destination(dest)


def test_destination_killed_mid_precopy_leaves_p_running(rig: Rig) -> None:
    dest = cr.start_destination(rig, with_export=False)
    try:
        workloads.wait_tcp_flowing(rig.tcp_log, min_echoes=10)
        before = p_state(rig)
        counter_before = rig.counter_stats()
        t0 = time.time()
        # throttled so that pre-copy is still running when V dies
        cr.start_migration(rig, dest, extra="--max-bandwidth 4000000")
        deadline = time.monotonic() + 300
        while cr.destination_round(dest) < 2:  # V holds round 1: pre-copy is under way
            assert time.monotonic() < deadline, rig.run(f"cat {C.P_STATE_DIR}/migrate.out").out
            time.sleep(1)
        rig.stop_process("dest-agent")  # V dies mid-pre-copy
        deadline = time.monotonic() + 240
        out = ""
        while time.monotonic() < deadline:
            out = rig.run(f"cat {C.P_STATE_DIR}/migrate.out", timeout=10).out
            if cr.final_state(out):
                break
            time.sleep(2)
        print("\nmigrate output:\n" + out[-1500:])
        assert cr.final_state(out) == "failed", out
        assert rig.power_state() == "running"
        assert p_state(rig) == before  # addresses, no traffic block, md, workload and agent pids
        counter = rig.counter_stats(since_time=None)
        assert counter.pids == counter_before.pids and counter.discontinuities == 0
        tcp = rig.tcp_stats(since=t0)
        assert tcp.reconnects == 0 and tcp.lost == 0 and tcp.duplicated == 0
        assert rig.agent_state().ready
    finally:
        cr.stop_destination(dest)
        libvirtd.remove_domains(cr.VM_PREFIX)  # the dead V's waiting VM


def test_agent_killed_with_its_helper_is_repaired_by_the_next_agent(rig: Rig) -> None:
    """The agent killed with its helper right after the snapshot: nothing in P puts it back until an
    agent starts again (systemd's Restart=); that one finds the pending cutover, puts P back and has
    V drop its waiting VM. No md leg here: P's traffic stays blocked for the agent's restart, longer
    than the NBD leg's 10 s timeout, which would fail the leg (then the migration must start over)."""
    dest = cr.start_destination(rig, with_export=False)
    try:
        workloads.wait_tcp_flowing(rig.tcp_log, min_echoes=10)
        rig.restart_agent(env={"P2V_FAULT": "agent-and-helper-killed-after-image"})
        run_until_p_runs_on(rig, dest, None, "--max-rounds 2", "agent and helper killed", agent_killed=True)
    except BaseException:
        rig.restart_agent()  # without the fault, for the tests that follow
        raise
    finally:
        cr.stop_destination(dest)
        libvirtd.remove_domains(cr.VM_PREFIX)


def link_state(rig: Rig, bond: str | None) -> dict:
    """What the cutover changes for the snapshot and must put back when P runs on (without a bond:
    P's own NIC)."""
    nics = f"$(cat /sys/class/net/{bond}/bonding/slaves)" if bond else P_NIC
    timers = (f"cat /sys/class/net/{bond}/bonding/miimon /sys/class/net/{bond}/bonding/downdelay "
              f"/sys/class/net/{bond}/bonding/slaves; ") if bond else ""
    out = rig.run(f"{timers}for s in {nics}; "
                  f"do cat /sys/class/net/$s/carrier /sys/class/net/$s/operstate; done; echo '#'; "
                  f"ip route show {C.DEST_IP}; echo '#'; cat /sys/power/image_size", check=True, timeout=30).out
    parts = out.split("#\n")
    return {"bond": parts[0].split(), "route": parts[1].strip(), "image_size": parts[2].strip()}


def wait_migrate_output(rig: Rig, timeout_s: float, ended=cr.final_state) -> str:
    """p2vctl's output once it has a final state (or `ended` says so). P's control channel is a serial
    line that the snapshot freezes and thaws (a rehearsal does not power off): a request lost then is
    asked again."""
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        try:
            out = rig.run(f"cat {C.P_STATE_DIR}/migrate.out", timeout=10).out
        except ControlError:
            continue
        if ended(out):
            return out
        time.sleep(2)
    raise TimeoutError(f"no final state after {timeout_s:.0f}s:\n{out[-1500:]}")


def run_until_p_runs_on(rig: Rig, dest: cr.Destination, bond: str | None, options: str, what: str,
                        agent_killed: bool = False, md_before: str | None = None) -> str:
    """A migration that must end with P running on as it was (a rehearsal, a cutover that fails
    after the snapshot): asserted from outside. Returns p2vctl's output. `agent_killed`: the agent
    dies with its helper; P is put back by the agent started next (as systemd's Restart= would).
    `md_before`: md as it must be afterwards (it was healthy then; the migration brings it back)."""
    before, links_before = p_state(rig), link_state(rig, bond)
    if md_before is not None:
        before["md"] = md_before
    counter_before = rig.counter_stats()
    disks_before = set((dest.dir / "vm").glob("*-vda.img"))
    t0 = time.time()
    cr.start_migration(rig, dest, extra=options)
    if agent_killed:
        out = wait_migrate_output(rig, timeout_s=1200,
                                  ended=lambda text: "p2vctl: lost the agent" in text or cr.final_state(text))
        assert "p2vctl: lost the agent" in out, out  # the agent is gone; p2vctl waits for the next one
        rig.restart_agent()
        deadline = time.monotonic() + 120
        recovered = ""
        while "cutover recovered" not in recovered and time.monotonic() < deadline:  # the agent's last word on it
            recovered = rig.run(f"grep -h 'interrupted cutover' {C.P_AGENT_LOG} | tail -n 3", timeout=30).out
            time.sleep(1)
        print(f"\n{what}: the next agent: {recovered}")
        assert "cutover recovered" in recovered and "V told" in recovered, recovered
        # the client, blocked all along, is told to resend now (the helper's note), not after its backoff
        assert "ICMP for 1 peer connection(s)" in recovered, recovered
        before.pop("agent")
        # p2vctl re-attached and heard from the next agent what became of the migration (its journal)
        out = wait_migrate_output(rig, timeout_s=180)
        said = " ".join(out.split())  # p2vctl's human output wraps at the terminal's width
        assert cr.final_state(out) == "failed" and "the source agent stopped during the cutover" in said, out
    else:
        out = wait_migrate_output(rig, timeout_s=1200)
    print(f"\n{what} output:\n" + out[-1200:])
    assert rig.power_state() == "running"
    time.sleep(3)  # the NIC negotiates again and the bond takes its timers back
    now = p_state(rig)
    if agent_killed:
        now.pop("agent")
    assert now == before  # addresses, no traffic block, md, workload and agent pids
    links = link_state(rig, bond)
    assert links == links_before, (links, links_before)  # carrier, timers, no cutover route, image_size
    assert "initcwnd" not in links["route"], links
    neigh = rig.run(f"ip neigh show {C.DEST_IP}", timeout=30).out
    assert "PERMANENT" not in neigh, neigh  # V's entry was pinned for the cutover only
    counter = rig.counter_stats(since_time=None)
    assert counter.pids == counter_before.pids and counter.discontinuities == 0
    tcp = rig.tcp_stats(since=t0)
    assert tcp.reconnects == 0 and tcp.lost == 0 and tcp.duplicated == 0 and tcp.bad == 0
    assert tcp.last_recv is not None and tcp.last_recv > t0
    print(f"{what}: client gap {tcp.max_gap_s:.2f}s")
    # V dropped the waiting VM (P told it that it runs on, or its image stream broke off)
    deadline = time.monotonic() + 60
    while libvirtd.list_domains(cr.VM_PREFIX) and time.monotonic() < deadline:
        time.sleep(1)
    assert not libvirtd.list_domains(cr.VM_PREFIX), (
        rig.run(f"tail -n 40 {C.P_AGENT_LOG}", timeout=30).out[-4000:])
    left = set((dest.dir / "vm").glob("*-vda.img")) - disks_before
    assert not left, left  # and its local disk with it
    return out


def test_whole_os_moves_into_the_vm(rig_restarted_after: Rig) -> None:
    rig = rig_restarted_after
    dest = cr.start_destination(rig, with_export=True)
    workloads.wait_tcp_flowing(rig.tcp_log, min_echoes=20)
    built = cr.build_redundancy(rig)
    kinds = [e["kind"] for e in built["journal"]["entries"]]
    assert "bond" in kinds and "md-leg" in kinds, kinds
    bond = next(e["detail"]["bond"] for e in built["journal"]["entries"] if e["kind"] == "bond")
    md = rig.run(f"basename $(readlink -f {C.P_MD_DEVICE})", check=True).out.strip()

    # the cutover helper killed right after V's acknowledgement (P frozen, its traffic blocked, its NIC
    # down; V has restored P's image ahead in the VM, whose resume waits at the commit gate): the agent
    # puts P back by itself, and V drops that VM on P's word without ever opening the gate
    rig.restart_agent(env={"P2V_FAULT": "helper-killed-after-ack"})
    try:
        out = run_until_p_runs_on(rig, dest, bond, "--max-rounds 2", "helper killed after the ACK")
        assert cr.final_state(out) == "failed" and "the agent put P's settings back" in " ".join(out.split()), out
    finally:
        rig.restart_agent()
    receipts = (dest.dir / "state" / "migrations").glob("*/cutover.json")
    receipt = json.loads(max(receipts, key=lambda p: p.stat().st_mtime).read_text())
    assert receipt["acked"] and receipt["restored_ahead_at"] and not receipt["committed"], receipt

    # md's network leg failed and its NBD connection gone (as when P was blocked longer than nbd's
    # timeout): the migration brings it back before it relies on it (bitmap: a short resync); then a
    # rehearsal, the whole cutover up to V's acknowledgement, and P runs on as it was, md healthy
    leg = next(e["detail"]["leg"] for e in built["journal"]["entries"] if e["kind"] == "md-leg")
    healthy_md = p_state(rig)["md"]
    rig.run(f"mdadm {C.P_MD_DEVICE} --fail {leg} && nbd-client -d {leg}", check=True, timeout=60)
    out = run_until_p_runs_on(rig, dest, bond, "--max-rounds 5 --rehearse", "rehearsal", md_before=healthy_md)
    assert cr.final_state(out) == "completed" and "a rehearsal: P runs on" in " ".join(out.split()), out
    assert f"{leg.rsplit('/', 1)[-1]} of {md} brought back" in " ".join(out.split()), out
    state = rig.run(f"cat /sys/block/{md}/md/dev-{leg.rsplit('/', 1)[-1]}/state", check=True).out
    assert "in_sync" in state and "write_mostly" in state, state

    pids_before = rig.workload_pids()
    counter_before = rig.counter_stats()
    files_before = rig.verify_files()
    assert files_before.ok
    p_clock = observers.guest_clock_offset(lambda cmd: rig.run(cmd, timeout=30).out)
    t0 = time.time()
    # pre-copy does not converge under TCG (the agent itself dirties ~2000 pages/s): switch over after
    # 5 rounds; the cutover carries the rest
    cr.start_migration(rig, dest, extra="--max-rounds 5")
    off_at = cr.wait_p_off(rig, timeout_s=1500)
    assert rig.power_state() == "off"
    # P goes off promptly once committed (a frozen P that lingers holds its disks and the old NBD state)
    receipts = (dest.dir / "state" / "migrations").glob("*/cutover.json")  # the rehearsal's, then this one's
    receipt = json.loads(max(receipts, key=lambda p: p.stat().st_mtime).read_text())
    assert receipt["committed"] and off_at - receipt["committed_at"] < 60, (off_at, receipt["committed_at"])
    # the image reached the waiting VM through the feed's shared memory (ivshmem), not its network
    assert receipt["vm_feed"] == "ring", receipt
    # the OS now lives in the VM: the rig's command server answers on the VM's ttyS1
    out = cr.wait_migration_end_in_vm(dest, timeout_s=600)
    print("\nmigrate output in the VM:\n" + out[-3000:])
    if cr.final_state(out) != "completed":
        inside = dest.vm_run(f"grep -v '^\\s*$' {C.P_AGENT_LOG} | tail -n 30; dmesg | tail -n 30", timeout=60)
        pytest.fail(f"migration did not complete:\n{out[-2000:]}\nin the VM:\n{inside}")
    # p2vctl was out of P's image for the snapshot, and followed the move to its end from the VM
    assert "p2vctl steps out of P's memory image" in " ".join(out.split()), out
    time.sleep(5)  # the agent unloads itself a moment after completion
    done = time.time()

    # P's wall clock kept its offset from the host's through the move: the resume set it from V's
    # at the commit gate (the restore alone leaves it 0.3-1.5 s off, whole CMOS seconds)
    vm_clock = observers.guest_clock_offset(lambda cmd: dest.vm_run(cmd, timeout=30))
    assert p_clock and vm_clock, (p_clock, vm_clock)
    receipts = (dest.dir / "state" / "migrations").glob("*/cutover.json")
    resumed = json.loads(max(receipts, key=lambda p: p.stat().st_mtime).read_text()).get("resumed") or {}
    gate = next((step for step in resumed.get("steps", []) if step.startswith("await-commit")), "")
    print(f"\nclock: P {p_clock[0]:+.3f} s before, the VM {vm_clock[0]:+.3f} s after (readings' round trips "
          f"{p_clock[1]:.3f}, {vm_clock[1]:.3f} s); the gate: {gate}")
    assert abs(vm_clock[0] - p_clock[0]) < 0.3 + (p_clock[1] + vm_clock[1]) / 2, (p_clock, vm_clock, gate)

    # same processes, same PIDs, the counter never reset
    vm = dest.vm_run(f"for n in counter echo filewriter; do echo $n $(cat {C.P_STATE_DIR}/$n.pid) "
                     "$(kill -0 $(cat " + C.P_STATE_DIR + "/$n.pid) 2>/dev/null && echo alive); done")
    for name, pid in pids_before.items():
        assert f"{name} {pid} alive" in vm, vm
    # the counter's own log (tmpfs: it travelled in memory) is authoritative; the consoles may repeat
    # the few lines P's UART was still draining after the snapshot
    counter = parse_counter_file(dest.vm_run(f"cat {C.P_COUNTER_LOG}", timeout=120))
    print("counter on the consoles:", cr.counter_stats_both(rig, dest))
    assert counter.pids == counter_before.pids, counter.pids
    assert counter.discontinuities == 0 and counter.missing_values == 0
    assert counter.last_value is not None and counter.last_value > (counter_before.last_value or 0)
    # the client's session never broke
    tcp = rig.tcp_stats(since=t0)
    assert tcp.connects <= 1 and tcp.reconnects == 0 and tcp.lost == 0 and tcp.duplicated == 0 and tcp.bad == 0
    assert tcp.last_recv is not None and tcp.last_recv > off_at, "no echo from the VM after P powered off"
    # P's IP and MAC answer from the VM
    arp = subprocess.run(["ip", "netns", "exec", C.NS_CLIENT, "sh", "-c",
                          f"ping -c 2 -W 2 {C.P_IP} >/dev/null; ip neigh show {C.P_IP}"],
                         capture_output=True, text=True, timeout=30).stdout
    assert C.P_MAC in arp.lower(), arp
    # the NIC is the virtio one: either the bond's only slave, or (cancel dissolved the bond onto it,
    # its MAC being the bond's) the interface that carries P's address itself
    bonded = dest.vm_run(f"cat /proc/net/bonding/{bond} 2>/dev/null || true")
    if bonded.strip():
        slaves = re.findall(r"Slave Interface: (\S+)", bonded)
        assert len(slaves) == 1, bonded
        carrier = slaves[0]
        assert C.P_IP in dest.vm_run(f"ip -br addr show {bond}")
    else:
        carrier = dest.vm_run(f"ip -o -4 addr show | grep ' {C.P_IP}/' | cut -d' ' -f2").strip()
    driver = dest.vm_run(f"basename $(readlink -f /sys/class/net/{carrier}/device/driver)").strip()
    assert driver == "virtio_net", (carrier, driver)
    assert "e1000" not in dest.vm_run("ls /sys/bus/pci/drivers; cat /proc/modules | cut -d' ' -f1")
    # md holds only the local virtio disk; every file checksum matches
    mdstat = dest.vm_run(f"cat /proc/mdstat; ls /sys/block/{md}/md/ | grep dev-")
    members = re.findall(r"dev-(\S+)", mdstat)
    assert members and all(m.startswith("vd") for m in members), mdstat
    local_serial = dest.vm_run(f"cat /sys/block/{members[0]}/serial").strip()
    assert local_serial == cr.LOCAL_SERIAL
    check = json.loads(dest.vm_run(f"python3 {C.P_RIG_DIR}/verify_files.py {C.P_FILES_DIR}",
                                   timeout=120).strip().splitlines()[-1])
    # the writer went on in the VM (its sequence grew); every file in its window checks out
    assert check["last_seq"] > files_before.last_seq and check["checked"] > 0, check
    assert not check["bad"] and not check["missing"], check
    # the agent unloaded itself
    agent = dest.vm_run(f"pgrep -f '[s]ource_agent[.]main' || echo none; cat {C.P_AGENT_LOG} | tail -n 5")
    assert agent.startswith("none"), agent
    print(f"\nfigures: P off {off_at - t0:.1f}s after start, complete {done - t0:.1f}s, "
          f"client gap {tcp.max_gap_s:.2f}s, counter gap {counter.max_gap_s:.2f}s")
