"""The one queue between the tracker and an output, and its batching policy.

The tracker thread hands span records to each output's :class:`SpanQueue`
and never waits: the queue is bounded, and when it is full the *oldest*
records make room (counted as dropped), so a slow or absent receiver sheds
spans instead of slowing the tracker, whose metrics stay exact. One sender
thread per output takes batches by one policy: ``batch_size`` records, or
whatever waits once the oldest has waited ``batch_interval`` seconds; the
sender is woken only when a batch is due, not per record.

What a batch becomes (lines on a console, a file, an OTLP request with its
retries) is the sink's business: ``deliver(batch, queue)``. A sink may
account for parts of a batch itself (:meth:`SpanQueue.account`, for partial
successes and retries); whatever it leaves unaccounted when it returns was
delivered, and if it raises, that rest failed. Every record handed to
:meth:`SpanQueue.export` ends up in exactly one of exported, failed or
dropped once :meth:`SpanQueue.shutdown` has returned.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, TextIO

from . import ExporterConfigError, ExportError
from .record import SpanRecord

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "GiveUp",
    "QueuedExporter",
    "SpanQueue",
    "StreamExporter",
    "Throttle",
]

_logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE: Final = 20_000
DEFAULT_BATCH_SIZE: Final = 512
DEFAULT_BATCH_INTERVAL: Final = 1.0
DEFAULT_SHUTDOWN_TIMEOUT: Final = 5.0
_LOG_INTERVAL: Final = 60.0  # at most one repeated warning per this many seconds


class GiveUp(Exception):
    """Raised by a sink when the shutdown deadline has passed mid-delivery."""


class Throttle:
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


Deliver = Callable[[list[SpanRecord], "SpanQueue"], None]


class SpanQueue:
    """A bounded queue of span records drained by one sender thread.

    :meth:`stats` keys: ``spans_exported``, ``spans_failed``,
    ``spans_dropped`` (pushed out of a full queue, given up, unsent at
    shutdown, or exported after shutdown) and ``queue_size`` (a gauge).
    """

    def __init__(
        self,
        name: str,
        deliver: Deliver,
        *,
        capacity: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_interval: float = DEFAULT_BATCH_INTERVAL,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError("capacity and batch_size must be positive")
        if batch_interval <= 0 or shutdown_timeout < 0:
            raise ValueError("batch_interval must be positive, shutdown_timeout non-negative")
        self.name = name
        self._deliver = deliver
        self._capacity = capacity
        self._batch_size = min(batch_size, capacity)
        self._batch_interval = batch_interval
        self._shutdown_timeout = shutdown_timeout
        self._throttle = Throttle()
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[SpanRecord] = deque(maxlen=capacity)
        self._in_flight = 0  # records taken by the sender and not yet accounted
        self._exported = 0
        self._failed = 0
        self._dropped = 0
        self._flush_waiters = 0
        self._closing = False
        self._finished = False
        self.deadline = math.inf  # when the sender must give up (set by shutdown)
        self.woken = threading.Event()  # set once by shutdown: cuts a sink's backoff short
        self._thread = threading.Thread(target=self._run, name=f"clovisor-{name}", daemon=True)
        self._thread.start()

    # --- the tracker's side ----------------------------------------------------

    def export(self, records: Sequence[SpanRecord]) -> None:
        """Queue the records and return at once; the oldest are dropped when full."""
        n = len(records)
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
                        "%s: queue full (%d spans), dropping the oldest; %d dropped so far",
                        self.name, self._capacity, self._dropped,
                    )  # fmt: skip
            queue.extend(records)  # deque(maxlen) discards from the left
            if before == 0 or len(queue) >= self._batch_size > before:
                # notify_all: flush() callers wait on the same condition and
                # must not swallow the sender's wake-up.
                self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "spans_exported": self._exported,
                "spans_failed": self._failed,
                "spans_dropped": self._dropped,
                "queue_size": len(self._queue),
            }

    def flush(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        """Wait until everything queued has been delivered or given up; False on timeout."""
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

    def shutdown(
        self, timeout: float | None = None, *, on_stuck: Callable[[], None] | None = None
    ) -> int:
        """Deliver what is queued for up to ``timeout`` seconds, then stop.

        ``on_stuck`` runs if the sender is still busy at the deadline (a sink
        blocked in I/O: closing its connection wakes it). Returns how many
        records were left unsent (counted as dropped). Later calls, and
        exports after this one, do nothing but count.
        """
        budget = self._shutdown_timeout if timeout is None else max(0.0, timeout)
        with self._cond:
            if self._closing:
                return 0
            self._closing = True
            self.deadline = time.monotonic() + budget
            self._cond.notify_all()
        self.woken.set()
        self._thread.join(max(0.0, self.deadline - time.monotonic()))
        if self._thread.is_alive() and on_stuck is not None:
            on_stuck()
        with self._cond:
            self._finished = True
            left = len(self._queue) + self._in_flight
            self._dropped += left
            self._queue.clear()
            self._in_flight = 0
            self._cond.notify_all()
        return left

    # --- the sink's side -------------------------------------------------------

    def account(self, *, of: int, exported: int = 0, failed: int = 0, dropped: int = 0) -> None:
        """The sink settled ``of`` records of the batch in hand."""
        with self._cond:
            if self._finished:
                return  # shutdown() has counted these as dropped already
            self._exported += exported
            self._failed += failed
            self._dropped += dropped
            self._in_flight -= of

    # --- the sender thread -----------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._deliver(batch, self)
                with self._cond:
                    left = self._in_flight
                self.account(of=left, exported=left)
            except GiveUp:
                return  # shutdown() counts what is left
            except Exception as exc:
                # A bug or a broken output must not end export for good.
                if self._throttle.allow("deliver"):
                    _logger.error("%s: delivering %d spans failed: %s", self.name, len(batch), exc,
                                  exc_info=not isinstance(exc, OSError))
                with self._cond:
                    left = self._in_flight
                self.account(of=left, failed=left)
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
                # Give a partial batch a moment to fill: one write (or request)
                # of 512 spans costs far less than 512 of one.
                self._cond.wait_for(
                    lambda: len(queue) >= self._batch_size or self._closing or self._flush_waiters,
                    self._batch_interval,
                )
            if not queue or time.monotonic() >= self.deadline or self._finished:
                return None
            n = min(self._batch_size, len(queue))
            if n == len(queue):
                batch = list(queue)
                queue.clear()
            else:
                batch = [queue.popleft() for _ in range(n)]
            self._in_flight = n
            return batch


# Local outputs (a console, a file) have no receiver to spare: a batch is due
# sooner, so that lines appear while the operator watches.
LOCAL_BATCH_INTERVAL: Final = 0.1


class QueuedExporter:
    """An output fed through its own :class:`SpanQueue`: ``export`` never blocks.

    Subclasses implement :meth:`write` (one batch, from the sender thread)
    and may override :meth:`close` (after the last batch).
    """

    def __init__(self, name: str, **queue_options: float | int) -> None:
        queue_options.setdefault("batch_interval", LOCAL_BATCH_INTERVAL)
        self._queue = SpanQueue(name, self._deliver, **queue_options)  # type: ignore[arg-type]

    def export(self, spans: Sequence[SpanRecord]) -> None:
        self._queue.export(spans)

    def stats(self) -> dict[str, int]:
        return self._queue.stats()

    def flush(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        return self._queue.flush(timeout)

    def shutdown(self, timeout: float | None = None) -> None:
        left = self._queue.shutdown(timeout)
        if left:
            _logger.warning("%s: %d spans unwritten at shutdown", self._queue.name, left)
        self.close()

    def _deliver(self, batch: list[SpanRecord], _queue: SpanQueue) -> None:
        self.write(batch)

    def write(self, batch: list[SpanRecord]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class StreamExporter(QueuedExporter):
    """Appends the text of each batch to a file, a text stream or stdout (``-``).

    A path is opened at construction, for append (a restarted agent must not
    truncate what the previous one wrote); failure raises
    :class:`~clovisor.export.ExporterConfigError` naming it. The stream is
    flushed per batch, so a reader tailing the file sees whole lines.
    """

    def __init__(
        self, name: str, target: str | os.PathLike[str] | TextIO, **queue_options: float | int
    ) -> None:
        self._owned = False
        if isinstance(target, (str, os.PathLike)):
            if os.fspath(target) == "-":
                self._stream: TextIO = sys.stdout
            else:
                try:
                    self._stream = open(target, "a", encoding="utf-8")  # noqa: SIM115
                except OSError as exc:
                    raise ExporterConfigError(
                        f"cannot open {name} output {os.fspath(target)!r}: {exc.strerror or exc}"
                    ) from exc
                self._owned = True
        else:
            self._stream = target
        super().__init__(name, **queue_options)

    def format(self, batch: list[SpanRecord]) -> str:
        """The text of one batch, ending with a newline."""
        raise NotImplementedError

    def write(self, batch: list[SpanRecord]) -> None:
        text = self.format(batch)
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: a closed stream
            raise ExportError(f"{self._queue.name} write failed: {exc}") from exc

    def close(self) -> None:
        try:
            if self._owned:
                self._stream.close()
            else:
                self._stream.flush()
        except (OSError, ValueError):
            pass  # nothing left to save: the owner closed it already
