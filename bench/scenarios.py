"""One measured run: a workload under one scenario (untraced, clovisor, tshark).

The tracer (``clovisor trace`` or tshark) runs in the node namespace on the
server pod's host veth, started before the client and stopped after the
client finished and the tracer went quiet, so the CPU it spends draining a
backlog is counted too.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from clovisor.topology import Pod, Topology, http_get

from . import nginx
from .clients import MIX_EVERY, MIX_LUA, ClientResult, Workload, parse
from .procstat import (
    TreeSample,
    bpf_stats_enabled,
    busy_cores,
    cpu_jiffies,
    loadavg,
    prog_stats,
    sample_tree,
)

SCENARIOS = ("untraced", "clovisor", "tshark")
METRICS_PORT = 9464  # clovisor trace --metrics, in the node namespace
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
SETTLE_CAP = 30.0

TOTALS_RE = re.compile(
    r"segments seen (?P<segments>\d+), events lost (?P<events_lost>\d+), "
    r"sessions emitted (?P<sessions>\d+), parse errors (?P<parse_errors>\d+)"
)


SHED_RE = re.compile(r"spans shed (\d+)")


class BenchError(RuntimeError):
    pass


GRPC_PORT = 50051


@dataclass(frozen=True)
class Variant:
    """A clovisor scenario run differently, for a lever's before/after in one run.

    ``env`` is added to the tracer's environment (``CLOVISOR_PURE_PYTHON=1``:
    the interpreted build); ``source`` is another checkout's ``src`` directory
    (an older revision, prepared by ``bench.run``), put first on PYTHONPATH.
    """

    name: str
    env: tuple[tuple[str, str], ...] = ()
    source: Path | None = None

    @property
    def scenario(self) -> str:
        return f"clovisor:{self.name}"


@dataclass
class Env:
    """What every run shares: the topology, the server and client pods, a scratch dir.

    The gRPC server (when a run needs it) journals each call it serves in
    ``grpc_journal``: its count of requests, as stub_status is nginx's.
    """

    topo: Topology
    server: Pod
    client: Pod
    tmp: Path
    duration: float
    nginx_dir: Path | None = None
    variants: tuple[Variant, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.server.ipv4}:{nginx.PORT}{nginx.PATH}"

    @property
    def grpc_journal(self) -> Path:
        return self.tmp / "grpc-calls.jsonl"

    def target(self, protocol: str) -> str:
        """What the protocol's client is pointed at."""
        if protocol == "http2":
            return f"http://{self.server.ipv4}:{nginx.H2_PORT}{nginx.PATH}"
        if protocol == "grpc":
            return f"{self.server.ipv4}:{GRPC_PORT}"
        return self.url

    def port_spec(self, protocol: str) -> tuple[int, str]:
        """The traced port and its ``--port`` declaration."""
        if protocol == "http2":
            return nginx.H2_PORT, f"{nginx.H2_PORT}:http2"
        if protocol == "grpc":
            return GRPC_PORT, f"{GRPC_PORT}:grpc"
        return nginx.PORT, str(nginx.PORT)

    def server_requests(self, protocol: str = "http1") -> int:
        if protocol == "grpc":
            if not self.grpc_journal.exists():
                return 0
            with self.grpc_journal.open("rb") as f:
                return sum(1 for _ in f)
        return nginx.handled_requests(self.topo.node_ns, self.server.ipv4)

    def served_missing(self) -> int:
        return nginx.missing_served(self.nginx_dir) if self.nginx_dir is not None else 0

    def mix_script(self) -> str:
        path = self.tmp / "mix.lua"
        if not path.exists():
            path.write_text(MIX_LUA.format(every=MIX_EVERY, missing=nginx.MISSING))
        return str(path)

    def variant(self, scenario: str) -> Variant | None:
        return next((v for v in self.variants if v.scenario == scenario), None)

    def start_grpc_server(self) -> None:
        self.topo.spawn(self.server.netns, [
            sys.executable, "-m", "clovisor.demo_grpc", "server", "--port", str(GRPC_PORT),
            "--log", str(self.grpc_journal)], stdout=subprocess.DEVNULL,
            stderr=(self.tmp / "grpc-server.stderr").open("wb"))  # fmt: skip
        self.topo.wait_for_port(self.client.netns, self.server.ipv4, GRPC_PORT, timeout=20)


@dataclass
class RunResult:
    workload: str
    label: str
    scenario: str
    offered_rps: int | None  # None: unthrottled
    keepalive: bool
    tool: str
    protocol: str
    duration_s: float
    # client side
    requests: int
    client_errors: int
    non_2xx: int
    achieved_rps: float
    p50_ms: float | None
    p99_ms: float | None
    latency_resolution_ms: float
    # server side (nginx stub_status), the exact number of exchanges on the wire
    server_requests: int
    server_404: int = 0  # of which nginx answered 404 (its log of nginx.MISSING)
    # tracer side (None for untraced)
    traced: int | None = None  # clovisor: sessions emitted; tshark: responses decoded
    completeness: float | None = None  # traced / requests (client)
    completeness_server: float | None = None  # traced / server_requests
    events_lost: int | None = None
    parse_errors: int | None = None
    segments: int | None = None
    cpu_s: float | None = None
    cpu_s_per_1k_req: float | None = None
    cpu_us_per_req: float | None = None
    cpu_core_pct: float | None = None  # cpu_s over the client's run time
    peak_rss_mib: float | None = None
    cpu_s_at_settle: float | None = None  # CPU until the tracer went quiet (before SIGINT)
    cpu_s_lifetime: float | None = None  # CPU until it exited (shutdown included)
    settle_s: float | None = None
    kernel_ns_per_run: float | None = None
    kernel_runs: int | None = None
    kernel_runs_per_req: float | None = None
    # per program (clv_tc_ingress, clv_tc_egress): ns per run, runs per request
    kernel_by_prog: dict[str, tuple[float, float]] | None = None
    output_bytes: int | None = None
    # clovisor's /metrics after the run: RED request counts by status code
    # ("" = no response seen) and its own counters (clovisor_*_total)
    red_by_status: dict[str, int] | None = None
    tracer_counters: dict[str, float] | None = None
    spans_shed: int | None = None  # from the totals line
    tracer_pids: tuple[int, ...] = ()
    # the whole machine while the client ran: other tenants show up here
    machine_busy_cores: float | None = None
    loadavg_before: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- tracers ---------------------------------------------------------------------------


def _wait_for_line(proc: subprocess.Popen[Any], log: Path, needle: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode} before starting:\n{text}")
        time.sleep(0.05)
    raise BenchError(f"{what} did not start in {START_TIMEOUT}s:\n{log.read_text()}")


def _reap(proc: subprocess.Popen[Any], flags: int) -> resource.struct_rusage | None:
    """wait4() our child ourselves, for its lifetime rusage (it and its reaped children)."""
    try:
        pid, status, usage = os.wait4(proc.pid, flags)
    except ChildProcessError:
        return None
    if pid != proc.pid:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage


def _stop(proc: subprocess.Popen[Any], what: str) -> resource.struct_rusage | None:
    """SIGINT the process we started (by pid) and reap it; SIGKILL its group if it hangs.

    Returns its lifetime resource usage, or None if it had already been reaped.
    """
    if proc.returncode is not None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        usage = _reap(proc, os.WNOHANG)
        if proc.returncode is not None:
            return usage
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    _reap(proc, 0)
    raise BenchError(f"{what} did not stop in {STOP_TIMEOUT}s after SIGINT")


class Tracer:
    name = ""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def sample(self) -> TreeSample:
        return sample_tree(self.pid)

    def kernel(self, result: RunResult) -> None:
        """Fill in-kernel statistics, read while the tracer still runs."""

    def stop(self, result: RunResult) -> resource.struct_rusage | None:
        raise NotImplementedError

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class ClovisorTracer(Tracer):
    name = "clovisor"

    def __init__(
        self, env: Env, extra: tuple[str, ...] = (), variant: Variant | None = None,
        python: str = sys.executable, protocol: str = "http1",
    ) -> None:
        super().__init__(env)
        self.err = env.tmp / "clovisor.stderr"
        self.out = env.tmp / "spans.jsonl"
        for p in (self.err, self.out):
            p.unlink(missing_ok=True)
        argv = [
            python, "-m", "clovisor", "trace",
            "--iface", env.server.host_ifname, "--port", env.port_spec(protocol)[1],
            "--output", f"otlp-json:{self.out}", "--metrics", f"127.0.0.1:{METRICS_PORT}",
            *extra,
        ]
        # No bytecode written: `python` may be another checkout's.
        child_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        if variant is not None:
            child_env.update(variant.env)
            if variant.source is not None:
                child_env["PYTHONPATH"] = os.pathsep.join(
                    [str(variant.source), *filter(None, [os.environ.get("PYTHONPATH")])]
                )
        # ip netns exec execs the command: the Popen pid is the tracer itself.
        self.proc = env.topo.spawn(env.topo.node_ns, argv, stdout=subprocess.DEVNULL,
                                   stderr=self.err.open("wb"), env=child_env)
        _wait_for_line(self.proc, self.err, "tracing", "clovisor trace")

    def scrape(self, result: RunResult) -> None:
        """The RED request counts by status and the tracer's counters, from /metrics."""
        status, body = http_get(self.env.topo.node_ns, "127.0.0.1", METRICS_PORT, "/metrics")
        if status != 200:
            return
        red: dict[str, int] = {}
        counters: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == "http_server_request_duration_seconds_count":
                    code = sample.labels.get("http_response_status_code", "")
                    red[code] = red.get(code, 0) + int(sample.value)
                elif sample.name.startswith("clovisor_") and sample.name.endswith("_total"):
                    counters[sample.name] = counters.get(sample.name, 0.0) + sample.value
        result.red_by_status = red
        result.tracer_counters = counters

    def kernel(self, result: RunResult) -> None:
        stats = prog_stats(self.pid)
        runs = sum(s.run_cnt for s in stats)
        if runs:
            result.kernel_runs = runs
            result.kernel_ns_per_run = sum(s.run_time_ns for s in stats) / runs
            if result.server_requests:
                result.kernel_runs_per_req = runs / result.server_requests
                result.kernel_by_prog = {
                    s.name: (s.run_time_ns / s.run_cnt, s.run_cnt / result.server_requests)
                    for s in stats if s.run_cnt
                }

    def stop(self, result: RunResult) -> resource.struct_rusage | None:
        assert self.proc is not None
        usage = _stop(self.proc, "clovisor trace")
        err = self.err.read_text(errors="replace")
        m = TOTALS_RE.search(err)
        if m is None:
            raise BenchError(f"clovisor trace exited {self.proc.returncode} "
                             f"without a totals line:\n{err[-3000:]}")
        totals = {k: int(v) for k, v in m.groupdict().items()}
        result.traced = totals["sessions"]
        shed = SHED_RE.search(err)
        if shed is not None:
            result.spans_shed = int(shed.group(1))
        result.events_lost = totals["events_lost"]
        result.parse_errors = totals["parse_errors"]
        result.segments = totals["segments"]
        if self.out.exists():
            result.output_bytes = self.out.stat().st_size
            self.out.unlink()
        return usage


class TsharkTracer(Tracer):
    name = "tshark"

    def __init__(self, env: Env, protocol: str = "http1") -> None:
        super().__init__(env)
        self.err = env.tmp / "tshark.stderr"
        self.out = env.tmp / "tshark.out"
        port = env.port_spec(protocol)[0]
        if protocol == "http1":
            decode = ["-Y", "http.response", "-T", "fields", "-e", "http.response.code"]
        else:
            # HTTP/2 (gRPC too) on its port: each response head, decoded by HPACK.
            decode = ["-d", f"tcp.port=={port},http2", "-Y", "http2.headers.status",
                      "-T", "fields", "-e", "http2.headers.status"]
        argv = ["tshark", "-n", "-i", env.server.host_ifname, "-f", f"tcp port {port}", *decode]
        self.proc = env.topo.spawn(env.topo.node_ns, argv, stdout=self.out.open("wb"),
                                   stderr=self.err.open("wb"))
        _wait_for_line(self.proc, self.err, "Capturing on", "tshark")

    def stop(self, result: RunResult) -> resource.struct_rusage | None:
        assert self.proc is not None
        usage = _stop(self.proc, "tshark")
        decoded = 0
        with self.out.open("rb") as f:
            for line in f:
                line = line.strip()
                if line:
                    decoded += line.count(b",") + 1
        result.traced = decoded
        err = self.err.read_text(errors="replace")
        dropped = re.findall(r"(\d+) packets? dropped", err)
        result.events_lost = sum(int(d) for d in dropped)
        result.output_bytes = self.out.stat().st_size
        self.out.unlink()
        return usage


def _settle(sample: Callable[[], float], quiet_cpu_s: float = 0.02,
            window_s: float = 0.5) -> float:
    """Wait until the tracer spends <= ``quiet_cpu_s`` per ``window_s``; return the wait."""
    t0 = time.monotonic()
    time.sleep(window_s)
    prev = sample()
    while time.monotonic() - t0 < SETTLE_CAP:
        time.sleep(window_s)
        cur = sample()
        if cur - prev <= quiet_cpu_s:
            break
        prev = cur
    return time.monotonic() - t0


@contextlib.contextmanager
def _maybe_bpf_stats(on: bool) -> Iterator[None]:
    if on:
        with bpf_stats_enabled():
            yield
    else:
        yield


# --- one run ---------------------------------------------------------------------------


def run_client(env: Env, workload: Workload) -> tuple[ClientResult, float]:
    mix = env.mix_script() if workload.rate is None else None
    argv = workload.argv(env.target(workload.protocol), env.duration, mix)
    t0 = time.monotonic()
    proc = env.topo.run(env.client.netns, argv, check=False, timeout=env.duration + 120)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return parse(workload.tool, proc.stdout), wall


def run_one(env: Env, workload: Workload, scenario: str, *,
            clovisor: tuple[str, tuple[str, ...]] = (sys.executable, ())) -> RunResult:
    """Run ``workload`` once under ``scenario``; every process started here is stopped.

    ``clovisor`` is the Python that runs ``clovisor trace`` and its extra flags.
    """
    variant = env.variant(scenario)
    if scenario not in SCENARIOS and variant is None:
        raise ValueError(scenario)
    traced_by_clovisor = scenario == "clovisor" or variant is not None
    with _maybe_bpf_stats(traced_by_clovisor):
        tracer: Tracer | None = None
        try:
            protocol = workload.protocol
            if traced_by_clovisor:
                tracer = ClovisorTracer(env, clovisor[1], variant, clovisor[0], protocol)
            elif scenario == "tshark":
                tracer = TsharkTracer(env, protocol)
            before_cpu = tracer.sample().cpu_s if tracer else 0.0
            before_req = env.server_requests(protocol)
            before_404 = env.served_missing()
            load = loadavg()
            jiffies = cpu_jiffies()
            client, wall = run_client(env, workload)
            busy = busy_cores(jiffies, cpu_jiffies())
            settle, after = 0.0, None
            if tracer is not None:
                settle = _settle(lambda: tracer.sample().cpu_s)
                after = tracer.sample()
            after_req = env.server_requests(protocol)
            result = RunResult(
                workload=workload.name, label=workload.label, scenario=scenario,
                offered_rps=workload.rate, keepalive=workload.keepalive, tool=workload.tool,
                protocol=protocol,
                duration_s=env.duration, requests=client.requests,
                client_errors=client.errors, non_2xx=client.non_2xx,
                achieved_rps=client.rps, p50_ms=client.p50_ms, p99_ms=client.p99_ms,
                latency_resolution_ms=client.latency_resolution_ms,
                # stub_status counts its own request in each answer
                server_requests=after_req - before_req - (protocol != "grpc"),
                server_404=env.served_missing() - before_404,
                machine_busy_cores=busy, loadavg_before=load,
            )
            if tracer is not None and after is not None:
                tracer.kernel(result)
                if isinstance(tracer, ClovisorTracer):
                    tracer.scrape(result)
                usage = tracer.stop(result)
                # CPU until the tracer went quiet; if it never did (a backlog
                # past SETTLE_CAP), its lifetime CPU from wait4 (which covers
                # the rest of the drain, and dumpcap for tshark) minus start-up.
                settled = after.cpu_s - before_cpu
                cpu = settled
                peak_kib = after.hwm_kib
                if usage is not None:
                    lifetime = usage.ru_utime + usage.ru_stime - before_cpu
                    result.cpu_s_lifetime = lifetime
                    if settle >= SETTLE_CAP:
                        cpu = max(settled, lifetime)
                    peak_kib = max(peak_kib, usage.ru_maxrss)
                result.cpu_s = cpu
                result.cpu_s_at_settle = settled
                result.settle_s = settle
                result.tracer_pids = after.pids
                result.peak_rss_mib = peak_kib / 1024
                if client.requests:
                    result.cpu_s_per_1k_req = cpu / client.requests * 1e3
                    result.cpu_us_per_req = cpu / client.requests * 1e6
                result.cpu_core_pct = 100 * cpu / wall if wall > 0 else None
                if result.traced is not None:
                    if client.requests:
                        result.completeness = result.traced / client.requests
                    if result.server_requests > 0:
                        result.completeness_server = result.traced / result.server_requests
            return result
        finally:
            if tracer is not None:
                tracer.close()
