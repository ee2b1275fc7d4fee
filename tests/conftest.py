"""Shared fixtures: the kernel gate, the namespace topology and tiny test BPF programs.

Tests marked ``@pytest.mark.kernel`` need root, eBPF and network namespaces.
On a machine without them they are skipped; with ``CI=true`` they fail, so a
CI runner that lost its privileges cannot go green by skipping everything.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clovisor.kernel import features
from clovisor.kernel.errors import KernelError, NotSupported
from clovisor.topology import Topology

# Features every kernel test needs: the agent's essentials plus what building
# namespaces takes (CAP_SYS_ADMIN for setns/ip netns, iproute2).
KERNEL_TEST_FEATURES = (*features.ESSENTIAL, "cap_sys_admin", "iproute2")


def _stale_compiled_modules() -> list[str]:
    """Compiled modules older than their source: they would shadow the edit."""
    src = Path(__file__).resolve().parent.parent / "src"
    stale = []
    for so in src.rglob("*.so"):
        py = so.with_name(so.name.split(".", 1)[0] + ".py")
        if py.exists() and py.stat().st_mtime > so.stat().st_mtime:
            stale.append(str(py.relative_to(src)))
    return stale


def pytest_configure(config: pytest.Config) -> None:
    stale = _stale_compiled_modules()
    if stale and not os.environ.get("CLOVISOR_PURE_PYTHON"):
        raise pytest.UsageError(
            f"compiled modules are older than their sources ({', '.join(stale)}): "
            "run `make setup` to rebuild them, or set CLOVISOR_PURE_PYTHON=1"
        )


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def unavailable(reason: str) -> None:
    """Skip, or fail under CI: a missing kernel feature must never look like a pass there."""
    if in_ci():
        pytest.fail(f"kernel test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@functools.cache
def _kernel_problem() -> str | None:
    try:
        features.require(KERNEL_TEST_FEATURES)
    except NotSupported as exc:
        return str(exc)
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None:
        problem = _kernel_problem()
        if problem is not None:
            unavailable(problem)


@pytest.fixture
def kernel() -> list[features.Feature]:
    """The probed features; skips (fails in CI) when kernel tests cannot run."""
    problem = _kernel_problem()
    if problem is not None:
        unavailable(problem)
    return features.check()


@pytest.fixture
def topology(kernel: list[features.Feature]) -> Iterator[Topology]:
    """A node namespace with ``server`` and ``client`` pods, removed even when the test fails."""
    with Topology(prefix="clvt", pods=("server", "client")) as topo:
        yield topo


# --- tiny BPF programs for tests that must not depend on the real classifier ----------

_p, _i, _s = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p


def counting_tc_source(prefix: str, retval: int = -1) -> str:
    """C for two tc programs ``<prefix>_in``/``<prefix>_eg`` counting into map ``<prefix>_hits``.

    Slot 0 counts ingress runs, slot 1 egress.  ``retval`` -1 is
    TC_ACT_UNSPEC (TCX "next"), what Clovisor's classifier returns.
    """
    return f"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct {{
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
}} {prefix}_hits SEC(".maps");
static __always_inline int count(__u32 k)
{{
    __u64 *v = bpf_map_lookup_elem(&{prefix}_hits, &k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return {retval};
}}
SEC("tc") int {prefix}_in(struct __sk_buff *skb) {{ return count(0); }}
SEC("tc") int {prefix}_eg(struct __sk_buff *skb) {{ return count(1); }}
char LICENSE[] SEC("license") = "GPL";
"""


class TinyBpf:
    """A BPF object compiled and loaded for a test; ``close()`` unloads it."""

    def __init__(self, path: Path) -> None:
        from clovisor.kernel import libbpf

        self.path = path
        self._lib = libbpf
        open_file = libbpf.bind("bpf_object__open_file", _p, _s, _p)
        load = libbpf.bind("bpf_object__load", _i, _p)
        self._find_prog = libbpf.bind("bpf_object__find_program_by_name", _p, _p, _s)
        self._prog_fd = libbpf.bind("bpf_program__fd", _i, _p)
        self._find_map_fd = libbpf.bind("bpf_object__find_map_fd_by_name", _i, _p, _s)
        self._lookup = libbpf.bind("bpf_map_lookup_elem", _i, _i, _p, _p)
        self._close = libbpf.bind("bpf_object__close", None, _p)
        self._obj: int | None = libbpf.check_ptr(open_file(str(path).encode(), None),
                                                 f"open {path}")
        rc = load(self._obj)
        if rc < 0:
            self.close()
            raise KernelError(f"load {path}", rc)

    def prog_fd(self, name: str) -> int:
        prog = self._find_prog(self._obj, name.encode())
        if not prog:
            raise KeyError(name)
        return int(self._prog_fd(prog))

    def map_fd(self, name: str) -> int:
        return int(self._lib.check(self._find_map_fd(self._obj, name.encode()), f"map {name}"))

    def u64(self, map_name: str, key: int) -> int:
        k, v = ctypes.c_uint32(key), ctypes.c_uint64()
        self._lib.check(self._lookup(self.map_fd(map_name), ctypes.byref(k), ctypes.byref(v)),
                        f"lookup {map_name}[{key}]")
        return int(v.value)

    def close(self) -> None:
        if self._obj is not None:
            self._close(self._obj)
            self._obj = None


@pytest.fixture(scope="session")
def compile_bpf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Compile C source to a BPF object (cached by content) and return its path."""
    clang = shutil.which("clang")
    outdir = tmp_path_factory.mktemp("bpf")
    arch_inc = f"/usr/include/{os.uname().machine}-linux-gnu"

    def compile_(source: str) -> Path:
        if clang is None:
            unavailable("clang is needed to build the test BPF programs")
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        obj = outdir / f"{digest}.bpf.o"
        if not obj.exists():
            src = outdir / f"{digest}.bpf.c"
            src.write_text(source)
            subprocess.run([str(clang), "-g", "-O2", "-target", "bpf", "-I", arch_inc,
                            "-c", str(src), "-o", str(obj)], check=True,
                           capture_output=True, text=True)
        return obj

    return compile_


@pytest.fixture
def tiny_bpf(
    kernel: list[features.Feature], compile_bpf: Callable[[str], Path]
) -> Iterator[Callable[[str], TinyBpf]]:
    """Factory: C source -> loaded :class:`TinyBpf`; all are closed after the test."""
    made: list[TinyBpf] = []

    def make(source: str) -> TinyBpf:
        obj = TinyBpf(compile_bpf(source))
        made.append(obj)
        return obj

    yield make
    for obj in made:
        obj.close()
