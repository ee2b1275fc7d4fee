"""The compiled build and the pure-Python build: same sources, same output.

``make setup`` compiles the hot path with mypyc; ``CLOVISOR_PURE_PYTHON=1``
runs the same modules interpreted. Here the offline replay of
``bench.hotpath`` runs in both builds, each in its own process, and the
OTLP/JSON they write for the same traffic must be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clovisor.build import PURE_ENV

REPLAY = """
import json
from opentelemetry.sdk.resources import Resource
from bench.hotpath import traffic, ring_batches
from clovisor.build import compiled_modules, describe
from clovisor.core.tracker import Tracker
from clovisor.export.ids import FastIdGenerator
from clovisor.export.otlp_json import spans_to_otlp_json
from clovisor.export.spans import session_to_span
from clovisor.kernel.ringbuf import walk_records
tracker, ids = Tracker(), FastIdGenerator(seed=3)
resource = Resource({"service.name": "web"})
out = []
for data, words, end in ring_batches(traffic(300, 7, varied=True), 64):
    segs = walk_records(data, words, 0, 0, end, len(data) - 1, 1 << 30)[0]
    spans = [
        session_to_span(s, resource=resource, to_wall=lambda ns: ns + 10**18, ids=ids)
        for s in tracker.feed_many(segs)
    ]
    if spans:
        out.append(json.loads(spans_to_otlp_json(spans)))
print(json.dumps({"compiled": compiled_modules(), "doctor": describe()[1], "docs": out}))
"""


def _replay(pure: bool) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    if pure:
        env[PURE_ENV] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", REPLAY], env=env, capture_output=True, text=True, timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_pure_python_and_compiled_builds_write_the_same_spans() -> None:
    compiled, pure = _replay(pure=False), _replay(pure=True)
    assert pure["compiled"] == []
    assert str(pure["doctor"]).startswith("pure Python")
    if not compiled["compiled"]:
        if os.environ.get("CI"):
            pytest.fail("CI must test the compiled build: `make setup` did not compile it")
        pytest.skip("no compiled modules installed (CLOVISOR_COMPILE=0?)")
    assert "clovisor.export.spans" in compiled["compiled"]  # type: ignore[operator]
    assert str(compiled["doctor"]).startswith("compiled with mypyc")
    assert compiled["docs"] and compiled["docs"] == pure["docs"]
