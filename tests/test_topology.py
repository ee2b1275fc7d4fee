"""The namespace topology: reachability across the node, addresses, and complete teardown."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from clovisor.topology import (
    GATEWAY4,
    NETNS_DIR,
    Topology,
    TopologyError,
    in_netns,
    remove_stale,
    wait_for_port,
)

ALLOWED = (
    ipaddress.ip_network("10.200.0.0/16"),
    ipaddress.ip_network("fd00:200::/64"),
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fe80::/10"),  # kernel-made link-local, never routed
)


def netns_names() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def rx_packets(topo: Topology, ifname: str) -> int:
    out = topo.run(topo.node_ns, ["ip", "-s", "-j", "link", "show", "dev", ifname]).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def test_rejects_bad_prefix_and_pods() -> None:
    with pytest.raises(ValueError):
        Topology(prefix="way-too-long-prefix")
    with pytest.raises(ValueError):
        Topology(pods=("a", "a"))
    with pytest.raises(ValueError):
        Topology(pods=())


@pytest.mark.kernel
def test_pods_talk_through_the_node(topology: Topology) -> None:
    server, client = topology.pods["server"], topology.pods["client"]
    topology.spawn(server.netns, [sys.executable, "-m", "http.server", "--bind", "::", "8080"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(client.netns, server.ipv4, 8080)
    topology.wait_for_port(client.netns, server.ipv6, 8080)

    before = {p.host_ifname: rx_packets(topology, p.host_ifname) for p in (server, client)}
    for url in (f"http://{server.ipv4}:8080/", f"http://[{server.ipv6}]:8080/"):
        out = topology.run(client.netns, ["curl", "-sS", "-m", "5", "-o", "/dev/null",
                                          "-w", "%{http_code}", url]).stdout
        assert out == "200"
    # The requests left the client through its host veth and the replies left
    # the server through its own: the node routed both ways.
    for p in (server, client):
        assert rx_packets(topology, p.host_ifname) > before[p.host_ifname]

    route = topology.run(client.netns, ["ip", "route", "get", server.ipv4]).stdout
    assert f"via {GATEWAY4} dev eth0" in route


@pytest.mark.kernel
def test_only_the_test_address_ranges_are_used(topology: Topology) -> None:
    for ns in topology.namespaces:
        for link in json.loads(topology.run(ns, ["ip", "-j", "addr"]).stdout):
            for a in link.get("addr_info", []):
                addr = ipaddress.ip_address(a["local"])
                assert any(addr in net for net in ALLOWED), (ns, link["ifname"], addr)
        for fam in ("-4", "-6"):
            for r in json.loads(topology.run(ns, ["ip", "-j", fam, "route"]).stdout):
                gw = r.get("gateway")
                if gw:
                    assert any(ipaddress.ip_address(gw) in net for net in ALLOWED), (ns, r)


@pytest.mark.kernel
def test_host_ifindex_is_the_node_side_veth(topology: Topology) -> None:
    for pod in topology.pods.values():
        with in_netns(topology.node_ns):
            import socket

            assert socket.if_indextoname(pod.host_ifindex) == pod.host_ifname
        assert topology.run(pod.netns, ["ip", "link", "show", "dev", "eth0"]).returncode == 0


@pytest.mark.kernel
def test_exit_removes_namespaces_and_processes(kernel: object) -> None:
    with Topology(prefix="clvt", pods=("a", "b", "c")) as topo:
        names = set(topo.namespaces)
        assert names <= netns_names()
        proc = topo.spawn(topo.pods["a"].netns, ["sleep", "600"])
        # A grandchild in the same session must go too.
        shell = topo.spawn(topo.node_ns, ["sh", "-c", "sleep 600 & wait"])
    assert not names & netns_names()
    assert proc.poll() is not None and shell.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(shell.pid, 0)


@pytest.mark.kernel
def test_exit_cleans_up_after_an_exception(kernel: object) -> None:
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="boom"), Topology(prefix="clvt") as topo:
        names = set(topo.namespaces)
        proc = topo.spawn(topo.node_ns, ["sleep", "600"])
        raise RuntimeError("boom")
    assert names and not names & netns_names()
    assert proc.poll() is not None


@pytest.mark.kernel
def test_failed_creation_leaves_nothing(kernel: object, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = Topology(prefix="clvt", pods=("a", "b"))
    real = Topology._ifindex
    calls = []

    def failing(self: Topology, ns: str, ifname: str) -> int:
        calls.append(ifname)
        if len(calls) == 2:
            raise TopologyError("injected")
        return real(self, ns, ifname)

    monkeypatch.setattr(Topology, "_ifindex", failing)
    with pytest.raises(TopologyError, match="injected"), topo:
        pass
    assert not set(topo.namespaces) & netns_names()


@pytest.mark.kernel
def test_stale_namespaces_of_a_killed_run_are_removed(kernel: object) -> None:
    script = textwrap.dedent("""
        import sys, time
        from clovisor.topology import Topology
        t = Topology(prefix="clvs").__enter__()
        print(" ".join(t.namespaces), flush=True)
        time.sleep(600)
    """)
    with Topology(prefix="clvs") as live:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 text=True, start_new_session=True)
        try:
            assert child.stdout is not None
            stale = set(child.stdout.readline().split())
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        assert stale and stale <= netns_names()

        with Topology(prefix="clvs") as fresh:
            # The killed run's namespaces are gone; a live run's are not.
            assert not stale & netns_names()
            assert set(live.namespaces) <= netns_names()
            assert set(fresh.namespaces) <= netns_names()
    assert remove_stale("clvs") == []


@pytest.mark.kernel
def test_in_netns_moves_only_the_calling_thread(topology: Topology) -> None:
    home = thread_netns()
    seen_by_other: list[int] = []
    go = threading.Event()

    def other() -> None:
        go.wait()
        seen_by_other.append(thread_netns())

    # Started before the switch: a thread started inside would inherit it.
    t = threading.Thread(target=other)
    t.start()
    with in_netns(topology.node_ns):
        inside = thread_netns()
        go.set()
        t.join()
    assert inside != home
    assert seen_by_other == [home]
    assert thread_netns() == home

    with pytest.raises(RuntimeError), in_netns(topology.node_ns):
        raise RuntimeError
    assert thread_netns() == home

    with pytest.raises(TopologyError, match="does not exist"), in_netns("clvt-no-such-ns"):
        pass
    assert thread_netns() == home


@pytest.mark.kernel
def test_wait_for_port_times_out(topology: Topology) -> None:
    server = topology.pods["server"]
    with pytest.raises(TimeoutError):
        wait_for_port(topology.pods["client"].netns, server.ipv4, 9, timeout=0.3)
