"""The rig itself: build (cold and cached), boot P, workloads observed from outside, the control
channel, bonding/md/nbd inside P, and a teardown that leaves nothing behind.

Timings on the reference box (2 cores, TCG, see rig/README.md): the whole module takes about 1.5 min
with a warm cache; a cold base build (debootstrap + wheels) adds about 1-2 min.
The build and boot times are printed, not asserted: how fast a TCG guest boots is the host's
speed, and the rig's own start timeouts already fail a boot that never ends.
Set P2V_RIG_TEST_COLD=1 to force the base layer to be rebuilt in test_build_cold_and_cached.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from rig import Rig, RigConfig, libvirtd, teardown
from rig import config as C
from rig.build import build
from tests.conftest import later_tests_use_the_rig

pytestmark = [pytest.mark.rig, pytest.mark.timeout(1800)]


def test_build_cold_and_cached(rig_config: RigConfig) -> None:
    first = build(rig_config, force_base=os.environ.get("P2V_RIG_TEST_COLD") == "1")
    for path in (first.root_image, first.kernel, first.initrd):
        assert path.stat().st_size > 0
    print(f"\nfirst build: {first.seconds:.1f}s (base {'cached' if first.base_cached else 'built'} "
          f"{first.base_seconds:.1f}s, image {'cached' if first.image_cached else 'built'})")

    second = build(rig_config)
    print(f"cached build: {second.seconds:.3f}s")
    assert second.base_cached and second.image_cached
    assert second.image_hash == first.image_hash

    # a project source change costs only the fast layer (the salt stands for a source change, and
    # keeps the image a running rig may use untouched)
    changed = dataclasses.replace(rig_config, image_salt=f"test-{time.time_ns()}")
    third = build(changed)
    print(f"project layer rebuild: {third.seconds:.1f}s")
    assert third.base_cached and not third.image_cached
    # the image must be usable by QEMU started by libvirt too (uid libvirt-qemu)
    for path in (third.root_image, third.kernel, third.initrd):
        assert path.stat().st_mode & 0o004
        assert path.parent.stat().st_mode & 0o001


def test_p_boots_and_agent_ready(rig: Rig) -> None:
    t = rig.timings
    print(f"\nboot to ready {t.boot_to_ready_s:.1f}s, to agent ready {t.boot_to_agent_ready_s}, "
          f"rig start total {t.start_total_s:.1f}s")
    assert rig.power_state() == "running"
    agent = rig.agent_state()
    if agent.state == "absent":
        pytest.skip("source_agent.main is not in the project yet: the agent was not started")
    assert agent.ready, f"source agent {agent.state}; its log:\n{agent.log_tail}"
    assert t.boot_to_agent_ready_s is not None


def test_p_identity(rig: Rig) -> None:
    out = rig.run("hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; "
                  "ip -o -4 addr show dev eth0", check=True).out.split("\n")
    assert out[0] == C.P_HOSTNAME
    assert out[1] == C.P_MACHINE_ID
    assert out[2] == C.P_MAC
    assert f"{C.P_IP}/{C.PREFIX_LEN}" in out[3]


def test_control_channel(rig: Rig) -> None:
    res = rig.run("echo out; echo err >&2; exit 3")
    assert (res.rc, res.out, res.err) == (3, "out\n", "err\n")
    assert rig.run("cat", stdin="hello\nworld\n").out == "hello\nworld\n"
    big = rig.run("head -c 30000 /dev/zero | tr '\\0' x", timeout=30).out
    assert big == "x" * 30000
    assert rig.run("sleep 5", timeout=1).rc != 0  # the command's timeout is enforced inside P


def test_workloads_observed_from_outside(rig: Rig) -> None:
    pids = rig.workload_pids()
    assert all(pids.values()), pids

    # the rig is session-wide: earlier tests (pre-copy under TCG) may have made gaps before ours
    window_start = time.time()
    before_counter, before_tcp = rig.counter_stats(), rig.tcp_stats()
    time.sleep(3)
    counter, tcp = rig.counter_stats(since_time=window_start), rig.tcp_stats(since=window_start)

    # counter: one process, still counting, seen on P's console from the host
    assert counter.pids == [pids["counter"]]
    assert counter.last_value is not None and before_counter.last_value is not None
    assert counter.last_value >= before_counter.last_value + 20
    assert counter.max_gap_s < 1.0
    inside = rig.counter_stats_in_p()
    assert inside.pids == [pids["counter"]] and inside.missing_values == 0

    # TCP session from the client namespace: one connection, every line echoed, flowing
    assert tcp.healthy, tcp
    assert tcp.received >= before_tcp.received + 40
    assert tcp.max_gap_s < 1.0

    # checksummed files on the md disk
    files = rig.verify_files()
    assert files.ok, files
    assert files.writer_pids == [str(pids["filewriter"])]
    md = rig.run(f"cat /proc/mdstat; findmnt -n -o SOURCE {C.P_DATA_MOUNT}", check=True).out
    assert "raid1" in md and "[2/1]" in md


def _spare_disk(rig: Rig) -> str:
    script = ("for d in /sys/block/sd*; do m=$(sed 's/ *$//' $d/device/model); "
              f"[ \"$m\" = {C.DISK_MODEL_SPARE} ] && echo /dev/${{d##*/}}; done; true")  # any disk order
    disk = rig.run(script, check=True).out.strip()
    assert disk.startswith("/dev/sd"), disk
    return disk


def test_bonding_raid1_nbd_in_p(rig: Rig) -> None:
    rig.run("modprobe bonding && modprobe raid1 && modprobe nbd", check=True)
    assert rig.run("lsmod | grep -E '^(bonding|raid1|nbd) ' | wc -l").out.strip() == "3"

    # a bond, then gone again
    rig.run("ip link add p2vtbond0 type bond mode active-backup miimon 100", check=True)
    try:
        mode = rig.run("cat /sys/class/net/p2vtbond0/bonding/mode", check=True).out
        assert mode.startswith("active-backup")
    finally:
        rig.run("ip link del p2vtbond0", check=True)
    assert rig.run("test -e /sys/class/net/p2vtbond0").rc != 0

    # a degraded RAID1 on the spare IDE disk, then gone again
    spare = _spare_disk(rig)
    rig.run(f"mdadm --create /dev/md/p2vtest --run --quiet --level=1 --raid-devices=2 "
            f"--metadata=1.2 {spare} missing", check=True, timeout=60)
    try:
        detail = rig.run("mdadm --detail /dev/md/p2vtest", check=True).out
        assert "degraded" in detail and "raid1" in detail
    finally:
        rig.run("mdadm --stop /dev/md/p2vtest", check=True)
        rig.run(f"mdadm --zero-superblock {spare}", check=True)
        rig.run("rm -f /dev/md/p2vtest", check=True)  # no udev in P to drop the name
    mdstat = rig.run("cat /proc/mdstat", check=True).out
    assert mdstat.count(" : active") == 1 and "md127" in mdstat

    # nbd: the block devices exist and nbd-client is there to connect them
    assert rig.run("test -b /dev/nbd0 && command -v nbd-client").rc == 0

    # P's own data array was not touched
    assert "[2/1]" in rig.run("cat /proc/mdstat", check=True).out
    assert rig.verify_files().ok


def test_dest_namespace_reaches_p(rig: Rig) -> None:
    probe = (f"import socket; s = socket.create_connection(('{C.P_IP}', {C.ECHO_PORT}), timeout=5); "
             "s.sendall(b'dest-probe\\n'); print(s.makefile().readline().strip())")
    res = subprocess.run(["ip", "netns", "exec", C.NS_DEST, sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.strip() == "dest-probe", res.stdout + res.stderr
    # the host itself has no address on the rig's bridge
    addrs = subprocess.run(["ip", "-o", "addr", "show", "dev", C.BRIDGE], capture_output=True, text=True)
    assert addrs.stdout.strip() == ""


PROBE_DOMAIN = f"""<domain type='qemu'>
  <name>{C.NAME_PREFIX}teardown-probe</name>
  <memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>
</domain>"""


def test_teardown_leaves_nothing(rig: Rig, tmp_path, request: pytest.FixtureRequest) -> None:
    # leftovers of the kinds later tests create: a process in the destination namespace and a
    # libvirt domain (defined and running)
    rig.spawn("teardown-probe", ["sleep", "600"])
    xml = tmp_path / "probe.xml"
    xml.write_text(PROBE_DOMAIN)
    assert libvirtd.virsh("define", str(xml)).returncode == 0
    assert libvirtd.virsh("start", f"{C.NAME_PREFIX}teardown-probe").returncode == 0
    assert teardown.leftovers(rig.run_dir)["domains"] == [f"{C.NAME_PREFIX}teardown-probe"]

    # as after a crash: a separate process that knows nothing but the rig's names and run dir
    res = subprocess.run([sys.executable, "-m", "rig", "down"], capture_output=True, text=True,
                         timeout=120, cwd=str(C.REPO_ROOT))
    assert res.returncode == 0, res.stderr
    left = teardown.leftovers(rig.run_dir)
    assert left == {"processes": [], "qemu_pids": [], "namespaces": [], "links": [], "domains": []}
    assert rig.power_state() == "off"

    # the `rig` fixture is session-wide: bring it back for tests that run after this one
    if later_tests_use_the_rig(request):
        rig.start()
