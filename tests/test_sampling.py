"""Sampling: the SDK's samplers applied to finished spans, deterministic by trace id.

Also what reaches an exported span at all: remote parents (Jaeger, B3
sampling state) that the samplers follow, and the secrets that must not.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from clovisor.core.events import Role
from clovisor.export.propagation import b3_trace_flags, jaeger_parent
from clovisor.export.record import SpanRecord
from clovisor.export.spans import redact_query
from clovisor.sampling import (
    SAMPLERS,
    Sampler,
    parse_ratio,
    sampler_from_env,
    sampler_from_flags,
)
from clovisor.specs import SpecError
from tests.export.sessions import record, request, response, session, span

trace_ids = st.integers(1, 2**128 - 1)
ratios = st.floats(0.0, 1.0, allow_nan=False)


def make_span(trace_id: int, parent_flags: int | None = None, remote: bool = True) -> SpanRecord:
    parent = None
    if parent_flags is not None:
        parent = SpanContext(
            trace_id, 0x1234, is_remote=remote, trace_flags=TraceFlags(parent_flags)
        )
    return record(trace_id=trace_id, span_id=0x5678, parent=parent, kind=SpanKind.SERVER)


def test_default_is_parentbased_always_on() -> None:
    s = sampler_from_flags(environ={})
    assert s.name == "parentbased_always_on"
    assert s.should_export(make_span(1))
    assert s.should_export(make_span(1, parent_flags=1))
    assert not s.should_export(make_span(1, parent_flags=0))


@given(trace_ids, ratios)
def test_ratio_is_deterministic_by_trace_id(trace_id: int, ratio: float) -> None:
    a, b = Sampler("traceidratio", ratio), Sampler("parentbased_traceidratio", ratio)
    decision = a.should_export(make_span(trace_id))
    assert decision == a.should_export(make_span(trace_id))  # same span, same answer
    assert decision == Sampler("traceidratio", ratio).should_export(make_span(trace_id))
    assert decision == b.should_export(make_span(trace_id))  # roots: the same rule
    # The SDK's rule: the low 64 bits under ratio * 2**64.
    assert decision == ((trace_id & (2**64 - 1)) < round(ratio * 2**64))


@given(trace_ids, ratios, ratios)
def test_ratio_is_monotonic(trace_id: int, r1: float, r2: float) -> None:
    lo, hi = sorted((r1, r2))
    if Sampler("traceidratio", lo).should_export(make_span(trace_id)):
        assert Sampler("traceidratio", hi).should_export(make_span(trace_id))


@given(trace_ids)
def test_ratio_bounds(trace_id: int) -> None:
    assert not Sampler("traceidratio", 0.0).should_export(make_span(trace_id))
    assert Sampler("traceidratio", 1.0).should_export(make_span(trace_id))


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 0.9])
def test_ratio_proportion(ratio: float) -> None:
    rng = random.Random(42)
    n = 20_000
    spans = [make_span(rng.getrandbits(128) or 1) for _ in range(n)]
    sampler = Sampler("parentbased_traceidratio", ratio)
    kept = sampler.filter(spans)
    sigma = (n * ratio * (1 - ratio)) ** 0.5
    assert abs(len(kept) - n * ratio) < 5 * sigma
    assert sampler.sampled_out == n - len(kept)


@given(trace_ids, ratios, st.booleans())
def test_remote_parent_decides_for_parentbased(trace_id: int, ratio: float, remote: bool) -> None:
    for name in ("parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio"):
        s = Sampler(name, ratio)
        assert s.should_export(make_span(trace_id, parent_flags=1, remote=remote))
        assert not s.should_export(make_span(trace_id, parent_flags=0, remote=remote))


@given(trace_ids, st.sampled_from([0, 1]))
def test_non_parentbased_ignore_parent(trace_id: int, flags: int) -> None:
    assert Sampler("always_on").should_export(make_span(trace_id, parent_flags=flags))
    assert not Sampler("always_off").should_export(make_span(trace_id, parent_flags=flags))
    ratio = Sampler("traceidratio", 0.3)
    assert ratio.should_export(make_span(trace_id, parent_flags=flags)) == ratio.should_export(
        make_span(trace_id)
    )


def test_memo_does_not_mix_parent_cases() -> None:
    s = Sampler("parentbased_always_off")
    answers = [
        s.should_export(make_span(7, parent_flags=f, remote=r))
        for f in (0, 1)
        for r in (True, False)
    ]
    assert answers == [False, False, True, True]
    assert not s.should_export(make_span(7))
    assert s.should_export(make_span(7, parent_flags=1))


@pytest.mark.parametrize(
    ("headers", "exported"),
    [
        ((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),), True),
        ((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),), False),
        ((("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),), True),
        ((("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),), False),
        ((("uber-trace-id", "80f198ee56343ba864fe8b2a57d3eff7:e457b5a2e4d86bd1:0:1"),), True),
        ((("uber-trace-id", "80f198ee56343ba864fe8b2a57d3eff7:e457b5a2e4d86bd1:0:0"),), False),
        ((("x-b3-traceid", "80f198ee56343ba8"), ("x-b3-spanid", "e457b5a2e4d86bd1")), True),
        (
            (
                ("x-b3-traceid", "80f198ee56343ba8"),
                ("x-b3-spanid", "e457b5a2e4d86bd1"),
                ("x-b3-sampled", "0"),
            ),
            False,
        ),
        ((("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1"),), True),  # deferred
        ((("uber-trace-id", "80f198ee56343ba8%3Ae457b5a2e4d86bd1%3A0%3A3"),), True),  # debug
    ],
)
def test_sessions_follow_the_callers_decision(
    headers: tuple[tuple[str, str], ...], exported: bool
) -> None:
    sp = span(session(request=request(headers=headers)))
    assert sp.parent is not None and sp.parent.is_remote
    assert Sampler().should_export(sp) is exported
    # The caller's decision wins over the ratio, whichever way it went.
    assert Sampler("parentbased_traceidratio", 0.0).should_export(sp) is exported
    assert Sampler("parentbased_traceidratio", 1.0).should_export(sp) is exported


def test_roots_go_to_the_ratio() -> None:
    sp = span(session(request=request(headers=())))
    assert sp.parent is None
    assert Sampler().should_export(sp)
    assert not Sampler("parentbased_traceidratio", 0.0).should_export(sp)


def test_filter_keeps_order_and_counts() -> None:
    spans = [make_span(i, parent_flags=i % 2) for i in range(1, 11)]
    s = Sampler()
    kept = s.filter(spans)
    assert [sp.trace_id for sp in kept] == [1, 3, 5, 7, 9]
    assert s.sampled_out == 5
    everything = Sampler("always_on")
    assert everything.filter(spans) is spans and everything.sampled_out == 0


@pytest.mark.parametrize(
    ("env", "name", "ratio"),
    [
        ({}, "parentbased_always_on", 1.0),
        ({"OTEL_TRACES_SAMPLER": ""}, "parentbased_always_on", 1.0),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, "always_off", 1.0),
        ({"OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "x"}, "always_on", 1.0),
        (
            {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            "traceidratio",
            0.25,
        ),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}, "parentbased_traceidratio", 1.0),
    ],
)
def test_env(env: dict[str, str], name: str, ratio: float) -> None:
    s = sampler_from_env(env)
    assert (s.name, s.ratio) == (name, ratio)


@pytest.mark.parametrize(
    ("env", "word"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "_ARG"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "ten"}, "_ARG"),
    ],
)
def test_env_errors(env: dict[str, str], word: str) -> None:
    with pytest.raises(SpecError, match=word):
        sampler_from_env(env)


def test_flags() -> None:
    env = {"OTEL_TRACES_SAMPLER": "always_off"}
    assert sampler_from_flags(environ=env).name == "always_off"  # no flag: the environment
    s = sampler_from_flags(sample_ratio="0.1", environ=env)
    assert (s.name, s.ratio) == ("parentbased_traceidratio", 0.1)
    s = sampler_from_flags("traceidratio", "0.5", environ=env)
    assert (s.name, s.ratio) == ("traceidratio", 0.5)
    assert sampler_from_flags("always_on", environ=env).name == "always_on"


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"sampler": "sometimes"}, "--sampler"),
        ({"sampler": "always_on", "sampler_arg": "0.5"}, "takes no argument"),
        ({"sampler_arg": "0.5"}, "needs --sampler"),
        ({"sample_ratio": "0.5", "sampler": "always_on"}, "cannot be combined"),
        ({"sample_ratio": "1.5"}, "--sample-ratio"),
        ({"sample_ratio": "nan"}, "--sample-ratio"),
        ({"sampler": "traceidratio", "sampler_arg": "-0.1"}, "--sampler-arg"),
    ],
)
def test_flag_errors(kwargs: dict[str, str], word: str) -> None:
    with pytest.raises(SpecError, match=word) as exc:
        sampler_from_flags(environ={}, **kwargs)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("text", ["0", "1", "0.5", "1e-3", " 0.2 ".strip()])
def test_parse_ratio(text: str) -> None:
    assert parse_ratio(text) == float(text)


def test_all_names_construct() -> None:
    for name in SAMPLERS:
        assert Sampler(name, 0.5).description


# -- What reaches an exported span: remote parents (Jaeger, B3 state) and secrets --

TRACE = "80f198ee56343ba864fe8b2a57d3eff7"
PARENT = "e457b5a2e4d86bd1"


@pytest.mark.parametrize(
    ("value", "trace_id", "span_id", "sampled"),
    [
        (f"{TRACE}:{PARENT}:0:1", int(TRACE, 16), int(PARENT, 16), True),
        (f"{TRACE}:{PARENT}:0:0", int(TRACE, 16), int(PARENT, 16), False),
        (f"{TRACE}:{PARENT}:0:2", int(TRACE, 16), int(PARENT, 16), True),  # debug
        (f"{TRACE}:{PARENT}:0:03", int(TRACE, 16), int(PARENT, 16), True),
        (f" {TRACE}%3A{PARENT}%3a0%3A1 ", int(TRACE, 16), int(PARENT, 16), True),
        ("abc:def:0:1", 0xABC, 0xDEF, True),  # leading zeros dropped by clients
        (f"{TRACE[16:]}:{PARENT}:1234:1", int(TRACE[16:], 16), int(PARENT, 16), True),
    ],
)
def test_jaeger_parent(value: str, trace_id: int, span_id: int, sampled: bool) -> None:
    tid, parent = jaeger_parent(value)
    assert tid == trace_id and parent is not None
    assert (parent.trace_id, parent.span_id, parent.is_remote) == (trace_id, span_id, True)
    assert parent.trace_flags.sampled is sampled


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"{TRACE}:{PARENT}:0",
        f"0:{PARENT}:0:1",
        f"{TRACE}:0:0:1",
        f"{TRACE}0:{PARENT}:0:1",  # 33 digits
        f"{TRACE}:{PARENT}0:0:1",
        f"{TRACE}:{PARENT}:0:1:extra",
        f"{TRACE}:{PARENT}:0:xyz",
        "\udcff:1:0:1",
    ],
)
def test_jaeger_parent_rejects(value: str) -> None:
    assert jaeger_parent(value) == (None, None)


@given(st.text(max_size=80))
def test_jaeger_parent_never_raises(value: str) -> None:
    jaeger_parent(value)


def test_jaeger_span_joins_the_trace() -> None:
    sp = span(session(request=request(headers=(("uber-trace-id", f"{TRACE}:{PARENT}:0:1"),))))
    assert sp.parent is not None
    assert sp.trace_id == int(TRACE, 16)
    assert sp.parent.span_id == int(PARENT, 16)
    assert sp.span_id != sp.parent.span_id


def test_w3c_then_b3_then_jaeger() -> None:
    w3c = "4bf92f3577b34da6a3ce929d0e0e4736"
    uber = ("uber-trace-id", f"{TRACE}:{PARENT}:0:1")
    both = span(session(request=request(headers=(uber, ("traceparent", f"00-{w3c}-{PARENT}-01")))))
    assert both.trace_id == int(w3c, 16)
    b3 = span(session(request=request(headers=(uber, ("b3", f"{w3c}-{PARENT}-1")))))
    assert b3.trace_id == int(w3c, 16)
    bad_w3c = span(session(request=request(headers=(uber, ("traceparent", "garbage")))))
    assert bad_w3c.trace_id == int(TRACE, 16)


@pytest.mark.parametrize(
    ("sampled", "flags", "expected"),
    [
        (None, None, True),  # deferred: our decision
        ("1", None, True),
        ("true", None, True),
        ("d", None, True),
        ("0", None, False),
        ("False", None, False),
        ("0", "1", True),  # debug wins
        (None, "0", True),
    ],
)
def test_b3_sampling_state(sampled: str | None, flags: str | None, expected: bool) -> None:
    assert b3_trace_flags(sampled, flags).sampled is expected


SECRET = "s3cr3t-VALUE"
sensitive_names = st.sampled_from(
    ["authorization", "Authorization", "COOKIE", "cookie", "proxy-authorization", "x-api-key"]
)


@given(
    st.lists(st.tuples(sensitive_names, st.text(max_size=10)), min_size=1, max_size=4),
    st.lists(st.sampled_from(["set-cookie", "Set-Cookie"]), min_size=1, max_size=3),
    st.sampled_from(list(Role)),
)
def test_credential_headers_never_reach_spans(
    req_headers: list[tuple[str, str]], resp_names: list[str], role: Role
) -> None:
    req = request(headers=(("host", "h"), *((n, v + SECRET) for n, v in req_headers)))
    resp = response(headers=tuple((n, SECRET) for n in resp_names))
    sp = span(session(request=req, response=resp, role=role))
    attrs = dict(sp.attributes or {})
    for key, value in attrs.items():
        assert "cookie" not in key and "authorization" not in key and "api-key" not in key
        assert SECRET not in str(value)


@pytest.mark.parametrize("role", list(Role))
def test_credential_query_values_redacted(role: Role) -> None:
    target = f"/cb?code={SECRET}&state=ok&access_token={SECRET}&X-Amz-Signature={SECRET}"
    sp = span(session(request=request(target=target), role=role))
    attrs = dict(sp.attributes or {})
    assert attrs["url.query"] == (
        "code=REDACTED&state=ok&access_token=REDACTED&X-Amz-Signature=REDACTED"
    )
    assert SECRET not in str(attrs)
    if role is Role.CLIENT:
        assert str(attrs["url.full"]).endswith("?" + str(attrs["url.query"]))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("a=1&b=two", "a=REDACTED&b=REDACTED"),
        ("a=1;b=2", "a=REDACTED;b=REDACTED"),
        ("bare-token", "REDACTED"),
        ("flag&x=1", "REDACTED&x=REDACTED"),
        ("empty=&x=", "empty=&x="),
        ("a=1&&b=2", "a=REDACTED&&b=REDACTED"),
    ],
)
def test_redact_query_all(query: str, expected: str) -> None:
    assert redact_query(query, all_values=True) == expected


@given(
    st.lists(
        st.tuples(
            st.text("abcdefgh_", min_size=1, max_size=6), st.text("0123456789XYZ", max_size=12)
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from(list(Role)),
)
def test_redact_all_query_in_spans(pairs: list[tuple[str, str]], role: Role) -> None:
    query = "&".join(f"{k}={v}Q{v}" for k, v in pairs)
    target = "/p?" + query
    sp = span(session(request=request(target=target), role=role), redact_all_query=True)
    attrs = dict(sp.attributes or {})
    values = {f"{v}Q{v}" for _, v in pairs}
    for value in attrs.values():
        assert not any(v in str(value) for v in values)
    assert attrs["url.query"] == "&".join(f"{k}=REDACTED" for k, _ in pairs)
    # Off by default: only credential names are redacted then.
    plain = span(session(request=request(target="/p?color=Q1")))
    assert dict(plain.attributes or {})["url.query"] == "color=Q1"
