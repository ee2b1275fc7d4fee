"""Clovisor: an eBPF network tracer that turns HTTP/1.x exchanges into spans."""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("CLOVISOR_PURE_PYTHON"):
    from .build import prefer_source as _prefer_source

    _prefer_source()
