"""Plain data the agent's edges produce and its pure core consumes.

The Kubernetes watcher turns API objects into :class:`PodInfo` and
:class:`ServiceInfo`; the Redis source turns its keys into
:class:`AgentConfig`; :mod:`clovisor.agent.desired` computes the
:class:`Target` set from them; the reconciler makes the kernel match it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerPort:
    container: str
    port: int
    name: str = ""  # the port's name, for named service targetPorts
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True, kw_only=True)
class PodInfo:
    namespace: str
    name: str
    uid: str = ""
    node_name: str = ""
    ip: str = ""  # status.podIP ("" until assigned)
    ips: tuple[str, ...] = ()  # status.podIPs (dual stack)
    phase: str = ""  # Pending, Running, ...
    host_network: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    container_ports: tuple[ContainerPort, ...] = ()
    deleting: bool = False  # metadata.deletionTimestamp is set

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    port: int
    target_port: int | str  # a number or a container port name
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceInfo:
    namespace: str
    name: str
    selector: tuple[tuple[str, str], ...] = ()  # empty: selects nothing
    ports: tuple[ServicePort, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelRule:
    """One ``clovisor_labels`` entry: ``<namespace>[:<label-key>:<label-value>]``."""

    namespace: str
    key: str = ""  # empty: the whole namespace
    value: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressRule:
    """One ``clovisor_egress_match`` entry: ``<IP>:<port>[:<pod name prefix>]``."""

    addr: IPAddress | None  # None: any address
    port: int
    pod_prefix: str = ""  # empty: every monitored pod


@dataclass(frozen=True, slots=True, kw_only=True)
class JaegerEndpoint:
    host: str = "jaeger-collector.clovisor"
    port: int = 4317  # OTLP gRPC

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


DEFAULT_LABELS = (LabelRule(namespace="default"),)
DEFAULT_REDIS = "redis.clovisor:6379"  # where the agents find their configuration


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """What Redis says (or the defaults, while Redis says nothing)."""

    labels: tuple[LabelRule, ...] = DEFAULT_LABELS
    egress: tuple[EgressRule, ...] = ()
    jaeger: JaegerEndpoint | None = None  # clovisor_jaeger_server; None: Redis names none
    proto_cfg: tuple[tuple[str, str], ...] = ()  # protocol name -> parser reference


@dataclass(frozen=True, slots=True, kw_only=True)
class TracedPort:
    port: int
    protocol: str  # "http", "tcp", or a plugin's protocol name


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One pod to trace on this node: what the reconciler makes true."""

    pod_key: str  # namespace/name
    pod_ip: str
    pod_ips: tuple[str, ...]
    ports: tuple[TracedPort, ...]
    egress: tuple[EgressRule, ...]
    service_name: str
    resource: tuple[tuple[str, str], ...]  # k8s.* resource attributes
