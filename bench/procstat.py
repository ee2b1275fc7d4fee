"""What the benchmark reads about processes and BPF programs: CPU, peak RSS, run-time stats.

Everything comes from /proc of processes this benchmark started, and from
bpftool for the BPF programs those processes hold open, so concurrent test
runs on the same machine (with their own Clovisor programs loaded) do not
disturb the numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
OUR_PROGRAMS = ("clv_tc_ingress", "clv_tc_egress")


def descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant (through /proc/<pid>/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    # comm may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` value of /proc/<pid>/status (VmHWM, VmRSS), 0 when absent."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class TreeSample:
    cpu_s: float  # utime + stime over the process and its live descendants
    hwm_kib: int  # sum of VmHWM over the same processes
    pids: tuple[int, ...]


def sample_tree(pid: int) -> TreeSample:
    pids = descendants(pid)
    return TreeSample(
        cpu_s=sum(cpu_seconds(p) for p in pids),
        hwm_kib=sum(status_kib(p, "VmHWM") for p in pids),
        pids=tuple(pids),
    )


# --- BPF run-time statistics ---------------------------------------------------------


@contextlib.contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    """``kernel.bpf_stats_enabled=1`` for the with-block; the old value comes back after."""
    old = BPF_STATS_SYSCTL.read_text().strip()
    BPF_STATS_SYSCTL.write_text("1\n")
    try:
        yield
    finally:
        BPF_STATS_SYSCTL.write_text(old + "\n")


_PROG_ID = re.compile(r"^prog_id:\s*(\d+)", re.M)


def held_prog_ids(pid: int) -> list[int]:
    """Ids of the BPF programs whose fds process ``pid`` holds open."""
    ids: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                m = _PROG_ID.search(f.read())
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return sorted(ids)


@dataclass(frozen=True)
class ProgStats:
    name: str
    prog_id: int
    run_time_ns: int
    run_cnt: int


def prog_stats(pid: int, names: tuple[str, ...] = OUR_PROGRAMS) -> list[ProgStats]:
    """Run-time stats (``bpftool prog show id N -j``) of ``pid``'s programs named ``names``."""
    out: list[ProgStats] = []
    for prog_id in held_prog_ids(pid):
        proc = subprocess.run(
            ["bpftool", "prog", "show", "id", str(prog_id), "-j"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            continue
        info = json.loads(proc.stdout)
        if info.get("name") in names:
            out.append(ProgStats(
                name=info["name"], prog_id=prog_id,
                run_time_ns=int(info.get("run_time_ns", 0)),
                run_cnt=int(info.get("run_cnt", 0)),
            ))
    return out


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How many CPUs were busy on average between two :func:`cpu_jiffies` samples."""
    dt = after[1] - before[1]
    return (after[0] - before[0]) / dt * (os.cpu_count() or 1) if dt > 0 else 0.0


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])
