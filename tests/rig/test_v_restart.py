"""V's agent killed between its ACK of P's image and P's COMMIT (fault injection, $P2V_FAULT on V):
P's helper sends COMMIT into the dead socket and powers P off — the image in the waiting VM is all
that is left of the OS. The waiting VM keeps it; V's agent started again on the same state adopts
it, and V's operator, who sees P off, starts it (`p2vctl resolve ID --p-is-off`). Asserted from
outside: the move completes, the same processes run in the VM, the client's TCP session never broke.
Before the ACK and GO marks and the adoption, this fault lost the OS.

In the same run, P's agent (in the VM by then) is killed right after the resume, before it tells V
($P2V_FAULT on P): the agent started next in the VM finds its journal and reports the resume again,
and V records the move complete; `p2vctl migrate`, which followed the move from P into the VM, waits
for that agent and follows the migration to its end. Before, V never heard of it and P's redundancy
was never cancelled.

The same move through a graceful stop of V's agent instead (P2V_FAULT=dest-stopped-after-ack, as
`systemctl stop` right after the ACK): the cutover under way ends before the agent does (P's COMMIT,
then GO to the VM), and the agent started next records the move complete when the VM's agent reports
to it. Each move: without redundancy and with two pre-copy rounds, ~2-3 min on the reference box.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from rig import Rig, workloads
from rig import config as C
from rig import destination as cr

pytestmark = [pytest.mark.rig, pytest.mark.timeout(1500)]


def migrate_until_v_agent_exits(rig: Rig, dest: cr.Destination) -> tuple[dict, float]:
    """Start the move (two pre-copy rounds) once the client's session flows; return when V's agent,
    given a fault point, has left. Returns the workloads' PIDs before, and the start time."""
    workloads.wait_tcp_flowing(rig.tcp_log, min_echoes=20)
    pids_before = rig.workload_pids()
    t0 = time.time()
    cr.start_migration(rig, dest, extra="--max-rounds 2")
    deadline = time.monotonic() + 1200
    while cr.agent_running(dest):
        assert time.monotonic() < deadline, "V's agent never reached its fault point"
        time.sleep(0.2)
    return pids_before, t0


def assert_same_processes_and_session(rig: Rig, dest: cr.Destination, pids_before: dict, t0: float):
    """The workloads run in the VM with the PIDs they had on P, and the client's TCP session never
    broke since `t0`. Returns the session's figures."""
    vm = dest.vm_run(f"for n in counter echo filewriter; do echo $n $(cat {C.P_STATE_DIR}/$n.pid) "
                     "$(kill -0 $(cat " + C.P_STATE_DIR + "/$n.pid) 2>/dev/null && echo alive); done")
    for name, pid in pids_before.items():
        assert f"{name} {pid} alive" in vm, vm
    tcp = rig.tcp_stats(since=t0)
    assert tcp.reconnects == 0 and tcp.lost == 0 and tcp.duplicated == 0 and tcp.bad == 0, tcp
    return tcp


def test_v_killed_after_ack_the_next_agent_adopts_the_image(rig_restarted_after: Rig) -> None:
    rig = rig_restarted_after
    dest = cr.start_destination(rig, with_export=False, env={"P2V_FAULT": "dest-killed-after-ack"})
    try:
        rig.restart_agent(env={"P2V_FAULT": "agent-killed-after-resume"})
        pids_before, t0 = migrate_until_v_agent_exits(rig, dest)
        assert "P2V_FAULT=dest-killed-after-ack" in dest.agent_log.read_text()
        cr.wait_p_off(rig, timeout_s=120)  # COMMIT went into the dead socket: P is past its point of no return
        (record,) = (dest.dir / "state" / "migrations").iterdir()
        assert (record / "ack.json").exists() and not (record / "go.json").exists()

        cr.start_agent(dest)  # the same state; no fault
        # V's operator sees what waits for them (`p2vctl list` over mutual TLS), once V has asked its VM
        deadline = time.monotonic() + 180
        while True:
            listed = cr.p2vctl_on_v(dest, "list", "--unfinished")
            rows = json.loads(listed.stdout.strip().splitlines()[-1]).get("migrations", []) if listed.stdout else []
            if rows and rows[0]["attention"]:
                break
            assert time.monotonic() < deadline, listed.stdout + listed.stderr
            time.sleep(2)
        assert rows[0]["status"]["migration_id"] == record.name, rows
        assert f"p2vctl resolve {record.name} --p-is-off" in rows[0]["attention"], rows
        resolved = cr.p2vctl_on_v(dest, "resolve", record.name, "--p-is-off")  # answered once V has asked its VM
        said = json.loads(resolved.stdout.strip().splitlines()[-1])
        assert resolved.returncode == 0 and said["vm_runs"], resolved.stdout + resolved.stderr
        assert "started the VM from the image it had acknowledged" in said["detail"], said
        assert "still holds P's acknowledged image" in dest.agent_log.read_text()  # adopted, not rebuilt

        # the OS resumed in the VM, and its agent died before its report: p2vctl waits to re-attach
        cr.wait_migration_end_in_vm(dest, timeout_s=600, ended=lambda text: "p2vctl: lost the agent" in text)
        log = dest.vm_run(f"grep -h 'agent-killed-after-resume' {C.P_AGENT_LOG} | tail -n 2", timeout=30)
        assert "killing myself" in log, log
        meta = record / "meta.json"
        assert json.loads(meta.read_text())["state"] != "completed"

        cr.restart_source_agent_in_vm(dest)  # as systemd would; it reports the resume again
        deadline = time.monotonic() + 300
        while json.loads(meta.read_text())["state"] != "completed":
            assert time.monotonic() < deadline, dest.vm_run(f"tail -n 20 {C.P_AGENT_LOG}", timeout=30)
            time.sleep(1)
        journal = json.loads(dest.vm_run("cat $(ls -t /var/lib/p2v-source/migrations/*.json | head -1)", timeout=30))
        assert journal["resumed"] and journal["completed"] and journal["state"] == "MIGRATION_STATE_COMPLETED", journal
        out = cr.wait_migration_end_in_vm(dest, timeout_s=120)  # p2vctl followed the next agent to the end
        print("\nmigrate output in the VM:\n" + out[-1500:])
        assert cr.final_state(out) == "completed" and "follow migration" in out, out[-2000:]
        tcp = assert_same_processes_and_session(rig, dest, pids_before, t0)
        print(f"\nfigures: client gap {tcp.max_gap_s:.2f}s (V's restart and the operator's word inside it), "
              f"complete {time.time() - t0:.1f}s after start")
    finally:
        cr.stop_destination(dest)


def test_v_stopped_after_ack_lets_the_cutover_end_and_the_next_agent_records_it(rig_restarted_after: Rig) -> None:
    rig = rig_restarted_after
    dest = cr.start_destination(rig, with_export=False, env={"P2V_FAULT": "dest-stopped-after-ack"})
    try:
        pids_before, t0 = migrate_until_v_agent_exits(rig, dest)
        log = dest.agent_log.read_text()
        assert "P2V_FAULT=dest-stopped-after-ack: stopping this agent" in log, log[-3000:]
        cr.wait_p_off(rig, timeout_s=120)
        (record,) = (dest.dir / "state" / "migrations").iterdir()
        # the stop waited for the cutover: P's COMMIT came, and V told the VM GO before it exited
        marks = sorted(p.name for p in record.iterdir())
        assert "ack.json" in marks and "go.json" in marks, marks
        meta = record / "meta.json"
        assert json.loads(meta.read_text())["state"] != "completed"

        cr.start_agent(dest)  # the same state; no fault: the VM's agent, retrying its report, finds it
        deadline = time.monotonic() + 300
        while json.loads(meta.read_text())["state"] != "completed":
            assert time.monotonic() < deadline, dest.agent_log.read_text()[-3000:]
            time.sleep(1)
        out = cr.wait_migration_end_in_vm(dest, timeout_s=300)
        print("\nmigrate output in the VM:\n" + out[-1500:])
        assert cr.final_state(out) == "completed", out[-2000:]
        # the image's figures come from the receipt the stopped agent left (the next one never saw it)
        cutover_bytes = re.search(r"cutover (\d+) B, (\d+) pages from V's store", " ".join(out.split()))
        assert cutover_bytes and int(cutover_bytes[1]) > 0 and int(cutover_bytes[2]) > 0, out[-2000:]
        tcp = assert_same_processes_and_session(rig, dest, pids_before, t0)
        print(f"\nfigures: client gap {tcp.max_gap_s:.2f}s, complete {time.time() - t0:.1f}s after start")
    finally:
        cr.stop_destination(dest)
