"""``clovisor trace --pod NAMESPACE/NAME``: the real tracer, the in-test Kubernetes API.

The API server (tests/agent/kube_server.py, the real wire format for the
real client) listens in the node namespace, where the tracer runs; it knows
the module's ``py`` and ``nginx`` pods by their real IPs. The tracer finds
their host-side veths from the node's routes, their ports from their
Services, and labels the spans with their Kubernetes attributes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clovisor.topology import in_netns
from tests.agent.kube_server import KubeServer, make_pod, make_service
from tests.integration.conftest import PORT, Net, TracerRun

pytestmark = pytest.mark.kernel

NODE = "node-a"


@pytest.fixture
def kube(net: Net, tmp_path: Path) -> Iterator[tuple[KubeServer, Path]]:
    server = KubeServer()
    with in_netns(net.topo.node_ns):
        server.start()
    try:
        # Services name their ports the two ways the agent honours: an
        # Istio-style name, and appProtocol.
        server.add_pod(make_pod("py-7d9c", namespace="shop", node=NODE, ip=net.py.ipv4,
                                labels={"app": "py"}, ports=[("http", PORT)],
                                container="server"))
        server.add_service(make_service("checkout", namespace="shop", selector={"app": "py"},
                                        ports=[("http-api", 80, "http")]))
        server.add_pod(make_pod("nginx-0", namespace="web", node=NODE, ip=net.nginx.ipv4,
                                labels={"app": "nginx"}, ports=[PORT], container="nginx"))
        server.add_service(make_service("front", namespace="web", selector={"app": "nginx"},
                                        ports=[{"name": "www", "port": 80, "targetPort": PORT,
                                                "appProtocol": "http"}]))
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")
    finally:
        server.stop()


def trace_pods(net: Net, tmp: Path, kubeconfig: Path, *args: str) -> tuple[TracerRun, Path]:
    lines = tmp / "sessions.jsonl"
    out = tmp / "spans.jsonl"
    argv = [sys.executable, "-m", "clovisor", "trace", *args, "--node", NODE,
            "--kubeconfig", str(kubeconfig), "-o", f"json:{lines}", "-o", f"otlp-json:{out}"]
    proc = subprocess.Popen([*net.topo.nsenter_prefix(net.topo.node_ns), *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = TracerRun(proc=proc, output=out, argv=argv)
    run.wait_started()
    return run, lines


def test_two_pods_by_name_with_ports_from_their_services_and_k8s_attributes(
    net: Net, kube: tuple[KubeServer, Path], tmp_path: Path
) -> None:
    _, kubeconfig = kube
    run, lines = trace_pods(net, tmp_path, kubeconfig, "--pod", "shop/py-7d9c",
                            "--pod", "web/nginx-0")
    try:
        assert f"tracing {net.py.host_ifname}, {net.nginx.host_ifname}" in run.stderr
        net.curl(f"http://{net.py.ipv4}:{PORT}/bytes/10", "-o", "/dev/null")
        net.curl(f"http://{net.nginx.ipv4}:{PORT}/hello", "-o", "/dev/null")
        spans = run.wait_for_spans(2)
        assert len(spans) == 2, run.stderr
    finally:
        assert run.stop() == 0, run.stderr
    by_pod = {s.resource["k8s.pod.name"]: s for s in spans}
    py, nginx = by_pod["py-7d9c"], by_pod["nginx-0"]
    assert py.resource["service.name"] == "checkout"
    assert py.resource["service.namespace"] == py.resource["k8s.namespace.name"] == "shop"
    assert py.resource["k8s.node.name"] == NODE
    assert py.resource["k8s.container.name"] == "server"
    assert py.resource["k8s.pod.uid"]
    assert py["url.path"] == "/bytes/10" and py["server.port"] == PORT
    assert nginx.resource["service.name"] == "front"
    assert nginx.resource["service.namespace"] == "web"
    assert nginx["url.path"] == "/hello" and nginx["http.response.status_code"] == 200
    records = {json.loads(line)["pod"]: json.loads(line)
               for line in lines.read_text().splitlines()}
    assert records["py-7d9c"]["namespace"] == "shop" and records["nginx-0"]["service"] == "front"


def test_port_flag_replaces_the_services_ports(
    net: Net, kube: tuple[KubeServer, Path], tmp_path: Path
) -> None:
    server, kubeconfig = kube
    server.delete_service("checkout", namespace="shop")  # no Service: --port says
    run, _ = trace_pods(net, tmp_path, kubeconfig, "--pod", "shop/py-7d9c",
                        "--port", f"{PORT}:tcp", "--service", "py-by-hand")
    try:
        net.curl(f"http://{net.py.ipv4}:{PORT}/bytes/10", "-o", "/dev/null")
        spans = run.wait_for_spans(1)
    finally:
        assert run.stop() == 0, run.stderr
    (span,) = spans
    assert span.resource["service.name"] == "py-by-hand"
    assert span.resource["k8s.pod.name"] == "py-7d9c"
    assert "http.request.method" not in span.attrs  # tcp: one connection-level session
