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


# The in-kernel cost with a connection per request before the classifier
# paired exchanges (README, Measured, 2026-12-01): the worst of its runs.
CONN_PER_REQUEST_NS_BEFORE = 244.0


def red_error(r: Run) -> float | None:
    """The worst relative error of the RED request counts per status code
    against what nginx answered (200s and 404s)."""
    red = r.get("red_by_status")
    if red is None or not r.get("server_requests"):
        return None
    served = {"404": int(r.get("server_404") or 0)}
    served["200"] = int(r["server_requests"]) - served["404"]
    errors = [abs(red.get(code, 0) - n) / n for code, n in served.items() if n > 0]
    return max(errors) if errors else None


def _target(name: str, goal: str, value: float | None, measured: str, ok: bool | None) -> Target:
    return Target(name, goal, measured if value is not None else "not measured",
                  ok if value is not None else None)


def evaluate(runs: Sequence[Run]) -> list[Target]:
    """The cost issue's targets, each against this run's own baselines."""
    clv, tsh, base = _by(runs, "clovisor"), _by(runs, "tshark"), _by(runs, "untraced")
    targets: list[Target] = []
    for w, label in (("ka-5000", "5k keep-alive"), ("ka-20000", "20k keep-alive")):
        r, b = clv.get(w), base.get(w)
        cpu = r.get("cpu_us_per_req") if r else None
        targets.append(_target(f"{label}: tracer CPU", "<= 30 µs per request", cpu,
                               f"{cpu:.1f} µs/req" if cpu else "", bool(cpu and cpu <= 30.0)))
        comp = completeness(r) if r else None
        targets.append(_target(f"{label}: spans", ">= 99.9 % of requests", comp,
                               f"{100 * comp:.3f} %" if comp is not None else "",
                               comp is not None and comp >= 0.999))
        if w == "ka-5000":
            t = tsh.get(w)
            ratio = (cpu / t["cpu_us_per_req"]) if cpu and t and t.get("cpu_us_per_req") else None
            targets.append(_target(
                f"{label}: CPU vs tshark", "<= 0.5 x tshark's, same run", ratio,
                f"{ratio:.2f} x ({cpu:.1f} vs {t['cpu_us_per_req']:.1f} µs/req)"
                if ratio and t else "", ratio is not None and ratio <= 0.5))
            p99, p99b = (r or {}).get("p99_ms"), (b or {}).get("p99_ms")
            limit = 1.05 * p99b + 0.2 if p99b else None
            targets.append(_target(
                f"{label}: p99 latency", "<= untraced x 1.05 + 0.2 ms", p99 if limit else None,
                f"{p99:.2f} ms vs {p99b:.2f} ms untraced (limit {limit:.2f})"
                if p99 and p99b and limit else "", bool(p99 and limit and p99 <= limit)))
            kns = (r or {}).get("kernel_ns_per_run")
            targets.append(_target("in-kernel time at 5k keep-alive", "<= 300 ns per packet",
                                   kns, f"{kns:.0f} ns" if kns else "",
                                   bool(kns and kns <= 300.0)))
        else:
            ach, ach_b = (r or {}).get("achieved_rps"), (b or {}).get("achieved_rps")
            ratio = ach / ach_b if ach and ach_b else None
            targets.append(_target(
                f"{label}: client reaches its rate", ">= 90 % of untraced", ratio,
                f"{ratio:.3f} x ({ach:,.0f} vs {ach_b:,.0f} req/s)" if ratio and ach and ach_b
                else "", ratio is not None and ratio >= 0.9))
    close = [(r["label"], r["kernel_ns_per_run"]) for r in clv.values()
             if not r["keepalive"] and r.get("kernel_ns_per_run")]
    worst_c = max(close, key=lambda x: x[1]) if close else None
    targets.append(_target(
        "in-kernel time, conn/req", f"no regression (<= {CONN_PER_REQUEST_NS_BEFORE:.0f} ns)",
        worst_c[1] if worst_c else None,
        f"worst {worst_c[1]:.0f} ns at {worst_c[0]}" if worst_c else "",
        bool(worst_c and worst_c[1] <= CONN_PER_REQUEST_NS_BEFORE)))
    for r in (x for x in clv.values() if x["offered_rps"] is None):
        err = red_error(r)
        b = base.get(r["workload"])
        tput = (f"; throughput {r['achieved_rps']:,.0f} req/s vs {b['achieved_rps']:,.0f} "
                "untraced" if b else "")
        red = r.get("red_by_status") or {}
        targets.append(_target(
            f"{r['label']}: RED counts", "within 1 % of served, per status code", err,
            f"worst {100 * err:.2f} % off (200: {red.get('200', 0):,} of "
            f"{int(r['server_requests']) - int(r.get('server_404') or 0):,}; 404: "
            f"{red.get('404', 0):,} of {int(r.get('server_404') or 0):,}); spans shed "
            f"{r.get('spans_shed') if r.get('spans_shed') is not None else 'not reported'}"
            + tput if err is not None else "", err is not None and err <= 0.01))
    rss = [r["peak_rss_mib"] for r in clv.values() if r.get("peak_rss_mib") is not None]
    targets.append(_target("tracer peak RSS", "<= 150 MB", max(rss) if rss else None,
                           f"{max(rss) * 1.048576:.0f} MB ({max(rss):.0f} MiB)" if rss else "",
                           bool(rss) and max(rss) * 1.048576 <= 150.0))
    return targets


def levers(runs: Sequence[Run]) -> list[tuple[str, str, float | None, float | None]]:
    """(workload, variant, CPU µs/req of the variant, of clovisor) for every variant run."""
    clv = _by(runs, "clovisor")
    out = []
    for r in runs:
        if r["scenario"].startswith("clovisor:"):
            c = clv.get(r["workload"])
            out.append((r["label"], r["scenario"], r.get("cpu_us_per_req"),
                        c.get("cpu_us_per_req") if c else None))
    return out


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
    ("kernel ns/pkt", "kernel_ns_per_run"), ("RED off", "red_error"),
    ("shed", "spans_shed"), ("busy cores", "machine_busy_cores"),
)


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("completeness", "completeness_server", "red_error"):
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
            "red_error": red_error(r),
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
        *_levers_markdown(runs),
        "![plot](latest.png)",
        "",
    ]
    return "\n".join(md)


def _levers_markdown(runs: Sequence[Run]) -> list[str]:
    rows_ = levers(runs)
    if not rows_:
        return []
    out = ["## Levers: clovisor against its variants, same run", "",
           "| workload | variant | CPU µs/req, variant | CPU µs/req, clovisor | ratio |",
           "|---|---|---|---|---|"]
    for label, scen, v, c in rows_:
        ratio = f"{c / v:.2f} x" if v and c else "-"
        out.append(f"| {label} | {scen} | {_fmt('cpu_us_per_req', v)} | "
                   f"{_fmt('cpu_us_per_req', c)} | {ratio} |")
    return [*out, ""]


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
