"""The agent runtime's own pieces (its behaviour end to end is test_agent_e2e.py)."""

from __future__ import annotations

import pytest

from clovisor.agent.model import JaegerEndpoint
from clovisor.agent.runtime import Waiting, jaeger_exporter


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


def test_a_pod_waiting_for_its_veth_is_overdue_after_warn_after() -> None:
    waiting = Waiting(warn_after=10.0)
    assert waiting.update(["default/a"], now=100.0) == [("default/a", False)]
    assert waiting.update(["default/a", "default/b"], now=109.9) == [
        ("default/a", False),
        ("default/b", False),
    ]
    assert waiting.update(["default/a", "default/b"], now=110.0) == [
        ("default/a", True),
        ("default/b", False),
    ]
    assert waiting.update(["default/b"], now=120.0) == [("default/b", True)]


def test_a_pod_that_found_its_veth_and_lost_it_again_waits_afresh() -> None:
    waiting = Waiting(warn_after=10.0)
    waiting.update(["default/a"], now=0.0)
    assert waiting.update([], now=5.0) == []
    assert waiting.update(["default/a"], now=12.0) == [("default/a", False)]
    assert waiting.update(["default/a"], now=22.0) == [("default/a", True)]

