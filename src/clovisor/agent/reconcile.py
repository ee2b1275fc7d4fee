"""Make the kernel match the desired state: attach, update maps, detach.

The reconciler is the only part of the agent that changes hooks. It is
idempotent: applying the same desired state twice changes nothing, and an
agent that restarts converges to the same hooks (the start-up cleanup has
removed whatever a crashed predecessor left).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource

from ..kernel.errors import KernelError
from ..pipeline import InterfaceTarget, Tracer
from ..specs import PROTOCOLS, EgressSpec, PortSpec, SpecError
from .ifaces import HostLink
from .model import Target

log = logging.getLogger(__name__)

Resolver = Callable[[str], HostLink | None]  # pod IP -> host-side interface, or None
ProtocolId = Callable[[str], int | None]  # protocol name -> kernel id, or None


def builtin_protocol_id(name: str) -> int | None:
    proto = PROTOCOLS.get(name)
    return None if proto is None else int(proto)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileResult:
    attached: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    detached: tuple[str, ...] = ()
    unresolved: tuple[str, ...] = ()  # pods whose interface was not found (retried)
    failed: tuple[str, ...] = ()  # interfaces the kernel refused (retried)

    @property
    def changed(self) -> bool:
        return bool(self.attached or self.updated or self.detached)


def interface_target(
    ifname: str, target: Target, protocol_id: ProtocolId = builtin_protocol_id
) -> InterfaceTarget:
    """The tracer's view of one pod: its interface, ports, rules and resource."""
    ports = []
    for p in target.ports:
        proto = protocol_id(p.protocol)
        if proto is None:
            log.warning("pod %s port %d: protocol %r has no kernel id; skipped",
                        target.pod_key, p.port, p.protocol)
            continue
        ports.append(PortSpec(port=p.port, protocol=proto))
    egress = tuple(EgressSpec(addr=r.addr, port=r.port) for r in target.egress)
    resource = Resource.create({"service.name": target.service_name, **dict(target.resource)})
    return InterfaceTarget(ifname=ifname, ports=tuple(ports), egress=egress, resource=resource)


class Reconciler:
    """Desired targets (by pod) -> the tracer's interfaces (by host veth).

    An interface is (re)applied when what to trace on it changed or when its
    ifindex did: a pod sandbox recreated behind a veth of the same name
    (Calico names veths after the pod) is a new interface whose hooks died
    with the old one.
    """

    def __init__(
        self, tracer: Tracer, resolve: Resolver, protocol_id: ProtocolId = builtin_protocol_id
    ) -> None:
        self._tracer = tracer
        self._resolve = resolve
        self._protocol_id = protocol_id
        self._applied: dict[str, tuple[InterfaceTarget, int]] = {}  # by interface name
        self._owner: dict[str, str] = {}  # interface -> pod key

    @property
    def applied(self) -> Mapping[str, InterfaceTarget]:
        return {name: it for name, (it, _) in self._applied.items()}

    def owner(self, ifname: str) -> str | None:
        return self._owner.get(ifname)

    def apply(self, targets: Mapping[str, Target]) -> ReconcileResult:
        want: dict[str, tuple[InterfaceTarget, int]] = {}
        owner: dict[str, str] = {}
        unresolved: list[str] = []
        for key, target in sorted(targets.items()):
            link = self._resolve(target.pod_ip)
            if link is None:
                unresolved.append(key)
                continue
            if link.name in owner:
                # Two pods behind one veth: a CNI we do not understand. Trace the first.
                log.warning("pods %s and %s both resolve to %s; tracing %s only",
                            owner[link.name], key, link.name, owner[link.name])
                continue
            want[link.name] = (interface_target(link.name, target, self._protocol_id),
                               link.ifindex)
            owner[link.name] = key
        attached: list[str] = []
        updated: list[str] = []
        detached: list[str] = []
        failed: list[str] = []
        for ifname in sorted(set(self._applied) - set(want)):
            self._tracer.remove_interface(ifname)
            del self._applied[ifname]
            self._owner.pop(ifname, None)
            detached.append(ifname)
        for ifname, wanted in want.items():
            old = self._applied.get(ifname)
            if old == wanted:
                continue
            try:
                # Tracer.set_interface re-attaches by itself when the ifindex changed.
                self._tracer.set_interface(wanted[0])
            except (KernelError, SpecError) as exc:
                # The interface vanished or the kernel refused: try again next round.
                log.warning("pod %s on %s: %s", owner[ifname], ifname, exc)
                failed.append(ifname)
                continue
            (updated if old is not None else attached).append(ifname)
            self._applied[ifname] = wanted
            self._owner[ifname] = owner[ifname]
        return ReconcileResult(
            attached=tuple(attached),
            updated=tuple(updated),
            detached=tuple(detached),
            unresolved=tuple(unresolved),
            failed=tuple(failed),
        )
