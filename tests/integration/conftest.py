"""Fixtures for end-to-end tests: the real ``clovisor trace`` CLI against real traffic.

A module-scoped :class:`~clovisor.topology.Topology` holds three pods:
``nginx`` (Debian's nginx), ``py`` (``clovisor.demo_server``) and ``client``
(curl, wrk and raw sockets), all serving on port 8080.  Each test starts its
own tracer as a subprocess inside the node namespace, drives traffic, stops
the tracer with a signal and reads the OTLP/JSON file it wrote.

Everything a fixture creates (namespaces, veths, servers, tracers, hooks) is
removed even when the test fails; processes are stopped by the pid we got
when starting them, never by name.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from clovisor.export.otlp_json import read_otlp_json
from clovisor.topology import Topology, in_netns
from tests.conftest import _kernel_problem, unavailable

PORT = 8080
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_UNSET = 0
STATUS_ERROR = 2
TRACER_START_TIMEOUT = 15.0
TRACER_STOP_TIMEOUT = 15.0

TOTALS_RE = re.compile(
    r"segments seen (?P<segments>\d+), events lost (?P<events_lost>\d+), "
    r"sessions emitted (?P<sessions>\d+), parse errors (?P<parse_errors>\d+), "
    r"exchanges paired (?P<exchanges>\d+)"
)

# --- nginx ---

BIG_FILE_BYTES = 5 * 1024 * 1024
TEXT_FILE = ("Clovisor traces HTTP sessions on pod veths. " * 40 + "\n") * 20

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    types {{ text/plain txt; application/octet-stream bin; }}
    keepalive_timeout 65;
    keepalive_requests 100000;
    chunked_transfer_encoding on;
    sendfile on;
    client_max_body_size 0;
    server {{
        listen {port} reuseport;
        listen [::]:{port} ipv6only=on reuseport;
        root {d}/www;
        location = /hello {{ return 200 "hello from nginx\\n"; }}
        location = /nocontent {{ return 204; }}
        location = /fail {{ return 503 "fail\\n"; }}
        location = /missing {{ return 404 "missing\\n"; }}
        # proxy_pass reads the whole request body before answering, as an
        # application would; a bare `return` answers before the body is in.
        location = /upload {{ proxy_pass http://127.0.0.1:{sink}/sink; }}
        location = /early {{ return 200 "early\\n"; }}
        location /gz/ {{
            alias {d}/www/;
            gzip on;
            gzip_min_length 0;
            gzip_http_version 1.0;
            gzip_types text/plain;
        }}
    }}
    server {{
        listen 127.0.0.1:{sink};
        location / {{ return 200 "uploaded\\n"; }}
    }}
}}
"""


def write_nginx_conf(d: Path) -> Path:
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    www = d / "www"
    www.mkdir(exist_ok=True)
    (www / "index.txt").write_text("static index\n")
    (www / "text.txt").write_text(TEXT_FILE)
    with open(www / "big.bin", "wb") as f:
        f.write(b"\xab" * BIG_FILE_BYTES)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=PORT, sink=PORT + 1))
    return conf


# --- topology ---


@dataclass
class Net:
    """The module's topology and its servers."""

    topo: Topology
    tmp: Path
    nginx_dir: Path

    @property
    def nginx(self) -> Any:
        return self.topo.pods["nginx"]

    @property
    def py(self) -> Any:
        return self.topo.pods["py"]

    @property
    def client(self) -> Any:
        return self.topo.pods["client"]

    def curl(self, *args: str, timeout: float = 20.0, check: bool = True,
             input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run curl in the client pod (silent, body to /dev/null unless told)."""
        argv = ["curl", "-sS", "--max-time", str(int(timeout)), *args]
        proc = subprocess.run([*self.topo.nsenter_prefix(self.client.netns), *argv],
                              capture_output=True, timeout=timeout + 5, input=input,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"curl {' '.join(args)} exited {proc.returncode}: "
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc

    @contextlib.contextmanager
    def client_socket(self, addr: str, port: int = PORT, *, nodelay: bool = False,
                      timeout: float = 5.0) -> Iterator[socket.socket]:
        """A TCP socket in the client pod, connected to ``addr:port``."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with in_netns(self.client.netns):
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect((addr, port))
            yield sock
        finally:
            sock.close()


def _need_kernel() -> None:
    problem = _kernel_problem()
    if problem is not None:
        unavailable(problem)
    for tool in ("nginx", "curl", "wrk"):
        if not any(os.access(os.path.join(p, tool), os.X_OK)
                   for p in ("/usr/sbin", "/usr/bin", "/sbin", "/bin")):
            unavailable(f"{tool} is not installed (run `make setup`)")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """Pods nginx, py and client; nginx and the demo server listen on 8080 (v4 and v6)."""
    _need_kernel()
    tmp = tmp_path_factory.mktemp("integration")
    nginx_dir = tmp / "nginx"
    conf = write_nginx_conf(nginx_dir)
    with Topology(prefix="clvi", pods=("nginx", "py", "client")) as topo:
        n = Net(topo, tmp, nginx_dir)
        with open(nginx_dir / "stderr.log", "wb") as nginx_stderr:
            topo.spawn(n.nginx.netns,
                       ["nginx", "-c", str(conf), "-e", str(nginx_dir / "error.log")],
                       stdout=subprocess.DEVNULL, stderr=nginx_stderr)
        topo.spawn(n.py.netns, [sys.executable, "-m", "clovisor.demo_server", "--port", str(PORT)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pod in (n.nginx, n.py):
            for addr in (pod.ipv4, pod.ipv6):
                try:
                    topo.wait_for_port(n.client.netns, addr, PORT, timeout=10)
                except TimeoutError:
                    log = (nginx_dir / "error.log")
                    raise AssertionError(
                        f"{pod.name} not listening on {addr}:{PORT}; nginx error log: "
                        f"{log.read_text() if log.exists() else '(none)'}") from None
        yield n


# --- spans ---


def _any_value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    if which is None:
        return None
    return getattr(v, which)


@dataclass
class Span:
    name: str
    kind: int
    status_code: int
    status_message: str
    start_ns: int
    end_ns: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    attrs: dict[str, Any]
    resource: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.attrs[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def __repr__(self) -> str:
        a = self.attrs
        return (f"<Span {self.name} kind={self.kind} status={self.status_code} "
                f"{a.get('http.request.method')} {a.get('url.path')} "
                f"-> {a.get('http.response.status_code')} {a.get('clovisor.outcome')} "
                f"{a.get('client.address')}:{a.get('client.port')}>")


def load_spans(path: Path) -> list[Span]:
    """Every span in an OTLP/JSON lines file, decoded with the official protobuf messages."""
    if not path.exists():
        return []
    # Polled while the tracer writes: a last line without its newline is still being written.
    text = path.read_text(encoding="utf-8")
    spans: list[Span] = []
    for req in read_otlp_json(io.StringIO(text[: text.rfind("\n") + 1])):
        for rs in req.resource_spans:
            resource = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(
                        name=s.name, kind=s.kind, status_code=s.status.code,
                        status_message=s.status.message,
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        trace_id=s.trace_id, span_id=s.span_id,
                        parent_span_id=s.parent_span_id,
                        attrs={kv.key: _any_value(kv.value) for kv in s.attributes},
                        resource=resource,
                    ))
    return spans


# --- the tracer subprocess ---


@dataclass
class TracerRun:
    """One ``clovisor trace`` subprocess in the node namespace."""

    proc: subprocess.Popen[str]
    output: Path
    argv: list[str]
    stderr_lines: list[str] = field(default_factory=list)
    _started: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None
    returncode: int | None = None
    t0: float = field(default_factory=time.time)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "tracing" in line:
                self._started.set()
        self._started.set()  # EOF: wake a waiter up, it checks the process

    def wait_started(self, timeout: float = TRACER_START_TIMEOUT) -> None:
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self._started.wait(timeout)
        if not any("tracing" in line for line in self.stderr_lines):
            self.kill()
            raise AssertionError(f"tracer did not start: {self.argv}\n{self.stderr}")

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait(self, timeout: float = TRACER_STOP_TIMEOUT) -> int:
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"tracer did not exit in {timeout}s:\n{self.stderr}") from None
        if self._reader is not None:
            self._reader.join(5)
        return self.returncode

    def stop(self, sig: int = signal.SIGINT, timeout: float = TRACER_STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the tracer's process group (it leads its own session)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    @property
    def totals(self) -> dict[str, int]:
        m = TOTALS_RE.search(self.stderr)
        assert m is not None, f"no totals line on stderr:\n{self.stderr}"
        return {k: int(v) for k, v in m.groupdict().items()}

    def spans(self) -> list[Span]:
        return load_spans(self.output)

    def wait_for_spans(self, n: int, timeout: float = 10.0,
                       pred: Callable[[Span], bool] = lambda s: True) -> list[Span]:
        """Poll the output file until ``n`` spans (matching ``pred``) are there."""
        deadline = time.monotonic() + timeout
        while True:
            spans = [s for s in self.spans() if pred(s)]
            if len(spans) >= n or time.monotonic() >= deadline:
                return spans
            if self.proc.poll() is not None:
                return spans
            time.sleep(0.05)


TracerFactory = Callable[..., TracerRun]


def start_tracer(topo: Topology, tmp: Path, iface: str | Sequence[str], *extra: str,
                 port: int | None = PORT, name: str = "spans.jsonl",
                 wait: bool = True) -> TracerRun:
    ifaces = [iface] if isinstance(iface, str) else list(iface)
    out = tmp / name
    argv = [sys.executable, "-m", "clovisor", "trace"]
    for i in ifaces:
        argv += ["--iface", i]
    if port is not None:
        argv += ["--port", str(port)]
    argv += ["--output", f"otlp-json:{out}", *extra]
    proc = subprocess.Popen(
        [*topo.nsenter_prefix(topo.node_ns), *argv],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    run = TracerRun(proc=proc, output=out, argv=argv)
    if wait:
        run.wait_started()
    return run


@pytest.fixture
def tracer(net: Net, tmp_path: Path) -> Iterator[TracerFactory]:
    """Factory: ``tracer(iface, *extra_args, port=8080)`` -> a started :class:`TracerRun`.

    Every tracer still running at teardown is killed (by its pid's group).
    """
    runs: list[TracerRun] = []

    def make(iface: str | Sequence[str], *extra: str, **kw: Any) -> TracerRun:
        run = start_tracer(net.topo, tmp_path, iface, *extra,
                           name=f"spans-{len(runs)}.jsonl", **kw)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.kill()


def assert_recent(span: Span, t0: float, slack: float = 5.0) -> None:
    """Span times are wall clock, ordered, and within the test's lifetime."""
    now = time.time()
    assert span.start_ns <= span.end_ns, span
    assert (t0 - slack) * 1e9 <= span.start_ns <= (now + slack) * 1e9, (span, t0, now)
    assert span.end_ns <= (now + slack) * 1e9, span


# --- a tiny HTTP/1.x response reader for raw-socket clients ---


@dataclass
class Response:
    version: str
    status: int
    headers: dict[str, str]  # lower-case names, last one wins
    wire_body: int  # body bytes on the wire (chunk framing included)
    body: bytes  # decoded (de-chunked) body


def read_response(f: Any, *, head: bool = False) -> Response:
    """Read one response from a binary file object (``sock.makefile('rb')``).

    1xx interim responses are skipped; HEAD, 204 and 304 have no body; a
    response without Content-Length or chunked coding runs to EOF.
    """
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("connection closed before a response")
        version, code = line.split(b" ", 2)[:2]
        headers: dict[str, str] = {}
        while True:
            h = f.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(code)
        if 100 <= status < 200:
            continue
        break
    wire = 0
    body = b""
    if head or status in (204, 304):
        pass
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = f.readline()
            wire += len(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = f.readline()
                    wire += len(t)
                    if t in (b"\r\n", b"\n", b""):
                        break
                break
            data = f.read(size + 2)
            wire += len(data)
            body += data[:size]
    elif "content-length" in headers:
        body = f.read(int(headers["content-length"]))
        wire = len(body)
    else:
        body = f.read()
        wire = len(body)
    return Response(version.decode(), status, headers, wire, body)
