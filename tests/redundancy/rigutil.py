"""Helpers for the redundancy tests on the rig: run the mechanisms in P, dump P's state."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
from pathlib import Path

from rig import config as C
from rig.core import Rig
from rig.machine import CommandResult

WORK = "/var/lib/p2v-red-test"  # on P's root disk


def red(rig: Rig, args: str, timeout: float = 300.0, stdin: str = "") -> CommandResult:
    return rig.run(f"cd {C.P_PROJECT_DIR} && python3 -m source_agent.redundancy {args}", timeout=timeout, stdin=stdin)


def red_json(rig: Rig, args: str, timeout: float = 300.0) -> dict:
    res = red(rig, args, timeout)
    assert res.rc == 0, f"{args}: rc {res.rc}\n{res.err}\n{res.out}"
    return json.loads(res.out)


def sh(rig: Rig, cmd: str, timeout: float = 60.0) -> str:
    res = rig.run(cmd, timeout=timeout)
    assert res.rc == 0, f"{cmd}: rc {res.rc}\n{res.err}"
    return res.out


def put(rig: Rig, path: str, text: str) -> None:
    sh(rig, f"mkdir -p {shlex.quote(str(Path(path).parent))}")
    res = rig.run(f"cat > {shlex.quote(path)}", stdin=text)
    assert res.rc == 0, res.err


def p_nic(rig: Rig) -> str:
    out = sh(rig, "for d in /sys/class/net/*; do echo ${d##*/} $(cat $d/address); done")
    for line in out.splitlines():
        name, mac = line.split()
        if mac == C.P_MAC and not Path(name).name.startswith("p2vbond"):
            return name
    raise AssertionError(f"no NIC with {C.P_MAC} in P: {out}")


def disk_by_model(rig: Rig, model: str) -> str:
    out = sh(rig, "for d in /sys/block/sd*; do echo ${d##*/} $(cat $d/device/model); done")
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip() == model:
            return parts[0]
    raise AssertionError(f"no disk with model {model}: {out}")


def md_name(rig: Rig) -> str:
    return sh(rig, f"basename $(readlink -f {C.P_MD_DEVICE})").strip()


def _strip(obj: object, drop: set[str]) -> object:
    if isinstance(obj, dict):
        return {k: _strip(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return sorted((_strip(v, drop) for v in obj), key=lambda x: json.dumps(x, sort_keys=True))
    return obj


NET_VOLATILE = {"valid_life_time", "preferred_life_time", "stats", "stats64", "ifindex_", "expires"}


def net_dump(rig: Rig) -> dict:
    """Every link, address and route of P, minus counters and lifetimes."""
    out = sh(
        rig,
        "ip -j -d link show; echo '#'; ip -j addr show; echo '#'; ip -j route show table all; "
        "echo '#'; ip -j -6 route show table all",
    )
    parts = [json.loads(x) for x in out.split("#\n")]
    keys = ("links", "addresses", "routes4", "routes6")
    return {k: _strip(v, NET_VOLATILE) for k, v in zip(keys, parts, strict=True)}


def md_dump(rig: Rig, md: str) -> dict:
    out = sh(
        rig,
        f"mdadm --detail --export /dev/{md}; echo '#'; cat /sys/block/{md}/md/raid_disks "
        f"/sys/block/{md}/md/bitmap/location /sys/block/{md}/md/level; ls /sys/block/{md}/md | grep ^dev-",
    )
    detail, rest = out.split("#\n")
    return {"detail": sorted(detail.splitlines()), "sysfs": rest.split()}


def modules(rig: Rig) -> list[str]:
    return sorted(sh(rig, "cut -d' ' -f1 /proc/modules").split())


def wait_settled(rig: Rig, nic: str, timeout_s: float = 20.0) -> None:
    """IPv6 DAD done (no tentative addresses) on the NIC."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "tentative" not in sh(rig, f"ip addr show dev {nic}"):
            return
        time.sleep(0.5)


def wait_array_state(rig: Rig, md: str, states: tuple[str, ...], timeout_s: float = 30.0) -> str:
    """The md array's state once it is one of `states`, or the last one read at the deadline.

    md passes through transient states (write-pending while it records a failed leg in the
    superblocks), so one read right after a leg fails can catch it mid-update."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = sh(rig, f"cat /sys/block/{md}/md/array_state").strip()
        if state in states or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def data_offset_bytes(rig: Rig, dev: str) -> int:
    out = sh(rig, f"mdadm --examine /dev/{dev}")
    m = re.search(r"Data Offset\s*:\s*(\d+) sectors", out)
    assert m, out
    return int(m.group(1)) * 512


def sha_range(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(left, 4 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        assert left == 0, f"{path} shorter than {offset}+{length}"
    return h.hexdigest()
