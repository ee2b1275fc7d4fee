"""``python -m bench.run``: Clovisor's overhead and capacity next to no tracing and tshark.

One namespace node, an nginx pod and a client pod (``clovisor.topology``).
For every workload (hey at fixed offered rates with keep-alive and with a
connection per request, wrk unthrottled) the same traffic runs three times:

- ``untraced``: the baseline;
- ``clovisor``: ``clovisor trace`` on the server pod's host veth in the node
  namespace, exporting OTLP/JSON to a local file, with
  ``kernel.bpf_stats_enabled=1`` for the run (the old value is restored);
- ``tshark``: ``tshark -i <veth> -f 'tcp port P' -Y http.response -T fields
  -e http.response.code`` in the node namespace, counting the responses it
  decoded.

``--variant NAME=VAR=VALUE[,VAR=VALUE...]`` adds a scenario ``clovisor:NAME``:
the tracer with those environment variables (``CLOVISOR_PURE_PYTHON=1``, the
interpreted build). ``--variant NAME=@REV`` runs a git revision of this
repository instead (checked out in a temporary worktree, its eBPF object
built there, pure Python). Each lever's before and after is then measured in
one run, on the same machine state.

The unthrottled (wrk) workloads ask for a 404 path every tenth request; the
tracer's RED metrics (``--metrics``, scraped after each run) must count what
nginx answered, per status code.

It prints a table and the targets with a verdict each, writes
``bench/results/<timestamp>.json`` and a PNG plot, and after a full run
``bench/results/latest.{png,md}``.  ``--smoke`` is a few seconds: one low
rate, untraced and clovisor only (``tests/test_bench_smoke.py``).

Everything it creates (namespaces, veths, hooks, processes) goes away at the
end, also on errors and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from clovisor.topology import Topology

from . import nginx, report
from .clients import PROTOCOLS, Workload, fixed, grpc, h2, unthrottled
from .procstat import loadavg
from .scenarios import SCENARIOS, BenchError, Env, RunResult, Variant, run_client, run_one

RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("nginx", "hey", "wrk", "tshark", "bpftool", "ip")


def workloads(rates: Sequence[int], close_rates: Sequence[int], with_max: bool,
              protocols: Sequence[str] = ("http1",), h2_rates: Sequence[int] = (),
              grpc_rates: Sequence[int] = ()) -> list[Workload]:  # fmt: skip
    out: list[Workload] = []
    if "http1" in protocols:
        out += [fixed(r, keepalive=True) for r in rates]
        out += [fixed(r, keepalive=False) for r in close_rates]
        if with_max:
            out += [unthrottled(keepalive=True), unthrottled(keepalive=False)]
    if "http2" in protocols:
        out += [h2(r) for r in h2_rates]
    if "grpc" in protocols:
        out += [grpc(r) for r in grpc_rates]
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: one low rate, untraced + clovisor, no latest.* update")
    p.add_argument("--rates", type=int, nargs="+", default=None,
                   help="keep-alive offered rates, req/s (default 1000 5000 10000 20000)")
    p.add_argument("--close-rates", type=int, nargs="*", default=None,
                   help="connection-per-request offered rates (default 1000)")
    p.add_argument("--no-max", action="store_true", help="skip the unthrottled wrk workloads")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=None,
                   help="which workloads: http1 (hey, wrk), http2 (h2load against nginx's "
                        "h2c port, declared http2), grpc (unary calls, declared grpc); "
                        "default all of them (smoke: http1)")
    p.add_argument("--h2-rates", type=int, nargs="*", default=None,
                   help="HTTP/2 offered rates, req/s (default 1000 5000)")
    p.add_argument("--grpc-rates", type=int, nargs="*", default=None,
                   help="gRPC offered rates, calls/s (default 1000)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of traffic per run (default 10, smoke 2)")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=None)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                   help="also run clovisor as NAME: SPEC is VAR=VALUE[,VAR=VALUE...] "
                        "or @REV (a git revision)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--no-latest", action="store_true",
                   help="do not update results/latest.{png,md}")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.rates = args.rates or [300]
        args.close_rates = args.close_rates if args.close_rates is not None else []
        args.no_max = True
        args.duration = args.duration or 2.0
        args.scenarios = args.scenarios or ["untraced", "clovisor"]
        args.no_latest = True
        args.protocols = args.protocols or ["http1"]
        args.h2_rates = args.h2_rates if args.h2_rates is not None else [300]
        args.grpc_rates = args.grpc_rates if args.grpc_rates is not None else [100]
    else:
        args.rates = args.rates if args.rates is not None else [1000, 5000, 10000, 20000]
        args.close_rates = args.close_rates if args.close_rates is not None else [1000]
        args.duration = args.duration or 10.0
        args.scenarios = args.scenarios or list(SCENARIOS)
        args.protocols = args.protocols or list(PROTOCOLS)
        args.h2_rates = args.h2_rates if args.h2_rates is not None else [1000, 5000]
        args.grpc_rates = args.grpc_rates if args.grpc_rates is not None else [1000]
    return args


def _variant(spec: str, tmp: Path) -> Variant:
    """Parse ``NAME=VAR=VALUE,...`` or ``NAME=@REV`` (preparing REV's tree under ``tmp``)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.isidentifier() or not rest:
        raise BenchError(f"--variant {spec!r}: expected NAME=VAR=VALUE[,...] or NAME=@REV")
    if rest.startswith("@"):
        repo = Path(__file__).resolve().parent.parent
        tree = tmp / f"rev-{name}"
        for argv in (["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rest[1:]],
                     ["make", "-C", str(tree), "bpf"]):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BenchError(f"--variant {spec!r}: {' '.join(argv)}: {proc.stderr.strip()}")
        return Variant(name, (("CLOVISOR_PURE_PYTHON", "1"),), tree / "src")
    pairs = []
    for item in rest.split(","):
        var, eq, value = item.partition("=")
        if not eq or not var:
            raise BenchError(f"--variant {spec!r}: {item!r} is not VAR=VALUE")
        pairs.append((var, value))
    return Variant(name, tuple(pairs))


def _drop_trees(variants: Sequence[Variant]) -> None:
    repo = Path(__file__).resolve().parent.parent
    for v in variants:
        if v.source is not None:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force",
                            str(v.source.parent)], capture_output=True, check=False)


def _preflight(scenarios: Sequence[str], protocols: Sequence[str] = ("http1",)) -> None:
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (network namespaces, eBPF)")
    need = [t for t in TOOLS if t != "tshark" or "tshark" in scenarios]
    if "http2" in protocols:
        need.append("h2load")
    missing = [t for t in need if shutil.which(t) is None
               and not any(os.access(f"{d}/{t}", os.X_OK) for d in ("/usr/sbin", "/sbin"))]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (run `make setup`)")


def _on_term(signum: int, _frame: FrameType | None) -> None:
    # Unwinds through the context managers: hooks, processes, namespaces, sysctl.
    raise SystemExit(128 + signum)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    wls = workloads(args.rates, args.close_rates, not args.no_max, args.protocols,
                    args.h2_rates, args.grpc_rates)
    started = dt.datetime.now(dt.UTC)
    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="clvbench-") as tmpdir, \
            Topology(prefix="clvb", pods=("web", "client")) as topo:
        tmp = Path(tmpdir)
        variants: list[Variant] = []
        try:
            for spec in args.variant:
                variants.append(_variant(spec, tmp))
            runs = _bench_in(args, wls, topo, tmp, tuple(variants))
        finally:
            _drop_trees(variants)
    run_dicts = [r.as_dict() for r in runs]
    return {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "smoke": bool(args.smoke),
        "duration_s": args.duration,
        "machine": report.machine(),
        "loadavg_start": load_start,
        "protocols": list(args.protocols),
        "workloads": [asdict(w) | {"label": w.label, "tool": w.tool} for w in wls],
        "scenarios": [*args.scenarios, *(v.scenario for v in variants)],
        "variants": {v.scenario: {"env": dict(v.env), "revision": next(
            (s.partition("=@")[2] for s in args.variant if s.startswith(v.name + "=@")), None)}
            for v in variants},
        "runs": run_dicts,
        "targets": [asdict(t) for t in report.evaluate(run_dicts)],
    }


def _bench_in(args: argparse.Namespace, wls: Sequence[Workload], topo: Topology, tmp: Path,
              variants: tuple[Variant, ...]) -> list[RunResult]:
    runs: list[RunResult] = []
    conf = nginx.write_conf(tmp / "nginx")
    web, client = topo.pods["web"], topo.pods["client"]
    topo.spawn(web.netns, nginx.argv(conf), stdout=subprocess.DEVNULL,
               stderr=(tmp / "nginx" / "stderr.log").open("wb"))
    try:
        topo.wait_for_port(client.netns, web.ipv4, nginx.PORT, timeout=10)
        topo.wait_for_port(topo.node_ns, web.ipv4, nginx.STATUS_PORT, timeout=10)
    except TimeoutError:
        log = tmp / "nginx" / "error.log"
        raise BenchError("nginx did not start: "
                         + (log.read_text() if log.exists() else "(no log)")) from None
    env = Env(topo, web, client, tmp, args.duration, tmp / "nginx", variants)
    if "grpc" in args.protocols:
        env.start_grpc_server()
    if not args.smoke and "http1" in args.protocols:  # warm up nginx, client, page cache
        run_client(Env(topo, web, client, tmp, 1.0), unthrottled())
    for w in wls:
        for scen in [*args.scenarios, *(v.scenario for v in variants)]:
            t0 = time.monotonic()
            r = run_one(env, w, scen)
            runs.append(r)
            comp = f"{100 * r.completeness:.2f} %" if r.completeness is not None else "-"
            cpu = f"{r.cpu_us_per_req:.1f} µs/req" if r.cpu_us_per_req is not None else "-"
            print(f"bench: {w.label:>20} {scen:>9}: {r.requests:,} requests "
                  f"({r.achieved_rps:,.0f}/s), traced {r.traced}, completeness {comp}, "
                  f"CPU {cpu} [{time.monotonic() - t0:.1f}s]", file=sys.stderr, flush=True)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    try:
        _preflight(args.scenarios, args.protocols)
        result = bench(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    targets = [report.Target(**t) for t in result["targets"]]
    print(f"machine: {report.machine_line(result['machine'])}")
    print(report.text_table(result["runs"]))
    print("targets (ratios against the untraced baseline of this run):")
    print(report.targets_text(targets))

    out_dir: Path = args.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["started"].replace(":", "").replace("-", "")
    json_path = out_dir / f"{stamp}{'-smoke' if args.smoke else ''}.json"
    report.write_json(result, json_path)
    result_paths = [json_path]
    if not args.no_plot:
        png = json_path.with_suffix(".png")
        report.plot(result, png)
        result_paths.append(png)
        if not args.no_latest:
            shutil.copyfile(png, out_dir / "latest.png")
            result_paths.append(out_dir / "latest.png")
    if not args.no_latest:
        (out_dir / "latest.md").write_text(report.markdown(result))
        result_paths.append(out_dir / "latest.md")
    print("wrote " + ", ".join(str(p) for p in result_paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
