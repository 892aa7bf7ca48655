"""The waiting VM's restore program, its image loading against a file instead of /dev/snapshot."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from dest_agent.restore_program import PAGE, Feed, load_image


def _load(tmp_path: Path, payload: bytes, size: int, first: bytes = b"") -> tuple[bytes, int, Feed, dict]:
    target = tmp_path / "snapshot"
    target.write_bytes(b"")
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: (b.sendall(payload), b.close()))
    sender.start()
    feed = Feed(a)
    feed.buf = first  # what arrived with the IMAGE line
    spent: dict[str, float] = {}
    try:
        fd, pages = load_image(feed, size, spent, device=str(target))
        os.close(fd)
    finally:
        sender.join(10)
        a.close()
    return target.read_bytes(), pages, feed, spent


def test_image_lands_whole_and_what_follows_stays_for_the_next_line(tmp_path: Path) -> None:
    image = os.urandom(300 * PAGE)
    # part of the image came with the IMAGE line; V's next line arrives right behind the image
    written, pages, feed, spent = _load(tmp_path, image[5000:] + b"GO\n", len(image), first=image[:5000])
    assert written == image and pages == 300
    assert feed.line() == "GO"
    assert spent["write"] >= 0 and spent["recv"] >= 0


def test_feed_cut_short_is_an_error(tmp_path: Path) -> None:
    image = os.urandom(20 * PAGE)
    with pytest.raises(ConnectionError, match="after"):
        _load(tmp_path, image[:-1], len(image))
