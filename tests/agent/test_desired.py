"""The agent's pure selection rules (the original's contract)."""

from __future__ import annotations

import ipaddress

from clovisor.agent.desired import compute, port_protocol, selected
from clovisor.agent.model import (
    AgentConfig,
    ContainerPort,
    EgressRule,
    LabelRule,
    PodInfo,
    ServiceInfo,
    ServicePort,
)

NODE = "node-1"


def pod(name: str, ns: str = "default", *, labels: dict[str, str] | None = None,
        ports: tuple[tuple[str, int, str], ...] = (("web", 8080, "http"),), **kw: object
        ) -> PodInfo:
    base: dict[str, object] = dict(
        namespace=ns, name=name, uid=f"uid-{name}", node_name=NODE, ip="10.200.0.10",
        phase="Running", labels=tuple((labels or {"app": "web"}).items()),
        container_ports=tuple(ContainerPort(container=c, port=p, name=n) for c, p, n in ports),
    )
    base.update(kw)
    return PodInfo(**base)  # type: ignore[arg-type]


def svc(name: str = "web", ns: str = "default", *, selector: dict[str, str] | None = None,
        ports: tuple[ServicePort, ...] = (ServicePort(name="http", port=80, target_port=8080),)
        ) -> ServiceInfo:
    sel = tuple((selector or {"app": "web"}).items())
    return ServiceInfo(namespace=ns, name=name, selector=sel, ports=ports)


def test_default_monitors_namespace_default() -> None:
    d = compute([pod("a"), pod("b", ns="other")], [svc(), svc(ns="other")], AgentConfig(), NODE)
    assert list(d.targets) == ["default/a"]
    t = d.targets["default/a"]
    assert [(p.port, p.protocol) for p in t.ports] == [(8080, "http")]
    assert t.service_name == "web"
    assert dict(t.resource) == {"service.namespace": "default",
                                "k8s.namespace.name": "default", "k8s.pod.name": "a",
                                "k8s.node.name": NODE, "k8s.pod.uid": "uid-a",
                                "k8s.container.name": "web"}


def test_label_rules_are_ored_and_naming_a_namespace_drops_default() -> None:
    rules = (LabelRule(namespace="shop", key="tier", value="front"), LabelRule(namespace="ops"))
    pods = [pod("a"), pod("b", ns="shop", labels={"app": "web", "tier": "front"}),
            pod("c", ns="shop", labels={"app": "web", "tier": "back"}), pod("d", ns="ops")]
    svcs = [svc(), svc(ns="shop"), svc(ns="ops")]
    d = compute(pods, svcs, AgentConfig(labels=rules), NODE)
    assert sorted(d.targets) == ["ops/d", "shop/b"]
    assert selected(pods[1], rules) and not selected(pods[2], rules)


def test_protocol_from_port_name_and_app_protocol() -> None:
    assert port_protocol(ServicePort(name="http", port=1, target_port=1)) == "http"
    assert port_protocol(ServicePort(name="http-web", port=1, target_port=1)) == "http"
    assert port_protocol(ServicePort(name="tcp-db", port=1, target_port=1)) == "tcp"
    assert port_protocol(ServicePort(name="grpc", port=1, target_port=1)) == "grpc"
    assert port_protocol(ServicePort(name="grpc-api", port=1, target_port=1)) == "grpc"
    assert port_protocol(ServicePort(name="grpc-web", port=1, target_port=1)) == "http"
    assert port_protocol(ServicePort(name="http2", port=1, target_port=1)) == "http2"
    assert port_protocol(ServicePort(name="http2-x", port=1, target_port=1)) == "http2"
    assert port_protocol(ServicePort(name="h2c", port=1, target_port=1)) == "http2"
    assert port_protocol(ServicePort(name="h2c-x", port=1, target_port=1)) == "http2"
    assert port_protocol(ServicePort(name="grpcx", port=1, target_port=1)) is None
    for app, want in (("grpc", "grpc"), ("http2", "http2"), ("kubernetes.io/h2c", "http2"),
                      ("kubernetes.io/ws", None)):
        sp = ServicePort(name="tcp", port=1, target_port=1, app_protocol=app)
        assert port_protocol(sp) == want, app
    web = ServicePort(name="web", port=1, target_port=1, app_protocol="http")
    assert port_protocol(web) == "http"
    assert port_protocol(ServicePort(name="grpc", port=1, target_port=1,
                                     app_protocol="kubernetes.io/h2c")) == "http2"
    assert port_protocol(ServicePort(name="http", port=1, target_port=1, protocol="UDP")) is None
    assert port_protocol(ServicePort(name="redis", port=1, target_port=1),
                         frozenset({"http", "tcp", "redis"})) == "redis"


def test_named_and_numbered_target_ports_must_match_container_ports() -> None:
    ports = (ServicePort(name="http", port=80, target_port="web"),
             ServicePort(name="http-admin", port=81, target_port=9000),
             ServicePort(name="http-missing", port=82, target_port=7777))
    p = pod("a", ports=(("app", 8080, "web"), ("sidecar", 9000, "")))
    d = compute([p], [svc(ports=ports)], AgentConfig(), NODE)
    assert [(tp.port, tp.protocol) for tp in d.targets["default/a"].ports] == [(8080, "http"),
                                                                               (9000, "http")]


def test_only_running_pods_of_this_node_with_an_ip() -> None:
    pods = [pod("a", node_name="node-2"), pod("b", phase="Pending"), pod("c", ip=""),
            pod("d", deleting=True), pod("e")]
    assert list(compute(pods, [svc()], AgentConfig(), NODE).targets) == ["default/e"]


def test_kubernetes_service_and_host_network_pods_are_skipped() -> None:
    k8s = svc("kubernetes", selector={"app": "web"})
    d = compute([pod("a", host_network=True), pod("b")], [k8s], AgentConfig(), NODE)
    assert d.targets == {}
    assert d.skipped == (("default/a", "hostNetwork pod: it has no veth of its own"),)


def test_egress_rules_apply_by_pod_prefix_even_without_a_service() -> None:
    rules = (EgressRule(addr=None, port=443),
             EgressRule(addr=ipaddress.ip_address("10.200.9.9"), port=80, pod_prefix="cart"))
    d = compute([pod("cart-1", labels={"app": "cart"}), pod("web-1")], [],
                AgentConfig(egress=rules), NODE)
    assert [r.port for r in d.targets["default/cart-1"].egress] == [443, 80]
    assert [r.port for r in d.targets["default/web-1"].egress] == [443]
    assert d.targets["default/cart-1"].service_name == "cart"
