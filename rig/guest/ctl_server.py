"""P's control channel: run shell commands sent by the rig over a serial port (ttyS1).

Why serial: it needs no network, so it keeps working while P's address moves to a bond or the
network is blocked during a cutover. Protocol, one line each way, ASCII only:

    host -> P:  P2VCMD <id> <base64(json {"cmd": str, "timeout": float, "stdin": str})>
    P -> host:  P2VRES <id> <base64(json {"rc": int, "out": str, "err": str})>

Commands run concurrently (one thread each); replies are written whole under a lock.
"""

import base64
import json
import os
import subprocess
import sys
import termios
import threading
import time
import tty

MAX_OUTPUT = 4 << 20


def main() -> None:
    port = sys.argv[1] if len(sys.argv) > 1 else "/dev/ttyS1"
    try:
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        # no such port (e.g. a machine without a second UART): busybox init respawns us; don't spin
        print(f"ctl_server: cannot open {port}: {e}", file=sys.stderr)
        time.sleep(30)
        sys.exit(1)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[4] = attrs[5] = termios.B115200
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    write_lock = threading.Lock()

    def reply(req_id: str, result: dict) -> None:
        data = base64.b64encode(json.dumps(result).encode()).decode()
        line = f"P2VRES {req_id} {data}\n".encode()
        with write_lock:
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]

    def handle(req_id: str, payload: str) -> None:
        try:
            req = json.loads(base64.b64decode(payload))
            res = subprocess.run(["/bin/sh", "-c", req["cmd"]], input=req.get("stdin", "").encode(),
                                 capture_output=True, timeout=float(req.get("timeout", 60)))
            result = {"rc": res.returncode, "out": res.stdout[-MAX_OUTPUT:].decode("utf-8", "replace"),
                      "err": res.stderr[-MAX_OUTPUT:].decode("utf-8", "replace")}
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"")[-MAX_OUTPUT:].decode("utf-8", "replace")
            result = {"rc": -9, "out": out, "err": "ctl_server: timeout"}
        except Exception as e:  # a bad request must not kill the server
            result = {"rc": -1, "out": "", "err": f"ctl_server: {type(e).__name__}: {e}"}
        reply(req_id, result)

    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            time.sleep(0.1)
            continue
        buf += chunk
        if len(buf) > (8 << 20):  # garbage without newlines: drop it
            buf = b""
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            parts = line.strip().split()
            if len(parts) == 3 and parts[0] == b"P2VCMD":
                threading.Thread(target=handle, args=(parts[1].decode(), parts[2].decode()),
                                 daemon=True).start()


if __name__ == "__main__":
    main()
