"""Where the agent's spans go, and how: the endpoint's precedence and the OTLP settings.

The endpoint is the first of:

1. Redis ``clovisor_jaeger_server`` (``host[:port]``, OTLP/gRPC), when it
   names one: the original Clovisor's contract, changeable at run time;
2. ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``,
   with the protocol of ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` (``grpc``
   or ``http/protobuf``, the default, as the OpenTelemetry specification and
   ``clovisor trace --output otlp`` have it);
3. ``--jaeger`` / ``CLOVISOR_JAEGER`` (``host[:port]``, OTLP/gRPC);
4. ``jaeger-collector.clovisor:4317`` (OTLP/gRPC).

The other ``OTEL_EXPORTER_OTLP_*`` settings (headers, TLS files,
compression, timeout) apply to whichever endpoint is in use. A
``host[:port]`` endpoint is plaintext unless TLS is asked for (see
:func:`~clovisor.export.otlp_config.grpc_host_config`). Everything is
checked once, at start-up, so a bad variable stops the agent before it
loads anything; afterwards only Redis changes the answer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..export.otlp_config import OtlpConfig, env_setting, grpc_host_config, resolve_config
from .model import JaegerEndpoint

__all__ = ["Destination"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """The agent's export settings; :meth:`config` gives the endpoint for what Redis says."""

    fallback: JaegerEndpoint = field(default_factory=JaegerEndpoint)  # --jaeger, or the default
    from_env: OtlpConfig | None = None  # the OTEL_* endpoint, when one is set
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environment(
        cls, fallback: JaegerEndpoint | None = None, environ: Mapping[str, str] | None = None
    ) -> Destination:
        """Read and check the ``OTEL_EXPORTER_OTLP_*`` variables of ``environ``
        (default: the process environment).

        Raises :class:`~clovisor.export.ExporterConfigError` naming a bad one.
        """
        env = {k: v for k, v in (os.environ if environ is None else environ).items()
               if k.startswith("OTEL_EXPORTER_OTLP_")}
        # Every variable is checked now, whichever endpoint ends up in use.
        configured = resolve_config("otlp", "", env)
        fallback = fallback or JaegerEndpoint()
        grpc_host_config(fallback.host, fallback.port, env)
        from_env = configured if env_setting(env, "ENDPOINT") else None
        return cls(fallback=fallback, from_env=from_env, environ=env)

    def config(self, redis: JaegerEndpoint | None = None) -> OtlpConfig:
        """Where spans go while Redis names ``redis`` (None: it names none)."""
        if redis is not None:
            return grpc_host_config(redis.host, redis.port, self.environ)
        if self.from_env is not None:
            return self.from_env
        return grpc_host_config(self.fallback.host, self.fallback.port, self.environ)

    def source(self, redis: JaegerEndpoint | None = None) -> str:
        """What chose the endpoint :meth:`config` gives, for log lines."""
        if redis is not None:
            return "Redis clovisor_jaeger_server"
        if self.from_env is not None:
            setting = env_setting(self.environ, "ENDPOINT")
            return setting[0] if setting else "OTEL_EXPORTER_OTLP_ENDPOINT"
        return "--jaeger or CLOVISOR_JAEGER" if self.fallback != JaegerEndpoint() else "the default"
