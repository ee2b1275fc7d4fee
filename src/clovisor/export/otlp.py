"""OTLP/protobuf export to Jaeger or an OpenTelemetry Collector (gRPC or HTTP).

``export()`` runs on the pipeline's exporter thread, which must never stall
behind the network: it only appends the spans to a bounded queue and
returns. One sender thread per exporter takes batches off the queue,
encodes them (:mod:`clovisor.export.otlp_encode`) and sends them, retrying
transient failures with exponential backoff while new spans keep queueing.

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
import math
import random
import threading
import time
from collections import deque
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

DEFAULT_QUEUE_SIZE: Final = 20_000
DEFAULT_BATCH_SIZE: Final = 512
DEFAULT_BATCH_INTERVAL: Final = 1.0
DEFAULT_BACKOFF_INITIAL: Final = 0.5
DEFAULT_BACKOFF_MAX: Final = 30.0
DEFAULT_BACKOFF_JITTER: Final = 0.2
DEFAULT_MAX_RETRY_TIME: Final = 300.0  # the Collector's own retry_on_failure default
DEFAULT_SHUTDOWN_TIMEOUT: Final = 5.0
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


_LOG_INTERVAL: Final = 60.0  # at most one repeated warning per this many seconds


class _Throttle:
    """Lets a repeated warning through at most once per interval."""

    def __init__(self, interval: float = _LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        self._last[key] = now
        return True


class _GiveUp(Exception):
    """Shutdown's deadline passed: leave the rest to shutdown()'s accounting."""


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
        if queue_size < 1 or batch_size < 1 or max_request_bytes < 1:
            raise ValueError("queue_size, batch_size and max_request_bytes must be positive")
        if not (0 < backoff_initial <= backoff_max) or not 0 <= backoff_jitter < 1:
            raise ValueError("need 0 < backoff_initial <= backoff_max and 0 <= backoff_jitter < 1")
        if batch_interval <= 0 or max_retry_time < 0 or shutdown_timeout < 0:
            raise ValueError("batch_interval must be positive, the timeouts non-negative")
        self.config = config
        self._capacity = queue_size
        self._batch_size = min(batch_size, queue_size)
        self._batch_interval = batch_interval
        self._backoff = (backoff_initial, backoff_max, backoff_jitter)
        self._max_retry_time = max_retry_time
        self._shutdown_timeout = shutdown_timeout
        self._max_request_bytes = max_request_bytes
        self._encoder = encoder or ProtobufSpanEncoder()
        self._transport: Transport = (
            GrpcTransport(config, reconnect_backoff=(backoff_initial, backoff_max))
            if config.protocol == "grpc"
            else HttpTransport(config)
        )
        # Only for the jitter: not security-relevant.
        self._random = random.Random()
        self._throttle = _Throttle()

        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[SpanRecord] = deque(maxlen=queue_size)
        self._in_flight = 0  # spans taken by the sender and not yet accounted
        self._exported = 0
        self._failed = 0
        self._dropped = 0
        self._retries = 0
        self._flush_waiters = 0
        self._closing = False
        self._finished = False
        self._deadline = math.inf  # set by shutdown()
        self._wake = threading.Event()  # cuts a backoff sleep short
        self._failing_since: float | None = None

        self._thread = threading.Thread(
            target=self._run, name=f"clovisor-otlp {config.describe()}", daemon=True
        )
        self._thread.start()

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

    # --- the exporter thread's side ------------------------------------------

    def export(self, spans: Sequence[SpanRecord]) -> None:
        """Queue the spans and return at once; the oldest are dropped when full."""
        n = len(spans)
        if not n:
            return
        with self._cond:
            if self._closing:
                self._dropped += n
                return
            queue = self._queue
            before = len(queue)
            overflow = before + n - self._capacity
            if overflow > 0:
                self._dropped += overflow
                if self._throttle.allow("overflow"):
                    _logger.warning(
                        "OTLP %s: queue full (%d spans), dropping the oldest; %d dropped so far",
                        self.config.describe(),
                        self._capacity,
                        self._dropped,
                    )
            queue.extend(spans)  # deque(maxlen) discards from the left
            if before == 0 or len(queue) >= self._batch_size > before:
                # notify_all: flush() callers wait on the same condition and
                # must not swallow the sender's wake-up.
                self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """The counters described in the class docstring (keys: :data:`STATS_KEYS`)."""
        with self._cond:
            return {
                "spans_exported": self._exported,
                "spans_failed": self._failed,
                "spans_dropped": self._dropped,
                "queue_size": len(self._queue),
                "send_retries": self._retries,
            }

    def flush(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        """Wait until everything queued has been sent or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while self._queue or self._in_flight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._finished:
                        return not (self._queue or self._in_flight)
                    self._cond.wait(remaining)
                return True
            finally:
                self._flush_waiters -= 1

    def shutdown(self, timeout: float | None = None) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop.

        What is still unsent then is counted in ``spans_dropped``. Later
        calls, and exports after this one, do nothing but count.
        """
        budget = self._shutdown_timeout if timeout is None else max(0.0, timeout)
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._deadline = time.monotonic() + budget
            self._cond.notify_all()
        self._wake.set()
        self._thread.join(max(0.0, self._deadline - time.monotonic()))
        # Stuck in a send (a receiver that accepts and never answers): closing
        # the transport wakes it; it then finds the deadline passed.
        self._transport.close()
        with self._cond:
            self._finished = True
            left = len(self._queue) + self._in_flight
            self._dropped += left
            self._queue.clear()
            self._in_flight = 0
            self._cond.notify_all()
            totals = (self._exported, self._failed, self._dropped)
        if left:
            _logger.warning(
                "OTLP %s: %d spans unsent at shutdown (receiver unreachable or too slow)",
                self.config.describe(),
                left,
            )
        _logger.debug(
            "OTLP %s: %d exported, %d failed, %d dropped", self.config.describe(), *totals
        )

    # --- the sender thread ---------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._deliver(batch)
            except _GiveUp:
                return  # shutdown() counts what is left
            except Exception:
                # A bug here must not end export for the agent's lifetime.
                _logger.exception("OTLP %s: sending a batch failed", self.config.describe())
                with self._cond:
                    if not self._finished:
                        self._failed += self._in_flight
                        self._in_flight = 0
            with self._cond:
                self._cond.notify_all()  # flush() waiters

    def _next_batch(self) -> list[SpanRecord] | None:
        with self._cond:
            queue = self._queue
            while not queue and not self._closing:
                self._cond.wait()
            if (
                queue
                and len(queue) < self._batch_size
                and not self._closing
                and not self._flush_waiters
            ):
                # Give a partial batch a moment to fill: one request of 512
                # spans costs far less than 512 requests of one.
                self._cond.wait_for(
                    lambda: len(queue) >= self._batch_size or self._closing or self._flush_waiters,
                    self._batch_interval,
                )
            if not queue or time.monotonic() >= self._deadline or self._finished:
                return None
            n = min(self._batch_size, len(queue))
            if n == len(queue):
                batch = list(queue)
                queue.clear()
            else:
                batch = [queue.popleft() for _ in range(n)]
            self._in_flight = n
            return batch

    def _account(self, *, of: int, exported: int = 0, failed: int = 0, dropped: int = 0) -> None:
        with self._cond:
            if self._finished:
                return  # shutdown() has counted these as dropped already
            self._exported += exported
            self._failed += failed
            self._dropped += dropped
            self._in_flight -= of

    def _deliver(self, batch: list[SpanRecord]) -> None:
        pending = [batch]
        while pending:
            spans = pending.pop()
            try:
                body = self._encoder.serialize(spans)
            except Exception:
                _logger.exception(
                    "OTLP %s: cannot encode %d spans", self.config.describe(), len(spans)
                )
                self._account(failed=len(spans), of=len(spans))
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
                self._account(failed=1, of=1)
                continue
            self._send(self._transport.prepare(body), len(spans))

    def _send(self, body: bytes, n: int) -> None:
        """Send one request until it is accepted, refused, or given up."""
        initial, cap, jitter = self._backoff
        first_try = time.monotonic()
        attempt = 0
        while True:
            timeout = self.config.timeout
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise _GiveUp
            outcome = self._transport.send(body, min(timeout, remaining))
            if outcome.ok:
                self._on_success(outcome, n)
                return
            if not outcome.retryable:
                self._account(failed=n, of=n)
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
                self._account(dropped=n, of=n)
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
            with self._cond:
                self._retries += 1
            if outcome.reconnect:
                self._transport.reconnect()
            self._sleep(min(delay, self._deadline - time.monotonic()))

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._wake.wait(seconds):
            # Shutdown began (it sets the event once): retry at once, as the
            # receiver may be back, then keep the schedule, which the
            # shutdown deadline bounds.
            self._wake.clear()

    def _on_success(self, outcome: Outcome, n: int) -> None:
        rejected = min(max(outcome.rejected, 0), n)
        self._account(exported=n - rejected, failed=rejected, of=n)
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
