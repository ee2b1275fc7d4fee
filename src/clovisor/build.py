"""Which build of Clovisor runs: mypyc-compiled modules or pure Python.

``make setup`` (and the image) compile the hot-path modules with mypyc
(``setup.py`` lists them); the same sources run interpreted when no
compiled module is installed, or when ``CLOVISOR_PURE_PYTHON=1`` is set
before Clovisor is imported, which makes imports of ``clovisor.*`` skip
compiled extension modules. Both builds must behave the same; the tests
hold them to it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["PURE_ENV", "compiled_modules", "describe", "prefer_source"]

PURE_ENV = "CLOVISOR_PURE_PYTHON"


class _SourceOnly(importlib.abc.MetaPathFinder):
    """Finds ``clovisor.*`` submodules as source files only."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("clovisor.") or path is None:
            return None
        for entry in path:
            finder = importlib.machinery.FileFinder(
                entry,
                (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
                (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
            )
            spec = finder.find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


def prefer_source() -> None:
    """Import ``clovisor.*`` from source from now on (idempotent)."""
    if not any(isinstance(f, _SourceOnly) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceOnly())


def compiled_modules() -> list[str]:
    """The loaded ``clovisor`` modules that are compiled extensions."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith("clovisor")
        and isinstance(getattr(module, "__spec__", None), importlib.machinery.ModuleSpec)
        and isinstance(module.__spec__.loader, importlib.machinery.ExtensionFileLoader)  # type: ignore[union-attr]
    )


def describe() -> tuple[bool, str]:
    """(compiled?, a line for ``clovisor doctor``), after importing the hot path."""
    for hot in ("clovisor.export.spans", "clovisor.export.otlp_json"):
        importlib.import_module(hot)
    names = compiled_modules()
    if names:
        return True, f"compiled with mypyc ({len(names)} modules, e.g. {names[0]})"
    why = f"{PURE_ENV} is set" if os.environ.get(PURE_ENV) else "no compiled modules installed"
    return False, f"pure Python ({why}; `make setup` builds the compiled one)"
