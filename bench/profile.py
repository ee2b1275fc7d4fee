"""``python -m bench.profile``: where the tracer's CPU goes at a fixed request rate.

Same topology, nginx and tracer as ``bench.run``; hey offers ``--rate``
req/s keep-alive for ``--duration`` seconds while

- ``py-spy record --native --format raw`` samples the ``clovisor trace``
  process (the middle of the run, past start-up), and
- optionally ``perf record -a -g`` samples the whole machine for the
  kernel side (the classifier shows as ``bpf_prog_<tag>_clv_tc_*``).

The collapsed stacks are summarised per stage: ring callback and record
decoding, tracker (reassembly, HTTP/1 framing, sessions), span conversion,
OTLP/JSON encoding and writing, inter-thread pipes, other.  Needs py-spy
in the virtualenv (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from clovisor.topology import Topology

from . import nginx
from .clients import fixed
from .procstat import CLK_TCK, cpu_seconds
from .scenarios import ClovisorTracer, Env, run_client

# (stage, substrings of a frame; first stage whose pattern appears in the stack, leaf first)
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("json encode + write", ("otlp_json.py", "otlp_encode.py", "json/encoder", "_io.")),
    ("span conversion", ("export/spans.py", "export/ids.py", "opentelemetry/sdk",
                         "clock.py", "_spans (clovisor/pipeline.py")),
    ("tracker: http1 framing", ("core/http1.py",)),
    ("tracker: reassembly", ("core/reassembly.py",)),
    ("tracker: sessions", ("core/sessions.py",)),
    ("tracker: dispatch", ("core/tracker.py", "core/budget.py")),
    ("ring: decode records", ("abi.py", "_decode (clovisor/kernel/ringbuf.py")),
    ("ring: libbpf poll + callback", ("ringbuf.py", "libbpf.so", "ring_buffer__",
                                      "ringbuf_process_ring", "_ctypes", "libffi")),
    ("pipes / threads", ("stages.py", "threading.py", "queue.py")),
)


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # leaf first: the innermost known frame decides
        for stage, pats in STAGES:
            if any(p in frame for p in pats):
                return stage
    return "other"


def summarise(raw: Path, top: int = 25) -> str:
    """Per-stage and per-function (self) shares of a py-spy ``--format raw`` file."""
    stages: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        stages[classify(stack)] += count
        selfs[frames[-1]] += count
        threads[frames[0]] += count
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "by stage (innermost known frame):"]
    out += [f"  {100 * c / total:5.1f} %  {s}" for s, c in stages.most_common()]
    out += ["", "by thread (outermost frame):"]
    out += [f"  {100 * c / total:5.1f} %  {s}" for s, c in threads.most_common(8)]
    out += ["", f"top {top} leaf frames (self time):"]
    out += [f"  {100 * c / total:5.1f} %  {s}" for s, c in selfs.most_common(top)]
    return "\n".join(out)


def task_cpu(pid: int) -> dict[int, float]:
    """utime + stime per thread of ``pid``, seconds."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def thread_names(raw: Path) -> dict[int, str]:
    """``thread (tid): name`` labels of a py-spy ``--threads`` raw file."""
    names = {}
    for line in raw.read_text(errors="replace").splitlines():
        m = re.match(r"^thread \((\d+)\): ([^;]*)", line)
        if m:
            names[int(m.group(1))] = m.group(2)
    return names


def _pyspy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def profile(rate: int, duration: float, out: Path, perf: bool, native: bool,
            extra: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pyspy = _pyspy()
    with tempfile.TemporaryDirectory(prefix="clvprof-") as tmpdir, \
            Topology(prefix="clvp", pods=("web", "client")) as topo:
        tmp = Path(tmpdir)
        conf = nginx.write_conf(tmp / "nginx")
        web, client = topo.pods["web"], topo.pods["client"]
        topo.spawn(web.netns, nginx.argv(conf), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
        topo.wait_for_port(client.netns, web.ipv4, nginx.PORT)
        topo.wait_for_port(topo.node_ns, web.ipv4, nginx.STATUS_PORT)
        env = Env(topo, web, client, tmp, duration)
        tracer = ClovisorTracer(env, tuple(extra))
        try:
            work = fixed(rate)
            result: list[object] = []
            t = threading.Thread(target=lambda: result.append(run_client(env, work)))
            cpu0 = cpu_seconds(tracer.pid)
            t.start()
            time.sleep(1.0)  # past the ramp-up
            window = max(1.0, duration - 2.0)
            raw = out / "pyspy.raw"
            argv = [pyspy, "record", "--pid", str(tracer.pid), "--rate", "250",
                    "--duration", f"{window:g}", "--format", "raw", "-o", str(raw),
                    "--threads"]
            # --native needs the target stopped while its stacks are read; without
            # it, --gil keeps only the thread holding the GIL: Python CPU time.
            argv += ["--native"] if native else ["--nonblocking", "--gil"]
            procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                      stderr=(out / "pyspy.log").open("wb"))]
            if perf:
                procs.append(subprocess.Popen(
                    ["perf", "record", "-a", "-g", "-F", "999", "-o", str(out / "perf.data"),
                     "--", "sleep", f"{window:g}"],
                    stdout=subprocess.DEVNULL, stderr=(out / "perf.log").open("wb")))
            tasks0, w0 = task_cpu(tracer.pid), time.monotonic()
            for p in procs:
                p.wait()
            tasks1, w1 = task_cpu(tracer.pid), time.monotonic()
            t.join()
            cpu = cpu_seconds(tracer.pid) - cpu0
        finally:
            tracer.close()
    client_res = result[0] if result else None
    reqs = client_res[0].requests if isinstance(client_res, tuple) else 0
    summary = summarise(raw)
    names = thread_names(raw)
    per_task = []
    for tid, c1 in sorted(tasks1.items()):
        c = c1 - tasks0.get(tid, 0.0)
        if c > 0:
            us = 1e6 * c / ((w1 - w0) * rate)
            per_task.append(f"  thread {tid} {names.get(tid, '?'):>10}: {c:6.2f} s CPU "
                            f"= {100 * c / (w1 - w0):5.1f} % of a core, ~{us:5.1f} µs/request")
    head = (f"rate {rate}/s keep-alive, {duration:g} s; tracer CPU {cpu:.2f} s for {reqs} "
            f"requests = {1e6 * cpu / max(1, reqs):.1f} µs/request "
            f"({100 * cpu / duration:.0f} % of a core; includes py-spy's own disturbance)\n"
            f"per thread over the {w1 - w0:.1f} s sampling window "
            f"(/proc/<pid>/task/<tid>/stat):\n" + "\n".join(per_task))
    (out / "summary.txt").write_text(head + "\n\n" + summary + "\n")
    print(head)
    print(summary)
    if perf:
        print(f"perf data: {out / 'perf.data'} (perf report -i ... --no-children --sort sym)")


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path("/tmp/clovisor-profile"))
    p.add_argument("--perf", action="store_true", help="also perf record -a -g (kernel side)")
    p.add_argument("--no-native", action="store_true", help="py-spy without --native")
    p.add_argument("--summarise", type=Path, default=None,
                   help="only summarise an existing py-spy raw file")
    p.add_argument("tracer_args", nargs="*", help="extra `clovisor trace` arguments (after --)")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.summarise is not None:
        print(summarise(args.summarise))
        return 0
    profile(args.rate, args.duration, args.out, args.perf, not args.no_native, args.tracer_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
