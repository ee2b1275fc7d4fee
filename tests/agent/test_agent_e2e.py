"""``clovisor agent`` end to end: a node made of namespaces, with every component real.

The module builds one :class:`~clovisor.topology.Topology` as the node: pods
``web`` and ``api`` run the demo HTTP server, ``cache`` runs a redis-server
(an inline line protocol, for the parser plugin), ``greeter`` the demo gRPC
service, ``client`` runs curl, the gRPC client and raw sockets. Inside the
node namespace, where the agent runs (it is hostNetwork there), each test
starts its own in-test Kubernetes API server and OTLP/gRPC receivers; one
real redis-server serves the whole module and is emptied before each test.
The agent is the real ``python -m clovisor agent`` subprocess; what it did
is read from the kernel (TCX links and tc filters on the veths), from the
spans the receivers decoded and from its log.

Nothing waits a fixed time for an outcome: every wait polls a condition.
Teardown kills the agents still running (by the pid we started), removes
clsact filters a killed agent left, and deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from clovisor.kernel.attach import Hook, cleanup, list_hooks
from clovisor.topology import Pod, Topology, http_get, in_netns
from tests.export.certs import make_pki
from tests.export.receiver import GrpcReceiver, HttpReceiver

from .kube_server import KubeServer, make_pod, make_service
from .redis_server import RedisServer

pytestmark = pytest.mark.kernel

NODE = "node-a"
HTTP_PORT = 8080
CACHE_PORT = 6379
GRPC_PORT = 50051
METRICS_PORT = 9464  # in the node namespace, which only this module uses
WAIT = 15.0  # upper bound of every poll; conditions are usually met in well under 2 s
TOTALS = "segments seen"


# --- the node -------------------------------------------------------------------------------


@dataclass
class Node:
    topo: Topology
    store: RedisServer  # the configuration Redis
    tmp: Path

    @property
    def ns(self) -> str:
        return self.topo.node_ns

    def pod(self, name: str) -> Pod:
        return self.topo.pods[name]

    def redis_do(self, fn: Callable[[redis.Redis], Any]) -> Any:
        """Run ``fn(client)`` against the node's Redis (its socket lives in the node namespace)."""
        with in_netns(self.ns):
            client = redis.Redis(host="127.0.0.1", port=self.store.port, socket_timeout=5)
            try:
                return fn(client)
            finally:
                client.close()

    def hooks(self, pod: str) -> list[Hook]:
        """Clovisor's hooks on the pod's host-side veth, read from the kernel."""
        with in_netns(self.ns):
            return [h for h in list_hooks(self.pod(pod).host_ifname) if h.ours]

    def curl(self, pod: str, path: str = "/") -> None:
        url = f"http://{self.pod(pod).ipv4}:{HTTP_PORT}{path}"
        self.topo.run(self.pod("client").netns, ["curl", "-sS", "--max-time", "5", "-o",
                                                 "/dev/null", url])

    def lines(self, pod: str, port: int, lines: list[bytes]) -> list[bytes]:
        """Send each line on one connection from the client pod and read one reply line each."""
        with in_netns(self.pod("client").netns):
            sock = socket.create_connection((self.pod(pod).ipv4, port), timeout=5)
        replies = []
        with sock, sock.makefile("rb") as f:
            for line in lines:
                sock.sendall(line)
                replies.append(f.readline())
        return replies

    def get(self, path: str) -> tuple[int, str]:
        """GET on the agent's status server (in the node namespace); 0 if it does not answer."""
        return http_get(self.ns, "127.0.0.1", METRICS_PORT, path, timeout=10)

    def in_node(self, fn: Callable[[], Any]) -> Any:
        with in_netns(self.ns):
            return fn()


def _wait_port(topo: Topology, pod: Pod, port: int) -> None:
    topo.wait_for_port(topo.pods["client"].netns, pod.ipv4, port, timeout=10)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("agent-e2e")
    with Topology(prefix="clva", pods=("web", "api", "cache", "client", "greeter")) as topo:
        for name in ("web", "api"):
            topo.spawn(topo.pods[name].netns,
                       [sys.executable, "-m", "clovisor.demo_server", "--port", str(HTTP_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache_dir = tmp / "cache"
        cache_dir.mkdir()
        topo.spawn(topo.pods["cache"].netns,
                   ["redis-server", "--bind", topo.pods["cache"].ipv4, "--port", str(CACHE_PORT),
                    "--save", "", "--appendonly", "no", "--protected-mode", "no",
                    "--dir", str(cache_dir), "--logfile", str(cache_dir / "redis.log")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        topo.spawn(topo.pods["greeter"].netns,
                   [sys.executable, "-m", "clovisor.demo_grpc", "server", "--port", str(GRPC_PORT),
                    "--log", str(tmp / "greeter-calls.jsonl")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, port in (("web", HTTP_PORT), ("api", HTTP_PORT), ("cache", CACHE_PORT),
                           ("greeter", GRPC_PORT)):
            _wait_port(topo, topo.pods[name], port)
        config_dir = tmp / "redis"
        config_dir.mkdir()
        store = RedisServer(config_dir)
        # Started from a thread in the node namespace: redis-server is born there.
        with in_netns(topo.node_ns):
            store.start()
        try:
            yield Node(topo, store, tmp)
        finally:
            store.stop()


# --- Kubernetes objects of the node ---------------------------------------------------------


def web_pod(n: Node, **kw: Any) -> dict[str, Any]:
    p = n.pod("web")
    kw.setdefault("ip", p.ipv4)
    kw.setdefault("ips", [p.ipv4, p.ipv6])
    return make_pod("web", node=NODE, labels={"app": "web"}, ports=[("http", HTTP_PORT)],
                    container="server", **kw)


def api_pod(n: Node) -> dict[str, Any]:
    p = n.pod("api")
    return make_pod("api", namespace="shop", node=NODE, ip=p.ipv4, labels={"app": "api"},
                    ports=[HTTP_PORT], container="api")


def cache_pod(n: Node) -> dict[str, Any]:
    return make_pod("cache", node=NODE, ip=n.pod("cache").ipv4, labels={"app": "cache"},
                    ports=[("redis", CACHE_PORT)], container="redis")


SERVICES = [
    # A named target port (the container's "http"), Istio-style port name.
    make_service("web", selector={"app": "web"}, ports=[("http", 80, "http")]),
    # Selects the web pod too, and sorts first: it must be skipped, or the
    # web pod's service.name would be "kubernetes".
    make_service("kubernetes", selector={"app": "web"}, ports=[("https", 443, HTTP_PORT),
                                                               ("http", 80, HTTP_PORT)]),
    make_service("api", namespace="shop", selector={"app": "api"},
                 ports=[("http-api", 80, HTTP_PORT)]),
    make_service("cache", selector={"app": "cache"}, ports=[("lineproto", CACHE_PORT, "redis")]),
    # A port named grpc (Istio style), to the container port named grpc.
    make_service("greeter", selector={"app": "greeter"}, ports=[("grpc", 80, "grpc")]),
]


@pytest.fixture
def kube(node: Node) -> Iterator[KubeServer]:
    """A fresh API server listening in the node namespace, with the services above."""
    server = KubeServer()
    node.in_node(server.start)
    for svc in SERVICES:
        server.add_service(svc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(kube: KubeServer, tmp_path: Path) -> Path:
    return kube.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def jaeger(node: Node) -> Iterator[GrpcReceiver]:
    """An OTLP/gRPC receiver in the node namespace; Redis names it as the Jaeger server."""
    receiver: GrpcReceiver = node.in_node(GrpcReceiver)
    node.redis_do(lambda r: r.set("clovisor_jaeger_server", f"127.0.0.1:{receiver.port}"))
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(autouse=True)
def empty_redis(node: Node) -> None:
    if not node.store.running:
        node.in_node(node.store.start)
    node.redis_do(lambda r: r.flushall())


# --- the agent ------------------------------------------------------------------------------


@dataclass
class AgentRun:
    proc: subprocess.Popen[str]
    argv: list[str]
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_log(self, text: str, n: int = 1, timeout: float = WAIT) -> str:
        """The ``n``-th log line containing ``text`` (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if text in line]
                if len(found) >= n:
                    return found[n - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(f"agent never logged {text!r}:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"agent did not exit on signal {sig}:\n{self.log}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


AgentFactory = Callable[..., AgentRun]


@pytest.fixture
def agent(node: Node, kubeconfig: Path) -> Iterator[AgentFactory]:
    """Factory: ``agent(*extra_args, env={...})`` starts ``clovisor agent`` in the node
    namespace, with ``env`` added to an environment cleared of the agent's variables."""
    runs: list[AgentRun] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> AgentRun:
        argv = [sys.executable, "-m", "clovisor", "agent", "--node", NODE,
                "--kubeconfig", str(kubeconfig), "--redis", node.store.url,
                "--metrics", f"127.0.0.1:{METRICS_PORT}", *extra]
        env = {**{k: v for k, v in os.environ.items()
                  if k not in ("KUBECONFIG", "MY_NODE_NAME", "CLOVISOR_REDIS", "CLOVISOR_JAEGER",
                               "CLOVISOR_LOG_LEVEL") and not k.startswith("OTEL_")},
               **(env or {})}
        proc = subprocess.Popen([*node.topo.nsenter_prefix(node.ns), *argv],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=env)
        run = AgentRun(proc, argv)
        threading.Thread(target=run._read, daemon=True).start()
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()
    # A SIGKILLed agent in clsact mode leaves its filters: later tests must not see them.
    node.in_node(cleanup)


# --- polling --------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def traced(n: Node, pod: str) -> bool:
    """Both directions hooked, exactly once each."""
    return sorted(h.direction for h in n.hooks(pod)) == ["egress", "ingress"]


def wait_traced(n: Node, *pods: str) -> None:
    wait_until(lambda: all(traced(n, p) for p in pods), f"pods {pods} are traced")


def wait_untraced(n: Node, *pods: str) -> None:
    wait_until(lambda: not any(n.hooks(p) for p in pods), f"pods {pods} have no hooks")


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return None if which is None else getattr(v, which)


@dataclass(frozen=True)
class Span:
    name: str
    attrs: dict[str, Any]
    resource: dict[str, Any]


def spans(receiver: GrpcReceiver) -> list[Span]:
    out = []
    for req in receiver.requests():
        for rs in req.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(Span(s.name, {kv.key: _value(kv.value) for kv in s.attributes},
                                    resource))
    return out


def wait_spans(receiver: GrpcReceiver, pred: Callable[[Span], bool], n: int = 1,
               timeout: float = WAIT) -> list[Span]:
    found: list[Span] = []

    def enough() -> bool:
        found[:] = [s for s in spans(receiver) if pred(s)]
        return len(found) >= n

    wait_until(enough, f"{n} matching span(s) arrived (got {len(found)})", timeout)
    return found


def of_pod(pod: str) -> Callable[[Span], bool]:
    return lambda s: s.resource.get("k8s.pod.name") == pod


# --- the tests ------------------------------------------------------------------------------


def test_pod_appears_is_traced_with_its_kubernetes_attributes_and_detached_when_deleted(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory
) -> None:
    a = agent()
    wait_until(lambda: node.get("/readyz")[0] == 200, "the agent is ready")
    assert node.get("/healthz")[0] == 200
    # Scheduled, no IP yet: nothing to attach to.
    kube.add_pod(web_pod(node, phase="Pending", ip=None, ips=None))
    kube.add_pod(make_pod("hostnet", node=NODE, ip=node.topo.gateway4, labels={"app": "web"},
                          ports=[("http", HTTP_PORT)], host_network=True))
    kube.add_pod(make_pod("elsewhere", node="node-b", ip=node.pod("api").ipv4,
                          labels={"app": "web"}, ports=[("http", HTTP_PORT)]))
    # Selected, Running, but no veth of this node routes to its IP.
    kube.add_pod(make_pod("ghost", node=NODE, ip="10.200.0.250", labels={"app": "web"},
                          ports=[("http", HTTP_PORT)]))
    a.wait_log("pod default/hostnet not traced: hostNetwork pod")
    a.wait_log("pod default/ghost (10.200.0.250): no host-side veth found on this node yet")
    assert not node.hooks("web")

    kube.update_pod(web_pod(node))  # Running with its IP
    t0 = time.monotonic()
    wait_traced(node, "web")
    print(f"web pod traced {time.monotonic() - t0:.2f}s after it got its IP")
    a.wait_log("tracing pod default/web on clva0: ports 8080/http")
    node.curl("web", "/")
    (span,) = wait_spans(jaeger, of_pod("web"))
    assert span.resource["service.name"] == "web"  # not the "kubernetes" service
    assert span.resource["k8s.namespace.name"] == "default"
    assert span.resource["k8s.node.name"] == NODE
    assert span.resource["k8s.container.name"] == "server"
    assert span.attrs["http.request.method"] == "GET"
    assert span.attrs["http.response.status_code"] == 200
    assert span.attrs["server.port"] == HTTP_PORT
    assert span.attrs["client.address"] == node.pod("client").ipv4
    # Not selected (namespace shop) or not here (node-b, the client): untouched.
    assert not node.hooks("api") and not node.hooks("client")

    metrics = node.get("/metrics")[1]
    assert "clovisor_agent_traced_pods 1.0" in metrics
    assert "clovisor_agent_unresolved_pods 1.0" in metrics  # the ghost
    assert "clovisor_kubernetes_synced 1.0" in metrics

    kube.delete_pod("web")
    wait_untraced(node, "web")
    a.wait_log("stopped tracing pod default/web on clva0")
    assert a.stop() == 0
    assert TOTALS in a.log and "sessions emitted" in a.log


def test_labels_in_redis_select_and_deselect_pods(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory
) -> None:
    kube.add_pod(web_pod(node))
    kube.add_pod(api_pod(node))
    a = agent()
    wait_traced(node, "web")  # the default: every pod of namespace default
    assert not node.hooks("api")

    node.redis_do(lambda r: r.rpush("clovisor_labels", "shop"))
    wait_traced(node, "api")
    wait_untraced(node, "web")
    node.curl("api", "/")
    (span,) = wait_spans(jaeger, of_pod("api"))
    assert span.resource["service.name"] == "api"
    assert span.resource["k8s.namespace.name"] == "shop"
    assert span.resource["k8s.container.name"] == "api"

    # A label rule selects by label; an entry that matches nothing selects nothing.
    def by_label(r: redis.Redis) -> None:
        r.delete("clovisor_labels")
        r.rpush("clovisor_labels", "default:app:web", "shop:app:nope")

    node.redis_do(by_label)
    wait_traced(node, "web")
    wait_untraced(node, "api")
    assert a.proc.poll() is None


def test_bad_config_strings_are_logged_with_their_value_and_the_rest_applies(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory
) -> None:
    def bad(r: redis.Redis) -> None:
        r.rpush("clovisor_labels", "Bad_NS!", "shop", "default:app")
        r.rpush("clovisor_egress_match", "1.2.3:80", "0:9999", "10.200.0.1:99999")
        r.rpush("clovior_egress_match", "10.200.0.1:7000:api")  # the legacy spelling

    node.redis_do(bad)
    kube.add_pod(web_pod(node))
    kube.add_pod(api_pod(node))
    a = agent()
    wait_traced(node, "api")
    line = a.wait_log("tracing pod shop/api")
    assert "egress 0:9999, 10.200.0.1:7000" in line, line
    for value in ("Bad_NS!", "'default:app'", "1.2.3:80", "99999"):
        logged = a.wait_log(value)
        assert "skipped" in logged and "redis config" in logged, logged
    # "default" is not among the valid entries: web stays untraced.
    assert not node.hooks("web")
    node.curl("api", "/")
    wait_spans(jaeger, of_pod("api"))
    assert a.proc.poll() is None


def test_jaeger_endpoint_change_in_redis_moves_the_spans(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory
) -> None:
    kube.add_pod(web_pod(node))
    a = agent()
    wait_traced(node, "web")
    node.curl("web", "/")
    wait_spans(jaeger, of_pod("web"))

    with node.in_node(GrpcReceiver) as other:
        node.redis_do(lambda r: r.set("clovisor_jaeger_server", f"127.0.0.1:{other.port}"))
        a.wait_log(f"spans now go to grpc http://127.0.0.1:{other.port} "
                   "(from Redis clovisor_jaeger_server)")
        node.curl("web", "/moved")
        (span,) = wait_spans(other, lambda s: s.attrs.get("url.path") == "/moved")
        assert span.resource["k8s.pod.name"] == "web"
        assert not [s for s in spans(jaeger) if s.attrs.get("url.path") == "/moved"]
    assert a.stop() == 0


@pytest.mark.parametrize("mode", ["tcx", "clsact"])
def test_killed_agent_restarted_leaves_no_duplicate_or_stale_hooks(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory, mode: str
) -> None:
    node.redis_do(lambda r: r.rpush("clovisor_labels", "default", "shop"))
    kube.add_pod(web_pod(node))
    kube.add_pod(api_pod(node))
    first = agent("--attach-mode", mode)
    wait_traced(node, "web", "api")
    first.kill()  # SIGKILL: no chance to detach
    if mode == "clsact":
        # tc filters outlive their process: the restart has something to clean.
        assert traced(node, "web") and traced(node, "api")
    else:
        assert not node.hooks("web") and not node.hooks("api")  # links die with their fds
    kube.delete_pod("api", namespace="shop")  # while no agent runs

    second = agent("--attach-mode", mode)
    wait_until(lambda: node.get("/readyz")[0] == 200, "the restarted agent is ready")
    wait_traced(node, "web")
    assert not node.hooks("api")  # stale: its pod is gone
    if mode == "clsact":
        second.wait_log("removed a hook left by an earlier agent: clva1 ingress tc filter")
    hooks = node.hooks("web")
    assert len(hooks) == 2 and {h.mode for h in hooks} == {mode}, hooks
    node.curl("web", "/again")
    wait_spans(jaeger, lambda s: s.attrs.get("url.path") == "/again")

    assert second.stop() == 0  # SIGTERM: detach, flush, totals
    assert not node.hooks("web") and not node.hooks("api")
    assert TOTALS in second.log


def test_redis_down_at_start_uses_the_defaults_then_its_config(
    node: Node, kube: KubeServer, agent: AgentFactory
) -> None:
    kube.add_pod(web_pod(node))
    kube.add_pod(api_pod(node))
    node.store.stop()
    with node.in_node(GrpcReceiver) as fallback:
        a = agent("--jaeger", f"127.0.0.1:{fallback.port}")
        a.wait_log("using the defaults until it answers")
        wait_traced(node, "web")  # the default labels
        node.curl("web", "/")
        wait_spans(fallback, of_pod("web"))  # the --jaeger default

        node.in_node(node.store.start)  # the same port
        node.redis_do(lambda r: r.rpush("clovisor_labels", "shop"))
        wait_traced(node, "api")
        wait_untraced(node, "web")
        a.wait_log("reachable: reading the configuration")
        assert a.proc.poll() is None


def test_kubernetes_api_down_keeps_tracing_and_readiness_waits_for_it(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory
) -> None:
    kube.add_pod(web_pod(node))
    kube.stop()  # down before the agent starts
    a = agent()
    a.wait_log("classifier loaded")
    wait_until(lambda: node.get("/healthz")[0] == 200, "the status server answers")
    status, body = node.get("/readyz")
    assert status == 503 and "waiting for the Kubernetes API" in body
    assert not node.hooks("web")

    node.in_node(kube.restart)
    wait_traced(node, "web")
    wait_until(lambda: node.get("/readyz")[0] == 200, "the agent is ready")

    kube.stop()  # down while tracing: what is attached stays attached
    node.curl("web", "/during-outage")
    wait_spans(jaeger, lambda s: s.attrs.get("url.path") == "/during-outage")
    assert traced(node, "web") and node.get("/readyz")[0] == 200
    kube.delete_pod("web")  # the agent learns it when the API is back
    node.in_node(kube.restart)
    wait_untraced(node, "web")
    assert a.proc.poll() is None


def test_parser_plugins_from_redis_loaded_reloaded_broken_ones_disabled(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory
) -> None:
    def plugins(r: redis.Redis) -> None:
        r.hset("clovisor_proto_cfg", mapping={
            "lineproto": "lineproto",  # shipped in clovisor.parsers
            "nosuch": "nosuch_parser",  # not installed
            "evil": "/tmp/evil.py",  # never imported: a path
        })

    node.redis_do(plugins)
    kube.add_pod(cache_pod(node))
    kube.add_pod(web_pod(node))
    a = agent()
    wait_traced(node, "cache", "web")
    a.wait_log("tracing pod default/cache on clva2: ports 6379/lineproto")
    assert "not installed" in a.wait_log("parser plugin 'nosuch' disabled")
    assert "looks like a file path" in a.wait_log("'/tmp/evil.py'")

    assert node.lines("cache", CACHE_PORT, [b"PING\r\n", b"PING\r\n"]) == [b"+PONG\r\n"] * 2
    found = wait_spans(jaeger, of_pod("cache"), n=2)
    assert {s.attrs.get("network.protocol.name") for s in found} == {"lineproto"}
    assert {s.resource["service.name"] for s in found} == {"cache"}

    node.redis_do(lambda r: r.publish("clovisor_proto_plugin_cfg_chan", "lineproto"))
    a.wait_log("parser plugin 'lineproto' reloaded")
    node.redis_do(lambda r: r.publish("clovisor_proto_plugin_cfg_chan", "nosuch"))
    a.wait_log("parser plugin 'nosuch' disabled", n=2)  # tried again, still not there
    # Still tracing, plugins and HTTP alike.
    node.curl("web", "/")
    wait_spans(jaeger, of_pod("web"))
    assert a.proc.poll() is None and traced(node, "cache")


def test_otel_settings_alone_mutual_tls_auth_header_and_debug_json_logs(
    node: Node, kube: KubeServer, agent: AgentFactory
) -> None:
    """No Redis key, no --jaeger: OTEL_EXPORTER_OTLP_* say where and how, TLS included."""
    pki = make_pki(node.tmp)
    secret = "Bearer s3cr3t-t0ken"
    kube.add_pod(web_pod(node))
    with node.in_node(lambda: GrpcReceiver(tls=pki)) as collector:
        env = {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"https://127.0.0.1:{collector.port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key),
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cr3t-t0ken",
        }
        a = agent("--log-level", "debug", "--log-format", "json", env=env)
        a.wait_log(f"spans to grpc https://127.0.0.1:{collector.port} "
                   "(from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)")
        wait_traced(node, "web")
        node.curl("web", "/tls")
        (span,) = wait_spans(collector, lambda s: s.attrs.get("url.path") == "/tls")
        assert span.resource["k8s.pod.name"] == "web"
        assert {r.headers["authorization"] for r in collector.received} == {secret}

        # Redis names an endpoint: it wins over the OTEL one, and the OTEL
        # settings (CA, client certificate, header) still apply to it.
        with node.in_node(lambda: GrpcReceiver(tls=pki)) as other:
            node.redis_do(lambda r: r.set("clovisor_jaeger_server",
                                          f"127.0.0.1:{other.port}"))
            a.wait_log(f"spans now go to grpc https://127.0.0.1:{other.port} "
                       "(from Redis clovisor_jaeger_server)")
            node.curl("web", "/redis-wins")
            wait_spans(other, lambda s: s.attrs.get("url.path") == "/redis-wins")
            assert {r.headers["authorization"] for r in other.received} == {secret}
        assert a.stop() == 0

    records = [json.loads(line) for line in a.lines]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    levels = {r["level"] for r in records}
    assert "debug" in levels and "info" in levels, levels
    assert any("kube pods: listed" in r["message"] for r in records)
    assert any("segments seen" in r["message"] for r in records)  # the totals, as a record
    assert "s3cr3t" not in a.log


def test_otel_endpoint_over_http_protobuf_by_default(
    node: Node, kube: KubeServer, agent: AgentFactory
) -> None:
    kube.add_pod(web_pod(node))
    with node.in_node(HttpReceiver) as collector:
        # No protocol given: http/protobuf, as the OpenTelemetry specification says.
        a = agent("-v", env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint})
        a.wait_log(f"spans to http/protobuf {collector.url}")
        wait_traced(node, "web")
        node.curl("web", "/over-http")
        (span,) = wait_spans(collector, lambda s: s.attrs.get("url.path") == "/over-http")
        assert span.resource["service.name"] == "web"
        assert collector.received[0].headers["content-type"] == "application/x-protobuf"
        assert " DEBUG " in a.log  # -v after the subcommand: info -> debug
        assert a.stop() == 0


def test_two_services_web_in_two_namespaces_stay_apart_in_spans_and_metrics(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory
) -> None:
    node.redis_do(lambda r: r.rpush("clovisor_labels", "default", "shop"))
    kube.delete_service("api", namespace="shop")
    kube.add_service(make_service("web", namespace="shop", selector={"app": "api"},
                                  ports=[("http", 80, HTTP_PORT)]))
    kube.add_pod(web_pod(node))
    kube.add_pod(api_pod(node))
    a = agent()
    wait_traced(node, "web", "api")
    node.curl("web", "/a")
    node.curl("api", "/b")
    node.curl("api", "/c")
    found = wait_spans(jaeger, lambda s: s.attrs.get("url.path") in ("/a", "/b", "/c"), n=3)
    assert {(s.resource["service.name"], s.resource["service.namespace"]) for s in found} == {
        ("web", "default"), ("web", "shop")}

    def series() -> dict[tuple[str, str], float]:
        """Requests per (service_name, service_namespace), over every route."""
        out: dict[tuple[str, str], float] = {}
        for fam in text_string_to_metric_families(node.get("/metrics")[1]):
            for s in fam.samples:
                if s.name == "http_server_request_duration_seconds_count":
                    key = (s.labels["service_name"], s.labels["service_namespace"])
                    out[key] = out.get(key, 0) + s.value
        return out

    wait_until(lambda: len(series()) == 2, "both services have their own series")
    assert series() == {("web", "default"): 1, ("web", "shop"): 2}
    text = node.get("/metrics")[1]
    assert "process_resident_memory_bytes" in text and "python_info" in text
    assert a.proc.poll() is None


def test_a_pod_behind_a_port_named_grpc_gets_grpc_spans_and_rpc_metrics(
    node: Node, kube: KubeServer, jaeger: GrpcReceiver, agent: AgentFactory
) -> None:
    greeter = node.pod("greeter")
    kube.add_pod(make_pod("greeter", node=NODE, ip=greeter.ipv4, labels={"app": "greeter"},
                          ports=[("grpc", GRPC_PORT)], container="greeter"))
    a = agent()
    wait_traced(node, "greeter")
    a.wait_log(f"tracing pod default/greeter on {greeter.host_ifname}: ports {GRPC_PORT}/grpc")
    node.topo.run(node.pod("client").netns, [
        sys.executable, "-m", "clovisor.demo_grpc", "client",
        "--target", f"{greeter.ipv4}:{GRPC_PORT}", "--count", "3", "unary"], timeout=30)
    found = wait_spans(jaeger, of_pod("greeter"), n=3)
    assert len(found) == 3
    for s in found:
        assert s.name == "demo.Echo/Unary" and s.resource["service.name"] == "greeter"
        assert (s.attrs["rpc.system"], s.attrs["rpc.service"], s.attrs["rpc.method"]) == (
            "grpc", "demo.Echo", "Unary")
        assert s.attrs["rpc.grpc.status_code"] == 0 and s.attrs["server.port"] == GRPC_PORT

    def calls() -> float:
        for fam in text_string_to_metric_families(node.get("/metrics")[1]):
            for sample in fam.samples:
                if (sample.name == "rpc_server_call_duration_seconds_count"
                        and sample.labels["rpc_method"] == "demo.Echo/Unary"):  # fmt: skip
                    assert sample.labels["service_name"] == "greeter"
                    assert sample.labels["rpc_response_status_code"] == "OK"
                    return sample.value
        return 0.0

    wait_until(lambda: calls() == 3, "the RPC histogram counts the three calls")
    assert a.stop() == 0
