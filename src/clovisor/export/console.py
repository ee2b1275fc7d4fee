"""One human-readable line per session, for `clovisor --console` and demos.

Formatted from the span's attributes alone, so the console takes the same
batches as every other exporter. Wire-derived text is escaped: a request
target holding a newline or an ANSI escape must not forge log lines or
repaint the operator's terminal.
"""

from __future__ import annotations

import http
import time
from collections.abc import Mapping
from typing import Final, TextIO

from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from clovisor.export.queue import StreamExporter
from clovisor.export.record import SpanRecord

__all__ = ["ConsoleExporter", "format_span"]

# The console shows the standard phrase; the reason a server actually sent is
# not a semconv attribute and is rarely anything but the standard one.
_PHRASES: Final = {int(s): s.phrase for s in http.HTTPStatus}
_KINDS: Final = {SpanKind.SERVER: "SERVER", SpanKind.CLIENT: "CLIENT"}


def _escape(s: str) -> str:
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        else:
            cp = ord(ch)
            out.append(f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}")
    return "".join(out)


def _size(n: int) -> str:
    # Decimal units, as network people count bytes.
    if n < 1000:
        return f"{n}B"
    if n < 1_000_000:
        return f"{n / 1e3:.1f}kB"
    if n < 1_000_000_000:
        return f"{n / 1e6:.1f}MB"
    return f"{n / 1e9:.1f}GB"


def _duration(ns: int) -> str:
    if ns < 1_000_000:
        return f"{ns / 1e3:.0f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f}ms"
    return f"{ns / 1e9:.2f}s"


def _timestamp(ns: int) -> str:
    sec, rem = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{rem // 1_000_000:03d}Z"


def _endpoint(attrs: Mapping[str, AttributeValue], prefix: str) -> str:
    addr = attrs.get(prefix + ".address")
    port = attrs.get(prefix + ".port")
    if addr is None:
        return "?"
    host = f"[{addr}]" if ":" in str(addr) else str(addr)
    return f"{host}:{port}" if port is not None else host


def _int(attrs: Mapping[str, AttributeValue], key: str) -> int:
    value = attrs.get(key)
    return value if isinstance(value, int) else 0


def format_span(span: SpanRecord) -> str:
    """The console line for one span, without the trailing newline."""
    attrs = span.attributes
    start = span.start_time
    end = span.end_time
    parts = [_timestamp(start), _KINDS.get(span.kind, span.kind.name)]

    if attrs.get("network.protocol.name") == "http":
        method = attrs.get("http.request.method_original") or attrs.get("http.request.method")
        if method is not None:
            target = str(attrs.get("url.path", ""))
            query = attrs.get("url.query")
            if query is not None:
                target += f"?{query}"
            parts.append(_escape(str(method)))
            parts.append(_escape(target) or "-")
        else:
            parts.append("(no request)")
        version = attrs.get("network.protocol.version")
        if version is not None:
            parts.append(_escape(f"HTTP/{version}"))
        parts.append("->")
        code = attrs.get("http.response.status_code")
        if isinstance(code, int):
            parts.append(str(code))
            phrase = _PHRASES.get(code)
            if phrase:
                parts.append(phrase)
        else:
            parts.append("(no response)")
        grpc = attrs.get("rpc.response.status_code")
        if grpc is not None:
            parts.append(_escape(f"grpc {grpc}"))
    elif attrs.get("network.protocol.name") == "tls":
        sni = attrs.get("tls.client.server_name")
        parts.append(_escape(f"TLS {sni}") if sni else "TLS")
    else:
        parts.append("TCP")

    parts.append(_endpoint(attrs, "client"))
    parts.append("->")
    parts.append(_endpoint(attrs, "server"))
    parts.append(_duration(end - start))
    parts.append(
        f"req {_int(attrs, 'clovisor.request.packets')}p/"
        f"{_size(_int(attrs, 'clovisor.request.bytes'))}"
    )
    parts.append(
        f"resp {_int(attrs, 'clovisor.response.packets')}p/"
        f"{_size(_int(attrs, 'clovisor.response.bytes'))}"
    )
    outcome = attrs.get("clovisor.outcome")
    if outcome is not None and outcome != "complete":
        desc = span.status_message
        parts.append(f"[{outcome}: {desc}]" if desc else f"[{outcome}]")
    parts.append(f"trace={span.trace_id:032x}")
    return " ".join(parts)


class ConsoleExporter(StreamExporter):
    """Writes one line per span to a text stream, once per batch."""

    def __init__(self, stream: TextIO, **queue_options: float | int) -> None:
        super().__init__("console", stream, **queue_options)

    def format(self, batch: list[SpanRecord]) -> str:
        return "".join(format_span(span) + "\n" for span in batch)
