"""Peers' TCP retransmission backoff, cut short after the move (RFC 6069).

While P is blocked and frozen, a peer with data in flight gets no acknowledgement and backs off:
it resends at 0.2, 0.6, 1.4, 3.0, 6.2, 12.6 s... An OS that is back after 8 s is then heard by that
peer only at 12.6 s (the rig's client saw 13.2 s of silence for 7.8 s of downtime). An ICMP "host
unreachable" quoting the peer's oldest unacknowledged segment makes the peer's TCP undo one
backoff step (Linux: tcp_ld_RTO_revert, RFC 6069); a few of them undo all of it, and a peer whose
shortened timer has already run out resends at once.

What it takes: the quoted segment, exactly (addresses, ports, sequence number = the peer's
snd_una). The cutover helper captures the peers' segments that arrive while the block drops them
(before CREATE_IMAGE, so the capture travels in the image); after the move the resume step
`kick-peers` sends the ICMPs from the VM, once the network path is back.

`parse_incoming`, `HeadSegments` and `icmp_host_unreachable` are pure; the sockets are the edges.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

ETH_P_IP = 0x0800
PACKET_HOST = 0
TCP_FLAGS_SYN_FIN = 0x03
ICMP_DEST_UNREACH, ICMP_HOST_UNREACH = 3, 1
#: each ICMP undoes one backoff step; 8 cover ~50 s of silence (0.2 s doubled 8 times)
KICKS_PER_PEER = 8
MAX_FLOWS = 4096


@dataclass(frozen=True)
class Flow:
    peer: str
    peer_port: int
    local: str
    local_port: int


def parse_incoming(packet: bytes, local_ips: frozenset[str]) -> tuple[Flow, int, bytes] | None:
    """(flow, sequence number, ICMP quote) of an IPv4 TCP segment to one of `local_ips` that carries
    data (or SYN/FIN: they take a sequence number too); None for anything else. Pure."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 20 or packet[9] != socket.IPPROTO_TCP:
        return None
    if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
        return None  # a later fragment: no TCP header
    total = struct.unpack_from("!H", packet, 2)[0]
    dst, src = socket.inet_ntoa(packet[16:20]), socket.inet_ntoa(packet[12:16])
    if dst not in local_ips or src in local_ips or src.startswith("127."):
        return None  # not for us, or between this host's own processes (nothing blocked there)
    sport, dport, seq = struct.unpack_from("!HHI", packet, ihl)
    data_offset = (packet[ihl + 12] >> 4) * 4
    payload = min(total, len(packet)) - ihl - data_offset
    if payload <= 0 and not packet[ihl + 13] & TCP_FLAGS_SYN_FIN:
        return None  # a pure ACK: nothing for the peer to resend
    flow = Flow(src, sport, dst, dport)
    return flow, seq, bytes(packet[:ihl + 8])


def _before(a: int, b: int) -> bool:
    """TCP sequence number a comes before b (serial arithmetic, RFC 1982)."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


@dataclass
class HeadSegments:
    """Per flow, the quote of the earliest segment seen: the peer's oldest unacknowledged one (P
    acknowledged nothing since the block went up), which is what its retransmission timer guards."""

    heads: dict[Flow, tuple[int, bytes]] = field(default_factory=dict)

    def add(self, flow: Flow, seq: int, quote: bytes) -> None:
        known = self.heads.get(flow)
        if known is None:
            if len(self.heads) < MAX_FLOWS:
                self.heads[flow] = (seq, quote)
        elif _before(seq, known[0]):
            self.heads[flow] = (seq, quote)

    def quotes(self) -> list[bytes]:
        return [quote for _, quote in self.heads.values()]


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_host_unreachable(quote: bytes) -> bytes:
    """An ICMP destination unreachable / host unreachable message quoting `quote`. Pure."""
    head = struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, 0, 0)
    return struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, icmp_checksum(head + quote), 0) + quote


# --- the edges ---------------------------------------------------------------------------------------

def open_capture(rcvbuf: int = 4 << 20) -> socket.socket:
    """A packet socket seeing every IPv4 packet this host receives, on every interface: packet taps
    come before the traffic block's tc ingress rules, so it sees what the block then drops."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket, heads: HeadSegments, local_ips: frozenset[str], max_packets: int = 100_000) -> int:
    """Read what the capture holds now (non-blocking, bounded); returns the packets read."""
    read = 0
    while read < max_packets:
        try:
            packet, address = sock.recvfrom(65536)
        except (BlockingIOError, InterruptedError):
            break
        read += 1
        if address[2] != PACKET_HOST:
            continue
        seen = parse_incoming(packet, local_ips)
        if seen is not None:
            heads.add(*seen)
    return read


def local_ipv4_addresses() -> frozenset[str]:
    """This host's IPv4 addresses (before FREEZE: netlink)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return frozenset(a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                         if a.get_attr("IFA_ADDRESS"))


def kick(quotes: Iterable[bytes], count: int = KICKS_PER_PEER) -> int:
    """Send `count` ICMP host unreachable messages for each quoted segment to its sender. Returns
    the messages sent."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for quote in quotes:
            peer = socket.inet_ntoa(quote[12:16])
            message = icmp_host_unreachable(quote)
            for _ in range(count):
                sock.sendto(message, (peer, 0))
                sent += 1
    return sent
