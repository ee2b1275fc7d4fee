"""Fixtures for tests against the real kernel datapath.

Outside CI a machine without root/eBPF skips these tests; with ``CI=true``
the same condition fails them, so a broken runner cannot pass silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from clovisor.kernel import libbpf
from clovisor.kernel.errors import KernelError
from clovisor.kernel.loader import DEFAULT_OBJECT, BpfObject
from clovisor.topology import in_netns

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
TC_ACT_UNSPEC = -1


def unavailable(reason: str) -> None:
    """Skip, or fail under CI: missing eBPF must never look like a pass there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"kernel test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kernel_ok() -> None:
    """Root, a built object and a kernel that loads it; else skip/fail."""
    if os.geteuid() != 0:
        unavailable("needs root (CAP_BPF, CAP_NET_ADMIN, network namespaces)")
    if not DEFAULT_OBJECT.is_file():
        unavailable(f"{DEFAULT_OBJECT} not built (run `make bpf`)")
    try:
        with BpfObject():
            pass
    except KernelError as exc:
        unavailable(f"the classifier does not load here: {exc}")


@pytest.fixture
def bpf_object(kernel_ok: None) -> Iterator[Callable[..., BpfObject]]:
    """A factory of loaded objects (keyword arguments as BpfObject's), all closed after."""
    made: list[BpfObject] = []

    def make(**kwargs: int) -> BpfObject:
        obj = BpfObject(**kwargs)
        made.append(obj)
        return obj

    yield make
    for obj in made:
        obj.close()


# --- attaching (TCX through the raw libbpf call; closing the link fd detaches) ---

_link_create = libbpf.bind(
    "bpf_link_create", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p
)


@contextlib.contextmanager
def tcx_attached(obj: BpfObject, netns: str, ifindex: int) -> Iterator[None]:
    """Both programs on interface ``ifindex`` of namespace ``netns`` for the block."""
    links: list[int] = []
    try:
        # the ifindex is resolved in the calling thread's namespace; the link
        # then lives as long as its fd, wherever the thread goes
        with in_netns(netns):
            for prog, hook in (
                ("clv_tc_ingress", BPF_TCX_INGRESS),
                ("clv_tc_egress", BPF_TCX_EGRESS),
            ):
                links.append(
                    libbpf.check(
                        _link_create(obj.prog_fd(prog), ifindex, hook, None),
                        f"bpf_link_create({prog}, ifindex {ifindex})",
                    )
                )
        yield
    finally:
        for fd in links:
            os.close(fd)


# --- BPF_PROG_TEST_RUN: the classifier on hand-made packets ---


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_test_run = libbpf.bind("bpf_prog_test_run_opts", ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class RunResult:
    retval: int  # signed, as the program returned it
    duration_ns: int  # average per repetition


def test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> RunResult:
    """Run a tc program once (or ``repeat`` times) on an Ethernet frame.

    The kernel runs it with skb->dev = the loopback of the caller's netns
    (ifindex 1) and skb->protocol from the frame's EtherType.
    """
    buf = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(buf, ctypes.c_void_p),
        data_size_in=len(frame),
        data_out=ctypes.cast(out, ctypes.c_void_p),
        data_size_out=len(out),
        repeat=repeat,
    )
    libbpf.check(_test_run(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    retval = struct.unpack("<i", struct.pack("<I", opts.retval))[0]
    return RunResult(retval=retval, duration_ns=opts.duration)


test_run.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test
