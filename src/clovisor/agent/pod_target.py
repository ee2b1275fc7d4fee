"""``clovisor trace --pod NAMESPACE/NAME``: one pod of this node, found as the agent finds it.

The pod comes from the Kubernetes API (``get`` on the pod, ``list`` on its
namespace's Services: what the agent's ClusterRole already allows); its
traced ports from the Services that select it, unless ``--port`` says; its
host-side veth from the node's routes (:func:`~clovisor.agent.ifaces.host_link`);
its resource attributes from :func:`~clovisor.agent.desired.pod_resource`.
Whatever stops that (an unknown pod, a pod of another node, a hostNetwork
pod, a pod without an IP or a veth here) is a :class:`PodTargetError` with
one line saying so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from opentelemetry.sdk.resources import Resource

from ..pipeline import InterfaceTarget
from ..specs import EgressSpec, PortSpec
from .desired import default_service_name, pod_resource, served_ports
from .ifaces import HostLink, IfaceError, host_link
from .kube import ApiClient, describe_error, pod_info, service_info
from .model import PodInfo
from .reconcile import builtin_protocol_id

__all__ = ["PodTarget", "PodTargetError", "resolve_pod"]

REQUEST_TIMEOUT = 10.0


class PodTargetError(Exception):
    """The pod cannot be traced from here; the message is one line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PodTarget:
    pod: PodInfo
    link: HostLink
    target: InterfaceTarget

    def describe(self) -> str:
        ports = ", ".join(str(p.port) for p in self.target.ports) or "none"
        return f"pod {self.pod.key} on {self.link.name} (ports {ports})"


def _get(call: Callable[..., Any], what: str, **kwargs: Any) -> Any:
    try:
        resp = call(_preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()
    except ApiException as exc:
        if exc.status == 404:
            raise PodTargetError(f"{what} not found") from None
        raise PodTargetError(f"{what}: {describe_error(exc)}") from None
    except Exception as exc:
        raise PodTargetError(f"{what}: Kubernetes API: {describe_error(exc)}") from None


def resolve_pod(
    api: ApiClient,
    namespace: str,
    name: str,
    node: str,
    *,
    ports: Sequence[PortSpec] = (),
    egress: Sequence[EgressSpec] = (),
    service: str | None = None,
    extra: dict[str, str] | None = None,
    find_link: Callable[[str], HostLink | None] = host_link,
) -> PodTarget:
    """The interface target for pod ``namespace/name`` of node ``node``.

    ``ports`` replace the ports the pod's Services give; ``egress`` are
    traced as CLIENT sessions (a pod that no Service serves needs one or the
    other); ``service`` replaces
    ``service.name``; ``extra`` adds resource attributes.
    """
    key = f"{namespace}/{name}"
    core = k8s_client.CoreV1Api(api)
    pod = pod_info(_get(core.read_namespaced_pod, f"pod {key}", name=name, namespace=namespace))
    if pod.node_name != node:
        where = f"node {pod.node_name}" if pod.node_name else "no node yet (not scheduled)"
        raise PodTargetError(
            f"pod {key} runs on {where}, not on this node {node}: run clovisor trace there"
        )
    if pod.host_network:
        raise PodTargetError(
            f"pod {key} uses hostNetwork: it has no veth of its own "
            "(trace the node's interface with --iface)"
        )
    if pod.phase != "Running" or not pod.ip:
        raise PodTargetError(f"pod {key} is {pod.phase or 'not running'} and has no IP yet")
    listed = _get(core.list_namespaced_service, f"services of namespace {namespace}",
                  namespace=namespace)
    services = [service_info(s) for s in listed.get("items") or ()]
    served = served_ports(pod, services)
    if ports:
        port_specs = tuple(ports)
    else:
        port_specs = tuple(
            PortSpec(port=p.port, protocol=proto)
            for p in served.ports
            if (proto := builtin_protocol_id(p.protocol)) is not None
        )
        if not port_specs and not egress:
            raise PodTargetError(
                f"pod {key}: no Service selects it on an HTTP port (a port named http or "
                "http-*, or appProtocol http, targeting one of its container ports); "
                "give --port"
            )
    try:
        link = find_link(pod.ip)
    except (IfaceError, ValueError) as exc:
        raise PodTargetError(f"pod {key} ({pod.ip}): {exc}") from None
    if link is None:
        raise PodTargetError(
            f"pod {key} ({pod.ip}): no host-side veth routes to it in this network namespace "
            "(run in the node's network namespace; deploy/README.md, Which CNIs work)"
        )
    attributes = {
        "service.name": service or served.service_name or default_service_name(pod),
        **dict(pod_resource(pod, node, served.containers)),
        **(extra or {}),
    }
    target = InterfaceTarget(ifname=link.name, ports=port_specs, egress=tuple(egress),
                             resource=Resource.create(attributes))
    return PodTarget(pod=pod, link=link, target=target)
