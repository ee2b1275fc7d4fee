"""Kernel CLOCK_MONOTONIC nanoseconds -> Unix epoch nanoseconds.

The classifier stamps segments with ``bpf_ktime_get_ns()`` (CLOCK_MONOTONIC):
it never jumps, so durations are exact, but spans need wall-clock times.
The two clocks differ by an offset that only changes when the wall clock is
stepped or slewed (NTP), so we measure the offset once, convert with a single
addition per timestamp, and re-measure now and then.

This is an edge module: it reads clocks. ``to_wall`` itself never does, so a
batch of spans converted together stays mutually consistent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["MonotonicToWall", "mono_to_wall"]

ClockNs = Callable[[], int]


def _monotonic_ns() -> int:
    # bpf_ktime_get_ns() is CLOCK_MONOTONIC, not time.monotonic_ns()'s
    # unspecified clock; name it explicitly so the two agree on every OS.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def mono_to_wall(mono_ns: int, offset_ns: int) -> int:
    """Pure conversion: a monotonic timestamp plus a measured offset."""
    return mono_ns + offset_ns


class MonotonicToWall:
    """Converts CLOCK_MONOTONIC ns to epoch ns with a bracketed offset.

    Each sample reads the wall clock between two monotonic reads; the
    wall-clock instant then lies inside that monotonic window, so the
    window's width bounds the error. Keeping the narrowest of a few samples
    discards the ones where the thread was preempted mid-sample.

    Call :meth:`resample` (or :meth:`resample_if_due`) periodically so a
    long-running agent follows NTP steps; ``to_wall`` uses the latest offset.
    """

    __slots__ = (
        "_last_sample_mono",
        "_monotonic",
        "_realtime",
        "_samples",
        "offset_ns",
        "resample_interval_ns",
        "uncertainty_ns",
    )

    def __init__(
        self,
        *,
        samples: int = 7,
        resample_interval_s: float = 60.0,
        monotonic_ns: ClockNs = _monotonic_ns,
        realtime_ns: ClockNs = time.time_ns,
    ) -> None:
        if samples < 1:
            raise ValueError("samples must be >= 1")
        if resample_interval_s <= 0:
            raise ValueError("resample_interval_s must be > 0")
        self._samples = samples
        self._monotonic = monotonic_ns
        self._realtime = realtime_ns
        self.resample_interval_ns = int(resample_interval_s * 1e9)
        self.offset_ns, self.uncertainty_ns = self._measure()
        self._last_sample_mono = self._monotonic()

    def resample(self) -> int:
        """Re-measure the offset; return how far it moved (ns, signed).

        A large return value means the wall clock was stepped; the runtime
        may want to log it.
        """
        previous = self.offset_ns
        self.offset_ns, self.uncertainty_ns = self._measure()
        self._last_sample_mono = self._monotonic()
        return self.offset_ns - previous

    def _measure(self) -> tuple[int, int]:
        mono = self._monotonic
        real = self._realtime
        best_width = -1
        best_offset = 0
        for _ in range(self._samples):
            before = mono()
            wall = real()
            after = mono()
            width = after - before
            if best_width < 0 or width < best_width:
                best_width = width
                # The midpoint minimises the worst-case error inside the window.
                best_offset = wall - (before + width // 2)
        return best_offset, (best_width + 1) // 2

    def resample_if_due(self) -> bool:
        """Resample when the interval has passed; cheap enough for every batch."""
        if self._monotonic() - self._last_sample_mono < self.resample_interval_ns:
            return False
        self.resample()
        return True

    def to_wall(self, mono_ns: int) -> int:
        """Epoch ns for a kernel CLOCK_MONOTONIC timestamp (no clock reads)."""
        return mono_ns + self.offset_ns

    __call__ = to_wall
