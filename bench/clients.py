"""Load generators (hey at fixed rates, wrk unthrottled) and parsers for their reports."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """One traffic pattern, run identically under every scenario.

    ``rate`` None means unthrottled (wrk at its maximum).
    """

    name: str
    rate: int | None
    keepalive: bool
    connections: int

    @property
    def tool(self) -> str:
        return "hey" if self.rate is not None else "wrk"

    @property
    def label(self) -> str:
        rate = "max" if self.rate is None else f"{self.rate:,}/s"
        return f"{rate} {'keep-alive' if self.keepalive else 'conn/req'}"

    def argv(self, url: str, duration: float, mix_script: str | None = None) -> list[str]:
        """The client's command line; ``mix_script`` (wrk only) is :data:`MIX_LUA` on disk."""
        secs = f"{max(1, round(duration))}s"
        if self.rate is None:
            argv = ["wrk", "-t2", f"-c{self.connections}", f"-d{secs}", "--latency"]
            if not self.keepalive:
                argv += ["-H", "Connection: close"]
            if mix_script is not None:
                argv += ["-s", mix_script]
            return [*argv, url]
        # hey's -q is per worker; it ticks each worker at q/s, so the total
        # offered rate is q * c.
        qps = self.rate / self.connections
        argv = ["hey", "-q", f"{qps:g}", "-c", str(self.connections), "-z", secs]
        if not self.keepalive:
            argv.append("-disable-keepalive")
        return [*argv, url]


# wrk: every MIX_EVERY-th request asks for a path nginx answers 404, so the
# unthrottled runs carry two status codes (see nginx.MISSING).
MIX_EVERY = 10
MIX_LUA = """\
local n = 0
request = function()
  n = n + 1
  if n % {every} == 0 then return wrk.format(nil, "{missing}") end
  return wrk.format(nil, wrk.path)
end
"""


def fixed(rate: int, keepalive: bool = True) -> Workload:
    """A hey workload at ``rate`` req/s; enough workers that each ticks at <= 100/s."""
    conns = min(200, max(10, rate // 100 if keepalive else rate // 50))
    return Workload(f"{'ka' if keepalive else 'close'}-{rate}", rate, keepalive, conns)


def unthrottled(keepalive: bool = True, connections: int = 50) -> Workload:
    return Workload(f"{'ka' if keepalive else 'close'}-max", None, keepalive, connections)


@dataclass(frozen=True)
class ClientResult:
    requests: int  # completed with a response
    errors: int  # failed, timed out or cancelled (socket errors for wrk)
    non_2xx: int
    seconds: float  # the client's own measured duration
    p50_ms: float | None
    p99_ms: float | None
    latency_resolution_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class ClientOutputError(ValueError):
    pass


def parse_hey(out: str) -> ClientResult:
    """hey's text summary: status code distribution, total time, latency percentiles."""
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    total = re.search(r"Total:\s+([\d.]+) secs", out)
    if total is None or not codes:
        raise ClientOutputError(f"hey: no summary in output:\n{out[-2000:]}")
    errors_block = out.split("Error distribution:", 1)[1] if "Error distribution:" in out else ""
    errors = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", errors_block, re.M))
    pct = {int(p): float(s) * 1e3 for p, s in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    return ClientResult(
        requests=sum(codes.values()),
        errors=errors,
        non_2xx=sum(n for c, n in codes.items() if not 200 <= c < 300),
        seconds=float(total.group(1)),
        p50_ms=pct.get(50),
        p99_ms=pct.get(99),
        latency_resolution_ms=0.1,  # hey prints seconds with 4 decimals
    )


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if m is None:
        raise ClientOutputError(f"wrk: bad latency {value!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> ClientResult:
    """wrk's report with ``--latency``."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m is None:
        raise ClientOutputError(f"wrk: no summary in output:\n{out[-2000:]}")
    seconds = float(m.group(2)) * _UNIT_MS[m.group(3)] / 1e3
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    pct = {int(p): _wrk_ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M)}
    return ClientResult(
        requests=int(m.group(1)),
        errors=sum(int(x) for x in sock.groups()) if sock else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        seconds=seconds,
        p50_ms=pct.get(50),
        p99_ms=pct.get(99),
        latency_resolution_ms=0.01,
    )


def parse(tool: str, out: str) -> ClientResult:
    return parse_hey(out) if tool == "hey" else parse_wrk(out)
