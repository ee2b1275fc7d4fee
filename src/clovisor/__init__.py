"""Clovisor: an eBPF network tracer that turns HTTP/1.x exchanges into spans."""

__version__ = "0.1.0"
