"""``clovisor agent``: the runtime that joins the agent's edges to the tracer.

- :class:`~clovisor.agent.kube.KubeWatcher` (this node's pods, the
  services) and :class:`~clovisor.agent.redisconf.RedisConfigSource` (the
  Redis keys and the plugin channel) run in their own threads and only
  *wake* the control loop.
- The control loop (:meth:`Agent.run`, on the caller's thread) is the only
  one that changes anything: it loads the parser plugins Redis names, swaps
  the exporter when the Jaeger endpoint changes, computes the desired
  targets (:func:`~clovisor.agent.desired.compute`) and lets the
  :class:`~clovisor.agent.reconcile.Reconciler` make the hooks match.
- The datapath (ring buffer, tracker, exporters) is the
  :class:`~clovisor.pipeline.Tracer`'s; this module never reaches into it.

A pass runs whenever something changed, when a pod's interface lookup is due
again, and at least every :data:`MAX_WAIT` seconds (the loop's heartbeat; a
veth renumbered behind our back is noticed then). Start-up removes the clsact
filters a killed predecessor left before anything is attached; TCX links die
with their process and need nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..export import Exporter
from ..export.otlp import OtlpExporter
from ..export.otlp_config import OtlpConfig
from ..health import Health
from ..kernel.attach import cleanup
from ..kernel.errors import KernelError
from ..pipeline import Beat, SessionObserver, SpanFilter, Totals, Tracer, TracerSettings
from .desired import compute
from .destination import Destination
from .ifaces import InterfaceCache
from .kube import ApiClient, KubeWatcher
from .model import AgentConfig, JaegerEndpoint
from .plugins import ParserRegistry
from .reconcile import Reconciler, ReconcileResult
from .redisconf import DEFAULT_URL, RedisConfigSource

log = logging.getLogger(__name__)

MAX_WAIT = 5.0  # seconds between passes when nothing happens (the liveness beat)
RETRY_FAILED = 1.0  # seconds before trying an interface the kernel refused again
RETIRE_TIMEOUT = 5.0  # how long a replaced exporter may flush at shutdown
UNRESOLVED_WARN = 10.0  # a pod without a veth this long is worth a warning

NOT_SYNCED = "waiting for the Kubernetes API (pods and services not listed yet)"


@dataclass(slots=True)
class Waiting:
    """Pods still waiting for their host-side veth, and since when (the caller's clock)."""

    warn_after: float = UNRESOLVED_WARN
    _since: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def update(self, keys: Iterable[str], now: float) -> list[tuple[str, bool]]:
        """Each key still waiting, and whether it has waited ``warn_after`` or longer.
        A key that drops out forgets its wait: if it comes back, it starts again."""
        self._since = {key: self._since.get(key, now) for key in keys}
        return [(key, now - since >= self.warn_after) for key, since in self._since.items()]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    node_name: str
    redis_url: str = DEFAULT_URL
    redis_password: str | None = field(default=None, repr=False)  # CLOVISOR_REDIS_PASSWORD
    destination: Destination = field(default_factory=Destination)
    tracer: TracerSettings = field(default_factory=TracerSettings)


class Agent:
    """One node's agent. ``run()`` blocks until :meth:`stop`; then returns the totals."""

    def __init__(
        self,
        settings: AgentSettings,
        api: ApiClient,
        *,
        observers: Sequence[SessionObserver] = (),
        span_filter: SpanFilter | None = None,
        beat: Beat | None = None,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.health = health or Health()
        self._beat = beat or (lambda _loop: None)
        self.registry = ParserRegistry()
        self._export: OtlpConfig = settings.destination.config(None)  # where spans go
        self._jaeger_seen: JaegerEndpoint | None = None  # what Redis last said
        self.tracer = Tracer(
            settings.tracer,
            [OtlpExporter(self._export)],
            observers=observers,
            span_filter=span_filter,
            beat=beat,
            parsers=self.registry.by_id,
        )
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._reloads: deque[str] = deque()  # plugin names from the pub/sub channel
        self.redis = RedisConfigSource(
            settings.redis_url,
            lambda _config: self._wake.set(),
            on_plugin_message=self._on_plugin_message,
            password=settings.redis_password,
        )
        self.kube = KubeWatcher(
            api, settings.node_name, self._wake.set, namespaces=self._namespaces
        )
        self._ifaces = InterfaceCache()
        self.reconciler = Reconciler(self.tracer, self._ifaces, self.registry.kernel_id)
        self._proto_cfg: tuple[tuple[str, str], ...] = ()
        self._retiring: list[threading.Thread] = []
        self._noted: dict[str, str] = {}  # pod key -> what was logged about it (once)
        self._waiting = Waiting()
        self._traced = 0
        self._unresolved = 0
        self._failed = False
        self._synced_logged = False

    # -- lifecycle ----------------------------------------------------------------

    def run(self) -> Totals:
        """Clean up, load, watch and reconcile until :meth:`stop`.

        Raises :class:`~clovisor.kernel.errors.KernelError` if the classifier
        cannot be loaded (nothing is attached then).
        """
        s = self.settings
        log.info("agent on node %s: Redis %s; spans to %s (from %s) unless Redis names an "
                 "endpoint", s.node_name, self.redis.display, self._export.describe(),
                 s.destination.source(None))
        self.health.set_ready(False, "loading the classifier")
        self._remove_leftovers()
        try:
            self.tracer.start()
        except BaseException:
            for e in self.tracer.swap_exporters([]):
                _shutdown(e)
            raise
        self.health.set_ready(False, NOT_SYNCED)
        log.info("classifier loaded (%s mode); watching Kubernetes and Redis",
                 s.tracer.attach_mode)
        try:
            self.redis.start()
            self.kube.start()
            while not self._stopping.is_set():
                try:
                    self._pass()
                except Exception:
                    # A bug of ours must not stop tracing what is attached.
                    log.exception("agent: reconcile pass failed")
                self._wait()
        finally:
            self.health.set_ready(False, "shutting down")
            self.kube.stop()
            self.redis.stop()
            totals = self.tracer.stop()
            deadline = time.monotonic() + RETIRE_TIMEOUT
            for t in self._retiring:
                t.join(max(0.0, deadline - time.monotonic()))
        return totals

    def stop(self) -> None:
        """Make :meth:`run` detach, flush and return; from any thread but run()'s own.

        The CLI calls it from its signal handler, with run() on another thread:
        a handler on run()'s thread could interrupt it inside the event's lock.
        """
        self._stopping.set()
        self._wake.set()

    def health_stats(self) -> dict[str, int]:
        """Agent gauges for the metrics endpoint (read at scrape time)."""
        kube = self.kube.stats
        return {
            "agent_traced_pods": self._traced,
            "agent_unresolved_pods": self._unresolved,
            "kubernetes_synced": int(self.kube.synced),
            "kubernetes_errors": kube.errors,
            "kubernetes_relists": kube.relists,
            "redis_connected": int(self.redis.connected),
            "redis_config_problems": len(self.redis.problems),
        }

    # -- the control loop ---------------------------------------------------------------

    def _wait(self) -> None:
        timeout = RETRY_FAILED if self._failed else MAX_WAIT
        due = self._ifaces.next_retry()
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.monotonic()))
        self._wake.wait(timeout)
        self._wake.clear()

    def _pass(self) -> None:
        self._beat("agent")
        config = self.redis.current()
        self._apply_config(config)
        while self._reloads:
            self.registry.reload(self._reloads.popleft())
        if not self.kube.synced:
            return
        pods, services = self.kube.pods(), self.kube.services()
        if not self._synced_logged:
            self._synced_logged = True
            log.info("Kubernetes: %d pods on this node and %d services in the selected "
                     "namespaces", len(pods), len(services))
        desired = compute(pods, services, config, self.settings.node_name,
                          self.registry.enabled_names())
        for key, why in desired.skipped:
            self._note(key, f"pod {key} not traced: {why}")
        owners = {name: self.reconciler.owner(name) for name in self.reconciler.applied}
        result = self.reconciler.apply(desired.targets)
        self._ifaces.retain(t.pod_ip for t in desired.targets.values())
        for key, overdue in self._waiting.update(result.unresolved, time.monotonic()):
            ip = desired.targets[key].pod_ip
            if not overdue:
                self._note(key, f"pod {key} ({ip}): no host-side veth found on this node yet; "
                                "retrying")
            else:
                self._note(key, f"pod {key} ({ip}): still no host-side veth after "
                                f"{UNRESOLVED_WARN:g}s; is its CNI one Clovisor supports? "
                                "(deploy/README.md, Which CNIs work)", logging.WARNING)
        quiet = {k for k, _ in desired.skipped} | set(result.unresolved)
        for key in list(self._noted):
            if key not in quiet:
                del self._noted[key]  # logged again if it comes back
        self._log(result, owners)
        self._traced = len(self.reconciler.applied)
        self._unresolved = len(result.unresolved)
        self._failed = bool(result.failed)
        self.health.set_ready(self.tracer.ready.is_set(), "classifier not loaded")

    def _apply_config(self, config: AgentConfig) -> None:
        if config.proto_cfg != self._proto_cfg:
            self.registry.apply(config.proto_cfg)
            self._proto_cfg = config.proto_cfg
        if config.jaeger != self._jaeger_seen:
            self._jaeger_seen = config.jaeger
            self._use_endpoint(config.jaeger)

    def _use_endpoint(self, redis: JaegerEndpoint | None) -> None:
        destination = self.settings.destination
        try:
            export = destination.config(redis)
            if export == self._export:
                return
            exporter = OtlpExporter(export)
        except Exception as exc:
            log.error("endpoint %s not used: %s; spans still go to %s",
                      redis, exc, self._export.describe())
            return
        old = self.tracer.swap_exporters([exporter])
        log.info("spans now go to %s (from %s), no longer to %s", export.describe(),
                 destination.source(redis), self._export.describe())
        self._export = export
        for e in old:
            # Flushing to an endpoint that may be gone must not hold up the loop.
            t = threading.Thread(target=_shutdown, args=(e,), name="exporter-retire", daemon=True)
            t.start()
            self._retiring.append(t)
        self._retiring = [t for t in self._retiring if t.is_alive()]

    def _note(self, key: str, line: str, level: int = logging.INFO) -> None:
        if self._noted.get(key) != line:
            self._noted[key] = line
            log.log(level, "%s", line)

    def _log(self, result: ReconcileResult, owners: dict[str, str | None]) -> None:
        applied = self.reconciler.applied
        for verb, names in (("tracing", result.attached), ("updated", result.updated)):
            for name in names:
                it = applied[name]
                ports = ", ".join(f"{p.port}/{self.registry.name_of(p.protocol)}"
                                  for p in it.ports) or "none"
                egress = ", ".join(f"{e.addr or '0'}:{e.port}" for e in it.egress) or "none"
                log.info("%s pod %s on %s: ports %s; egress %s",
                         verb, self.reconciler.owner(name), name, ports, egress)
        for name in result.detached:
            log.info("stopped tracing pod %s on %s", owners.get(name), name)

    def _namespaces(self) -> set[str]:
        return {rule.namespace for rule in self.redis.current().labels}

    def _on_plugin_message(self, name: str) -> None:
        self._reloads.append(name)
        self._wake.set()

    # -- start-up -------------------------------------------------------------------

    def _remove_leftovers(self) -> None:
        try:
            removed = cleanup()
        except KernelError as exc:
            log.warning("cannot remove hooks left by an earlier agent: %s", exc)
            return
        for what in removed:
            log.info("removed a hook left by an earlier agent: %s", what)


def _shutdown(exporter: Exporter) -> None:
    try:
        exporter.shutdown()
    except Exception as exc:
        log.error("shutting down %s failed: %s", type(exporter).__name__, exc)
