"""One byte budget for every payload byte the core holds between segments.

Per-connection limits alone would let many connections add up to gigabytes;
the budget caps the total. Whoever wants to hold bytes asks first, and a
refusal degrades that one message (its header block counts as truncated, an
out-of-order segment is kept by length only) instead of growing memory.
"""

from __future__ import annotations


class Budget:
    __slots__ = ("limit", "refused", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0  # requests to hold bytes that were turned down

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


UNLIMITED = Budget(1 << 62)
