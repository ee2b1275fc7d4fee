"""Trace and span ids for spans that Clovisor originates.

The SDK's RandomIdGenerator draws from the process-wide ``random`` module,
which any library may reseed; ours owns a ``random.Random`` seeded from the
OS. Ids are identifiers, not secrets, so a Mersenne Twister is enough and
costs ~0.1 µs per id, which matters at thousands of spans per second.
"""

from __future__ import annotations

import os
import random
import weakref

from opentelemetry.sdk.trace.id_generator import IdGenerator

__all__ = ["FastIdGenerator", "IdGenerator"]

# A forked child would otherwise replay its parent's id sequence and emit
# colliding ids; reseed every live generator in the child.
_live: weakref.WeakSet[FastIdGenerator] = weakref.WeakSet()


def _reseed_after_fork() -> None:
    for gen in list(_live):
        gen.reseed()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_after_fork)


class FastIdGenerator(IdGenerator):
    """Random 128-bit trace ids and 64-bit span ids, never zero."""

    def __init__(self, seed: int | None = None) -> None:
        """``seed`` makes ids reproducible (tests only); None seeds from the OS."""
        self._bits = random.Random(
            seed if seed is not None else int.from_bytes(os.urandom(32), "big")
        ).getrandbits
        if seed is None:
            _live.add(self)

    def reseed(self) -> None:
        self._bits = random.Random(int.from_bytes(os.urandom(32), "big")).getrandbits

    def generate_trace_id(self) -> int:
        bits = self._bits
        trace_id = bits(128)
        # Zero is the invalid id in OTLP and W3C; redraw instead of patching
        # a bit so the distribution stays uniform over the valid ids.
        while trace_id == 0:
            trace_id = bits(128)
        return trace_id

    def generate_span_id(self) -> int:
        bits = self._bits
        span_id = bits(64)
        while span_id == 0:
            span_id = bits(64)
        return span_id

    def is_trace_id_random(self) -> bool:
        return True
