"""``clovisor``: trace, agent, doctor, cleanup, demo.

Bad input (flags, specs, a missing interface, missing privileges, an
unwritable output) ends with one line on stderr and exit code 2; nothing
else of the user's is touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from . import __version__
from .export import Exporter
from .gctune import tune_for_tracing
from .logs import notice
from .specs import (
    OutputSpec,
    SpecError,
    parse_egress,
    parse_output,
    parse_pod_ref,
    parse_port,
    parse_resource_attr,
)

if TYPE_CHECKING:
    from .pipeline import InterfaceTarget, TracerSettings

EXIT_USAGE = 2
T = TypeVar("T")

log = logging.getLogger("clovisor")


class UsageError(Exception):
    """Ends the program with exit code 2 and one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _spec(fn: Callable[[str], object]) -> Callable[[str], object]:
    """Turn a spec parser's error into argparse's own one-line error."""

    def parse(text: str) -> object:
        try:
            return fn(text)
        except SpecError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = fn.__name__.removeprefix("parse_")
    return parse


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .agent.model import DEFAULT_REDIS, JaegerEndpoint

    p = _Parser(prog="clovisor", description="eBPF tracer: one span per HTTP/1.x exchange")
    p.add_argument("--version", action="version", version=f"clovisor {__version__}")
    _add_logging_flags(p, top=True)
    # Every subcommand takes the logging flags too: a DaemonSet appends them
    # to the image's "clovisor agent" without overriding its command.
    common = _Parser(add_help=False)
    _add_logging_flags(common, top=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("trace", parents=[common], help="trace interfaces of this network namespace")
    t.add_argument("--iface", action="append", default=[], metavar="NAME",
                   help="interface to attach to (repeatable)")
    t.add_argument("--pod", action="append", default=[], metavar="NAMESPACE/NAME",
                   type=_spec(parse_pod_ref),
                   help="a pod of this node: its host-side veth, the HTTP ports of its Services "
                        "(unless --port) and its k8s.* attributes (repeatable)")
    _add_kube_flags(t, "for --pod")
    t.add_argument("--port", action="append", default=[], type=_spec(parse_port),
                   metavar="PORT[:PROTOCOL]",
                   help="server port behind the interface; protocol http (default), http2, "
                        "grpc or tcp")
    t.add_argument("--egress", action="append", default=[], type=_spec(parse_egress),
                   metavar="IP:PORT[:PROTOCOL]",
                   help="trace requests to IP:PORT as CLIENT (0:PORT = any IP); protocol as "
                        "for --port")
    t.add_argument("-o", "--output", action="append", type=_spec(parse_output), metavar="SPEC",
                   help="console (default), json[:PATH] (one JSON object per session; stdout "
                        "unless PATH), otlp-json:PATH ('-' = stdout), otlp:grpc://HOST:PORT, "
                        "otlp:http://HOST:PORT, or otlp (from OTEL_EXPORTER_OTLP_*); repeatable")
    t.add_argument("--service", metavar="NAME", help="service.name (default: interface name)")
    t.add_argument("--resource-attr", action="append", default=[], metavar="KEY=VALUE",
                   type=_spec(parse_resource_attr), help="extra resource attribute")
    t.add_argument("--duration", type=_positive_float, metavar="SECONDS",
                   help="stop after this long")
    t.add_argument("--count", type=_positive_int, metavar="N", help="stop after N sessions")
    _add_tracer_flags(t)
    _add_telemetry_flags(t)

    a = sub.add_parser("agent", parents=[common],
                       help="the Kubernetes DaemonSet agent: trace this node's pods",
                       description="Trace the pods of this node that Redis key clovisor_labels "
                                   "selects; run it in the node's network namespace.")
    _add_kube_flags(a, "")
    a.add_argument("--redis", metavar="HOST:PORT",
                   help=f"Redis holding the configuration (default $CLOVISOR_REDIS or "
                        f"{DEFAULT_REDIS}); a redis://, rediss:// or unix:// URL too; "
                        "its password from $CLOVISOR_REDIS_PASSWORD")
    a.add_argument("--jaeger", metavar="HOST[:PORT]",
                   help=f"OTLP gRPC endpoint while neither Redis key clovisor_jaeger_server "
                        f"nor OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT names one "
                        f"(default $CLOVISOR_JAEGER or {JaegerEndpoint()})")
    _add_tracer_flags(a)
    _add_telemetry_flags(a)

    sub.add_parser("doctor", parents=[common], help="check the kernel and privileges")
    c = sub.add_parser("cleanup", parents=[common],
                       help="remove hooks a killed clovisor left (clsact mode)")
    c.add_argument("--iface", action="append", metavar="NAME",
                   help="only these interfaces (default: all)")
    d = sub.add_parser("demo", parents=[common],
                       help="trace a small pod network built from namespaces")
    d.add_argument("--requests", type=_positive_int, default=40, metavar="N",
                   help="how many client requests to send (default 40)")
    return p


def _add_kube_flags(p: argparse.ArgumentParser, purpose: str) -> None:
    """--node and --kubeconfig, as ``agent`` and ``trace --pod`` share them."""
    for_what = f" {purpose}" if purpose else ""
    p.add_argument("--node", metavar="NAME",
                   help=f"this node's name{for_what} (default $MY_NODE_NAME, from "
                        "spec.nodeName)")
    p.add_argument("--kubeconfig", metavar="PATH",
                   help=f"Kubernetes credentials{for_what} (default $KUBECONFIG, then the "
                        "pod's service account, then ~/.kube/config)")


def _add_logging_flags(p: argparse.ArgumentParser, *, top: bool) -> None:
    from .logs import FORMATS, LEVELS, parse_level

    # A subcommand's copy writes to its own names (argparse would let its
    # defaults overwrite what was given before the subcommand); main() merges.
    prefix = "" if top else "sub_"
    p.add_argument("-v", "--verbose", action="count", default=0, dest=f"{prefix}verbose",
                   help="more logging (repeatable)")
    p.add_argument("--log-level", type=_spec(parse_level), dest=f"{prefix}log_level",
                   metavar="LEVEL",
                   help=f"{', '.join(LEVELS)} (default $CLOVISOR_LOG_LEVEL, else info for the "
                        "agent, warning otherwise); -v lowers it by one step")
    p.add_argument("--log-format", choices=FORMATS, dest=f"{prefix}log_format",
                   help="text (default) or json: one JSON object per log line")


def _merge_logging_flags(args: argparse.Namespace) -> None:
    """The flags given after the subcommand win; -v counts on both sides."""
    args.verbose += getattr(args, "sub_verbose", 0)
    for name in ("log_level", "log_format"):
        value = getattr(args, f"sub_{name}", None)
        if value is not None:
            setattr(args, name, value)
    args.log_format = args.log_format or "text"


def _log_level(args: argparse.Namespace) -> int:
    from .logs import parse_level

    # An agent's log is where an operator looks first: attach, detach and
    # configuration lines are INFO there.
    default = "info" if args.command == "agent" else "warning"
    if args.log_level is not None:
        level = int(args.log_level)
    else:
        level = _setting(None, "--log-level", "CLOVISOR_LOG_LEVEL", default, parse_level)
    return max(logging.DEBUG, level - 10 * int(args.verbose))


def _add_tracer_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``trace`` and ``agent``: how the classifier and the core run."""
    from .kernel.abi import CLV_CAPTURE_MAX
    from .pipeline import DEFAULT_CAPTURE_BYTES

    p.add_argument("--capture-bytes", type=int, default=DEFAULT_CAPTURE_BYTES, metavar="N",
                   help=f"payload prefix copied per segment (default {DEFAULT_CAPTURE_BYTES}, "
                        f"max {CLV_CAPTURE_MAX})")
    p.add_argument("--idle-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="a request without response for this long becomes an error span "
                        "(default 30)")
    p.add_argument("--attach-mode", choices=("auto", "tcx", "clsact"), default="auto",
                   help="TCX links (kernel >= 6.6) or the clsact fallback (default auto)")
    p.add_argument("--no-kernel-pairing", action="store_true",
                   help="send every HTTP segment to user space instead of pairing the "
                        "exchanges the classifier can frame exactly")
    p.add_argument("--shed-bytes", type=int, default=None, metavar="N",
                   help="shed exchange records (count them in the kernel only) while less "
                        "ring space than this is free (default an eighth of the ring; 0: never)")


def _tracer_settings(args: argparse.Namespace) -> TracerSettings:
    from .core.tracker import Limits
    from .kernel.abi import CLV_CAPTURE_MAX
    from .pipeline import TracerSettings

    if not 0 < args.capture_bytes <= CLV_CAPTURE_MAX:
        raise UsageError(f"--capture-bytes must be between 1 and {CLV_CAPTURE_MAX}")
    ring = TracerSettings().ring_bytes
    if args.shed_bytes is not None and not 0 <= args.shed_bytes < ring:
        raise UsageError(f"--shed-bytes must be between 0 and {ring - 1}")
    return TracerSettings(
        capture_bytes=args.capture_bytes,
        attach_mode=args.attach_mode,
        limits=Limits(idle_timeout_ns=int(args.idle_timeout * 1e9)),
        redact_all_query=args.redact_query == "all",
        kernel_pairing=not args.no_kernel_pairing,
        shed_bytes=args.shed_bytes,
    )


def _add_telemetry_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``trace`` and ``agent``: metrics, routes, sampling, redaction."""
    from .metrics import parse_listen_address
    from .routes import parse_route

    p.add_argument("--metrics", type=_spec(parse_listen_address), metavar="HOST:PORT",
                   help="serve Prometheus /metrics, /healthz and /readyz here")
    p.add_argument("--route", action="append", default=[], type=_spec(parse_route),
                   metavar="PATTERN", help="http_route pattern such as /users/{id} (repeatable)")
    p.add_argument("--sampler", metavar="NAME",
                   help="OTel sampler name (default parentbased_always_on, or OTEL_TRACES_SAMPLER)")
    p.add_argument("--sampler-arg", metavar="RATIO", help="argument of a *traceidratio sampler")
    p.add_argument("--sample-ratio", metavar="RATIO",
                   help="short for --sampler parentbased_traceidratio --sampler-arg RATIO")
    p.add_argument("--redact-query", choices=("credentials", "all"), default="credentials",
                   help="replace credential query values (default) or every value by REDACTED")


class Telemetry:
    """Metrics, health and sampling as the flags ask; closed when the command ends."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .health import Health, serve
        from .metrics import Metrics
        from .routes import RouteFolder
        from .sampling import sampler_from_flags

        try:
            self.sampler = sampler_from_flags(args.sampler, args.sampler_arg, args.sample_ratio)
        except SpecError as exc:
            raise UsageError(str(exc)) from None
        self.metrics = Metrics(RouteFolder(args.route))
        self.health = Health()
        self.server = None
        if args.metrics is not None:
            host, port = args.metrics
            try:
                self.server = serve(host, port, metrics=self.metrics, health=self.health)
            except OSError as exc:
                raise UsageError(f"--metrics {host}:{port}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def main(argv: Sequence[str] | None = None) -> int:
    from .logs import setup

    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    _merge_logging_flags(args)
    # gRPC's C core writes its own lines to stderr, past the logging setup
    # (one at INFO each time a receiver closes a connection): errors only,
    # unless the operator asked for more. Read when grpc is first imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        setup(_log_level(args), args.log_format)
    except UsageError as exc:
        print(f"clovisor {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.debug("clovisor %s %s, log level %s", __version__, args.command,
              logging.getLevelName(logging.getLogger("clovisor").getEffectiveLevel()))
    try:
        if args.command == "trace":
            return _trace(args)
        if args.command == "agent":
            return _agent(args)
        if args.command == "doctor":
            return _doctor()
        if args.command == "cleanup":
            return _cleanup(args.iface)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(requests=args.requests)
    except UsageError as exc:
        print(f"clovisor {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


def _require_root() -> None:
    from .kernel.features import check

    caps = {f.name: f for f in check()}
    for name in ("bpf_syscall", "capabilities"):
        f = caps.get(name)
        if f is not None and not f.ok:
            raise UsageError(f"{f.detail} (run as root, or see `clovisor doctor`)")


def _trace(args: argparse.Namespace) -> int:
    from opentelemetry.sdk.resources import Resource

    from .export import ExporterConfigError
    from .kernel.errors import KernelError
    from .pipeline import InterfaceTarget, Tracer, resolve_interface

    settings = _tracer_settings(args)
    if not args.iface and not args.pod:
        raise UsageError("nothing to trace: give --iface and/or --pod")
    if args.iface and not args.port and not args.egress:
        raise UsageError("nothing to trace: give --port and/or --egress")
    ifnames = tuple(dict.fromkeys(args.iface))
    try:
        for name in ifnames:
            resolve_interface(name)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    extra = dict(args.resource_attr)
    targets = [
        InterfaceTarget(
            ifname=name,
            ports=tuple(args.port),
            egress=tuple(args.egress),
            resource=Resource.create({"service.name": args.service or name, **extra}),
        )
        for name in ifnames
    ]
    targets += _pod_targets(args, extra)
    ifnames = tuple(dict.fromkeys(t.ifname for t in targets))
    if os.geteuid() != 0:
        _require_root()
    exporters: list[Exporter] = []
    try:
        exporters = [_exporter(o) for o in (args.output or [OutputSpec(kind="console")])]
    except ExporterConfigError as exc:
        for e in exporters:
            e.shutdown()
        raise UsageError(str(exc)) from None
    try:
        telemetry = Telemetry(args)
    except UsageError:
        for e in exporters:
            e.shutdown()
        raise
    tracer = Tracer(
        settings,
        exporters,
        observers=[lambda s: telemetry.metrics.observe_sessions(s, tracer.service_of)],
        span_filter=telemetry.sampler.filter,
        beat=telemetry.health.beat,
    )
    telemetry.metrics.register_untraced(tracer.untraced)
    telemetry.metrics.register_health(
        lambda: {**tracer.health_stats(), "spans_sampled_out": telemetry.sampler.sampled_out}
    )
    telemetry.metrics.register_unseen(tracer.unseen_exchanges)
    tracer.count = args.count
    tune_for_tracing()
    # A plain flag, not an Event: the handler runs on this thread, and
    # Event.set() there could wait forever for the lock of the very
    # Event.wait() it interrupted.
    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            tracer.start()
            for target in targets:
                tracer.set_interface(target)
        except (KernelError, SpecError) as exc:
            tracer.stop()
            telemetry.close()
            raise UsageError(f"cannot start tracing: {exc}") from None
        telemetry.health.set_ready(True)
        notice(
            f"tracing {', '.join(ifnames)} "
            f"({', '.join(a.mode for a in tracer.attachments)}); Ctrl-C to stop"
        )
        deadline = None if args.duration is None else _now() + args.duration
        while not stop and not tracer.done.is_set():
            if deadline is not None and _now() >= deadline:
                break
            time.sleep(0.1)  # the loop sees a signal within 0.1 s
    finally:
        telemetry.health.set_ready(False)
        totals = tracer.stop()
        telemetry.close()
        for s, h in old.items():
            signal.signal(s, h)
    notice(str(totals))
    return 0


def _pod_targets(args: argparse.Namespace, extra: dict[str, str]) -> list[InterfaceTarget]:
    """The interfaces of the ``--pod`` pods, found through the Kubernetes API."""
    if not args.pod:
        return []
    from .agent.kube import KubeError, api_client
    from .agent.pod_target import PodTargetError, resolve_pod

    node = _setting(args.node, "--node", "MY_NODE_NAME", "", _node_name)
    try:
        api = api_client(args.kubeconfig, retries=0)  # one try, one line when it fails
    except KubeError as exc:
        raise UsageError(str(exc)) from None
    targets = []
    try:
        for namespace, name in dict.fromkeys(args.pod):
            found = resolve_pod(api, namespace, name, node, ports=args.port,
                                egress=args.egress, service=args.service, extra=extra)
            log.info("%s", found.describe())
            targets.append(found.target)
    except PodTargetError as exc:
        raise UsageError(str(exc)) from None
    finally:
        closing: Any = api  # the client is untyped
        closing.close()
    return targets


def _setting(flag: str | None, flag_name: str, env: str, default: str,
             parse: Callable[[str], T]) -> T:
    """``parse`` of the flag, else the environment, else the default; a bad
    value is a usage error naming where it came from."""
    value, source = flag, flag_name
    if value is None:
        value = os.environ.get(env, "").strip()
        source = f"{env}={value}"
        if not value:
            value, source = default, "default"
    try:
        return parse(value)
    except SpecError as exc:
        raise UsageError(f"{source}: {exc}") from None


def _node_name(text: str) -> str:
    from .agent.redisconf import check_node_name

    if not text:
        raise UsageError("no node name: give --node or set MY_NODE_NAME "
                         "(the downward API's spec.nodeName)")
    return check_node_name(text)


def _agent(args: argparse.Namespace) -> int:
    # An agent runs as root or not at all: that is said first, before the
    # Kubernetes and Redis clients are even imported.
    if os.geteuid() != 0:
        _require_root()
    from .agent.destination import Destination
    from .agent.kube import KubeError, api_client
    from .agent.model import DEFAULT_REDIS
    from .agent.redisconf import parse_jaeger, redis_url
    from .agent.runtime import Agent, AgentSettings
    from .export import ExporterConfigError
    from .kernel.errors import KernelError

    tracer_settings = _tracer_settings(args)
    node = _setting(args.node, "--node", "MY_NODE_NAME", "", _node_name)
    url = _setting(args.redis, "--redis", "CLOVISOR_REDIS", DEFAULT_REDIS, redis_url)
    # From a Secret (deploy/kubernetes): an environment variable, never a
    # flag, so that it shows in no process list.
    password = os.environ.get("CLOVISOR_REDIS_PASSWORD") or None
    if password is not None and urlsplit(url).password is not None:
        raise UsageError("CLOVISOR_REDIS_PASSWORD is set and the Redis URL has a password "
                         "too: give it once")
    default_jaeger = _setting(args.jaeger, "--jaeger", "CLOVISOR_JAEGER", "", parse_jaeger)
    try:
        destination = Destination.from_environment(default_jaeger)
    except ExporterConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        api = api_client(args.kubeconfig)
    except KubeError as exc:
        raise UsageError(str(exc)) from None
    settings = AgentSettings(
        node_name=node,
        redis_url=url,
        redis_password=password,
        destination=destination,
        tracer=tracer_settings,
    )
    telemetry = Telemetry(args)
    try:
        agent = Agent(
            settings,
            api,
            observers=[lambda s: telemetry.metrics.observe_sessions(s, agent.tracer.service_of)],
            span_filter=telemetry.sampler.filter,
            beat=telemetry.health.beat,
            health=telemetry.health,
        )
    except ExporterConfigError as exc:
        telemetry.close()
        raise UsageError(str(exc)) from None
    telemetry.metrics.register_untraced(lambda: agent.tracer.untraced())
    telemetry.metrics.register_health(
        lambda: {**agent.tracer.health_stats(), **agent.health_stats(),
                 "spans_sampled_out": telemetry.sampler.sampled_out}
    )
    telemetry.metrics.register_unseen(lambda: agent.tracer.unseen_exchanges())
    tune_for_tracing()
    # The loop runs on its own thread so that the signal handler, which runs
    # on this one, never waits for a lock the interrupted code holds.
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(agent.run())
        except BaseException as exc:
            outcome.append(exc)

    def on_signal(signum: int, _frame: object) -> None:
        agent.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    control = threading.Thread(target=run, name="agent", daemon=True)
    try:
        control.start()
        while control.is_alive():
            control.join(0.5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        telemetry.close()
    result = outcome[0] if outcome else RuntimeError("the agent loop ended without a result")
    if isinstance(result, KernelError):
        raise UsageError(f"cannot start tracing: {result}")
    if isinstance(result, BaseException):
        raise result
    notice(str(result))
    return 0


def _now() -> float:
    return time.monotonic()


def _exporter(spec: OutputSpec) -> Exporter:
    from .export.console import ConsoleExporter
    from .export.otlp_json import OtlpJsonExporter

    if spec.kind == "console":
        return ConsoleExporter(sys.stdout)
    if spec.kind == "otlp-json":
        return OtlpJsonExporter(spec.target)
    if spec.kind == "json":
        from .export.jsonlines import JsonLinesExporter

        return JsonLinesExporter(spec.target)
    from .export.otlp import OtlpExporter
    from .export.otlp_config import resolve_config

    return OtlpExporter(resolve_config(spec.kind, spec.target))


def _doctor() -> int:
    from .build import describe
    from .kernel.features import check

    features = check()
    for f in features:
        print(f)
    print(f"[info] build: {describe()[1]}")
    missing = [f for f in features if f.essential and not f.ok]
    if missing:
        print(f"clovisor cannot trace here: {', '.join(f.name for f in missing)} missing")
        return 1
    print("clovisor can trace here")
    return 0


def _cleanup(ifaces: list[str] | None) -> int:
    from .kernel.attach import cleanup
    from .kernel.errors import KernelError

    if os.geteuid() != 0:
        _require_root()
    try:
        removed = cleanup(ifaces)
    except KernelError as exc:
        raise UsageError(str(exc)) from None
    for r in removed:
        print(f"removed {r}")
    if not removed:
        print("nothing to clean up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
