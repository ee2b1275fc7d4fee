"""The agent runtime's own pieces (its behaviour end to end is test_agent_e2e.py)."""

from __future__ import annotations

import pytest

from clovisor.agent.model import JaegerEndpoint
from clovisor.agent.runtime import jaeger_exporter


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        (JaegerEndpoint(), "http://jaeger-collector.clovisor:4317"),
        (JaegerEndpoint(host="10.200.0.9", port=14317), "http://10.200.0.9:14317"),
        (JaegerEndpoint(host="fd00:200::9", port=4317), "http://[fd00:200::9]:4317"),
    ],
)
def test_jaeger_endpoint_is_plaintext_otlp_grpc_with_the_otel_settings(
    endpoint: JaegerEndpoint, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-scope-orgid=node-a")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")
    exporter = jaeger_exporter(endpoint)
    try:
        cfg = exporter.config
        assert (cfg.protocol, cfg.endpoint, cfg.insecure) == ("grpc", url, True)
        assert cfg.headers == (("x-scope-orgid", "node-a"),)
        assert cfg.timeout == 2.5
    finally:
        exporter.shutdown(0)
