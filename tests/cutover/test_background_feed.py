"""V feeds the waiting VM from a thread of its own: order kept, the VM's failures surface, abort ends it."""

from __future__ import annotations

import threading

import pytest

from dest_agent.image_receiver import BackgroundFeed


class SlowFeed:
    def __init__(self, fail_at: int | None = None, gate: threading.Event | None = None) -> None:
        self.events: list = []
        self.fail_at = fail_at
        self.gate = gate

    through_ring = False

    def begin(self, size: int) -> None:
        self.events.append(("begin", size))

    def write(self, data) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_at is not None and len(self.events) >= self.fail_at:
            raise OSError("the waiting VM stopped taking the image")
        self.events.append(("write", bytes(data)))

    def finish(self) -> int:
        self.events.append(("finish",))
        return 7

    def go(self) -> None:
        self.events.append(("go",))

    def abort(self, reason: str) -> None:
        self.events.append(("abort", reason))
        if self.gate is not None:
            self.gate.set()


def test_writes_arrive_in_order_before_finish() -> None:
    inner = SlowFeed()
    feed = BackgroundFeed(inner, max_queued=2)  # a small queue: the producer waits, nothing is lost
    feed.begin(30)
    for i in range(10):
        feed.write(bytearray([i]) * 3)
    assert feed.finish() == 7
    feed.go()
    assert inner.events == [("begin", 30), *[("write", bytes([i]) * 3) for i in range(10)], ("finish",), ("go",)]


def test_a_failure_of_the_vm_surfaces_at_finish() -> None:
    inner = SlowFeed(fail_at=3)
    feed = BackgroundFeed(inner)
    feed.begin(40)
    for _ in range(4):
        try:
            feed.write(b"x" * 10)
        except OSError:
            break  # surfacing at a later write is fine too
    with pytest.raises(OSError, match="stopped taking"):
        feed.finish()
    assert ("finish",) not in inner.events


def test_abort_ends_a_blocked_write_and_drops_the_rest() -> None:
    gate = threading.Event()  # the VM takes nothing until the feed is aborted
    inner = SlowFeed(gate=gate)
    feed = BackgroundFeed(inner)
    feed.begin(50)
    for _ in range(5):
        feed.write(b"y")
    feed.abort("P aborted the cutover")
    assert not feed.thread.is_alive()
    assert ("abort", "P aborted the cutover") in inner.events
    assert sum(1 for e in inner.events if e[0] == "write") <= 1  # the one in flight at most
