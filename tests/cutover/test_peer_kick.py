"""Cutting a peer's TCP retransmission backoff short after the move (source_agent/peer_kick.py):
the pure parts on crafted packets, and the whole mechanism against a real Linux TCP peer."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys

import pytest

from source_agent.peer_kick import (
    Flow,
    PeerWaits,
    icmp_checksum,
    icmp_host_unreachable,
    parse_incoming,
    parse_outgoing_ack,
)
from tests.agents import REPO
from tests.netns import can_use_netns, netns_pair

LOCAL = frozenset({"10.0.0.10"})


def segment(src: str, dst: str, sport: int, dport: int, seq: int, payload: bytes = b"x",
            flags: int = 0x18, frag: int = 0) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 502, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, frag, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


def test_parse_keeps_data_segments_to_us_only() -> None:
    flow, seq, quote = parse_incoming(segment("10.0.0.3", "10.0.0.10", 40000, 7000, 123), LOCAL)  # type: ignore[misc]
    assert flow == Flow("10.0.0.3", 40000, "10.0.0.10", 7000) and seq == 123
    assert len(quote) == 28 and quote[20:24] == struct.pack("!HH", 40000, 7000)
    assert parse_incoming(segment("10.0.0.3", "10.0.0.10", 1, 2, 5, payload=b"", flags=0x10), LOCAL) is None  # ACK
    assert parse_incoming(segment("10.0.0.3", "10.0.0.10", 1, 2, 5, payload=b"", flags=0x11), LOCAL)  # FIN
    assert parse_incoming(segment("10.0.0.3", "10.0.0.10", 1, 2, 5, payload=b"", flags=0x02), LOCAL) is None  # SYN
    assert parse_incoming(segment("10.0.0.3", "10.0.0.99", 1, 2, 5), LOCAL) is None  # not ours
    assert parse_incoming(segment("127.0.0.1", "10.0.0.10", 1, 2, 5), LOCAL) is None  # our own
    assert parse_incoming(segment("10.0.0.3", "10.0.0.10", 1, 2, 5, frag=10), LOCAL) is None
    assert parse_incoming(b"\x60" + bytes(60), LOCAL) is None  # IPv6
    assert parse_incoming(b"\x45\x00", LOCAL) is None


def test_outgoing_acks_are_read_from_our_segments_only() -> None:
    ours = segment("10.0.0.10", "10.0.0.3", 7000, 40000, 9, flags=0x10)
    ours = ours[:28] + struct.pack("!I", 777) + ours[32:]  # the acknowledgement number
    assert parse_outgoing_ack(ours, LOCAL) == (Flow("10.0.0.3", 40000, "10.0.0.10", 7000), 777)
    assert parse_outgoing_ack(segment("10.0.0.3", "10.0.0.10", 1, 2, 5, flags=0x10), LOCAL) is None  # incoming
    assert parse_outgoing_ack(segment("10.0.0.10", "10.0.0.3", 1, 2, 5, flags=0x02), LOCAL) is None  # no ACK


def test_waiting_peer_is_quoted_at_the_last_acknowledgement() -> None:
    waits = PeerWaits()
    flow = Flow("10.0.0.3", 40000, "10.0.0.10", 7000)
    waits.add_outgoing_ack(flow, 0xFFFFFF00)
    waits.add_outgoing_ack(flow, 0x10)  # after the wrap: later
    waits.add_outgoing_ack(flow, 0xFFFFFFF0)  # a reordered older one
    for seq in (0x30, 0x10):  # the block dropped these: new data, then the resend of the oldest
        waits.add_incoming(flow, seq, segment("10.0.0.3", "10.0.0.10", 40000, 7000, seq)[:28])
    (quote,) = waits.quotes()
    assert struct.unpack_from("!I", quote, 24)[0] == 0x10 and quote[20:24] == struct.pack("!HH", 40000, 7000)
    # a flow whose data P acknowledged, the peer's next segment not seen (the capture ends right
    # after the block closes): quoted at P's last acknowledgement, where that segment will start
    acked = Flow("10.0.0.4", 40001, "10.0.0.10", 7000)
    waits.add_outgoing_ack(acked, 500)
    waits.add_incoming(acked, 400, segment("10.0.0.4", "10.0.0.10", 40001, 7000, 400)[:28])
    # without an acknowledgement seen, the earliest dropped segment stands in
    unseen = Flow("10.0.0.5", 40002, "10.0.0.10", 7000)
    for seq in (90, 70):
        waits.add_incoming(unseen, seq, segment("10.0.0.5", "10.0.0.10", 40002, 7000, seq)[:28])
    # a flow the peer sent nothing on in the capture is not one of them
    waits.add_outgoing_ack(Flow("10.0.0.6", 40003, "10.0.0.10", 7000), 9)
    quotes = waits.quotes()
    assert [struct.unpack_from("!I", q, 24)[0] for q in quotes] == [0x10, 500, 70]


def test_icmp_message_checksums_to_zero() -> None:
    quote = segment("10.0.0.3", "10.0.0.10", 40000, 7000, 123)[:28]
    message = icmp_host_unreachable(quote)
    assert message[:2] == b"\x03\x01" and message[8:] == quote
    assert icmp_checksum(message) == 0


PEER = r"""
import socket, sys, time
s = socket.create_connection(({server!r}, 7000), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"a\n"); s.recv(16)
time.sleep(1.0)
s.sendall(b"b\n")  # the server's address is gone by now: no ACK, the peer backs off
s.settimeout(40)
print(s.recv(16))
"""

SERVER = r"""
import json, socket, subprocess, sys, time
sys.path.insert(0, {repo!r})
from source_agent import peer_kick
ip, ifname = {server!r}, {ifname!r}
srv = socket.create_server((ip, 7000)); srv.settimeout(20)
peer = subprocess.Popen(["ip", "netns", "exec", {peer_ns!r}, sys.executable, "-c", {peer_code!r}],
                        stdout=subprocess.PIPE, text=True)
capture = peer_kick.open_capture()  # before the block: P's acknowledgements tell what the peer waits on
conn, _ = srv.accept(); conn.recv(16); conn.sendall(b"a\n")
time.sleep(0.2)
subprocess.run(["ip", "addr", "del", ip + "/24", "dev", ifname], check=True)  # P goes silent
waits = peer_kick.PeerWaits()
peer_kick.drain(capture, waits, frozenset([ip]))  # P's acknowledgement of "a" is in here
seen = waits
if not {see_resends}:  # as the cutover's capture: it ends right after the block closes, before the
    capture.close()    # peer's "b"; a second one only times the resends below
    capture, seen = peer_kick.open_capture(), peer_kick.PeerWaits()
packets = 0  # from now on only the peer sends: "b", then its resends 0.2, 0.4, 0.8, 1.6, 3.2 s apart
deadline = time.monotonic() + 30
while packets < 5 and time.monotonic() < deadline:  # P comes back right after the 4th resend
    time.sleep(0.02)
    packets += peer_kick.drain(capture, seen, frozenset([ip]))
subprocess.run(["ip", "addr", "add", ip + "/24", "dev", ifname], check=True)  # P is back; next resend in ~6.4 s
conn.settimeout(1.5)
try:
    early = conn.recv(16)  # the control: without a kick the peer stays quiet
except socket.timeout:
    early = b""
t0 = time.monotonic()
sent = peer_kick.kick(waits.quotes()) if not early else 0
conn.settimeout(5)
try:
    got = conn.recv(16)
except socket.timeout:
    got = b""
out = {{"packets": packets, "flows": len(waits.quotes()), "acks": len(waits.last_ack), "early": early.decode(),
       "sent": sent, "got": got.decode(), "after_kick_s": time.monotonic() - t0}}
conn.sendall(b"b\n"); peer.wait(10)
print(json.dumps(out))
"""


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("see_resends", [True, False], ids=["resends-seen", "capture-ended-first"])
def test_kick_makes_a_real_peer_resend_at_once(see_resends: bool) -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")
    with netns_pair("kick", subnet="10.78.7") as pair:
        peer_code = PEER.format(server=pair.right_ip)
        code = SERVER.format(repo=str(REPO), server=pair.right_ip, ifname=pair.right_if, peer_ns=pair.left,
                             peer_code=peer_code, see_resends=see_resends)
        res = subprocess.run([*pair.exec_prefix(pair.right), sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=100)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["flows"] == 1 and out["acks"] == 1, out  # one waiting flow, quoted at P's last ACK
    assert out["early"] == "", out  # backed off: nothing in the 1.5 s after P came back
    assert out["got"] == "b\n" and out["after_kick_s"] < 1.0, out  # kicked: it resends at once
