"""Load generators and parsers for their reports.

HTTP/1.x: hey at fixed rates, wrk unthrottled. HTTP/2 (h2c): h2load at fixed
rates, several streams in flight per connection. gRPC: the demo gRPC client
(``clovisor.demo_grpc client ... bench``) at fixed rates, unary calls on one
channel.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

PROTOCOLS = ("http1", "http2", "grpc")
H2_STREAMS = 8  # h2load -m: streams in flight per connection


@dataclass(frozen=True)
class Workload:
    """One traffic pattern, run identically under every scenario.

    ``rate`` None means unthrottled (wrk at its maximum).
    """

    name: str
    rate: int | None
    keepalive: bool
    connections: int
    protocol: str = "http1"

    @property
    def tool(self) -> str:
        if self.protocol == "http2":
            return "h2load"
        if self.protocol == "grpc":
            return "grpc"
        return "hey" if self.rate is not None else "wrk"

    @property
    def label(self) -> str:
        rate = "max" if self.rate is None else f"{self.rate:,}/s"
        if self.protocol == "http2":
            return f"{rate} h2c"
        if self.protocol == "grpc":
            return f"{rate} gRPC"
        return f"{rate} {'keep-alive' if self.keepalive else 'conn/req'}"

    def argv(self, url: str, duration: float, mix_script: str | None = None) -> list[str]:
        """The client's command line; ``mix_script`` (wrk only) is :data:`MIX_LUA` on disk."""
        secs = f"{max(1, round(duration))}s"
        if self.protocol == "http2":
            assert self.rate is not None
            return ["h2load", "-D", str(max(1, round(duration))), "-c", str(self.connections),
                    "-m", str(H2_STREAMS), "--rps", f"{self.rate / self.connections:g}", url]
        if self.protocol == "grpc":
            assert self.rate is not None
            return [sys.executable, "-m", "clovisor.demo_grpc", "client", "--target", url,
                    "--rate", str(self.rate), "--duration", f"{duration:g}", "bench"]
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


def h2(rate: int) -> Workload:
    """h2load at ``rate`` req/s over 4 h2c connections."""
    return Workload(f"h2-{rate}", rate, True, 4, "http2")


def grpc(rate: int) -> Workload:
    """Unary gRPC calls at ``rate`` calls/s on one channel."""
    return Workload(f"grpc-{rate}", rate, True, 1, "grpc")


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


def parse_h2load(out: str) -> ClientResult:
    """h2load's summary (it reports no latency percentiles)."""
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored", out)
    t = re.search(r"finished in ([\d.]+)(us|ms|s|m),", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m is None or t is None or codes is None:
        raise ClientOutputError(f"h2load: no summary in output:\n{out[-2000:]}")
    return ClientResult(
        requests=int(m.group(2)),
        errors=int(m.group(3)) + int(m.group(4)),
        non_2xx=sum(int(codes.group(i)) for i in (2, 3, 4)),
        seconds=float(t.group(1)) * _UNIT_MS[t.group(2)] / 1e3,
        p50_ms=None,
        p99_ms=None,
        latency_resolution_ms=0.001,
    )


def parse_grpc(out: str) -> ClientResult:
    """The demo gRPC client's one-line JSON summary."""
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise ClientOutputError(f"grpc client: no summary in output:\n{out[-2000:]}")
    r = json.loads(lines[-1])
    return ClientResult(
        requests=int(r["calls"]) - int(r["errors"]),
        errors=int(r["errors"]),
        non_2xx=0,
        seconds=float(r["seconds"]),
        p50_ms=r.get("p50_ms"),
        p99_ms=r.get("p99_ms"),
        latency_resolution_ms=0.001,
    )


def parse(tool: str, out: str) -> ClientResult:
    if tool == "h2load":
        return parse_h2load(out)
    if tool == "grpc":
        return parse_grpc(out)
    return parse_hey(out) if tool == "hey" else parse_wrk(out)
