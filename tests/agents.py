"""Start the real agent daemons as processes (optionally inside a network namespace)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class AgentProcess:
    def __init__(self, module: str, args: list[str], workdir: Path, *, netns: str | None = None,
                 name: str = "agent") -> None:
        self.ready_file = workdir / f"{name}.ready"
        self.log_path = workdir / f"{name}.log"
        self.ready_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", module, *args, "--ready-file", str(self.ready_file)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists() and self.ready_file.read_text().strip():
                return self.ready_file.read_text().strip()
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.output()}")
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 15.0) -> float:
        """SIGTERM; returns seconds until exit."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - start

    def stop(self) -> None:
        self.terminate()
        self.log.close()
