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
from .model import Target

log = logging.getLogger(__name__)

Resolver = Callable[[str], str | None]  # pod IP -> host-side interface name, or None


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


def interface_target(ifname: str, target: Target) -> InterfaceTarget:
    """The tracer's view of one pod: its interface, ports, rules and resource."""
    ports = []
    for p in target.ports:
        proto = PROTOCOLS.get(p.protocol)
        if proto is None:
            log.warning("pod %s port %d: protocol %r has no kernel id yet; skipped",
                        target.pod_key, p.port, p.protocol)
            continue
        ports.append(PortSpec(port=p.port, protocol=proto))
    egress = tuple(EgressSpec(addr=r.addr, port=r.port) for r in target.egress)
    resource = Resource.create({"service.name": target.service_name, **dict(target.resource)})
    return InterfaceTarget(ifname=ifname, ports=tuple(ports), egress=egress, resource=resource)


class Reconciler:
    def __init__(self, tracer: Tracer, resolve: Resolver) -> None:
        self._tracer = tracer
        self._resolve = resolve
        self._applied: dict[str, InterfaceTarget] = {}  # by interface name
        self._owner: dict[str, str] = {}  # interface -> pod key

    @property
    def applied(self) -> Mapping[str, InterfaceTarget]:
        return dict(self._applied)

    def owner(self, ifname: str) -> str | None:
        return self._owner.get(ifname)

    def apply(self, targets: Mapping[str, Target]) -> ReconcileResult:
        want: dict[str, InterfaceTarget] = {}
        owner: dict[str, str] = {}
        unresolved: list[str] = []
        for key, target in sorted(targets.items()):
            ifname = self._resolve(target.pod_ip)
            if ifname is None:
                unresolved.append(key)
                continue
            want[ifname] = interface_target(ifname, target)
            owner[ifname] = key
        attached: list[str] = []
        updated: list[str] = []
        detached: list[str] = []
        failed: list[str] = []
        for ifname in sorted(set(self._applied) - set(want)):
            self._tracer.remove_interface(ifname)
            del self._applied[ifname]
            self._owner.pop(ifname, None)
            detached.append(ifname)
        for ifname, it in want.items():
            if self._applied.get(ifname) == it:
                continue
            try:
                self._tracer.set_interface(it)
            except (KernelError, SpecError) as exc:
                # The interface vanished or the kernel refused: try again next round.
                log.warning("pod %s on %s: %s", owner[ifname], ifname, exc)
                failed.append(ifname)
                continue
            (updated if ifname in self._applied else attached).append(ifname)
            self._applied[ifname] = it
            self._owner[ifname] = owner[ifname]
        return ReconcileResult(
            attached=tuple(attached),
            updated=tuple(updated),
            detached=tuple(detached),
            unresolved=tuple(unresolved),
            failed=tuple(failed),
        )
