"""Host-side veth of a pod from its IP: routed (ptp/Calico) and bridged (flannel) CNIs.

The kernel tests build their nodes out of network namespaces and run the
lookup with the calling thread inside the node namespace, as the agent runs
with hostNetwork.  Only 10.200.0.0/16 and fd00:200::/64 are used, and only
between namespaces these tests create; sockets, not processes, carry the
traffic, so there is nothing to stop but the namespaces to delete.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import pytest

from clovisor.agent import ifaces
from clovisor.agent.ifaces import HostLink, IfaceError, host_interface, host_link
from clovisor.topology import Topology, in_netns, remove_stale

# --- unit tests: recorded iproute2 answers, no kernel ------------------------------------


class FakeIp:
    """Answers iproute2 commands from a table keyed by the argv tail; records the calls."""

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, argv: Sequence[str]) -> tuple[int, str, str]:
        key = " ".join(argv)
        self.calls.append(key)
        for suffix, answer in self.answers.items():
            if key.endswith(suffix):
                if isinstance(answer, str):
                    return 0, answer, ""
                if isinstance(answer, int):
                    return answer, "", "RTNETLINK answers: Network is unreachable"
                return 0, json.dumps(answer), ""
        return 1, "", f"unexpected: {key}"


def _link(name: str, ifindex: int, kind: str | None) -> list[dict[str, object]]:
    link: dict[str, object] = {"ifindex": ifindex, "ifname": name}
    if kind is not None:
        link["linkinfo"] = {"info_kind": kind}
    return [link]


def test_routed_veth() -> None:
    fake = FakeIp({
        "route get 10.1.2.3": [{"dst": "10.1.2.3", "dev": "cali12ab", "flags": []}],
        "link show dev cali12ab": _link("cali12ab", 17, "veth"),
    })
    assert host_link("10.1.2.3", runner=fake) == HostLink("cali12ab", 17)
    assert host_interface("10.1.2.3", runner=fake) == "cali12ab"
    assert "ip -j -4 route get 10.1.2.3" in fake.calls


def test_ipv6_is_normalised_and_asked_as_ipv6() -> None:
    fake = FakeIp({
        "-6 route get fd00::5": [{"dst": "fd00::5", "dev": "lxc1"}],
        "link show dev lxc1": _link("lxc1", 9, "veth"),
    })
    assert host_link("FD00:0::5", runner=fake) == HostLink("lxc1", 9)


@pytest.mark.parametrize("route", [
    [{"dst": "10.1.9.9", "gateway": "192.168.1.7", "dev": "eth0"}],  # another node's pod
    [{"dst": "10.1.9.9", "gateway": "10.1.9.0", "dev": "flannel.1", "flags": ["onlink"]}],
    [{"type": "local", "dst": "10.1.9.9", "dev": "lo"}],  # the node itself: hostNetwork pod
    [{"type": "blackhole", "dst": "10.1.9.9"}],
    [],
])
def test_not_local_routes(route: list[dict[str, object]]) -> None:
    fake = FakeIp({"route get 10.1.9.9": route, "link show dev eth0": _link("eth0", 2, None)})
    assert host_link("10.1.9.9", runner=fake) is None
    assert not any("link show" in c for c in fake.calls)  # decided from the route alone


def test_unreachable_is_none_not_an_error() -> None:
    assert host_link("10.1.9.9", runner=FakeIp({"route get 10.1.9.9": 2})) is None


@pytest.mark.parametrize("kind", [None, "vxlan", "ipip", "dummy", "openvswitch"])
def test_non_veth_device_is_none(kind: str | None) -> None:
    # e.g. Cilium's cilium_host, a tunnel, the uplink: never attach there by guess.
    fake = FakeIp({"route get 10.1.9.9": [{"dst": "10.1.9.9", "dev": "dev0"}],
                   "link show dev dev0": _link("dev0", 4, kind)})
    assert host_link("10.1.9.9", runner=fake) is None


def _bridge_fake(neigh: list[dict[str, object]], fdb_port_kind: str) -> FakeIp:
    return FakeIp({
        "route get 10.1.0.5": [{"dst": "10.1.0.5", "dev": "cni0", "prefsrc": "10.1.0.1"}],
        "link show dev cni0": _link("cni0", 3, "bridge"),
        "neigh show to 10.1.0.5 dev cni0": neigh,
        "fdb show br cni0": [
            {"mac": "aa:bb:cc:00:00:05", "ifname": "cni0", "flags": ["self"],
             "state": "permanent"},
            {"mac": "aa:bb:cc:00:00:05", "ifname": "port5", "flags": [], "master": "cni0",
             "state": ""},
        ],
        "link show dev port5": _link("port5", 8, fdb_port_kind),
    })


def test_bridge_neighbour_and_fdb() -> None:
    fake = _bridge_fake([{"dst": "10.1.0.5", "lladdr": "AA:BB:CC:00:00:05",
                          "state": ["STALE"]}], "veth")
    assert host_link("10.1.0.5", runner=fake) == HostLink("port5", 8)
    assert not any(" use" in c for c in fake.calls)  # known neighbour: no probe


def test_bridge_port_that_is_not_a_veth_is_none() -> None:
    # The MAC sits behind a vxlan port: a pod on another host.
    fake = _bridge_fake([{"dst": "10.1.0.5", "lladdr": "aa:bb:cc:00:00:05",
                          "state": ["REACHABLE"]}], "vxlan")
    assert host_link("10.1.0.5", resolve=False, runner=fake) is None


def test_bridge_unresolved_without_probe_is_none() -> None:
    fake = _bridge_fake([{"dst": "10.1.0.5", "state": ["FAILED"]}], "veth")
    assert host_link("10.1.0.5", resolve=False, runner=fake) is None
    assert not any(" use" in c for c in fake.calls)


def test_bridge_probe_then_give_up_after_timeout() -> None:
    fake = _bridge_fake([{"dst": "10.1.0.5", "state": ["INCOMPLETE"]}], "veth")
    t0 = time.monotonic()
    assert host_link("10.1.0.5", timeout=0.1, runner=fake) is None
    assert 0.1 <= time.monotonic() - t0 < 2
    assert "ip -4 neigh replace 10.1.0.5 dev cni0 use" in fake.calls


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "224.0.0.1", "0.0.0.0", "fe80::1"])
def test_addresses_no_pod_has(ip: str) -> None:
    fake = FakeIp({})
    assert host_link(ip, runner=fake) is None
    assert fake.calls == []


def test_garbage_ip_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        host_link("10.1.2", runner=FakeIp({}))


def test_iproute2_failures_raise() -> None:
    with pytest.raises(IfaceError, match="not JSON"):
        host_link("10.1.2.3", runner=FakeIp({"route get 10.1.2.3": "Error: garbage"}))
    with pytest.raises(IfaceError, match="unexpected JSON"):
        host_link("10.1.2.3", runner=FakeIp({"route get 10.1.2.3": {"dev": "x"}}))
    with pytest.raises(IfaceError, match="not found"):
        ifaces._run(["/nonexistent/clovisor-ip", "-j", "route"])


# --- the cache the reconciler asks -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Lookups:
    """A host_link stand-in: answers from a table, counts the calls."""

    def __init__(self, table: dict[str, HostLink | Exception | None]) -> None:
        self.table = table
        self.calls: list[str] = []

    def __call__(self, ip: str) -> HostLink | None:
        self.calls.append(ip)
        answer = self.table.get(ip)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_cache_rechecks_a_found_veth_by_ifindex_only() -> None:
    lookups = Lookups({"10.200.0.10": HostLink("cali1", 7)})
    index = {"cali1": 7}

    def index_of(name: str) -> int:
        if name not in index:
            raise OSError(19, "No such device")
        return index[name]

    cache = ifaces.InterfaceCache(lookups, index_of=index_of, clock=Clock())
    assert cache("10.200.0.10") == HostLink("cali1", 7)
    assert cache("10.200.0.10") == HostLink("cali1", 7)
    assert lookups.calls == ["10.200.0.10"]  # the second answer forked nothing
    index["cali1"] = 9  # the sandbox was recreated behind a veth of the same name
    lookups.table["10.200.0.10"] = HostLink("cali1", 9)
    assert cache("10.200.0.10") == HostLink("cali1", 9)
    del index["cali1"]  # the veth is gone
    lookups.table["10.200.0.10"] = None
    assert cache("10.200.0.10") is None
    assert len(lookups.calls) == 3


def test_cache_retries_misses_with_backoff_and_forgets_pods_no_longer_wanted() -> None:
    clock = Clock()
    lookups = Lookups({})
    cache = ifaces.InterfaceCache(lookups, index_of=lambda _n: 1, clock=clock,
                                  retry_initial=0.2, retry_max=1.0)
    assert cache("10.200.0.11") is None
    assert cache.next_retry() == pytest.approx(100.2)
    assert cache("10.200.0.11") is None and len(lookups.calls) == 1  # not due yet
    delays = []
    for _ in range(5):
        due = cache.next_retry()
        assert due is not None
        delays.append(round(due - clock.now, 3))
        clock.now = due
        assert cache("10.200.0.11") is None
    assert delays == [0.2, 0.4, 0.8, 1.0, 1.0]
    lookups.table["10.200.0.11"] = HostLink("veth1", 3)
    clock.now += 1.0
    assert cache("10.200.0.11") == HostLink("veth1", 3)
    assert cache.next_retry() is None
    cache.retain([])
    assert cache("10.200.0.11") == HostLink("veth1", 3) and len(lookups.calls) == 8


def test_cache_logs_iproute2_failures_once_and_treats_them_as_misses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    lookups = Lookups({"10.200.0.12": IfaceError("ip not found: install iproute2"),
                       "10.200.0.13": IfaceError("ip not found: install iproute2")})
    cache = ifaces.InterfaceCache(lookups, clock=clock)
    with caplog.at_level("WARNING", logger="clovisor.agent.ifaces"):
        assert cache("10.200.0.12") is None
        assert cache("10.200.0.13") is None
    assert [r.getMessage() for r in caplog.records] == [
        "cannot look up the interface of pod IP 10.200.0.12: ip not found: install iproute2"
    ]


# --- kernel tests: routed (ptp) topology -----------------------------------------------


@pytest.mark.kernel
def test_ptp_host_routes_ipv4_and_ipv6(topology: Topology) -> None:
    with in_netns(topology.node_ns):
        for pod in topology.pods.values():
            expected = HostLink(pod.host_ifname, pod.host_ifindex)
            assert host_link(pod.ipv4) == expected
            assert host_link(pod.ipv6) == expected
            assert host_interface(pod.ipv4) == pod.host_ifname
        assert host_link("10.200.0.250") is None  # no route at all
        assert host_link("fd00:200::fa") is None
        assert host_link(topology.gateway4) is None  # the node's own address


@pytest.mark.kernel
def test_ptp_gateway_and_non_veth_routes_are_none(topology: Topology) -> None:
    node = topology.node_ns
    server = topology.pods["server"]

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", node, *args], check=True, capture_output=True)

    # A pod "behind" another host, and a pod subnet on a tunnel (flannel.1-like).
    ip("route", "add", "10.200.7.5/32", "via", server.ipv4, "dev", server.host_ifname)
    ip("link", "add", "clvvx", "type", "vxlan", "id", "42", "dstport", "4789")
    ip("link", "set", "clvvx", "up")
    ip("route", "add", "10.200.8.0/24", "dev", "clvvx")
    with in_netns(node):
        assert host_link("10.200.7.5") is None
        assert host_link("10.200.8.5") is None
        assert host_link(server.ipv4) == HostLink(server.host_ifname, server.host_ifindex)


# --- kernel tests: bridge topology ------------------------------------------------------

_bseq = itertools.count()
_BRIDGE_PREFIX = "clvib"


@dataclass
class BridgePod:
    netns: str
    ip: str
    host_ifname: str
    host_ifindex: int = 0


@dataclass
class BridgeNode:
    """A node namespace with bridge ``br0`` (flannel's cni0 in miniature) and pods on it.

    Pod n is ``10.200.5.(10+n)/24`` or ``fd00:200::5:(10+n)/112``; its host
    veth ``hv<n>`` is enslaved to the bridge, which holds ``.1``.  IPv6 is off
    in an IPv4 node, so no autoconfiguration traffic (router solicitations,
    MLD) teaches the bridge anything before the test does.
    """

    family: int
    npods: int = 2
    instance: str = field(default="")
    pods: list[BridgePod] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.instance = f"{_BRIDGE_PREFIX}-{os.getpid()}-{next(_bseq)}"

    @property
    def node_ns(self) -> str:
        return f"{self.instance}-node"

    def addr(self, host: int) -> str:
        return f"10.200.5.{host}" if self.family == 4 else f"fd00:200::5:{host:x}"

    @property
    def plen(self) -> int:
        return 24 if self.family == 4 else 112

    def _ip(self, ns: str, *args: str) -> str:
        proc = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ip -n {ns} {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def _add_ns(self, ns: str) -> None:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        self._created.append(ns)
        # Before any interface exists, so every interface inherits the defaults.
        with in_netns(ns):
            if self.family == 4:
                _sysctl("net.ipv6.conf.default.disable_ipv6", "1")
                _sysctl("net.ipv6.conf.all.disable_ipv6", "1")
            else:
                _sysctl("net.ipv6.conf.default.accept_dad", "0")
                _sysctl("net.ipv6.conf.all.accept_dad", "0")

    def __enter__(self) -> BridgeNode:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _create(self) -> None:
        remove_stale(_BRIDGE_PREFIX)
        node = self.node_ns
        self._add_ns(node)
        fam = f"-{self.family}"
        self._ip(node, "link", "set", "lo", "up")
        self._ip(node, "link", "add", "br0", "type", "bridge")
        self._ip(node, fam, "addr", "add", f"{self.addr(1)}/{self.plen}", "dev", "br0")
        self._ip(node, "link", "set", "br0", "up")
        for n in range(self.npods):
            pns = f"{self.instance}-p{n}"
            self._add_ns(pns)
            host_if = f"hv{n}"
            self._ip(node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                     "netns", pns)
            self._ip(node, "link", "set", host_if, "master", "br0")
            self._ip(node, "link", "set", host_if, "up")
            self._ip(pns, "link", "set", "lo", "up")
            self._ip(pns, "link", "set", "eth0", "up")
            ip = self.addr(10 + n)
            self._ip(pns, fam, "addr", "add", f"{ip}/{self.plen}", "dev", "eth0")
            link = json.loads(self._ip(node, "-j", "link", "show", "dev", host_if))[0]
            self.pods.append(BridgePod(pns, ip, host_if, int(link["ifindex"])))

    def neighbours(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = json.loads(
            self._ip(self.node_ns, "-j", f"-{self.family}", "neigh", "show", "dev", "br0"))
        return [e for e in out if "lladdr" in e]

    def close(self) -> None:
        errors = []
        for ns in reversed(self._created):
            proc = subprocess.run(["ip", "netns", "delete", ns], capture_output=True, text=True)
            if proc.returncode != 0 and os.path.exists(f"/run/netns/{ns}"):
                errors.append(f"{ns}: {proc.stderr.strip()}")
        self._created.clear()
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))


def _sysctl(key: str, value: str) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


def _tcp_exchange(server_ns: str, client_ns: str, addr: str) -> None:
    """One TCP round trip from ``client_ns`` to ``addr`` served in ``server_ns``."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with in_netns(server_ns):
        srv = socket.socket(family, socket.SOCK_STREAM)
    with in_netns(client_ns):
        cli = socket.socket(family, socket.SOCK_STREAM)
    with contextlib.ExitStack() as stack:
        stack.callback(srv.close)
        stack.callback(cli.close)
        srv.bind((addr, 0))
        srv.listen(1)
        srv.settimeout(5)
        port = srv.getsockname()[1]

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                with conn:
                    conn.sendall(conn.recv(16))

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        cli.settimeout(5)
        cli.connect((addr, port))
        cli.sendall(b"ping")
        assert cli.recv(16) == b"ping"
        t.join(5)


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def bridge_node(request: pytest.FixtureRequest, kernel: object) -> Iterator[BridgeNode]:
    with BridgeNode(family=request.param) as node:
        yield node


@pytest.mark.kernel
def test_bridge_after_traffic(bridge_node: BridgeNode) -> None:
    a, b = bridge_node.pods
    # Pod to pod teaches the bridge FDB both MACs; node to pod a teaches the
    # node's neighbour table a's MAC (kubelet probes do this on a real node).
    _tcp_exchange(a.netns, b.netns, a.ip)
    _tcp_exchange(a.netns, bridge_node.node_ns, a.ip)
    with in_netns(bridge_node.node_ns):
        assert host_link(a.ip, resolve=False) == HostLink(a.host_ifname, a.host_ifindex)
        # b never talked to the node: no neighbour entry, so no answer without a probe.
        assert host_link(b.ip, resolve=False) is None
        assert host_link(b.ip) == HostLink(b.host_ifname, b.host_ifindex)
        assert host_interface(a.ip) == a.host_ifname


@pytest.mark.kernel
def test_bridge_probe_resolves_a_silent_pod(bridge_node: BridgeNode) -> None:
    a, b = bridge_node.pods
    assert bridge_node.neighbours() == []
    with in_netns(bridge_node.node_ns):
        assert host_link(b.ip, resolve=False) is None
        assert host_link(b.ip) == HostLink(b.host_ifname, b.host_ifindex)
        assert host_link(a.ip) == HostLink(a.host_ifname, a.host_ifindex)


@pytest.mark.kernel
def test_bridge_unknown_ip_is_none(bridge_node: BridgeNode) -> None:
    with in_netns(bridge_node.node_ns):
        # In the bridge's subnet but held by nobody: the probe goes unanswered.
        assert host_link(bridge_node.addr(99), timeout=0.3) is None
        assert host_link(bridge_node.addr(1)) is None  # the bridge's own address
        other = "10.200.6.1" if bridge_node.family == 4 else "fd00:200::6:1"
        assert host_link(other) is None  # no route


@pytest.mark.kernel
def test_bridge_namespaces_are_removed() -> None:
    with BridgeNode(family=4) as node:
        names = [node.node_ns, *(p.netns for p in node.pods)]
        assert all(os.path.exists(f"/run/netns/{n}") for n in names)
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)
