from __future__ import annotations

import time

import pytest

from clovisor.clock import MonotonicToWall, mono_to_wall


def fake(mono: list[int], real: list[int], **kwargs: float) -> MonotonicToWall:
    m, r = iter(mono), iter(real)
    return MonotonicToWall(
        monotonic_ns=lambda: next(m),
        realtime_ns=lambda: next(r),
        **kwargs,  # type: ignore[arg-type]
    )


def test_keeps_the_tightest_bracket_and_its_midpoint() -> None:
    # Three samples: widths 100, 10 (best), 50; then one read for the timestamp.
    mono = [1000, 1100, 2000, 2010, 3000, 3050, 3060]
    real = [9_000_000, 9_001_005, 9_002_000]
    c = fake(mono, real, samples=3)
    assert c.offset_ns == 9_001_005 - 2005
    assert c.uncertainty_ns == 5
    assert c.to_wall(10_000) == 10_000 + c.offset_ns
    assert c(10_000) == c.to_wall(10_000)
    assert mono_to_wall(10_000, c.offset_ns) == c.to_wall(10_000)


def test_resample_follows_a_wall_clock_step() -> None:
    mono = [0, 10, 20, 100, 110, 120]
    real = [1_000_005, 1_000_000_105]  # the wall clock jumped ~1 s forward
    c = fake(mono, real, samples=1)
    assert c.offset_ns == 1_000_000
    moved = c.resample()
    assert moved == 999_000_000
    assert c.to_wall(200) == 200 + 1_000_000_000


def test_to_wall_reads_no_clock() -> None:
    c = fake([0, 0, 0], [5], samples=1)
    # Both iterators are exhausted: any clock read would raise StopIteration.
    assert [c.to_wall(n) for n in (1, 2, 3)] == [6, 7, 8]


def test_resample_if_due() -> None:
    mono = [0, 0, 0, 500_000_000, 2_000_000_000, 2_000_000_000, 2_000_000_000, 2_000_000_000]
    real = [10, 20]
    c = fake(mono, real, samples=1, resample_interval_s=1.0)
    assert c.resample_if_due() is False
    assert c.resample_if_due() is True
    assert c.offset_ns == 20 - 2_000_000_000


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        MonotonicToWall(samples=0)
    with pytest.raises(ValueError):
        MonotonicToWall(resample_interval_s=0)


def test_real_clocks_agree_with_time_ns() -> None:
    c = MonotonicToWall()
    # Bracketed by two wall readings: a preemption between the reads cannot fail it.
    before = time.time_ns()
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    after = time.time_ns()
    slack = c.uncertainty_ns + 1_000_000
    assert before - slack <= c.to_wall(mono) <= after + slack
    assert 0 <= c.uncertainty_ns < 5_000_000
