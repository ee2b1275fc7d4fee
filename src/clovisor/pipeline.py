"""Wires the runtime: ring reader -> tracker -> exporters, and the kernel hooks.

The only module that knows all the stages. ``Tracer.start`` loads the
classifier, writes the port/egress tables, attaches to every interface and
starts three threads joined by bounded pipes; ``Tracer.stop`` detaches first
(no new events), drains the ring, lets the tracker flush pending sessions,
and shuts the exporters down, in that order.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan

from .clock import MonotonicToWall
from .core.events import Segment
from .core.tracker import Limits, Tracker
from .export import Exporter
from .export.ids import FastIdGenerator
from .export.spans import session_to_span
from .kernel.attach import Attachment, attach
from .kernel.loader import BpfObject
from .kernel.ringbuf import RingReader
from .specs import EgressSpec, PortSpec, SpecError
from .stages import Pipe, Stage

log = logging.getLogger(__name__)

DEFAULT_CAPTURE_BYTES = 1024
_POLL_MS = 100
_ADVANCE_NS = 250_000_000  # how often the tracker lets time pass (timeouts)


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceOptions:
    interfaces: tuple[str, ...]
    ports: tuple[PortSpec, ...] = ()
    egress: tuple[EgressSpec, ...] = ()
    service: str | None = None  # service.name; default: the interface name
    resource_attrs: tuple[tuple[str, str], ...] = ()
    capture_bytes: int = DEFAULT_CAPTURE_BYTES
    attach_mode: Literal["auto", "tcx", "clsact"] = "auto"
    ring_bytes: int = 4 << 20
    limits: Limits = field(default_factory=Limits)
    bpf_object: Path | None = None


@dataclass(slots=True)
class Batch:
    segments: list[Segment]
    now_ns: int  # CLOCK_MONOTONIC when the batch was read: the tracker's "now"


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    segments: int
    events_lost: int
    sessions: int
    parse_errors: int
    malformed_records: int
    export_failures: int

    def __str__(self) -> str:
        return (
            f"segments seen {self.segments}, events lost {self.events_lost}, "
            f"sessions emitted {self.sessions}, parse errors {self.parse_errors}"
            + (f", malformed records {self.malformed_records}" if self.malformed_records else "")
            + (f", export failures {self.export_failures}" if self.export_failures else "")
        )


def resolve_interface(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise SpecError(f"interface {name!r} does not exist in this network namespace") from None


class Tracer:
    """One classifier object, hooks on some interfaces, one pipeline."""

    def __init__(self, options: TraceOptions, exporters: Sequence[Exporter]) -> None:
        if not options.interfaces:
            raise SpecError("at least one --iface is needed")
        if not options.ports and not options.egress:
            raise SpecError("nothing to trace: give --port and/or --egress")
        self.options = options
        self.exporters = list(exporters)
        self._ifindex = {name: resolve_interface(name) for name in options.interfaces}
        self._names = {i: n for n, i in self._ifindex.items()}
        self._resources = {
            i: Resource.create(
                {"service.name": options.service or n, **dict(options.resource_attrs)}
            )
            for n, i in self._ifindex.items()
        }
        self.tracker = Tracker(options.limits)
        self.sessions = 0
        self.export_failures = 0
        self.done = threading.Event()  # set when --count sessions were exported
        self.count: int | None = None
        self._stop = threading.Event()
        self._obj: BpfObject | None = None
        self._reader: RingReader | None = None
        self._attachments: list[Attachment] = []
        self._threads: list[threading.Thread] = []
        self._clock = MonotonicToWall()
        self._ids = FastIdGenerator()
        self._last_advance = 0
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        opts = self.options
        try:
            self._obj = obj = BpfObject(
                opts.bpf_object, capture_bytes=opts.capture_bytes, ring_bytes=opts.ring_bytes
            )
            for ifindex in self._ifindex.values():
                for p in opts.ports:
                    obj.set_server_port(ifindex, p.port, p.protocol)
                for e in opts.egress:
                    obj.set_egress(ifindex, e.port, e.addr, e.protocol)
            self._reader = RingReader(obj)
            ingress, egress = obj.prog_fd("clv_tc_ingress"), obj.prog_fd("clv_tc_egress")
            for ifindex in self._ifindex.values():
                self._attachments.append(attach(ifindex, ingress, egress, opts.attach_mode))
        except BaseException:
            self._release()
            raise
        batches: Pipe[Batch] = Pipe(16, "segments")
        spans: Pipe[list[ReadableSpan]] = Pipe(16, "spans")
        reader = threading.Thread(target=self._read_loop, args=(batches,), name="ring", daemon=True)
        tracker = Stage("tracker", batches, spans, self._track, finish=self._flush)
        exporter: Stage[list[ReadableSpan], None] = Stage(
            "export", spans, None, self._export, finish=self._shutdown_exporters
        )
        self._threads = [reader, tracker, exporter]
        for t in self._threads:
            t.start()
        log.info(
            "tracing %s (%s)",
            ", ".join(self._ifindex),
            ", ".join(f"{a.ifname}:{a.mode}" for a in self._attachments),
        )

    def stop(self, timeout: float = 10.0) -> Totals:
        """Detach, drain, flush and shut down; idempotent."""
        if not self._stopped:
            self._stopped = True
            self._detach()  # first: nothing new enters the ring
            self._stop.set()
            deadline = time.monotonic() + timeout
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
            totals = self.totals()
            self._release()
            self._final = totals
        return self._final

    def totals(self) -> Totals:
        counters = self._obj.counters() if self._obj is not None else {}
        return Totals(
            segments=self.tracker.stats.segments,
            events_lost=counters.get("lost", 0),
            sessions=self.sessions,
            parse_errors=self.tracker.stats.parse_errors,
            malformed_records=self._reader.malformed if self._reader is not None else 0,
            export_failures=self.export_failures,
        )

    @property
    def attachments(self) -> list[Attachment]:
        return list(self._attachments)

    # -- stages ---------------------------------------------------------------------

    def _read_loop(self, out: Pipe[Batch]) -> None:
        reader = self._reader
        assert reader is not None
        try:
            while not self._stop.is_set():
                segs = reader.poll(_POLL_MS)
                out.put(Batch(segs, time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
            # The hooks are gone: what is left in the ring is all there will be.
            segs = reader.poll(0)
            out.put(Batch(segs, time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
        except Exception:
            log.exception("ring reader failed")
        finally:
            out.close()

    def _track(self, batch: Batch) -> list[list[ReadableSpan]]:
        tracker = self.tracker
        sessions = tracker.feed_many(batch.segments) if batch.segments else []
        if batch.now_ns - self._last_advance >= _ADVANCE_NS:
            self._last_advance = batch.now_ns
            sessions += tracker.advance(batch.now_ns)
            self._clock.resample_if_due()
        return [self._spans(sessions)] if sessions else []

    def _flush(self) -> list[list[ReadableSpan]]:
        sessions = self.tracker.close()
        return [self._spans(sessions)] if sessions else []

    def _spans(self, sessions: list) -> list[ReadableSpan]:  # type: ignore[type-arg]
        to_wall, ids, res, names = self._clock.to_wall, self._ids, self._resources, self._names
        return [
            session_to_span(
                s, resource=res[s.ifindex], to_wall=to_wall, ids=ids, interface_names=names
            )
            for s in sessions
        ]

    def _export(self, spans: list[ReadableSpan]) -> list[None]:
        if self.count is not None:
            spans = spans[: max(0, self.count - self.sessions)]
        for exporter in self.exporters:
            try:
                exporter.export(spans)
            except Exception as exc:
                self.export_failures += 1
                log.error("export to %s failed: %s", type(exporter).__name__, exc)
        self.sessions += len(spans)
        if self.count is not None and self.sessions >= self.count:
            self.done.set()
        return []

    def _shutdown_exporters(self) -> list[None]:
        for exporter in self.exporters:
            try:
                exporter.shutdown()
            except Exception as exc:
                log.error("shutting down %s failed: %s", type(exporter).__name__, exc)
        return []

    # -- teardown ---------------------------------------------------------------

    def _detach(self) -> None:
        for att in self._attachments:
            try:
                att.detach()
            except Exception as exc:
                log.error("detaching from %s failed: %s", att.ifname, exc)

    def _release(self) -> None:
        self._detach()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                self._reader.close()
        if self._obj is not None:
            with contextlib.suppress(Exception):
                self._obj.close()
