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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.kube_server import KubeServer, make_pod

NOPE_IF = "clvnope0"  # no such interface anywhere
# As non-root, the privilege check answers first (flag errors come before it).
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="non-root gets the privilege error first")


# What the agent reads from its environment: cleared unless a test sets it.
AGENT_ENV = ("MY_NODE_NAME", "KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT",
             "CLOVISOR_REDIS", "CLOVISOR_REDIS_PASSWORD", "CLOVISOR_JAEGER", "CLOVISOR_LOG_LEVEL")


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
    pytest.param(["--node", "n1", "--kubeconfig", KUBE],
                 {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"},
                 ["OTEL_EXPORTER_OTLP_ENDPOINT", "http://"], id="otlp-endpoint-bad"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE],
                 {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
                 ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"], id="otlp-protocol-bad"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE], {"OTEL_EXPORTER_OTLP_TIMEOUT": "-1"},
                 ["OTEL_EXPORTER_OTLP_TIMEOUT"], id="otlp-timeout-bad"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE, "--redis", "redis://:pw@r:6379"],
                 {"CLOVISOR_REDIS_PASSWORD": "pw2"}, ["CLOVISOR_REDIS_PASSWORD", "once"],
                 id="redis-password-twice"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE], {"OTEL_EXPORTER_OTLP_INSECURE": "yes"},
                 ["OTEL_EXPORTER_OTLP_INSECURE", "true or false"], id="otlp-insecure-bad"),
    pytest.param(["--node", "n1", "--kubeconfig", KUBE],
                 {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"},
                 ["OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"],
                 id="otlp-certificate-missing"),
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


# --- logging ---


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(["doctor", "--log-level", "debug"], {}, id="flag-after-subcommand"),
        pytest.param(["--log-level", "DEBUG", "doctor"], {}, id="flag-before-subcommand"),
        pytest.param(["doctor"], {"CLOVISOR_LOG_LEVEL": "debug"}, id="environment"),
        pytest.param(["doctor", "-vv"], {}, id="v-after-subcommand"),
        pytest.param(["-v", "doctor", "-v"], {}, id="v-on-both-sides-adds-up"),
        pytest.param(["doctor", "--log-level", "debug"], {"CLOVISOR_LOG_LEVEL": "nonsense"},
                     id="flag-wins-over-environment"),
    ],
)
def test_log_level_from_flags_after_any_subcommand_or_environment(
    args: list[str], env: dict[str, str]
) -> None:
    proc = clovisor(*args, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert " DEBUG clovisor: clovisor " in proc.stderr, proc.stderr


def test_default_log_level_hides_debug() -> None:
    proc = clovisor("doctor")
    assert "DEBUG" not in proc.stderr, proc.stderr


def test_json_log_format_gives_one_object_per_line() -> None:
    proc = clovisor("doctor", "--log-level", "debug", "--log-format", "json")
    lines = proc.stderr.splitlines()
    assert lines, proc.stderr
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    first = records[0]
    assert set(first) == {"time", "level", "logger", "message"}, first
    assert first["level"] == "debug" and first["logger"] == "clovisor"
    assert first["message"].startswith("clovisor ") and first["time"].endswith("Z")


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        pytest.param(["doctor", "--log-level", "loud"], {}, ["--log-level", "'loud'"],
                     id="bad-flag"),
        pytest.param(["doctor"], {"CLOVISOR_LOG_LEVEL": "loud"}, ["CLOVISOR_LOG_LEVEL=loud"],
                     id="bad-environment"),
        pytest.param(["agent", "--log-format", "xml"], {}, ["--log-format", "xml"],
                     id="bad-format"),
    ],
)
def test_bad_log_settings_exit_2(args: list[str], env: dict[str, str], needles: list[str]) -> None:
    assert_usage_error(clovisor(*args, env=env), *needles)


# --- trace --pod: the errors, against the in-test Kubernetes API server ---


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubeServer, Path]]:
    with KubeServer() as server:
        server.add_pod(make_pod("elsewhere", node="node-b", ip="10.200.0.20"))
        server.add_pod(make_pod("hostnet", node="node-a", ip="10.200.0.21", host_network=True))
        server.add_pod(make_pod("pending", node="node-a", ip=None, phase="Pending"))
        server.add_pod(make_pod("noservice", node="node-a", ip="10.200.0.22",
                                labels={"app": "lonely"}, ports=[8080]))
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.mark.parametrize(
    ("pod", "needles"),
    [
        pytest.param("default/nope", ["pod default/nope not found"], id="unknown-pod"),
        pytest.param("default/elsewhere", ["default/elsewhere", "node node-b",
                                           "not on this node node-a"], id="another-node"),
        pytest.param("default/hostnet", ["default/hostnet", "hostNetwork"], id="host-network"),
        pytest.param("default/pending", ["default/pending", "Pending", "no IP"], id="no-ip"),
        pytest.param("default/noservice", ["default/noservice", "no Service", "--port"],
                     id="no-http-service"),
        pytest.param("Default/x", ["--pod", "'Default/x'", "namespace"], id="bad-namespace"),
        pytest.param("web", ["--pod", "NAMESPACE/NAME"], id="no-namespace"),
    ],
)
def test_trace_pod_that_cannot_be_traced_here_exits_2_with_one_line(
    api: tuple[KubeServer, Path], pod: str, needles: list[str]
) -> None:
    _, kubeconfig = api
    proc = clovisor("trace", "--pod", pod, "--kubeconfig", str(kubeconfig),
                    env={"MY_NODE_NAME": "node-a"})
    assert_usage_error(proc, *needles)


def test_trace_pod_needs_a_node_name(api: tuple[KubeServer, Path]) -> None:
    _, kubeconfig = api
    proc = clovisor("trace", "--pod", "default/elsewhere", "--kubeconfig", str(kubeconfig))
    assert_usage_error(proc, "MY_NODE_NAME")


def test_trace_pod_with_the_api_server_down_exits_2(tmp_path: Path) -> None:
    server = KubeServer().start()
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    server.stop()
    proc = clovisor("trace", "--pod", "default/web", "--node", "node-a",
                    "--kubeconfig", str(kubeconfig))
    assert_usage_error(proc, "pod default/web", "Kubernetes API")
