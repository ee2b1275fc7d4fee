"""Positional builders make exactly what the dataclass constructors make."""

from __future__ import annotations

import dataclasses

import pytest

from clovisor.core.events import HttpRequest, HttpResponse, Outcome, Role, Session
from clovisor.core.frozen import builder
from clovisor.core.http1 import Head, Kind


def _kw_and_values(cls: type, values: list[object]) -> tuple[dict[str, object], list[object]]:
    names = [f.name for f in dataclasses.fields(cls)]
    assert len(names) == len(values)
    return dict(zip(names, values, strict=True)), values


CASES: list[tuple[type, list[object]]] = [
    (HttpRequest, ["GET", "/x?y", "1.1", (("host", "h"),), 3, True]),
    (HttpResponse, [404, "Not Found", "1.0", (), None, False]),
    (Head, [Kind.RESPONSE, "1.1", "", "", 200, "OK", (), 17, False, True, False, False, 90]),
    (Session, [Role.CLIENT, 2, 7, 6, "::1", 1234, "::2", 80, 10, 20, Outcome.RESET,
               None, None, 1, 2, 3, 4, "proto", (("k", 1),)]),
]


@pytest.mark.parametrize(("cls", "values"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_builder_equals_the_constructor(cls: type, values: list[object]) -> None:
    kw, vals = _kw_and_values(cls, values)
    built: object = builder(cls)(*vals)
    assert type(built) is cls
    assert built == cls(**kw)
    assert hash(built) == hash(cls(**kw))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, next(iter(kw)), None)


def test_builder_wants_every_field_and_a_slotted_dataclass() -> None:
    with pytest.raises(TypeError):
        builder(HttpRequest)("GET", "/")

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    with pytest.raises(TypeError):
        builder(NoSlots)
    with pytest.raises(TypeError):
        builder(int)
