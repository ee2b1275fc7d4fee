"""Positional constructors for the core's frozen slotted dataclasses.

A frozen dataclass's ``__init__`` assigns every field through
``object.__setattr__`` (its own ``__setattr__`` refuses), which makes it
two to three times slower than writing the slots. The hot path builds
several of these per exchange (two heads, the request and response records,
the session), so it uses a builder that writes the slot descriptors
directly. The classes stay frozen and their ``__init__`` stays the public
way to make one; a builder takes every field positionally, in declaration
order, and checks nothing (the dataclass ``__init__`` checks nothing either).

Like ``dataclasses`` itself, the builder is generated source: a loop over
the setters costs half of what it saves. Only field names of the class go
into that source, and ``dataclasses`` already made sure they are
identifiers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["builder"]


def builder(cls: type[T]) -> Callable[..., T]:
    """``build(*values)``: an instance of ``cls`` with every field set, in order."""
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a slotted dataclass")
    names = [f.name for f in dataclasses.fields(cls)]
    if not all(n.isidentifier() and n != "obj" and not n.startswith("_") for n in names):
        raise TypeError(f"{cls.__name__}: field names must be public identifiers")
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    for i, name in enumerate(names):
        scope[f"_set{i}"] = cls.__dict__[name].__set__
    body = "".join(f"    _set{i}(obj, {name})\n" for i, name in enumerate(names))
    source = f"def build({', '.join(names)}):\n    obj = _new(_cls)\n{body}    return obj\n"
    exec(source, scope)
    build: Callable[..., T] = scope["build"]
    build.__name__ = build.__qualname__ = f"build_{cls.__name__}"
    build.__doc__ = f"{cls.__name__}({', '.join(names)}), positionally."
    return build
