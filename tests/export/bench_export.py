"""Micro-benchmark of the export path: `python -m tests.export.bench_export`.

Not collected by pytest. Prints spans/s and µs/span, best of 5 runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource

from clovisor.clock import MonotonicToWall
from clovisor.core.events import Outcome
from clovisor.export.console import format_span
from clovisor.export.ids import FastIdGenerator
from clovisor.export.otlp_json import reference_otlp_json, spans_to_otlp_json
from clovisor.export.spans import session_to_span

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
    best("SDK encode_spans (protobuf objects)", BATCH, lambda: encode_spans(spans))
    best(
        "SDK encode_spans + SerializeToString",
        BATCH,
        lambda: encode_spans(spans).SerializeToString(),
    )
    best("OTLP/JSON line, direct encoder", BATCH, lambda: spans_to_otlp_json(spans))
    best("OTLP/JSON dict, reference encoder", BATCH, lambda: reference_otlp_json(spans))
    best("console line", BATCH, lambda: [format_span(s) for s in spans])


if __name__ == "__main__":
    main()
