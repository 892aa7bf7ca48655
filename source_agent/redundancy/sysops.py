"""Running system tools (modprobe, mdadm, nbd-client, update-initramfs) with bounded time and
errors that say what failed."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence

log = logging.getLogger(__name__)


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], rc: int, out: str, err: str) -> None:
        self.argv = list(argv)
        self.rc = rc
        self.out = out
        self.err = err
        detail = (err or out).strip().splitlines()
        super().__init__(f"`{' '.join(argv)}` failed (rc {rc}): {detail[-1] if detail else 'no output'}")


def need(tool: str) -> str:
    path = shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if not path:
        raise CommandError([tool], 127, "", f"{tool} is not installed")
    return path


def run(argv: Sequence[str], timeout: float = 60.0, check: bool = True, input: str | None = None) -> str:
    """Run a command, return its stdout. Raises CommandError on failure or timeout."""
    argv = [need(argv[0]), *argv[1:]]
    log.debug("run: %s", " ".join(argv))
    try:
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandError(argv, -9, str(e.stdout or ""), f"timed out after {timeout:g} s") from None
    if check and res.returncode != 0:
        raise CommandError(argv, res.returncode, res.stdout, res.stderr)
    return res.stdout
