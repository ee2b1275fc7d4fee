"""The benchmark's smoke run: a couple of seconds of real traffic, untraced and traced.

It checks that ``python -m bench.run --smoke`` produces a well-formed result
(the machine, the workloads, one run per scenario with the completeness and
cost fields, the targets) and that the tracer saw the traffic.  The numbers
themselves are the full benchmark's business (``make bench``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clovisor.topology import NETNS_DIR

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.kernel

RUN_FIELDS = {
    "workload", "label", "scenario", "offered_rps", "keepalive", "requests", "server_requests",
    "achieved_rps", "p50_ms", "p99_ms", "traced", "completeness", "completeness_server",
    "events_lost", "parse_errors", "cpu_s", "cpu_s_per_1k_req", "cpu_us_per_req",
    "cpu_core_pct", "peak_rss_mib", "kernel_ns_per_run", "kernel_runs",
}


def _our_namespaces() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir() if p.name.startswith("clvb-")}
    except FileNotFoundError:
        return set()


def test_bench_smoke(tmp_path: Path) -> None:
    for tool in ("nginx", "hey", "wrk", "bpftool"):
        if subprocess.run(["sh", "-c", f"command -v {tool} || test -x /usr/sbin/{tool}"],
                          capture_output=True, check=False).returncode != 0:
            pytest.skip(f"{tool} is not installed (run `make setup`)")
    before_ns = _our_namespaces()
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--results-dir", str(tmp_path),
         "--variant", "pure=CLOVISOR_PURE_PYTHON=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert elapsed < 30, f"the smoke run took {elapsed:.1f}s"

    results = list(tmp_path.glob("*-smoke.json"))
    assert len(results) == 1, results
    result = json.loads(results[0].read_text())
    assert result["smoke"] is True
    assert {"nproc", "kernel", "cpu_model"} <= result["machine"].keys()
    assert result["machine"]["nproc"] >= 1
    assert len(result["workloads"]) == 1

    runs = {r["scenario"]: r for r in result["runs"]}
    assert set(runs) == {"untraced", "clovisor", "clovisor:pure"}
    assert result["variants"]["clovisor:pure"]["env"] == {"CLOVISOR_PURE_PYTHON": "1"}
    for r in runs.values():
        assert r.keys() >= RUN_FIELDS, RUN_FIELDS - r.keys()
        assert r["requests"] > 0
        assert r["server_requests"] >= r["requests"]
        assert r["p99_ms"] is not None and r["p99_ms"] >= r["p50_ms"] > 0

    assert runs["clovisor:pure"]["traced"] > 0
    traced = runs["clovisor"]
    assert traced["traced"] > 0, traced
    # The RED metrics, scraped from the tracer: every traced request, all 200s.
    assert traced["red_by_status"] == {"200": traced["traced"]}, traced["red_by_status"]
    assert traced["tracer_counters"]["clovisor_sessions_emitted_total"] == traced["traced"]
    assert traced["events_lost"] == 0
    assert traced["parse_errors"] == 0
    assert 0 < traced["completeness"] <= 1.01
    assert 0 < traced["completeness_server"] <= 1.0
    assert traced["completeness_server"] > 0.9, traced
    assert traced["cpu_s"] is not None and traced["cpu_s"] >= 0
    assert traced["cpu_us_per_req"] is not None
    assert traced["peak_rss_mib"] > 0
    assert traced["kernel_runs"] > 0 and traced["kernel_ns_per_run"] > 0

    names = {t["name"]: t for t in result["targets"]}
    assert names["tracer peak RSS"]["met"] in (True, False)
    assert names["5k keep-alive: tracer CPU"]["met"] is None  # not run by the smoke
    for t in result["targets"]:
        assert {"name", "goal", "measured", "met"} <= t.keys()

    assert "targets" in proc.stdout and "clovisor" in proc.stdout
    assert list(tmp_path.glob("*-smoke.png")), "no plot written"
    # Nothing left behind: namespaces, the bpf_stats sysctl.
    assert _our_namespaces() <= before_ns
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before


def test_bench_smoke_http2_and_grpc(tmp_path: Path) -> None:
    """``--protocols http2 grpc`` alone: h2load against nginx's h2c port and the
    demo gRPC client, each traced on its declared port."""
    if subprocess.run(["sh", "-c", "command -v h2load"], capture_output=True,
                      check=False).returncode != 0:  # fmt: skip
        pytest.skip("h2load is not installed (nghttp2-client; run `make setup`)")
    before_ns = _our_namespaces()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--protocols", "http2", "grpc",
         "--results-dir", str(tmp_path), "--no-plot"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    assert result["protocols"] == ["http2", "grpc"]
    runs = {(r["protocol"], r["scenario"]): r for r in result["runs"]}
    assert set(runs) == {(p, s) for p in ("http2", "grpc") for s in ("untraced", "clovisor")}
    for p in ("http2", "grpc"):
        base, traced = runs[(p, "untraced")], runs[(p, "clovisor")]
        assert base["requests"] > 0 and base["server_requests"] >= base["requests"]
        assert traced["traced"] == traced["server_requests"] > 0, traced
        assert traced["events_lost"] == 0 and traced["parse_errors"] == 0
        assert traced["cpu_us_per_req"] is not None and traced["kernel_runs"] > 0
    assert _our_namespaces() <= before_ns


def test_load_client_reports_parse() -> None:
    from bench.clients import parse_grpc, parse_h2load

    h2 = parse_h2load(
        "finished in 3.00s, 999.67 req/s, 39.03KB/s\n"
        "requests: 3000 total, 3000 started, 3000 done, 2990 succeeded, 10 failed, "
        "0 errored, 0 timeout\n"
        "status codes: 2990 2xx, 0 3xx, 4 4xx, 0 5xx\n"
    )
    assert (h2.requests, h2.errors, h2.non_2xx, h2.seconds) == (2990, 10, 4, 3.0)
    g = parse_grpc('{"calls": 300, "errors": 2, "seconds": 3.1, "p50_ms": 0.7, "p99_ms": 5.0}\n')
    assert (g.requests, g.errors, g.seconds, g.p99_ms) == (298, 2, 3.1, 5.0)
