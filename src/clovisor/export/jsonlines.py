"""``--output json[:PATH]``: one flat JSON object per session per line (jq, log pipelines).

The console's facts with stable keys, nothing nested:

``time``
    the session's start, RFC 3339 in UTC with microseconds;
``kind``
    ``server`` or ``client``;
``service``
    ``service.name`` of the span's resource; ``namespace``, ``pod`` the
    Kubernetes namespace and pod when known (``null`` otherwise);
``protocol``
    ``http`` (HTTP/1.x and HTTP/2), ``grpc``, ``tls``, a parser plugin's protocol,
    or ``tcp`` for a connection-level session;
``method``, ``url``, ``status``
    the request method, the request target (the full URL on client spans),
    the response status code; ``null`` when not seen;
``duration_ms``
    from the first request byte to the last response byte;
``client_address``, ``client_port``, ``server_address``, ``server_port``
    the connection;
``request_bytes``, ``response_bytes``
    bytes on the wire in each direction, header blocks included;
``outcome``
    ``complete``, ``reset``, ``closed``, ``timeout`` or ``shutdown``;
``trace_id``
    32 hex digits, the trace the span belongs to.

Wire-derived strings are JSON-escaped (control characters included), so a
request target can never break a line.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any, Final, TextIO

from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from clovisor.export.queue import StreamExporter
from clovisor.export.record import SpanRecord

__all__ = ["FIELDS", "JsonLinesExporter", "session_record"]

FIELDS: Final = (
    "time",
    "kind",
    "service",
    "namespace",
    "pod",
    "protocol",
    "method",
    "url",
    "status",
    "duration_ms",
    "client_address",
    "client_port",
    "server_address",
    "server_port",
    "request_bytes",
    "response_bytes",
    "outcome",
    "trace_id",
)
_KINDS: Final = {SpanKind.SERVER: "server", SpanKind.CLIENT: "client"}


def _time(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{rest // 1000:06d}Z"


def _str(attrs: Mapping[str, AttributeValue], key: str) -> str | None:
    value = attrs.get(key)
    return None if value is None else str(value)


def _int(attrs: Mapping[str, AttributeValue], key: str) -> int | None:
    value = attrs.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _url(attrs: Mapping[str, AttributeValue]) -> str | None:
    full = attrs.get("url.full")
    if full is not None:
        return str(full)
    path = attrs.get("url.path")
    if path is None:
        return None
    query = attrs.get("url.query")
    return f"{path}?{query}" if query is not None else str(path)


def session_record(span: SpanRecord) -> dict[str, Any]:
    """The flat record of one session span (keys: :data:`FIELDS`, in that order)."""
    attrs = span.attributes
    resource = span.resource.attributes
    start = span.start_time
    end = span.end_time
    method = attrs.get("http.request.method_original") or attrs.get("http.request.method")
    return {
        "time": _time(start),
        "kind": _KINDS.get(span.kind, span.kind.name.lower()),
        "service": _str(resource, "service.name"),
        "namespace": _str(resource, "k8s.namespace.name"),
        "pod": _str(resource, "k8s.pod.name"),
        "protocol": "grpc" if "rpc.system" in attrs else (
            _str(attrs, "network.protocol.name") or "tcp"),
        "method": None if method is None else str(method),
        "url": _url(attrs),
        "status": _int(attrs, "http.response.status_code"),
        "duration_ms": round((end - start) / 1e6, 3),
        "client_address": _str(attrs, "client.address"),
        "client_port": _int(attrs, "client.port"),
        "server_address": _str(attrs, "server.address"),
        "server_port": _int(attrs, "server.port"),
        "request_bytes": _int(attrs, "clovisor.request.bytes"),
        "response_bytes": _int(attrs, "clovisor.response.bytes"),
        "outcome": _str(attrs, "clovisor.outcome"),
        "trace_id": f"{span.trace_id:032x}",
    }


class JsonLinesExporter(StreamExporter):
    """Appends one JSON line per span to a file, a stream or stdout (``-``)."""

    def __init__(
        self, target: str | os.PathLike[str] | TextIO, **queue_options: float | int
    ) -> None:
        super().__init__("JSON", target, **queue_options)

    def format(self, batch: list[SpanRecord]) -> str:
        return "".join(
            json.dumps(session_record(s), separators=(",", ":")) + "\n" for s in batch
        )
