"""Garbage-collector settings for the commands that trace.

The tracker allocates a handful of short-lived objects per segment (records,
heads, sessions, span records), almost none of them in reference cycles, so
reference counting frees them. At CPython's default first-generation
threshold (700 allocations) the cyclic collector still runs every few
hundred requests and walks every young object each time: measured with
``python -m bench.hotpath --gc default``, about 5 % of the hot path's CPU.
A larger first generation makes those walks rare, and freezing what exists
once startup is done (modules, the OpenTelemetry SDK, the gRPC channel)
keeps the older generations' walks short. Cyclic garbage is still
collected, only later: at most :data:`GEN0_THRESHOLD` young objects more.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["GEN0_THRESHOLD", "tune_for_tracing"]

GEN0_THRESHOLD: Final = 20_000


def tune_for_tracing() -> None:
    """Freeze what startup made and raise the first generation's threshold."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
