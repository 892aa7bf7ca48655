"""The helper's note of the peers to kick (source_agent/host_settings.py): read once, and only when it
holds IPv4 TCP quotes; the pending cutover names where it is (older files without it still read)."""

import json
import socket
import struct
from pathlib import Path

from source_agent import host_settings as hs


def quote(src: str = "10.0.0.2", dst: str = "10.0.0.1", proto: int = socket.IPPROTO_TCP) -> str:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return (ip + struct.pack("!HHI", 7000, 40000, 1000)).hex()


def test_a_note_is_read_once(tmp_path: Path) -> None:
    note = tmp_path / "peers.json"
    hs.write_peer_note(note, [quote(), quote("10.0.0.3")])
    assert [socket.inet_ntoa(q[12:16]) for q in hs.take_peer_note(note)] == ["10.0.0.2", "10.0.0.3"]
    assert not note.exists() and hs.take_peer_note(note) == []
    assert hs.take_peer_note("") == []


def test_what_is_not_a_note_kicks_nobody_and_goes(tmp_path: Path) -> None:
    note = tmp_path / "peers.json"
    for raw in (b"{", b'{"quotes": ["zz"]}', b"[]", json.dumps({"quotes": [quote(proto=socket.IPPROTO_UDP)]}).encode(),
                json.dumps({"quotes": [quote()[:40]]}).encode()):  # cut short: no TCP header
        note.write_bytes(raw)
        assert hs.take_peer_note(note) == [], raw
        assert not note.exists()


def test_kick_waits_for_the_links_then_kicks_the_noted_peers(tmp_path: Path) -> None:
    note, sent = tmp_path / "peers.json", []
    (tmp_path / "net" / "eth0").mkdir(parents=True)
    (tmp_path / "net" / "eth0" / "carrier").write_text("0\n")  # still down: the wait is bounded
    hs.write_peer_note(note, [quote()])
    done = hs.kick_noted_peers(note, ["eth0"], str(tmp_path / "net"), kick=lambda qs: sent.append(qs) or 8 * len(qs),
                               carrier_wait_s=0.1)
    assert done == "8 ICMP for 1 peer connection(s)" and len(sent) == 1 and sent[0][0].hex() == quote()
    assert hs.kick_noted_peers(note, ["eth0"], str(tmp_path / "net"), kick=lambda qs: 1 / 0) == ""  # used up


def test_pending_cutover_names_its_note_and_older_files_still_read(tmp_path: Path) -> None:
    settings = hs.HostSettings(blocked=["eth0"], admin_up=[], bonds={}, image_size="")
    pending = hs.PendingCutover(settings, "boot", "mig", "v:7470", peer_note="/run/p2v/cutover-peers.json")
    assert hs.PendingCutover.from_json(pending.to_json()) == pending
    older = json.loads(pending.to_json())
    del older["peer_note"]
    assert hs.PendingCutover.from_json(json.dumps(older).encode()).peer_note == ""


def test_note_path_made_in_the_runtime_dir(tmp_path: Path) -> None:
    path = hs.peer_note_path(str(tmp_path / "run" / "p2v"))
    assert path == str(tmp_path / "run" / "p2v" / hs.PEER_NOTE_FILE) and (tmp_path / "run" / "p2v").is_dir()
    assert hs.peer_note_path("") == ""
    (tmp_path / "file").write_text("")
    assert hs.peer_note_path(str(tmp_path / "file" / "sub")) == ""  # cannot be made: no note, no error
