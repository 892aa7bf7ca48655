"""A minimal synchronous QMP client. One connection per call, so several processes (a test, the
CLI's `status`) can talk to the same QEMU one after the other."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QMPError(RuntimeError):
    pass


class QMP:
    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.events: list[dict] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout_s: float | None = None) -> Any:
        timeout = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
            reader = sock.makefile("rb")
            self._read_message(reader, deadline, want="QMP")
            sock.sendall(json.dumps({"execute": "qmp_capabilities"}).encode() + b"\n")
            self._read_message(reader, deadline, want="return")
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            sock.sendall(json.dumps(msg).encode() + b"\n")
            reply = self._read_message(reader, deadline, want="return")
        if "error" in reply:
            raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply["return"]

    def _read_message(self, reader: Any, deadline: float, want: str) -> dict:
        while time.monotonic() < deadline:
            line = reader.readline()
            if not line:
                raise QMPError("QMP connection closed")
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                continue
            if want in msg or "error" in msg:
                return msg
        raise QMPError("QMP timeout")
