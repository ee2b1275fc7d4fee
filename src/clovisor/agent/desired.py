"""The agent's pure core: pods + services + Redis config -> what to trace here.

No I/O: the watcher and the Redis source feed it snapshots, the reconciler
applies its answer. The rules are the original Clovisor's (see
``shared/ORIGINAL.md``): pods of the namespaces/labels in
``clovisor_labels``, protocol per port from the service port name (Istio
style) or ``appProtocol``, only pods on this node that are Running with an
IP and whose container ports match the service's target ports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .model import (
    AgentConfig,
    ContainerPort,
    EgressRule,
    LabelRule,
    PodInfo,
    ServiceInfo,
    ServicePort,
    Target,
    TracedPort,
)

BUILTIN_PROTOCOLS = frozenset({"http", "tcp", "http2", "grpc"})

# appProtocol values (Kubernetes standard and IANA names) and the protocol they mean.
_APP_PROTOCOLS = {
    "http": "http",
    "kubernetes.io/http": "http",
    "http/1.1": "http",
    "http/1.0": "http",
    "http2": "http2",
    "kubernetes.io/h2c": "http2",
    "h2c": "http2",
    "grpc": "grpc",
}
# Istio port-name prefixes that are another name for a protocol.
_NAME_ALIASES = {"h2c": "http2"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Desired:
    targets: dict[str, Target]  # by pod key (namespace/name)
    skipped: tuple[tuple[str, str], ...]  # (pod key, why) worth a log line


def port_protocol(port: ServicePort, known: frozenset[str] = BUILTIN_PROTOCOLS) -> str | None:
    """The protocol a service port carries, or None if Clovisor does not parse it.

    ``appProtocol`` wins when set; otherwise the Istio naming convention:
    ``<protocol>`` or ``<protocol>-<suffix>`` (``http``, ``http-web``,
    ``grpc``, ``grpc-api``, ``http2``, ``h2c``; ``grpc-web`` is ``http``).
    """
    if port.protocol.upper() != "TCP":
        return None
    app = port.app_protocol.lower()
    if app:
        proto = _APP_PROTOCOLS.get(app, app)
        return proto if proto in known else None
    name = port.name.lower()
    if name == "grpc-web" or name.startswith("grpc-web-"):
        # gRPC-Web is HTTP/1.1 (or HTTP/2) with its own framing, not gRPC: an
        # http port, which follows the HTTP/2 preface when it comes.
        return "http" if "http" in known else None
    prefix = name.split("-", 1)[0]
    proto = _NAME_ALIASES.get(prefix, prefix)
    return proto if proto in known else None


def selected(pod: PodInfo, rules: Sequence[LabelRule]) -> bool:
    """Whether any ``clovisor_labels`` rule selects the pod (rules are OR-ed)."""
    labels = pod.label_map()
    for rule in rules:
        if rule.namespace != pod.namespace:
            continue
        if not rule.key or labels.get(rule.key) == rule.value:
            return True
    return False


def _matches_selector(pod: PodInfo, svc: ServiceInfo) -> bool:
    if not svc.selector or svc.namespace != pod.namespace:
        return False
    labels = pod.label_map()
    return all(labels.get(k) == v for k, v in svc.selector)


def _container_port(pod: PodInfo, target: int | str) -> ContainerPort | None:
    for cp in pod.container_ports:
        if cp.protocol.upper() != "TCP":
            continue
        if (isinstance(target, int) and cp.port == target) or (
            isinstance(target, str) and cp.name and cp.name == target
        ):
            return cp
    return None


def _egress_for(pod: PodInfo, rules: Iterable[EgressRule]) -> tuple[EgressRule, ...]:
    return tuple(r for r in rules if not r.pod_prefix or pod.name.startswith(r.pod_prefix))


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """What the Services selecting a pod say about it."""

    ports: tuple[TracedPort, ...]  # container ports behind an HTTP (or plugin) service port
    service_name: str  # the first such Service, by namespace and name ("" if none)
    containers: tuple[str, ...]  # the containers owning those ports


def served_ports(
    pod: PodInfo, services: Iterable[ServiceInfo], known: frozenset[str] = BUILTIN_PROTOCOLS
) -> Served:
    """The traced ports of ``pod`` from the Services that select it (the
    ``kubernetes`` Service skipped), in Service order."""
    ports: dict[int, TracedPort] = {}
    service_name = ""
    containers: list[str] = []
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        if (svc.namespace, svc.name) == ("default", "kubernetes"):
            continue
        if not _matches_selector(pod, svc):
            continue
        for sp in svc.ports:
            proto = port_protocol(sp, known)
            if proto is None:
                continue
            cp = _container_port(pod, sp.target_port)
            if cp is None:
                continue  # the pod does not expose what the service targets
            if cp.port not in ports:
                ports[cp.port] = TracedPort(port=cp.port, protocol=proto)
                service_name = service_name or svc.name
                if cp.container not in containers:
                    containers.append(cp.container)
    return Served(ports=tuple(ports.values()), service_name=service_name,
                  containers=tuple(containers))


def default_service_name(pod: PodInfo) -> str:
    """``service.name`` of a pod no Service names: its app label, else its name."""
    labels = pod.label_map()
    return labels.get("app.kubernetes.io/name") or labels.get("app") or pod.name


def pod_resource(
    pod: PodInfo, node_name: str, containers: Sequence[str] = ()
) -> tuple[tuple[str, str], ...]:
    """The ``service.namespace`` and ``k8s.*`` resource attributes of a pod's spans."""
    resource = [
        # The OTel convention for a Kubernetes service's namespace: two
        # Services "web" in two namespaces are two services.
        ("service.namespace", pod.namespace),
        ("k8s.namespace.name", pod.namespace),
        ("k8s.pod.name", pod.name),
        ("k8s.node.name", node_name),
    ]
    if pod.uid:
        resource.append(("k8s.pod.uid", pod.uid))
    if containers:
        resource.append(("k8s.container.name", containers[0]))
    return tuple(resource)


def compute(
    pods: Iterable[PodInfo],
    services: Iterable[ServiceInfo],
    config: AgentConfig,
    node_name: str,
    known_protocols: frozenset[str] = BUILTIN_PROTOCOLS,
) -> Desired:
    """The pods to trace on ``node_name`` and how."""
    svcs = sorted(services, key=lambda s: (s.namespace, s.name))
    targets: dict[str, Target] = {}
    skipped: list[tuple[str, str]] = []
    for pod in sorted(pods, key=lambda p: p.key):
        if pod.node_name != node_name or not selected(pod, config.labels):
            continue
        if pod.host_network:
            skipped.append((pod.key, "hostNetwork pod: it has no veth of its own"))
            continue
        if pod.phase != "Running" or not pod.ip or pod.deleting:
            continue
        served = served_ports(pod, svcs, known_protocols)
        egress = _egress_for(pod, config.egress)
        if not served.ports and not egress:
            continue
        ports = {p.port: p for p in served.ports}
        name = served.service_name or default_service_name(pod)
        resource = pod_resource(pod, node_name, served.containers)
        targets[pod.key] = Target(
            pod_key=pod.key,
            pod_ip=pod.ip,
            pod_ips=pod.ips or (pod.ip,),
            ports=tuple(sorted(ports.values(), key=lambda p: p.port)),
            egress=egress,
            service_name=name,
            resource=resource,
        )
    return Desired(targets=targets, skipped=tuple(skipped))
