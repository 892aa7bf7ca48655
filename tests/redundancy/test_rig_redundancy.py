"""Device redundancy for real, on the rig: P is a QEMU guest with Debian's kernel (bonding, md, nbd),
V's NBD export runs in the destination namespace, the TCP client in the client namespace."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from dest_agent import disk_export
from rig import config as C
from rig import workloads
from rig.core import Rig
from tests.redundancy import rigutil as u

pytestmark = [pytest.mark.rig, pytest.mark.timeout(2400)]

EXPORT_PORT = 10809
#: where P's source agent finds the redundancy journal (its state directory)
AGENT_JOURNAL = "/var/lib/p2v-source/redundancy-journal.json"


def catalog_toml(nic: bool, disk: bool, serial: str = "p2v-local") -> str:
    out = "[catalog]\n"
    if nic:
        out += '[[catalog.devices]]\ntype = "nic"\ndevice_id = "1af4:1000"\nname = "vnet0"\ndriver = "virtio_net"\n'
    if disk:
        out += (
            '[[catalog.devices]]\ntype = "disk"\ndevice_id = "1af4:1001"\nname = "vdb"\n'
            f'driver = "virtio_blk"\nserial = "{serial}"\n'
            f'export_uri = "nbd://{C.DEST_IP}:{EXPORT_PORT}/vdb"\n'
        )
    return out


@pytest.fixture
def p(rig: Rig) -> Iterator[dict]:
    """Names in P, and a journal path that is rolled back whatever the test did."""
    info = {
        "nic": u.p_nic(rig),
        "data": u.disk_by_model(rig, C.DISK_MODEL_DATA),
        "root": u.disk_by_model(rig, "P2V-ROOT"),
        "spare": u.disk_by_model(rig, C.DISK_MODEL_SPARE),
        "md": u.md_name(rig),
        "journal": f"{u.WORK}/journal-{time.time_ns()}.json",
    }
    u.sh(rig, f"mkdir -p {u.WORK}")
    workloads.wait_tcp_flowing(rig.tcp_log, min_echoes=5, timeout_s=60)
    yield info
    # whatever happened: put P back (a no-op when the test rolled back itself)
    rig.run(
        f"test -f {info['journal']} && cd {C.P_PROJECT_DIR} && "
        f"python3 -m source_agent.redundancy rollback --journal {info['journal']}",
        timeout=300,
    )


@pytest.fixture
def export(rig: Rig) -> Iterator[disk_export.DiskExport]:
    """V's export of the VM's disk image, in the destination namespace, as big as P's data disk."""
    image = rig.run_dir / "p2vt-red-vdb.raw"
    image.unlink(missing_ok=True)
    disk_export.create_image(image, rig.cfg.data_disk_mib << 20)
    exp = disk_export.start_export(image, C.DEST_IP, EXPORT_PORT, "vdb", state_dir=rig.run_dir, netns=C.NS_DEST)
    yield exp
    disk_export.stop_export(exp)
    image.unlink(missing_ok=True)


def _ignore(p: dict, *keys: str) -> str:
    return ",".join(p[k] for k in keys)


def test_discovery_inside_p(rig: Rig, p: dict) -> None:
    inv = u.red_json(rig, "discover")
    nics = {n["name"]: n for n in inv["nics"]}
    nic = nics[p["nic"]]
    assert nic["driver"] == "e1000" and nic["pci_id"] == "8086:100e" and nic["mac"] == C.P_MAC
    assert f"{C.P_IP}/{C.PREFIX_LEN}" in nic["addresses"]
    blocks = {b["name"]: b for b in inv["block_devices"]}
    assert blocks[p["md"]]["md_level"] == "raid1" and blocks[p["md"]]["md_members"] == [p["data"]]
    assert blocks[p["data"]]["driver"] == "ata_piix" and blocks[p["data"]]["holders"] == [p["md"]]
    assert inv["host_id"] == C.P_MACHINE_ID and inv["hostname"] == C.P_HOSTNAME
    assert inv["firmware_memmap"] and inv["cpu_model"]


def test_bond_keeps_tcp_session_and_rollback_restores(rig: Rig, p: dict) -> None:
    """Built with the redundancy tool into the source agent's journal, rolled back by the agent
    (`p2vctl rollback`: the agent knows no migration, it works from the journal)."""
    p["journal"] = AGENT_JOURNAL  # the fixture rolls it back whatever happens; removed below
    try:
        bond_and_rollback(rig, p)
    finally:
        rig.run(f"rm -f {AGENT_JOURNAL}")


def bond_and_rollback(rig: Rig, p: dict) -> None:
    u.wait_settled(rig, p["nic"])
    net_before, mods_before = u.net_dump(rig), u.modules(rig)
    u.put(rig, f"{u.WORK}/cat-nic.toml", catalog_toml(nic=True, disk=False))
    t0 = time.time()
    out = u.red_json(
        rig,
        f"build --catalog {u.WORK}/cat-nic.toml --ignore {_ignore(p, 'root', 'data', 'spare', 'md')} "
        f"--journal {p['journal']} --migration-id bondtest --no-initramfs",
    )
    kinds = [e["kind"] for e in out["journal"]["entries"]]
    assert kinds == ["driver-load", "bond"], kinds
    bond = out["journal"]["entries"][1]["detail"]["bond"]
    info = u.sh(rig, f"cat /proc/net/bonding/{bond}")
    assert "Bonding Mode: fault-tolerance (active-backup)" in info
    assert "fail_over_mac" not in info  # shown only when it is not "none"
    assert u.sh(rig, f"cat /sys/class/net/{bond}/bonding/fail_over_mac").split()[0] == "none"
    assert "MII Polling Interval (ms): 100" in info
    assert f"Currently Active Slave: {p['nic']}" in info and f"Primary Slave: {p['nic']}" in info
    assert u.sh(rig, f"cat /sys/class/net/{bond}/bonding/num_grat_arp").strip() == "5"
    assert u.sh(rig, f"cat /sys/class/net/{bond}/address").strip() == C.P_MAC
    assert f"{C.P_IP}/{C.PREFIX_LEN}" in u.sh(rig, f"ip -o addr show dev {bond}")
    assert f"{C.P_IP}/" not in u.sh(rig, f"ip -o addr show dev {p['nic']}")
    time.sleep(3)  # traffic over the bond
    t1 = time.time()
    res = rig.run(f"cd {C.P_PROJECT_DIR} && python3 -m p2vctl.cli rollback --json", timeout=300)
    assert res.rc == 0, f"p2vctl rollback: rc {res.rc}\n{res.err}\n{res.out}"
    rb = json.loads(res.out)
    assert rb["failed"] == [] and len(rb["undone"]) == 2, rb
    time.sleep(3)
    u.wait_settled(rig, p["nic"])
    tcp = rig.tcp_stats(since=t0 - 1)
    assert tcp.connects == 1 and tcp.reconnects == 0 and tcp.lost == 0 and tcp.bad == 0, tcp
    assert tcp.last_recv is not None and tcp.last_recv > t1, "the session must flow on after rollback"
    print(
        f"bond build+rollback: longest TCP gap {tcp.max_gap_s * 1000:.0f} ms; "
        f"netlink gap {out['journal']['entries'][1]['detail']['netlink_gap_ms']} ms"
    )
    assert tcp.max_gap_s < 5.0
    assert u.net_dump(rig) == net_before
    assert u.modules(rig) == mods_before


def assert_members_equal(rig: Rig, md: str, data: str, leg: str, export: disk_export.DiskExport) -> None:
    """Block for block: pause the writer, flush, compare the data areas of both members on the host."""
    pid = u.sh(rig, f"cat {C.P_STATE_DIR}/filewriter.pid").strip()
    u.sh(rig, f"kill -STOP {pid} && sync && echo idle > /sys/block/{md}/md/sync_action; mdadm --wait /dev/{md}; sync")
    try:
        size = int(u.sh(rig, f"cat /sys/block/{md}/md/component_size")) * 1024
        a = u.sha_range(rig.machine.disks.data, u.data_offset_bytes(rig, data), size)
        b = u.sha_range(export.image, u.data_offset_bytes(rig, leg), size)
        assert a == b, "the export's data differ from the data disk's"
    finally:
        u.sh(rig, f"kill -CONT {pid}")


def test_md_leg_syncs_under_writer_matches_export_and_rolls_back(
    rig: Rig, p: dict, export: disk_export.DiskExport
) -> None:
    md = p["md"]
    md_before, mods_before = u.md_dump(rig, md), u.modules(rig)
    u.put(rig, f"{u.WORK}/cat-disk.toml", catalog_toml(nic=False, disk=True))
    u.sh(rig, f"echo 50000 > /sys/block/{md}/md/sync_speed_min")  # the writer must not throttle recovery
    try:
        out = u.red_json(
            rig,
            f"build --catalog {u.WORK}/cat-disk.toml --ignore "
            f"{_ignore(p, 'root', 'spare', 'nic')} --journal {p['journal']} "
            "--migration-id mdtest --no-initramfs --wait 900",
            timeout=960,
        )
    finally:
        u.sh(rig, f"echo system > /sys/block/{md}/md/sync_speed_min")
    kinds = [e["kind"] for e in out["journal"]["entries"]]
    assert kinds == ["driver-load", "nbd", "md-leg"], kinds
    (mirror,) = out["mirrors"]
    assert mirror["in_sync"] and mirror["write_mostly"] and mirror["bitmap"] and not mirror["faulty"]
    leg = mirror["leg"]
    assert "write_mostly" in u.sh(rig, f"cat /sys/block/{md}/md/dev-{leg}/state")
    assert u.sh(rig, f"cat /sys/block/{md}/md/bitmap/location").strip() != "none"
    assert_members_equal(rig, md, p["data"], leg, export)

    # The leg lost for good on V's side (its md superblock wiped on the export): md refuses to
    # re-add it, and the heal before a migration adds it afresh (a full recovery), as write-mostly.
    u.sh(rig, f"mdadm /dev/{md} --fail /dev/{leg} && mdadm /dev/{md} --remove /dev/{leg} && nbd-client -d /dev/{leg}")
    with open(export.image, "r+b") as image:
        image.seek(4096)  # v1.2: the superblock is 4 KiB into the member
        image.write(bytes(4096))
    uri = f"nbd://{C.DEST_IP}:{EXPORT_PORT}/vdb"
    u.sh(rig, f"echo 50000 > /sys/block/{md}/md/sync_speed_min")
    try:
        healed = u.sh(rig, f"cd {C.P_PROJECT_DIR} && python3 -c \"from source_agent.redundancy import mdmirror; "
                           f"print(mdmirror.heal_leg('{md}', '/dev/{leg}', '{uri}'))\" 2>&1", timeout=900)
    finally:
        u.sh(rig, f"echo system > /sys/block/{md}/md/sync_speed_min")
    assert "refused" in healed and "adding it afresh" in healed, healed
    assert "['reattach', 're-add', 'wait']" in healed, healed
    assert u.sh(rig, f"cat /sys/block/{md}/md/dev-{leg}/state").strip() == "in_sync,write_mostly"
    assert_members_equal(rig, md, p["data"], leg, export)
    files = rig.verify_files()
    assert files.ok, files
    rb = u.red_json(rig, f"rollback --journal {p['journal']}")
    assert rb["failed"] == [] and len(rb["undone"]) == 3
    assert u.md_dump(rig, md) == md_before
    assert u.modules(rig) == mods_before
    assert rig.run(f"test -e /sys/block/{leg}/pid").rc != 0, "nbd still connected"


def test_export_gone_mid_sync_clear_error_p_runs_rollback_works(
    rig: Rig, p: dict, export: disk_export.DiskExport
) -> None:
    md = p["md"]
    md_before, mods_before = u.md_dump(rig, md), u.modules(rig)
    u.put(rig, f"{u.WORK}/cat-disk.toml", catalog_toml(nic=False, disk=True))
    u.sh(rig, f"echo 2000 > /sys/block/{md}/md/sync_speed_max")  # slow: the export goes while it syncs
    try:
        u.red_json(
            rig,
            f"build --catalog {u.WORK}/cat-disk.toml --ignore {_ignore(p, 'root', 'spare', 'nic')} "
            f"--journal {p['journal']} --migration-id gonetest --no-initramfs",
        )
        for _ in range(60):
            st = u.red_json(rig, f"status --journal {p['journal']}")["mirrors"][0]
            if st["fraction"] > 0:
                break
            time.sleep(1)
        assert st["recovering"] and not st["in_sync"], st
        assert disk_export.stop_export(export)
        res = u.red(rig, f"wait --journal {p['journal']} --timeout 180", timeout=240)
    finally:
        u.sh(rig, f"echo system > /sys/block/{md}/md/sync_speed_max")
    assert res.rc == 2, res
    assert "error:" in res.err and ("failed (faulty)" in res.err or "no longer a member" in res.err), res.err
    # P runs on, on its own disk: the array settles (write-pending, seen once, is md recording the failed leg)
    settled = ("clean", "active", "active-idle")
    assert u.wait_array_state(rig, md, settled) in settled
    pids_before = rig.workload_pids()
    time.sleep(2)
    assert rig.workload_pids() == pids_before and all(pids_before.values())
    rb = u.red_json(rig, f"rollback --journal {p['journal']}")
    assert rb["failed"] == [], rb
    assert u.md_dump(rig, md) == md_before
    assert u.modules(rig) == mods_before
    assert rig.verify_files().ok


def test_bad_input_changes_nothing(rig: Rig, p: dict) -> None:
    net_before, md_before, mods_before = u.net_dump(rig), u.md_dump(rig, p["md"]), u.modules(rig)
    u.put(
        rig,
        f"{u.WORK}/cat-bad.toml",
        '[catalog]\n[[catalog.devices]]\ntype = "gpu"\ndevice_id = "10de:1234"\nname = "g0"\ndriver = "nv"\n',
    )
    res = u.red(rig, f"plan --catalog {u.WORK}/cat-bad.toml")
    assert res.rc == 2 and "unknown device type 'gpu'" in res.err, res
    # a plan made for a NIC that has vanished since
    u.put(rig, f"{u.WORK}/cat-nic.toml", catalog_toml(nic=True, disk=False))
    saved = f"{u.WORK}/plan.json"
    u.red_json(
        rig, f"plan --catalog {u.WORK}/cat-nic.toml --ignore {_ignore(p, 'root', 'data', 'spare', 'md')} --save {saved}"
    )
    plan = json.loads(u.sh(rig, f"cat {saved}"))
    assert plan["ok"] and plan["pairs"][0]["physical"] == p["nic"]
    plan["pairs"][0]["physical"] = "eth9"
    plan["pairs"][0]["members"] = ["eth9"]
    u.put(rig, saved, json.dumps(plan))
    res = u.red(rig, f"build --plan {saved} --journal {p['journal']} --migration-id vanished --no-initramfs")
    assert res.rc == 2 and "NIC eth9 vanished since the plan was made" in res.err, res
    assert rig.run(f"test -e {p['journal']}").rc != 0 or "entries" in u.sh(rig, f"cat {p['journal']}")
    if rig.run(f"test -e {p['journal']}").rc == 0:
        assert json.loads(u.sh(rig, f"cat {p['journal']}"))["entries"] == []
    assert u.net_dump(rig) == net_before and u.md_dump(rig, p["md"]) == md_before and u.modules(rig) == mods_before
    assert rig.run("true").ok


ADMIN_MD = "/dev/md/admin"
LOCAL_SERIAL = "p2v-local"
TAP = "p2vt-red-tap0"


def _admin_dump(rig: Rig) -> dict:
    return {
        "bond": u.sh(
            rig,
            "ip -d -j link show admbond0 | sed 's/\"stats64\".*//'; cat /proc/net/bonding/admbond0 "
            "| grep -v 'Link Failure Count'",
        ),
        "slave": u.sh(rig, "ip -j link show admdum0"),
        "md": u.md_dump(rig, u.sh(rig, f"basename $(readlink -f {ADMIN_MD})").strip()),
    }


@pytest.fixture
def restart_rig_after(rig: Rig) -> Iterator[None]:
    """This test moves P onto hot-plugged virtio devices, as the migration would: afterwards the rig
    is restarted so that later tests find P as it boots."""
    yield
    import subprocess

    rig.stop()
    subprocess.run(["ip", "link", "del", TAP], capture_output=True, check=False)
    (rig.run_dir / "p2vt-red-local.raw").unlink(missing_ok=True)
    rig.start()


def test_cancel_leaves_virtio_and_spares_admin_configs(
    rig: Rig, p: dict, export: disk_export.DiskExport, restart_rig_after: None
) -> None:
    import subprocess

    md = p["md"]
    # the administrator's own redundancy, made before p2v: a bond (dummy slave) and an md mirror
    u.sh(
        rig,
        "modprobe bonding max_bonds=0 && modprobe dummy numdummies=0 && "
        "ip link add admdum0 type dummy && ip link add admbond0 type bond mode active-backup miimon 100 && "
        "ip link set admdum0 master admbond0 && ip link set admbond0 up",
    )
    u.sh(
        rig,
        f"mdadm --create {ADMIN_MD} --run --quiet --level=1 --raid-devices=2 --metadata=1.2 "
        f"--name=admin /dev/{p['spare']} missing < /dev/null",
    )
    admin_md = u.sh(rig, f"basename $(readlink -f {ADMIN_MD})").strip()
    for _ in range(50):  # let the administrator's bond settle (miimon sees its slave) before the dump
        if u.sh(rig, "cat /sys/class/net/admbond0/carrier").strip() == "1":
            break
        time.sleep(0.2)
    time.sleep(1)
    admin_before = _admin_dump(rig)
    t0 = time.time()

    # p2v builds its redundancy (NIC bond + md leg) and the leg syncs
    u.put(rig, f"{u.WORK}/cat-all.toml", catalog_toml(nic=True, disk=True, serial=LOCAL_SERIAL))
    u.sh(rig, f"echo 50000 > /sys/block/{md}/md/sync_speed_min")
    built = u.red_json(
        rig,
        f"build --catalog {u.WORK}/cat-all.toml --ignore {p['root']},{admin_md} "
        f"--journal {p['journal']} --migration-id canceltest --no-initramfs --wait 900",
        timeout=960,
    )
    kinds = [e["kind"] for e in built["journal"]["entries"]]
    assert kinds == ["driver-load", "bond", "nbd", "md-leg"], kinds
    bond = built["journal"]["entries"][1]["detail"]["bond"]

    # what the migration does to the devices: virtio NIC and a separate local virtio disk appear ...
    local_img = rig.run_dir / "p2vt-red-local.raw"
    local_img.unlink(missing_ok=True)
    disk_export.create_image(local_img, rig.cfg.data_disk_mib << 20)
    rig.machine.qmp(
        "blockdev-add",
        {"driver": "raw", "node-name": "p2vtredlocal", "file": {"driver": "file", "filename": str(local_img)}},
    )
    rig.machine.qmp(
        "device_add",
        {
            "driver": "virtio-blk-pci",
            "drive": "p2vtredlocal",
            "id": "p2vtredvblk",
            "serial": LOCAL_SERIAL,
            "addr": "0x7",
        },
    )
    rig.machine.qmp(
        "netdev_add", {"type": "tap", "id": "p2vtrednet", "ifname": TAP, "script": "no", "downscript": "no"}
    )
    subprocess.run(["ip", "link", "set", TAP, "master", C.BRIDGE, "up"], check=True)
    rig.machine.qmp(
        "device_add",
        {"driver": "virtio-net-pci", "netdev": "p2vtrednet", "id": "p2vtrednic", "mac": C.P_MAC, "addr": "0x8"},
    )
    vnic = ""
    u.sh(rig, "echo 1 > /sys/bus/pci/rescan")  # as the resume step does
    for _ in range(60):
        vnic = u.sh(
            rig,
            'for d in /sys/class/net/*; do [ "$(basename $(readlink -f $d/device/driver) '
            '2>/dev/null)" = virtio_net ] && echo ${d##*/}; done; true',
        ).strip()
        if vnic and LOCAL_SERIAL in u.sh(rig, "cat /sys/block/vd*/serial 2>/dev/null; true"):
            break
        time.sleep(1)
    assert vnic, "the hot-plugged virtio NIC did not show up in P"
    # ... the resume step enslaves the virtio NIC, the physical NIC and data disk go away
    u.sh(rig, f"ip link set {vnic} down && ip link set {vnic} master {bond}")
    bdf = u.sh(rig, f"basename $(readlink -f /sys/class/net/{p['nic']}/device)").strip()
    u.sh(rig, f"echo 1 > /sys/bus/pci/devices/{bdf}/remove")
    u.sh(rig, f"echo 1 > /sys/block/{p['data']}/device/delete")
    time.sleep(3)
    assert f"Currently Active Slave: {vnic}" in u.sh(rig, f"cat /proc/net/bonding/{bond}")

    # V's instruction: cancel every id p2v reported
    report = u.red_json(rig, f"report --journal {p['journal']}")
    ids = [e["id"] for e in report["entries"]]
    res = u.red(rig, f"cancel --journal {p['journal']} --ids {','.join(ids)} --sync-timeout 900", timeout=960)
    assert res.rc == 0, res
    out = json.loads(res.out)
    assert [i for i, _ in out["done"]] == list(reversed(ids)) and out["failed"] == []
    assert "e1000" in out["unloaded"], out

    # the NIC is left on the virtio device, the md array on the local virtio disk
    assert f"{C.P_IP}/" in u.sh(rig, f"ip -o addr show dev {vnic}")
    assert rig.run(f"ip link show {bond}").rc != 0, "the bond p2v made should be dissolved"
    vdisk = u.sh(
        rig, f'for d in /sys/block/vd*; do [ "$(cat $d/serial)" = {LOCAL_SERIAL} ] && echo ${{d##*/}}; done; true'
    ).strip()
    members = u.sh(rig, f"ls /sys/block/{md}/md | grep ^dev-").split()
    assert members == [f"dev-{vdisk}"], members
    assert "in_sync" in u.sh(rig, f"cat /sys/block/{md}/md/dev-{vdisk}/state")
    assert rig.run("ls /sys/block/nbd*/pid").rc != 0, "network leg still connected"
    assert rig.verify_files().ok
    tcp = rig.tcp_stats(since=t0)
    assert tcp.connects == 1 and tcp.reconnects == 0 and tcp.lost == 0, tcp
    # the administrator's bond and array are exactly as before
    assert _admin_dump(rig) == admin_before
    # cancelled ids are not live any more: a rollback has nothing left to do
    assert u.red_json(rig, f"rollback --journal {p['journal']}")["undone"] == []


@pytest.mark.parametrize("step", ["drivers", "bond", "nbd", "md-leg", "done"])
def test_failure_at_each_step_rolls_back_exactly(rig: Rig, p: dict, export: disk_export.DiskExport, step: str) -> None:
    """A failure at any step of the build leaves P exactly as before (network, md, modules)."""
    u.wait_settled(rig, p["nic"])
    net_before, md_before, mods_before = u.net_dump(rig), u.md_dump(rig, p["md"]), u.modules(rig)
    u.put(rig, f"{u.WORK}/cat-all.toml", catalog_toml(nic=True, disk=True))
    res = u.red(
        rig,
        f"build --catalog {u.WORK}/cat-all.toml --ignore {_ignore(p, 'root', 'spare')} "
        f"--journal {p['journal']} --migration-id drill --no-initramfs --fail-at {step}",
        timeout=600,
    )
    assert res.rc == 2 and f"injected failure at step '{step}" in res.err and "(rolled back)" in res.err, res
    time.sleep(2)
    u.wait_settled(rig, p["nic"])
    assert u.net_dump(rig) == net_before
    assert u.md_dump(rig, p["md"]) == md_before
    assert u.modules(rig) == mods_before
    entries = json.loads(u.sh(rig, f"cat {p['journal']}"))["entries"]
    assert all(e["state"] == "undone" for e in entries), entries
    tcp = rig.tcp_stats()
    assert tcp.reconnects == 0 and tcp.lost == 0, tcp
