"""The agent runtime's own pieces (its behaviour end to end is test_agent_e2e.py)."""

from __future__ import annotations

from clovisor.agent.runtime import Waiting


def test_a_pod_waiting_for_its_veth_is_overdue_after_warn_after() -> None:
    waiting = Waiting(warn_after=10.0)
    assert waiting.update(["default/a"], now=100.0) == [("default/a", False)]
    assert waiting.update(["default/a", "default/b"], now=109.9) == [
        ("default/a", False),
        ("default/b", False),
    ]
    assert waiting.update(["default/a", "default/b"], now=110.0) == [
        ("default/a", True),
        ("default/b", False),
    ]
    assert waiting.update(["default/b"], now=120.0) == [("default/b", True)]


def test_a_pod_that_found_its_veth_and_lost_it_again_waits_afresh() -> None:
    waiting = Waiting(warn_after=10.0)
    waiting.update(["default/a"], now=0.0)
    assert waiting.update([], now=5.0) == []
    assert waiting.update(["default/a"], now=12.0) == [("default/a", False)]
    assert waiting.update(["default/a"], now=22.0) == [("default/a", True)]

