"""Fault injection for tests, as CRIU_FAULT: $P2V_FAULT names the point where a process of ours is
killed (SIGKILL, no cleanup) — how the rig and the tests reach the failures that matter most, a
process gone mid-cutover. Nothing happens when it is unset, as in production."""

from __future__ import annotations

import os

FAULT_ENV = "P2V_FAULT"


def requested(*faults: str) -> str:
    """The fault $P2V_FAULT names when it is one of `faults`, else ""."""
    fault = os.environ.get(FAULT_ENV, "")
    return fault if fault in faults else ""
