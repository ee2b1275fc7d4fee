"""The ``clovisor`` command line as a user meets it: a real subprocess each time.

Bad input ends with exit code 2 and exactly one clear line on stderr, never a
traceback, and touches nothing (every case fails before anything is loaded
or attached; the interface names used do not exist).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOPE_IF = "clvnope0"  # no such interface anywhere
# As non-root, the privilege check answers first (flag errors come before it).
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="non-root gets the privilege error first")


# What the agent reads from its environment: cleared unless a test sets it.
AGENT_ENV = ("MY_NODE_NAME", "KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT",
             "CLOVISOR_REDIS", "CLOVISOR_JAEGER")


def clovisor(*args: str, prefix: tuple[str, ...] = (), timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in AGENT_ENV}
    env = {**base, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return subprocess.run([*prefix, sys.executable, "-m", "clovisor", *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env, check=False)


def assert_usage_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, one line on stderr naming the problem, no traceback, nothing on stdout."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, f"want one line, got:\n{proc.stderr}"
    assert proc.stdout == "", proc.stdout
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    return err


BAD_TRACE_INPUT = [
    pytest.param(["--iface", NOPE_IF, "--port", "8080"], [NOPE_IF, "does not exist"],
                 id="missing-interface"),
    pytest.param(["--iface", NOPE_IF, "--port", "99999"], ["--port", "99999", "range"],
                 id="port-out-of-range"),
    pytest.param(["--iface", NOPE_IF, "--port", "0"], ["--port", "range"], id="port-zero"),
    pytest.param(["--iface", NOPE_IF, "--port", "abc"], ["--port", "'abc'", "not a number"],
                 id="port-not-a-number"),
    pytest.param(["--iface", NOPE_IF, "--port", "80:gopher"], ["--port", "gopher", "protocol"],
                 id="port-unknown-protocol"),
    pytest.param(["--iface", NOPE_IF, "--egress", "1.2.3:80"], ["--egress", "1.2.3"],
                 id="egress-bad-ip"),
    pytest.param(["--iface", NOPE_IF, "--egress", "nope"], ["--egress", "nope", "IP:PORT"],
                 id="egress-no-port"),
    pytest.param(["--iface", NOPE_IF, "--egress", "10.200.0.1:http"], ["--egress", "http"],
                 id="egress-port-not-a-number"),
    pytest.param(["--iface", NOPE_IF, "--egress", "[fd00:200::1:80"], ["--egress", "IPv6"],
                 id="egress-unclosed-bracket"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--output", "kafka:topic"],
                 ["--output", "kafka", "unknown output"], id="unknown-output-kind"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--output", "otlp-json:"],
                 ["--output", "path"], id="output-without-path"),
    pytest.param(["--iface", NOPE_IF], ["--port", "--egress"], id="missing-port-and-egress"),
    pytest.param(["--port", "8080"], ["--iface"], id="missing-iface"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--capture-bytes", "0"],
                 ["--capture-bytes"], id="capture-bytes-zero"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--capture-bytes", "1000000"],
                 ["--capture-bytes"], id="capture-bytes-too-big"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--capture-bytes", "x"],
                 ["--capture-bytes"], id="capture-bytes-not-a-number"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--shed-bytes", "-1"],
                 ["--shed-bytes"], id="shed-bytes-negative"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--shed-bytes", str(4 << 20)],
                 ["--shed-bytes"], id="shed-bytes-the-whole-ring"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--shed-bytes", "lots"],
                 ["--shed-bytes"], id="shed-bytes-not-a-number"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--duration", "0"], ["--duration"],
                 id="duration-zero"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--count", "-1"], ["--count"],
                 id="count-negative"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--idle-timeout", "soon"],
                 ["--idle-timeout"], id="idle-timeout-not-a-number"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--attach-mode", "xdp"],
                 ["--attach-mode", "xdp"], id="attach-mode-unknown"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--resource-attr", "novalue"],
                 ["--resource-attr", "KEY=VALUE"], id="resource-attr-no-equals"),
    pytest.param(["--iface", NOPE_IF, "--port", "8080", "--bogus"], ["--bogus"],
                 id="unknown-flag"),
]


@pytest.mark.parametrize(("args", "needles"), BAD_TRACE_INPUT)
def test_trace_bad_input_exits_2_with_one_line(args: list[str], needles: list[str]) -> None:
    assert_usage_error(clovisor("trace", *args), *needles)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a scratch network namespace")
def test_unwritable_output_exits_2() -> None:
    """In a scratch network namespace (unshare), so the interface exists and is nobody's."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    proc = clovisor("trace", "--iface", "lo", "--port", "8080",
                    "--output", "otlp-json:/proc/nope/x", prefix=("unshare", "--net", "--"))
    assert_usage_error(proc, "/proc/nope/x")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        pytest.param([], ["command"], id="no-command"),
        pytest.param(["frobnicate"], ["frobnicate"], id="unknown-command"),
        pytest.param(["cleanup", "--iface", NOPE_IF], [NOPE_IF], id="cleanup-missing-iface"),
        pytest.param(["demo", "--requests", "0"], ["--requests"], id="demo-zero-requests"),
    ],
)
def test_other_bad_input_exits_2(args: list[str], needles: list[str]) -> None:
    if args[:1] == ["cleanup"] and os.geteuid() != 0:
        pytest.skip("non-root gets the privilege error first")
    assert_usage_error(clovisor(*args), *needles)


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    """A well-formed kubeconfig; nothing here ever connects to its server."""
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "t", "user": {}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    return path


KUBE = "@kubeconfig"  # replaced by the fixture's path

BAD_AGENT_INPUT = [
    pytest.param([], {}, ["node name", "MY_NODE_NAME"], id="no-node"),
    pytest.param(["--node", "Bad_Node"], {}, ["--node", "'Bad_Node'"], id="bad-node-flag"),
    pytest.param([], {"MY_NODE_NAME": "node a"}, ["MY_NODE_NAME=node a"], id="bad-node-env"),
    pytest.param(["--node", "n1", "--redis", "redis:0"], {}, ["--redis", "'0'"],
                 id="redis-port-zero"),
    pytest.param(["--node", "n1"], {"CLOVISOR_REDIS": "ftp://r"}, ["CLOVISOR_REDIS", "scheme"],
                 id="redis-env-bad-scheme"),
    pytest.param(["--node", "n1", "--jaeger", "http://j:4317"], {}, ["--jaeger", "not a URL"],
                 id="jaeger-url"),
    pytest.param(["--node", "n1"], {"CLOVISOR_JAEGER": "j:99999"},
                 ["CLOVISOR_JAEGER", "99999"], id="jaeger-env-bad-port"),
    pytest.param(["--node", "n1", "--kubeconfig", "/nonexistent/kc"], {}, ["/nonexistent/kc"],
                 id="kubeconfig-missing"),
    pytest.param(["--node", "n1"], {"KUBECONFIG": "/nonexistent/kc"},
                 ["KUBECONFIG=/nonexistent/kc"], id="kubeconfig-env-missing"),
    pytest.param(["--node", "n1"], {"HOME": "/nonexistent"}, ["no Kubernetes credentials"],
                 id="no-credentials"),
    pytest.param(["--node", "n1"], {"KUBERNETES_SERVICE_HOST": "10.200.0.1",
                                    "KUBERNETES_SERVICE_PORT": "443"},
                 ["in-cluster credentials"], id="in-cluster-without-token"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE, "--metrics", "nope"], {}, ["--metrics"],
                 id="metrics-bad"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE, "--capture-bytes", "0"], {},
                 ["--capture-bytes"], id="capture-bytes-zero"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE, "--attach-mode", "xdp"], {},
                 ["--attach-mode"], id="attach-mode-unknown"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE, "--sample-ratio", "2"], {},
                 ["2"], id="sample-ratio-out-of-range"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE], {"OTEL_EXPORTER_OTLP_HEADERS": "x"},
                 ["OTEL_EXPORTER_OTLP_HEADERS"], id="otlp-headers-bad"),
]


@as_root  # the agent says "not root" before anything else
@pytest.mark.parametrize(("args", "env", "needles"), BAD_AGENT_INPUT)
def test_agent_bad_flags_and_environment_exit_2_with_one_line(
    args: list[str], env: dict[str, str], needles: list[str], kubeconfig: Path
) -> None:
    args = [str(kubeconfig) if a == KUBE else a for a in args]
    assert_usage_error(clovisor("agent", *args, env=env), *needles)


def test_version_and_help() -> None:
    v = clovisor("--version")
    assert v.returncode == 0 and v.stdout.startswith("clovisor "), v
    h = clovisor("trace", "--help")
    assert h.returncode == 0 and "--iface" in h.stdout and "--egress" in h.stdout, h


# --- privileges ---


def _as_nobody() -> tuple[str, ...]:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    # --inh-caps/--bounding-set: no capability survives into the child.
    return (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["trace", "--iface", "lo", "--port", "8080"], id="trace"),
        pytest.param(["trace", "--iface", "lo", "--egress", "10.200.0.10:8080",
                      "--output", "otlp-json:-"], id="trace-egress"),
        pytest.param(["cleanup"], id="cleanup"),
        pytest.param(["agent", "--node", "n1"], id="agent"),
    ],
)
def test_not_root_exits_2_about_privileges(args: list[str]) -> None:
    err = assert_usage_error(clovisor(*args, prefix=_as_nobody()))
    assert any(w in err.lower() for w in ("root", "privilege", "permission", "cap_")), err


# --- doctor ---


@pytest.mark.kernel
def test_doctor_prints_checks_and_exits_0() -> None:
    proc = clovisor("doctor")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 4, proc.stdout
    assert lines[-1] == "clovisor can trace here"
    text = proc.stdout.lower()
    for word in ("bpf", "ring", "btf", "tcx"):
        assert word in text, (word, proc.stdout)


def test_doctor_as_nobody_says_what_is_missing() -> None:
    proc = clovisor("doctor", prefix=_as_nobody())
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "cannot trace here" in proc.stdout, proc.stdout
