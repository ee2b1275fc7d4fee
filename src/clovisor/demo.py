"""``clovisor demo``: a pod network from namespaces, a real server, real clients, traced.

It builds a "node" namespace with two "pod" namespaces (web, client) on veth
pairs, starts the demo HTTP server and the demo gRPC service in the web pod,
runs ``clovisor trace`` in the node namespace on the web pod's host-side veth
(as the DaemonSet agent would), drives a varied mix of curl requests and
gRPC calls (unary, streaming, errors, a deadline) from the client pod, and
then stops the tracer (which prints its totals) and removes everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from .kernel.errors import NotSupported
from .kernel.features import require
from .topology import Topology

PORT = 8080
GRPC_PORT = 50051
# The demo gRPC client's scenarios (clovisor.demo_grpc), with what each shows.
GRPC_CASES = (
    ("unary", "gRPC: unary calls on one channel"),
    ("streams", "gRPC: server, client and bidirectional streaming"),
    ("errors", "gRPC: errors (INVALID_ARGUMENT ... UNAVAILABLE) and a deadline"),
)


def _requests(v4: str, v6: str) -> list[tuple[str, list[str]]]:
    base, base6 = f"http://{v4}:{PORT}", f"http://[{v6}]:{PORT}"
    ua = ["-A", "clovisor-demo/1.0"]
    return [
        ("GET /", [f"{base}/?demo=1", *ua]),
        ("keep-alive: three requests on one connection",
         [f"{base}/", f"{base}/bytes/1000", f"{base}/status/404", *ua]),
        ("HEAD", ["-I", f"{base}/bytes/4096"]),
        ("POST with a 256 kB body",
         ["-X", "POST", "--data-binary", "@-", f"{base}/upload?name=blob", "-H",
          "X-Request-Id: demo-post-1"]),
        ("a 2 MB response (far beyond the capture length)", [f"{base}/bytes/2000000"]),
        ("chunked response", [f"{base}/chunked"]),
        ("204 No Content", [f"{base}/status/204"]),
        ("server error", [f"{base}/status/503"]),
        ("HTTP/1.0", ["--http1.0", f"{base}/"]),
        ("IPv6", [f"{base6}/ipv6"]),
        ("connection reset by the server", [f"{base}/reset"]),
    ]


def run_demo(requests: int = 40) -> int:
    if os.geteuid() != 0:
        print("clovisor demo: must run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    try:
        require()
    except NotSupported as exc:
        print(f"clovisor demo: this machine cannot run eBPF tracing: {exc}", file=sys.stderr)
        return 2
    with Topology(prefix="clvdemo", pods=("web", "client")) as topo, \
            tempfile.TemporaryDirectory(prefix="clvdemo-") as tmp:
        web, client = topo.pods["web"], topo.pods["client"]
        topo.spawn(web.netns, [sys.executable, "-m", "clovisor.demo_server", "--port", str(PORT)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        topo.spawn(web.netns, [sys.executable, "-m", "clovisor.demo_grpc", "server",
                               "--port", str(GRPC_PORT), "--log", f"{tmp}/calls.jsonl"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        topo.wait_for_port(client.netns, web.ipv4, PORT)
        topo.wait_for_port(client.netns, web.ipv4, GRPC_PORT, timeout=20)
        print(f"== demo: pod 'web' {web.ipv4} / {web.ipv6} serves HTTP on :{PORT} and gRPC "
              f"on :{GRPC_PORT}; its host-side veth in the node namespace is {web.host_ifname}")
        tracer = topo.spawn(
            topo.node_ns,
            [sys.executable, "-m", "clovisor", "trace", "--iface", web.host_ifname,
             "--port", str(PORT), "--port", f"{GRPC_PORT}:grpc", "--service", "demo-web",
             "--resource-attr", "k8s.pod.name=web"],
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        assert tracer.stderr is not None
        line = tracer.stderr.readline()
        if "tracing" not in line:
            rest = tracer.stderr.read() if tracer.poll() is not None else ""
            print(f"clovisor demo: the tracer did not start: {line}{rest}".strip(),
                  file=sys.stderr)
            return 1
        print(f"== {line.strip()}")
        cases = _requests(web.ipv4, web.ipv6)
        for i in range(requests):
            label, args = cases[i % len(cases)]
            if i < len(cases):
                print(f"== client: {label}", flush=True)
            stdin = b"p" * 262_144 if "@-" in args else None
            topo.run(client.netns, ["curl", "-s", "-o", "/dev/null", "--max-time", "5", *args],
                     check=False, input=stdin, text=False)
        for scenario, label in GRPC_CASES:
            print(f"== client: {label}", flush=True)
            topo.run(client.netns, [sys.executable, "-m", "clovisor.demo_grpc", "client",
                                    "--target", f"{web.ipv4}:{GRPC_PORT}", "--count", "3",
                                    scenario], check=False, timeout=60)  # fmt: skip
        time.sleep(0.5)  # the ring is read every 100 ms
        tracer.send_signal(signal.SIGINT)
        try:
            _, err = tracer.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            tracer.kill()
            _, err = tracer.communicate()
        print(f"== {err.strip()}" if err else "== tracer exited")
        print("== demo done: namespaces, veths and hooks are being removed")
        return 0 if tracer.returncode == 0 else 1
