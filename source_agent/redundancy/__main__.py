"""Operate the redundancy mechanisms by hand (and from the rig tests):

    python3 -m source_agent.redundancy discover
    python3 -m source_agent.redundancy plan --catalog catalog.toml [--ignore sda,sdc] [--save plan.json]
    python3 -m source_agent.redundancy build (--catalog catalog.toml [--ignore ...] | --plan plan.json)
                                             --journal J --migration-id M [--no-initramfs] [--wait SECONDS]
    python3 -m source_agent.redundancy status|report|wait|rollback --journal J
    python3 -m source_agent.redundancy cancel --journal J --ids ID,ID [--local vdb=/dev/vdb] [--no-unload]

Output is JSON on stdout; failures exit with status 2 and one line "error: ..." on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from common.planning import Plan, PlanPolicy, plan
from dest_agent.catalog import CatalogSpec, build_catalog
from source_agent import discovery
from source_agent.redundancy import build as builder
from source_agent.redundancy import cancel as canceller
from source_agent.redundancy import mdmirror
from source_agent.redundancy.journal import Journal
from source_agent.redundancy.rollback import real_undoers, rollback


def _catalog(path: str):
    data = tomllib.loads(Path(path).read_text())
    table = data.get("catalog", data)
    return build_catalog(CatalogSpec.from_dict(table), "cli")


def _plan(args: argparse.Namespace) -> Plan:
    if getattr(args, "plan", None):
        return Plan.from_dict(json.loads(Path(args.plan).read_text()))
    ignore = frozenset(x for x in (args.ignore or "").split(",") if x)
    return plan(discovery.discover(), _catalog(args.catalog), PlanPolicy(ignore=ignore))


def _journal_json(j: Journal) -> dict:
    return {
        "migration_id": j.migration_id,
        "entries": [
            {
                "id": e.id,
                "kind": e.kind,
                "state": e.state,
                "physical": e.physical,
                "virtual": e.virtual,
                "detail": e.detail,
            }
            for e in j.entries
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m source_agent.redundancy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("discover")
    p = sub.add_parser("plan")
    p.add_argument("--catalog", required=True)
    p.add_argument("--ignore", default="")
    p.add_argument("--save")
    b = sub.add_parser("build")
    b.add_argument("--catalog")
    b.add_argument("--ignore", default="")
    b.add_argument("--plan")
    b.add_argument("--journal", required=True)
    b.add_argument("--migration-id", required=True)
    b.add_argument("--no-initramfs", action="store_true")
    b.add_argument("--no-rollback-on-failure", action="store_true")
    b.add_argument("--fail-at", default="", help=argparse.SUPPRESS)  # tests: rollback drill
    b.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for the mirrors")
    for name in ("status", "report", "rollback"):
        sub.add_parser(name).add_argument("--journal", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--journal", required=True)
    w.add_argument("--timeout", type=float, default=3600.0)
    c = sub.add_parser("cancel")
    c.add_argument("--journal", required=True)
    c.add_argument("--ids", required=True)
    c.add_argument("--local", action="append", default=[], help="virtual=/dev/vdX")
    c.add_argument("--no-unload", action="store_true")
    c.add_argument("--sync-timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        out = _dispatch(args)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, sort_keys=True, default=str))
    return 0 if not (isinstance(out, dict) and out.get("failed")) else 1


def _dispatch(args: argparse.Namespace) -> object:
    if args.cmd == "discover":
        return MessageToDict(discovery.discover(), preserving_proto_field_name=True)
    if args.cmd == "plan":
        pl = _plan(args)
        if args.save:
            Path(args.save).write_text(json.dumps(pl.to_dict(), indent=1))
        return pl.to_dict()
    if args.cmd == "build":
        if not args.plan and not args.catalog:
            raise ValueError("build needs --catalog or --plan")
        pl = _plan(args)
        builder.verify_plan(pl)  # before anything is written
        j = Journal.create(Path(args.journal), args.migration_id)
        opts = builder.BuildOptions(
            initramfs=not args.no_initramfs, rollback_on_failure=not args.no_rollback_on_failure, fail_at=args.fail_at
        )
        res = builder.build(pl, j, opts)
        out = {"journal": _journal_json(j), "legs": res.legs, "notes": res.notes}
        if args.wait:
            out["mirrors"] = [mdmirror.status_dict(md, leg) for md, leg in builder.legs(j)]
            builder.wait_mirrors(j, timeout_s=args.wait)
            out["mirrors"] = [mdmirror.status_dict(md, leg) for md, leg in builder.legs(j)]
        return out
    j = Journal.load(Path(args.journal))
    if args.cmd == "status":
        return {"journal": _journal_json(j), "mirrors": [mdmirror.status_dict(md, leg) for md, leg in builder.legs(j)]}
    if args.cmd == "report":
        return MessageToDict(j.report(), preserving_proto_field_name=True)
    if args.cmd == "wait":
        return {"mirrors": [asdict(s) for s in builder.wait_mirrors(j, timeout_s=args.timeout)]}
    if args.cmd == "rollback":
        res = rollback(j, real_undoers())
        return {"undone": res.undone, "failed": res.failed + res.skipped}
    if args.cmd == "cancel":
        local = dict(x.split("=", 1) for x in args.local)
        res = canceller.cancel(
            j, [i for i in args.ids.split(",") if i], local, args.sync_timeout, unload=not args.no_unload
        )
        return {"done": res.done, "failed": res.failed, "unloaded": res.unloaded, "kept_drivers": res.kept_drivers}
    raise ValueError(f"unknown command {args.cmd}")


if __name__ == "__main__":
    sys.exit(main())
