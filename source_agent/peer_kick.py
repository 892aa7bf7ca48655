"""Peers' TCP retransmission backoff, cut short after the move (RFC 6069).

While P is blocked and frozen, a peer with data in flight gets no acknowledgement and backs off:
it resends at 0.2, 0.6, 1.4, 3.0, 6.2, 12.6 s... An OS that is back after 8 s is then heard by that
peer only at 12.6 s (the rig's client saw 13.2 s of silence for 7.8 s of downtime). An ICMP "host
unreachable" quoting the peer's oldest unacknowledged segment makes the peer's TCP undo one
backoff step (Linux: tcp_ld_RTO_revert, RFC 6069); a few of them undo all of it, and a peer whose
shortened timer has already run out resends at once.

What it takes: the quoted segment, exactly (addresses, ports, sequence number = the peer's
snd_una = the last acknowledgement P sent). The cutover helper captures from before the block
closes (right after FREEZE) until just before CREATE_IMAGE (so what it learnt travels in the image):
P's last acknowledgements, and the peers' segments; after the move the resume step `kick-peers`
sends the ICMPs from the VM, once the network path is back (after an aborted cutover: from P).

`parse_incoming`, `parse_outgoing_ack`, `PeerWaits`, `capture_filter` and `icmp_host_unreachable`
are pure; the sockets are the edges.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

ETH_P_IP = 0x0800
SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33
ETH_P_ALL = 0x0003
SKF_AD_PROTOCOL = 0xFFFFF000  # SKF_AD_OFF + SKF_AD_PROTOCOL: the packet's ethertype
PACKET_HOST = 0
TCP_FLAG_FIN, TCP_FLAG_SYN = 0x01, 0x02
TCP_FLAG_ACK = 0x10
PACKET_OUTGOING = 4
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
    data (or a FIN: it takes a sequence number too); None for anything else, SYNs included. Pure.
    `packet` may be cut short after the TCP header (the capture keeps headers only)."""
    seen = _tcp(packet)
    if seen is None:
        return None
    src, dst, ihl, total = seen
    if dst not in local_ips or src in local_ips or src.startswith("127."):
        return None  # not for us, or between this host's own processes (nothing blocked there)
    sport, dport, seq = struct.unpack_from("!HHI", packet, ihl)
    data_offset = (packet[ihl + 12] >> 4) * 4
    flags = packet[ihl + 13]
    if flags & TCP_FLAG_SYN:
        return None  # a peer still connecting: an ICMP unreachable would abort its connect()
    if total - ihl - data_offset <= 0 and not flags & TCP_FLAG_FIN:
        return None  # a pure ACK: nothing for the peer to resend
    return Flow(src, sport, dst, dport), seq, bytes(packet[:ihl + 8])


def parse_outgoing_ack(packet: bytes, local_ips: frozenset[str]) -> tuple[Flow, int] | None:
    """(flow, acknowledgement number) of an IPv4 TCP segment this host sent to a peer. Pure."""
    seen = _tcp(packet)
    if seen is None:
        return None
    src, dst, ihl, _total = seen
    if src not in local_ips or dst in local_ips or dst.startswith("127.") or not packet[ihl + 13] & TCP_FLAG_ACK:
        return None
    sport, dport, _seq, ack = struct.unpack_from("!HHII", packet, ihl)
    return Flow(dst, dport, src, sport), ack


def _tcp(packet: bytes) -> tuple[str, str, int, int] | None:
    """(src, dst, IP header length, IP total length) of an unfragmented IPv4 TCP packet."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 14 or packet[9] != socket.IPPROTO_TCP:
        return None
    if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
        return None  # a later fragment: no TCP header
    return (socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]), ihl,
            struct.unpack_from("!H", packet, 2)[0])


def _before(a: int, b: int) -> bool:
    """TCP sequence number a comes before b (serial arithmetic, RFC 1982)."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


@dataclass
class PeerWaits:
    """Which peers wait on P, and for what.

    A peer's oldest unacknowledged byte is the last acknowledgement P sent it (P acknowledges
    nothing once the block is closed); the capture starts before the block to see it. Every flow the
    peer sent data on is taken to wait: the block closes right after FREEZE and the capture ends a
    moment later, so a peer's next segment (which starts at P's last acknowledgement) often comes
    only after it. A kick for a flow with nothing in flight changes nothing (the peer's TCP reverts
    a backoff only for the segment its timer guards). Without an acknowledgement seen, the earliest
    data segment seen stands in (right when the peer has resent its oldest segment meanwhile)."""

    last_ack: dict[Flow, int] = field(default_factory=dict)
    earliest: dict[Flow, tuple[int, bytes]] = field(default_factory=dict)

    def add_incoming(self, flow: Flow, seq: int, quote: bytes) -> None:
        known = self.earliest.get(flow)
        if known is None and len(self.earliest) >= MAX_FLOWS:
            return
        if known is None or _before(seq, known[0]):
            self.earliest[flow] = (seq, quote)

    def add_outgoing_ack(self, flow: Flow, ack: int) -> None:
        if flow in self.last_ack:
            if _before(self.last_ack[flow], ack):
                self.last_ack[flow] = ack
        elif len(self.last_ack) < MAX_FLOWS:
            self.last_ack[flow] = ack

    def quotes(self) -> list[bytes]:
        """One quote per waiting flow, carrying the sequence number the peer's timer guards."""
        out = []
        for flow, (_seq, quote) in self.earliest.items():
            ack = self.last_ack.get(flow)
            if ack is None:
                out.append(quote)
            else:
                ihl = (quote[0] & 0x0F) * 4
                out.append(quote[:ihl + 4] + struct.pack("!I", ack) + quote[ihl + 8:])
        return out


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

def capture_filter(exclude_ip: str = "", snap: int = 96) -> bytes:
    """Classic BPF for the capture (network header at offset 0, as a SOCK_DGRAM packet socket sees
    it): IPv4 TCP only, headers only (`snap` bytes), nothing to or from `exclude_ip` (V: the image
    stream and the NBD leg are bulk, and need no kick). Pure."""
    DROP = -1
    body: list[tuple[int, int, int]] = [  # (opcode, jump-if-false target, k); targets: DROP or next
        (0x28, 0, SKF_AD_PROTOCOL),  # ldh #proto
        (0x15, DROP, ETH_P_IP),  # jeq IPv4
        (0x30, 0, 9),  # ldb [9]: IP protocol
        (0x15, DROP, socket.IPPROTO_TCP),  # jeq TCP
    ]
    if exclude_ip:
        v = struct.unpack("!I", socket.inet_aton(exclude_ip))[0]
        body += [(0x20, 0, 12), (0x15, -2, v),  # ld [12]: source; from V -> drop
                 (0x20, 0, 16), (0x15, -2, v)]  # ld [16]: destination; to V -> drop
    accept, drop = len(body), len(body) + 1
    prog = []
    for i, (op, target, k) in enumerate(body):
        if op == 0x15 and target == DROP:  # mismatch -> drop
            prog.append((op, 0, drop - i - 1, k))
        elif op == 0x15:  # match -> drop
            prog.append((op, drop - i - 1, 0, k))
        else:
            prog.append((op, 0, 0, k))
    prog += [(0x06, 0, 0, snap), (0x06, 0, 0, 0)]  # accept `snap` bytes / drop
    assert len(prog) == accept + 2
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


def open_capture(exclude_ip: str = "", rcvbuf: int = 16 << 20) -> socket.socket:
    """A packet socket seeing the IPv4 TCP segments this host receives and sends, on every
    interface. Packet taps see incoming packets before the traffic block's tc ingress rules (so it
    sees what the block drops) and outgoing ones after its egress rules (so it sees the last
    acknowledgements that left)."""
    # ETH_P_ALL: a socket bound to one protocol sees incoming packets only
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    code = ctypes.create_string_buffer(capture_filter(exclude_ip))
    fprog = struct.pack("HL", (len(code) - 1) // 8, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies the program
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket, waits: PeerWaits, local_ips: frozenset[str], max_packets: int = 100_000) -> int:
    """Read what the capture holds now (non-blocking, bounded); returns the packets read."""
    read = 0
    while read < max_packets:
        try:
            packet, address = sock.recvfrom(65536)
        except (BlockingIOError, InterruptedError):
            break
        read += 1
        if address[2] == PACKET_HOST:
            seen = parse_incoming(packet, local_ips)
            if seen is not None:
                waits.add_incoming(*seen)
        elif address[2] == PACKET_OUTGOING:
            ack = parse_outgoing_ack(packet, local_ips)
            if ack is not None:
                waits.add_outgoing_ack(*ack)
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
