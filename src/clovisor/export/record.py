"""The span record every exporter takes: a finished session, ready to encode.

It holds exactly what the encoders write (OTLP's Span fields) and nothing
of the OpenTelemetry SDK's span machinery: the SDK's ``ReadableSpan`` is
built only where an SDK API wants one (:func:`clovisor.export.spans.to_readable_span`,
for the reference encoders the tests compare against).

A NamedTuple rather than a frozen dataclass for the same reason as
:class:`clovisor.core.events.Segment`: one is built per session, and a
frozen dataclass's ``__init__`` writes each field through
``object.__setattr__``, several times the cost of a tuple.
"""

from __future__ import annotations

from typing import NamedTuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanContext, SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue

__all__ = ["SpanRecord"]


class SpanRecord(NamedTuple):
    """One span. Times are Unix epoch ns; ``end_time >= start_time``.

    ``parent`` is the caller's span when the request carried trace context
    (W3C, B3, Jaeger); it is a remote parent. ``trace_state`` is the W3C
    tracestate joined to it, already validated, as it goes on the wire.
    ``attributes`` is never mutated once the record exists.
    """

    name: str
    kind: SpanKind
    trace_id: int
    span_id: int
    parent: SpanContext | None
    trace_state: str
    start_time: int
    end_time: int
    attributes: dict[str, AttributeValue]
    status_code: StatusCode
    status_message: str | None
    resource: Resource
