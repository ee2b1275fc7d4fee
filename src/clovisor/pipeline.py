"""Wires the runtime: ring -> tracker -> outputs, and the kernel hooks.

The only module that knows all the stages. ``Tracer.start`` loads the
classifier, writes the port/egress tables, attaches to every interface and
starts the tracker thread, whose bounded input is the ring buffer itself.
It hands span records to each output's bounded queue
(:class:`clovisor.export.queue.SpanQueue`), which batches them by one
policy and sends them from the output's own thread. ``Tracer.stop``
detaches first (no new events), drains the ring, lets the tracker flush
pending sessions, and shuts the outputs down, in that order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opentelemetry.sdk.resources import Resource

from .clock import MonotonicToWall
from .core.events import Outcome, Record, Role, Session
from .core.tracker import Limits, ParserLookup, Tracker
from .export import Exporter
from .export.ids import FastIdGenerator
from .export.record import SpanRecord
from .export.spans import session_to_span
from .kernel.abi import CLV_WAKEUP_NEVER, Method
from .kernel.attach import Attachment, attach
from .kernel.loader import BpfObject, RedKey, RedValue
from .kernel.ringbuf import RingReader
from .metrics import Unseen
from .specs import EgressSpec, PortSpec, SpecError

log = logging.getLogger(__name__)

# clv_method -> the semconv method label (NONE: a method the kernel does not name)
_METHOD_NAMES = {m.value: m.name for m in Method if m is not Method.NONE}

DEFAULT_CAPTURE_BYTES = 1024
_ADVANCE_NS = 250_000_000  # how often the tracker lets time pass (timeouts)
# The ring is drained on a timer (no record wakes the reader, which spares
# the classifier a ring query and an irq_work) and tracked in slices: a
# slice is well under a millisecond of tracker work, and the tracker yields
# the CPU after each one, so the workload being traced never waits long
# behind the tracer (measured: tracer bursts of several ms, not its total
# CPU, were what cost the workload its p99). When more than BACKLOG_BYTES
# wait in the ring the slice doubles (up to MAX_SLICE_RECORDS) and the
# tracker stops yielding after the bigger ones: a tracer that is behind takes
# its fair share of the CPU. Once it has caught up the slices are small again.
DRAIN_INTERVAL_MS = 10
# The drain timer after empty drains (doubling from 10 ms). The ring must
# hold what a burst brings meanwhile: 40 ms of 300k records/s is 4 MiB.
IDLE_INTERVAL_MS = 40
SLICE_RECORDS = 64
MAX_SLICE_RECORDS = 4096
BACKLOG_BYTES = 64 << 10  # more than this queued in the ring: the tracer is behind
# Connection entries of the kernel looked at per advance (every 250 ms) for
# exchanges it holds past the idle timeout: a bounded number of syscalls per
# pass; the whole table (16,384 entries at most) within 8 s.
IDLE_SCAN_KEYS = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class TracerSettings:
    """Load-time settings of the classifier and the core."""

    capture_bytes: int = DEFAULT_CAPTURE_BYTES
    attach_mode: Literal["auto", "tcx", "clsact"] = "auto"
    ring_bytes: int = 4 << 20
    limits: Limits = field(default_factory=Limits)
    bpf_object: Path | None = None
    redact_all_query: bool = False  # --redact-query all
    # The classifier pairs the HTTP/1.x exchanges it can frame exactly (one
    # record per exchange); False: every segment crosses (--no-kernel-pairing).
    kernel_pairing: bool = True
    # Exchange records are shed (counted in the kernel's RED map only) while
    # less ring space than this is free; None: an eighth of the ring.
    shed_bytes: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InterfaceTarget:
    """One interface to trace and what to trace on it."""

    ifname: str
    ports: tuple[PortSpec, ...] = ()
    egress: tuple[EgressSpec, ...] = ()
    resource: Resource = field(default_factory=Resource.get_empty)


SessionObserver = Callable[[list[Session]], None]
SpanFilter = Callable[[Sequence[SpanRecord]], Sequence[SpanRecord]]  # e.g. Sampler.filter
Beat = Callable[[str], None]  # Health.beat: a loop made progress


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    segments: int
    events_lost: int
    sessions: int
    parse_errors: int
    malformed_records: int
    export_failures: int
    exchanges: int = 0  # exchanges the kernel paired (their records, and held ones ended)
    exchanges_shed: int = 0  # exchange records shed in the kernel (counted in its RED map)
    encrypted: int = 0
    unrecognized: int = 0
    # Requests seen but never exported: exchanges the kernel counted without
    # a record reaching user space, plus what the output that dropped the
    # most pushed out of its full queue.
    spans_shed: int = 0

    def __str__(self) -> str:
        return (
            f"segments seen {self.segments}, events lost {self.events_lost}, "
            f"sessions emitted {self.sessions}, parse errors {self.parse_errors}, "
            f"exchanges paired {self.exchanges}"
            + (f", exchanges shed {self.exchanges_shed}" if self.exchanges_shed else "")
            + (f", spans shed {self.spans_shed}" if self.spans_shed else "")
            + (f", encrypted {self.encrypted}" if self.encrypted else "")
            + (f", unrecognized {self.unrecognized}" if self.unrecognized else "")
            + (f", malformed records {self.malformed_records}" if self.malformed_records else "")
            + (f", export failures {self.export_failures}" if self.export_failures else "")
        )


def _dropped(exporter: Exporter) -> int:
    stats = getattr(exporter, "stats", None)
    return int(stats().get("spans_dropped", 0)) if callable(stats) else 0


def resolve_interface(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise SpecError(f"interface {name!r} does not exist in this network namespace") from None


class Tracer:
    """One classifier object, hooks on a changing set of interfaces, one pipeline.

    ``clovisor trace`` sets its interfaces once; the agent adds, updates and
    removes them as pods come and go (:meth:`set_interface`,
    :meth:`remove_interface`), and swaps exporters when the Jaeger endpoint
    changes (:meth:`set_exporters`). Control calls come from one thread at a
    time; the stages read shared state through atomically replaced dicts.
    """

    def __init__(
        self,
        settings: TracerSettings,
        exporters: Sequence[Exporter],
        *,
        observers: Sequence[SessionObserver] = (),
        span_filter: SpanFilter | None = None,
        beat: Beat | None = None,
        parsers: ParserLookup | None = None,
    ) -> None:
        self.settings = settings
        self._exporters: tuple[Exporter, ...] = tuple(exporters)
        self._exporters_lock = threading.Lock()
        self._observers = tuple(observers)
        self._span_filter = span_filter
        self._beat = beat or (lambda _loop: None)
        self.tracker = Tracker(settings.limits, parsers)
        self.sessions = 0  # sessions handed to the exporters
        self.export_failures = 0
        self._retired_drops: list[int] = []
        self.done = threading.Event()  # set when ``count`` sessions were exported
        self.count: int | None = None
        self.ready = threading.Event()  # the classifier is loaded and the stages run
        self._stop = threading.Event()
        self._obj: BpfObject | None = None
        self._reader: RingReader | None = None
        self._targets: dict[str, InterfaceTarget] = {}
        self._attachments: dict[str, Attachment] = {}
        self._ifindex: dict[str, int] = {}
        # Read by the tracker stage: replaced whole, never mutated in place.
        self._resources: dict[int, Resource] = {}
        self._names: dict[int, str] = {}
        self._services: dict[int, tuple[str, str]] = {}  # (service.name, service.namespace)
        self._default_resource = Resource.create({})
        self._default_service = (str(self._default_resource.attributes["service.name"]), "")
        self._threads: list[threading.Thread] = []
        self._clock = MonotonicToWall()
        self._ids = FastIdGenerator()
        self._last_advance = 0
        self.tracker_errors = 0  # batches whose handling raised (logged)
        self._stopped = False
        self._final: Totals | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Load the classifier and start the stages (no interface yet)."""
        st = self.settings
        try:
            self._obj = BpfObject(
                st.bpf_object,
                capture_bytes=st.capture_bytes,
                ring_bytes=st.ring_bytes,
                wakeup_bytes=CLV_WAKEUP_NEVER,
                pair_http=st.kernel_pairing,
                max_connections=st.limits.max_connections,
                shed_bytes=st.ring_bytes // 8 if st.shed_bytes is None else st.shed_bytes,
            )
            self._reader = RingReader(self._obj, max_records=SLICE_RECORDS)
        except BaseException:
            self._release()
            raise
        # The ring is the tracker's bounded input queue: one thread reads and
        # tracks, so no decoded segment waits in a second queue and no GIL
        # hand-over happens per slice between a reader and a tracker.
        tracker = threading.Thread(target=self._ring_loop, name="tracker", daemon=True)
        self._threads = [tracker]
        tracker.start()
        self.ready.set()

    def stop(self, timeout: float = 10.0) -> Totals:
        """Detach, drain, flush and shut down; idempotent."""
        if self._final is None:
            self.ready.clear()
            self._detach_all()  # first: nothing new enters the ring
            self._stop.set()
            deadline = time.monotonic() + timeout
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
            self._shutdown_exporters()  # after the tracker's last records
            self._final = self.totals()
            self._release()
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
            exchanges=self.tracker.stats.exchanges,
            exchanges_shed=counters.get("shed", 0),
            encrypted=self.tracker.stats.encrypted,
            unrecognized=self.tracker.stats.unrecognized,
            spans_shed=(sum(v.exchanges for v in self.red_metrics().values())
                        + max(self._dropped_by_output(), default=0)),
        )

    def _dropped_by_output(self) -> list[int]:
        """Spans each output's queue dropped, a replaced output's up to its replacement."""
        with self._exporters_lock:
            exporters = self._exporters
        return [_dropped(e) for e in exporters] + self._retired_drops

    # -- targets ---------------------------------------------------------------------

    def set_interface(self, target: InterfaceTarget) -> None:
        """Trace ``target.ifname`` as described; attach if it is new.

        Map entries are added before stale ones are removed, so a port that
        stays traced is never briefly untraced.
        """
        obj = self._obj
        if obj is None:
            raise RuntimeError("Tracer.start() first")
        ifindex = resolve_interface(target.ifname)
        old = self._targets.get(target.ifname)
        if old is not None and self._ifindex.get(target.ifname) != ifindex:
            self.remove_interface(target.ifname)  # same name, new interface
            old = None
        for p in target.ports:
            obj.set_server_port(ifindex, p.port, p.protocol)
        for e in target.egress:
            obj.set_egress(ifindex, e.port, e.addr, e.protocol)
        if old is not None:
            keep_ports = {p.port for p in target.ports}
            for p in old.ports:
                if p.port not in keep_ports:
                    obj.remove_server_port(ifindex, p.port)
            keep_egress = {(e.port, e.addr) for e in target.egress}
            for e in old.egress:
                if (e.port, e.addr) not in keep_egress:
                    obj.remove_egress(ifindex, e.port, e.addr)
        self._resources = {**self._resources, ifindex: target.resource}
        self._names = {**self._names, ifindex: target.ifname}
        attrs = target.resource.attributes
        self._services = {**self._services, ifindex: (
            str(attrs.get("service.name", "")), str(attrs.get("service.namespace", "")))}
        self._targets[target.ifname] = target
        self._ifindex[target.ifname] = ifindex
        if target.ifname not in self._attachments:
            try:
                att = attach(ifindex, obj.prog_fd("clv_tc_ingress"), obj.prog_fd("clv_tc_egress"),
                             self.settings.attach_mode)
            except BaseException:
                obj.clear_ifindex(ifindex)
                del self._targets[target.ifname], self._ifindex[target.ifname]
                raise
            self._attachments[target.ifname] = att
            log.info("attached to %s (ifindex %d, %s)", target.ifname, ifindex, att.mode)

    def remove_interface(self, ifname: str) -> None:
        """Stop tracing ``ifname``: detach and clear its map entries."""
        att = self._attachments.pop(ifname, None)
        if att is not None:
            try:
                att.detach()
            except Exception as exc:
                log.error("detaching from %s failed: %s", ifname, exc)
        ifindex = self._ifindex.pop(ifname, None)
        self._targets.pop(ifname, None)
        if ifindex is not None and self._obj is not None:
            self._obj.clear_ifindex(ifindex)
        log.info("detached from %s", ifname)

    def interfaces(self) -> dict[str, InterfaceTarget]:
        return dict(self._targets)

    @property
    def attachments(self) -> list[Attachment]:
        return list(self._attachments.values())

    def set_exporters(self, exporters: Sequence[Exporter]) -> None:
        """Replace the exporters; the old ones are flushed and shut down."""
        for e in self.swap_exporters(exporters):
            self._shutdown_one(e)

    def swap_exporters(self, exporters: Sequence[Exporter]) -> tuple[Exporter, ...]:
        """Replace the exporters and hand back the old ones, still running.

        For a caller that must not wait for a flush to an endpoint that may
        be gone (the agent, when Redis names a new Jaeger): it shuts them
        down where waiting costs nothing.
        """
        with self._exporters_lock:
            old, self._exporters = self._exporters, tuple(exporters)
        retired = tuple(e for e in old if e not in self._exporters)
        self._retired_drops.extend(d for d in map(_dropped, retired) if d)
        return retired

    # -- stages ---------------------------------------------------------------------

    def _ring_loop(self) -> None:
        """Read the ring in slices, track them, hand the spans on; flush at the end."""
        reader = self._reader
        assert reader is not None
        try:
            interval = DRAIN_INTERVAL_MS
            while not self._stop.is_set():
                segs = reader.poll(interval)
                # Idle, the timer backs off; the first record brings it back.
                # (Backing off under light traffic too saved CPU per request
                # at 1k req/s but made longer bursts and a worse p99 at 5k.)
                interval = DRAIN_INTERVAL_MS if segs else min(2 * interval, IDLE_INTERVAL_MS)
                self._beat("ring")
                self._track_slice(segs)
                queued = reader.backlog()
                behind = reader.more if queued is None else queued > BACKLOG_BYTES
                reader.max_records = (
                    min(2 * reader.max_records, MAX_SLICE_RECORDS) if behind else SLICE_RECORDS
                )
                if segs and len(segs) <= SLICE_RECORDS:
                    os.sched_yield()  # between slices: see SLICE_RECORDS
            reader.max_records = MAX_SLICE_RECORDS
            # The hooks are gone: what is left in the ring is all there will be.
            while True:
                self._track_slice(reader.poll(0))
                if not reader.more:
                    break
            self._export(self._guarded(self._flush))
        except Exception:
            log.exception("ring reader failed")

    def _track_slice(self, segs: list[Record]) -> None:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # the tracker's "now"
        if segs or now - self._last_advance >= _ADVANCE_NS:
            self._export(self._guarded(lambda: self._track(segs, now)))

    def _guarded(self, fn: Callable[[], list[SpanRecord]]) -> list[SpanRecord]:
        # A failing batch is logged and counted; it never stops the tracer.
        try:
            return fn()
        except Exception:
            self.tracker_errors += 1
            log.exception("tracker: handling a batch failed")
            return []

    def _track(self, segs: list[Record], now_ns: int) -> list[SpanRecord]:
        self._beat("tracker")
        tracker = self.tracker
        sessions = tracker.feed_many(segs) if segs else []
        samples = tracker.take_samples()
        if samples and log.isEnabledFor(logging.DEBUG):
            for port, first in samples:
                log.debug("port %d: a connection whose first bytes are no protocol of the "
                          "port (unrecognized): %r", port, first)  # fmt: skip
        if now_ns - self._last_advance >= _ADVANCE_NS:
            self._last_advance = now_ns
            sessions += tracker.advance(now_ns)
            obj = self._obj
            if obj is not None and obj.pair_http:
                # requests the kernel holds time out like the ones held here
                idle = self.settings.limits.idle_timeout_ns
                held = obj.take_idle_exchanges(now_ns, idle, IDLE_SCAN_KEYS)
                if held:
                    sessions += tracker.end_held(held, Outcome.TIMEOUT, now_ns)
            self._clock.resample_if_due()
        return self._spans(sessions)

    def _flush(self) -> list[SpanRecord]:
        # The hooks are detached and the ring drained: what the kernel still
        # holds is all there is.
        obj = self._obj
        held = obj.held_exchanges() if obj is not None and obj.pair_http else []
        return self._spans(self.tracker.close(held))

    def red_metrics(self) -> dict[RedKey, RedValue]:
        """The kernel's RED series: exchanges whose record never reached user space
        (lost or shed past capacity); every other exchange is a session here."""
        return self._obj.red_metrics() if self._obj is not None else {}

    def unseen_exchanges(self) -> list[Unseen]:
        """:meth:`red_metrics` labelled as the metrics label sessions (for
        :meth:`clovisor.metrics.Metrics.register_unseen`)."""
        out = []
        for key, value in self.red_metrics().items():
            service, namespace = self._services.get(key.ifindex, self._default_service)
            method = _METHOD_NAMES.get(key.method, "_OTHER")
            out.append(Unseen(Role(key.role), service, namespace, method,
                              str(key.status) if key.status else "", value.sum_ns / 1e9,
                              value.buckets))
        return out

    def _spans(self, sessions: list[Session]) -> list[SpanRecord]:
        if not sessions:
            return []
        for observe in self._observers:
            try:
                observe(sessions)
            except Exception:
                log.exception("session observer failed")
        to_wall, ids, names = self._clock.to_wall, self._ids, self._names
        res, default = self._resources, self._default_resource
        redact_all = self.settings.redact_all_query
        spans: Sequence[SpanRecord] = [
            session_to_span(
                s,
                resource=res.get(s.ifindex, default),
                to_wall=to_wall,
                ids=ids,
                interface_names=names,
                redact_all_query=redact_all,
            )
            for s in sessions
        ]
        if self._span_filter is not None:
            spans = self._span_filter(spans)
        return list(spans)

    def service_of(self, session: Session) -> tuple[str, str]:
        """``service.name`` and ``service.namespace`` ("" if unset) of the interface a
        session was seen on: the metrics' labels."""
        return self._services.get(session.ifindex, self._default_service)

    def health_stats(self) -> dict[str, int]:
        """Live counters for the health metrics (read at scrape time)."""
        t = self.totals()
        stats = self.tracker.stats
        out = {
            "segments": t.segments,
            "events_lost": t.events_lost,
            "parse_errors": t.parse_errors,
            "malformed_records": t.malformed_records,
            "sessions": t.sessions,
            "exchanges_paired": t.exchanges,
            "exchanges_shed": t.exchanges_shed,
            "spans_shed": t.spans_shed,
            "handovers": stats.handovers,
            "connections_evicted": stats.evicted,
            "lost_responses": stats.lost_responses,
            "encrypted": stats.encrypted,
            "unrecognized": stats.unrecognized,
            "http2_framing_lost": stats.framing_lost,
            "tracked_connections": len(self.tracker),
            "buffered_bytes": stats.buffered_bytes,
        }
        with self._exporters_lock:
            exporters = self._exporters
        for e in exporters:
            es = getattr(e, "stats", None)
            if callable(es):
                for k, v in es().items():
                    if k in ("spans_exported", "spans_failed", "spans_dropped", "queue_size"):
                        key = "export_queue_size" if k == "queue_size" else k
                        out[key] = out.get(key, 0) + int(v)
        return out

    def untraced(self) -> dict[tuple[str, int], int]:
        """(reason, server port) -> what the tracker could not trace, and why (a copy)."""
        return self.tracker.stats.untraced

    def _export(self, spans: list[SpanRecord]) -> None:
        """Hand spans to every output's queue (never blocks)."""
        if not spans:
            return
        if self.count is not None:
            spans = spans[: max(0, self.count - self.sessions)]
        with self._exporters_lock:
            exporters = self._exporters
        for exporter in exporters:
            try:
                exporter.export(spans)
            except Exception as exc:
                self.export_failures += 1
                log.error("export to %s failed: %s", type(exporter).__name__, exc)
        self.sessions += len(spans)
        if self.count is not None and self.sessions >= self.count:
            self.done.set()

    def _shutdown_exporters(self) -> None:
        with self._exporters_lock:
            exporters = self._exporters
        for exporter in exporters:
            self._shutdown_one(exporter)

    @staticmethod
    def _shutdown_one(exporter: Exporter) -> None:
        try:
            exporter.shutdown()
        except Exception as exc:
            log.error("shutting down %s failed: %s", type(exporter).__name__, exc)

    # -- teardown ---------------------------------------------------------------

    def _detach_all(self) -> None:
        for ifname in list(self._attachments):
            att = self._attachments.pop(ifname)
            try:
                att.detach()
            except Exception as exc:
                log.error("detaching from %s failed: %s", ifname, exc)

    def _release(self) -> None:
        self._detach_all()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                self._reader.close()
        if self._obj is not None:
            with contextlib.suppress(Exception):
                self._obj.close()
