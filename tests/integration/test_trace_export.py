"""End to end: ``clovisor trace`` exporting OTLP to real receivers, with ``--metrics``.

The tracer runs in the node namespace, so the OTLP receivers (official
``opentelemetry-proto`` messages, gRPC and HTTP) and the scrapes of
``/metrics`` live there too: a socket made while a thread is inside a
namespace stays in it. Traffic is real curl from the client pod to the
Python demo server in the ``py`` pod.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clovisor.topology import http_get, in_netns
from tests.export.receiver import GrpcReceiver, HttpReceiver, Receiver
from tests.integration.conftest import PORT, SPAN_KIND_SERVER, STATUS_ERROR, Net, TracerFactory

pytestmark = pytest.mark.kernel

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def free_port(ns: str) -> int:
    with in_netns(ns):
        s = socket.socket()
    with closing(s):
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def receivers(net: Net) -> Iterator[dict[str, Receiver]]:
    """One gRPC and one HTTP receiver, listening on the node namespace's loopback."""
    made: dict[str, Receiver] = {}
    try:
        with in_netns(net.topo.node_ns):
            for kind, cls in (("grpc", GrpcReceiver), ("http", HttpReceiver)):
                made[kind] = cls()  # listening from here on
        yield made
    finally:
        for r in made.values():
            r.close()


def py_url(net: Net, path: str) -> str:
    return f"http://{net.py.ipv4}:{PORT}{path}"


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, dict(s.labels), s.value) for s in fam.samples]
    return out


def test_grpc_and_http_at_once_with_resource_parent_and_metrics(
    net: Net, tracer: TracerFactory, receivers: dict[str, Receiver]
) -> None:
    metrics_port = free_port(net.topo.node_ns)
    t = tracer(
        net.py.host_ifname,
        "--output", f"otlp:grpc://127.0.0.1:{receivers['grpc'].port}",
        "--output", f"otlp:http://127.0.0.1:{receivers['http'].port}",
        "--service", "web",
        "--resource-attr", "k8s.pod.name=web-0",
        "--metrics", f"127.0.0.1:{metrics_port}",
        "--route", "/bytes/{size}",
    )
    ns = net.topo.node_ns  # where the tracer listens
    assert http_get(ns, "127.0.0.1", metrics_port, "/healthz")[0] == 200
    assert http_get(ns, "127.0.0.1", metrics_port, "/readyz")[0] == 200

    ids = [17, 256, 4096, 99, 5]
    for n in ids:
        net.curl(py_url(net, f"/bytes/{n}"), "-o", "/dev/null")
    for user in (1, 22, 333):  # folded by the default heuristic into {id}
        net.curl(py_url(net, f"/users/{user}"), "-o", "/dev/null")
    net.curl(py_url(net, "/status/503"), "-o", "/dev/null")
    net.curl(
        py_url(net, "/?token=s3cr3t&page=2"),
        "-o", "/dev/null",
        "-H", f"traceparent: 00-{TRACE_ID}-{PARENT_ID}-01",
        "-H", "tracestate: vendor=x",
        "-H", "Authorization: Bearer hunter2",
        "-H", "Cookie: session=hunter3",
    )
    total = len(ids) + 3 + 1 + 1

    for r in receivers.values():
        assert r.wait_for_spans(total, timeout=15), (r.span_count(), t.stderr)

    # RED metrics scraped while the tracer runs, parsed by prometheus_client.
    status, text = http_get(ns, "127.0.0.1", metrics_port, "/metrics")
    assert status == 200
    fams = families(text)
    counts = {
        (lbl["http_route"], lbl["http_response_status_code"]): value
        for name, lbl, value in fams["http_server_request_duration_seconds"]
        if name.endswith("_count")
    }
    assert counts == {
        ("/bytes/{size}", "200"): len(ids),
        ("/users/{id}", "404"): 3,
        ("/status/{id}", "503"): 1,
        ("/", "200"): 1,
    }
    (svc,) = {
        lbl["service_name"]
        for _, lbl, _ in fams["http_server_request_duration_seconds"]
    }
    assert svc == "web"
    sessions = sum(v for n, _, v in fams["clovisor_sessions_emitted"] if n.endswith("_total"))
    assert sessions == total
    assert sum(v for n, _, v in fams["clovisor_spans_exported"] if n.endswith("_total")) >= total
    assert all(v == 0 for n, _, v in fams["clovisor_events_lost"] if n.endswith("_total"))
    assert "hunter2" not in text and "s3cr3t" not in text

    rc = t.stop()
    assert rc == 0, t.stderr
    assert t.totals["sessions"] == total

    # The same spans on both transports, grouped under one resource.
    by_kind: dict[str, dict[bytes, Any]] = {}
    for kind, r in receivers.items():
        (req_resources,) = {
            tuple(sorted((a.key, a.value.string_value) for a in rs.resource.attributes))
            for req in r.requests()
            for rs in req.resource_spans
        }
        res = dict(req_resources)
        assert res["service.name"] == "web" and res["k8s.pod.name"] == "web-0"
        by_kind[kind] = {sp.span_id: sp for sp in r.spans()}
    assert set(by_kind["grpc"]) == set(by_kind["http"]) and len(by_kind["grpc"]) == total

    spans = list(by_kind["grpc"].values())
    assert all(sp.kind == SPAN_KIND_SERVER for sp in spans)
    (joined,) = [sp for sp in spans if sp.trace_id.hex() == TRACE_ID]
    assert joined.parent_span_id.hex() == PARENT_ID
    assert joined.trace_state == "vendor=x"
    attrs = {a.key: a.value for a in joined.attributes}
    assert attrs["url.query"].string_value == "token=REDACTED&page=2"
    assert not any("authorization" in k or "cookie" in k for k in attrs)
    (failed,) = [
        sp for sp in spans
        if any(a.key == "http.response.status_code" and a.value.int_value == 503
               for a in sp.attributes)
    ]
    assert failed.status.code == STATUS_ERROR
    others = [sp for sp in spans if sp is not joined]
    assert len({sp.trace_id for sp in others}) == len(others), "unrelated requests: new traces"
    assert not any(sp.parent_span_id for sp in others)


def test_receiver_down_at_start_then_up_loses_nothing(
    net: Net, tracer: TracerFactory, receivers: dict[str, Receiver]
) -> None:
    r = receivers["grpc"]
    r.stop()  # Jaeger not up yet when the tracer starts
    t = tracer(net.py.host_ifname, "--output", f"otlp:grpc://127.0.0.1:{r.port}")
    for i in range(5):
        net.curl(py_url(net, f"/bytes/{i}"), "-o", "/dev/null")
    with in_netns(net.topo.node_ns):
        r.start()  # same port: the exporter's retries find it
    assert r.wait_for_spans(5, timeout=20), (r.span_count(), t.stderr)
    assert t.stop() == 0, t.stderr
    assert r.span_count() == 5


def test_json_lines_output_parses_back_and_matches_the_otlp_spans(
    net: Net, tracer: TracerFactory, tmp_path: Path
) -> None:
    lines_path = tmp_path / "sessions.jsonl"
    t = tracer(net.py.host_ifname, "-o", f"json:{lines_path}", "--service", "web")
    net.curl(py_url(net, "/bytes/300"), "-o", "/dev/null")
    net.curl(py_url(net, "/status/503?x=1"), "-o", "/dev/null")
    net.curl("-X", "POST", "--data-binary", "x" * 2000, py_url(net, "/upload"),
             "-o", "/dev/null")
    spans = t.wait_for_spans(3)
    assert len(spans) == 3, t.stderr
    assert t.stop() == 0, t.stderr
    records = [json.loads(line) for line in lines_path.read_text().splitlines()]
    assert len(records) == 3
    by_trace = {r["trace_id"]: r for r in records}
    for sp in spans:  # the OTLP/JSON output of the same run: the same sessions
        r = by_trace[sp.trace_id.hex()]
        assert r["kind"] == "server" and r["service"] == "web"
        assert r["method"] == sp["http.request.method"]
        assert r["status"] == sp["http.response.status_code"]
        assert r["client_address"] == net.client.ipv4 == sp["client.address"]
        assert (r["server_address"], r["server_port"]) == (net.py.ipv4, PORT)
        assert r["request_bytes"] == sp["clovisor.request.bytes"]
        assert r["response_bytes"] == sp["clovisor.response.bytes"]
        assert r["outcome"] == "complete"
        assert r["duration_ms"] == pytest.approx((sp.end_ns - sp.start_ns) / 1e6, abs=0.001)
    urls = sorted(r["url"] for r in records)
    assert urls == ["/bytes/300", "/status/503?x=1", "/upload"]
    upload = next(r for r in records if r["url"] == "/upload")
    assert upload["method"] == "POST" and upload["request_bytes"] > 2000
