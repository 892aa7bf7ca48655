"""The rig lock (rig/lock.py): one rig per box, and a second holder in the same process fails at
once instead of waiting for itself (how a duplicated session fixture once cost CI 25 minutes)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rig.lock import FileLock, RigBusy


def test_second_holder_in_one_process_is_refused_at_once(tmp_path) -> None:
    first = FileLock(tmp_path / "rig.lock")
    first.acquire(timeout_s=5)
    try:
        t0 = time.monotonic()
        with pytest.raises(RigBusy, match="already held by another lock object in this process"):
            FileLock(tmp_path / "rig.lock").acquire(timeout_s=30)
        assert time.monotonic() - t0 < 5
    finally:
        first.release()
    again = FileLock(tmp_path / "rig.lock")
    again.acquire(timeout_s=5)  # released: free again
    again.release()


def test_other_process_waits_then_times_out_naming_the_holder(tmp_path) -> None:
    path = tmp_path / "rig.lock"
    holder = FileLock(path)
    holder.acquire(timeout_s=5)
    try:
        code = ("import sys; from pathlib import Path; from rig.lock import FileLock, RigBusy\n"
                f"try:\n    FileLock(Path({str(path)!r})).acquire(timeout_s=1.5)\n"
                "except RigBusy as e:\n    print(e); sys.exit(3)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert res.returncode == 3, res.stderr
        assert "held by pid" in res.stdout
    finally:
        holder.release()
