"""Prometheus metrics: RED histograms per route, session outcomes, agent health.

Exposed names (all in one :class:`Metrics` object's own registry; nothing is
registered in prometheus_client's global registry):

RED, one observation per HTTP session, **sampled or not** (sampling thins
traces, never metrics, so rates and percentiles stay exact):

- ``http_server_request_duration_seconds`` (histogram): SERVER sessions;
- ``http_client_request_duration_seconds`` (histogram): CLIENT sessions.

  Labels, exactly: ``service_name`` and ``service_namespace`` (the
  Kubernetes namespace, empty outside Kubernetes: two Services called
  ``web`` in two namespaces are two series), ``http_request_method`` (the semconv
  method, ``_OTHER`` for anything else), ``http_response_status_code`` (empty
  when no response was seen: reset, closed or timed out before the status
  line, the way an absent OTel attribute reads in Prometheus) and
  ``http_route`` (see :mod:`clovisor.routes`). Buckets are the OTel semconv
  ones, 5 ms to 10 s. The duration runs from the first request byte to the
  last response byte (or to the moment the outcome was decided, for a reset
  or a timeout). Sessions cut short by the tracer's own shutdown are not
  observed: their duration says nothing about the workload.

  Past capacity the ring buffer fills and exchange records are shed or
  lost; the classifier counts each exchange it paired but could not
  deliver, by method, status and duration bucket (:meth:`Metrics.register_unseen`).
  Those are added to the same histograms with ``http_route`` empty (the
  path never reached user space), so the request counts stay exact while
  spans are shed: every exchange is counted once, from its session or from
  the kernel.

- ``rpc_server_call_duration_seconds`` and ``rpc_client_call_duration_seconds``
  (histograms): gRPC calls instead of the HTTP histograms, as the OTel RPC
  conventions name them (``rpc.server.call.duration``, unit ``s``). Labels,
  exactly: ``service_name``, ``service_namespace``, ``rpc_system_name``
  (``grpc``), ``rpc_method`` (the full method, ``package.Service/Method``;
  past :data:`MAX_RPC_METHODS` distinct ones per kind, ``_OTHER``) and
  ``rpc_response_status_code`` (``OK``, ``NOT_FOUND``, ...; empty when the
  call ended without a status). Same buckets, same overflow rule.

- ``clovisor_sessions_total{service_name, service_namespace, outcome}`` (counter): every
  session, HTTP and TCP, by outcome (``complete``, ``reset``, ``closed``,
  ``timeout``, ``shutdown``). Failures that a status-code label cannot show
  are counted here.

Agent health, read from the runtime at scrape time (see
:meth:`Metrics.register_health`), named in :data:`HEALTH_METRICS`:
``clovisor_segments_total``, ``clovisor_events_lost_total``,
``clovisor_parse_errors_total``, ``clovisor_malformed_records_total``,
``clovisor_sessions_emitted_total``, ``clovisor_exchanges_paired_total``,
``clovisor_exchanges_shed_total``, ``clovisor_spans_shed_total``, ``clovisor_handovers_total``,
``clovisor_connections_evicted_total``,
``clovisor_lost_responses_total``, ``clovisor_encrypted_connections_total``,
``clovisor_unrecognized_connections_total``, ``clovisor_http2_framing_lost_total``,
``clovisor_spans_exported_total``,
``clovisor_spans_failed_total``,
``clovisor_spans_dropped_total``, ``clovisor_spans_sampled_out_total``,
``clovisor_export_queue_size``, ``clovisor_tracked_connections``,
``clovisor_buffered_bytes``; plus ``clovisor_build_info{version}``.

What was not traced, by reason and port (see :meth:`Metrics.register_untraced`):
``clovisor_untraced_total{reason, server_port}``, ``reason`` one of
``encrypted``, ``unrecognized``, ``parse_error``, ``truncated``, ``lost``, so an
operator sees which ports need another protocol (or a longer capture).

The process's own: prometheus_client's standard ``process_*`` (CPU seconds,
resident and virtual memory, open file descriptors, start time) and
``python_*`` (interpreter version, garbage collections) collectors.

Label values never carry a query string or a header value: the route is
folded from the path alone, the method is one of a fixed set, the status is
a number.

Why a hand-written collector rather than prometheus_client's ``Histogram``:
``observe`` runs for every session on the agent's hot path, and the library's
child lookup plus per-bucket locked counters cost several µs per call. Here a
batch takes one lock, and a session costs a dict lookup, a bisect and two
list updates. The exposition is the library's, from the same families.
"""

from __future__ import annotations

import logging
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .core.events import Outcome, Role, Session
from .export.spans import GRPC_CODES, KNOWN_METHODS
from .routes import RouteFolder
from .specs import SpecError, parse_port_number

__all__ = [
    "BUCKETS",
    "HEALTH_METRICS",
    "LABELS",
    "MAX_RPC_METHODS",
    "OVERFLOW_ROUTE",
    "RPC_LABELS",
    "Metrics",
    "parse_listen_address",
]

log = logging.getLogger(__name__)

# OTel semantic conventions, http.server.request.duration advice.
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
LABELS: Final = (
    "service_name",
    "service_namespace",
    "http_request_method",
    "http_response_status_code",
    "http_route",
)
RPC_LABELS: Final = (
    "service_name",
    "service_namespace",
    "rpc_system_name",
    "rpc_method",
    "rpc_response_status_code",
)
# Distinct rpc_method values kept per kind (the wire names them: a client
# could send any path); beyond, a new one is "_OTHER" as semconv spells it.
MAX_RPC_METHODS: Final = 1000
_SESSION_LABELS: Final = ("service_name", "service_namespace", "outcome")
DEFAULT_MAX_SERIES: Final = 10_000
# Where label sets beyond max_series go, like the OTel SDK's overflow series.
OVERFLOW_ROUTE: Final = "/{overflow}"

# repr of these bounds is what prometheus_client writes for "le" ("1.0", "0.005").
_LE: Final = (*(repr(b) for b in BUCKETS), "+Inf")
_SERVER_NAME: Final = "http_server_request_duration_seconds"
_CLIENT_NAME: Final = "http_client_request_duration_seconds"
_SERVER_HELP: Final = "Duration of HTTP server requests seen on the wire."
_CLIENT_HELP: Final = "Duration of HTTP client requests seen on the wire."
_SESSIONS_HELP: Final = "Sessions (request/response exchanges or TCP connections) by outcome."
_RPC_SERVER_NAME: Final = "rpc_server_call_duration_seconds"
_RPC_CLIENT_NAME: Final = "rpc_client_call_duration_seconds"
_RPC_SERVER_HELP: Final = "Duration of gRPC calls served, seen on the wire."
_RPC_CLIENT_HELP: Final = "Duration of gRPC calls made, seen on the wire."
# A gRPC code's label: its semconv name, or the number beyond the known ones.
_GRPC_LABELS: Final = {i: name for i, name in enumerate(GRPC_CODES)}

# health key -> (metric name without _total, type, help)
HEALTH_METRICS: Final[Mapping[str, tuple[str, str, str]]] = {
    "segments": ("clovisor_segments", "counter", "TCP segments received from the kernel."),
    "events_lost": (
        "clovisor_events_lost",
        "counter",
        "Kernel records dropped because the ring buffer was full.",
    ),
    "parse_errors": (
        "clovisor_parse_errors",
        "counter",
        "Messages (or HTTP/2 directions) their port's parser rejected.",
    ),
    "malformed_records": (
        "clovisor_malformed_records",
        "counter",
        "Ring-buffer records that did not decode.",
    ),
    "sessions": ("clovisor_sessions_emitted", "counter", "Sessions the tracker emitted."),
    "exchanges_paired": (
        "clovisor_exchanges_paired",
        "counter",
        "HTTP exchanges the classifier paired in the kernel (one record each).",
    ),
    "exchanges_shed": (
        "clovisor_exchanges_shed",
        "counter",
        "Exchange records shed in the kernel past capacity (counted in its RED map only).",
    ),
    "handovers": (
        "clovisor_handovers",
        "counter",
        "HTTP connections the classifier handed over to the user-space framer.",
    ),
    "connections_evicted": (
        "clovisor_connections_evicted",
        "counter",
        "Tracked connections evicted because the connection table was full.",
    ),
    "lost_responses": (
        "clovisor_lost_responses",
        "counter",
        "Requests not reported because their response was in records the ring lost.",
    ),
    "encrypted": (
        "clovisor_encrypted_connections",
        "counter",
        "Connections of traced ports that began with a TLS ClientHello.",
    ),
    "unrecognized": (
        "clovisor_unrecognized_connections",
        "counter",
        "Connections whose first bytes were no protocol of their port.",
    ),
    "http2_framing_lost": (
        "clovisor_http2_framing_lost",
        "counter",
        "Times an HTTP/2 direction lost its frame boundaries (beyond the capture, or lost).",
    ),
    "spans_exported": ("clovisor_spans_exported", "counter", "Spans the exporters accepted."),
    "spans_failed": ("clovisor_spans_failed", "counter", "Spans an exporter failed to deliver."),
    "spans_shed": (
        "clovisor_spans_shed",
        "counter",
        "Requests seen but never exported: counted by the kernel without a record, or "
        "dropped from the fullest output queue.",
    ),
    "spans_dropped": (
        "clovisor_spans_dropped",
        "counter",
        "Spans dropped before export because the export queue was full.",
    ),
    "spans_sampled_out": (
        "clovisor_spans_sampled_out",
        "counter",
        "Spans the sampler decided not to export (metrics still count them).",
    ),
    "export_queue_size": (
        "clovisor_export_queue_size",
        "gauge",
        "Span batches waiting for the exporters.",
    ),
    "tracked_connections": (
        "clovisor_tracked_connections",
        "gauge",
        "Connections the tracker currently follows.",
    ),
    "buffered_bytes": (
        "clovisor_buffered_bytes",
        "gauge",
        "Payload bytes held across segments (partial headers, out-of-order data).",
    ),
}
_HEALTH_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_]*")

# Series key: (role, service, namespace, method, status, route); value: [sum, buckets...].
_Key = tuple[Role, str, str, str, str, str]
# (role, service, namespace, rpc method, status).
_RpcKey = tuple[Role, str, str, str, str]
# A session's (service.name, service.namespace).
ServiceOf = Callable[[Session], tuple[str, str]]


class Unseen(NamedTuple):
    """Exchanges the kernel counted whose record never reached user space."""

    role: Role
    service: str
    namespace: str
    method: str  # the semconv method, or _OTHER
    status: str  # the status code label
    seconds: float  # the sum of their durations
    buckets: tuple[int, ...]  # per bucket of BUCKETS then +Inf, not cumulative


UnseenSource = Callable[[], Iterable[Unseen]]


class _Red(Collector):
    """RED histograms and the outcome counter, fed in batches."""

    def __init__(self, routes: RouteFolder, max_series: int) -> None:
        self.routes = routes
        self.max_series = max_series
        self.lock = threading.Lock()
        self.series: dict[_Key, list[float]] = {}
        # gRPC: (role, service, namespace, rpc method, status) -> [sum, buckets...].
        self.rpc_series: dict[_RpcKey, list[float]] = {}
        self.rpc_methods: dict[Role, set[str]] = {Role.SERVER: set(), Role.CLIENT: set()}
        self.outcomes: dict[tuple[str, str, Outcome], int] = {}
        self.unseen: list[UnseenSource] = []
        # Status codes are three digits off the wire; str() per session
        # would cost more than this lookup.
        self.status_labels = {code: str(code) for code in range(1000)}

    def observe(self, sessions: Iterable[Session], service_of: ServiceOf) -> None:
        fold = self.routes.fold_target
        series = self.series
        outcomes = self.outcomes
        status_labels = self.status_labels
        methods = KNOWN_METHODS
        shutdown = Outcome.SHUTDOWN
        bounds = BUCKETS
        with self.lock:
            for s in sessions:
                service, namespace = service_of(s)
                outcome = s.outcome
                okey = (service, namespace, outcome)
                outcomes[okey] = outcomes.get(okey, 0) + 1
                req = s.request
                if req is None or outcome is shutdown:
                    continue
                if s.attributes and self._observe_rpc(s, service, namespace):
                    continue
                resp = s.response
                status = "" if resp is None else status_labels.get(resp.status_code, "_OTHER")
                method = req.method
                key = (
                    s.role,
                    service,
                    namespace,
                    method if method in methods else "_OTHER",
                    status,
                    fold(req.target),
                )
                entry = series.get(key)
                if entry is None:
                    entry = self._new_series(key)
                seconds = (s.end_ns - s.start_ns) / 1e9
                if seconds < 0.0:
                    seconds = 0.0
                entry[0] += seconds
                # bisect_left: the first bound >= seconds, i.e. the "le" bucket.
                entry[1 + bisect_left(bounds, seconds)] += 1

    def _observe_rpc(self, s: Session, service: str, namespace: str) -> bool:
        """Count a gRPC call in the RPC histograms; False if the session is no call."""
        system = service_method = rpc_method = ""
        code: int | None = None
        for k, v in s.attributes:
            if k == "rpc.system":
                system = str(v)
            elif k == "rpc.service":
                service_method = str(v)
            elif k == "rpc.method":
                rpc_method = str(v)
            elif k == "rpc.grpc.status_code" and isinstance(v, int):
                code = v
        if system != "grpc":
            return False
        method = f"{service_method}/{rpc_method}" if service_method and rpc_method else "_OTHER"
        known = self.rpc_methods[s.role]
        if method not in known:
            if len(known) >= MAX_RPC_METHODS:
                method = "_OTHER"
            else:
                known.add(method)
        status = "" if code is None else _GRPC_LABELS.get(code, str(code))
        key = (s.role, service, namespace, method, status)
        entry = self.rpc_series.get(key)
        if entry is None:
            if len(self.rpc_series) >= self.max_series:
                key = (s.role, service, namespace, "_OTHER", "_OTHER")
                entry = self.rpc_series.get(key)
            if entry is None:
                entry = [0.0, *([0] * (1 + len(BUCKETS)))]
                self.rpc_series[key] = entry
        seconds = max(0.0, (s.end_ns - s.start_ns) / 1e9)
        entry[0] += seconds
        entry[1 + bisect_left(BUCKETS, seconds)] += 1
        return True

    def _new_series(self, key: _Key) -> list[float]:
        if len(self.series) >= self.max_series:
            # Route folding bounds routes, but method x status x route x
            # service can still multiply; past the limit, new label sets
            # share one overflow series per service and kind.
            key = (key[0], key[1], key[2], "_OTHER", "_OTHER", OVERFLOW_ROUTE)
            overflow = self.series.get(key)
            if overflow is not None:
                return overflow
        # The sum is a float, the bucket counts ints (so they print as "3").
        entry: list[float] = [0.0, *([0] * (1 + len(BUCKETS)))]
        self.series[key] = entry
        return entry

    def describe(self) -> Iterable[Metric]:
        return [
            HistogramMetricFamily(_SERVER_NAME, _SERVER_HELP, labels=LABELS),
            HistogramMetricFamily(_CLIENT_NAME, _CLIENT_HELP, labels=LABELS),
            CounterMetricFamily("clovisor_sessions", _SESSIONS_HELP, labels=_SESSION_LABELS),
            HistogramMetricFamily(_RPC_SERVER_NAME, _RPC_SERVER_HELP, labels=RPC_LABELS),
            HistogramMetricFamily(_RPC_CLIENT_NAME, _RPC_CLIENT_HELP, labels=RPC_LABELS),
        ]

    def _unseen(self) -> dict[_Key, list[float]]:
        """The kernel's counts of exchanges no session stands for, by series key."""
        out: dict[_Key, list[float]] = {}
        for source in list(self.unseen):
            try:
                rows = list(source())
            except Exception:
                log.exception("unseen-exchange source %r failed", source)
                continue
            for u in rows:
                key = (u.role, u.service, u.namespace, u.method, u.status, "")
                entry = out.setdefault(key, [0.0, *([0] * (1 + len(BUCKETS)))])
                entry[0] += u.seconds
                for i, n in enumerate(u.buckets[: len(BUCKETS) + 1]):
                    entry[1 + i] += n
        return out

    def collect(self) -> Iterable[Metric]:
        unseen = self._unseen()
        with self.lock:
            series = [(k, list(v)) for k, v in self.series.items()]
            rpc_series = [(k, list(v)) for k, v in self.rpc_series.items()]
            outcomes = list(self.outcomes.items())
        merged = dict(series)
        for key, extra in unseen.items():
            entry = merged.get(key)
            merged[key] = extra if entry is None else [a + b for a, b in zip(entry, extra,
                                                                              strict=True)]
        series = list(merged.items())
        server = HistogramMetricFamily(_SERVER_NAME, _SERVER_HELP, labels=LABELS)
        client = HistogramMetricFamily(_CLIENT_NAME, _CLIENT_HELP, labels=LABELS)
        for (role, service, namespace, method, status, route), entry in series:
            family = server if role is Role.SERVER else client
            family.add_metric([service, namespace, method, status, route], _buckets(entry),
                              entry[0])  # fmt: skip
        rpc_server = HistogramMetricFamily(_RPC_SERVER_NAME, _RPC_SERVER_HELP, labels=RPC_LABELS)
        rpc_client = HistogramMetricFamily(_RPC_CLIENT_NAME, _RPC_CLIENT_HELP, labels=RPC_LABELS)
        for (role, service, namespace, rpc_method, status), entry in rpc_series:
            family = rpc_server if role is Role.SERVER else rpc_client
            family.add_metric([service, namespace, "grpc", rpc_method, status], _buckets(entry),
                              entry[0])  # fmt: skip
        sessions = CounterMetricFamily("clovisor_sessions", _SESSIONS_HELP, labels=_SESSION_LABELS)
        for (service, namespace, outcome), n in outcomes:
            sessions.add_metric([service, namespace, outcome.value], n)
        return [server, client, sessions, rpc_server, rpc_client]


def _buckets(entry: list[float]) -> list[tuple[str, float]]:
    """Cumulative ``le`` buckets of a series' per-bucket counts."""
    cumulative: float = 0
    buckets: list[tuple[str, float]] = []
    for le, n in zip(_LE, entry[1:], strict=True):
        cumulative += n
        buckets.append((le, cumulative))
    return buckets


_UNTRACED_HELP: Final = (
    "Traffic of server ports not traced as their protocol, by reason: encrypted and "
    "unrecognized count connections, parse_error parse errors, truncated header blocks "
    "or HTTP/2 frame headers beyond the capture, lost requests or HTTP/2 framing lost "
    "to records the ring dropped."
)
Untraced = Callable[[], Mapping[tuple[str, int], int]]


class _Untraced(Collector):
    """``clovisor_untraced_total{reason, server_port}``, read at scrape time."""

    def __init__(self) -> None:
        self.sources: list[Untraced] = []

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        totals: dict[tuple[str, int], int] = {}
        for source in list(self.sources):
            try:
                values = source()
            except Exception:
                log.exception("untraced source %r failed", source)
                continue
            for key, value in values.items():
                totals[key] = totals.get(key, 0) + value
        family = CounterMetricFamily(
            "clovisor_untraced", _UNTRACED_HELP, labels=["reason", "server_port"]
        )
        for (reason, port), n in sorted(totals.items()):
            family.add_metric([reason, str(port)], n)
        yield family


class _Health(Collector):
    """Reads the runtime's live counters when Prometheus scrapes."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Mapping[str, int]]] = []

    def describe(self) -> Iterable[Metric]:
        # Names depend on what the sources report; reading them at
        # registration time would call into a runtime that may not run yet.
        return []

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, int] = {}
        for source in list(self.sources):
            try:
                values = source()
            except Exception:
                # A broken source must not take /metrics down with it.
                log.exception("health source %r failed", source)
                continue
            for key, value in values.items():
                totals[key] = totals.get(key, 0) + value
        info = GaugeMetricFamily(
            "clovisor_build_info", "Clovisor build; the value is always 1.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        for key, value in totals.items():
            known = HEALTH_METRICS.get(key)
            if known is not None:
                name, kind, doc = known
            elif _HEALTH_KEY_RE.fullmatch(key):
                name, kind, doc = f"clovisor_{key}", "gauge", f"Agent value {key!r}."
            else:
                continue
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
    """The agent's metrics and their registry.

    ``routes`` folds paths into ``http_route`` values (default: the
    heuristic alone, no patterns). ``max_series`` bounds the label sets per
    histogram; beyond it new label sets go to one overflow series per
    service (method and status ``_OTHER``, route ``/{overflow}``).
    """

    def __init__(
        self, routes: RouteFolder | None = None, *, max_series: int = DEFAULT_MAX_SERIES
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._red = _Red(routes if routes is not None else RouteFolder(), max_series)
        self._health = _Health()
        self._untraced = _Untraced()
        self.registry.register(self._red)
        self.registry.register(self._health)
        self.registry.register(self._untraced)
        # The agent's own CPU, memory, file descriptors and GC, as every
        # Python exporter shows them.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe_sessions(self, sessions: Iterable[Session], service_of: ServiceOf) -> None:
        """Count a batch of sessions (all of them: call before sampling).

        ``service_of`` gives the ``service_name`` and ``service_namespace``
        labels of a session, typically from its ifindex. Thread-safe; one
        lock per batch.
        """
        self._red.observe(sessions, service_of)

    def register_unseen(self, source: UnseenSource) -> None:
        """Read ``source()`` at every scrape: exchanges the kernel counted that
        no session was made for (their records shed or lost), added to the RED
        histograms with an empty ``http_route``. The counts must only grow."""
        self._red.unseen.append(source)

    def register_health(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Read ``source()`` at every scrape: a mapping of health key -> value.

        Known keys (:data:`HEALTH_METRICS`) get the documented names and
        types; any other lower-case key ``k`` is exported as a gauge
        ``clovisor_k``. Values from several sources are summed per key.
        ``source`` runs on the HTTP server's thread, so it should only read
        counters, never block.
        """
        self._health.sources.append(source)

    def register_untraced(self, source: Untraced) -> None:
        """Read ``source()`` at every scrape: (reason, server port) -> count.

        It is the ``clovisor_untraced_total`` counter; the reasons are
        :data:`clovisor.core.sessions.UNTRACED_REASONS`.
        """
        self._untraced.sources.append(source)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) of the exposition; OpenMetrics if ``accept`` asks."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def parse_listen_address(text: str, what: str = "metrics") -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all IPv4 interfaces)."""
    rest = text.strip()
    if rest.startswith("["):
        host, bracket, rest = rest[1:].partition("]")
        if not bracket or not rest.startswith(":") or not host:
            raise SpecError(f"{what} {text!r}: expected HOST:PORT or [IPv6]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep:
            raise SpecError(f"{what} {text!r}: expected HOST:PORT")
        if ":" in host:
            raise SpecError(f"{what} {text!r}: write IPv6 addresses as [ADDR]:PORT")
        if host and not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
            raise SpecError(f"{what} {text!r}: bad host {host!r}")
    try:
        port = parse_port_number(port_s, "port")
    except SpecError as exc:
        raise SpecError(f"{what} {text!r}: {exc}") from None
    return (host or "0.0.0.0"), port
