"""A real ``redis-server`` for tests: loopback only, no persistence, stopped by pid.

The port is picked once (ephemeral) and kept across :meth:`RedisServer.stop`
and :meth:`RedisServer.start`, so a client configured with :attr:`url`
sees "the same Redis" go away and come back, as after a pod restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"


def free_port() -> int:
    # The kernel picks an unused ephemeral port; it stays unused until
    # redis-server binds it a moment later (a race we retry in start()).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.2) -> bool:
    """Whether a Redis answers PING on the port (raw RESP: no client needed)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            # -NOAUTH: up, and asking for its password.
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process this test started (and only that one is ever stopped)."""

    def __init__(self, workdir: Path, port: int | None = None, *,
                 password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def url(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        for _attempt in range(5):
            if self._launch(timeout):
                self._started_once = True
                return
            if not self._started_once:
                # Someone took the port between free_port() and the bind: only a
                # port no client has seen yet may be swapped for another one.
                self.port = free_port()
        tail = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start on {self.url}:\n{tail}")

    def _launch(self, timeout: float) -> bool:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--bind", HOST,
                "--port", str(self.port),
                "--dir", str(self.workdir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", str(self.workdir / "redis.log"),
                *(("--requirepass", self.password) if self.password else ()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if _ping(self.port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # SIGTERM: redis-server exits at once (no save points configured).
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
