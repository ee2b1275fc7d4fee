"""``python -m bench.hotpath``: the user-space hot path replayed offline, per stage.

The live benchmark measures the whole tracer under real traffic, where two
shared cores, the load generator and the kernel make every number noisy.
This replays the same traffic shape (hey's GET on keep-alive connections,
nginx's 200 with a Date header and a 17-byte body) as ring buffer records,
in one thread, through the stages ``clovisor trace`` runs: record decoding,
the tracker, the metrics observer, session -> span, the sampler, OTLP/JSON
encoding. It prints µs per request for each stage (best of ``--repeat``),
so a change to one stage can be judged on its own and before/after numbers
do not depend on what else the machine runs. ``--varied`` makes every
request different (path, query, request id), as real traffic
is, so that nothing can profit from repetition; ``--paired`` replays the
records the classifier sends when it pairs exchanges itself (one per
exchange) instead of segments; ``--profile`` runs cProfile over the whole
path instead.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource

from clovisor.clock import MonotonicToWall
from clovisor.core.events import ACK, PSH, SYN, Direction, Protocol, Role
from clovisor.core.tracker import Tracker
from clovisor.export.ids import FastIdGenerator
from clovisor.export.otlp_json import spans_to_otlp_json
from clovisor.export.spans import session_to_span
from clovisor.gctune import tune_for_tracing
from clovisor.kernel.abi import (
    CLV_EV_EXCHANGE,
    CLV_EV_SEGMENT,
    EXCHANGE_HEADER,
    SEGMENT_HEADER,
    Method,
)
from clovisor.kernel.ringbuf import walk_records
from clovisor.metrics import Metrics
from clovisor.sampling import Sampler

CLIENT = bytes([10, 200, 1, 2]) + bytes(12)
SERVER = bytes([10, 200, 0, 2]) + bytes(12)
SPORT = 8080
IFINDEX = 7
DATE = "Mon, 01 Dec 2026 18:52:{:02d} GMT"


def request_bytes(rnd: random.Random | None) -> bytes:
    if rnd is None:
        path = "/hello"
    else:
        path = f"/api/v1/items/{rnd.randrange(10**6)}?page={rnd.randrange(9)}"
    extra = "" if rnd is None else f"X-Request-Id: {rnd.getrandbits(128):032x}\r\n"
    return (
        f"GET {path} HTTP/1.1\r\nHost: 10.200.0.2:8080\r\nUser-Agent: hey/0.0.1\r\n"
        f"Content-Type: text/html\r\n{extra}Accept-Encoding: gzip\r\n\r\n"
    ).encode()


def response_bytes(second: int, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: {DATE.format(second % 60)}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode() + body


def record(
    direction: Direction, cport: int, seq: int, ack: int, flags: int, payload: bytes, ts: int,
    capture: int = 1024,
) -> bytes:
    cap = payload[:capture]
    fwd = direction is Direction.REQUEST
    return SEGMENT_HEADER.pack(
        CLV_EV_SEGMENT, direction, Role.SERVER, Protocol.HTTP, 4, flags, 0, 0,
        ts, IFINDEX, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, len(payload),
        CLIENT if fwd else SERVER, SERVER if fwd else CLIENT,
        cport if fwd else SPORT, SPORT if fwd else cport, len(cap), 1, bytes(16),
    ) + cap  # fmt: skip


def exchange(cport: int, seq: int, ack: int, req: bytes, resp: bytes, ts: int) -> bytes:
    """The clv_exchange record the classifier sends for one paired exchange."""
    req_head = req[: req.index(b"\r\n\r\n") + 4]
    resp_head = resp[: resp.index(b"\r\n\r\n") + 4]
    return EXCHANGE_HEADER.pack(
        CLV_EV_EXCHANGE, Role.SERVER, 4, Method.GET, 0, 0, 200, len(req_head), len(resp_head),
        cport, SPORT, IFINDEX, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 1, 1, 0,
        ts, ts + 50_000, len(req), len(resp), CLIENT, SERVER,
    ) + req_head + resp_head  # fmt: skip


def traffic(
    requests: int, connections: int, varied: bool, seed: int = 1, paired: bool = False
) -> list[bytes]:
    """Ring records of ``requests`` exchanges spread over keep-alive connections."""
    rnd = random.Random(seed) if varied else None
    body = b"hello from nginx\n"
    out: list[bytes] = []
    ts = 1_000_000_000
    seqs = {}
    for c in range(connections):
        cport = 40000 + c
        cs, ss = 1000 + 7919 * c, 500_000 + 104729 * c
        if not paired:  # a paired connection's SYNs do not cross
            out.append(record(Direction.REQUEST, cport, cs, 0, SYN, b"", ts))
            out.append(record(Direction.RESPONSE, cport, ss, cs + 1, SYN | ACK, b"", ts))
        seqs[cport] = [cs + 1, ss + 1]
    for i in range(requests):
        cport = 40000 + i % connections
        cs, ss = seqs[cport]
        req = request_bytes(rnd)
        resp = response_bytes(i // 5000, body)
        ts += 100_000
        if paired:
            out.append(exchange(cport, cs, ss, req, resp, ts))
        else:
            out.append(record(Direction.REQUEST, cport, cs, ss, ACK | PSH, req, ts))
            out.append(record(Direction.RESPONSE, cport, ss, cs + len(req), ACK | PSH, resp,
                              ts + 50_000))
        seqs[cport] = [cs + len(req), ss + len(resp)]
    return out


class Path:
    """The stages of ``Tracer`` (pipeline.py), called the way it calls them."""

    def __init__(self) -> None:
        self.tracker = Tracker()
        self.metrics = Metrics()
        self.sampler = Sampler()
        self.clock = MonotonicToWall()
        self.ids = FastIdGenerator(seed=1)
        self.resource = Resource.create({"service.name": "web"})
        self.names = {IFINDEX: "veth-web"}

    def decode(self, ring: tuple[bytes, memoryview, int]) -> list[Any]:
        data, words, end = ring
        return walk_records(data, words, 0, 0, end, len(data) - 1, 1 << 30)[0]

    def track(self, segs: list[Any]) -> list[Any]:
        return self.tracker.feed_many(segs)

    def observe(self, sessions: list[Any]) -> list[Any]:
        self.metrics.observe_sessions(sessions, lambda s: ("web", ""))
        return sessions

    def spans(self, sessions: list[Any]) -> list[Any]:
        to_wall, ids, names, res = self.clock.to_wall, self.ids, self.names, self.resource
        return [
            session_to_span(s, resource=res, to_wall=to_wall, ids=ids, interface_names=names)
            for s in sessions
        ]

    def sample(self, spans: list[Any]) -> list[Any]:
        return list(self.sampler.filter(spans))

    def encode(self, spans: list[Any]) -> list[Any]:
        return [spans_to_otlp_json(spans)]


STAGES = ("decode", "track", "observe", "spans", "sample", "encode")


def ring_batches(raw: list[bytes], size: int) -> list[tuple[bytes, memoryview, int]]:
    """Batches of records laid out as the ring holds them (8-byte headers, aligned)."""
    out = []
    for i in range(0, len(raw), size):
        area = bytearray()
        for record in raw[i : i + size]:
            area += len(record).to_bytes(4, "little") + bytes(4) + record
            area += bytes(-len(area) % 8)
        end = len(area)
        area += bytes((1 << max(12, end.bit_length())) - end)  # a power of two, like the ring
        data = bytes(area)
        out.append((data, memoryview(data).cast("I"), end))
    return out


def run(rings: list[tuple[bytes, memoryview, int]], requests: int) -> dict[str, float]:
    """One replay; seconds per stage."""
    path = Path()
    spent = dict.fromkeys(STAGES, 0.0)
    steps: list[tuple[str, Callable[[Any], Any]]] = [(s, getattr(path, s)) for s in STAGES]
    clock = time.perf_counter
    for ring in rings:
        data: Any = ring
        for name, fn in steps:
            t0 = clock()
            data = fn(data)
            spent[name] += clock() - t0
    sessions = path.tracker.stats.sessions
    if sessions != requests:
        raise SystemExit(f"replay lost sessions: {sessions} of {requests}")
    return spent


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--batch", type=int, default=512, help="records per ring batch")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--varied", action="store_true", help="every request different")
    p.add_argument("--paired", action="store_true",
                   help="exchange records (kernel pairing) instead of segments")
    p.add_argument("--profile", action="store_true", help="cProfile the whole path once")
    p.add_argument("--gc", choices=("tuned", "default"), default="tuned",
                   help="the collector as clovisor trace sets it, or CPython's default")
    args = p.parse_args(argv)
    raw = traffic(args.requests, args.connections, args.varied, paired=args.paired)
    rings = ring_batches(raw, args.batch)
    if args.gc == "tuned":
        tune_for_tracing()
    else:
        gc.collect()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(rings, args.requests)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
        return 0
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        spent = run(rings, args.requests)
        for k, v in spent.items():
            best[k] = min(best.get(k, v), v)
    per = {k: 1e6 * v / args.requests for k, v in best.items()}
    kind = (("varied" if args.varied else "identical") + (" paired" if args.paired else "")
            + f", gc {args.gc}")
    print(f"{args.requests} {kind} requests, {len(raw)} records, batches of {args.batch}; "
          f"best of {args.repeat}, µs per request:")
    for k in STAGES:
        print(f"  {k:8s} {per[k]:7.2f}")
    print(f"  {'total':8s} {sum(per.values()):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

