"""Any session the core can produce exports without error and round-trips."""

from __future__ import annotations

import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clovisor.core.events import HttpRequest, HttpResponse, Outcome, Protocol, Role, Session
from clovisor.export.console import format_span
from clovisor.export.ids import FastIdGenerator
from clovisor.export.otlp_encode import ProtobufSpanEncoder
from clovisor.export.otlp_json import read_otlp_json, reference_otlp_json, spans_to_otlp_json
from clovisor.export.spans import session_to_span

from .sessions import RESOURCE, to_wall

SECRET = "s3cr3t-value"

# Wire text: anything, including raw bytes smuggled as lone surrogates.
wire_text = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"]),
    ),
    max_size=40,
)
header_names = st.one_of(
    st.sampled_from(
        [
            "host",
            "x-request-id",
            "x-envoy-decorator-operation",
            "x-b3-traceid",
            "x-b3-spanid",
            "b3",
            "traceparent",
            "tracestate",
            "user-agent",
            "content-length",
        ]
    ),
    wire_text,
)
headers = st.lists(st.tuples(header_names, wire_text), max_size=6).map(tuple)
secret_headers = st.lists(
    st.tuples(
        st.sampled_from(["authorization", "Cookie", "set-cookie", "proxy-authorization"]),
        st.just(SECRET),
    ),
    max_size=2,
).map(tuple)
sizes = st.one_of(st.none(), st.integers(0, 2**40))
counts = st.integers(0, 2**40)
methods = st.one_of(st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]), wire_text)
targets = st.one_of(
    st.sampled_from(["/", "/a/b?x=1", "*", "host:443", "http://u:p@h/x?token=t", "/?"]),
    wire_text,
)
versions = st.sampled_from(["1.0", "1.1", ""])

requests = st.builds(
    HttpRequest,
    method=methods,
    target=targets,
    version=versions,
    headers=st.tuples(headers, secret_headers).map(lambda t: t[0] + t[1]),
    body_size=sizes,
    header_truncated=st.booleans(),
)
responses = st.builds(
    HttpResponse,
    status_code=st.integers(0, 999),
    reason=wire_text,
    version=versions,
    headers=st.tuples(headers, secret_headers).map(lambda t: t[0] + t[1]),
    body_size=sizes,
    header_truncated=st.booleans(),
)


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    family = draw(st.sampled_from([4, 6]))
    addr = st.ip_addresses(v=4 if family == 4 else 6).map(str)
    start = draw(st.integers(0, 2**62))
    return Session(
        role=draw(st.sampled_from(Role)),
        protocol=draw(st.sampled_from(Protocol)),
        ifindex=draw(st.integers(0, 2**31 - 1)),
        family=family,
        client_addr=draw(addr),
        client_port=draw(st.integers(0, 65535)),
        server_addr=draw(addr),
        server_port=draw(st.integers(0, 65535)),
        start_ns=start,
        end_ns=draw(st.integers(0, 2**62)),
        outcome=draw(st.sampled_from(Outcome)),
        request=draw(st.one_of(st.none(), requests)),
        response=draw(st.one_of(st.none(), responses)),
        request_packets=draw(counts),
        request_bytes=draw(counts),
        response_packets=draw(counts),
        response_bytes=draw(counts),
    )


IDS = FastIdGenerator(seed=7)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(sessions(), min_size=1, max_size=4))
def test_any_session_exports_and_round_trips(batch: list[Session]) -> None:
    spans = [session_to_span(s, resource=RESOURCE, to_wall=to_wall, ids=IDS) for s in batch]
    ProtobufSpanEncoder().encode(spans)  # the protobuf path the OTLP exporters take

    line = spans_to_otlp_json(spans)
    assert "\n" not in line
    assert json.loads(line) == reference_otlp_json(spans)
    [request] = read_otlp_json(io.StringIO(line))
    pb_spans = request.resource_spans[0].scope_spans[0].spans
    assert len(pb_spans) == len(spans)
    for sp, pb in zip(spans, pb_spans, strict=True):
        assert pb.trace_id == sp.trace_id.to_bytes(16, "big")
        assert pb.span_id == sp.span_id.to_bytes(8, "big")
        assert pb.start_time_unix_nano == sp.start_time
        assert pb.end_time_unix_nano == sp.end_time >= sp.start_time  # type: ignore[operator]
        # Nothing was dropped: every attribute was encodable.
        assert len(pb.attributes) == len(sp.attributes or {})
        assert SECRET not in str(pb)

        console = format_span(sp)
        assert "\n" not in console and "\r" not in console
