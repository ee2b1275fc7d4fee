"""OTLP/protobuf export to Jaeger or an OpenTelemetry Collector (gRPC or HTTP).

``export()`` runs on the tracker thread, which must never stall behind the
network: it only appends the records to the output's bounded queue
(:class:`~clovisor.export.queue.SpanQueue`) and returns. The queue's sender
thread takes batches off it, and this module encodes them
(:mod:`clovisor.export.otlp_encode`) and sends them, retrying transient
failures with exponential backoff while new records keep queueing.

Failure policy
--------------
* Transient (gRPC ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
  ``RESOURCE_EXHAUSTED``, ``ABORTED``, ``CANCELLED``, ``OUT_OF_RANGE``,
  ``DATA_LOSS``; HTTP 429, 502, 503, 504; connection refused, reset or timed
  out): the batch is retried after ``backoff_initial`` seconds, doubling up
  to ``backoff_max``, each delay varied by ±``backoff_jitter`` so that a
  fleet of agents does not retry in step. A server's ``Retry-After`` or
  gRPC ``RetryInfo`` lengthens the delay (never beyond ``backoff_max``). A
  batch still failing after ``max_retry_time`` is given up (dropped).
* Permanent (any other gRPC status or HTTP status, e.g. ``INVALID_ARGUMENT``
  or 400, 401, 413): the batch is dropped and counted as failed; resending
  the same bytes cannot succeed.
* While a batch is being retried the queue fills; when it is full the
  *oldest* queued spans make room for new ones (the freshest data is worth
  most once the receiver is back) and are counted as dropped. Memory is
  bounded by ``queue_size`` spans plus one batch, however long the receiver
  stays away.
* ``shutdown(timeout)`` sends what is queued until the timeout, then stops;
  whatever is left is counted as dropped. It never waits longer.

The SDK's ``OTLPSpanExporter`` classes are not used for sending: their
``export()`` retries internally on its own schedule (up to its timeout,
blocking the caller), reports success or failure without saying whether a
failure was transient, and the single-attempt calls beneath it are private
and changed shape between releases. The transports
(:mod:`clovisor.export.otlp_transport`) are the public gRPC channel API
(calling the official ``TraceService/Export`` method) and ``http.client``.

Where and how to send is an :class:`~clovisor.export.otlp_config.OtlpConfig`,
read from flags and the standard ``OTEL_EXPORTER_OTLP_*`` variables by
:mod:`clovisor.export.otlp_config`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from clovisor.export.otlp_config import OtlpConfig, resolve_config
from clovisor.export.otlp_encode import ProtobufSpanEncoder
from clovisor.export.otlp_transport import (
    GrpcTransport,
    HttpTransport,
    Outcome,
    Transport,
    printable,
)
from clovisor.export.queue import (
    DEFAULT_BATCH_INTERVAL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_SHUTDOWN_TIMEOUT,
    GiveUp,
    SpanQueue,
    Throttle,
)
from clovisor.export.record import SpanRecord

__all__ = [
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_BATCH_INTERVAL",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_RETRY_TIME",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "STATS_KEYS",
    "OtlpExporter",
]

_logger = logging.getLogger(__name__)

DEFAULT_BACKOFF_INITIAL: Final = 0.5
DEFAULT_BACKOFF_MAX: Final = 30.0
DEFAULT_BACKOFF_JITTER: Final = 0.2
DEFAULT_MAX_RETRY_TIME: Final = 300.0  # the Collector's own retry_on_failure default
# The Collector's and Jaeger's gRPC receivers refuse messages over 4 MiB by
# default; larger batches are split before sending.
DEFAULT_MAX_REQUEST_BYTES: Final = 4_000_000

STATS_KEYS: Final = (
    "spans_exported",
    "spans_failed",
    "spans_dropped",
    "queue_size",
    "send_retries",
)


class OtlpExporter:
    """Sends spans to an OTLP receiver from a background thread.

    ``export()`` never blocks on the network; ``shutdown(timeout)`` flushes
    for at most ``timeout`` seconds (default ``shutdown_timeout``).

    :meth:`stats` returns these counters (names are stable: they feed the
    agent's Prometheus metrics):

    ``spans_exported``
        accepted by the receiver.
    ``spans_failed``
        refused by the receiver for good (a permanent error, or rejected in a
        partial success), or unencodable: resending would not help.
    ``spans_dropped``
        given up without the receiver refusing them: pushed out of a full
        queue, a batch still failing after ``max_retry_time``, still unsent
        when shutdown's timeout ran out, or exported after shutdown.
    ``queue_size``
        spans waiting now (a gauge; excludes the batch being sent).
    ``send_retries``
        send attempts that failed transiently and were scheduled again.

    Every span given to ``export()`` ends up in exactly one of exported,
    failed or dropped once ``shutdown()`` has returned.
    """

    def __init__(
        self,
        config: OtlpConfig,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_interval: float = DEFAULT_BATCH_INTERVAL,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        backoff_jitter: float = DEFAULT_BACKOFF_JITTER,
        max_retry_time: float = DEFAULT_MAX_RETRY_TIME,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        encoder: ProtobufSpanEncoder | None = None,
    ) -> None:
        if max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")
        if not (0 < backoff_initial <= backoff_max) or not 0 <= backoff_jitter < 1:
            raise ValueError("need 0 < backoff_initial <= backoff_max and 0 <= backoff_jitter < 1")
        if max_retry_time < 0:
            raise ValueError("max_retry_time must not be negative")
        self.config = config
        self._backoff = (backoff_initial, backoff_max, backoff_jitter)
        self._max_retry_time = max_retry_time
        self._max_request_bytes = max_request_bytes
        self._encoder = encoder or ProtobufSpanEncoder()
        self._transport: Transport = (
            GrpcTransport(config, reconnect_backoff=(backoff_initial, backoff_max))
            if config.protocol == "grpc"
            else HttpTransport(config)
        )
        # Only for the jitter: not security-relevant.
        self._random = random.Random()
        self._throttle = Throttle()
        self._retries = 0  # only the sender thread writes it
        self._failing_since: float | None = None
        self._queue = SpanQueue(
            f"OTLP {config.describe()}",
            self._deliver,
            capacity=queue_size,
            batch_size=batch_size,
            batch_interval=batch_interval,
            shutdown_timeout=shutdown_timeout,
        )

    @classmethod
    def from_output(
        cls,
        kind: str,
        target: str = "",
        *,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> OtlpExporter:
        """An exporter for a parsed ``--output`` (see :func:`resolve_config`)."""
        return cls(resolve_config(kind, target, environ), **options)

    def export(self, spans: Sequence[SpanRecord]) -> None:
        """Queue the spans and return at once; the oldest are dropped when full."""
        self._queue.export(spans)

    def stats(self) -> dict[str, int]:
        """The counters described in the class docstring (keys: :data:`STATS_KEYS`)."""
        return {**self._queue.stats(), "send_retries": self._retries}

    def flush(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        """Wait until everything queued has been sent or given up; False on timeout."""
        return self._queue.flush(timeout)

    def shutdown(self, timeout: float | None = None) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop.

        What is still unsent then is counted in ``spans_dropped``. Later
        calls, and exports after this one, do nothing but count.
        """
        # Stuck in a send (a receiver that accepts and never answers): closing
        # the transport wakes it; it then finds the deadline passed.
        left = self._queue.shutdown(timeout, on_stuck=self._transport.close)
        self._transport.close()
        if left:
            _logger.warning(
                "OTLP %s: %d spans unsent at shutdown (receiver unreachable or too slow)",
                self.config.describe(),
                left,
            )
        stats = self._queue.stats()
        _logger.debug(
            "OTLP %s: %d exported, %d failed, %d dropped", self.config.describe(),
            stats["spans_exported"], stats["spans_failed"], stats["spans_dropped"],
        )  # fmt: skip

    # --- the sender thread -----------------------------------------------------

    def _deliver(self, batch: list[SpanRecord], queue: SpanQueue) -> None:
        pending = [batch]
        while pending:
            spans = pending.pop()
            try:
                body = self._encoder.serialize(spans)
            except Exception:
                _logger.exception(
                    "OTLP %s: cannot encode %d spans", self.config.describe(), len(spans)
                )
                queue.account(failed=len(spans), of=len(spans))
                continue
            if len(body) > self._max_request_bytes:
                if len(spans) > 1:
                    half = len(spans) // 2
                    pending.append(spans[half:])
                    pending.append(spans[:half])
                    continue
                _logger.error(
                    "OTLP %s: dropping a span of %d bytes encoded (limit %d)",
                    self.config.describe(),
                    len(body),
                    self._max_request_bytes,
                )
                queue.account(failed=1, of=1)
                continue
            self._send(self._transport.prepare(body), len(spans), queue)

    def _send(self, body: bytes, n: int, queue: SpanQueue) -> None:
        """Send one request until it is accepted, refused, or given up."""
        initial, cap, jitter = self._backoff
        first_try = time.monotonic()
        attempt = 0
        while True:
            timeout = self.config.timeout
            remaining = queue.deadline - time.monotonic()
            if remaining <= 0:
                raise GiveUp
            outcome = self._transport.send(body, min(timeout, remaining))
            if outcome.ok:
                self._on_success(outcome, n, queue)
                return
            if not outcome.retryable:
                queue.account(failed=n, of=n)
                if self._throttle.allow("permanent"):
                    _logger.error(
                        "OTLP %s: receiver refused %d spans: %s (not retried)",
                        self.config.describe(),
                        n,
                        outcome.detail,
                    )
                return
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            if self._throttle.allow("transient"):
                _logger.warning(
                    "OTLP %s: %s; retrying (spans queue meanwhile)",
                    self.config.describe(),
                    outcome.detail,
                )
            if now - first_try >= self._max_retry_time:
                queue.account(dropped=n, of=n)
                _logger.error(
                    "OTLP %s: gave up on %d spans after %.0f s of retries: %s",
                    self.config.describe(),
                    n,
                    now - first_try,
                    outcome.detail,
                )
                return
            delay = min(cap, initial * 2.0**attempt)
            delay *= self._random.uniform(1.0 - jitter, 1.0 + jitter)
            if outcome.retry_after is not None:
                delay = max(delay, min(outcome.retry_after, cap))
            attempt += 1
            self._retries += 1
            if outcome.reconnect:
                self._transport.reconnect()
            self._sleep(min(delay, queue.deadline - time.monotonic()), queue)

    @staticmethod
    def _sleep(seconds: float, queue: SpanQueue) -> None:
        if seconds > 0 and queue.woken.wait(seconds):
            # Shutdown began (it sets the event once): retry at once, as the
            # receiver may be back, then keep the schedule, which the
            # shutdown deadline bounds.
            queue.woken.clear()

    def _on_success(self, outcome: Outcome, n: int, queue: SpanQueue) -> None:
        rejected = min(max(outcome.rejected, 0), n)
        queue.account(exported=n - rejected, failed=rejected, of=n)
        if rejected and self._throttle.allow("partial"):
            _logger.error(
                "OTLP %s: receiver rejected %d of %d spans: %s",
                self.config.describe(),
                rejected,
                n,
                printable(outcome.detail) or "no reason given",
            )
        if self._failing_since is not None:
            _logger.info(
                "OTLP %s: delivering again after %.1f s of failures",
                self.config.describe(),
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
