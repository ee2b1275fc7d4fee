"""The HTTP server the demo (and some tests) run inside a pod namespace.

Endpoints that exercise what the tracer must get right: keep-alive, bodies
larger than the capture, chunked responses, bodiless statuses, errors, slow
answers and connections closed without an answer.
"""

from __future__ import annotations

import argparse
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "clovisor-demo/1"
    # Head and body go out in separate writes: with Nagle on, the body waits
    # for the client's delayed ACK (40 ms), which the spans would faithfully show.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        return None

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, b"hello from the demo pod\n")
        elif path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1] or 0)
            self._send(200, b"x" * n, "application/octet-stream")
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first ", b"x" * 50_000, b" last\n"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/status/204":
            self._send(204)
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"status\n")
        elif path.startswith("/slow/"):
            time.sleep(float(path.rsplit("/", 1)[1]))
            self._send(200, b"slow\n")
        elif path == "/reset":
            # Close with unread data pending: the kernel answers with RST.
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.close_connection = True
            self.connection.close()
        else:
            self._send(404, b"not found\n")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        remaining = length
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)
        self._send(201, f"received {length} bytes\n".encode())

    do_PUT = do_POST


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # One socket for both families: the demo sends IPv4 and IPv6 requests.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    with _Server6(("::", args.port), Handler) as srv:
        srv.serve_forever()


if __name__ == "__main__":
    main()
