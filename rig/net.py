"""The rig's network: bridge p2vbr0 (root namespace, no host IP), namespaces p2v-dest and p2v-client
joined to it by veth pairs, and P's tap. Only addresses in 10.77.0.0/24 inside these are used."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from rig import config as C

log = logging.getLogger(__name__)

NAMESPACES = {C.NS_DEST: (C.VETH_DEST_HOST, C.DEST_IP), C.NS_CLIENT: (C.VETH_CLIENT_HOST, C.CLIENT_IP)}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _sysctl_write(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError:
        pass


def setup_bridge() -> None:
    if not link_exists(C.BRIDGE):
        _ip("link", "add", C.BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    # the host must not be a participant on the rig's segment: no addresses, not even IPv6 link-local
    _sysctl_write(f"/proc/sys/net/ipv6/conf/{C.BRIDGE}/disable_ipv6", "1")
    _ip("addr", "flush", "dev", C.BRIDGE)
    _ip("link", "set", C.BRIDGE, "up")


def setup_namespace(ns: str) -> None:
    host_if, addr = NAMESPACES[ns]
    if not netns_exists(ns):
        _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")
    if not link_exists(host_if):
        _ip("link", "add", host_if, "type", "veth", "peer", "name", C.NS_IFNAME, "netns", ns)
    _sysctl_write(f"/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6", "1")
    _ip("link", "set", host_if, "master", C.BRIDGE, "up")
    have = _ip("-n", ns, "-o", "addr", "show", "dev", C.NS_IFNAME).stdout
    if f"{addr}/" not in have:
        _ip("-n", ns, "addr", "add", f"{addr}/{C.PREFIX_LEN}", "dev", C.NS_IFNAME)
    _ip("-n", ns, "link", "set", C.NS_IFNAME, "up")


def setup_tap(name: str) -> None:
    """A persistent tap on the bridge for a QEMU `-netdev tap,ifname=...,script=no`."""
    if not link_exists(name):
        _ip("tuntap", "add", "dev", name, "mode", "tap")
    _sysctl_write(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
    _ip("link", "set", name, "master", C.BRIDGE, "up")


def setup() -> None:
    setup_bridge()
    for ns in NAMESPACES:
        setup_namespace(ns)
    setup_tap(C.P_TAP)


def netns_pids(ns: str) -> list[int]:
    res = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def rig_links() -> list[str]:
    """Host links the rig owns (by name), bridge last."""
    names = [p.name for p in Path("/sys/class/net").iterdir()]
    ours = [n for n in names if n.startswith(("p2vtap-", "p2vv-"))]
    return ours + ([C.BRIDGE] if C.BRIDGE in names else [])


def teardown_links() -> list[str]:
    removed = []
    for name in rig_links():
        if _ip("link", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


def teardown_namespaces() -> list[str]:
    removed = []
    for ns in NAMESPACES:
        if netns_exists(ns) and _ip("netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
    return removed
