"""The status server on loopback: /metrics, /healthz, /readyz."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clovisor.health import Health, StatusServer, serve
from clovisor.metrics import Metrics
from tests.export.sessions import session


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(srv: StatusServer, path: str, method: str = "GET", **headers: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> Health:
    return Health(stale_after=5, clock=clock)


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.register_health(lambda: {"segments": 42, "export_queue_size": 1})
    return m


@pytest.fixture
def server(metrics: Metrics, health: Health) -> Iterator[StatusServer]:
    with serve("127.0.0.1", 0, metrics=metrics, health=health) as srv:
        yield srv


def test_metrics_endpoint(server: StatusServer, metrics: Metrics) -> None:
    metrics.observe_sessions([session(), session()], lambda s: ("web", ""))
    status, ctype, body = get(server, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    count = next(
        s.value
        for s in fams["http_server_request_duration_seconds"].samples
        if s.name.endswith("_count")
    )
    assert count == 2
    assert fams["clovisor_segments"].samples[0].value == 42
    status, ctype, body = get(server, "/metrics", Accept="application/openmetrics-text")
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_liveness_follows_heartbeats(
    server: StatusServer, health: Health, clock: FakeClock
) -> None:
    assert get(server, "/healthz")[0] == 200  # no loop yet: the process is alive
    health.beat("ring")
    health.beat("tracker")
    clock.now += 4
    health.beat("ring")
    assert get(server, "/healthz")[0] == 200
    clock.now += 2  # tracker last beat 6 s ago
    status, _, body = get(server, "/healthz")
    assert status == 503 and "tracker" in body and "ring" not in body
    health.retire("tracker")
    assert get(server, "/healthz")[0] == 200


def test_readiness(server: StatusServer, health: Health) -> None:
    assert get(server, "/readyz")[0] == 503  # before tracing is attached
    health.set_ready(True)
    assert get(server, "/readyz") == (200, "text/plain; charset=utf-8", "ok\n")
    health.set_ready(False)  # shutting down
    assert get(server, "/readyz")[0] == 503
    health.set_ready(False, "waiting for the Kubernetes API")  # the agent says why
    assert get(server, "/readyz")[1:] == (
        "text/plain; charset=utf-8", "waiting for the Kubernetes API\n")
    assert get(server, "/readyz")[0] == 503


def test_head_and_unknown_paths(server: StatusServer) -> None:
    status, _, body = get(server, "/healthz", method="HEAD")
    assert status == 200 and body == ""
    assert get(server, "/")[0] == 404
    assert get(server, "/metrics/../secret")[0] == 404
    assert get(server, "/healthz?verbose=1")[0] == 200


def test_without_metrics() -> None:
    with serve("127.0.0.1", 0) as srv:
        assert get(srv, "/metrics")[0] == 404
        assert get(srv, "/healthz")[0] == 200


def test_broken_metrics_gives_500_and_server_survives(health: Health) -> None:
    class Broken(Metrics):
        def render(self, accept: str = "") -> tuple[bytes, str]:
            raise RuntimeError("boom")

    with serve("127.0.0.1", 0, metrics=Broken(), health=health) as srv:
        assert get(srv, "/metrics")[0] == 500
        assert get(srv, "/healthz")[0] == 200


def test_close_frees_the_port() -> None:
    srv = serve("127.0.0.1", 0)
    port = srv.port
    srv.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_busy_port_raises() -> None:
    with serve("127.0.0.1", 0) as srv, pytest.raises(OSError):
        serve("127.0.0.1", srv.port)


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = serve("::1", 0)
    except OSError as exc:
        pytest.skip(f"::1 unavailable: {exc}")
    with srv:
        assert get(srv, "/healthz")[0] == 200


def test_stale_after_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Health(stale_after=0)
