"""Micro-benchmark of the export path: `python -m tests.export.bench_export`.

Not collected by pytest. Prints spans/s and µs/span, best of 5 runs.

The OTLP/protobuf cases compare the encoders the OTLP exporter could use:
(a) the SDK's ``encode_spans`` + ``SerializeToString``; (b) official proto
messages filled directly, field by field, with no cache; (c) the exporter's
``ProtobufSpanEncoder`` (cached serialised attribute fragments merged by
protobuf's parser). "varied" spans differ in client address and port,
path, request id and sizes, as real traffic does, so caches hit less. The
end-to-end case sends through ``OtlpExporter`` to a receiver in a child
process and reports spans per second of wall time and per CPU-second of
this process (all its threads: caller, sender, gRPC).
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind

from clovisor.clock import MonotonicToWall
from clovisor.core.events import Outcome
from clovisor.export.console import format_span
from clovisor.export.ids import FastIdGenerator
from clovisor.export.otlp import OtlpExporter
from clovisor.export.otlp_encode import ProtobufSpanEncoder
from clovisor.export.otlp_json import reference_otlp_json, spans_to_otlp_json
from clovisor.export.record import SpanRecord
from clovisor.export.spans import session_to_span, to_readable_span

from .sessions import request, session

SESSION = session(
    request=request(
        "GET",
        "/productpage?u=normal",
        headers=(
            ("host", "productpage.default.svc:9080"),
            ("user-agent", "curl/7.88.1"),
            ("x-request-id", "6b9f2a0e-4d0c-4f4e-9a57-5e0c6a3f1a2b"),
            ("x-b3-traceid", "a3ce929d0e0e4736"),
        ),
    )
)
FAILED = session(outcome=Outcome.RESET, response=None)
RESOURCE = Resource(
    {
        "service.name": "productpage",
        "k8s.pod.name": "productpage-v1-7d9c",
        "k8s.namespace.name": "default",
        "k8s.node.name": "node-1",
    }
)
BATCH = 512


def best(label: str, n_spans: int, fn: Callable[[], object]) -> None:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    dt = min(times)
    print(f"{label:38s} {n_spans / dt:10,.0f} spans/s {dt / n_spans * 1e6:8.2f} µs/span")


def varied_sessions(n: int, seed: int = 1) -> list[Any]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        start = 1_000_000_000 + i * 1000
        out.append(
            session(
                client_addr=f"10.244.{rnd.randint(0, 3)}.{rnd.randint(2, 250)}",
                client_port=rnd.randint(32768, 60999),
                start_ns=start,
                end_ns=start + rnd.randint(100_000, 50_000_000),
                request=request(
                    rnd.choice(["GET", "GET", "GET", "POST"]),
                    f"/api/v1/items/{rnd.randint(1, 5000)}?page={rnd.randint(1, 9)}",
                    headers=(
                        ("host", "productpage.default.svc:9080"),
                        ("user-agent", "curl/7.88.1"),
                        ("x-request-id", str(uuid.UUID(int=rnd.getrandbits(128)))),
                    ),
                ),
                request_bytes=rnd.randint(80, 300),
                response_bytes=rnd.randint(100, 100_000),
            )
        )
    return out


_PB_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3}


def direct_messages(spans: Sequence[SpanRecord]) -> bytes:
    """Option (b): fill the official messages in place, no caching (one resource)."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for key, value in spans[0].resource.attributes.items():
        rs.resource.attributes.add(key=key).value.string_value = str(value)
    ss = rs.scope_spans.add()
    ss.scope.name = "clovisor"
    for sp in spans:
        out = ss.spans.add(
            trace_id=sp.trace_id.to_bytes(16, "big"),
            span_id=sp.span_id.to_bytes(8, "big"),
            name=sp.name,
            kind=_PB_KIND[sp.kind],
            start_time_unix_nano=sp.start_time,
            end_time_unix_nano=sp.end_time,
            flags=0x100,
        )
        out.status.code = sp.status_code.value
        if sp.status_message:
            out.status.message = sp.status_message
        for key, value in (sp.attributes or {}).items():
            kv = out.attributes.add()
            kv.key = key
            if type(value) is str:
                kv.value.string_value = value
            elif type(value) is int:
                kv.value.int_value = value
            elif type(value) is list:
                for v in value:
                    kv.value.array_value.values.add().string_value = v
    data: bytes = req.SerializeToString()
    return data


def end_to_end(kind: str, spans: list[SpanRecord], rounds: int) -> None:
    """Spans/s through OtlpExporter to a receiver in a child process."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.export.receiver", kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        endpoint = child.stdout.readline().strip()
        exporter = OtlpExporter.from_output(f"otlp-{kind}", endpoint, environ={})
        exporter.export(spans[:BATCH])  # connect, warm the caches
        exporter.flush(10)
        total = len(spans) * rounds
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(rounds):
            for i in range(0, len(spans), BATCH):
                # Pace to what the sender sustains: measuring a queue that
                # overflows would only measure drop-oldest.
                while exporter.stats()["queue_size"] > 8 * BATCH:
                    time.sleep(0.0005)
                exporter.export(spans[i : i + BATCH])
        exporter.flush(60)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        stats = exporter.stats()
        exporter.shutdown()
        child.stdin.write("\n")
        child.stdin.flush()
        received = int(child.stdout.readline()) - BATCH
        label = f"OtlpExporter -> {kind} receiver, varied"
        print(
            f"{label:38s} {total / wall:10,.0f} spans/s {cpu / total * 1e6:8.2f} µs/span CPU"
            f"  ({total / cpu:,.0f} spans per CPU-s; received {received}/{total},"
            f" dropped {stats['spans_dropped']})"
        )
    finally:
        child.stdin.close()
        child.wait(10)


def main() -> None:
    clock = MonotonicToWall()
    ids = FastIdGenerator()

    def convert(n: int) -> None:
        for i in range(n):
            session_to_span(
                SESSION if i % 10 else FAILED, resource=RESOURCE, to_wall=clock.to_wall, ids=ids
            )

    spans = [
        session_to_span(
            SESSION if i % 10 else FAILED, resource=RESOURCE, to_wall=clock.to_wall, ids=ids
        )
        for i in range(BATCH)
    ]
    print(f"{len(spans[1].attributes or {})} attributes per span, batches of {BATCH}")
    best("session_to_span", 20_000, lambda: convert(20_000))
    sdk_spans = [to_readable_span(s) for s in spans]
    best("SDK encode_spans (protobuf objects)", BATCH, lambda: encode_spans(sdk_spans))
    best(
        "SDK encode_spans + SerializeToString",
        BATCH,
        lambda: encode_spans(sdk_spans).SerializeToString(),
    )
    encoder = ProtobufSpanEncoder()
    best("OTLP/pb (b) direct messages, no cache", BATCH, lambda: direct_messages(spans))
    best("OTLP/pb (c) ProtobufSpanEncoder", BATCH, lambda: encoder.serialize(spans))
    varied = [
        session_to_span(s, resource=RESOURCE, to_wall=clock.to_wall, ids=ids)
        for s in varied_sessions(20 * BATCH)
    ]
    batches = [varied[i : i + BATCH] for i in range(0, len(varied), BATCH)]
    sdk_batches = [[to_readable_span(s) for s in b] for b in batches]
    n_varied = len(varied)
    best(
        "OTLP/pb (a) encode_spans, varied",
        n_varied,
        lambda: [encode_spans(b).SerializeToString() for b in sdk_batches],
    )
    best(
        "OTLP/pb (b) direct messages, varied",
        n_varied,
        lambda: [direct_messages(b) for b in batches],
    )
    varied_encoder = ProtobufSpanEncoder()
    best(
        "OTLP/pb (c) ProtobufSpanEncoder, varied",
        n_varied,
        lambda: [varied_encoder.serialize(b) for b in batches],
    )
    best("OTLP/JSON line, direct encoder", BATCH, lambda: spans_to_otlp_json(spans))
    best("OTLP/JSON dict, reference encoder", BATCH, lambda: reference_otlp_json(spans))
    best("console line", BATCH, lambda: [format_span(s) for s in spans])
    end_to_end("grpc", varied, rounds=10)
    end_to_end("http", varied, rounds=10)


if __name__ == "__main__":
    main()
