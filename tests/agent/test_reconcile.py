"""The reconciler against the real tracer and kernel, in a namespace node.

Hooks are read back from the kernel (TCX links on the host-side veths); the
interface lookup is the real one (``ip route get`` in the node namespace).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest

from clovisor.agent.ifaces import HostLink, InterfaceCache
from clovisor.agent.model import EgressRule, Target, TracedPort
from clovisor.agent.plugins import ParserRegistry
from clovisor.agent.reconcile import Reconciler, ReconcileResult
from clovisor.core.events import Protocol
from clovisor.kernel.attach import list_hooks
from clovisor.pipeline import Tracer, TracerSettings
from clovisor.specs import PortSpec
from clovisor.topology import GATEWAY4, Pod, Topology, in_netns

pytestmark = pytest.mark.kernel


@pytest.fixture
def tracer(topology: Topology) -> Iterator[Tracer]:
    t = Tracer(TracerSettings(), [])
    t.start()
    try:
        yield t
    finally:
        with in_netns(topology.node_ns):
            t.stop()


def target(pod: Pod, *ports: tuple[int, str], uid: str = "uid-1") -> Target:
    return Target(
        pod_key=f"default/{pod.name}",
        pod_ip=pod.ipv4,
        pod_ips=(pod.ipv4, pod.ipv6),
        ports=tuple(TracedPort(port=p, protocol=proto) for p, proto in ports),
        egress=(EgressRule(addr=None, port=5432),),
        service_name=pod.name,
        resource=(("k8s.namespace.name", "default"), ("k8s.pod.name", pod.name),
                  ("k8s.pod.uid", uid)),
    )


def ours(topo: Topology, ifname: str) -> list[str]:
    with in_netns(topo.node_ns):
        return sorted(h.direction for h in list_hooks(ifname) if h.ours)


def apply(topo: Topology, rec: Reconciler, *targets: Target) -> ReconcileResult:
    with in_netns(topo.node_ns):  # the agent runs in the node's namespace
        return rec.apply({t.pod_key: t for t in targets})


def test_attach_update_detach_and_idempotence(topology: Topology, tracer: Tracer) -> None:
    server = topology.pods["server"]
    registry = ParserRegistry()
    rec = Reconciler(tracer, InterfaceCache(), registry.kernel_id)
    want = target(server, (8080, "http"))
    r = apply(topology, rec, want)
    assert r.attached == (server.host_ifname,) and not r.failed and not r.unresolved
    assert ours(topology, server.host_ifname) == ["egress", "ingress"]
    assert rec.owner(server.host_ifname) == "default/server"
    it = tracer.interfaces()[server.host_ifname]
    assert it.ports == (PortSpec(port=8080, protocol=Protocol.HTTP),)
    assert it.resource.attributes["service.name"] == "server"
    assert it.resource.attributes["k8s.pod.uid"] == "uid-1"

    assert not apply(topology, rec, want).changed  # the same state again: nothing to do

    # A plugin protocol gets its kernel id; the hooks stay as they are.
    r = apply(topology, rec, target(server, (8080, "http"), (6379, "lineproto")))
    assert r.updated == (server.host_ifname,)
    assert tracer.interfaces()[server.host_ifname].ports == (
        PortSpec(port=8080, protocol=Protocol.HTTP),
        PortSpec(port=6379, protocol=registry.kernel_id("lineproto") or 0),
    )
    assert ours(topology, server.host_ifname) == ["egress", "ingress"]

    r = apply(topology, rec)
    assert r.detached == (server.host_ifname,)
    assert ours(topology, server.host_ifname) == []
    assert tracer.interfaces() == {}


def test_unresolved_and_refused_targets_are_retried(topology: Topology, tracer: Tracer) -> None:
    server = topology.pods["server"]
    ghost = Pod(name="ghost", netns="", ipv4="10.200.0.250", ipv6="fd00:200::fa",
                host_ifname="", host_ifindex=0)
    r = apply(topology, Reconciler(tracer, InterfaceCache()), target(ghost, (8080, "http")))
    assert r.unresolved == ("default/ghost",) and not r.changed

    # The route names an interface that is gone by the time we attach.
    links = {server.ipv4: HostLink("clvgone0", 4242)}
    rec = Reconciler(tracer, links.get)
    r = apply(topology, rec, target(server, (8080, "http")))
    assert r.failed == ("clvgone0",) and not r.changed and tracer.interfaces() == {}
    links[server.ipv4] = HostLink(server.host_ifname, server.host_ifindex)
    r = apply(topology, rec, target(server, (8080, "http")))
    assert r.attached == (server.host_ifname,)


def _recreate_host_veth(topo: Topology, pod: Pod) -> int:
    """Delete the pod's veth pair and make it again under the same names (a new sandbox)."""
    node = topo.node_ns

    def ip(ns: str, *args: str) -> str:
        return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True,
                              text=True).stdout

    ip(node, "link", "del", pod.host_ifname)
    ip(node, "link", "add", pod.host_ifname, "type", "veth", "peer", "name", "eth0",
       "netns", pod.netns)
    ip(node, "link", "set", pod.host_ifname, "up")
    ip(node, "addr", "add", f"{GATEWAY4}/32", "dev", pod.host_ifname)
    ip(node, "route", "add", f"{pod.ipv4}/32", "dev", pod.host_ifname, "src", GATEWAY4)
    ip(pod.netns, "link", "set", "eth0", "up")
    ip(pod.netns, "addr", "add", f"{pod.ipv4}/32", "dev", "eth0")
    with in_netns(node):
        return socket.if_nametoindex(pod.host_ifname)


def test_a_veth_recreated_under_the_same_name_is_attached_again(
    topology: Topology, tracer: Tracer
) -> None:
    server = topology.pods["server"]
    rec = Reconciler(tracer, InterfaceCache())
    want = target(server, (8080, "http"))
    assert apply(topology, rec, want).attached == (server.host_ifname,)
    new_index = _recreate_host_veth(topology, server)
    assert new_index != server.host_ifindex
    assert ours(topology, server.host_ifname) == []  # the hooks died with the old veth
    r = apply(topology, rec, want)  # the same target: only the ifindex changed
    assert r.updated == (server.host_ifname,)
    assert ours(topology, server.host_ifname) == ["egress", "ingress"]
    assert [a.ifindex for a in tracer.attachments] == [new_index]
