"""The destination side of a whole-OS migration on the rig, and helpers to drive and observe it.

V = the destination agent in namespace p2v-dest (10.77.0.2:7470, mutual TLS), with the waiting VM
configured on the rig's bridge: P's MAC for its NIC, a feed NIC 10.77.0.20 for the image, P's root disk
shared (the rig's stand-in for P's own storage), a separate local virtio disk for md, ttyS0 appended
to a console log and ttyS1 as a control channel socket (the rig's command server in P keeps working
once P lives in the VM). The NBD export for md's network leg is served from the same namespace.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dest_agent import disk_export
from rig import config as C
from rig.core import Rig, agent_restart_script
from rig.machine import ControlChannel, ControlError

DEST_PORT = 7470
FEED_IP = "10.77.0.20"
FEED_MAC = "52:54:00:77:00:20"
EXPORT_PORT = 10809
LOCAL_SERIAL = "p2v-local"
VM_PREFIX = C.NAME_PREFIX + "vm-"
SOURCE_STATE = "/var/lib/p2v-source"  # the source agent's default state dir (journal lives here)


@dataclass
class Destination:
    rig: Rig
    dir: Path
    config: Path
    console_log: Path
    ctl_socket: Path
    export: disk_export.DiskExport | None
    agent_log: Path

    @property
    def address(self) -> str:
        return f"{C.DEST_IP}:{DEST_PORT}"

    def vm(self) -> ControlChannel:
        return ControlChannel(self.ctl_socket)

    def vm_run(self, cmd: str, timeout: float = 60.0) -> str:
        res = self.vm().run(cmd, timeout=timeout)
        if res.rc != 0:
            raise ControlError(f"in the VM: {cmd!r} -> rc={res.rc}\n{res.out}\n{res.err}")
        return res.out


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def make_tls(rig: Rig, out: Path) -> None:
    """CA + agent certificates on the host; P gets its own (source) certificate."""
    subprocess.run([sys.executable, "-m", "p2vctl.cli", "certs", "--out", str(out)], check=True,
                   capture_output=True, timeout=120, cwd=str(rig.cfg.repo_root))
    for name in ("ca.pem", "p2v-source.pem", "p2v-source.key"):
        res = rig.run(f"mkdir -p /etc/p2v/tls && cat > /etc/p2v/tls/{name} && chmod 600 /etc/p2v/tls/{name}",
                      stdin=(out / name).read_text(), timeout=30)
        assert res.rc == 0, res.err


def remove_orphan_vm_disks(vm_dir: Path) -> list[Path]:
    """The local disks of waiting VMs that no longer exist. V drops a VM's disk with the VM, but not
    when V itself was killed (the rig's "destination dies mid-pre-copy" test): gone by the next start."""
    from rig import libvirtd

    alive = set(libvirtd.list_domains(VM_PREFIX))
    removed = [disk for disk in vm_dir.glob(f"{VM_PREFIX}*-vda.img") if disk.name[:-len("-vda.img")] not in alive]
    for disk in removed:
        disk.unlink(missing_ok=True)
    return removed


def start_destination(rig: Rig, with_export: bool = True, memory_mib: int | None = None,
                      env: dict[str, str] | None = None) -> Destination:
    """V's agent in the destination namespace (`env`: added to its environment, e.g. P2V_FAULT)."""
    d = rig.run_dir / "dest"
    shutil.rmtree(d / "state", ignore_errors=True)  # records of an earlier rig run
    remove_orphan_vm_disks(d / "vm")
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    tls = d / "tls"
    make_tls(rig, tls)
    export = None
    catalog = ('[[catalog.devices]]\ntype = "nic"\ndevice_id = "1af4:1000"\nname = "vnet0"\n'
               'driver = "virtio_net"\n')
    if with_export:
        image = d / "export-vdb.raw"
        image.unlink(missing_ok=True)
        disk_export.create_image(image, rig.cfg.data_disk_mib << 20)
        export = disk_export.start_export(image, C.DEST_IP, EXPORT_PORT, "vdb", state_dir=rig.run_dir,
                                          netns=C.NS_DEST)
        catalog += ('[[catalog.devices]]\ntype = "disk"\ndevice_id = "1af4:1001"\nname = "vdb"\n'
                    f'driver = "virtio_blk"\nserial = "{LOCAL_SERIAL}"\n'
                    f'export_uri = "nbd://{C.DEST_IP}:{EXPORT_PORT}/vdb"\n')
    console = rig.run_dir / f"{VM_PREFIX}console.log"
    ctl = rig.run_dir / f"{VM_PREFIX}ctl.sock"
    console.unlink(missing_ok=True)
    ctl.unlink(missing_ok=True)
    root = rig.machine.disks.root
    # P's data disk (md's physical leg) stays at its IDE position too: when the slave of a PATA
    # channel vanishes across the move, Debian 6.1's libata error handling disables the master as
    # well (P's root disk). Resume fails the md leg on it at once; md then runs on its network leg.
    data = rig.machine.disks.data
    config = d / "dest.toml"
    config.write_text(f"""[agent]
listen = "{C.DEST_IP}:{DEST_PORT}"
state_dir = "{d / 'state'}"
log_level = "info"

[tls]
ca = "{tls / 'ca.pem'}"
cert = "{tls / 'p2v-dest.pem'}"
key = "{tls / 'p2v-dest.key'}"
allowed_peers = ["p2v-source", "p2vctl"]

[limits]
max_memory_bytes = {(memory_mib or 8192) << 20}

[vm]
enabled = true
bridge = "{C.BRIDGE}"
image_address = "{C.DEST_IP}"
feed_vm_ip = "{FEED_IP}/{C.PREFIX_LEN}"
feed_vm_mac = "{FEED_MAC}"
name_prefix = "{VM_PREFIX}"
work_dir = "{d / 'vm'}"
console_log = "{console}"
control_socket = "{ctl}"
shared_ide_disks = {_toml_list([f"{root}:0:0:raw:P2V-ROOT", f"{data}:0:1:raw:{C.DISK_MODEL_DATA}"])}
disk_bytes = {rig.cfg.data_disk_mib << 20}
disk_serial = "{LOCAL_SERIAL}"
run_as_root = true
cpu_model = "{C.P_CPU_MODEL}"
cpu_features = {_toml_list(list(C.P_CPU_FEATURES))}

[catalog]
{catalog}""")
    agent_log = rig.run_dir / "dest-agent.log"
    agent_log.unlink(missing_ok=True)
    dest = Destination(rig, d, config, console, ctl, export, agent_log)
    start_agent(dest, env)
    return dest


def start_agent(dest: Destination, env: dict[str, str] | None = None) -> None:
    """(Re)start V's agent on the destination's config and state; returns once it serves."""
    ready = dest.dir / "ready"
    ready.unlink(missing_ok=True)
    dest.rig.spawn("dest-agent", [sys.executable, "-m", "dest_agent.main", "--config", str(dest.config),
                                  "--ready-file", str(ready), "--text-logs"], env=env)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("destination agent not ready:\n" + dest.agent_log.read_text()[-3000:])
        time.sleep(0.2)


def agent_running(dest: Destination) -> bool:
    return dest.rig.pids.get("dest-agent") is not None


def p2vctl_on_v(dest: Destination, *argv: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """p2vctl run by V's operator (in V's namespace, with the operator's certificate) against V's agent."""
    tls = dest.dir / "tls"
    return subprocess.run(
        ["ip", "netns", "exec", C.NS_DEST, sys.executable, "-m", "p2vctl.cli", *argv, "--agent", dest.address,
         "--server-name", "p2v-dest", "--ca", str(tls / "ca.pem"), "--cert", str(tls / "p2vctl.pem"),
         "--key", str(tls / "p2vctl.key"), "--json"],
        capture_output=True, text=True, timeout=timeout_s, cwd=str(dest.rig.cfg.repo_root))


def restart_source_agent_in_vm(dest: Destination, timeout_s: float = 300) -> None:
    """The source agent inside the VM (P's, moved) started again, as systemd's Restart= would after
    it died; returns once it is ready."""
    dest.vm_run(agent_restart_script(), timeout=60)
    deadline = time.monotonic() + timeout_s
    while "ready" not in dest.vm_run(f"test -e {C.P_AGENT_READY_FILE} && echo ready || true", timeout=30):
        if time.monotonic() > deadline:
            raise TimeoutError("the source agent in the VM is not ready:\n"
                               + dest.vm_run(f"tail -n 30 {C.P_AGENT_LOG}", timeout=30))
        time.sleep(1)


def stop_destination(dest: Destination) -> None:
    dest.rig.stop_process("dest-agent")
    if dest.export is not None:
        disk_export.stop_export(dest.export)


def build_redundancy(rig: Rig, timeout_s: float = 900.0) -> dict:
    """P's redundancy for the move, with the redundancy engineer's tool: bond over the e1000, md leg
    over NBD to V's export (waits until in sync). Journal where the source agent looks for it."""
    cat = "/var/lib/p2v-rig-e2e/catalog.toml"
    text = ('[catalog]\n[[catalog.devices]]\ntype = "nic"\ndevice_id = "1af4:1000"\nname = "vnet0"\n'
            'driver = "virtio_net"\n[[catalog.devices]]\ntype = "disk"\ndevice_id = "1af4:1001"\nname = "vdb"\n'
            f'driver = "virtio_blk"\nserial = "{LOCAL_SERIAL}"\nexport_uri = "nbd://{C.DEST_IP}:{EXPORT_PORT}/vdb"\n')
    res = rig.run(f"mkdir -p {Path(cat).parent} {SOURCE_STATE} && cat > {cat}", stdin=text)
    assert res.rc == 0, res.err
    def disk(model: str) -> str:
        return rig.run(f"for d in /sys/block/sd*; do [ \"$(cat $d/device/model | sed 's/ *$//')\" = {model} ] "
                       "&& echo ${d##*/}; done; true", check=True).out.strip()

    # P's root is the rig's shared storage (the VM opens the same file); the spare disk is unused
    ignore = ",".join(d for d in (disk("P2V-ROOT"), disk(C.DISK_MODEL_SPARE)) if d)
    md = rig.run(f"basename $(readlink -f {C.P_MD_DEVICE})", check=True).out.strip()
    rig.run(f"echo 50000 > /sys/block/{md}/md/sync_speed_min", check=True)
    res = rig.run(f"cd {C.P_PROJECT_DIR} && python3 -m source_agent.redundancy build --catalog {cat} "
                  f"--ignore {ignore} --journal {SOURCE_STATE}/redundancy-journal.json "
                  f"--migration-id rig-e2e --no-initramfs --wait {int(timeout_s) - 60}", timeout=timeout_s)
    assert res.rc == 0, f"redundancy build failed: {res.err}\n{res.out}"
    return json.loads(res.out)


def wait_agent_answers(rig: Rig, timeout_s: float = 180.0) -> None:
    """Until P's agent answers on its socket (under TCG, right after the md resync, it can be slow)."""
    deadline = time.monotonic() + timeout_s
    while True:
        res = rig.run(f"cd {C.P_PROJECT_DIR} && python3 -m p2vctl.cli discover --json > /dev/null", timeout=90)
        if res.rc == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"P's agent does not answer: {res.err[-500:]}")
        time.sleep(2)


def start_migration(rig: Rig, dest: Destination, extra: str = "") -> None:
    """p2vctl migrate inside P, in the background (P's control channel ends with P)."""
    wait_agent_answers(rig)
    cmd = (f"cd {C.P_PROJECT_DIR} && nohup setsid python3 -u -m p2vctl.cli migrate {dest.address} {extra} "
           f"> {C.P_STATE_DIR}/migrate.out 2>&1 < /dev/null &")
    res = rig.run(cmd, timeout=30)
    assert res.rc == 0, res.err


def wait_p_off(rig: Rig, timeout_s: float, look_every_s: float = 15.0) -> float:
    """When P powered off. p2vctl's output in P is looked at now and then: a migration that ended
    while P runs (p2vctl's error, a final state) will not power it off, and is reported at once."""
    deadline = time.monotonic() + timeout_s
    next_look = time.monotonic() + look_every_s
    while time.monotonic() < deadline:
        if not rig.machine.alive():
            return time.time()
        if time.monotonic() > next_look:
            next_look = time.monotonic() + look_every_s
            try:  # short: P may be frozen for its cutover, and P's power-off is what is timed
                out = rig.machine.ctl.run(f"cat {C.P_STATE_DIR}/migrate.out", timeout=2, transfer_s=1).out
            except ControlError:
                out = ""
            if "p2vctl: migrate:" in out or "p2vctl: watch:" in out or final_state(out):  # watch: stepped out
                raise AssertionError(f"p2vctl migrate ended while P runs:\n{out[-1500:]}")
        time.sleep(0.2)
    raise TimeoutError(f"P still running after {timeout_s:.0f}s")


def vm_console_text(dest: Destination) -> str:
    try:
        return dest.console_log.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def wait_vm_command(dest: Destination, cmd: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            return dest.vm_run(cmd, timeout=30)
        except (ControlError, OSError) as exc:
            last = str(exc)
            time.sleep(1)
    raise TimeoutError(f"VM control channel: {cmd!r} did not succeed in {timeout_s:.0f}s: {last}")


def vm_kernel_tail(dest: Destination, lines: int = 25) -> str:
    """The VM console's last kernel/restore lines (workload lines left out): what to read when the OS
    did not come back in the VM."""
    keep = [ln for ln in vm_console_text(dest).splitlines() if "P2V-COUNTER" not in ln]
    return "\n".join(keep[-lines:])


def wait_migration_end_in_vm(dest: Destination, timeout_s: float, ended=None) -> str:
    """p2vctl migrate's output, read inside the VM once it names a final state (or `ended` says it
    ended). The control channel answers only once the OS runs on in the VM: until the deadline,
    silence is waited out."""
    ended = ended or final_state
    deadline = time.monotonic() + timeout_s
    out, last = "", ""
    while time.monotonic() < deadline:
        try:
            out = dest.vm_run(f"cat {C.P_STATE_DIR}/migrate.out", timeout=30)
        except (ControlError, OSError) as exc:
            last = str(exc)
            time.sleep(2)
            continue
        if ended(out):
            return out
        time.sleep(2)
    raise TimeoutError(f"no final state inside the VM after {timeout_s:.0f}s (control channel: {last or 'ok'})\n"
                       f"migrate output: {out[-1500:]}\nVM console:\n{vm_kernel_tail(dest)}")


def quote(s: str) -> str:
    return shlex.quote(s)


def counter_stats_both(rig: Rig, dest: Destination):
    """The counter as seen on P's console and then the VM's (ttyS0 of both, appended)."""
    from rig.observers import counter_from_console

    return counter_from_console([rig.machine.console_log, dest.console_log])


def final_state(migrate_output: str) -> str:
    """'completed' / 'failed' / 'cancelled' from p2vctl migrate's summary line, '' while running."""
    import re

    m = re.search(r"migration \S+: (completed|failed|cancelled|rolled_back)", migrate_output)
    return m.group(1) if m else ""


def destination_round(dest: Destination) -> int:
    """The pre-copy round V's newest migration record is in (0 = none yet)."""
    metas = sorted((dest.dir / "state" / "migrations").glob("*/meta.json"), key=lambda p: p.stat().st_mtime)
    if not metas:
        return 0
    try:
        return int(json.loads(metas[-1].read_text()).get("round", 0))
    except (OSError, ValueError):
        return 0
