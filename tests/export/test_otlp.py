"""OTLP/protobuf export: the encoder against the SDK's, the configuration, and
the exporter against real gRPC and HTTP receivers (tests/export/receiver.py)
that stop, restart, fail and hang on demand.

Backoffs and batch intervals are shortened so that the whole file runs in
seconds; the defaults are checked separately.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanContext, StatusCode

from clovisor.core.events import Session
from clovisor.export import Exporter, ExporterConfigError
from clovisor.export import otlp as otlp_module
from clovisor.export.ids import FastIdGenerator
from clovisor.export.otlp import STATS_KEYS, OtlpExporter
from clovisor.export.otlp_config import OtlpConfig, resolve_config
from clovisor.export.otlp_encode import ProtobufSpanEncoder, reference_request
from clovisor.export.record import SpanRecord
from clovisor.export.spans import session_to_span
from tests.conftest import wait_until

from .certs import Pki, make_pki
from .receiver import GrpcReceiver, HttpReceiver, Receiver
from .sessions import RESOURCE, record, request, session, span, to_wall
from .test_export_properties import sessions as session_strategy

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
FAST = {"batch_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2}


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        value: Any = getattr(kv.value, which) if which else None
        if which == "array_value":
            value = [getattr(v, v.WhichOneof("value")) for v in value.values]
        out[kv.key] = value
    return out


def assert_same_request(spans: list[SpanRecord], encoder: ProtobufSpanEncoder) -> None:
    ours = encoder.encode(spans)
    reference = reference_request(spans)
    assert ours == reference
    assert ours.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    )


# --- encoder ----------------------------------------------------------------

ENCODER_IDS = FastIdGenerator(seed=11)
OTHER_RESOURCE = Resource({"service.name": "other", "k8s.pod.name": "other-0"})
EQUAL_RESOURCE = Resource(dict(RESOURCE.attributes))  # equal, not identical


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(session_strategy(), st.sampled_from([RESOURCE, OTHER_RESOURCE, EQUAL_RESOURCE])),
        min_size=1,
        max_size=6,
    )
)
def test_encoder_builds_what_encode_spans_builds(batch: list[tuple[Session, Resource]]) -> None:
    spans = [session_to_span(s, resource=r, to_wall=to_wall, ids=ENCODER_IDS) for s, r in batch]
    encoder = ProtobufSpanEncoder()
    assert_same_request(spans, encoder)
    assert_same_request(spans, encoder)  # again, from the caches


def test_encoder_with_tiny_caches_still_builds_the_same() -> None:
    encoder = ProtobufSpanEncoder(max_cached_pairs=8, max_values_per_key=2, max_value_length=8)
    batch = [
        span(session(client_port=40000 + i, request=request(target=f"/item/{i % 5}")))
        for i in range(64)
    ]
    for _ in range(3):
        assert_same_request(batch, encoder)
    assert encoder.cache_sizes()["pairs"] <= 8


def test_encoder_stops_caching_high_cardinality_keys() -> None:
    encoder = ProtobufSpanEncoder(max_values_per_key=16)
    batch = [span(session(client_port=20000 + i)) for i in range(200)]
    assert_same_request(batch, encoder)
    sizes = encoder.cache_sizes()
    # client.port and network.peer.port stopped at 16 values each.
    assert sizes["pairs"] < 100


@pytest.mark.parametrize(
    "value",
    [
        "text",
        "",
        7,
        -(2**63),
        True,
        False,
        1.5,
        -0.0,
        float("nan"),
        b"\x00\xff",
        ["a", "b"],
        ("a",),
        [1, 2],
        [True, 1.0, "x"],
        [],
        {"k": "v", "n": 1},
        None,
        2**63,  # does not fit int64: dropped, as encode_spans drops it
        "\udc80",  # not UTF-8-encodable: dropped
        ["ok", "\udc80"],
        object(),
    ],
    ids=repr,
)
def test_encoder_matches_encode_spans_on_any_attribute_value(value: Any) -> None:
    encoder = ProtobufSpanEncoder()
    spans = [record({"before": "x", "key": value, "after": 1}) for _ in range(2)]
    logging.disable(logging.CRITICAL)  # both encoders log the dropped attribute
    try:
        assert_same_request(spans, encoder)
    finally:
        logging.disable(logging.NOTSET)


def test_encoder_matches_encode_spans_on_rarer_shapes() -> None:
    remote = SpanContext(int(TRACE, 16), int(PARENT, 16), is_remote=True)
    local = SpanContext(int(TRACE, 16), int(PARENT, 16), is_remote=False)
    schema_resource = Resource({"service.name": "s"}, schema_url="https://r")
    spans = [
        record({"a": 1}, parent=remote, trace_state="vendor=abc,b=c"),
        record({"a": 1}, parent=local, resource=schema_resource),
        record({}, status=StatusCode.ERROR, message="boom"),
        record({"b": "c"}, resource=OTHER_RESOURCE),
    ]
    encoder = ProtobufSpanEncoder()
    assert_same_request(spans, encoder)


# --- configuration ----------------------------------------------------------


def test_flag_endpoint_wins_over_environment() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env-traces:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_INSECURE": "false",
    }
    grpc_config = resolve_config("otlp-grpc", "http://flag:4317", env)
    assert (grpc_config.protocol, grpc_config.endpoint) == ("grpc", "http://flag:4317")
    assert grpc_config.insecure
    http_config = resolve_config("otlp-http", "https://flag:4318/v1/traces", env)
    assert (http_config.protocol, http_config.endpoint) == (
        "http/protobuf",
        "https://flag:4318/v1/traces",
    )


def test_bare_otlp_takes_everything_from_the_environment() -> None:
    assert resolve_config("otlp", "", {}) == OtlpConfig(
        protocol="http/protobuf", endpoint="http://localhost:4318/v1/traces"
    )
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert resolve_config("otlp", "", base).endpoint == "http://collector:4318/v1/traces"
    traces = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://gw/custom/path"}
    assert resolve_config("otlp", "", traces).endpoint == "https://gw/custom/path"

    grpc_env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317",
    }
    config = resolve_config("otlp", "", grpc_env)
    assert (config.protocol, config.endpoint, config.insecure) == (
        "grpc",
        "https://collector:4317",
        False,
    )
    assert resolve_config("otlp", "", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}).endpoint == (
        "http://localhost:4317"
    )


def test_grpc_endpoint_without_scheme_uses_insecure_setting() -> None:
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}
    assert resolve_config("otlp", "", env).insecure is False
    env["OTEL_EXPORTER_OTLP_TRACES_INSECURE"] = "true"
    config = resolve_config("otlp", "", env)
    assert (config.endpoint, config.insecure) == ("http://collector:4317", True)


def test_headers_timeout_compression_from_environment() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "x-generic=1",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Bearer%20s3cret,X-Tenant=a",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "GZIP",
    }
    config = resolve_config("otlp-grpc", "http://h:4317", env)
    assert config.headers == (("authorization", "Bearer s3cret"), ("x-tenant", "a"))
    assert config.timeout == 2.5  # milliseconds, as the specification says
    assert config.compression == "gzip"
    # Credentials stay out of reprs and descriptions (logs, tracebacks).
    assert "s3cret" not in repr(config) and "s3cret" not in config.describe()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"}, "is not supported"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "positive number of milliseconds"),
        ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "-1"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "inf"}, "positive number"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "expected gzip or none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://x"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://:80"}, "with a host"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:99999"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"}, "not a readable file"),
        ({"OTEL_EXPORTER_OTLP_CLIENT_KEY": "/etc/hostname"}, "go together"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "bad name=1"}, "invalid header name"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "k=caf%C3%A9"}, "printable ASCII"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "k=a%0Db"}, "printable ASCII"),
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "novalue"}, "invalid header name 'novalue'"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "=v"}, "invalid header name ''"),
    ],
)
def test_bad_environment_fails_at_construction_in_one_line(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ExporterConfigError) as info:
        OtlpExporter.from_output("otlp", "", environ=env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_credentials_in_an_env_url_are_not_echoed() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://user:pw@h"}
    with pytest.raises(ExporterConfigError) as info:
        resolve_config("otlp", "", env)
    assert "pw" not in str(info.value)


def test_defaults() -> None:
    assert otlp_module.DEFAULT_QUEUE_SIZE == 20_000
    assert otlp_module.DEFAULT_BATCH_SIZE == 512
    assert otlp_module.DEFAULT_BATCH_INTERVAL == 1.0
    assert (otlp_module.DEFAULT_BACKOFF_INITIAL, otlp_module.DEFAULT_BACKOFF_MAX) == (0.5, 30.0)
    assert otlp_module.DEFAULT_SHUTDOWN_TIMEOUT == 5.0
    assert resolve_config("otlp", "", {}).timeout == 10.0


# --- the exporter against real receivers -------------------------------------


@pytest.fixture(params=["grpc", "http"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    cls = GrpcReceiver if request.param == "grpc" else HttpReceiver
    with cls() as r:
        yield r


def exporter_for(
    r: Receiver, environ: dict[str, str] | None = None, **options: Any
) -> OtlpExporter:
    if isinstance(r, GrpcReceiver):
        kind, target = "otlp-grpc", r.endpoint
    else:
        assert isinstance(r, HttpReceiver)
        kind, target = "otlp-http", r.url
    return OtlpExporter.from_output(kind, target, environ=environ or {}, **{**FAST, **options})


@pytest.fixture
def make_exporter() -> Iterator[Callable[..., OtlpExporter]]:
    made: list[OtlpExporter] = []

    def make(r: Receiver, environ: dict[str, str] | None = None, **options: Any) -> OtlpExporter:
        e = exporter_for(r, environ, **options)
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown(timeout=0.5)


def many(n: int, **overrides: Any) -> list[SpanRecord]:
    ids = FastIdGenerator()  # distinct ids across calls
    return [span(session(client_port=1024 + i % 60000, **overrides), ids=ids) for i in range(n)]


def settled(e: OtlpExporter, total: int) -> dict[str, int]:
    """Stats once shut down; every span is accounted for exactly once."""
    stats = e.stats()
    assert stats["queue_size"] == 0
    assert stats["spans_exported"] + stats["spans_failed"] + stats["spans_dropped"] == total
    return stats


def test_exporter_implements_the_protocol(receiver: Receiver) -> None:
    e = exporter_for(receiver)
    try:
        assert isinstance(e, Exporter)
        assert set(e.stats()) == set(STATS_KEYS)
        e.export([])
        assert e.stats()["queue_size"] == 0
    finally:
        e.shutdown()


def test_spans_arrive_with_resource_and_remote_parent(
    receiver: Receiver, make_exporter: Callable[..., OtlpExporter]
) -> None:
    resource = Resource(
        {"service.name": "productpage", "k8s.pod.name": "productpage-0", "k8s.node.name": "n1"}
    )
    joined = span(
        session(request=request(headers=(("traceparent", f"00-{TRACE}-{PARENT}-01"),))),
        resource=resource,
    )
    root = span(resource=resource)
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20t0ken,x-tenant=team-a"}
    e = make_exporter(receiver, env)
    e.export([joined, root])
    assert e.flush(5)
    assert receiver.wait_for_spans(2)

    [received] = receiver.received
    assert received.headers["authorization"] == "Bearer t0ken"
    assert received.headers["x-tenant"] == "team-a"
    assert "clovisor/" in received.headers["user-agent"]
    [rs] = received.request.resource_spans
    assert attrs(rs.resource.attributes) == dict(resource.attributes)
    [ss] = rs.scope_spans
    assert ss.scope.name == "clovisor"
    pb_joined, pb_root = ss.spans
    assert pb_joined.trace_id.hex() == TRACE
    assert pb_joined.parent_span_id.hex() == PARENT
    assert pb_joined.flags & 0x300 == 0x300  # parent is remote
    assert pb_joined.kind == PbSpan.SpanKind.SPAN_KIND_SERVER
    assert pb_root.parent_span_id == b"" and pb_root.flags & 0x300 == 0x100
    assert attrs(pb_root.attributes)["http.request.method"] == "GET"
    assert received.request == reference_request([joined, root])
    e.shutdown()
    assert settled(e, 2)["spans_exported"] == 2


def test_gzip_compression_from_environment(
    receiver: Receiver, make_exporter: Callable[..., OtlpExporter]
) -> None:
    e = make_exporter(receiver, {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    e.export(many(300))
    assert e.flush(5)
    assert receiver.span_count() == 300
    if isinstance(receiver, HttpReceiver):
        assert receiver.received[0].headers["content-encoding"] == "gzip"


def test_several_exporters_at_once(make_exporter: Callable[..., OtlpExporter]) -> None:
    with GrpcReceiver() as g, HttpReceiver() as h:
        exporters = [make_exporter(g), make_exporter(h), make_exporter(g)]
        batch = many(700)
        for e in exporters:
            e.export(batch)
        for e in exporters:
            assert e.flush(5)
        assert g.span_count() == 1400
        assert h.span_count() == 700
        ids = {s.span_id for s in h.spans()}
        assert ids == {s.span_id for s in g.spans()} and len(ids) == 700


def test_receiver_restart_loses_nothing(
    receiver: Receiver, make_exporter: Callable[..., OtlpExporter]
) -> None:
    # A 1 s backoff: an export() that waited behind the retrying sender would take that long.
    e = make_exporter(receiver, backoff_initial=1.0, backoff_max=1.0)
    e.export(many(100))
    assert e.flush(5)
    receiver.stop()
    down_for = 2.0
    batches = [many(50) for _ in range(20)]
    started = time.monotonic()
    for batch in batches:
        t0 = time.perf_counter()
        e.export(batch)
        assert time.perf_counter() - t0 < 0.3
        time.sleep(down_for / len(batches))
    assert e.stats()["send_retries"] >= 2
    receiver.start()  # same port
    assert e.flush(5)
    assert time.monotonic() - started < down_for + 3
    assert receiver.span_count() == 100 + 20 * 50
    assert len({s.span_id for s in receiver.spans()}) == 1100
    e.shutdown()
    stats = settled(e, 1100)
    assert (stats["spans_exported"], stats["spans_dropped"], stats["spans_failed"]) == (1100, 0, 0)


def test_receiver_that_never_returns_bounds_memory_and_export_stays_fast(
    receiver: Receiver,
) -> None:
    receiver.stop()
    # A 1 s backoff: an export() that waited behind the retrying sender would take that long.
    e = exporter_for(
        receiver, queue_size=1000, batch_size=100, backoff_initial=1.0, backoff_max=1.0
    )
    total = 0
    slowest = 0.0
    for _ in range(60):
        batch = many(100)
        t0 = time.perf_counter()
        e.export(batch)
        slowest = max(slowest, time.perf_counter() - t0)
        total += len(batch)
        time.sleep(0.04)
    stats = e.stats()
    assert slowest < 0.3, f"export() took {slowest * 1e3:.1f} ms while the sender was retrying"
    assert stats["queue_size"] <= 1000
    assert stats["spans_exported"] == 0
    assert stats["send_retries"] >= 2
    # Everything beyond the queue and the one batch in flight was dropped.
    assert stats["spans_dropped"] >= total - 1000 - 100

    t0 = time.monotonic()
    e.shutdown(timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + 0.5
    stats = settled(e, total)
    assert stats["spans_dropped"] == total


def test_oldest_spans_are_the_ones_dropped(receiver: Receiver) -> None:
    receiver.stop()
    e = exporter_for(receiver, queue_size=200, batch_size=50)
    old, new = many(500), many(200, client_addr="10.9.9.9")
    e.export(old)
    # The sender takes one batch of the old ones and retries it.
    assert wait_until(lambda: e.stats()["send_retries"] >= 1, 5)
    e.export(new)
    receiver.start()
    assert e.flush(5)
    e.shutdown()
    received = receiver.spans()
    # The batch that was in flight, then all the new spans: none of the
    # old spans that were only queued survived.
    new_ids = {s.span_id.to_bytes(8, "big") for s in new}
    got = [s.span_id for s in received]
    assert set(got[-200:]) == new_ids
    assert len(got) == 250
    stats = settled(e, 700)
    assert stats["spans_dropped"] == 450


@pytest.mark.parametrize("mode", ["unavailable", "throttled"])
def test_transient_errors_are_retried(
    receiver: Receiver, make_exporter: Callable[..., OtlpExporter], mode: Any
) -> None:
    receiver.fail(mode, times=2)
    e = make_exporter(receiver)
    e.export(many(40))
    assert e.flush(5)
    assert receiver.span_count() == 40
    assert receiver.attempts == 3
    stats = e.stats()
    assert (stats["send_retries"], stats["spans_exported"], stats["spans_failed"]) == (2, 40, 0)


def test_retry_hint_from_the_receiver_is_honoured(
    receiver: Receiver, make_exporter: Callable[..., OtlpExporter]
) -> None:
    receiver.fail("throttled", times=1, retry_after=0.4)
    e = make_exporter(receiver, backoff_initial=0.01, backoff_max=1.0)
    t0 = time.monotonic()
    e.export(many(5))
    assert receiver.wait_for_spans(5)
    assert time.monotonic() - t0 >= 0.4


def test_permanent_error_drops_the_batch_and_counts_it(
    receiver: Receiver, make_exporter: Callable[..., OtlpExporter], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.fail("invalid", times=1)
    e = make_exporter(receiver)
    e.export(many(30))
    assert e.flush(5)
    assert receiver.attempts == 1  # not retried
    e.export(many(20))
    assert e.flush(5)
    stats = e.stats()
    assert (stats["spans_failed"], stats["spans_exported"], stats["send_retries"]) == (30, 20, 0)
    assert "refused 30 spans" in caplog.text


def test_partial_success_counts_the_rejected_spans(
    receiver: Receiver, make_exporter: Callable[..., OtlpExporter]
) -> None:
    receiver.reject(3)
    e = make_exporter(receiver)
    e.export(many(10))
    assert e.flush(5)
    stats = e.stats()
    assert (stats["spans_exported"], stats["spans_failed"]) == (7, 3)


def test_shutdown_flushes_what_is_queued(receiver: Receiver) -> None:
    # A long batch interval: nothing would leave before shutdown on its own.
    e = exporter_for(receiver, batch_interval=60.0, batch_size=10_000)
    e.export(many(1500))
    time.sleep(0.1)
    assert receiver.span_count() == 0
    t0 = time.monotonic()
    e.shutdown(timeout=5.0)
    assert time.monotonic() - t0 < 2.0
    assert receiver.span_count() == 1500
    assert settled(e, 1500)["spans_exported"] == 1500
    e.export(many(3))  # after shutdown: ignored, counted
    assert settled(e, 1503)["spans_dropped"] == 3


def test_shutdown_returns_within_its_timeout_when_the_receiver_hangs(
    receiver: Receiver,
) -> None:
    receiver.fail("hang")
    e = exporter_for(receiver)
    e.export(many(50))
    assert receiver.wait_for_attempts(1)
    t0 = time.monotonic()
    e.shutdown(timeout=0.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5 + 0.5, elapsed  # not the hang (30 s) nor the RPC timeout (10 s)
    assert settled(e, 50)["spans_dropped"] == 50


def test_shutdown_retries_at_once_when_the_receiver_is_back(receiver: Receiver) -> None:
    # A long backoff is in progress when shutdown begins; the receiver is
    # back by then, so shutdown must not wait the backoff out.
    receiver.stop()
    e = exporter_for(receiver, backoff_initial=10.0, backoff_max=10.0)
    e.export(many(20))
    time.sleep(0.3)
    receiver.start()
    t0 = time.monotonic()
    e.shutdown(timeout=3.0)
    assert time.monotonic() - t0 < 2.0
    assert receiver.span_count() == 20
    assert settled(e, 20)["spans_exported"] == 20


def test_batch_given_up_after_max_retry_time_then_export_resumes(receiver: Receiver) -> None:
    receiver.fail("unavailable")
    e = exporter_for(receiver, max_retry_time=0.3)
    t0 = time.monotonic()
    e.export(many(10))
    assert wait_until(lambda: e.stats()["spans_dropped"] >= 10, 5)
    assert e.stats()["spans_dropped"] == 10
    assert time.monotonic() - t0 >= 0.3  # given up after max_retry_time, not before
    assert e.stats()["spans_exported"] == 0
    receiver.heal()
    e.export(many(5))
    assert e.flush(5)
    e.shutdown()
    stats = settled(e, 15)
    assert (stats["spans_exported"], stats["spans_dropped"]) == (5, 10)


def test_batches_over_the_request_size_limit_are_split(
    receiver: Receiver, make_exporter: Callable[..., OtlpExporter]
) -> None:
    e = make_exporter(receiver, max_request_bytes=40_000)
    batch = many(400)
    e.export(batch)
    assert e.flush(5)
    sizes = [len(r.request.SerializeToString()) for r in receiver.received]
    assert len(sizes) > 1 and max(sizes) <= 40_000
    assert receiver.span_count() == 400
    assert [s.span_id for s in receiver.spans()] == [
        s.span_id.to_bytes(8, "big") for s in batch
    ]


def test_grpc_over_ipv6_loopback(make_exporter: Callable[..., OtlpExporter]) -> None:
    try:
        r = GrpcReceiver(host="::1")
    except (OSError, RuntimeError):
        pytest.skip("no IPv6 loopback")
    with r:
        e = make_exporter(r)
        e.export(many(3))
        assert e.flush(5)
        assert r.span_count() == 3


def test_http_over_ipv6_loopback(make_exporter: Callable[..., OtlpExporter]) -> None:
    try:
        r = HttpReceiver(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with r:
        e = make_exporter(r)
        e.export(many(3))
        assert e.flush(5)
        assert r.span_count() == 3


# --- TLS, configured through OTEL_EXPORTER_OTLP_* alone ------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_env(r: Receiver, pki: Pki, **extra: str) -> dict[str, str]:
    grpc_ = isinstance(r, GrpcReceiver)
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": r.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc" if grpc_ else "http/protobuf",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key),
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cr3t",
        **extra,
    }


@pytest.mark.parametrize("cls", [GrpcReceiver, HttpReceiver])
def test_mutual_tls_and_auth_header_from_the_environment_alone(
    cls: type[Receiver], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with cls(tls=pki) as r:  # type: ignore[call-arg]
        config = resolve_config("otlp", "", tls_env(r, pki))
        assert config.endpoint.startswith("https://") and not config.insecure
        e = OtlpExporter(config, **FAST)
        e.export(many(3))
        assert e.flush(5)
        e.shutdown()
        assert settled(e, 3)["spans_exported"] == 3
        assert r.span_count() == 3
        assert {x.headers["authorization"] for x in r.received} == {"Bearer s3cr3t"}
    assert "s3cr3t" not in caplog.text and "s3cr3t" not in repr(config)


@pytest.mark.parametrize("cls", [GrpcReceiver, HttpReceiver])
@pytest.mark.parametrize("missing", ["OTEL_EXPORTER_OTLP_CERTIFICATE", "client certificate"])
def test_tls_fails_without_the_ca_or_without_a_client_certificate(
    cls: type[Receiver], pki: Pki, missing: str
) -> None:
    with cls(tls=pki) as r:  # type: ignore[call-arg]
        env = tls_env(r, pki)
        if missing == "client certificate":
            del env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"], env["OTEL_EXPORTER_OTLP_CLIENT_KEY"]
        else:
            del env[missing]
        e = OtlpExporter(resolve_config("otlp", "", env), **FAST)
        e.export(many(2))
        # Tried, refused at the handshake, retried: never delivered in the clear.
        assert wait_until(lambda: e.stats()["send_retries"] >= 2, 10), e.stats()
        e.shutdown(timeout=0.5)
        assert settled(e, 2)["spans_exported"] == 0
        assert r.span_count() == 0
