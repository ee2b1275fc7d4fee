"""``python -m bench.pairing``: the kernel-pairing lever on its own, before and after.

nginx and hey as in ``bench.run``; ``clovisor trace`` in up to three variants,
each workload run once per variant per round, the rounds interleaved so that
a busy moment of the shared machine hits every variant alike:

- ``before``: another checkout's Python (``--before``, e.g. main's
  ``.venv/bin/python``), as it is;
- ``segments``: this checkout with ``--no-kernel-pairing`` (every segment crosses);
- ``paired``: this checkout as it is.

For each run it prints the kernel's ns per packet and BPF runs per request
(``kernel.bpf_stats_enabled=1`` during the runs, restored after), the
tracer's CPU per request, completeness and the load average before it.
Nothing is written to ``bench/results``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from clovisor.topology import Topology

from . import nginx
from .clients import Workload, fixed
from .run import _preflight
from .scenarios import BenchError, Env, RunResult, run_client, run_one


def _variants(before: str | None, extra: Sequence[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    if before:
        out["before"] = (before, ())
    out["segments"] = (sys.executable, ("--no-kernel-pairing",))
    out["paired"] = (sys.executable, ())
    for spec in extra:
        name, _, flags = spec.partition("=")
        out[name] = (sys.executable, tuple(flags.split()))
    return out


def _line(variant: str, w: Workload, r: RunResult) -> str:
    ns = f"{r.kernel_ns_per_run:.0f}" if r.kernel_ns_per_run else "-"
    runs = f"{r.kernel_runs_per_req:.2f}" if r.kernel_runs_per_req else "-"
    cpu = f"{r.cpu_us_per_req:.1f}" if r.cpu_us_per_req is not None else "-"
    comp = f"{100 * r.completeness:.2f}" if r.completeness is not None else "-"
    progs = " ".join(f"{name.removeprefix('clv_tc_')} {v[0]:.0f} ns x {v[1]:.2f}"
                     for name, v in sorted((r.kernel_by_prog or {}).items()))
    return (f"{w.label:>18} {variant:>9}: {ns:>5} ns/pkt, {runs:>5} pkt/req ({progs}), "
            f"{cpu:>6} µs/req, completeness {comp} %, {r.requests:,} req, "
            f"load {r.loadavg_before:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pairing",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--before", metavar="PYTHON",
                   help="the Python of another checkout to compare with (its own venv)")
    p.add_argument("--rates", type=int, nargs="*", default=[5000],
                   help="keep-alive offered rates, req/s (default 5000)")
    p.add_argument("--close-rates", type=int, nargs="*", default=[1000],
                   help="connection-per-request offered rates (default 1000)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="another variant of this checkout: clovisor trace with these flags")
    p.add_argument("--only", nargs="*", default=None, metavar="NAME",
                   help="run only these variants")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    args = p.parse_args(argv)
    wls = [fixed(r, keepalive=True) for r in args.rates]
    wls += [fixed(r, keepalive=False) for r in args.close_rates]
    variants = _variants(args.before, args.variant)
    if args.only is not None:
        variants = {k: v for k, v in variants.items() if k in args.only}
    results: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    try:
        _preflight(["clovisor"])
        with tempfile.TemporaryDirectory(prefix="clvpair-") as tmpdir, \
                Topology(prefix="clvp", pods=("web", "client")) as topo:
            tmp = Path(tmpdir)
            conf = nginx.write_conf(tmp / "nginx")
            web, client = topo.pods["web"], topo.pods["client"]
            topo.spawn(web.netns, nginx.argv(conf), stdout=subprocess.DEVNULL,
                       stderr=(tmp / "nginx" / "stderr.log").open("wb"))
            topo.wait_for_port(client.netns, web.ipv4, nginx.PORT, timeout=10)
            topo.wait_for_port(topo.node_ns, web.ipv4, nginx.STATUS_PORT, timeout=10)
            env = Env(topo, web, client, tmp, args.duration)
            run_client(Env(topo, web, client, tmp, 1.0), fixed(1000))  # warm up
            for rnd in range(args.rounds):
                for w in wls:
                    for name, variant in variants.items():
                        r = run_one(env, w, "clovisor", clovisor=variant)
                        results[w.label, name].append(r)
                        print(f"round {rnd + 1}: {_line(name, w, r)}", flush=True)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print("medians over the rounds:")
    for w in wls:
        for name in variants:
            runs = results[w.label, name]
            ns = [r.kernel_ns_per_run for r in runs if r.kernel_ns_per_run]
            cpu = [r.cpu_us_per_req for r in runs if r.cpu_us_per_req is not None]
            print(f"{w.label:>18} {name:>9}: "
                  f"{statistics.median(ns) if ns else float('nan'):.0f} ns/pkt "
                  f"(runs: {', '.join(f'{x:.0f}' for x in ns)}), "
                  f"{statistics.median(cpu) if cpu else float('nan'):.1f} µs/req")
    return 0


if __name__ == "__main__":
    sys.exit(main())
