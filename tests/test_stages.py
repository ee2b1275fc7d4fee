"""Pipes bound what they hold; stages close in order."""

from __future__ import annotations

import threading

import pytest

from clovisor.stages import Closed, Pipe, Stage


def test_capacity_counts_weight_not_items() -> None:
    pipe: Pipe[list[int]] = Pipe(10, "t", weigh=len)
    assert pipe.put([1] * 6, timeout=0)
    assert pipe.put([2] * 4, timeout=0)
    assert not pipe.put([3], timeout=0)  # 6 + 4 + 1 > 10
    assert pipe.load == 10 and len(pipe) == 2
    assert pipe.get(timeout=0) == [1] * 6
    assert pipe.put([3], timeout=0) and pipe.load == 5


def test_an_item_heavier_than_the_capacity_passes_alone() -> None:
    pipe: Pipe[list[int]] = Pipe(4, "t", weigh=len)
    assert pipe.put([0] * 9, timeout=0)  # empty pipe: never stuck
    assert not pipe.put([1], timeout=0)
    assert pipe.get(timeout=0) == [0] * 9
    assert pipe.put([1], timeout=0)


def test_unweighted_pipe_counts_items() -> None:
    pipe: Pipe[str] = Pipe(2)
    assert pipe.put("a", timeout=0) and pipe.put("bb", timeout=0)
    assert not pipe.put("c", timeout=0)


def test_a_waiting_put_proceeds_when_room_is_made() -> None:
    pipe: Pipe[list[int]] = Pipe(3, "t", weigh=len)
    pipe.put([1, 2, 3])
    done = threading.Event()

    def producer() -> None:
        pipe.put([4, 5])
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.05)  # still full
    assert pipe.get() == [1, 2, 3]
    t.join(5)
    assert done.is_set() and pipe.get() == [4, 5]


def test_closed_pipe_drains_then_raises() -> None:
    pipe: Pipe[int] = Pipe(5)
    pipe.put(1)
    pipe.close()
    assert not pipe.put(2)
    assert pipe.get() == 1
    with pytest.raises(Closed):
        pipe.get()


def test_stage_maps_then_finishes_then_closes_its_output() -> None:
    src: Pipe[int] = Pipe(4)
    dst: Pipe[int] = Pipe(100)
    stage: Stage[int, int] = Stage("double", src, dst, lambda x: [2 * x], finish=lambda: [-1])
    stage.start()
    for i in range(10):
        src.put(i)
    src.close()
    stage.join(5)
    out = []
    while True:
        try:
            item = dst.get(timeout=1)
        except Closed:
            break
        assert item is not None
        out.append(item)
    assert out == [2 * i for i in range(10)] + [-1]


def test_a_yielding_stage_gives_up_the_cpu_after_the_items_it_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    yields = []
    monkeypatch.setattr("clovisor.stages.os.sched_yield", lambda: yields.append(1))
    src: Pipe[int] = Pipe(10)
    stage: Stage[int, None] = Stage("y", src, None, lambda x: [], yield_cpu=lambda x: x < 3)
    for i in range(5):
        src.put(i)
    src.close()
    stage.start()
    stage.join(5)
    assert len(yields) == 3  # after the small items only
