"""python -m rig build|up|demo|down|status|shell [command...]"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from rig import teardown
from rig.build import build
from rig.config import RigConfig
from rig.core import Rig
from rig.machine import ControlError


def cmd_build(args: argparse.Namespace) -> int:
    res = build(RigConfig(), force_base=args.force_base, force_image=args.force)
    print(json.dumps(res.to_json(), indent=1))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    cfg = RigConfig()
    if args.memory:
        cfg.memory_mib = args.memory
    rig = Rig(cfg)
    rig.start()
    rig.keep_reserved()  # until `python -m rig down`; other rig users wait for it
    agent = rig.agent_state()
    print(json.dumps({"timings": vars(rig.timings), "agent": agent.state,
                      "console_log": str(rig.machine.console_log), "tcp_log": str(rig.tcp_log),
                      "image": rig.build_result.image_hash if rig.build_result else None}, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Boot the rig, show the workloads living in P, and migrate P when the project can: the
    migration is delegated to `p2vctl.demo.migrate_on_rig(rig) -> int` once that exists."""
    rig = Rig(RigConfig())
    print("rig: building P's image and booting P (QEMU/TCG) ...", flush=True)
    rig.start()
    try:
        t, agent = rig.timings, rig.agent_state()
        when = f" after {t.boot_to_agent_ready_s:.1f}s" if t.boot_to_agent_ready_s else ""
        print(f"rig: P ready in {t.boot_to_ready_s:.1f}s, source agent {agent.state}{when}", flush=True)
        if not agent.ready:
            print("  agent log: " + "\n  agent log: ".join(agent.log_tail.splitlines()[-5:]), flush=True)
        for _ in range(int(args.observe)):
            time.sleep(1)
            c, tcp = rig.counter_stats(), rig.tcp_stats()
            print(f"  counter pid {c.pids} value {c.last_value} | tcp echoes {tcp.received} "
                  f"reconnects {tcp.reconnects} longest gap {tcp.max_gap_s:.2f}s", flush=True)
        files = rig.verify_files()
        print(f"rig: files on md verified: {files.checked} ok={files.ok}", flush=True)
        try:
            from p2vctl.demo import migrate_on_rig  # type: ignore[import-not-found]
        except ImportError:
            print("rig: the migration is not wired into the demo yet (p2vctl.demo.migrate_on_rig)")
            return 0
        return int(migrate_on_rig(rig))
    finally:
        if args.keep:
            rig.keep_reserved()
            print("rig: left running (python -m rig status|shell|down)")
        else:
            rig.stop()


def cmd_down(args: argparse.Namespace) -> int:
    removed = teardown.teardown(RigConfig().run_dir)
    (RigConfig().run_dir / "state.json").unlink(missing_ok=True)
    print(json.dumps(removed, default=str))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    out: dict = {"leftovers": teardown.leftovers(RigConfig().run_dir)}
    try:
        rig = Rig.attach()
    except RuntimeError as e:
        out["rig"] = str(e)
        print(json.dumps(out, indent=1, default=str))
        return 1
    out["power_state"] = rig.power_state()
    if out["power_state"] == "running":
        try:
            out["agent"] = rig.agent_state().state
            out["workloads"] = rig.workload_pids()
        except ControlError as e:
            out["control_channel"] = str(e)
    counter = rig.counter_stats()
    out["counter"] = {"pids": counter.pids, "last_value": counter.last_value, "max_gap_s": counter.max_gap_s}
    tcp = rig.tcp_stats()
    out["tcp"] = {"connects": tcp.connects, "reconnects": tcp.reconnects, "received": tcp.received,
                  "lost": tcp.lost, "max_gap_s": round(tcp.max_gap_s, 3)}
    print(json.dumps(out, indent=1, default=str))
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    rig = Rig.attach()
    if args.command:
        res = rig.run(" ".join(args.command), timeout=args.timeout)
        sys.stdout.write(res.out)
        sys.stderr.write(res.err)
        return res.rc
    print("commands run in P over the serial control channel; empty line or EOF ends", file=sys.stderr)
    for _ in range(100000):  # bounded, like every loop in the rig
        try:
            line = input("p2v-phys# ")
        except EOFError:
            break
        if not line.strip():
            break
        res = rig.run(line, timeout=args.timeout)
        sys.stdout.write(res.out)
        sys.stderr.write(res.err)
        if res.rc:
            print(f"[rc={res.rc}]", file=sys.stderr)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m rig")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build P's image (cached by content hash)")
    b.add_argument("--force", action="store_true", help="rebuild the image layer")
    b.add_argument("--force-base", action="store_true", help="rebuild the base layer too (debootstrap)")
    b.set_defaults(func=cmd_build)
    u = sub.add_parser("up", help="build, network, libvirtd, boot P, start the workloads and client")
    u.add_argument("--memory", type=int, help="P's memory in MiB (default 1024)")
    u.set_defaults(func=cmd_up)
    d = sub.add_parser("demo", help="boot the rig, show the workloads, migrate P (when available)")
    d.add_argument("--observe", type=float, default=5, help="seconds of workload display before the move")
    d.add_argument("--keep", action="store_true", help="leave the rig running afterwards")
    d.set_defaults(func=cmd_demo)
    sub.add_parser("down", help="remove everything the rig started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="state of P, agent, workloads, leftovers").set_defaults(func=cmd_status)
    s = sub.add_parser("shell", help="run commands inside P")
    s.add_argument("--timeout", type=float, default=60.0)
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_shell)
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
