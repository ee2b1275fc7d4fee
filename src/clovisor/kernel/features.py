"""What this kernel and these privileges allow, in words an operator can act on.

Every probe is non-destructive: the clsact probe creates its qdisc on the
loopback device of a throw-away network namespace, never on a real
interface.  ``check()`` never raises; ``require()`` raises
:class:`NotSupported` naming everything that is missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import attach
from .errors import KernelError, NotSupported
from .libbpf import bind, lib

__all__ = ["ESSENTIAL", "Feature", "check", "require"]

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
_BPF_MAP_TYPE_ARRAY = 2
_BPF_MAP_TYPE_RINGBUF = 27
_CLONE_NEWNET = 0x40000000
_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}

# What tracing cannot do without.  "attach" stands for TCX *or* clsact: either
# one is enough, so neither is essential on its own.
ESSENTIAL = ("libbpf", "bpf_syscall", "ring_buffer", "capabilities", "attach")


@dataclass(frozen=True)
class Feature:
    """One probe result; ``detail`` says what is there, or what is missing and how to fix it."""

    name: str
    ok: bool
    detail: str
    essential: bool = False

    def __str__(self) -> str:
        return f"[{'ok' if self.ok else 'MISSING'}] {self.name}: {self.detail}"


def _feature(name: str, ok: bool, detail: str) -> Feature:
    return Feature(name, ok, detail, essential=name in ESSENTIAL)


def _libbpf() -> Feature:
    try:
        lib()
        version = bind("libbpf_version_string", ctypes.c_char_p)()
        major = bind("libbpf_major_version", ctypes.c_uint32)()
    except (KernelError, AttributeError, OSError) as exc:
        return _feature("libbpf", False, f"{exc}; install the Debian package libbpf1")
    text = (version or b"?").decode()
    if major < 1:
        return _feature("libbpf", False, f"{text} is too old; libbpf >= 1.0 is needed")
    return _feature("libbpf", True, text)


def _bpf_syscall() -> Feature:
    try:
        create = bind("bpf_map_create", ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                      ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)
    except (KernelError, AttributeError) as exc:
        return _feature("bpf_syscall", False, f"libbpf unusable: {exc}")
    fd = create(_BPF_MAP_TYPE_ARRAY, b"clv_probe", 4, 4, 1, None)
    if fd >= 0:
        os.close(fd)
        return _feature("bpf_syscall", True, "bpf() works (created a test array map)")
    err = -fd
    if err == errno.EPERM:
        hint = ("permission denied: run as root or grant CAP_BPF (CAP_SYS_ADMIN before 5.8); "
                "check kernel.unprivileged_bpf_disabled and any seccomp profile")
    elif err == errno.ENOSYS:
        hint = "the kernel lacks the bpf() syscall (CONFIG_BPF_SYSCALL)"
    else:
        hint = os.strerror(err)
    return _feature("bpf_syscall", False, f"bpf() map creation failed: {hint}")


def _btf() -> Feature:
    if BTF_PATH.exists():
        return _feature("btf", True, f"{BTF_PATH} present")
    return _feature("btf", False, f"{BTF_PATH} missing (kernel built without "
                    "CONFIG_DEBUG_INFO_BTF); Clovisor's classifier does not need it, "
                    "bpftool's pretty-printing does")


def _ring_buffer(syscall: Feature) -> Feature:
    if not syscall.ok:
        # libbpf's probe reports "unsupported" for any map-creation failure.
        return _feature("ring_buffer", False, "cannot probe: bpf() is not usable (see bpf_syscall)")
    try:
        probe = bind("libbpf_probe_bpf_map_type", ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    except (KernelError, AttributeError) as exc:
        return _feature("ring_buffer", False, f"libbpf unusable: {exc}")
    rc = probe(_BPF_MAP_TYPE_RINGBUF, None)
    if rc == 1:
        return _feature("ring_buffer", True, "BPF_MAP_TYPE_RINGBUF supported")
    if rc == 0:
        return _feature("ring_buffer", False, "no BPF ring buffer: Linux >= 5.8 is needed")
    return _feature("ring_buffer", False, f"ring buffer probe failed: {os.strerror(-rc)}")


def _tcx() -> Feature:
    try:
        ok = attach.tcx_supported()
    except KernelError as exc:
        return _feature("tcx", False, f"TCX probe failed: {exc}")
    if ok:
        return _feature("tcx", True, "TCX links available (crash-safe attach)")
    return _feature("tcx", False, f"no TCX on Linux {platform.release()} (needs >= 6.6); "
                    "Clovisor falls back to clsact tc filters, which outlive a killed "
                    "agent: run `clovisor cleanup` after a crash")


class _ScratchNetnsDenied(KernelError):
    pass


def _in_scratch_netns(fn: Callable[[], None]) -> BaseException | None:
    """Run ``fn`` on a helper thread moved into a fresh network namespace."""
    result: list[BaseException | None] = [None]

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(_CLONE_NEWNET) != 0:
                raise _ScratchNetnsDenied("unshare(CLONE_NEWNET)", ctypes.get_errno())
            # The namespace dies with this thread; nothing to restore.
            fn()
        except BaseException as exc:
            result[0] = exc

    t = threading.Thread(target=body, name="clv-feature-probe", daemon=True)
    t.start()
    t.join()
    return result[0]


def _clsact(net_admin: bool) -> Feature:
    def probe() -> None:
        hook = attach._hook(1, attach._BPF_TC_INGRESS | attach._BPF_TC_EGRESS)
        lb = attach._lib()
        rc = lb.tc_hook_create(ctypes.byref(hook))
        if rc < 0:
            raise KernelError("create clsact qdisc on lo of a scratch netns", rc)
        lb.tc_hook_destroy(ctypes.byref(hook))

    try:
        attach._lib()
    except KernelError as exc:
        return _feature("clsact", False, f"libbpf unusable: {exc}")
    err = _in_scratch_netns(probe)
    if err is None:
        return _feature("clsact", True, "clsact qdisc and tc BPF filters available")
    if isinstance(err, _ScratchNetnsDenied):
        # Without CAP_SYS_ADMIN there is no side-effect-free place to try;
        # clsact is in every kernel since 4.5, so CAP_NET_ADMIN decides.
        if net_admin:
            return _feature("clsact", True, "not probed (no CAP_SYS_ADMIN for a scratch "
                            "namespace); assumed present, CAP_NET_ADMIN is there")
        return _feature("clsact", False, "needs CAP_NET_ADMIN")
    if isinstance(err, KernelError) and err.errno == errno.EPERM:
        return _feature("clsact", False, f"{err}: needs CAP_NET_ADMIN")
    return _feature("clsact", False, f"{err} (kernel module sch_ingress / "
                    "CONFIG_NET_SCH_INGRESS and cls_bpf needed)")


def _cap_eff() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _capabilities() -> tuple[Feature, Feature]:
    eff = _cap_eff()
    have = {name: bool(eff >> bit & 1) for name, bit in _CAPS.items()}
    needed = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")
    missing = [c for c in needed if not have[c]]
    if missing:
        caps = _feature("capabilities", False,
                        f"missing {', '.join(missing)}: CAP_BPF loads programs and maps, "
                        "CAP_PERFMON unlocks verifier checks the classifier relies on, "
                        "CAP_NET_ADMIN attaches to interfaces; grant them to the agent "
                        "(securityContext.capabilities.add) or run as root")
    else:
        caps = _feature("capabilities", True, "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN")
    if have["CAP_SYS_ADMIN"]:
        admin = _feature("cap_sys_admin", True, "CAP_SYS_ADMIN present")
    else:
        admin = _feature("cap_sys_admin", False,
                         "no CAP_SYS_ADMIN: entering pod network namespaces and reading "
                         "program names of leftover filters (cleanup) need it; cleanup "
                         "falls back to the filter's recorded name")
    return caps, admin


def _user() -> Feature:
    uid = os.geteuid()
    if uid == 0:
        return _feature("root", True, "running as root")
    return _feature("root", False, f"running unprivileged (uid {uid}); the capabilities "
                    "above decide what works")


def _attach_summary(tcx: Feature, clsact: Feature) -> Feature:
    if tcx.ok:
        return _feature("attach", True, "TCX")
    if clsact.ok:
        return _feature("attach", True, "clsact fallback (no TCX)")
    return _feature("attach", False, f"neither TCX nor clsact usable: {tcx.detail}; "
                    f"{clsact.detail}")


def _netns_tools() -> Feature:
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return _feature("iproute2", False, f"{', '.join(missing)} not found: install iproute2 "
                        "(the demo and tests build their network with it)")
    return _feature("iproute2", True, "ip and tc found")


def check() -> list[Feature]:
    """Probe everything; never raises."""
    # Each probe reports a missing libbpf itself, so the list is always complete.
    caps, admin = _capabilities()
    tcx, clsact = _tcx(), _clsact(net_admin=bool(_cap_eff() >> _CAPS["CAP_NET_ADMIN"] & 1))
    syscall = _bpf_syscall()
    return [_libbpf(), syscall, _ring_buffer(syscall), _btf(), tcx, clsact,
                 _attach_summary(tcx, clsact), caps, admin, _user(), _netns_tools()]


def require(names: Iterable[str] = ESSENTIAL) -> list[Feature]:
    """:func:`check`, raising :class:`NotSupported` if any of ``names`` is not ok."""
    wanted = list(names)
    features = check()
    by_name = {f.name: f for f in features}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown features {unknown}; known: {sorted(by_name)}")
    missing = [by_name[n] for n in wanted if not by_name[n].ok]
    if missing:
        raise NotSupported("; ".join(f"{f.name}: {f.detail}" for f in missing))
    return features
