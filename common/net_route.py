"""Host routes the cutover adds for one peer, with TCP metrics of their own (pyroute2, netlink).

Both agents use them for the image socket: P's route to V lets the image stream start with a wide
congestion window after the idle snapshot and never time out in the second its NIC is deaf; V's
route to P lets V's acknowledgement of the image be resent quickly if that second swallows it. A
route is added only where the kernel has no /32 of its own for the peer (that one is not ours to
replace), along the same path as the kernel's, and deleted with the same keys. Each carries p2v's
mark in rtnetlink's protocol field (RTPROT_P2V): an agent killed mid-cutover leaves its route behind,
and the next one finds it by that mark (`sweep_host_routes` at V's start, and `add_host_route`
replaces it instead of taking it for the host's own).

Every function takes an open `IPRoute`: the caller decides what a failure means (for both agents:
an optimisation lost, never a reason to stop).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

RTAX_RTO_MIN = 13  # linux/rtnetlink.h: the metric the kernel heeds only when locked
RT_TABLE_MAIN = 254
#: The protocol field of p2v's routes. The kernel does not interpret values above RTPROT_STATIC (4);
#: 177 is in none of iproute2's rt_protos (`ip route` shows it as "proto 177").
RTPROT_P2V = 177


@dataclass
class HostRoute:
    dst: str
    oif: int
    gateway: str | None
    prefsrc: str | None
    proto: int = RTPROT_P2V  # what find_host_route found: RTPROT_P2V = an earlier agent's

    @property
    def ours(self) -> bool:
        return self.proto == RTPROT_P2V


def route_keys(route: HostRoute) -> dict[str, Any]:
    keys: dict[str, Any] = {"dst": route.dst, "dst_len": 32, "oif": route.oif, "table": RT_TABLE_MAIN,
                            "proto": route.proto}
    if route.gateway:
        keys["gateway"] = route.gateway
    if route.prefsrc:
        keys["prefsrc"] = route.prefsrc
    return keys


def host_routes(ipr: Any) -> Iterator[HostRoute]:
    """The /32 routes of the main table."""
    for route in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
        if route["dst_len"] == 32:
            yield HostRoute(route.get_attr("RTA_DST"), route.get_attr("RTA_OIF"), route.get_attr("RTA_GATEWAY"),
                            route.get_attr("RTA_PREFSRC"), route["proto"])


def find_host_route(ipr: Any, host: str) -> HostRoute | None:
    """The /32 route to `host` in the main table, if there is one."""
    return next((route for route in host_routes(ipr) if route.dst == host), None)


def sweep_host_routes(ipr: Any) -> list[str]:
    """Delete the host routes p2v's agents left behind (an agent killed mid-cutover never removed
    its own): every /32 of the main table with p2v's mark. Returns their destinations. At an
    agent's start, when none of its own can exist yet."""
    left = [route for route in host_routes(ipr) if route.ours]
    for route in left:
        delete_host_route(ipr, route)
    return [route.dst for route in left]


def add_host_route(ipr: Any, host: str, *, initcwnd: int = 0, rto_min_ms: int = 0) -> HostRoute | None:
    """A /32 route to `host` along the kernel's path, whose connections start (and restart after
    idling) with `initcwnd` segments (0 = the kernel's) and never retransmit before `rto_min_ms`
    (0 = the kernel's). None when the peer has a host route already (one that is not p2v's: an
    earlier agent's is replaced). Raises on netlink errors."""
    existing = find_host_route(ipr, host)
    if existing is not None:
        if not existing.ours:
            return None  # the host's own: not ours to replace
        delete_host_route(ipr, existing)  # a killed agent's; the path is looked up afresh below
    got = ipr.route("get", dst=host)[0]
    route = HostRoute(host, got.get_attr("RTA_OIF"), got.get_attr("RTA_GATEWAY"), got.get_attr("RTA_PREFSRC"))
    metrics: dict[str, int] = {}
    if initcwnd:
        metrics["initcwnd"] = initcwnd
    if rto_min_ms:
        metrics.update(rto_min=rto_min_ms, lock=1 << RTAX_RTO_MIN)
    ipr.route("add", **route_keys(route), metrics=metrics)
    return route


def delete_host_route(ipr: Any, route: HostRoute) -> None:
    ipr.route("del", **route_keys(route))


def attempt(what: str, op: Callable[[Any], T], default: T, report: Callable[[str], None]) -> T:
    """`op(IPRoute)`, or `default` when it fails, after `report`ing what failed. Never raises."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return op(ipr)
    except Exception as exc:
        report(f"{what}: {exc}")
        return default


def peer_ipv4(peer: str) -> str:
    """The IPv4 address in a gRPC peer string ("ipv4:10.0.0.5:51234"); "" for any other peer. Pure."""
    if not peer.startswith("ipv4:"):
        return ""
    host = peer[len("ipv4:"):].rsplit(":", 1)[0]
    try:
        socket.inet_aton(host)
    except OSError:
        return ""
    return host
