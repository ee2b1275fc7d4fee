from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.trace.status import StatusCode

from clovisor.core.events import Outcome, Role
from clovisor.export import Exporter, ExporterConfigError
from clovisor.export.otlp_json import (
    OtlpJsonExporter,
    read_otlp_json,
    reference_otlp_json,
    spans_to_otlp_json,
)
from clovisor.export.record import SpanRecord

from .sessions import OFFSET, record, request, session, span

HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def attr_map(attributes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in attributes:
        which = kv.value.WhichOneof("value")
        value = getattr(kv.value, which)
        if which == "array_value":
            value = [getattr(v, v.WhichOneof("value")) for v in value.values]
        out[kv.key] = value
    return out


def test_round_trip_through_the_official_proto(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    exporter = OtlpJsonExporter(str(path))
    assert isinstance(exporter, Exporter)
    server = span()
    client = span(
        session(
            role=Role.CLIENT,
            outcome=Outcome.RESET,
            response=None,
            request=request(headers=(("traceparent", f"00-{TRACE}-{PARENT}-01"),)),
        )
    )
    exporter.export([server, client])
    assert exporter.flush(5)
    exporter.export([span()])
    exporter.shutdown()

    lines = path.read_text().splitlines()
    assert len(lines) == 2  # one ExportTraceServiceRequest per batch
    raw = json.loads(lines[0])
    raw_spans = raw["resourceSpans"][0]["scopeSpans"][0]["spans"]
    for s in raw_spans:
        assert HEX32.fullmatch(s["traceId"]), s["traceId"]
        assert HEX16.fullmatch(s["spanId"]), s["spanId"]
    assert raw_spans[1]["parentSpanId"] == PARENT
    assert raw_spans[1]["traceId"] == TRACE
    assert raw_spans[0]["kind"] == 2  # enums as integers

    requests = read_otlp_json(path)
    assert len(requests) == 2
    rs = requests[0].resource_spans[0]
    resource = attr_map(rs.resource.attributes)
    assert resource["service.name"] == "web"
    assert resource["k8s.pod.name"] == "web-0"
    assert rs.scope_spans[0].scope.name == "clovisor"
    pb_server, pb_client = rs.scope_spans[0].spans
    assert pb_server.kind == PbSpan.SpanKind.SPAN_KIND_SERVER
    assert pb_client.kind == PbSpan.SpanKind.SPAN_KIND_CLIENT
    assert pb_server.trace_id == server.trace_id.to_bytes(16, "big")
    assert pb_server.span_id == server.span_id.to_bytes(8, "big")
    assert pb_server.start_time_unix_nano == 1_000_000_000 + OFFSET
    assert pb_server.end_time_unix_nano == 1_012_300_000 + OFFSET
    assert pb_server.name == "GET"
    a = attr_map(pb_server.attributes)
    assert a["http.response.status_code"] == 200
    assert a["url.path"] == "/index.html"
    assert a["http.request.header.host"] == ["10.200.0.2"]
    assert pb_server.status.code == 0
    assert pb_client.parent_span_id == bytes.fromhex(PARENT)
    assert pb_client.trace_id == bytes.fromhex(TRACE)
    assert pb_client.status.code == 2
    assert pb_client.status.message == "connection reset before response"
    assert pb_client.flags == 0x300  # parent is remote


def test_appends_and_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    for _ in range(2):
        exporter = OtlpJsonExporter(path)
        exporter.export([span()])
        exporter.shutdown()
    assert len(read_otlp_json(path)) == 2


def test_empty_batch_writes_nothing() -> None:
    stream = io.StringIO()
    exporter = OtlpJsonExporter(stream)
    exporter.export([])
    assert stream.getvalue() == ""


def test_dash_means_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    exporter = OtlpJsonExporter("-")
    exporter.export([span()])
    exporter.shutdown()
    out = capsys.readouterr().out
    assert len(read_otlp_json(io.StringIO(out))) == 1


@pytest.mark.parametrize("where", ["missing/dir/spans.jsonl", "."])
def test_unwritable_path_fails_at_construction(tmp_path: Path, where: str) -> None:
    target = tmp_path / where
    with pytest.raises(ExporterConfigError, match=re.escape(str(target))):
        OtlpJsonExporter(target)


def test_reader_rejects_base64_ids() -> None:
    line = spans_to_otlp_json([span()])
    doc = json.loads(line)
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = "AAECAwQFBgc="
    with pytest.raises(ValueError, match="spanId"):
        read_otlp_json(io.StringIO(json.dumps(doc)))


# The direct encoder must match the SDK encoder + json_format exactly.


def rec(**kwargs: Any) -> SpanRecord:
    return record(trace_id=1, span_id=2, kind=SpanKind.INTERNAL)._replace(**kwargs)


@pytest.mark.parametrize(
    "spans",
    [
        [span()],
        [span(session(outcome=Outcome.TIMEOUT, response=None)), span(session(role=Role.CLIENT))],
        # Equal resources held in distinct objects share one ResourceSpans.
        [
            span(resource=Resource({"service.name": "a"})),
            span(resource=Resource({"service.name": "a"})),
        ],
        [
            span(resource=Resource({"service.name": "a"})),
            span(resource=Resource({"service.name": "b"})),
        ],
        [
            rec(
                attributes={
                    "s": "",
                    "i": -(2**63),
                    "b": False,
                    "f": 1.5,
                    "nan": math.nan,
                    "inf": -math.inf,
                    "big": 2**63,  # dropped by both: does not fit int64
                    "bad": "\udc80",  # dropped by both: invalid UTF-8
                    "empty": [],
                    "mixed": ["a", "b"],
                    "bytes": b"\x00\xff",
                    "": "no key",
                    "unicode": 'caf\u00e9 \u2603 "quoted" \\',
                },
                resource=Resource({"service.name": "x", "n": 1}, schema_url="https://r"),
                status_code=StatusCode.ERROR,
                status_message="boom",
                parent=SpanContext(1, 3, is_remote=False),
                name="",
                kind=SpanKind.CONSUMER,
                start_time=0,
            )
        ],
        [rec(status_code=StatusCode.OK), rec(trace_state="a=1,b=2")],
        [],
    ],
)
def test_direct_encoder_matches_reference(spans: list[SpanRecord]) -> None:
    assert json.loads(spans_to_otlp_json(spans)) == reference_otlp_json(spans)
    read_otlp_json(io.StringIO(spans_to_otlp_json(spans)))
