"""Workload 2: a TCP line echo server (the client lives in the rig's client namespace)."""

import socket
import socketserver
import sys
import time


class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        print(f"{time.time():.3f} connect {peer}", flush=True)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for line in self.rfile:
                self.wfile.write(line)
                self.wfile.flush()
        except OSError as e:
            print(f"{time.time():.3f} error {peer} {e}", flush=True)
        print(f"{time.time():.3f} close {peer}", flush=True)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    port = int(sys.argv[1])
    with Server(("0.0.0.0", port), EchoHandler) as server:
        print(f"{time.time():.3f} listening {port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
