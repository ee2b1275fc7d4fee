"""Trace-context formats beyond W3C and B3's ids: Jaeger, and B3 sampling state.

:func:`clovisor.export.spans.session_to_span` reads W3C ``traceparent`` and
B3 itself; this module adds what it delegates:

- **Jaeger** ``uber-trace-id: {trace-id}:{span-id}:{parent-span-id}:{flags}``
  (what Jaeger client libraries and many Istio/Envoy setups still send).
  Ids are hex, and Jaeger clients drop leading zeros, so a trace id has 1-32
  digits and a span id 1-16. The parent span id is deprecated and ignored.
  Flags are a hex byte: 0x01 sampled, 0x02 debug (which Jaeger always
  samples). Clients URL-encode the colons (``%3A``) when the value went
  through a URL-safe carrier; both spellings are accepted.
- **B3 sampling state** (``x-b3-sampled``, ``x-b3-flags``, the third field of
  a single ``b3`` header): ``1``/``true``/``d`` (debug) mean sampled, ``0``/
  ``false`` mean not sampled. An absent state is B3's *deferred* decision,
  which is ours to make: it counts as sampled, so a caller that leaves the
  decision to us is kept by ``parentbased_*`` samplers rather than dropped.

W3C wins over B3, and B3 over Jaeger, when a request carries several.
Everything here takes hostile input: a malformed value gives ``None``,
never an exception and never a log line (a client could flood the log).
"""

from __future__ import annotations

import re
from typing import Final

from opentelemetry.trace import SpanContext, TraceFlags

__all__ = ["b3_trace_flags", "jaeger_parent"]

_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_JAEGER_RE: Final = re.compile(
    r"([0-9a-fA-F]{1,32}):([0-9a-fA-F]{1,16}):([0-9a-fA-F]{1,16}):([0-9a-fA-F]{1,2})"
)
_JAEGER_SAMPLED: Final = 0x01
_JAEGER_DEBUG: Final = 0x02


def jaeger_parent(value: str) -> tuple[int | None, SpanContext | None]:
    """(trace id, remote parent) from an ``uber-trace-id`` value; (None, None) if invalid."""
    value = value.strip()
    if "%" in value:
        value = value.replace("%3A", ":").replace("%3a", ":")
    m = _JAEGER_RE.fullmatch(value)
    if m is None:
        return None, None
    trace_id = int(m.group(1), 16)
    span_id = int(m.group(2), 16)
    if not trace_id or not span_id:
        return None, None
    flags = int(m.group(4), 16)
    sampled = flags & (_JAEGER_SAMPLED | _JAEGER_DEBUG)
    return trace_id, SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=_SAMPLED if sampled else _NOT_SAMPLED,
    )


def b3_trace_flags(sampled: str | None, flags: str | None = None) -> TraceFlags:
    """TraceFlags for a B3 sampling state (``x-b3-sampled``/``x-b3-flags``, or b3's 3rd field).

    Debug (``x-b3-flags: 1`` or ``d``) implies sampled; an absent or
    unrecognised state is a deferred decision and counts as sampled.
    """
    if flags is not None and flags.strip() == "1":
        return _SAMPLED
    if sampled is None:
        return _SAMPLED
    state = sampled.strip().lower()
    if state in ("0", "false"):
        return _NOT_SAMPLED
    return _SAMPLED
