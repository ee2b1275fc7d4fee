"""Metrics: RED histograms and outcome counts match the sessions fed; health is live."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from clovisor.core.events import Outcome, Protocol, Role, Session
from clovisor.metrics import (
    BUCKETS,
    LABELS,
    MAX_RPC_METHODS,
    OVERFLOW_ROUTE,
    RPC_LABELS,
    Metrics,
    Unseen,
    parse_listen_address,
)
from clovisor.routes import RouteFolder
from clovisor.specs import SpecError
from tests.export.sessions import request, response, session

SERVER = "http_server_request_duration_seconds"
CLIENT = "http_client_request_duration_seconds"


def families(m: Metrics) -> dict[str, Metric]:
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def counts(m: Metrics, name: str) -> dict[tuple[str, ...], float]:
    """label values (in LABELS order, but service_namespace) -> _count of one histogram.

    Every session here is in namespace "default" (test_namespaces_keep_services_apart
    is about the namespace label)."""
    fam = families(m).get(name)
    if fam is None:
        return {}
    out = {}
    for s in fam.samples:
        if s.name == name + "_count":
            assert s.labels["service_namespace"] == "default"
            out[tuple(s.labels[k] for k in LABELS if k != "service_namespace")] = s.value
    return out


def service(s: Session) -> tuple[str, str]:
    return ("web" if s.ifindex == 7 else "other"), "default"


def timed(ms: float, **kw: object) -> Session:
    return session(start_ns=1_000_000_000, end_ns=1_000_000_000 + int(ms * 1e6), **kw)


def test_histograms_count_and_buckets() -> None:
    m = Metrics(RouteFolder(["/users/{id}"]))
    batch = [
        timed(3, request=request(target="/users/1?token=abc")),
        timed(30, request=request(target="/users/2")),
        timed(30, request=request(target="/users/2"), response=response(503)),
        timed(20_000, request=request("POST", "/orders/77")),
        timed(1, role=Role.CLIENT, request=request(target="/v1/x")),
    ]
    m.observe_sessions(batch[:2], service)
    m.observe_sessions(batch[2:], service)
    assert counts(m, SERVER) == {
        ("web", "GET", "200", "/users/{id}"): 2,
        ("web", "GET", "503", "/users/{id}"): 1,
        ("web", "POST", "200", "/orders/{id}"): 1,
    }
    assert counts(m, CLIENT) == {("web", "GET", "200", "/v1/x"): 1}

    fam = families(m)[SERVER]
    buckets = {
        s.labels["le"]: s.value
        for s in fam.samples
        if s.name == SERVER + "_bucket"
        and s.labels["http_response_status_code"] == "200"
        and s.labels["http_route"] == "/users/{id}"
    }
    assert list(buckets) == [*(repr(b) for b in BUCKETS), "+Inf"]
    assert buckets["0.005"] == 1  # 3 ms
    assert buckets["0.025"] == 1 and buckets["0.05"] == 2  # 30 ms
    assert buckets["+Inf"] == 2
    total = next(
        s.value
        for s in fam.samples
        if s.name == SERVER + "_sum"
        and s.labels["http_route"] == "/users/{id}"
        and s.labels["http_response_status_code"] == "200"
    )
    assert total == pytest.approx(0.033)
    slow = {
        s.labels["le"]: s.value
        for s in fam.samples
        if s.name == SERVER + "_bucket" and s.labels["http_request_method"] == "POST"
    }
    assert slow["10.0"] == 0 and slow["+Inf"] == 1  # beyond the last bound


def test_label_set_is_exact() -> None:
    m = Metrics()
    m.observe_sessions([session()], service)
    fam = families(m)[SERVER]
    for s in fam.samples:
        assert set(s.labels) - {"le"} == set(LABELS)


def test_failures_and_outcomes() -> None:
    m = Metrics()
    batch = [
        session(),
        session(outcome=Outcome.RESET, response=None),
        session(outcome=Outcome.TIMEOUT, response=None, ifindex=8),
        session(outcome=Outcome.CLOSED),  # partial response: its status is known
        session(outcome=Outcome.SHUTDOWN, response=None),
        session(protocol=Protocol.TCP, request=None, response=None, outcome=Outcome.CLOSED),
        session(request=request("BREW", "/pot")),
    ]
    m.observe_sessions(batch, service)
    assert counts(m, SERVER) == {
        ("web", "GET", "200", "/index.html"): 2,  # complete + closed mid-body
        ("web", "GET", "", "/index.html"): 1,  # reset before the status line
        ("other", "GET", "", "/index.html"): 1,  # timeout
        ("web", "_OTHER", "200", "/pot"): 1,  # unknown methods never become labels
    }  # the shutdown and the TCP session are not latency observations
    fam = families(m)["clovisor_sessions"]
    got = {
        (s.labels["service_name"], s.labels["outcome"]): s.value
        for s in fam.samples
        if s.name == "clovisor_sessions_total"
    }
    assert got == {
        ("web", "complete"): 2,
        ("web", "reset"): 1,
        ("other", "timeout"): 1,
        ("web", "closed"): 2,
        ("web", "shutdown"): 1,
    }


targets = st.tuples(
    st.lists(
        st.one_of(st.integers(0, 10**9).map(str), st.sampled_from(["a", "users", "v1"])),
        max_size=4,
    ),
    st.text(min_size=1, max_size=30),
).map(lambda t: "/" + "/".join(t[0]) + "?secret=" + t[1])
header_values = st.text(min_size=8, max_size=30).map(lambda v: "HV" + v)


@given(
    st.lists(
        st.tuples(
            targets,
            header_values,
            st.sampled_from(["GET", "POST", "PURGE", "get"]),
            st.one_of(st.none(), st.integers(100, 999)),
            st.sampled_from(list(Outcome)),
            st.sampled_from(list(Role)),
            st.integers(0, 20_000_000_000),
        ),
        min_size=1,
        max_size=40,
    )
)
@settings(max_examples=60, deadline=None)
def test_counts_match_and_labels_stay_clean(
    specs: list[tuple[str, str, str, int | None, Outcome, Role, int]],
) -> None:
    m = Metrics()
    batch: list[Session] = []
    for target, hv, method, status, outcome, role, dur in specs:
        req = request(
            method,
            target,
            headers=(("host", hv), ("user-agent", hv), ("authorization", hv), ("x-request-id", hv)),
        )
        resp = (
            response(status, headers=(("set-cookie", hv), ("content-type", hv))) if status else None
        )
        batch.append(
            session(
                request=req, response=resp, outcome=outcome, role=role, end_ns=1_000_000_000 + dur
            )
        )
    m.observe_sessions(batch, service)

    expected: Counter[Role] = Counter(s.role for s in batch if s.outcome is not Outcome.SHUTDOWN)
    assert sum(counts(m, SERVER).values()) == expected[Role.SERVER]
    assert sum(counts(m, CLIENT).values()) == expected[Role.CLIENT]
    outcome_total = sum(
        s.value
        for s in families(m)["clovisor_sessions"].samples
        if s.name == "clovisor_sessions_total"
    )
    assert outcome_total == len(batch)

    secrets = {hv for _, hv, *_ in specs} | {t.partition("?")[2] for t, *_ in specs}
    for fam in families(m).values():
        for sample in fam.samples:
            for value in sample.labels.values():
                assert "?" not in value and "HV" not in value
                assert not any(secret in value for secret in secrets if len(secret) > 8)


def test_overflow_series() -> None:
    m = Metrics(max_series=3)
    m.observe_sessions([session(request=request(target=f"/p{i}")) for i in range(10)], service)
    got = counts(m, SERVER)
    assert len(got) == 4
    assert got[("web", "_OTHER", "_OTHER", OVERFLOW_ROUTE)] == 7


def test_health_sources_read_at_scrape() -> None:
    m = Metrics()
    live = {"segments": 1, "events_lost": 0, "export_queue_size": 3, "custom_thing": 5}
    m.register_health(lambda: dict(live))
    m.register_health(lambda: {"segments": 10, "spans_exported": 4, "Bad-Key": 1})

    def broken() -> dict[str, int]:
        raise RuntimeError("boom")

    m.register_health(broken)
    fam = families(m)
    assert fam["clovisor_segments"].type == "counter"
    assert fam["clovisor_segments"].samples[0].value == 11
    assert fam["clovisor_segments"].samples[0].name == "clovisor_segments_total"
    assert fam["clovisor_export_queue_size"].type == "gauge"
    assert fam["clovisor_export_queue_size"].samples[0].value == 3
    assert fam["clovisor_spans_exported"].samples[0].value == 4
    assert fam["clovisor_custom_thing"].type == "gauge"
    assert fam["clovisor_build_info"].samples[0].labels["version"]
    assert not any("bad" in name.lower() for name in fam)
    live["segments"] = 100  # live values, not a snapshot taken at registration
    assert families(m)["clovisor_segments"].samples[0].value == 110


def test_registries_are_private() -> None:
    before = {f.name for f in REGISTRY.collect()}
    a, b = Metrics(), Metrics()
    a.observe_sessions([session()], service)
    assert counts(a, SERVER) and not counts(b, SERVER)
    assert {f.name for f in REGISTRY.collect()} == before


def test_openmetrics_on_request() -> None:
    m = Metrics()
    m.observe_sessions([session()], service)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_concurrent_scrapes_see_consistent_histograms() -> None:
    m = Metrics()
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            m.observe_sessions([timed(i % 50) for i in range(100)], service)

    t = threading.Thread(target=feed)
    t.start()
    try:
        for _ in range(30):
            fam = families(m).get(SERVER)
            if fam is None:
                continue
            inf = [s.value for s in fam.samples if s.labels.get("le") == "+Inf"]
            cnt = [s.value for s in fam.samples if s.name.endswith("_count")]
            assert inf == cnt
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("localhost:80", ("localhost", 80)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_parse_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    "bad", ["9464", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:70000", "::1:9464", "[::1]", "a b:1"]
)
def test_parse_listen_address_errors(bad: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_listen_address(bad)
    assert "\n" not in str(exc.value) and repr(bad) in str(exc.value)


def test_lost_responses_reach_the_scrape_as_a_counter() -> None:
    """A response the ring lost is counted by the tracker and scraped from the Tracer."""
    from clovisor.core.events import Direction
    from clovisor.pipeline import Tracer, TracerSettings
    from tests.core.wire import Conversation

    c = Conversation()
    get = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    segs = c.handshake() + c.request(get)
    c.send(Direction.RESPONSE, ok)  # the ring lost it
    segs += c.request(get) + c.response(ok)
    tracer = Tracer(TracerSettings(), [])
    sessions = tracer.tracker.feed_many(segs)
    assert len(sessions) == 1
    m = Metrics()
    m.register_health(tracer.health_stats)
    fam = families(m)["clovisor_lost_responses"]
    assert fam.type == "counter"
    assert fam.samples[0].value == 1


def test_namespaces_keep_services_apart() -> None:
    # Two Services called "web", in namespaces default and shop: two series each.
    m = Metrics()
    m.observe_sessions(
        [session(ifindex=7), session(ifindex=7), session(ifindex=9)],
        lambda s: ("web", "default" if s.ifindex == 7 else "shop"),
    )
    fam = families(m)[SERVER]
    got = {
        (s.labels["service_name"], s.labels["service_namespace"]): s.value
        for s in fam.samples
        if s.name == SERVER + "_count"
    }
    assert got == {("web", "default"): 2, ("web", "shop"): 1}
    outcomes = {
        (s.labels["service_name"], s.labels["service_namespace"], s.labels["outcome"]): s.value
        for s in families(m)["clovisor_sessions"].samples
        if s.name == "clovisor_sessions_total"
    }
    assert outcomes == {("web", "default", "complete"): 2, ("web", "shop", "complete"): 1}


def test_process_and_python_collectors() -> None:
    fams = families(Metrics())
    assert fams["process_cpu_seconds"].samples[0].value >= 0
    assert fams["process_resident_memory_bytes"].samples[0].value > 0
    assert fams["process_open_fds"].samples[0].value > 0
    (info,) = fams["python_info"].samples
    assert info.labels["implementation"] == "CPython"
    assert "python_gc_objects_collected" in fams


def test_exchanges_the_kernel_counted_but_no_session_stands_for_are_added() -> None:
    """Past capacity: shed records are counted by the kernel, once, with no route."""
    m = Metrics()
    m.observe_sessions([timed(3, request=request(target="/a")),
                        timed(3, request=request(target="/a"), response=response(404))], service)
    shed = [
        Unseen(Role.SERVER, "web", "default", "GET", "200", 0.006, (2, *([0] * 14))),
        Unseen(Role.SERVER, "web", "default", "GET", "404", 0.2, (0, 0, 0, 0, 0, 0, 1,
                                                                   *([0] * 8))),
        Unseen(Role.CLIENT, "web", "default", "_OTHER", "503", 12.0, (*([0] * 14), 1)),
    ]
    m.register_unseen(lambda: shed)
    assert counts(m, SERVER) == {
        ("web", "GET", "200", "/a"): 1,
        ("web", "GET", "404", "/a"): 1,
        ("web", "GET", "200", ""): 2,
        ("web", "GET", "404", ""): 1,
    }
    assert counts(m, CLIENT) == {("web", "_OTHER", "503", ""): 1}
    buckets = {
        s.labels["le"]: s.value for s in families(m)[SERVER].samples
        if s.name == SERVER + "_bucket" and s.labels["http_route"] == ""
        and s.labels["http_response_status_code"] == "404"
    }
    assert buckets["0.1"] == 0 and buckets["0.25"] == 1  # cumulative, like the others
    # A session with an empty route (its target was never captured) shares the
    # series: the two are added, not one in place of the other.
    m.observe_sessions([timed(3, request=request(target=""))], service)
    assert counts(m, SERVER)[("web", "GET", "200", "")] == 3
    # A failing source costs only its own rows.
    m.register_unseen(lambda: [1 / 0])  # type: ignore[list-item]
    assert counts(m, SERVER)[("web", "GET", "200", "")] == 3


RPC_SERVER = "rpc_server_call_duration_seconds"
RPC_CLIENT = "rpc_client_call_duration_seconds"


def rpc_call(method: str, code: int | None, *, ms: float = 2, role: Role = Role.SERVER,
             outcome: Outcome = Outcome.COMPLETE) -> Session:
    service, _, name = method.partition("/")
    attrs: list[tuple[str, str | int | float | bool]] = [
        ("rpc.system", "grpc"), ("rpc.service", service), ("rpc.method", name)]
    if code is not None:
        attrs.append(("rpc.grpc.status_code", code))
    return timed(ms, role=role, protocol=Protocol.GRPC, outcome=outcome,
                 request=request("POST", "/" + method, version="2"),
                 attributes=tuple(attrs))  # fmt: skip


def rpc_counts(m: Metrics, name: str) -> dict[tuple[str, ...], float]:
    fam = families(m).get(name)
    assert fam is not None
    out = {}
    for s in fam.samples:
        if s.name == name + "_count":
            assert set(s.labels) == set(RPC_LABELS)
            assert s.labels["rpc_system_name"] == "grpc"
            out[(s.labels["service_name"], s.labels["rpc_method"],
                 s.labels["rpc_response_status_code"])] = s.value
    return out


def test_grpc_calls_get_the_rpc_histograms_not_the_http_ones() -> None:
    m = Metrics()
    m.observe_sessions([
        rpc_call("helloworld.Greeter/SayHello", 0),
        rpc_call("helloworld.Greeter/SayHello", 0, ms=30),
        rpc_call("helloworld.Greeter/SayHello", 4),
        rpc_call("helloworld.Greeter/SayHello", None, outcome=Outcome.RESET),
        rpc_call("helloworld.Greeter/SayHello", 99),
        rpc_call("shop.Cart/Add", 5, role=Role.CLIENT),
        timed(1, protocol=Protocol.HTTP2, request=request(target="/plain", version="2"),
              attributes=(("clovisor.http2.stream_id", 1),)),
    ], service)  # fmt: skip
    assert rpc_counts(m, RPC_SERVER) == {
        ("web", "helloworld.Greeter/SayHello", "OK"): 2,
        ("web", "helloworld.Greeter/SayHello", "DEADLINE_EXCEEDED"): 1,
        ("web", "helloworld.Greeter/SayHello", ""): 1,
        ("web", "helloworld.Greeter/SayHello", "99"): 1,
    }
    assert rpc_counts(m, RPC_CLIENT) == {("web", "shop.Cart/Add", "NOT_FOUND"): 1}
    assert counts(m, SERVER) == {("web", "GET", "200", "/plain"): 1}  # plain HTTP/2
    assert counts(m, CLIENT) == {}
    fam = families(m)[RPC_SERVER]
    ok = {s.labels["le"]: s.value for s in fam.samples if s.name == RPC_SERVER + "_bucket"
          and s.labels["rpc_response_status_code"] == "OK"}  # fmt: skip
    assert ok["0.005"] == 1 and ok["0.05"] == 2 and ok["+Inf"] == 2


def test_rpc_methods_are_bounded() -> None:
    m = Metrics()
    m.observe_sessions([rpc_call(f"svc.S/M{i}", 0) for i in range(MAX_RPC_METHODS + 50)], service)
    got = rpc_counts(m, RPC_SERVER)
    assert len(got) == MAX_RPC_METHODS + 1 and got[("web", "_OTHER", "OK")] == 50


def test_untraced_by_reason_and_port() -> None:
    m = Metrics()
    m.register_untraced(lambda: {("unrecognized", 50051): 2, ("encrypted", 8080): 1})
    m.register_untraced(lambda: {("unrecognized", 50051): 1})
    fam = families(m)["clovisor_untraced"]
    got = {(s.labels["reason"], s.labels["server_port"]): s.value for s in fam.samples
           if s.name == "clovisor_untraced_total"}  # fmt: skip
    assert got == {("unrecognized", "50051"): 3, ("encrypted", "8080"): 1}
    assert fam.type == "counter"
