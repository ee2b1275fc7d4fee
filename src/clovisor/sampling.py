"""Which finished spans to export: the OpenTelemetry SDK's samplers, after the fact.

Clovisor builds spans for sessions that are already over, so the SDK's
sampler is asked per span just before export rather than at span start; the
decision is the same because it depends only on the trace id and the parent
context, both known by then. The SDK's ``ParentBased`` and
``TraceIdRatioBased`` are used as they are, so a Clovisor span and the
application's own spans in the same trace agree:

- ``parentbased_*`` samplers follow a remote parent (from ``traceparent``,
  B3 or ``uber-trace-id``): parent sampled -> export, parent not sampled ->
  drop; spans without a parent go to the root sampler.
- ``traceidratio`` keeps a trace id when its low 64 bits fall under
  ``ratio * 2**64``: deterministic, so every span of a trace gets the same
  answer on every node, and a trace kept at ratio r is kept at any r' >= r.

The default is ``parentbased_always_on``. Names and arguments follow
``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``, which are read when no
flag is given; unlike the SDK, a bad value is an error rather than a warning
and a silent fallback, because an agent that quietly exports 100% instead of
1% can flood a trace store.

Sampling thins traces only. Metrics (:mod:`clovisor.metrics`) are recorded
for every session before this filter runs, so rates and latencies stay exact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Final

from opentelemetry.context import Context
from opentelemetry.sdk.trace import sampling as sdk
from opentelemetry.trace import NonRecordingSpan, SpanContext, set_span_in_context

from .export.record import SpanRecord
from .specs import SpecError

__all__ = [
    "DEFAULT_SAMPLER",
    "SAMPLERS",
    "Sampler",
    "parse_ratio",
    "sampler_from_env",
    "sampler_from_flags",
]

DEFAULT_SAMPLER: Final = "parentbased_always_on"
_RATIO_SAMPLERS: Final = frozenset(("traceidratio", "parentbased_traceidratio"))
_NO_PARENT: Final = Context()
SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def parse_ratio(text: str, what: str = "sample ratio") -> float:
    """A probability in [0, 1]; SpecError (one line) otherwise."""
    try:
        ratio = float(text)
    except ValueError:
        raise SpecError(f"{what} {text!r} is not a number") from None
    if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise SpecError(f"{what} {text!r} must be between 0 and 1")
    return ratio


def _sdk_sampler(name: str, ratio: float) -> sdk.Sampler:
    if name == "always_on":
        return sdk.ALWAYS_ON
    if name == "always_off":
        return sdk.ALWAYS_OFF
    if name == "traceidratio":
        return sdk.TraceIdRatioBased(ratio)
    if name == "parentbased_always_on":
        return sdk.ParentBased(sdk.ALWAYS_ON)
    if name == "parentbased_always_off":
        return sdk.ParentBased(sdk.ALWAYS_OFF)
    return sdk.ParentBased(sdk.TraceIdRatioBased(ratio))


class Sampler:
    """Decides per finished span whether it is exported.

    ``name`` is one of :data:`SAMPLERS`; ``ratio`` applies to the
    ``*traceidratio`` ones (default 1.0, as in the OTel spec). Not
    thread-safe for ``sampled_out``: call :meth:`filter` from one stage.
    """

    __slots__ = ("_all", "_memo", "_sdk", "name", "ratio", "sampled_out")

    def __init__(self, name: str = DEFAULT_SAMPLER, ratio: float = 1.0) -> None:
        if name not in SAMPLERS:
            raise SpecError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
        if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
            raise SpecError(f"sample ratio {ratio!r} must be between 0 and 1")
        self.name = name
        self.ratio = ratio if name in _RATIO_SAMPLERS else 1.0
        self._sdk = _sdk_sampler(name, self.ratio)
        # always_on ignores parents too: filter() can return the batch as is.
        self._all = name == "always_on"
        # Samplers without a ratio ignore the trace id, name, kind and
        # attributes: their answer depends only on the parent's flags. The
        # SDK call costs ~2 us (contexts, a SamplingResult), so remember its
        # answer per flag combination instead of asking again per span.
        self._memo: dict[tuple[bool, bool, bool] | None, bool] | None = (
            None if name in _RATIO_SAMPLERS else {}
        )
        self.sampled_out = 0  # spans dropped so far (health key spans_sampled_out)

    @property
    def description(self) -> str:
        return self._sdk.get_description()

    def should_export(self, span: SpanRecord) -> bool:
        """The SDK sampler's decision for this span, given its remote parent."""
        parent = span.parent
        memo = self._memo
        if memo is None:
            return self._ask(parent, span.trace_id, span)
        key = (
            None
            if parent is None
            else (parent.is_valid, parent.is_remote, parent.trace_flags.sampled)
        )
        decision = memo.get(key)
        if decision is None:
            decision = memo[key] = self._ask(parent, span.trace_id, span)
        return decision

    def _ask(self, parent: SpanContext | None, trace_id: int, span: SpanRecord) -> bool:
        # An explicit empty Context for roots: None would make the SDK read
        # the calling thread's current span, which is not this span's parent.
        parent_ctx = (
            set_span_in_context(NonRecordingSpan(parent)) if parent is not None else _NO_PARENT
        )
        # No attributes: the SDK's samplers never read them, and building
        # the read-only view per span is wasted work.
        result = self._sdk.should_sample(parent_ctx, trace_id, span.name, span.kind, None)
        return result.decision is sdk.Decision.RECORD_AND_SAMPLE

    def filter(self, spans: Sequence[SpanRecord]) -> Sequence[SpanRecord]:
        """The spans to export, in order; counts the others in ``sampled_out``."""
        if self._all:
            return spans
        kept = [s for s in spans if self.should_export(s)]
        self.sampled_out += len(spans) - len(kept)
        return kept

    def __repr__(self) -> str:
        return f"Sampler({self.description})"


def _make(name: str, arg: str | None, name_what: str, arg_what: str) -> Sampler:
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise SpecError(f"{name_what} {name!r}: unknown sampler (known: {', '.join(SAMPLERS)})")
    ratio = 1.0
    if key in _RATIO_SAMPLERS and arg is not None and arg.strip():
        ratio = parse_ratio(arg.strip(), arg_what)
    return Sampler(key, ratio)


def sampler_from_env(environ: Mapping[str, str] | None = None) -> Sampler:
    """From ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (OTel spec names).

    Unset or empty means the default. The argument is ignored for samplers
    that take none, as the spec says.
    """
    env = os.environ if environ is None else environ
    name = env.get("OTEL_TRACES_SAMPLER", "").strip()
    if not name:
        return Sampler()
    return _make(
        name, env.get("OTEL_TRACES_SAMPLER_ARG"), "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"
    )


def sampler_from_flags(
    sampler: str | None = None,
    sampler_arg: str | None = None,
    sample_ratio: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Sampler:
    """``--sampler NAME [--sampler-arg R]`` or ``--sample-ratio R``; else the environment.

    ``--sample-ratio R`` is short for ``--sampler parentbased_traceidratio
    --sampler-arg R``. Flags win over ``OTEL_TRACES_SAMPLER*``.
    """
    if sample_ratio is not None:
        if sampler is not None or sampler_arg is not None:
            raise SpecError("--sample-ratio cannot be combined with --sampler/--sampler-arg")
        return Sampler("parentbased_traceidratio", parse_ratio(sample_ratio, "--sample-ratio"))
    if sampler is not None:
        s = _make(sampler, sampler_arg, "--sampler", "--sampler-arg")
        if sampler_arg is not None and s.name not in _RATIO_SAMPLERS:
            raise SpecError(f"--sampler-arg {sampler_arg!r}: sampler {s.name} takes no argument")
        return s
    if sampler_arg is not None:
        raise SpecError("--sampler-arg needs --sampler (or use --sample-ratio)")
    return sampler_from_env(environ)
