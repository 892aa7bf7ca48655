"""One rig per box: the names (bridge, namespaces, P's tap and run dir) are fixed, so a second rig
would tear the first one down. Rig.start() takes an exclusive flock and keeps it until stop();
a second test session waits for it (bounded) instead of clobbering the first."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("P2V_RIG_LOCK_TIMEOUT", "1500"))


class RigBusy(RuntimeError):
    pass


# the lock paths this process holds: flock on a second descriptor of the same file would wait for
# ourselves, so a second holder in one process is a programming error and is refused at once
_HELD_HERE: set[Path] = set()


class FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return "?"

    def acquire(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if self._fd is not None:
            return
        if self.path.resolve() in _HELD_HERE:
            raise RigBusy(f"{self.path} is already held by another lock object in this process (pid {os.getpid()}): "
                          "a second Rig in one process would wait for itself; share the first one")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RigBusy(f"{self.path} held by {self.holder()} for more than {timeout_s:.0f}s") from None
                if not announced:
                    msg = f"waiting for {self.path} (held by {self.holder()})"
                    log.warning(msg)
                    print(f"rig: {msg}", file=sys.stderr, flush=True)
                    announced = True
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n".encode())
        self._fd = fd
        _HELD_HERE.add(self.path.resolve())

    def hand_over(self, argv: list[str]) -> subprocess.Popen:
        """Start argv (a long sleep) holding this lock, and let go of it here without unlocking:
        the lock lives as long as that process (how `python -m rig up` keeps the rig reserved
        after it exits; `python -m rig down` stops the holder)."""
        if self._fd is None:
            raise RuntimeError("lock not held")
        os.lseek(self._fd, 0, os.SEEK_END)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, pass_fds=(self._fd,), start_new_session=True)
        os.write(self._fd, f"held for the CLI by pid {proc.pid}\n".encode())
        os.close(self._fd)  # closing our descriptor does not unlock: the child shares the lock
        self._fd = None
        _HELD_HERE.discard(self.path.resolve())
        return proc

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
            _HELD_HERE.discard(self.path.resolve())
