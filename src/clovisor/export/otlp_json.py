"""OTLP/JSON lines: one ExportTraceServiceRequest per line per batch.

This is the OpenTelemetry Collector file exporter's format, so the output can
be replayed into a collector (otlpjsonfile receiver) or read by tests with
the official proto messages.

OTLP/JSON is protobuf's canonical JSON mapping with two deviations that
``json_format`` does not know about: trace and span ids are hex strings, not
base64, and enums are integers.

Two encoders produce the same document: the reference one runs the SDK's own
``encode_spans`` (exactly what an OTLP exporter sends) through ``json_format``
and patches the ids; the direct one, used by the exporter, writes the same
JSON straight from the spans at a fraction of the cost. Tests compare them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any, Final, TextIO, cast

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from clovisor.export import ExportError
from clovisor.export.otlp_encode import drop_attribute
from clovisor.export.paircache import PairCache
from clovisor.export.queue import StreamExporter
from clovisor.export.record import SpanRecord
from clovisor.export.spans import SCOPE, to_readable_span

__all__ = [
    "OtlpJsonExporter",
    "otlp_json_to_request",
    "read_otlp_json",
    "reference_otlp_json",
    "request_to_otlp_json",
    "spans_to_otlp_json",
]


_SPAN_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")
_LINK_ID_FIELDS: Final = ("traceId", "spanId")


def _each_span(doc: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for rs in doc.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            yield from ss.get("spans", ())


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _hex_to_b64(value: Any, field: str, size: int) -> str:
    # Strict on purpose: a reader that also took base64 would hide the very
    # bug (ids written in protobuf's default encoding) it exists to catch.
    if not isinstance(value, str) or len(value) not in (0, 2 * size):
        raise ValueError(f"OTLP/JSON {field} must be {2 * size} hex characters, got {value!r}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"OTLP/JSON {field} is not hex: {value!r}") from None
    return base64.b64encode(raw).decode("ascii")


def request_to_otlp_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """The OTLP/JSON object for a protobuf request (ids as hex, enums as ints)."""
    doc: dict[str, Any] = json_format.MessageToDict(
        request,
        preserving_proto_field_name=False,
        use_integers_for_enums=True,
    )
    for span in _each_span(doc):
        for field in _SPAN_ID_FIELDS:
            value = span.get(field)
            if value:
                span[field] = _b64_to_hex(value)
        for link in span.get("links", ()):
            for field in _LINK_ID_FIELDS:
                value = link.get(field)
                if value:
                    link[field] = _b64_to_hex(value)
    return doc


def reference_otlp_json(records: Sequence[SpanRecord]) -> dict[str, Any]:
    """OTLP/JSON via the SDK encoder and ``json_format``: slow, but by the book.

    :func:`spans_to_otlp_json` must parse to exactly this; the tests hold it
    to that.
    """
    return request_to_otlp_json(encode_spans([to_readable_span(r) for r in records]))


# --- Direct encoder ---------------------------------------------------------
#
# encode_spans builds a protobuf object per attribute (~3 µs each) and
# MessageToDict walks them again through descriptors: about 450 µs per
# Clovisor span here, too slow for thousands of sessions a second. The direct
# encoder writes the same JSON text straight from the span records, mirroring
# encode_spans field by field, including what json_format omits (proto3
# defaults) and how it spells 64-bit integers (as strings). It builds text,
# not dicts, because json.dumps of the dicts alone cost more than the rest.

_quote: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii

_KIND: Final = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
_FLAGS_LOCAL: Final = str(0x100)  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE
_FLAGS_REMOTE: Final = str(0x100 | 0x200)  # ... and CONTEXT_IS_REMOTE
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


class _Unencodable(Exception):
    """An attribute value protobuf would reject; encode_spans drops the key."""


def _q(s: str) -> str:
    """JSON string literal, refusing what protobuf refuses (invalid UTF-8)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Unencodable(str(exc)) from None
    return _quote(s)


def _any_json(value: object) -> str:
    t = type(value)
    if t is str:
        return '{"stringValue":' + _q(value) + "}"  # type: ignore[arg-type]
    if t is int:
        if not _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
            raise _Unencodable(f"{value} does not fit int64")
        return '{"intValue":"' + str(value) + '"}'
    if t is bool:
        return '{"boolValue":true}' if value else '{"boolValue":false}'
    if value is None:
        return "{}"
    if isinstance(value, bool):
        return _any_json(bool(value))
    if isinstance(value, str):
        return _any_json(str(value))
    if isinstance(value, int):
        return _any_json(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return '{"doubleValue":"NaN"}'
        if math.isinf(value):
            return '{"doubleValue":"Infinity"}' if value > 0 else '{"doubleValue":"-Infinity"}'
        return '{"doubleValue":' + repr(float(value)) + "}"
    if isinstance(value, bytes):
        return '{"bytesValue":"' + base64.b64encode(value).decode("ascii") + '"}'
    if isinstance(value, Sequence):
        if not value:
            return '{"arrayValue":{}}'
        return '{"arrayValue":{"values":[' + ",".join(_any_json(v) for v in value) + "]}}"
    if isinstance(value, Mapping):
        if not value:
            return '{"kvlistValue":{}}'
        return (
            '{"kvlistValue":{"values":['
            + ",".join(_key_prefix(str(k)) + _any_json(v) + "}" for k, v in value.items())
            + "]}}"
        )
    raise _Unencodable(f"invalid attribute type {type(value).__name__}")


# Attribute keys repeat in every span: quote each once.
_key_prefixes: dict[str, str] = {}
_KEY_CACHE_MAX: Final = 4096


def _key_prefix(key: str) -> str:
    prefix = _key_prefixes.get(key)
    if prefix is None:
        # proto3 omits an empty key, and so does json_format.
        prefix = '{"key":' + _q(key) + ',"value":' if key else '{"value":'
        if len(_key_prefixes) < _KEY_CACHE_MAX:
            _key_prefixes[key] = prefix
    return prefix


def _pair_json(key: str, value: object) -> str:
    """One KeyValue object; :class:`_Unencodable` if protobuf would refuse the value."""
    return _key_prefix(key) + _any_json(value) + "}"


# Attribute pairs repeat from span to span: encode each distinct one once
# (the policy, shared with the protobuf encoder, is in paircache.py).
_pairs: Final[PairCache[str]] = PairCache()


def _attributes_json(attributes: Mapping[str, object] | None) -> str:
    """The comma-joined KeyValue objects, or "" when there are none."""
    if not attributes:
        return ""
    parts = _pairs.lookup(
        attributes, _pair_json, (_Unencodable,), drop_attribute, encode_uncached=True
    )
    return ",".join(cast("list[str]", parts))  # encode_uncached: fragments only


def _resource_json(resource: Resource) -> str:
    attrs = _attributes_json(resource.attributes)
    return '{"attributes":[' + attrs + "]}" if attrs else "{}"


def _scope_json(scope: InstrumentationScope | None) -> str:
    if scope is None:
        return "{}"
    fields = []
    if scope.name:
        fields.append('"name":' + _q(scope.name))
    if scope.version:
        fields.append('"version":' + _q(scope.version))
    attrs = _attributes_json(scope.attributes)
    if attrs:
        fields.append('"attributes":[' + attrs + "]")
    return "{" + ",".join(fields) + "}"


def _span_json(record: SpanRecord) -> str:
    parts = [f'{{"traceId":"{record.trace_id:032x}","spanId":"{record.span_id:016x}"']
    if record.trace_state:
        parts.append(',"traceState":' + _q(record.trace_state))
    parent = record.parent
    if parent is not None:
        parts.append(f',"parentSpanId":"{parent.span_id:016x}"')
    if record.name:
        parts.append(',"name":' + _q(record.name))
    parts.append(f',"kind":{_KIND[record.kind]}')
    if record.start_time:
        parts.append(f',"startTimeUnixNano":"{record.start_time}"')
    if record.end_time:
        parts.append(f',"endTimeUnixNano":"{record.end_time}"')
    attrs = _attributes_json(record.attributes)
    if attrs:
        parts.append(',"attributes":[' + attrs + "]")
    code = record.status_code.value
    if record.status_message:
        msg = '"message":' + _q(record.status_message)
        parts.append(',"status":{' + msg + (f',"code":{code}}}' if code else "}"))
    else:
        parts.append(f',"status":{{"code":{code}}}' if code else ',"status":{}')
    remote = parent is not None and parent.is_remote
    parts.append(',"flags":' + (_FLAGS_REMOTE if remote else _FLAGS_LOCAL) + "}")
    return "".join(parts)


# Agents reuse one Resource object per pod and its attributes never change:
# encode each once. Keyed by identity (Resource's own hash serialises all its
# attributes to JSON), holding the object so its id cannot be reused.
_resource_cache: dict[int, tuple[Resource, str]] = {}
_RESOURCE_CACHE_MAX: Final = 4096


def _cached_resource_json(resource: Resource) -> str:
    hit = _resource_cache.get(id(resource))
    if hit is not None and hit[0] is resource:
        return hit[1]
    encoded = _resource_json(resource)
    if len(_resource_cache) >= _RESOURCE_CACHE_MAX:
        _resource_cache.clear()
    _resource_cache[id(resource)] = (resource, encoded)
    return encoded


_SCOPE_JSON: Final = _scope_json(SCOPE)


def spans_to_otlp_json(records: Sequence[SpanRecord]) -> str:
    """One OTLP/JSON line (without newline) for a batch of span records.

    Parses to exactly :func:`reference_otlp_json`'s document. ASCII-only, so
    it survives any stream encoding (C locale, pipes).
    """
    # Group like encode_spans: by equal resource, in order of first
    # appearance (every record has Clovisor's scope). Identity first;
    # equality only once per new object.
    groups: list[tuple[Resource, list[str]]] = []
    by_resource_id: dict[int, list[str]] = {}
    for record in records:
        resource = record.resource
        target = by_resource_id.get(id(resource))
        if target is None:
            for known, known_spans in groups:
                if known is resource or known == resource:
                    target = known_spans
                    break
            else:
                target = []
                groups.append((resource, target))
            by_resource_id[id(resource)] = target
        target.append(_span_json(record))

    if not groups:
        return "{}"
    # One join at the end: the spans are most of the text, and each
    # concatenation around them would copy all of it again.
    parts = ['{"resourceSpans":[']
    for r, (resource, spans) in enumerate(groups):
        parts.append(('{"resource":' if r == 0 else ',{"resource":')
                     + _cached_resource_json(resource) + ',"scopeSpans":[{"scope":'
                     + _SCOPE_JSON + ',"spans":[')
        parts.append(",".join(spans))
        schema = ',"schemaUrl":' + _q(resource.schema_url) if resource.schema_url else ""
        parts.append("]}]" + schema + "}")
    parts.append("]}")
    return "".join(parts)


def otlp_json_to_request(doc: dict[str, Any]) -> ExportTraceServiceRequest:
    """Reverse of :func:`request_to_otlp_json`, decoding with the official message."""
    for span in _each_span(doc):
        for field, size in (("traceId", 16), ("spanId", 8), ("parentSpanId", 8)):
            if field in span:
                span[field] = _hex_to_b64(span[field], field, size)
        for link in span.get("links", ()):
            for field, size in (("traceId", 16), ("spanId", 8)):
                if field in link:
                    link[field] = _hex_to_b64(link[field], f"links.{field}", size)
    request = ExportTraceServiceRequest()
    json_format.ParseDict(doc, request)
    return request


def read_otlp_json(source: str | os.PathLike[str] | IO[str]) -> list[ExportTraceServiceRequest]:
    """Every request in an OTLP/JSON lines file (or open text stream)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            lines = f.readlines()
    else:
        lines = source.readlines()
    return [otlp_json_to_request(json.loads(line)) for line in lines if line.strip()]


class OtlpJsonExporter(StreamExporter):
    """Appends one OTLP/JSON line per batch to a file, a stream or stdout (``-``)."""

    def __init__(
        self, target: str | os.PathLike[str] | TextIO, **queue_options: float | int
    ) -> None:
        super().__init__("OTLP/JSON", target, **queue_options)

    def format(self, batch: list[SpanRecord]) -> str:
        try:
            return spans_to_otlp_json(batch) + "\n"
        except (ValueError, TypeError, AttributeError, binascii.Error) as exc:
            raise ExportError(f"OTLP/JSON encoding failed: {exc}") from exc
