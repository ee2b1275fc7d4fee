from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import SpanKind
from opentelemetry.trace.status import StatusCode

from clovisor.core.events import Outcome, Protocol, Role
from clovisor.export.ids import FastIdGenerator
from clovisor.export.otlp_encode import reference_request
from clovisor.export.spans import redact_query, to_readable_span

from .sessions import OFFSET, RESOURCE, request, response, session, span


def attrs_of(s: Any) -> dict[str, Any]:
    return dict(s.attributes or {})


def test_get_with_query_maps_to_semconv() -> None:
    sp = span()
    a = attrs_of(sp)
    assert sp.name == "GET"
    assert sp.kind is SpanKind.SERVER
    assert sp.start_time == 1_000_000_000 + OFFSET
    assert sp.end_time == 1_012_300_000 + OFFSET
    assert sp.status_code is StatusCode.UNSET
    assert sp.resource is RESOURCE
    assert sp.parent is None
    scope = to_readable_span(sp).instrumentation_scope
    assert scope is not None and scope.name == "clovisor"
    assert a == {
        "http.request.method": "GET",
        "url.path": "/index.html",
        "url.query": "x=1",
        "url.scheme": "http",
        "http.request.header.host": ["10.200.0.2"],
        "http.request.body.size": 0,
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
        "http.response.body.size": 1500,
        "client.address": "10.200.1.2",
        "client.port": 51234,
        "server.address": "10.200.0.2",
        "server.port": 80,
        "network.peer.address": "10.200.1.2",
        "network.peer.port": 51234,
        "network.transport": "tcp",
        "network.type": "ipv4",
        "clovisor.outcome": "complete",
        "clovisor.interface": "7",
        "clovisor.request.packets": 1,
        "clovisor.request.bytes": 78,
        "clovisor.response.packets": 2,
        "clovisor.response.bytes": 1600,
    }


def test_post_with_body_and_recorded_headers() -> None:
    headers = (
        ("host", "web.default.svc:8080"),
        ("x-request-id", "7d1f"),
        ("x-envoy-decorator-operation", "web.default.svc.cluster.local:8080/*"),
        ("user-agent", "curl/7.88.1"),
    )
    sp = span(
        session(
            request=request("POST", "/api/items", headers=headers, body_size=512),
            response=response(201, "Created", body_size=0),
        )
    )
    a = attrs_of(sp)
    assert sp.name == "POST"
    assert a["http.request.method"] == "POST"
    assert a["url.path"] == "/api/items"
    assert "url.query" not in a
    assert a["http.request.body.size"] == 512
    assert a["http.response.status_code"] == 201
    assert a["http.response.body.size"] == 0
    assert a["user_agent.original"] == "curl/7.88.1"
    assert a["http.request.header.host"] == ["web.default.svc:8080"]
    assert a["http.request.header.x-request-id"] == ["7d1f"]
    assert a["http.request.header.x-envoy-decorator-operation"] == [
        "web.default.svc.cluster.local:8080/*"
    ]
    # Already carried by user_agent.original.
    assert "http.request.header.user-agent" not in a
    assert sp.status_code is StatusCode.UNSET


def test_head_has_no_response_body() -> None:
    sp = span(
        session(
            request=request("HEAD", "/", body_size=None),
            response=response(200, headers=(("content-length", "1500"),), body_size=0),
        )
    )
    a = attrs_of(sp)
    assert sp.name == "HEAD"
    assert a["http.request.method"] == "HEAD"
    assert a["url.path"] == "/"
    assert "http.request.body.size" not in a
    assert a["http.response.body.size"] == 0
    assert a["http.response.header.content-length"] == ["1500"]
    assert sp.status_code is StatusCode.UNSET


def test_server_5xx_is_error_without_description() -> None:
    sp = span(session(response=response(503, "Service Unavailable")))
    a = attrs_of(sp)
    assert sp.status_code is StatusCode.ERROR
    assert sp.status_message is None  # semconv: the code says it all
    assert a["error.type"] == "503"
    assert a["http.response.status_code"] == 503


def test_server_4xx_is_not_error() -> None:
    sp = span(session(response=response(404, "Not Found")))
    assert sp.status_code is StatusCode.UNSET
    assert "error.type" not in attrs_of(sp)


def test_client_404_is_error() -> None:
    s = session(
        role=Role.CLIENT,
        client_addr="10.200.0.2",
        client_port=40000,
        server_addr="10.200.2.9",
        server_port=8080,
        request=request("GET", "/missing?q=1", headers=(("host", "api.example:8080"),)),
        response=response(404, "Not Found"),
    )
    sp = span(s)
    a = attrs_of(sp)
    assert sp.kind is SpanKind.CLIENT
    assert sp.status_code is StatusCode.ERROR
    assert a["error.type"] == "404"
    assert a["network.peer.address"] == "10.200.2.9"
    assert a["network.peer.port"] == 8080
    assert a["client.address"] == "10.200.0.2"
    assert a["server.port"] == 8080
    assert a["url.full"] == "http://api.example:8080/missing?q=1"


def test_reset_without_response() -> None:
    sp = span(session(outcome=Outcome.RESET, response=None, response_packets=0, response_bytes=0))
    a = attrs_of(sp)
    assert sp.name == "GET"
    assert sp.status_code is StatusCode.ERROR
    assert sp.status_message == "connection reset before response"
    assert a["error.type"] == "reset"
    assert a["clovisor.outcome"] == "reset"
    assert "http.response.status_code" not in a
    assert "http.response.body.size" not in a


@pytest.mark.parametrize(
    ("outcome", "error_type", "description"),
    [
        (Outcome.CLOSED, "closed", "connection closed before response"),
        (Outcome.TIMEOUT, "timeout", "no response before the idle timeout"),
        (Outcome.SHUTDOWN, "shutdown", "tracer stopped before response"),
    ],
)
def test_other_failed_outcomes_without_response(
    outcome: Outcome, error_type: str, description: str
) -> None:
    sp = span(session(outcome=outcome, response=None))
    assert sp.status_code is StatusCode.ERROR
    assert sp.status_message == description
    assert attrs_of(sp)["error.type"] == error_type


def test_reset_during_response_is_error_but_shutdown_is_not() -> None:
    sp = span(session(outcome=Outcome.RESET))
    assert sp.status_code is StatusCode.ERROR
    assert sp.status_message == "connection reset during response"
    sp = span(session(outcome=Outcome.SHUTDOWN))
    assert sp.status_code is StatusCode.UNSET
    assert attrs_of(sp)["clovisor.outcome"] == "shutdown"


def test_status_code_wins_over_outcome() -> None:
    sp = span(session(outcome=Outcome.RESET, response=response(502, "Bad Gateway")))
    assert attrs_of(sp)["error.type"] == "502"


def test_ipv6() -> None:
    s = session(
        family=6,
        client_addr="fd00:200::2",
        server_addr="fd00:200::1",
        role=Role.CLIENT,
        request=request(headers=()),
    )
    a = attrs_of(span(s))
    assert a["network.type"] == "ipv6"
    assert a["server.address"] == "fd00:200::1"
    # No Host header: the URL falls back to the bracketed address.
    assert a["url.full"] == "http://[fd00:200::1]:80/index.html?x=1"


def test_unknown_method_becomes_other() -> None:
    sp = span(session(request=request("PROPFIND", "/dav/")))
    a = attrs_of(sp)
    assert sp.name == "HTTP"
    assert a["http.request.method"] == "_OTHER"
    assert a["http.request.method_original"] == "PROPFIND"
    # Methods are case-sensitive in semconv.
    assert attrs_of(span(session(request=request("get"))))["http.request.method"] == "_OTHER"


def test_http_1_0() -> None:
    a = attrs_of(span(session(request=request(version="1.0"))))
    assert a["network.protocol.version"] == "1.0"


def test_sensitive_headers_never_exported() -> None:
    headers = (
        ("authorization", "Bearer secret"),
        ("Cookie", "sid=secret"),
        ("proxy-authorization", "Basic secret"),
        ("x-request-id", "abc"),
    )
    s = session(
        request=request(headers=headers),
        response=response(headers=(("set-cookie", "sid=secret"),)),
    )
    sp = span(s)
    a = attrs_of(sp)
    assert a["http.request.header.x-request-id"] == ["abc"]
    assert not any("secret" in str(v) for v in a.values())
    assert not any("cookie" in k or "authorization" in k for k in a)


def test_repeated_header_becomes_multi_value() -> None:
    s = session(request=request(headers=(("x-request-id", "a"), ("x-request-id", "b"))))
    assert attrs_of(span(s))["http.request.header.x-request-id"] == ["a", "b"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("x=1", "x=1"),
        ("token=abc&x=1", "token=REDACTED&x=1"),
        (
            "X-Amz-Signature=ff&X-Amz-Credential=k&a=b",
            "X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&a=b",
        ),
        ("access%5Ftoken=abc", "access%5Ftoken=REDACTED"),
        ("%41ccess_token=abc", "%41ccess_token=REDACTED"),
        ("a=1;Token=abc&b=2", "a=1;Token=REDACTED&b=2"),
        ("token=", "token="),
        ("flag&key=v", "flag&key=REDACTED"),
        ("", ""),
    ],
)
def test_redact_query(query: str, expected: str) -> None:
    assert redact_query(query) == expected


def test_credentials_never_reach_url_attributes() -> None:
    s = session(
        role=Role.CLIENT,
        request=request("GET", "http://user:pw@proxy.example/a;jsessionid=S3CRET?api_key=K3Y&x=1"),
    )
    a = attrs_of(span(s))
    assert a["url.path"] == "/a;jsessionid=REDACTED"
    assert a["url.query"] == "api_key=REDACTED&x=1"
    assert (
        a["url.full"]
        == "http://REDACTED:REDACTED@proxy.example/a;jsessionid=REDACTED?api_key=REDACTED&x=1"
    )
    assert not any(s in str(v) for v in a.values() for s in ("pw", "S3CRET", "K3Y"))


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("*", "*", None),
        ("example.com:443", None, None),
        ("http://example.com", "/", None),
        ("https://example.com/p?q#frag", "/p", "q"),
        ("/a?", "/a", None),
    ],
)
def test_request_target_forms(target: str, path: str | None, query: str | None) -> None:
    a = attrs_of(span(session(request=request("OPTIONS", target))))
    assert a.get("url.path") == path
    assert a.get("url.query") == query


def test_unencodable_strings_are_cleaned() -> None:
    # A parser decoding with surrogateescape can hand us lone surrogates;
    # protobuf refuses them, so the span must not carry them.
    s = session(
        request=request(
            "GET",
            "/caf\udcc3\udca9/\udce9",  # b"/caf\xc3\xa9/\xe9": UTF-8 "é", then a stray byte
            headers=(("x-request-id", "\ud800"),),
        )
    )
    sp = span(s)
    reference_request([sp])  # would raise on invalid UTF-8
    a = attrs_of(sp)
    assert a["url.path"] == "/caf\u00e9/\ufffd"
    assert a["http.request.header.x-request-id"] == ["\ufffd\ufffd\ufffd"]


def test_tcp_session() -> None:
    s = session(protocol=Protocol.TCP, request=None, response=None, outcome=Outcome.CLOSED)
    sp = span(s)
    a = attrs_of(sp)
    assert sp.name == "TCP"
    assert sp.status_code is StatusCode.UNSET
    assert not any(k.startswith(("http.", "url.", "network.protocol")) for k in a)
    assert a["network.transport"] == "tcp"
    sp = span(session(protocol=Protocol.TCP, request=None, response=None, outcome=Outcome.RESET))
    assert sp.status_code is StatusCode.ERROR
    assert attrs_of(sp)["error.type"] == "reset"


def test_tls_on_an_http_port_is_a_tls_span() -> None:
    s = session(request=None, response=None, protocol_name="tls",
                attributes=(("tls.client.server_name", "api.example.svc"),))  # fmt: skip
    sp = span(s)
    a = attrs_of(sp)
    assert sp.name == "tls" and a["tls.client.server_name"] == "api.example.svc"
    assert not any(k.startswith(("http.", "url.")) for k in a)


def test_response_without_request() -> None:
    # The agent started mid-connection and only saw the response.
    sp = span(session(request=None))
    a = attrs_of(sp)
    assert sp.name == "HTTP"
    assert a["http.response.status_code"] == 200
    assert a["network.protocol.version"] == "1.1"


def test_interface_name_and_truncation_flags() -> None:
    a = attrs_of(span(interface_names={7: "veth1234"}))
    assert a["clovisor.interface"] == "veth1234"


def test_end_never_before_start() -> None:
    sp = span(session(start_ns=5_000, end_ns=4_000))
    assert sp.end_time == sp.start_time


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "headers",
    [
        (("traceparent", f"00-{TRACE}-{PARENT}-01"),),
        (("traceparent", f"00-{TRACE}-{PARENT}-01"), ("x-b3-traceid", "1" * 32)),
        (("b3", f"{TRACE}-{PARENT}-1"),),
        (("x-b3-traceid", TRACE), ("x-b3-spanid", PARENT), ("x-b3-sampled", "1")),
    ],
)
def test_joins_the_callers_trace(headers: tuple[tuple[str, str], ...]) -> None:
    sp = span(session(request=request(headers=headers)))
    assert sp.parent is not None
    assert sp.parent.is_remote
    assert sp.parent.span_id == int(PARENT, 16)
    assert sp.trace_id == int(TRACE, 16)
    assert sp.span_id != int(PARENT, 16)


def test_traceparent_keeps_tracestate() -> None:
    headers = (("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "vendor=abc"))
    sp = span(session(request=request(headers=headers)))
    assert sp.trace_state == "vendor=abc"


def test_b3_64bit_trace_id_only() -> None:
    sp = span(session(request=request(headers=(("x-b3-traceid", "a3ce929d0e0e4736"),))))
    assert sp.parent is None
    assert sp.trace_id == 0xA3CE929D0E0E4736


@pytest.mark.parametrize(
    "value",
    [
        f"00-{'0' * 32}-{PARENT}-01",  # invalid trace id
        f"00-{TRACE}-{'0' * 16}-01",  # invalid span id
        f"ff-{TRACE}-{PARENT}-01",  # forbidden version
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has four fields
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case hex is invalid
        "garbage",
    ],
)
def test_invalid_traceparent_is_ignored(value: str) -> None:
    sp = span(session(request=request(headers=(("traceparent", value),))))
    assert sp.parent is None
    assert sp.trace_id != int(TRACE, 16)


def test_ids_are_never_zero() -> None:
    gen = FastIdGenerator(seed=3)
    draws = iter([0, 0, 5])
    gen._bits = lambda _n: next(draws)
    assert gen.generate_trace_id() == 5
    draws = iter([0, 9])
    assert gen.generate_span_id() == 9


def test_ids_are_unique_and_in_range() -> None:
    gen = FastIdGenerator()
    trace_ids = {gen.generate_trace_id() for _ in range(10_000)}
    span_ids = {gen.generate_span_id() for _ in range(10_000)}
    assert len(trace_ids) == len(span_ids) == 10_000
    assert all(0 < t < 2**128 for t in trace_ids)
    assert all(0 < s < 2**64 for s in span_ids)


def test_spans_encode_with_the_sdk_encoder() -> None:
    spans = [span(), span(session(outcome=Outcome.RESET, response=None))]
    req = reference_request(spans)
    pb = req.resource_spans[0].scope_spans[0].spans
    assert [s.name for s in pb] == ["GET", "GET"]
    assert pb[1].status.code == 2


@pytest.mark.parametrize(
    ("tracestate", "expected"),
    [
        ("a=1,b=2", {"a": "1", "b": "2"}),
        ("tenant@vendor=x, ,c=3", {"tenant@vendor": "x", "c": "3"}),
        ("a=1,a=2", {}),  # duplicate keys: the whole header is invalid
        ("A=1", {}),
        ("a=1,bad", {}),
        (",".join(f"k{i}=v" for i in range(33)), {}),  # more than 32 members
    ],
)
def test_tracestate_is_parsed_quietly(
    tracestate: str, expected: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    headers = (("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", tracestate))
    sp = span(session(request=request(headers=headers)))
    assert sp.trace_state == ",".join(f"{k}={v}" for k, v in expected.items())
    assert caplog.records == []  # hostile headers must not flood the log
