"""The agent's configuration in Redis: strict parsers and a polling source.

Keys (the original Clovisor's, ``shared/ORIGINAL.md``):

``clovisor_labels`` (list)
    ``<namespace>[:<label-key>:<label-value>]``: the pods to monitor; entries
    are OR-ed. Missing or empty (or no valid entry): namespace ``default``.
``clovisor_egress_match`` (list; the legacy spelling ``clovior_egress_match`` too)
    ``<IP>:<port>[:<pod name prefix>]``; IP ``0`` is any address,
    ``[v6]:port`` for IPv6.
``clovisor_jaeger_server`` (string)
    ``host[:port]`` of the OTLP/gRPC collector (port 4317 by default). While
    it is unset or unusable, the agent's own settings decide
    (:mod:`clovisor.agent.destination`).
``clovisor_proto_cfg`` (hash)
    protocol name -> parser reference (see :mod:`clovisor.agent.plugins`).
Channel ``clovisor_proto_plugin_cfg_chan``
    a message naming a protocol makes the agent reload that parser.

Redis values are untrusted configuration. Every entry is parsed strictly; a
bad one is logged with its value and skipped, and the rest applies. A key of
the wrong type, or a value that is not UTF-8, is logged and that key takes
its default. Lists and hashes are read up to :data:`MAX_ENTRIES` entries.
When Redis cannot be reached the last configuration read stays (the
defaults, if it was never reached).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.backoff
import redis.client
import redis.exceptions
import redis.retry

from ..specs import DNS_SUBDOMAIN, SpecError, check_namespace, parse_egress
from .model import (
    DEFAULT_LABELS,
    DEFAULT_REDIS,
    AgentConfig,
    EgressRule,
    JaegerEndpoint,
    LabelRule,
)
from .plugins import BUILTINS, check_protocol_name, check_reference

log = logging.getLogger(__name__)

DEFAULT_URL = DEFAULT_REDIS
DEFAULT_REDIS_PORT = 6379

KEY_LABELS = "clovisor_labels"
KEY_EGRESS = "clovisor_egress_match"
KEY_EGRESS_LEGACY = "clovior_egress_match"  # the original guide's spelling
KEY_JAEGER = "clovisor_jaeger_server"
KEY_PROTO_CFG = "clovisor_proto_cfg"
CHANNEL_PLUGINS = "clovisor_proto_plugin_cfg_chan"

MAX_ENTRIES = 1000  # per list or hash: more is a mistake (or an attack), not a config
MAX_ENTRY_LEN = 512  # longer than any valid entry (a label rule is at most ~450)

_QUALIFIED = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?")
_POD_PREFIX = re.compile(r"[a-z0-9][-a-z0-9.]*")

Raw = str | bytes
T = TypeVar("T")


def _show(value: object, limit: int = 120) -> str:
    """A Redis value for a log line: quoted and bounded (it may be huge or binary)."""
    if isinstance(value, bytes | str) and len(value) > limit:
        unit = "bytes" if isinstance(value, bytes) else "chars"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    return repr(value)


def _text(value: Raw) -> str:
    """A Redis value as text; raises SpecError naming it if it is not UTF-8 or too long."""
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError(f"{_show(value)} is not UTF-8") from None
    else:
        text = value
    if len(text) > MAX_ENTRY_LEN:
        raise SpecError(f"{_show(text)} is longer than {MAX_ENTRY_LEN} characters")
    return text.strip()


def _capped(key: str, values: Sequence[T], max_entries: int, errors: list[str]) -> Sequence[T]:
    if len(values) > max_entries:
        errors.append(
            f"{key}: {len(values)} entries, only the first {max_entries} are read"
        )
        return values[:max_entries]
    return values


def _dedup(items: Iterable[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(items))


# -- clovisor_labels -------------------------------------------------------------------------


def check_node_name(text: str) -> str:
    """A Kubernetes node name (a DNS-1123 subdomain): ``--node`` / ``MY_NODE_NAME``."""
    if not text or len(text) > 253 or not DNS_SUBDOMAIN.fullmatch(text):
        raise SpecError(f"node name {text!r} is not a valid DNS-1123 subdomain")
    return text


def check_label_key(text: str) -> str:
    """A Kubernetes label key: ``[prefix/]name``, the prefix a DNS subdomain."""
    prefix, slash, name = text.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not DNS_SUBDOMAIN.fullmatch(prefix)):
        raise SpecError(f"label key {text!r}: prefix {prefix!r} is not a DNS subdomain")
    if not name or len(name) > 63 or not _QUALIFIED.fullmatch(name):
        raise SpecError(
            f"label key {text!r} is not valid (at most 63 of A-Z a-z 0-9 - _ ., "
            "alphanumeric at both ends, optional DNS prefix/)"
        )
    return text


def check_label_value(text: str) -> str:
    """A Kubernetes label value (empty is valid: it matches a label set to "")."""
    if text and (len(text) > 63 or not _QUALIFIED.fullmatch(text)):
        raise SpecError(
            f"label value {text!r} is not valid (at most 63 of A-Z a-z 0-9 - _ ., "
            "alphanumeric at both ends)"
        )
    return text


def parse_label_rule(text: str) -> LabelRule:
    parts = text.split(":")
    if len(parts) == 1:
        return LabelRule(namespace=check_namespace(parts[0]))
    if len(parts) == 2:
        raise SpecError(
            f"{text!r}: a label key needs a value (<namespace>:<label-key>:<label-value>)"
        )
    if len(parts) > 3:
        raise SpecError(f"{text!r}: expected <namespace>[:<label-key>:<label-value>]")
    ns, key, value = parts
    return LabelRule(
        namespace=check_namespace(ns), key=check_label_key(key), value=check_label_value(value)
    )


def parse_labels(
    values: Sequence[Raw] | None, *, max_entries: int = MAX_ENTRIES
) -> tuple[tuple[LabelRule, ...], list[str]]:
    """``clovisor_labels`` entries -> (rules, one error line per skipped entry).

    No valid entry at all (missing, empty, or every entry bad) gives
    :data:`DEFAULT_LABELS`, the namespace ``default``.
    """
    errors: list[str] = []
    rules: list[LabelRule] = []
    for raw in _capped(KEY_LABELS, values or (), max_entries, errors):
        try:
            rules.append(parse_label_rule(_text(raw)))
        except SpecError as exc:
            errors.append(f"{KEY_LABELS}: entry {_show(raw)} skipped: {exc}")
    if not rules:
        if errors:
            errors.append(f"{KEY_LABELS}: no valid entry, monitoring namespace 'default'")
        return DEFAULT_LABELS, errors
    return _dedup(rules), errors


# -- clovisor_egress_match ------------------------------------------------------------------


def parse_egress_rule(text: str) -> EgressRule:
    spec = parse_egress(text, allow_prefix=True)
    prefix = spec.pod_prefix
    if prefix and (len(prefix) > 253 or not _POD_PREFIX.fullmatch(prefix)):
        raise SpecError(
            f"egress {text!r}: pod name prefix {prefix!r} is not valid "
            "(a-z 0-9 - ., starting alphanumeric)"
        )
    return EgressRule(addr=spec.addr, port=spec.port, pod_prefix=prefix)


def parse_egress_matches(
    values: Sequence[Raw] | None, *, key: str = KEY_EGRESS, max_entries: int = MAX_ENTRIES
) -> tuple[tuple[EgressRule, ...], list[str]]:
    """``clovisor_egress_match`` entries -> (rules, one error line per skipped entry)."""
    errors: list[str] = []
    rules: list[EgressRule] = []
    for raw in _capped(key, values or (), max_entries, errors):
        try:
            rules.append(parse_egress_rule(_text(raw)))
        except SpecError as exc:
            errors.append(f"{key}: entry {_show(raw)} skipped: {exc}")
    return _dedup(rules), errors


# -- clovisor_jaeger_server -----------------------------------------------------------------


def check_hostname(text: str) -> str:
    """An IP address or a DNS name (RFC 1123 labels, trailing dot allowed)."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(_HOST_LABEL.fullmatch(label) for label in labels)
        # 300.1.2.3 is a bad address, not a host name
        or all(label.isdigit() for label in labels)
    ):
        raise SpecError(f"{text!r} is not a valid host name or IP address")
    return text


def parse_jaeger(value: Raw | None, default: JaegerEndpoint | None = None) -> JaegerEndpoint:
    """``host[:port]`` (``[v6]:port``, port 4317 when not given); None or
    empty: ``default`` (``jaeger-collector.clovisor:4317`` unless given).

    Raises :class:`SpecError` naming the value if it does not parse.
    """
    default = default or JaegerEndpoint()
    if value is None:
        return default
    text = _text(value)
    if not text:
        return default
    if "://" in text:
        raise SpecError(f"jaeger server {text!r}: expected host[:port], not a URL")
    port_s = ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise SpecError(f"jaeger server {text!r}: expected [IPv6]:port")
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise SpecError(f"jaeger server {text!r}: {host!r} is not an IPv6 address") from None
        port_s = rest[1:]
        if rest and not port_s:
            raise SpecError(f"jaeger server {text!r}: empty port")
    elif text.count(":") > 1:
        # A bare IPv6 address: without brackets there is no room for a port.
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise SpecError(
                f"jaeger server {text!r}: expected host[:port] ([IPv6]:port for IPv6)"
            ) from None
        host = text
    else:
        host, sep, port_s = text.partition(":")
        if sep and not port_s:
            raise SpecError(f"jaeger server {text!r}: empty port")
    try:
        check_hostname(host)
        port = _port(port_s) if port_s else JaegerEndpoint().port
    except SpecError as exc:
        raise SpecError(f"jaeger server {text!r}: {exc}") from None
    return JaegerEndpoint(host=host, port=port)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise SpecError(f"port {text!r} is not a number in 1-65535")
    return int(text)


# -- clovisor_proto_cfg ---------------------------------------------------------------------


def parse_proto_cfg(
    mapping: Mapping[bytes, bytes] | Mapping[str, str] | None, *, max_entries: int = MAX_ENTRIES
) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """``clovisor_proto_cfg`` (protocol name -> parser reference), sorted by name.

    Names are compared lower-case. A reference is only checked here for its
    form (no paths, nothing outside ``clovisor.parsers``); whether it is
    installed is :class:`~clovisor.agent.plugins.ParserRegistry`'s business.
    The built-in protocols cannot be replaced.
    """
    errors: list[str] = []
    out: dict[str, str] = {}
    pairs: list[tuple[Raw, Raw]] = list((mapping or {}).items())
    items = _capped(KEY_PROTO_CFG, pairs, max_entries, errors)
    for raw_name, raw_ref in items:
        try:
            name = check_protocol_name(_text(raw_name).lower())
            if name in BUILTINS:
                raise SpecError(f"{name!r} is a built-in protocol and cannot be replaced")
            reference = check_reference(_text(raw_ref))
        except SpecError as exc:
            errors.append(
                f"{KEY_PROTO_CFG}: entry {_show(raw_name)} -> {_show(raw_ref)} skipped: {exc}"
            )
            continue
        out[name] = reference
    return tuple(sorted(out.items())), errors


# -- all keys --------------------------------------------------------------------------------


class WrongType:
    """A key that exists with another Redis type than expected."""

    __slots__ = ("detail",)

    def __init__(self, detail: str = "") -> None:
        self.detail = detail

    def __repr__(self) -> str:
        return f"WrongType({self.detail!r})"


KeyValue = list[bytes] | dict[bytes, bytes] | bytes | WrongType | None


def build_config(
    values: Mapping[str, KeyValue],
    lengths: Mapping[str, int] | None = None,
    *,
    max_entries: int = MAX_ENTRIES,
) -> tuple[AgentConfig, list[str]]:
    """One read of the keys -> (configuration, one line per problem).

    ``values`` maps each key to what Redis returned (None: missing,
    :class:`WrongType`: another type); ``lengths`` gives the real size of
    lists and hashes that were read only up to ``max_entries``. The
    configuration's ``jaeger`` is None while the key is unset or unusable.
    """
    errors: list[str] = []
    lengths = lengths or {}

    def listed(key: str, expected: str) -> list[bytes] | dict[bytes, bytes] | None:
        value = values.get(key)
        if isinstance(value, WrongType) or (
            value is not None
            and not isinstance(value, list if expected == "list" else dict)
        ):
            errors.append(f"{key} is not a Redis {expected}; using its default")
            return None
        total = lengths.get(key, 0)
        if value is not None and total > len(value) and total > max_entries:
            errors.append(f"{key}: {total} entries, only the first {max_entries} are read")
        return value

    labels_raw = listed(KEY_LABELS, "list")
    labels, errs = parse_labels(labels_raw if isinstance(labels_raw, list) else None,
                                max_entries=max_entries)
    errors += errs

    egress: list[EgressRule] = []
    for key in (KEY_EGRESS, KEY_EGRESS_LEGACY):
        raw = listed(key, "list")
        rules, errs = parse_egress_matches(
            raw if isinstance(raw, list) else None, key=key, max_entries=max_entries
        )
        egress += rules
        errors += errs

    jaeger: JaegerEndpoint | None = None
    ignored = "spans go where the agent's own settings say"
    jaeger_raw = values.get(KEY_JAEGER)
    if isinstance(jaeger_raw, WrongType | list | dict):
        errors.append(f"{KEY_JAEGER} is not a Redis string; {ignored}")
    elif jaeger_raw is not None:
        if lengths.get(KEY_JAEGER, 0) > len(jaeger_raw):
            errors.append(
                f"{KEY_JAEGER}: {lengths[KEY_JAEGER]} bytes is no host[:port]; {ignored}"
            )
        else:
            try:
                text = _text(jaeger_raw)
                jaeger = parse_jaeger(text) if text else None
            except SpecError as exc:
                errors.append(f"{KEY_JAEGER} skipped: {exc}; {ignored}")

    proto_raw = listed(KEY_PROTO_CFG, "hash")
    proto_cfg, errs = parse_proto_cfg(
        proto_raw if isinstance(proto_raw, dict) else None, max_entries=max_entries
    )
    errors += errs

    config = AgentConfig(labels=labels, egress=_dedup(egress), jaeger=jaeger, proto_cfg=proto_cfg)
    return config, errors


# -- where Redis is --------------------------------------------------------------------------


def redis_url(text: str) -> str:
    """``host[:port]``, ``[v6]:port`` or a ``redis://``/``rediss://``/``unix://`` URL -> URL."""
    text = text.strip()
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise SpecError(f"redis {_show(text)}: scheme must be redis, rediss or unix")
        return text
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise SpecError(f"redis {text!r}: expected [IPv6]:port")
        port_s = rest[1:] if rest else ""
        hostpart = f"[{host}]"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SpecError(f"redis {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, _sep, port_s = text.partition(":")
        hostpart = host
        try:
            check_hostname(host)
        except SpecError as exc:
            raise SpecError(f"redis {text!r}: {exc}") from None
    try:
        port = _port(port_s) if port_s else DEFAULT_REDIS_PORT
    except SpecError as exc:
        raise SpecError(f"redis {text!r}: {exc}") from None
    return f"redis://{hostpart}:{port}/0"


def display_url(url: str) -> str:
    """The URL without its credentials (for log lines)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, "***@" + netloc, parts.path, parts.query, parts.fragment))


# -- the source ------------------------------------------------------------------------------


class _RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds (pub/sub garbage must not flood logs)."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        self.burst, self.period = burst, period
        self.window_start = -period
        self.count = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.window_start >= self.period:
            if self.suppressed:
                log.warning("%d more such messages were not logged", self.suppressed)
            self.window_start, self.count, self.suppressed = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            log.warning(msg, *args)
        else:
            self.suppressed += 1


class RedisConfigSource:
    """Reads the configuration keys every ``poll_interval`` seconds, in a thread.

    ``on_change(config)`` is called from that thread once at start (with the
    configuration Redis holds, or the defaults if Redis cannot be reached),
    then whenever the parsed configuration changes. When Redis goes away the
    last configuration read stays; the source retries with backoff and logs
    the outage once. ``on_plugin_message(name)`` is called for each valid
    protocol name published on ``clovisor_proto_plugin_cfg_chan`` (several
    messages naming the same protocol at once make one call).

    ``password`` authenticates when the URL carries none.

    Callback exceptions are logged; they never stop the source.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        on_change: Callable[[AgentConfig], None] | None = None,
        *,
        poll_interval: float = 1.0,
        on_plugin_message: Callable[[str], None] | None = None,
        max_entries: int = MAX_ENTRIES,
        max_backoff: float = 10.0,
        timeout: float = 2.0,
        health_check_interval: int = 30,
        password: str | None = None,
    ) -> None:
        self.url = redis_url(url)
        # From CLOVISOR_REDIS_PASSWORD (a Kubernetes Secret): kept out of
        # the URL, which is logged without credentials but shown in ps.
        auth = {"password": password} if password else {}
        self.display = display_url(self.url)
        self._on_change = on_change
        self._on_plugin_message = on_plugin_message
        self.poll_interval = poll_interval
        self.max_entries = max_entries
        self.max_backoff = max_backoff
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                self.url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # Our own loop retries with backoff; redis-py's retries would
                # only stretch each failed poll.
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
                # Notices a pub/sub connection that died silently (NAT, conntrack).
                health_check_interval=health_check_interval,
                **auth,
            )
        except ValueError as exc:
            raise SpecError(f"redis {self.display}: {exc}") from None
        self._pubsub: redis.client.PubSub | None = None
        self._subscribe_denied = False
        self._lock = threading.Lock()
        self._config = AgentConfig()
        self._applied = False
        self._connected = False
        self._ever_connected = False
        self._outage_logged = False
        self._problems: tuple[str, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._garbage_log = _RateLimitedLog()

    # -- public ---------------------------------------------------------------------

    def current(self) -> AgentConfig:
        with self._lock:
            return self._config

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def problems(self) -> tuple[str, ...]:
        """What was wrong with the values last read (one line each)."""
        return self._problems

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="clovisor-redis", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        self._close_pubsub()
        self._client.close()

    def __enter__(self) -> RedisConfigSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self._pubsub is None and not self._subscribe_denied:
                    self._subscribe()
                # Subscribed before reading: a change made between the two
                # is seen by the read, a message by the subscription.
                self._poll()
                failures = 0
                self._wait_for_messages(self.poll_interval)
            except (redis.exceptions.RedisError, OSError) as exc:
                failures += 1
                self._subscribe_denied = False  # an outage may come with new ACLs
                self._unreachable(exc)
                self._close_pubsub()
                delay = min(self.max_backoff, self.poll_interval * 2 ** min(failures - 1, 16))
                self._stop.wait(delay * random.uniform(0.5, 1.0))  # jitter: nodes retry apart
            except Exception:
                # A bug of ours must not end configuration for the agent's lifetime.
                log.exception("redis configuration source: unexpected error")
                self._close_pubsub()
                self._stop.wait(self.max_backoff)

    def _subscribe(self) -> None:
        pubsub: redis.client.PubSub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CHANNEL_PLUGINS)
        except redis.exceptions.ResponseError as exc:
            # An ACL that allows reading the keys but not the channel: the
            # configuration still works, only reload messages are lost.
            pubsub.close()
            self._subscribe_denied = True
            log.warning(
                "redis %s: cannot subscribe to %s (%s): plugin reload messages will not be seen",
                self.display, CHANNEL_PLUGINS, _error_text(exc),
            )
            return
        except BaseException:
            pubsub.close()
            raise
        self._pubsub = pubsub

    def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            # It is being thrown away because its connection failed.
            with contextlib.suppress(Exception):
                pubsub.close()

    def _wait_for_messages(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            pubsub = self._pubsub
            if pubsub is None:
                self._stop.wait(remaining)
                return
            # Short slices keep stop() prompt without a wake-up socket.
            msg = pubsub.get_message(timeout=min(0.1, remaining))
            if msg is None:
                continue
            names: list[str] = []
            for _ in range(100):  # drain what arrived together, bounded
                name = self._plugin_name(msg)
                if name is not None and name not in names:
                    names.append(name)
                msg = pubsub.get_message(timeout=0)
                if msg is None:
                    break
            for name in names:
                self._call(self._on_plugin_message, name)

    def _plugin_name(self, msg: Mapping[str, object]) -> str | None:
        if msg.get("type") != "message":
            return None
        data = msg.get("data")
        try:
            if not isinstance(data, bytes | str):
                raise SpecError(f"{_show(data)} is not a string")
            return check_protocol_name(_text(data).lower())
        except SpecError as exc:
            self._garbage_log.warning(
                "%s: message %s ignored: %s", CHANNEL_PLUGINS, _show(data), exc
            )
            return None

    def _poll(self) -> None:
        values, lengths = self._read()
        config, problems = build_config(
            values, lengths, max_entries=self.max_entries
        )
        if not self._connected:
            if self._ever_connected:
                log.info("redis %s reachable again", self.display)
            else:
                log.info("redis %s reachable: reading the configuration", self.display)
            self._connected = self._ever_connected = True
            self._outage_logged = False
        if tuple(problems) != self._problems:
            # Logged when they change, not on every poll.
            for line in problems:
                log.warning("redis config: %s", line)
            self._problems = tuple(problems)
        self._apply(config)

    def _read(self) -> tuple[dict[str, KeyValue], dict[str, int]]:
        """Every key in one round trip (more only for a hash too big for one HSCAN)."""
        cap = self.max_entries
        # MULTI/EXEC: one consistent snapshot even while someone edits several keys.
        pipe = self._client.pipeline(transaction=True)
        for key in (KEY_LABELS, KEY_EGRESS, KEY_EGRESS_LEGACY):
            pipe.lrange(key, 0, cap - 1)
            pipe.llen(key)
        # GETRANGE, not GET: a huge string must not cross the network every second.
        pipe.getrange(KEY_JAEGER, 0, MAX_ENTRY_LEN)
        pipe.strlen(KEY_JAEGER)
        pipe.hlen(KEY_PROTO_CFG)
        pipe.hscan(KEY_PROTO_CFG, 0, count=cap)
        results = pipe.execute(raise_on_error=False)

        values: dict[str, KeyValue] = {}
        lengths: dict[str, int] = {}
        for i, key in enumerate((KEY_LABELS, KEY_EGRESS, KEY_EGRESS_LEGACY)):
            items, total = results[2 * i], results[2 * i + 1]
            if _wrong_type(items) or _wrong_type(total):
                values[key] = WrongType(str(items))
                continue
            lengths[key] = int(total)
            values[key] = list(items) if total else None
        jaeger, strlen = results[6], results[7]
        if _wrong_type(jaeger) or _wrong_type(strlen):
            values[KEY_JAEGER] = WrongType(str(jaeger))
        else:
            lengths[KEY_JAEGER] = int(strlen)
            values[KEY_JAEGER] = bytes(jaeger) if strlen else None
        hlen, scanned = results[8], results[9]
        if _wrong_type(hlen) or _wrong_type(scanned):
            values[KEY_PROTO_CFG] = WrongType(str(hlen))
        else:
            lengths[KEY_PROTO_CFG] = int(hlen)
            cursor, fields = scanned
            entries: dict[bytes, bytes] = dict(fields)
            while int(cursor) != 0 and len(entries) < cap:
                # Only a hash too big for one HSCAN reply gets here.
                cursor, more = self._client.hscan(KEY_PROTO_CFG, cursor, count=cap)
                entries.update(cast("dict[bytes, bytes]", more))
            values[KEY_PROTO_CFG] = dict(list(entries.items())[:cap]) if hlen else None
        return values, lengths

    def _apply(self, config: AgentConfig) -> None:
        with self._lock:
            if self._applied and config == self._config:
                return
            self._config = config
            self._applied = True
        log.info(
            "configuration: labels %s; egress %s; jaeger %s; protocols %s",
            _some(_label_text(r) for r in config.labels),
            _some(_egress_text(r) for r in config.egress) or "none",
            config.jaeger or "unset",
            _some(f"{n}={r}" for n, r in config.proto_cfg) or "built-in only",
        )
        self._call(self._on_change, config)

    def _unreachable(self, exc: BaseException) -> None:
        self._connected = False
        if not self._outage_logged:
            self._outage_logged = True
            if self._ever_connected:
                log.warning(
                    "redis %s cannot be read (%s): keeping the last configuration, retrying",
                    self.display, _error_text(exc),
                )
            else:
                log.warning(
                    "redis %s cannot be read (%s): using the defaults until it answers, retrying",
                    self.display, _error_text(exc),
                )
        else:
            log.debug("redis %s still unreachable: %s", self.display, _error_text(exc))
        if not self._applied:
            self._apply(AgentConfig())

    def _call(self, callback: Callable[[T], None] | None, arg: T) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception:
            log.exception("redis configuration callback %r failed", callback)


def _wrong_type(result: object) -> bool:
    if isinstance(result, redis.exceptions.ResponseError):
        if str(result).startswith("WRONGTYPE"):
            return True
        # NOAUTH, NOPERM, LOADING...: the keys cannot be read now; that is an
        # outage (last configuration stays), not an empty configuration.
        raise result
    return False


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _some(items: Iterable[str], limit: int = 20) -> str:
    """The first few items, comma-separated: a 1,000-entry list is not a log line."""
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _label_text(rule: LabelRule) -> str:
    return f"{rule.namespace}:{rule.key}:{rule.value}" if rule.key else rule.namespace


def _egress_text(rule: EgressRule) -> str:
    addr = "0" if rule.addr is None else (
        f"[{rule.addr}]" if rule.addr.version == 6 else str(rule.addr)
    )
    return f"{addr}:{rule.port}" + (f":{rule.pod_prefix}" if rule.pod_prefix else "")
