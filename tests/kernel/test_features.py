"""Feature probes: complete, honest, non-destructive; require() and the kernel-test gate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from clovisor.kernel import features
from clovisor.kernel.errors import NotSupported
from clovisor.kernel.features import ESSENTIAL, Feature
from tests import conftest

NAMES = {"libbpf", "bpf_syscall", "ring_buffer", "btf", "tcx", "clsact", "attach",
         "capabilities", "cap_sys_admin", "root", "iproute2"}


def test_check_reports_every_feature_in_words() -> None:
    result = features.check()
    assert {f.name for f in result} == NAMES
    assert len(result) == len(NAMES)
    for f in result:
        assert isinstance(f.ok, bool)
        assert f.detail.strip()
        assert f.essential == (f.name in ESSENTIAL)
        assert str(f).startswith("[ok]" if f.ok else "[MISSING]")


@pytest.mark.kernel
def test_this_machine_has_everything(kernel: list[Feature]) -> None:
    by_name = {f.name: f for f in features.check()}
    # The development machines and CI are root on Linux 6.18 with BTF.
    for name in NAMES:
        assert by_name[name].ok, by_name[name]
    assert by_name["attach"].detail == "TCX"
    assert by_name["libbpf"].detail.startswith("v1.")
    assert features.require() == features.check()


@pytest.mark.kernel
def test_probes_leave_no_trace() -> None:
    def state() -> tuple[str, str]:
        qdiscs = subprocess.run(["tc", "-j", "qdisc", "show"], capture_output=True,
                                text=True, check=True).stdout
        maps = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True,
                              text=True, check=True).stdout
        names = sorted(m.get("name", "") for m in json.loads(maps or "[]"))
        return qdiscs, json.dumps([n for n in names if n == "clv_probe"])

    before = state()
    features.check()
    assert state() == before


def test_require_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = [Feature("libbpf", True, "v1.1", True),
            Feature("bpf_syscall", False, "bpf() map creation failed: permission denied", True),
            Feature("ring_buffer", True, "ok", True),
            Feature("capabilities", False, "missing CAP_BPF", True),
            Feature("attach", True, "TCX", True),
            Feature("btf", False, "absent")]
    monkeypatch.setattr(features, "check", lambda: fake)
    with pytest.raises(NotSupported) as exc:
        features.require()
    msg = str(exc.value)
    assert "bpf_syscall: bpf() map creation failed" in msg
    assert "capabilities: missing CAP_BPF" in msg
    assert "btf" not in msg  # not essential
    assert features.require(["libbpf", "attach"]) == fake
    with pytest.raises(ValueError, match="unknown features"):
        features.require(["warp_drive"])


@pytest.mark.kernel
def test_unprivileged_process_is_told_what_to_grant() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed")
    script = textwrap.dedent("""
        import json
        from clovisor.kernel import features
        from clovisor.kernel.errors import NotSupported
        out = {f.name: [f.ok, f.detail] for f in features.check()}
        try:
            features.require()
            out["require"] = None
        except NotSupported as exc:
            out["require"] = str(exc)
        print(json.dumps(out))
    """)
    proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--inh-caps=-all", "--bounding-set=-all",
                           sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(proc.stdout)
    assert out["root"][0] is False
    assert out["capabilities"][0] is False
    assert "CAP_BPF" in out["capabilities"][1] and "CAP_NET_ADMIN" in out["capabilities"][1]
    assert out["bpf_syscall"][0] is False and "CAP_BPF" in out["bpf_syscall"][1]
    assert out["ring_buffer"][1].startswith("cannot probe")
    assert out["require"] and "capabilities" in out["require"]


def test_kernel_gate_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no eBPF"):
        conftest.unavailable("no eBPF")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run in CI: no eBPF"):
        conftest.unavailable("no eBPF")
