"""Bounded, closable pipes and the stage threads that sit between them.

The runtime is a few stages joined by bounded queues (the Beyla shape): each
stage reads its input pipe until the pipe is closed and drained, then closes
its output pipe, so shutting the first stage down flushes and shuts down the
rest in order. Only :mod:`clovisor.pipeline` wires stages together.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

log = logging.getLogger(__name__)


class Closed(Exception):
    """The pipe is closed and empty."""


class Pipe(Generic[T]):
    """A bounded FIFO between two threads; ``put`` waits while it is full.

    Waiting is the back-pressure: a slow exporter slows the tracker, which
    slows the ring reader, and the kernel then counts the records it could not
    queue (``events lost``). Nothing in between grows without bound.

    ``capacity`` counts items, or with ``weigh`` what ``weigh(item)`` says
    (records in a batch, spans in a list): batches vary in size, and memory
    follows what is in them. An item heavier than the whole capacity still
    passes, alone, so nothing is ever stuck.
    """

    def __init__(
        self, capacity: int, name: str = "", *, weigh: Callable[[T], int] | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.name = name
        self._items: collections.deque[tuple[T, int]] = collections.deque()
        self._capacity = capacity
        self._weigh = weigh
        self._load = 0  # the weight of what is queued
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def load(self) -> int:
        """What is queued, in the capacity's unit."""
        return self._load

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Queue an item; False if the pipe was closed or stayed full for ``timeout``."""
        weight = self._weigh(item) if self._weigh is not None else 1
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._closed
                or not self._items
                or self._load + weight <= self._capacity,
                timeout,
            ):
                return False
            if self._closed:
                return False
            self._items.append((item, weight))
            self._load += weight
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> T | None:
        """The next item, None on timeout; :class:`Closed` once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._items, timeout):
                return None
            if self._items:
                item, weight = self._items.popleft()
                self._load -= weight
                self._cond.notify_all()
                return item
            raise Closed(self.name)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class Stage(threading.Thread, Generic[T, U]):
    """A thread that maps items of one pipe to items of the next.

    ``handle`` returns the items to pass on (possibly none); ``idle`` runs
    when no input arrived for ``tick`` seconds (timers such as timeouts);
    ``finish`` runs once after the input closed, before the output closes.
    An exception in a handler is logged and counted, never kills the stage.
    ``yield_cpu(item)``: whether to give up the CPU (``sched_yield``) after
    handling ``item``, so that a stage working through a run of items does
    it in item-sized slices and the threads it shares CPUs with (the traced
    workload) get in between; it costs a system call when nobody else
    wants the CPU.
    """

    def __init__(
        self,
        name: str,
        source: Pipe[T],
        sink: Pipe[U] | None,
        handle: Callable[[T], list[U]],
        *,
        idle: Callable[[], list[U]] | None = None,
        finish: Callable[[], list[U]] | None = None,
        tick: float = 0.5,
        yield_cpu: Callable[[T], bool] | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.source = source
        self.sink = sink
        self._handle = handle
        self._idle = idle
        self._finish = finish
        self._tick = tick
        self._yield = yield_cpu
        self.errors = 0

    def run(self) -> None:
        try:
            while True:
                try:
                    item = self.source.get(self._tick)
                except Closed:
                    break
                if item is None:
                    self._emit(self._call(self._idle))
                else:
                    self._emit(self._call(functools.partial(self._handle, item)))
                    if self._yield is not None and self._yield(item):
                        os.sched_yield()
            self._emit(self._call(self._finish))
        finally:
            if self.sink is not None:
                self.sink.close()

    def _call(self, fn: Callable[[], list[U]] | None) -> list[U]:
        if fn is None:
            return []
        try:
            return fn()
        except Exception:
            self.errors += 1
            log.exception("stage %s: handler failed", self.name)
            return []

    def _emit(self, items: list[U]) -> None:
        if self.sink is None:
            return
        for item in items:
            self.sink.put(item)
