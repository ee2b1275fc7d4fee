"""`--output` values: the OTLP kinds, their defaults, and one-line errors."""

from __future__ import annotations

import pytest

from clovisor.specs import OutputSpec, SpecError, parse_output


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [
        ("console", "console", ""),
        ("json", "json", "-"),
        ("json:-", "json", "-"),
        ("json:sessions.jsonl", "json", "sessions.jsonl"),
        ("otlp-json:spans.jsonl", "otlp-json", "spans.jsonl"),
        ("otlp-json:-", "otlp-json", "-"),
        ("otlp:grpc://jaeger:4317", "otlp-grpc", "http://jaeger:4317"),
        ("otlp:grpc://jaeger", "otlp-grpc", "http://jaeger:4317"),
        ("otlp:grpc://jaeger/", "otlp-grpc", "http://jaeger:4317"),
        ("otlp:GRPC://127.0.0.1:14317", "otlp-grpc", "http://127.0.0.1:14317"),
        ("otlp:grpcs://collector.example.com", "otlp-grpc", "https://collector.example.com:4317"),
        ("otlp:grpc://[::1]:4317", "otlp-grpc", "http://[::1]:4317"),
        ("otlp:http://jaeger:4318", "otlp-http", "http://jaeger:4318/v1/traces"),
        ("otlp:http://jaeger", "otlp-http", "http://jaeger:4318/v1/traces"),
        ("otlp:http://jaeger/", "otlp-http", "http://jaeger:4318/v1/traces"),
        (
            "otlp:http://127.0.0.1:8080/otlp/v1/traces",
            "otlp-http",
            "http://127.0.0.1:8080/otlp/v1/traces",
        ),
        ("otlp:https://gw.example.com:443", "otlp-http", "https://gw.example.com:443/v1/traces"),
        ("otlp:http://[fd00::1]", "otlp-http", "http://[fd00::1]:4318/v1/traces"),
        ("otlp", "otlp", ""),
    ],
)
def test_valid_outputs(text: str, kind: str, target: str) -> None:
    assert parse_output(text) == OutputSpec(kind=kind, target=target)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kafka", "unknown output"),
        ("console:x", "unknown output"),
        ("otlp-json:", "needs a path"),
        ("json:", "needs a path"),
        ("jsonl", "unknown output"),
        ("otlp:", "expected otlp:grpc://HOST:PORT"),
        ("otlp:ftp://h", "expected otlp:grpc://HOST:PORT"),
        ("otlp:grpc//h", "expected otlp:grpc://HOST:PORT"),
        ("otlp:jaeger:4317", "expected otlp:grpc://HOST:PORT"),
        ("otlp:grpc://", "missing host"),
        ("otlp:http://:4318", "missing host"),
        ("otlp:http://ja eger", "blank space"),
        ("otlp:http://h_:1", "not a host name"),
        ("otlp:http://h%41", "not a host name"),
        ("otlp:grpc://h:0", "out of range"),
        ("otlp:grpc://h:65536", "out of range"),
        ("otlp:grpc://h:x", "not a number"),
        ("otlp:grpc://h:", "not a number"),
        ("otlp:grpc://h:1:2", "not a number"),
        ("otlp:grpc://h:4317/v1/traces", "gRPC endpoint has no path"),
        ("otlp:http://[::1", "unclosed ["),
        ("otlp:http://[nope]:1", "not an IPv6 address"),
        ("otlp:http://[::1]x", "expected :PORT"),
        ("otlp:http://h/v1/traces?x=1", "no query or fragment"),
        ("otlp:http://h#frag", "no query or fragment"),
        ("otlp:http://user:secret@h", "no user info"),
    ],
)
def test_invalid_outputs_give_one_line_naming_the_value(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_output(text)
    text_of_error = str(info.value)
    assert message in text_of_error
    assert "\n" not in text_of_error
    assert repr(text) in text_of_error or text.partition(":")[0] in text_of_error


def test_user_info_is_not_echoed_back_beyond_the_value() -> None:
    # The value is quoted so the operator sees what was wrong, but the error
    # must point at headers as the place for credentials.
    with pytest.raises(SpecError, match="OTEL_EXPORTER_OTLP_HEADERS"):
        parse_output("otlp:https://u:p@h")


def test_several_outputs_parse_independently() -> None:
    specs = [
        parse_output(t)
        for t in ("console", "otlp:grpc://127.0.0.1:4317", "otlp:http://127.0.0.1:4318")
    ]
    assert [s.kind for s in specs] == ["console", "otlp-grpc", "otlp-http"]
