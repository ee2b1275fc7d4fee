"""Attach/detach on real veths: TCX and clsact, next to other agents' hooks.

Every attach happens inside the topology's node namespace (``in_netns``):
ifindexes are per namespace, and the same number in the test runner's own
namespace would be one of the machine's real interfaces.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clovisor.kernel import attach as att
from clovisor.kernel import libbpf
from clovisor.kernel.attach import CLSACT_HANDLE, CLSACT_PRIORITY, attach, cleanup, list_hooks
from clovisor.kernel.errors import KernelError
from clovisor.topology import Pod, Topology, in_netns
from tests.conftest import TinyBpf, counting_tc_source

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
OURS = counting_tc_source("clv_t")  # named like Clovisor's programs
FOREIGN = counting_tc_source("foreign")
FOREIGN2 = counting_tc_source("other")
# Another agent's non-BPF filter.  u32, not matchall: cls_u32 is built into
# more kernels (this VM's kernel has neither cls_matchall nor act_gact).  With
# no action it ends classification like "action pass" would.
U32_PASS = ["u32", "match", "u32", "0", "0", "flowid", "1:1"]


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
def ours(tiny_bpf: Callable[[str], TinyBpf]) -> TinyBpf:
    return tiny_bpf(OURS)


@pytest.fixture
def foreign(tiny_bpf: Callable[[str], TinyBpf]) -> TinyBpf:
    return tiny_bpf(FOREIGN)


def hits(obj: TinyBpf, prefix: str) -> tuple[int, int]:
    return obj.u64(f"{prefix}_hits", 0), obj.u64(f"{prefix}_hits", 1)


def exchange(topo: Topology, family: int = socket.AF_INET, rounds: int = 3) -> None:
    """A TCP echo conversation client pod -> server pod, crossing the node's veths."""
    server, client = topo.pods["server"], topo.pods["client"]
    addr = server.ipv4 if family == socket.AF_INET else server.ipv6
    with in_netns(server.netns):
        lsock = socket.socket(family, socket.SOCK_STREAM)
    with lsock:
        lsock.bind((addr, 0))
        lsock.listen(1)
        lsock.settimeout(5)
        port = lsock.getsockname()[1]

        def serve() -> None:
            conn, _ = lsock.accept()
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with in_netns(client.netns):
            c = socket.socket(family, socket.SOCK_STREAM)
        with c:
            c.settimeout(5)
            c.connect((addr, port))
            for i in range(rounds):
                msg = f"ping {i}".encode()
                c.sendall(msg)
                assert c.recv(100) == msg
        t.join(5)


def tc_show(topo: Topology, ifname: str) -> dict[str, list[str]]:
    """iproute2's own view of the interface's qdiscs and filters, line by line."""
    def lines(*args: str) -> list[str]:
        out = topo.run(topo.node_ns, ["tc", *args]).stdout
        return [ln.rstrip() for ln in out.splitlines() if ln.strip()]

    return {
        "qdisc": lines("qdisc", "show", "dev", ifname),
        "ingress": lines("filter", "show", "dev", ifname, "ingress"),
        "egress": lines("filter", "show", "dev", ifname, "egress"),
    }


def bpftool_link_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {int(link["prog_id"]) for link in json.loads(out or "[]") if "prog_id" in link}


_link_create = libbpf.bind("bpf_link_create", ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_void_p)


def foreign_tcx(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """Attach a TCX link the way another agent would (appended); returns the link fd."""
    return libbpf.check(_link_create(prog_fd, ifindex, attach_type, None), "foreign TCX link")


def foreign_tc_bpf(ifindex: int, direction: str, prog_fd: int, handle: int = 1,
                   prio: int = 1) -> None:
    """Another agent's direct-action tc BPF filter (the qdisc must exist)."""
    point = att._TC_POINT[direction]  # type: ignore[index]
    opts = att._TcOpts(sz=ctypes.sizeof(att._TcOpts), prog_fd=prog_fd, handle=handle,
                       priority=prio)
    libbpf.check(att._lib().tc_attach(ctypes.byref(att._hook(ifindex, point)),
                                      ctypes.byref(opts)), "foreign tc filter")


@pytest.fixture
def server_if(topology: Topology) -> Iterator[Pod]:
    """The server pod, with the test thread inside the node namespace."""
    with in_netns(topology.node_ns):
        yield topology.pods["server"]


def ours_hooks(ifindex: int) -> list[att.Hook]:
    return [h for h in list_hooks(ifindex) if h.ours]


# --- TCX -----------------------------------------------------------------------------------


def test_tcx_attach_sees_traffic_and_detach_leaves_no_link(
    topology: Topology, server_if: Pod, ours: TinyBpf
) -> None:
    a = attach(server_if.host_ifindex, ours.prog_fd("clv_t_in"), ours.prog_fd("clv_t_eg"),
               mode="tcx")
    assert a.mode == "tcx"
    hooks = list_hooks(server_if.host_ifindex)
    assert [(h.mode, h.direction, h.prog_name) for h in hooks] == [
        ("tcx", "ingress", "clv_t_in"), ("tcx", "egress", "clv_t_eg")]
    assert all(h.ours for h in hooks)
    assert set(a.prog_ids.values()) <= bpftool_link_prog_ids()

    exchange(topology)
    exchange(topology, socket.AF_INET6)
    assert all(n > 0 for n in hits(ours, "clv_t"))

    a.detach()
    a.detach()  # idempotent
    # Read only now: the last ACKs of the exchange may still be crossing until the detach.
    ing, eg = hits(ours, "clv_t")
    assert list_hooks(server_if.host_ifindex) == []
    assert att._tcx_prog_ids(server_if.host_ifindex, "ingress") == []
    assert att._tcx_prog_ids(server_if.host_ifindex, "egress") == []
    assert not set(a.prog_ids.values()) & bpftool_link_prog_ids()
    exchange(topology)  # traffic unaffected
    assert hits(ours, "clv_t") == (ing, eg)


def test_auto_mode_prefers_tcx(server_if: Pod, ours: TinyBpf) -> None:
    with attach(server_if.host_ifname, ours.prog_fd("clv_t_in"), None) as a:
        assert a.mode == "tcx"
        assert a.directions == ("ingress",)
        assert [h.direction for h in ours_hooks(server_if.host_ifindex)] == ["ingress"]
    assert list_hooks(server_if.host_ifindex) == []


def test_tcx_next_to_foreign_programs(
    topology: Topology, server_if: Pod, ours: TinyBpf, foreign: TinyBpf,
    tiny_bpf: Callable[[str], TinyBpf],
) -> None:
    idx = server_if.host_ifindex
    links = [foreign_tcx(foreign.prog_fd("foreign_in"), idx, att.BPF_TCX_INGRESS),
             foreign_tcx(foreign.prog_fd("foreign_eg"), idx, att.BPF_TCX_EGRESS)]
    other = tiny_bpf(FOREIGN2)
    try:
        before = list_hooks(idx)
        a = attach(idx, ours.prog_fd("clv_t_in"), ours.prog_fd("clv_t_eg"), mode="tcx")
        # Ours goes first, so a foreign program that ends the chain cannot hide
        # traffic from it; the foreign ones keep their order behind it.
        names = [(h.direction, h.position, h.prog_name) for h in list_hooks(idx)]
        assert names == [("ingress", 0, "clv_t_in"), ("ingress", 1, "foreign_in"),
                         ("egress", 0, "clv_t_eg"), ("egress", 1, "foreign_eg")]
        # A program another agent appends after ours still runs, because ours
        # returns TC_ACT_UNSPEC ("next"), not TC_ACT_OK.
        links.append(foreign_tcx(other.prog_fd("other_in"), idx, att.BPF_TCX_INGRESS))
        exchange(topology)
        assert all(n > 0 for n in (*hits(foreign, "foreign"), *hits(ours, "clv_t"),
                                   hits(other, "other")[0]))
        a.detach()
        after = list_hooks(idx)
        assert [h for h in after if h.prog_name != "other_in"] == before
        f_before, o_before = hits(foreign, "foreign"), hits(other, "other")
        exchange(topology)
        assert hits(foreign, "foreign")[0] > f_before[0]
        assert hits(other, "other")[0] > o_before[0]
    finally:
        for fd in links:
            os.close(fd)
    assert list_hooks(idx) == []


_ATTACH_AND_WAIT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clovisor.kernel.attach import attach
    from tests.conftest import TinyBpf
    obj = TinyBpf(Path(sys.argv[1]))
    mode = sys.argv[2]
    keep = [attach(name, obj.prog_fd("clv_t_in"), obj.prog_fd("clv_t_eg"), mode=mode)
            for name in sys.argv[3:]]
    print("ready", flush=True)
    time.sleep(600)
""")


def run_and_kill(topo: Topology, obj_path: Path, mode: str, ifnames: list[str]) -> None:
    """A Clovisor-like process in the node namespace that attaches, then dies by SIGKILL."""
    proc = topo.spawn(topo.node_ns, [sys.executable, "-c", _ATTACH_AND_WAIT, str(obj_path),
                                     mode, *ifnames],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"attacher failed: {proc.stderr.read()}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_tcx_links_die_with_the_process(
    topology: Topology, server_if: Pod, compile_bpf: Callable[[str], Path]
) -> None:
    run_and_kill(topology, compile_bpf(OURS), "tcx", [server_if.host_ifname])
    deadline = time.monotonic() + 5
    while list_hooks(server_if.host_ifindex) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list_hooks(server_if.host_ifindex) == []
    assert cleanup() == []


# --- clsact ------------------------------------------------------------------------------


def test_clsact_creates_and_removes_its_own_qdisc(
    topology: Topology, server_if: Pod, ours: TinyBpf
) -> None:
    idx = server_if.host_ifindex
    before = tc_show(topology, server_if.host_ifname)
    assert not att.clsact_present(idx)
    a = attach(idx, ours.prog_fd("clv_t_in"), ours.prog_fd("clv_t_eg"), mode="clsact")
    assert att.clsact_present(idx)
    hooks = list_hooks(idx)
    assert [(h.mode, h.direction, h.prog_name, h.handle, h.priority) for h in hooks] == [
        ("clsact", d, n, CLSACT_HANDLE, CLSACT_PRIORITY)
        for d, n in (("ingress", "clv_t_in"), ("egress", "clv_t_eg"))]
    exchange(topology)
    assert all(n > 0 for n in hits(ours, "clv_t"))
    a.detach()
    assert not att.clsact_present(idx)
    assert tc_show(topology, server_if.host_ifname) == before
    assert not att._marker(idx).exists()


def test_clsact_leaves_foreign_qdisc_and_filters_alone(
    topology: Topology, server_if: Pod, ours: TinyBpf, foreign: TinyBpf
) -> None:
    ifname, idx = server_if.host_ifname, server_if.host_ifindex
    node = topology.node_ns
    topology.run(node, ["tc", "qdisc", "add", "dev", ifname, "clsact"])
    topology.run(node, ["tc", "filter", "add", "dev", ifname, "ingress", "prio", "1",
                        *U32_PASS])
    foreign_tc_bpf(idx, "egress", foreign.prog_fd("foreign_eg"))
    before = tc_show(topology, ifname)

    a = attach(idx, ours.prog_fd("clv_t_in"), ours.prog_fd("clv_t_eg"), mode="clsact")
    during = tc_show(topology, ifname)
    assert during["qdisc"] == before["qdisc"]
    for hook in ("ingress", "egress"):
        assert set(before[hook]) <= set(during[hook])
        assert any("clv_t_" in ln for ln in during[hook])
    # The foreign filter at priority 1 runs before ours, returns "unspec", and
    # ours still sees the packets after it.
    exchange(topology)
    assert hits(foreign, "foreign")[1] > 0 and hits(ours, "clv_t")[1] > 0

    a.detach()
    assert tc_show(topology, ifname) == before
    exchange(topology)  # the foreign filter still runs
    assert hits(foreign, "foreign")[1] > 0


def test_clsact_qdisc_we_created_stays_when_someone_else_uses_it(
    topology: Topology, server_if: Pod, ours: TinyBpf
) -> None:
    ifname, idx = server_if.host_ifname, server_if.host_ifindex
    a = attach(idx, ours.prog_fd("clv_t_in"), ours.prog_fd("clv_t_eg"), mode="clsact")
    topology.run(topology.node_ns, ["tc", "filter", "add", "dev", ifname, "egress", "prio",
                                    "7", *U32_PASS])
    a.detach()
    assert att.clsact_present(idx)
    hooks = list_hooks(idx)
    assert {(h.direction, h.kind, h.priority) for h in hooks} == {("egress", "u32", 7)}


def test_clsact_reattach_takes_over_a_stale_filter_of_ours(
    server_if: Pod, ours: TinyBpf, tiny_bpf: Callable[[str], TinyBpf]
) -> None:
    idx = server_if.host_ifindex
    first = attach(idx, ours.prog_fd("clv_t_in"), None, mode="clsact")
    newer = tiny_bpf(counting_tc_source("clv_u"))
    second = attach(idx, newer.prog_fd("clv_u_in"), None, mode="clsact")  # a restart
    assert [h.prog_name for h in list_hooks(idx)] == ["clv_u_in"]
    first.detach()  # its filter was replaced: it must not take the newer one away
    assert [h.prog_name for h in list_hooks(idx)] == ["clv_u_in"]
    second.detach()  # and the qdisc the first one created still goes in the end
    assert list_hooks(idx) == [] and not att.clsact_present(idx)


def test_clsact_refuses_a_foreign_filter_at_our_handle(
    topology: Topology, server_if: Pod, ours: TinyBpf, foreign: TinyBpf
) -> None:
    idx = server_if.host_ifindex
    topology.run(topology.node_ns, ["tc", "qdisc", "add", "dev", server_if.host_ifname,
                                    "clsact"])
    foreign_tc_bpf(idx, "ingress", foreign.prog_fd("foreign_in"), CLSACT_HANDLE,
                   CLSACT_PRIORITY)
    before = tc_show(topology, server_if.host_ifname)
    with pytest.raises(KernelError, match="belongs to another program") as exc:
        attach(idx, ours.prog_fd("clv_t_in"), ours.prog_fd("clv_t_eg"), mode="clsact")
    assert exc.value.errno == errno.EEXIST
    assert cleanup([server_if.host_ifname]) == []
    assert tc_show(topology, server_if.host_ifname) == before


def test_detach_returns_to_the_namespace_of_the_attach(
    topology: Topology, ours: TinyBpf
) -> None:
    pod = topology.pods["server"]
    with in_netns(topology.node_ns):
        a = attach(pod.host_ifindex, ours.prog_fd("clv_t_in"), ours.prog_fd("clv_t_eg"),
                   mode="clsact")
    a.detach()  # called from the runner's own namespace
    with in_netns(topology.node_ns):
        assert list_hooks(pod.host_ifindex) == []
        assert not att.clsact_present(pod.host_ifindex)


def test_cleanup_after_sigkill_removes_only_ours(
    topology: Topology, server_if: Pod, foreign: TinyBpf,
    compile_bpf: Callable[[str], Path],
) -> None:
    server = server_if
    client = topology.pods["client"]
    node = topology.node_ns
    # The server veth has another agent's qdisc and filters; the client veth has none.
    topology.run(node, ["tc", "qdisc", "add", "dev", server.host_ifname, "clsact"])
    topology.run(node, ["tc", "filter", "add", "dev", server.host_ifname, "ingress", "prio",
                        "1", *U32_PASS])
    foreign_tc_bpf(server.host_ifindex, "egress", foreign.prog_fd("foreign_eg"))
    before = {p.host_ifname: tc_show(topology, p.host_ifname) for p in (server, client)}

    run_and_kill(topology, compile_bpf(OURS), "clsact", [server.host_ifname, client.host_ifname])
    # tc filters outlive their process: that is what cleanup is for.
    for p in (server, client):
        assert len(ours_hooks(p.host_ifindex)) == 2

    removed = cleanup()
    assert len([r for r in removed if "tc filter" in r]) == 4
    assert f"{client.host_ifname} clsact qdisc" in removed
    assert not any(server.host_ifname in r and "qdisc" in r for r in removed)
    for p in (server, client):
        assert tc_show(topology, p.host_ifname) == before[p.host_ifname]
    assert cleanup() == []
    exchange(topology)
    assert hits(foreign, "foreign")[1] > 0


def test_cleanup_of_named_interfaces(
    topology: Topology, server_if: Pod, compile_bpf: Callable[[str], Path]
) -> None:
    client = topology.pods["client"]
    run_and_kill(topology, compile_bpf(OURS), "clsact",
                 [server_if.host_ifname, client.host_ifname])
    removed = cleanup([server_if.host_ifname])
    assert removed and all(server_if.host_ifname in r for r in removed)
    assert len(ours_hooks(client.host_ifindex)) == 2
    with pytest.raises(KernelError, match="no network interface named"):
        cleanup(["clvt-nosuchif"])
    assert len(cleanup([client.host_ifname])) == 3


# --- errors ---------------------------------------------------------------------------------


def test_missing_interface_is_a_clear_error(server_if: Pod, ours: TinyBpf) -> None:
    for mode in ("auto", "tcx", "clsact"):
        with pytest.raises(KernelError, match="no network interface with ifindex 9999") as e:
            attach(9999, ours.prog_fd("clv_t_in"), None, mode=mode)  # type: ignore[arg-type]
        assert e.value.errno == errno.ENODEV
    with pytest.raises(KernelError, match="no network interface named 'nope0'"):
        attach("nope0", ours.prog_fd("clv_t_in"), None)
    with pytest.raises(ValueError):
        attach(server_if.host_ifindex, None, None)


def test_failed_attach_leaves_nothing(server_if: Pod, ours: TinyBpf) -> None:
    # An egress "program" that is not one: ingress went on first and must come off.
    for mode in ("tcx", "clsact"):
        with pytest.raises(KernelError):
            attach(server_if.host_ifindex, ours.prog_fd("clv_t_in"), ours.map_fd("clv_t_hits"),
                   mode=mode)  # type: ignore[arg-type]
        assert list_hooks(server_if.host_ifindex) == []
        assert not att.clsact_present(server_if.host_ifindex)


# --- the real classifier ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tcx", "clsact"])
def test_real_classifier_attaches_and_detaches(
    topology: Topology, server_if: Pod, bpf_object: Callable[..., object], mode: str
) -> None:
    obj = bpf_object()
    prog_fd = obj.prog_fd  # type: ignore[attr-defined]
    with attach(server_if.host_ifindex, prog_fd("clv_tc_ingress"), prog_fd("clv_tc_egress"),
                mode=mode) as a:  # type: ignore[arg-type]
        assert {h.prog_name for h in ours_hooks(server_if.host_ifindex)} == {
            "clv_tc_ingress", "clv_tc_egress"}
        assert a.mode == mode
        exchange(topology)  # the classifier never drops or changes traffic
        exchange(topology, socket.AF_INET6)
    assert list_hooks(server_if.host_ifindex) == []
    assert not att.clsact_present(server_if.host_ifindex)


@pytest.mark.parametrize("mode", ["tcx", "clsact"])
def test_detach_after_the_interface_went_away(
    topology: Topology, ours: TinyBpf, mode: str
) -> None:
    # A pod deleted under a running agent: its veth, and our hooks, are gone.
    client = topology.pods["client"]
    with in_netns(topology.node_ns):
        a = attach(client.host_ifindex, ours.prog_fd("clv_t_in"), ours.prog_fd("clv_t_eg"),
                   mode=mode)  # type: ignore[arg-type]
        topology.run(topology.node_ns, ["ip", "link", "del", client.host_ifname])
        a.detach()
        assert not a.attached
        if mode == "clsact":
            assert not att._marker(client.host_ifindex).exists()
