"""Results: the machine, the targets and whether each is met, the table, JSON, Markdown, PNG."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Run = dict[str, Any]

# --- the machine ---------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _pkg_version(pkg: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "not installed"


def machine() -> dict[str, Any]:
    uname = os.uname()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": uname.release,
        "arch": uname.machine,
        "mem_total_mib": _mem_total_mib(),
        "python": platform.python_version(),
        "packages": {p: _pkg_version(p)
                     for p in ("nginx-light", "wrk", "hey", "tshark", "nghttp2-client")},
    }


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['nproc']} vCPU {m['cpu_model']}, Linux {m['kernel']}, "
            f"{m['mem_total_mib'] / 1024:.0f} GiB, Python {m['python']}")


# --- targets ---------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return {True: "MET", False: "MISSED", None: "n/a"}[self.met]


def _by(runs: Iterable[Run], scenario: str) -> dict[str, Run]:
    return {r["workload"]: r for r in runs if r["scenario"] == scenario}


def completeness(r: Run) -> float | None:
    """The stricter of sessions/client requests and sessions/server requests."""
    vals = [v for v in (r.get("completeness"), r.get("completeness_server")) if v is not None]
    return min(vals) if vals else None


def p99_overhead(r: Run, base: Run | None) -> float | None:
    if base is None or not r.get("p99_ms") or not base.get("p99_ms"):
        return None
    return float(r["p99_ms"]) / float(base["p99_ms"]) - 1.0


def evaluate(runs: Sequence[Run]) -> list[Target]:
    clv, tsh, base = _by(runs, "clovisor"), _by(runs, "tshark"), _by(runs, "untraced")
    targets: list[Target] = []

    ka = [r for r in clv.values()
          if r["keepalive"] and r["offered_rps"] is not None and r["offered_rps"] <= 10_000]
    comp = [(r["label"], completeness(r)) for r in ka]
    comp_ok = [(lbl, c) for lbl, c in comp if c is not None]
    if comp_ok:
        worst = min(comp_ok, key=lambda x: x[1])
        targets.append(Target(
            "completeness", ">= 99.9 % up to 10k req/s keep-alive",
            "worst " + f"{100 * worst[1]:.3f} % at {worst[0]} ("
            + ", ".join(f"{lbl}: {100 * c:.3f} %" for lbl, c in comp_ok) + ")",
            worst[1] >= 0.999))
    else:
        targets.append(Target("completeness", ">= 99.9 % up to 10k req/s keep-alive",
                              "not measured", None))

    r5 = clv.get("ka-5000")
    if r5 is not None and r5.get("cpu_core_pct") is not None:
        targets.append(Target("tracer CPU at 5k req/s", "<= 25 % of one core",
                              f"{r5['cpu_core_pct']:.1f} % ({r5['cpu_us_per_req']:.1f} µs/req)",
                              r5["cpu_core_pct"] <= 25.0))
    else:
        targets.append(Target("tracer CPU at 5k req/s", "<= 25 % of one core",
                              "not measured", None))

    over = [(r["label"], p99_overhead(r, base.get(w)))
            for w, r in clv.items() if r["offered_rps"] is not None]
    over_ok = [(lbl, o) for lbl, o in over if o is not None]
    if over_ok:
        worst_o = max(over_ok, key=lambda x: x[1])
        targets.append(Target(
            "p99 latency overhead", "<= 5 % vs untraced (fixed offered rates)",
            f"worst {100 * worst_o[1]:+.1f} % at {worst_o[0]} ("
            + ", ".join(f"{lbl}: {100 * o:+.1f} %" for lbl, o in over_ok) + ")",
            worst_o[1] <= 0.05))
    else:
        targets.append(Target("p99 latency overhead", "<= 5 % vs untraced", "not measured", None))

    kns = [(r["label"], r["kernel_ns_per_run"]) for r in clv.values()
           if r.get("kernel_ns_per_run") is not None]
    if kns:
        worst_k = max(kns, key=lambda x: x[1])
        targets.append(Target("in-kernel time", "<= 150 ns per packet",
                              f"worst {worst_k[1]:.0f} ns at {worst_k[0]} "
                              f"(best {min(k for _, k in kns):.0f} ns)",
                              worst_k[1] <= 150.0))
    else:
        targets.append(Target("in-kernel time", "<= 150 ns per packet", "not measured", None))

    rss = [r["peak_rss_mib"] for r in clv.values() if r.get("peak_rss_mib") is not None]
    targets.append(Target("tracer peak RSS", "<= 150 MB",
                          f"{max(rss) * 1.048576:.0f} MB ({max(rss):.0f} MiB)" if rss
                          else "not measured",
                          (max(rss) * 1.048576 <= 150.0) if rss else None))

    ratios = []
    for w, r in clv.items():
        t = tsh.get(w)
        if (r["offered_rps"] is not None and t is not None and r.get("cpu_us_per_req")
                and t.get("cpu_us_per_req")):
            ratios.append((r["label"], r["cpu_us_per_req"] / t["cpu_us_per_req"]))
    if ratios:
        worst_r = max(ratios, key=lambda x: x[1])
        targets.append(Target(
            "CPU per request vs tshark", "<= 0.5 x tshark's (fixed offered rates)",
            f"worst {worst_r[1]:.2f} x at {worst_r[0]} ("
            + ", ".join(f"{lbl}: {x:.2f} x" for lbl, x in ratios) + ")",
            worst_r[1] <= 0.5))
    else:
        targets.append(Target("CPU per request vs tshark", "<= 0.5 x tshark's",
                               "not measured", None))
    return targets


# --- the table -------------------------------------------------------------------------

COLUMNS = (
    ("workload", "workload"), ("scenario", "scenario"), ("req/s", "achieved_rps"),
    ("requests", "requests"), ("server", "server_requests"), ("traced", "traced"),
    ("compl.", "completeness"), ("compl.srv", "completeness_server"),
    ("lost", "events_lost"), ("CPU µs/req", "cpu_us_per_req"),
    ("CPU µs/traced", "cpu_us_per_traced"),
    ("CPU s/1k", "cpu_s_per_1k_req"), ("core %", "cpu_core_pct"),
    ("RSS MiB", "peak_rss_mib"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
    ("p99 vs base", "p99_overhead"), ("rps vs base", "rps_ratio"),
    ("kernel ns/pkt", "kernel_ns_per_run"), ("busy cores", "machine_busy_cores"),
)


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("completeness", "completeness_server"):
        return f"{100 * v:.2f} %"
    if key in ("p99_overhead",):
        return f"{100 * v:+.1f} %"
    if key == "rps_ratio":
        return f"{v:.3f}"
    if key in ("achieved_rps", "kernel_ns_per_run"):
        return f"{v:,.0f}"
    if key in ("cpu_us_per_req", "cpu_us_per_traced", "cpu_core_pct", "peak_rss_mib"):
        return f"{v:.1f}"
    if key == "cpu_s_per_1k_req":
        return f"{v:.4f}"
    if key in ("p50_ms", "p99_ms", "machine_busy_cores"):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def cpu_per_traced(r: Run) -> float | None:
    """CPU per session (or response) the tracer reported: past capacity, CPU per
    request only says how little of the traffic it got to."""
    cpu, traced = r.get("cpu_s"), r.get("traced")
    return cpu / traced * 1e6 if cpu is not None and traced else None


def rows(runs: Sequence[Run]) -> list[list[str]]:
    base = _by(runs, "untraced")
    out = []
    for r in runs:
        b = base.get(r["workload"])
        extra = {
            "workload": r["label"],
            "p99_overhead": p99_overhead(r, b) if r["scenario"] != "untraced" else None,
            "rps_ratio": (r["achieved_rps"] / b["achieved_rps"]
                          if b and b["achieved_rps"] and r["scenario"] != "untraced" else None),
            "cpu_us_per_traced": cpu_per_traced(r),
        }
        out.append([_fmt(k, extra[k] if k in extra else r.get(k)) for _, k in COLUMNS])
    return out


def text_table(runs: Sequence[Run]) -> str:
    head = [h for h, _ in COLUMNS]
    body = rows(runs)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def targets_text(targets: Sequence[Target]) -> str:
    w = max(len(t.name) for t in targets)
    return "\n".join(f"  [{t.verdict:>6}] {t.name.ljust(w)}  goal {t.goal}; measured {t.measured}"
                     for t in targets)


def markdown(result: dict[str, Any]) -> str:
    runs, targets = result["runs"], [Target(**t) for t in result["targets"]]
    head = [h for h, _ in COLUMNS]
    md = [
        "# Clovisor benchmark: latest full run",
        "",
        f"- when: {result['started']}; {result['duration_s']:g} s per run",
        f"- machine: {machine_line(result['machine'])}",
        "- server: nginx-light (1 worker, fixed 17-byte body) in one pod; clients in another;"
        " tracers on the server pod's host veth in the node namespace",
        "- clients: hey at fixed offered rates, wrk unthrottled (`max`);"
        " `conn/req` = a new TCP connection per request",
        "- compl. = traced / requests completed by the client;"
        " compl.srv = traced / requests nginx answered (stub_status)",
        "- CPU = utime+stime of the tracer (tshark: with dumpcap) from just before the client"
        " starts until it has drained (went quiet; if not within 30 s, until it exited);"
        " core % = CPU / client run time;"
        " CPU µs/req = CPU / requests; CPU µs/traced = CPU / traced",
        "- kernel ns/pkt = run_time_ns / run_cnt of clv_tc_ingress + clv_tc_egress"
        " (kernel.bpf_stats_enabled=1 during the clovisor runs only)",
        "- busy cores = the whole machine's busy CPUs while the client ran"
        f" ({result['machine']['nproc']} in all); other tenants' work shows up there;"
        f" load average at the start: {result.get('loadavg_start', 'n/a')}",
        "",
        "## Targets",
        "",
        "| target | goal | measured | verdict |",
        "|---|---|---|---|",
        *(f"| {t.name} | {t.goal} | {t.measured} | **{t.verdict}** |" for t in targets),
        "",
        "## Runs",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows(runs)),
        "",
        "![plot](latest.png)",
        "",
    ]
    return "\n".join(md)


# --- the plot --------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    base = _by(runs, "untraced")

    def x_of(r: Run) -> float:
        if r["offered_rps"] is not None:
            return float(r["offered_rps"])
        b = base.get(r["workload"])
        return float(b["achieved_rps"] if b else r["achieved_rps"])

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    colors = {"untraced": "tab:gray", "clovisor": "tab:blue", "tshark": "tab:red"}
    def cpu(r: Run) -> float | None:
        v = r.get("cpu_us_per_req")
        return None if v is None else float(v)

    def comp(r: Run) -> float | None:
        c = completeness(r)
        return None if c is None else 100 * c

    def p99(r: Run) -> float | None:
        v = r.get("p99_ms")
        return None if v is None else float(v)

    panels: tuple[tuple[str, Callable[[Run], float | None], tuple[str, ...]], ...] = (
        ("tracer CPU per request (µs)", cpu, ("clovisor", "tshark")),
        ("completeness (%)", comp, ("clovisor", "tshark")),
        ("client p99 latency (ms)", p99, ("untraced", "clovisor", "tshark")),
    )
    for ax, (title, get, scenarios) in zip(axes, panels, strict=True):
        for scen in scenarios:
            for keepalive, style, marker in ((True, "-", "o"), (False, "--", "s")):
                pts = sorted((x_of(r), get(r)) for r in runs
                             if r["scenario"] == scen and r["keepalive"] == keepalive
                             and get(r) is not None)
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker,
                        color=colors[scen],
                        label=f"{scen} ({'keep-alive' if keepalive else 'conn/req'})")
        ax.set_xscale("log")
        ax.set_xlabel("offered rate, req/s (unthrottled: baseline throughput)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(50, color="tab:blue", lw=0.8, ls=":")
    axes[0].set_yscale("log")
    axes[1].axhline(99.9, color="tab:green", lw=0.8, ls=":")
    axes[2].set_yscale("log")
    fig.suptitle(f"Clovisor vs tshark vs untraced — {machine_line(result['machine'])} — "
                 f"{result['started']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, default=lambda o: asdict(o)) + "\n")
