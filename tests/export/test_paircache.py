"""The shared attribute-pair cache: bounded, and never a different encoding."""

from __future__ import annotations

import json
from typing import Any

import pytest

from clovisor.export import otlp_json
from clovisor.export.otlp_json import reference_otlp_json, spans_to_otlp_json
from clovisor.export.paircache import PairCache

from .sessions import request, session, span


def _encode(key: str, value: Any) -> str:
    return f"{key}={value!r}"


def test_repeating_pairs_are_encoded_once() -> None:
    cache: PairCache[str] = PairCache()
    calls: list[tuple[str, Any]] = []

    def encode(key: str, value: Any) -> str:
        calls.append((key, value))
        return _encode(key, value)

    for _ in range(3):
        for key, value in (("m", "GET"), ("p", 80), ("b", True), ("h", ["x"])):
            vkey = tuple(value) if isinstance(value, list) else value
            hit = cache.pairs.get((key, type(value), vkey))
            assert (hit or cache.miss(key, type(value), value, encode)) == _encode(key, value)
    assert len(calls) == 4 and len(cache) == 4
    # True == 1 but encodes differently: the type is part of the key.
    assert cache.miss("p", int, 1, encode) == "p=1"
    assert cache.miss("p", bool, True, encode) == "p=True"


def test_uncacheable_values_are_left_to_the_caller() -> None:
    cache: PairCache[str] = PairCache(max_value_length=8)
    for value in (1.5, b"raw", {"a": 1}, [1, 2], "x" * 9, ["abcd", "efghi"]):
        assert cache.miss("k", type(value), value, _encode) is None
    assert len(cache) == 0


def test_high_cardinality_keys_turn_volatile_and_size_is_bounded() -> None:
    cache: PairCache[str] = PairCache(max_pairs=50, max_values_per_key=10)
    for port in range(100):
        cache.miss("client.port", int, port, _encode)
    assert "client.port" in cache.volatile
    assert len(cache) == 10
    for i in range(1000):
        cache.miss(f"key{i}", str, "v", _encode)
        assert len(cache) <= 50


def test_unencodable_values_are_not_cached() -> None:
    cache: PairCache[str] = PairCache()

    def refuse(key: str, value: Any) -> str:
        raise ValueError("no")

    for _ in range(2):
        with pytest.raises(ValueError):
            cache.miss("k", str, "v", refuse)
    assert len(cache) == 0


def test_json_encoder_output_is_the_same_from_the_cache() -> None:
    batch = [
        span(session(client_port=40000 + i % 7, request=request(target=f"/item/{i % 3}")))
        for i in range(40)
    ]
    first = spans_to_otlp_json(batch)
    assert len(otlp_json._pairs) > 0
    assert spans_to_otlp_json(batch) == first
    assert json.loads(first) == reference_otlp_json(batch)
