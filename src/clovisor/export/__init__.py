"""Span exporters: where finished session spans go.

Every exporter takes SDK ``ReadableSpan`` objects (built by
:func:`clovisor.export.spans.session_to_span`) in batches, so the runtime
can fan one batch out to several sinks. Importing this package stays cheap:
the protobuf-based exporters live in their own modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["ExportError", "Exporter", "ExporterConfigError"]


class ExportError(Exception):
    """An exporter could not deliver spans."""


class ExporterConfigError(ExportError):
    """An exporter could not be set up (e.g. an unwritable output path).

    Raised at construction, so a bad flag fails at start-up (the CLI maps it
    to exit code 2) rather than at the first span.
    """


@runtime_checkable
class Exporter(Protocol):
    def export(self, spans: Sequence[ReadableSpan]) -> None:
        """Deliver one batch; an empty batch is allowed and does nothing."""

    def shutdown(self) -> None:
        """Flush and release resources; later exports are ignored."""
