"""The libbpf shared library (Debian ``libbpf1``) and a helper to bind its functions.

Each kernel-concept module binds the functions it uses with :func:`bind`, so
the ctypes signatures live next to the code that relies on them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from .errors import KernelError, NotSupported

_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded libbpf; :class:`NotSupported` if it is not installed."""
    global _lib
    if _lib is None:
        name = "libbpf.so.1"
        try:
            _lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            found = ctypes.util.find_library("bpf")
            if found is None:
                raise NotSupported(f"libbpf is not installed ({name}: {exc})") from exc
            _lib = ctypes.CDLL(found, use_errno=True)
        # Route libbpf's own diagnostics nowhere: errors reach us as return codes.
        _lib.libbpf_set_print.restype = ctypes.c_void_p
        _lib.libbpf_set_print.argtypes = [ctypes.c_void_p]
        _lib.libbpf_set_print(None)
    return _lib


def bind(name: str, restype: Any, *argtypes: Any) -> Any:
    """Return libbpf's function ``name`` with its ctypes signature set."""
    fn = getattr(lib(), name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def check(rc: int, what: str) -> int:
    """Raise :class:`KernelError` for libbpf's negative-errno convention."""
    if rc < 0:
        raise KernelError(what, rc)
    return rc


def check_ptr(ptr: int | None, what: str) -> int:
    """Raise for a NULL pointer from libbpf (libbpf 1.x sets errno)."""
    if not ptr:
        raise KernelError(what, ctypes.get_errno() or 22)
    return ptr
