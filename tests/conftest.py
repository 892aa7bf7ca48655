"""Fixtures for tests on the rig (P as a QEMU guest, V and a client in namespaces).

`rig` (session): a started rig.Rig; it is stopped (everything removed) at the end of the session,
also when starting it failed half-way. Tests that migrate P use it and its observers.

Defined once, here at the root: a conftest that re-imports these fixtures makes a second
session-scoped Rig, which then waits for the first one's lock until the session ends.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator

import pytest

from rig import Rig, RigConfig


def rig_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the rig needs root (network namespaces, taps, QEMU, libvirtd)"
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} missing: run rig/host-setup.sh"
    return None


@pytest.fixture(scope="session")
def rig_config() -> RigConfig:
    reason = rig_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return RigConfig()


@pytest.fixture(scope="session")
def rig(rig_config: RigConfig) -> Iterator[Rig]:
    # SIGTERM (e.g. a CI job timeout) would skip fixture finalizers: turn it into KeyboardInterrupt,
    # which pytest answers by tearing fixtures down — in this process only. A child forked from it
    # inherits the handler (pyroute2's NetNS forks one, and ends it with SIGTERM): there the same
    # KeyboardInterrupt tore the whole session's rig down under the tests still running (seen in CI).
    session_pid = os.getpid()

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getpid() != session_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    instance = Rig(rig_config)
    try:
        instance.start()
        yield instance
    finally:
        if os.getpid() == session_pid:
            instance.stop()
            signal.signal(signal.SIGTERM, previous)


def later_tests_use_the_rig(request: pytest.FixtureRequest) -> bool:
    items = request.session.items
    later = items[items.index(request.node) + 1:]
    return any("rig" in item.fixturenames for item in later)


@pytest.fixture
def rig_restarted_after(rig: Rig, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """For a test that leaves P changed for good (moved into a VM, powered off): the session rig is
    started afresh afterwards when later tests in this session use it."""
    yield rig
    if later_tests_use_the_rig(request):
        rig.stop()
        rig.start()
