"""How ``clovisor trace`` starts and ends: signals, totals, and what it leaves on the interface.

TCX links die with the process, even by SIGKILL; clsact filters outlive a
killed tracer, and ``clovisor cleanup`` removes exactly ours, leaving a
foreign filter and a qdisc that was there before untouched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from clovisor.kernel.attach import CLSACT_HANDLE, CLSACT_PRIORITY, Hook, list_hooks
from clovisor.topology import in_netns
from tests.integration.conftest import (
    PORT,
    TOTALS_RE,
    Net,
    TracerFactory,
)

pytestmark = pytest.mark.kernel


def hooks(net: Net, ifname: str) -> list[Hook]:
    with in_netns(net.topo.node_ns):
        return list_hooks(ifname)


def ours(net: Net, ifname: str) -> list[Hook]:
    return [h for h in hooks(net, ifname) if h.ours]


def wait_no_hooks_of_ours(net: Net, ifname: str, timeout: float = 5.0) -> list[Hook]:
    """TCX links go when the last fd closes, which the kernel does as the process dies."""
    deadline = time.monotonic() + timeout
    while True:
        left = ours(net, ifname)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def node_run(net: Net, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return net.topo.run(net.topo.node_ns, list(argv), check=check, timeout=30)


def qdiscs(net: Net, ifname: str) -> list[str]:
    out = node_run(net, "tc", "-j", "qdisc", "show", "dev", ifname).stdout
    return [q["kind"] for q in json.loads(out or "[]")]


def curl_ok(net: Net, path: str = "/") -> None:
    net.curl(f"http://{net.py.ipv4}:{PORT}{path}", "-o", "/dev/null")


@pytest.fixture
def veth(net: Net) -> Iterator[str]:
    """The py pod's host veth; any clsact qdisc a test left on it is removed afterwards."""
    ifname: str = net.py.host_ifname
    yield ifname
    if "clsact" in qdiscs(net, ifname):
        node_run(net, "tc", "qdisc", "del", "dev", ifname, "clsact", check=False)


# Another agent's non-BPF filter: "matchall action pass" where the kernel has
# cls_matchall and act_gact; otherwise u32 with no action, which ends
# classification the same way (cls_u32 is built into more kernels).
FOREIGN_FILTERS = (
    ["matchall", "action", "pass"],
    ["u32", "match", "u32", "0", "0", "flowid", "1:1"],
)


@pytest.fixture
def foreign_filter(net: Net, veth: str) -> str:
    """A clsact qdisc and another agent's filter on the veth before Clovisor comes."""
    node_run(net, "tc", "qdisc", "add", "dev", veth, "clsact")
    errors = []
    for spec in FOREIGN_FILTERS:
        proc = node_run(net, "tc", "filter", "add", "dev", veth, "ingress", "prio", "1", *spec,
                        check=False)
        if proc.returncode == 0:
            return veth
        errors.append(proc.stderr.strip())
    pytest.fail(f"cannot add a foreign tc filter: {errors}")


def foreign(net: Net, ifname: str) -> list[tuple[str, str, int]]:
    return [(h.direction, h.kind, h.priority) for h in hooks(net, ifname) if not h.ours]


# --- clean stops ---


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0_with_totals_and_detaches(
    net: Net, tracer: TracerFactory, veth: str, sig: int
) -> None:
    t = tracer(veth)
    attached = ours(net, veth)
    assert {(h.mode, h.direction) for h in attached} == {("tcx", "ingress"), ("tcx", "egress")}
    assert all(h.prog_name.startswith("clv_") for h in attached)
    curl_ok(net, "/?lifecycle=1")
    curl_ok(net, "/bytes/100")
    rc = t.stop(sig)
    assert rc == 0, t.stderr
    assert "Traceback" not in t.stderr
    lines = [ln for ln in t.stderr.splitlines() if TOTALS_RE.search(ln)]
    assert len(lines) == 1, t.stderr
    totals = t.totals
    assert totals["sessions"] == 2 and totals["events_lost"] == 0
    # each exchange the kernel paired stands for a request and a response segment
    assert totals["segments"] + 2 * totals["exchanges"] >= 4 and totals["parse_errors"] == 0
    assert len(t.spans()) == 2
    assert hooks(net, veth) == [], "nothing of ours, nothing else either"


def test_sigkill_in_tcx_mode_leaves_no_hook(net: Net, tracer: TracerFactory, veth: str) -> None:
    t = tracer(veth, "--attach-mode", "tcx")
    assert len(ours(net, veth)) == 2
    curl_ok(net)
    t.stop(signal.SIGKILL)
    assert t.returncode == -signal.SIGKILL
    assert wait_no_hooks_of_ours(net, veth) == []
    assert hooks(net, veth) == []
    # The cleanup command finds nothing to do after TCX.
    out = node_run(net, sys.executable, "-m", "clovisor", "cleanup", "--iface", veth)
    assert "nothing to clean up" in out.stdout, out.stdout


def test_sigkill_in_clsact_mode_then_cleanup(
    net: Net, tracer: TracerFactory, foreign_filter: str
) -> None:
    veth = foreign_filter
    before = foreign(net, veth)
    # u32 shows up as two entries (its hash table and the rule), matchall as one.
    kind = before[0][1]
    assert kind in ("matchall", "u32") and set(before) == {("ingress", kind, 1)}, before
    t = tracer(veth, "--attach-mode", "clsact")
    mine = ours(net, veth)
    assert {(h.mode, h.direction) for h in mine} == {("clsact", "ingress"),
                                                       ("clsact", "egress")}
    assert all(h.handle == CLSACT_HANDLE and h.priority == CLSACT_PRIORITY for h in mine)
    curl_ok(net)  # traffic still flows with both filters in place
    t.stop(signal.SIGKILL)
    assert t.returncode == -signal.SIGKILL

    # tc filters outlive the process that attached them.
    time.sleep(0.2)
    assert {(h.mode, h.direction) for h in ours(net, veth)} == {("clsact", "ingress"),
                                                                  ("clsact", "egress")}
    curl_ok(net)  # a filter with no agent behind it still lets traffic through

    out = node_run(net, sys.executable, "-m", "clovisor", "cleanup")
    assert out.returncode == 0, out.stderr
    removed = [ln for ln in out.stdout.splitlines() if ln.startswith("removed ")]
    assert len(removed) == 2 and all(veth in ln for ln in removed), out.stdout
    assert not any("qdisc" in ln for ln in removed), "the qdisc was not ours"
    assert ours(net, veth) == []
    assert foreign(net, veth) == before, "the other agent's filter is untouched"
    assert "clsact" in qdiscs(net, veth), "the qdisc that was there before stays"
    filters = node_run(net, "tc", "filter", "show", "dev", veth, "ingress").stdout
    assert kind in filters and "pref 1 " in filters, filters

    again = node_run(net, sys.executable, "-m", "clovisor", "cleanup", "--iface", veth)
    assert "nothing to clean up" in again.stdout, again.stdout


def test_clsact_sigterm_removes_only_ours(
    net: Net, tracer: TracerFactory, foreign_filter: str
) -> None:
    veth = foreign_filter
    before = foreign(net, veth)
    t = tracer(veth, "--attach-mode", "clsact")
    assert len(ours(net, veth)) == 2
    assert t.stop(signal.SIGTERM) == 0, t.stderr
    assert ours(net, veth) == []
    assert foreign(net, veth) == before
    assert "clsact" in qdiscs(net, veth)


def test_clsact_qdisc_we_created_goes_with_us(net: Net, tracer: TracerFactory,
                                              veth: str) -> None:
    assert "clsact" not in qdiscs(net, veth)
    t = tracer(veth, "--attach-mode", "clsact")
    assert "clsact" in qdiscs(net, veth)
    curl_ok(net, "/?clsact=1")
    assert t.stop(signal.SIGTERM) == 0, t.stderr
    assert [s["url.query"] for s in t.spans()] == ["clsact=1"]
    assert hooks(net, veth) == []
    assert "clsact" not in qdiscs(net, veth)


def test_sigkill_clsact_created_qdisc_cleanup_removes_it(
    net: Net, tracer: TracerFactory, veth: str
) -> None:
    t = tracer(veth, "--attach-mode", "clsact")
    t.stop(signal.SIGKILL)
    assert len(ours(net, veth)) == 2
    out = node_run(net, sys.executable, "-m", "clovisor", "cleanup", "--iface", veth)
    assert any("qdisc" in ln for ln in out.stdout.splitlines()), out.stdout
    assert hooks(net, veth) == []
    assert "clsact" not in qdiscs(net, veth)


def test_restart_after_sigkill_traces_again(net: Net, tracer: TracerFactory, veth: str) -> None:
    """An agent restarted after a crash converges: one pair of hooks, spans flowing."""
    first = tracer(veth)
    first.stop(signal.SIGKILL)
    wait_no_hooks_of_ours(net, veth)
    second = tracer(veth)
    assert len(ours(net, veth)) == 2
    curl_ok(net, "/?restart=1")
    assert second.stop() == 0, second.stderr
    assert [s["url.query"] for s in second.spans()] == ["restart=1"]
    assert hooks(net, veth) == []


@pytest.mark.xfail(strict=False, reason=(
    "clsact fallback: our filter sits at prio 0xc10f, after the foreign prio-1 filter; "
    "a filter that ends classification (u32 without action, matchall pass, Cilium's "
    "direct-action programs) then hides the pod->node direction, so responses are never "
    "seen and the span ends as 'shutdown' with no status. Running first would be harmless: "
    "the classifier returns TC_ACT_UNSPEC and never changes traffic"))
def test_clsact_behind_a_foreign_filter_still_sees_responses(
    net: Net, tracer: TracerFactory, foreign_filter: str
) -> None:
    t = tracer(foreign_filter, "--attach-mode", "clsact")
    curl_ok(net, "/?behind=foreign")
    assert t.stop() == 0, t.stderr
    (span,) = t.spans()
    assert span["url.query"] == "behind=foreign"
    assert span.get("http.response.status_code") == 200, span


def test_tcx_next_to_a_foreign_clsact_filter(
    net: Net, tracer: TracerFactory, foreign_filter: str
) -> None:
    """TCX programs run before the tc chain: a foreign filter hides nothing from us,
    and ours leaves it (and the qdisc) as it was."""
    before = foreign(net, foreign_filter)
    t = tracer(foreign_filter, "--attach-mode", "tcx")
    curl_ok(net, "/?tcx=foreign")
    assert t.stop() == 0, t.stderr
    (span,) = t.spans()
    assert span["url.query"] == "tcx=foreign"
    assert span["http.response.status_code"] == 200
    assert span["clovisor.outcome"] == "complete"
    assert ours(net, foreign_filter) == []
    assert foreign(net, foreign_filter) == before
    assert "clsact" in qdiscs(net, foreign_filter)
