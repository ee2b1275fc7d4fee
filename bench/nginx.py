"""The server under test: Debian's nginx, configured in a temporary directory."""

from __future__ import annotations

import re
from pathlib import Path

from clovisor.topology import http_get

PORT = 8080  # traced
STATUS_PORT = 8081  # nginx stub_status: the server's own request count, never traced
H2_PORT = 8082  # the same page over HTTP/2 in cleartext (prior knowledge)
PATH = "/hello"
BODY = "hello from nginx\n"
# The unthrottled workloads ask for this path now and then: a second status
# code (404) whose count nginx logs, so the RED metrics can be checked per
# status. Only these requests are logged (unbuffered: counted when answered).
MISSING = "/missing"
MISSING_LOG = "missing.log"

CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    server {{
        listen {port} reuseport backlog=4096;
        location = {path} {{ default_type text/plain; return 200 "{body}"; }}
        location = {missing} {{ access_log {d}/{missing_log}; return 404; }}
    }}
    server {{
        listen {h2_port} http2 reuseport backlog=4096;
        location = {path} {{ default_type text/plain; return 200 "{body}"; }}
    }}
    server {{
        listen {status_port};
        location = /status {{ stub_status; }}
    }}
}}
"""


def write_conf(d: Path) -> Path:
    """Write nginx.conf (pid, logs and temp files all under ``d``) and return its path."""
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    body = BODY.replace("\n", "\\n")
    conf.write_text(CONF.format(d=d, port=PORT, status_port=STATUS_PORT, h2_port=H2_PORT,
                                path=PATH, body=body, missing=MISSING, missing_log=MISSING_LOG))
    return conf


def missing_served(d: Path) -> int:
    """How many requests for :data:`MISSING` nginx has answered (404) so far."""
    log = d / MISSING_LOG
    if not log.exists():
        return 0
    with log.open("rb") as f:
        return sum(1 for _ in f)


def argv(conf: Path) -> list[str]:
    return ["nginx", "-c", str(conf), "-e", str(conf.parent / "error.log")]


_REQUESTS = re.compile(r"\n\s*\d+\s+\d+\s+(\d+)\s*\n")


def handled_requests(netns: str, addr: str, timeout: float = 5.0) -> int:
    """nginx's total request count (stub_status), asked from inside ``netns``.

    The answer counts the status request itself.
    """
    status, body = http_get(netns, addr, STATUS_PORT, "/status", timeout)
    m = _REQUESTS.search(body) if status == 200 else None
    if m is None:
        raise RuntimeError(f"unexpected stub_status answer: {status} {body!r}")
    return int(m.group(1))
