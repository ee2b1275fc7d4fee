"""Span exporters: where finished session spans go.

Every exporter takes :class:`~clovisor.export.record.SpanRecord` batches
(built by :func:`clovisor.export.spans.session_to_span`), so the runtime can
fan one batch out to several outputs. ``export`` never blocks: each output
queues records and sends them from its own thread
(:class:`~clovisor.export.queue.SpanQueue`). Importing this package stays
cheap: the protobuf-based exporters live in their own modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .record import SpanRecord

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
    def export(self, spans: Sequence[SpanRecord]) -> None:
        """Queue one batch without blocking; an empty batch does nothing."""

    def shutdown(self) -> None:
        """Flush and release resources; later exports are ignored."""
