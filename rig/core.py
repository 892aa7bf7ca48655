"""The rig as one object: build P, set up the network, start libvirtd, boot P, start the client;
observe; tear everything down."""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from rig import config as C
from rig import libvirtd, net, observers, teardown, workloads
from rig.build import BuildResult, build
from rig.config import RigConfig
from rig.lock import FileLock
from rig.machine import CommandResult, Disks, Machine, create_disks
from rig.procs import PidRegistry, spawn

log = logging.getLogger(__name__)


@dataclass
class AgentState:
    #: "ready" (ready file exists), "starting" (process alive), "absent" (source_agent.main not in the
    #: project yet), "exited" (process gone without becoming ready)
    state: str
    log_tail: str

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass
class Timings:
    build_s: float = 0.0
    boot_to_ready_s: float = 0.0  # QEMU start -> P's boot script done (workloads started)
    boot_to_agent_ready_s: float | None = None  # QEMU start -> agent ready file
    start_total_s: float = 0.0


def agent_restart_script(env: dict[str, str] | None = None) -> str:
    """Shell, in P (or in the VM that P became): stop the source agent if it runs, start it again as
    P's boot does (rig/guest/services.sh), with `env` added to its environment."""
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (f"pid=$(cat {C.P_AGENT_PIDFILE}); kill $pid 2>/dev/null; "
            "for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.2; done; "
            f"kill -9 $pid 2>/dev/null; rm -f {C.P_AGENT_READY_FILE}; "
            f"cd {C.P_PROJECT_DIR} && {{ {assigns} setsid python3 -m source_agent.main "
            f"--config {C.P_AGENT_CONFIG} --ready-file {C.P_AGENT_READY_FILE} < /dev/null "
            f">> {C.P_AGENT_LOG} 2>&1 & echo $! > {C.P_AGENT_PIDFILE}; }}")


class Rig:
    """Usage: `rig = Rig(); rig.start(); ...; rig.stop()` (or `with Rig() as rig:`)."""

    def __init__(self, cfg: RigConfig | None = None) -> None:
        self.cfg = cfg or RigConfig()
        self.run_dir = self.cfg.run_dir
        self.pids = PidRegistry(self.run_dir / "pids")
        self.build_result: BuildResult | None = None
        self.p: Machine | None = None
        self.tcp_log: Path = self.run_dir / "tcp-client.log"
        self.timings = Timings()
        self.started_at: float | None = None
        self.lock = FileLock(self.cfg.rig_dir / "rig.lock")
        self.attached_only = False

    # --- lifecycle ---------------------------------------------------------------------------------
    def build(self) -> BuildResult:
        self.build_result = build(self.cfg)
        self.timings.build_s = self.build_result.seconds
        return self.build_result

    def start(self, wait_agent: bool = True) -> None:
        """Bring the whole rig up. On failure everything started so far is removed again.
        Waits (bounded, P2V_RIG_LOCK_TIMEOUT) while another process has a rig up on this box."""
        self.lock.acquire()
        t0 = time.monotonic()
        teardown.teardown(self.run_dir)  # a clean slate: leftovers of a crashed run go first
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run_dir.chmod(0o755)
            if self.build_result is None:
                self.build()
            assert self.build_result is not None
            net.setup()
            if self.cfg.with_libvirt:
                libvirtd.ensure_running()
            disks = create_disks(self.run_dir, self.build_result.root_image, self.cfg.data_disk_mib,
                                 self.cfg.spare_disk_mib)
            self.p = Machine(C.P_VM_NAME, self.run_dir, self.build_result, disks,
                             memory_mib=self.cfg.memory_mib, smp=self.cfg.smp)
            boot_t0 = time.monotonic()
            self.started_at = time.time()
            self.p.start()
            self.p.wait_console(C.MARK_READY, self.cfg.boot_timeout_s)
            self.p.wait_control(timeout_s=60)
            self.timings.boot_to_ready_s = time.monotonic() - boot_t0
            if self.cfg.with_client:
                self.tcp_log = workloads.start_tcp_client(self.pids, self.run_dir)
            if wait_agent:
                self.wait_agent(self.cfg.agent_timeout_s)
                if self.agent_state().ready:
                    self.timings.boot_to_agent_ready_s = time.monotonic() - boot_t0
            self.timings.start_total_s = time.monotonic() - t0
            self._write_state()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> dict[str, list]:
        """Remove everything (idempotent). Returns what was removed."""
        if self.attached_only:
            raise RuntimeError("this Rig was attached to another process's rig: use `python -m rig down`")
        if not self.lock.held:
            # start() never got the lock (busy, timed out, interrupted while waiting): the rig that is
            # up belongs to another process, and tearing it down would kill that process's run
            return {}
        try:
            if self.p is not None:
                self.p.stop(timeout_s=5)
            removed = teardown.teardown(self.run_dir)
            (self.run_dir / "state.json").unlink(missing_ok=True)
        finally:
            self.lock.release()
        return removed

    def keep_reserved(self, max_hours: float = 24.0) -> None:
        """Keep the rig reserved after this process exits (CLI `up`): a holder process inherits the
        lock; teardown (`python -m rig down`) stops it."""
        proc = self.lock.hand_over(["sleep", str(int(max_hours * 3600))])
        self.pids.record(teardown.LOCK_HOLDER, proc.pid)

    def __enter__(self) -> Rig:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def attach(cls, cfg: RigConfig | None = None) -> Rig:
        """A Rig object for a rig that another process started (CLI `status`, `shell`)."""
        rig = cls(cfg)
        rig.attached_only = True
        state_path = rig.run_dir / "state.json"
        if not state_path.exists():
            raise RuntimeError(f"no running rig ({state_path} missing)")
        state = json.loads(state_path.read_text())
        b = state["build"]
        rig.build_result = BuildResult(
            root_image=Path(b["root_image"]), kernel=Path(b["kernel"]), initrd=Path(b["initrd"]),
            image_hash=b["image_hash"], base_hash=b["base_hash"], base_cached=b["base_cached"],
            image_cached=b["image_cached"], seconds=b["seconds"], base_seconds=b["base_seconds"])
        d = state["disks"]
        rig.p = Machine(C.P_VM_NAME, rig.run_dir, rig.build_result,
                        Disks(Path(d["root"]), Path(d["data"]), Path(d["spare"])),
                        memory_mib=state["memory_mib"], smp=state["smp"])
        rig.tcp_log = Path(state["tcp_log"])
        rig.started_at = state["started_at"]
        return rig

    def _write_state(self) -> None:
        assert self.p is not None and self.build_result is not None
        state = {
            "build": self.build_result.to_json(),
            "disks": {k: str(v) for k, v in vars(self.p.disks).items()},
            "memory_mib": self.p.memory_mib, "smp": self.p.smp,
            "tcp_log": str(self.tcp_log), "started_at": self.started_at,
            "timings": vars(self.timings),
            "console_log": str(self.p.console_log),
        }
        (self.run_dir / "state.json").write_text(json.dumps(state, indent=1))

    # --- P --------------------------------------------------------------------------------------------
    @property
    def machine(self) -> Machine:
        if self.p is None:
            raise RuntimeError("rig not started")
        return self.p

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False, stdin: str = "") -> CommandResult:
        """Run a shell command inside P over the serial control channel."""
        return self.machine.run(cmd, timeout=timeout, check=check, stdin=stdin)

    def agent_state(self) -> AgentState:
        script = (f"if [ -e {C.P_AGENT_READY_FILE} ]; then echo ready; "
                  f"elif [ -f {C.P_AGENT_PIDFILE} ] && kill -0 $(cat {C.P_AGENT_PIDFILE}) 2>/dev/null; "
                  "then echo starting; "
                  f"elif [ ! -f {C.P_PROJECT_DIR}/source_agent/main.py ]; then echo absent; "
                  "else echo exited; fi; "
                  f"tail -n 30 {C.P_AGENT_LOG} 2>/dev/null")
        out = self.run(script, timeout=30, check=True).out
        state, _, tail = out.partition("\n")
        return AgentState(state.strip(), tail)

    def restart_agent(self, env: dict[str, str] | None = None, timeout_s: float = 300) -> AgentState:
        """Stop P's source agent and start it again as P's boot does (rig/guest/services.sh), with
        `env` added to its environment (e.g. P2V_FAULT). Waits until it is ready."""
        self.run(agent_restart_script(env), timeout=60, check=True)
        state = self.wait_agent(timeout_s)
        if not state.ready:
            raise RuntimeError(f"the source agent did not come back: {state.state}\n{state.log_tail}")
        return state

    def wait_agent(self, timeout_s: float) -> AgentState:
        """Until the agent is ready, or it is clear that it will not be (absent/exited)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.agent_state()
            if state.state != "starting" or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    # --- observers --------------------------------------------------------------------------------
    def counter_stats(self, since_time: float | None = None) -> observers.CounterStats:
        """Counter as seen on P's console (from outside)."""
        return observers.counter_from_console([self.machine.console_log], since_time=since_time)

    def counter_stats_in_p(self) -> observers.CounterStats:
        return observers.counter_in_p(self.machine)

    def tcp_stats(self, since: float | None = None, until: float | None = None) -> observers.TcpStats:
        return observers.tcp_from_log(self.tcp_log, since=since, until=until)

    def verify_files(self) -> observers.FileCheck:
        return observers.verify_files(self.machine)

    def power_state(self) -> str:
        return self.machine.power_state()

    def workload_pids(self) -> dict[str, int | None]:
        return workloads.p_workload_pids(self.machine)

    # --- helpers for the destination side and tests -----------------------------------------------
    def spawn(self, name: str, argv: list[str], netns: str | None = C.NS_DEST,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Start a host process (by default in the destination namespace) that teardown will stop.
        Its output goes to <run_dir>/<name>.log. Returns its pid."""
        proc = spawn(self.pids, name, argv, self.run_dir / f"{name}.log", netns=netns, env=env,
                     cwd=cwd or self.cfg.repo_root)
        return proc.pid

    def stop_process(self, name: str) -> bool:
        return self.pids.stop(name)
