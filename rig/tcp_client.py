"""The outside client of P's echo server (run by the rig inside the client namespace, as a script).

Sends a numbered line every 50 ms on one long-lived connection and checks every echo. Every event is
logged with the host's wall clock, one per line, so gaps, reconnects, lost and duplicated lines can be
measured afterwards (rig.observers.parse_tcp_log):

    <time> connect|reconnect <n>        <time> send <seq>          <time> recv <seq>
    <time> error <text>                 <time> bad <expected> <got text>   <time> stop

A broken connection is logged and re-established (bounded): a reconnect is a failure the observer
reports, not something to hide.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

MAX_RECONNECTS = 1000


class Client:
    def __init__(self, host: str, port: int, log_path: str, interval: float, max_seconds: float) -> None:
        self.host, self.port, self.interval = host, port, interval
        self.deadline = time.monotonic() + max_seconds
        self.log_file = open(log_path, "a", buffering=1)
        self.log_lock = threading.Lock()
        self.stopping = threading.Event()
        self.seq = 0

    def log(self, text: str) -> None:
        with self.log_lock:
            self.log_file.write(f"{time.time():.6f} {text}\n")

    def connect(self, first: bool, attempts: int, connects: int) -> socket.socket | None:
        for _ in range(attempts):
            if self.stopping.is_set() or time.monotonic() > self.deadline:
                return None
            try:
                sock = socket.create_connection((self.host, self.port), timeout=2)
            except OSError:
                time.sleep(0.25)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # long enough that a migration's downtime never times a read out
            sock.settimeout(None)
            self.log(f"{'connect' if first else 'reconnect'} {connects}")
            return sock
        return None

    def receiver(self, sock: socket.socket, first_seq: list[int], broken: threading.Event) -> None:
        reader = sock.makefile("rb")
        try:
            for raw in reader:
                line = raw.decode(errors="replace").rstrip("\n")
                expected = first_seq[0]
                got = line.split(" ", 1)[0]
                if got == f"L{expected:08d}" and line == self.line_for(expected):
                    self.log(f"recv {expected}")
                    first_seq[0] += 1
                else:
                    self.log(f"bad {expected} {line[:80]}")
                    if got.startswith("L") and got[1:].isdigit():
                        first_seq[0] = int(got[1:]) + 1
        except OSError as e:
            if not self.stopping.is_set():
                self.log(f"error recv {e}")
        if not self.stopping.is_set():
            self.log("error eof")
        broken.set()

    @staticmethod
    def line_for(seq: int) -> str:
        return f"L{seq:08d} p2v-echo-{seq * 7919 % 100003:06d}"

    def run(self) -> None:
        sock = self.connect(first=True, attempts=int(120 / 0.25), connects=0)
        connects = 0
        while sock is not None:
            broken = threading.Event()
            expected = [self.seq]
            rx = threading.Thread(target=self.receiver, args=(sock, expected, broken), daemon=True)
            rx.start()
            next_send = time.monotonic()
            while not (self.stopping.is_set() or broken.is_set()) and time.monotonic() < self.deadline:
                try:
                    sock.sendall((self.line_for(self.seq) + "\n").encode())
                except OSError as e:
                    self.log(f"error send {e}")
                    break
                self.log(f"send {self.seq}")
                self.seq += 1
                next_send += self.interval
                delay = next_send - time.monotonic()
                if delay < -1.0:
                    next_send = time.monotonic()
                elif delay > 0:
                    self.stopping.wait(delay)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            rx.join(timeout=5)
            if self.stopping.is_set() or time.monotonic() > self.deadline:
                break
            connects += 1
            if connects > MAX_RECONNECTS:
                self.log("error too many reconnects")
                break
            time.sleep(0.5)
            sock = self.connect(first=False, attempts=40, connects=connects)
        self.log("stop")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--max-seconds", type=float, default=6 * 3600)
    args = ap.parse_args()
    client = Client(args.host, args.port, args.log, args.interval, args.max_seconds)

    def on_term(signum: int, frame: object) -> None:
        client.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    client.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
