"""HTTP/2 and gRPC sessions as spans: semconv names, statuses and the caller's trace."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from clovisor.core.events import Outcome, Protocol, Role
from clovisor.export.record import SpanRecord
from clovisor.export.spans import GRPC_CODES

from .sessions import request, response, session, span

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def grpc(code: int | None, *, role: Role = Role.SERVER, message: str = "",
         protocol: Protocol = Protocol.GRPC, outcome: Outcome = Outcome.COMPLETE,
         headers: tuple[tuple[str, str], ...] = ()) -> SpanRecord:
    attrs: list[tuple[str, str | int | float | bool]] = [
        ("rpc.system", "grpc"), ("rpc.service", "helloworld.Greeter"), ("rpc.method", "SayHello"),
    ]  # fmt: skip
    if code is not None:
        attrs.append(("rpc.grpc.status_code", code))
    if message:
        attrs.append(("clovisor.grpc.message", message))
    attrs.append(("clovisor.http2.stream_id", 3))
    return span(session(
        role=role, protocol=protocol, outcome=outcome, attributes=tuple(attrs),
        request=request("POST", "/helloworld.Greeter/SayHello", version="2",
                        headers=(("host", "greeter:50051"), ("content-type", "application/grpc"),
                                 *headers)),
        response=response(200, "", body_size=12),
    ))  # fmt: skip


def test_grpc_span_follows_the_rpc_conventions() -> None:
    sp = grpc(0, headers=(("traceparent", f"00-{TRACE}-{PARENT}-01"),))
    a = sp.attributes
    assert sp.name == "helloworld.Greeter/SayHello" and sp.kind is SpanKind.SERVER
    assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == (
        "grpc", "helloworld.Greeter", "SayHello")
    assert a["rpc.grpc.status_code"] == 0 and a["rpc.response.status_code"] == "OK"
    assert a["rpc.system.name"] == "grpc"
    assert a["network.protocol.name"] == "http" and a["network.protocol.version"] == "2"
    assert a["http.response.status_code"] == 200 and a["url.path"] == "/helloworld.Greeter/SayHello"
    assert a["clovisor.http2.stream_id"] == 3
    assert sp.status_code is StatusCode.UNSET and "error.type" not in a
    # The caller's trace is joined as for HTTP/1.
    assert f"{sp.trace_id:032x}" == TRACE and sp.parent is not None
    assert f"{sp.parent.span_id:016x}" == PARENT


@pytest.mark.parametrize("code", range(17))
def test_server_span_fails_only_on_the_codes_semconv_names(code: int) -> None:
    sp = grpc(code, message="it broke" if code else "")
    failing = code in (2, 4, 12, 13, 14, 15)  # never OK (0) or NOT_FOUND (5)
    assert (sp.status_code is StatusCode.ERROR) is failing, GRPC_CODES[code]
    assert sp.attributes["rpc.response.status_code"] == GRPC_CODES[code]
    if failing:
        assert sp.attributes["error.type"] == GRPC_CODES[code]
        assert sp.status_message == "it broke"
    else:
        assert "error.type" not in sp.attributes


@pytest.mark.parametrize("code", range(17))
def test_client_span_fails_on_every_code_but_ok(code: int) -> None:
    sp = grpc(code, role=Role.CLIENT)
    assert sp.kind is SpanKind.CLIENT
    assert (sp.status_code is StatusCode.ERROR) is (code != 0)
    if code:
        assert sp.attributes["error.type"] == GRPC_CODES[code]
        assert sp.status_message == GRPC_CODES[code]  # no grpc-message: the code's name


def test_a_call_reset_before_its_status_fails_as_http_does() -> None:
    sp = grpc(None, outcome=Outcome.RESET)
    assert sp.status_code is StatusCode.ERROR and sp.attributes["error.type"] == "reset"
    assert sp.status_message == "stream reset during response"  # RST_STREAM, not the connection
    assert "rpc.response.status_code" not in sp.attributes
    assert sp.name == "helloworld.Greeter/SayHello"


def test_grpc_on_an_http_port_after_the_preface() -> None:
    # A stream of an http port that switched to HTTP/2 is gRPC by its content-type.
    sp = grpc(14, protocol=Protocol.HTTP, message="upstream%20down")
    assert sp.name == "helloworld.Greeter/SayHello" and sp.status_code is StatusCode.ERROR


def test_plain_http2_stream_is_an_http_span() -> None:
    s = session(
        protocol=Protocol.HTTP2, attributes=(("clovisor.http2.stream_id", 5),),
        request=request("GET", "/a", version="2"), response=response(503, ""),
    )  # fmt: skip
    sp = span(s)
    assert sp.name == "GET" and sp.attributes["network.protocol.version"] == "2"
    assert sp.attributes["clovisor.http2.stream_id"] == 5 and "rpc.system" not in sp.attributes
    assert sp.status_code is StatusCode.ERROR and sp.attributes["error.type"] == "503"


def test_headers_incomplete_is_kept() -> None:
    s = session(protocol=Protocol.HTTP2,
                attributes=(("clovisor.http2.headers_incomplete", True),),
                request=request("GET", "/a", version="2"))  # fmt: skip
    assert span(s).attributes["clovisor.http2.headers_incomplete"] is True


def test_console_and_json_lines_say_grpc() -> None:
    from clovisor.export.console import format_span
    from clovisor.export.jsonlines import session_record

    sp = grpc(4, message="slow")
    line = format_span(sp)
    assert "POST /helloworld.Greeter/SayHello HTTP/2 -> 200 OK grpc DEADLINE_EXCEEDED" in line
    assert session_record(sp)["protocol"] == "grpc"
    tls = span(session(protocol=Protocol.HTTP, protocol_name="tls", request=None, response=None,
                       attributes=(("tls.client.server_name", "api.example.com"),)))
    assert " TLS api.example.com " in format_span(tls)
    assert session_record(tls)["protocol"] == "tls"
