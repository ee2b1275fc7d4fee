"""Where the agent's spans go: Redis > OTEL_* endpoint > --jaeger > default, settings for all."""

from __future__ import annotations

from pathlib import Path

import pytest

from clovisor.agent.destination import Destination
from clovisor.agent.model import JaegerEndpoint
from clovisor.export import ExporterConfigError

REDIS = JaegerEndpoint(host="otel.observability", port=4317)
FLAG = JaegerEndpoint(host="10.200.0.9", port=14317)


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        (JaegerEndpoint(), "http://jaeger-collector.clovisor:4317"),
        (JaegerEndpoint(host="10.200.0.9", port=14317), "http://10.200.0.9:14317"),
        (JaegerEndpoint(host="fd00:200::9", port=4317), "http://[fd00:200::9]:4317"),
    ],
)
def test_host_port_endpoints_are_plaintext_otlp_grpc_with_the_otel_settings(
    endpoint: JaegerEndpoint, url: str
) -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-scope-orgid=node-a",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}
    d = Destination.from_environment(endpoint, env)
    for cfg in (d.config(None), Destination.from_environment(None, env).config(endpoint)):
        assert (cfg.protocol, cfg.endpoint, cfg.insecure) == ("grpc", url, True)
        assert cfg.headers == (("x-scope-orgid", "node-a"),)
        assert cfg.timeout == 2.5 and cfg.compression == "gzip"


def test_precedence_redis_then_otel_endpoint_then_flag_then_default() -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4318"}
    with_env = Destination.from_environment(FLAG, otel)
    # 1. Redis names one: it wins, as OTLP/gRPC.
    cfg = with_env.config(REDIS)
    assert (cfg.protocol, cfg.endpoint) == ("grpc", "http://otel.observability:4317")
    assert with_env.source(REDIS) == "Redis clovisor_jaeger_server"
    # 2. Then the OTEL_* endpoint, http/protobuf by default (the specification's).
    cfg = with_env.config(None)
    assert (cfg.protocol, cfg.endpoint) == ("http/protobuf",
                                            "https://collector.example:4318/v1/traces")
    assert with_env.source(None) == "OTEL_EXPORTER_OTLP_ENDPOINT"
    # 3. Then --jaeger / CLOVISOR_JAEGER.
    flag_only = Destination.from_environment(FLAG, {})
    assert flag_only.config(None).endpoint == "http://10.200.0.9:14317"
    assert flag_only.source(None) == "--jaeger or CLOVISOR_JAEGER"
    # 4. Then the default.
    default = Destination.from_environment(None, {})
    assert default.config(None).endpoint == "http://jaeger-collector.clovisor:4317"
    assert default.source(None) == "the default"


def test_otel_protocol_and_traces_endpoint() -> None:
    d = Destination.from_environment(None, {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector.example:4317",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4318",
    })
    cfg = d.config(None)
    assert (cfg.protocol, cfg.endpoint, cfg.insecure) == (
        "grpc", "https://collector.example:4317", False)
    assert d.source(None) == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    # A protocol without an endpoint changes nothing for the host:port endpoints.
    only_protocol = Destination.from_environment(FLAG, {"OTEL_EXPORTER_OTLP_PROTOCOL":
                                                        "http/protobuf"})
    assert only_protocol.config(None).protocol == "grpc"


def test_tls_applies_to_host_port_endpoints_when_asked_for(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    with_ca = Destination.from_environment(FLAG, {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca)})
    for cfg in (with_ca.config(None), with_ca.config(REDIS)):
        assert cfg.endpoint.startswith("https://") and not cfg.insecure
        assert cfg.certificate_file == str(ca)
    secure = Destination.from_environment(FLAG, {"OTEL_EXPORTER_OTLP_INSECURE": "false"})
    assert secure.config(REDIS).endpoint == "https://otel.observability:4317"
    forced = Destination.from_environment(FLAG, {"OTEL_EXPORTER_OTLP_INSECURE": "true",
                                                 "OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca)})
    assert forced.config(REDIS).insecure


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://x"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION"),
        ({"OTEL_EXPORTER_OTLP_INSECURE": "yes"}, "OTEL_EXPORTER_OTLP_INSECURE"),
        ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"}, "/nonexistent/ca.pem"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "authorization"}, "OTEL_EXPORTER_OTLP_HEADERS"),
    ],
)
def test_a_bad_variable_fails_at_start_naming_it(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ExporterConfigError) as info:
        Destination.from_environment(None, env)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_credentials_never_reach_repr_or_describe() -> None:
    d = Destination.from_environment(FLAG, {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cr3t",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:pa55@collector.example:4318",
    })
    cfg = d.config(None)
    assert cfg.headers == (("authorization", "Bearer s3cr3t"),)
    for text in (repr(d), repr(cfg), cfg.describe(), d.source(None)):
        assert "s3cr3t" not in text and "pa55" not in text, text
