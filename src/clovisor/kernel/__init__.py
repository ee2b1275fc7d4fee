"""Edges to the kernel: libbpf through ctypes, one module per kernel concept."""
