"""
ctrlgw's configuration: ini files parsed into typed, frozen objects.

Every key has one declaration here (its parser and its default); C{etc/ctrlgw.ini}
documents each of them.  Anything the file gets wrong -- an unknown section or key, a value
of the wrong type or out of range -- raises L{ConfigError}, whose message is one line naming
the file, the section and the key.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from ctrlgw.framing import FramingOptionError, IFraming, findFraming


class ConfigError(Exception):
    """
    The configuration cannot be used.  C{str()} is one line naming file, section and key.
    """

    def __init__(self, source: str, section: str | None, key: str | None, problem: str) -> None:
        self.source = source
        self.section = section
        self.key = key
        self.problem = problem
        where = source
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {problem}")


# --- value parsers: each takes the raw string and raises ValueError("expected ...") ---

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parseDuration(raw: str) -> float:
    """
    Parse C{500ms}, C{15s}, C{2m}, C{1h}, C{7d} or a bare number of seconds into seconds.
    """
    match = _DURATION.match(raw)
    if match is None:
        raise ValueError(f"expected a duration such as 500ms, 15s, 2m or 1h, got {raw!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parseInt(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None


def parseFloat(raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None


def parseBool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected yes or no, got {raw!r}")


def parseText(raw: str) -> str:
    return raw.strip()


def oneOf(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def inRange(
    parse: Callable[[str], Any], low: float | None = None, high: float | None = None
) -> Callable[[str], Any]:
    def parseBounded(raw: str) -> Any:
        value = parse(raw)
        if low is not None and value < low:
            raise ValueError(f"must be at least {low:g}, got {raw.strip()!r}")
        if high is not None and value > high:
            raise ValueError(f"must be at most {high:g}, got {raw.strip()!r}")
        return value

    return parseBounded


def partitionHours(raw: str) -> int:
    """
    Hours per time partition: a divisor of 24, so partitions align on days.
    """
    value = parseInt(raw)
    if value not in (1, 2, 3, 4, 6, 8, 12, 24):
        raise ValueError(f"expected a divisor of 24 (1, 2, 3, 4, 6, 8, 12, 24), got {raw.strip()!r}")
    return value


def orInherit(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    C{parse}, or C{None} for an empty value: the setting is inherited.
    """

    def parseOptional(raw: str) -> Any:
        return None if not raw.strip() else parse(raw)

    return parseOptional


def parseNames(raw: str) -> tuple[str, ...]:
    """
    A comma-separated list of names, in order, without repeats.
    """
    names = [name.strip() for name in raw.split(",") if name.strip()]
    return tuple(dict.fromkeys(names))


_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9._:-]{0,64}$")

# PostgreSQL truncates (and NOTIFY refuses) identifiers longer than this many bytes.
_MAX_IDENTIFIER_BYTES = 63
# The longest suffix the schema's NOTIFY channels add (ctrlgw.cluster, ctrlgw.outbox).
_LONGEST_CHANNEL_SUFFIX = "_takeover"
MAX_SCHEMA_BYTES = _MAX_IDENTIFIER_BYTES - len(_LONGEST_CHANNEL_SUFFIX)


def parseIdentifier(raw: str) -> str:
    value = raw.strip()
    if not _IDENTIFIER.match(value):
        raise ValueError(f"expected a lower-case SQL identifier ([a-z_][a-z0-9_]*), got {raw!r}")
    return value


def parseSchema(raw: str) -> str:
    """
    A schema name short enough that its NOTIFY channels (C{<schema>_takeover},
    C{<schema>_commands}, C{<schema>_results}) fit PostgreSQL's 63-byte identifiers.
    """
    value = parseIdentifier(raw)
    size = len(value.encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(
            f"must be at most {MAX_SCHEMA_BYTES} bytes, or its NOTIFY channel"
            f" {value}{_LONGEST_CHANNEL_SUFFIX} exceeds PostgreSQL's"
            f" {_MAX_IDENTIFIER_BYTES}-byte limit; got {size} bytes"
        )
    return value


def parseInstanceId(raw: str) -> str:
    value = raw.strip()
    if not _INSTANCE_ID.match(value):
        raise ValueError(f"expected up to 64 characters of [A-Za-z0-9._:-], got {raw!r}")
    return value


# --- the declarations ---


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[str], Any]
    default: str


_SECTIONS: dict[str, tuple[Key, ...]] = {
    "gateway": (
        Key("instance_id", parseInstanceId, ""),
        Key("gc_full_interval", inRange(parseDuration, 0, 86400), "10m"),
    ),
    "liveness": (
        Key("hello_timeout", inRange(parseDuration, 0.1, 3600), "10s"),
        Key("ping_interval", inRange(parseDuration, 0.1, 3600), "30s"),
        Key("idle_timeout", inRange(parseDuration, 0.2, 86400), "90s"),
        Key("close_grace", inRange(parseDuration, 0, 60), "1s"),
        Key("keepalive", parseBool, "yes"),
        Key("keepalive_idle", inRange(parseDuration, 1, 86400), "60s"),
        Key("keepalive_interval", inRange(parseDuration, 1, 3600), "10s"),
        Key("keepalive_count", inRange(parseInt, 1, 127), "5"),
        Key("user_timeout", inRange(parseDuration, 0, 3600), "30s"),
        Key("nodelay", parseBool, "yes"),
    ),
    "timestamps": (
        Key("max_age", inRange(parseDuration, 0.001, 7 * 86400), "5m"),
        Key("max_future", inRange(parseDuration, 0, 86400), "30s"),
        Key("max_instance_skew", inRange(parseDuration, 0.001, 3600), "2s"),
        Key("clock_check_interval", inRange(parseDuration, 0.1, 3600), "30s"),
    ),
    "http": (
        Key("endpoint", parseText, "tcp:8080:interface=127.0.0.1"),
        Key("api_token", parseText, ""),
    ),
    "shutdown": (
        Key("bye_batch", inRange(parseInt, 1, 1_000_000), "500"),
        Key("bye_interval", inRange(parseDuration, 0, 60), "100ms"),
        Key("drain_timeout", inRange(parseDuration, 0, 300), "10s"),
    ),
    "database": (
        Key("dsn", parseText, ""),
        Key("data_dir", parseText, "var/pgdata"),
        Key("schema", parseSchema, "ctrlgw"),
        Key("migrate", oneOf("auto", "off"), "auto"),
        Key("pool_size", inRange(parseInt, 1, 100), "4"),
        Key("connect_timeout", inRange(parseDuration, 0.1, 300), "5s"),
        Key("statement_timeout", inRange(parseDuration, 0.01, 3600), "10s"),
        Key("idle_in_transaction_timeout", inRange(parseDuration, 0.1, 3600), "30s"),
        Key("reconnect_max_delay", inRange(parseDuration, 0.1, 300), "10s"),
        Key("max_waiting", inRange(parseInt, 1, 1_000_000), "10000"),
    ),
    "inbox": (
        Key("batch_size", inRange(parseInt, 1, 10_000), "2000"),
        Key("flush_interval", inRange(parseDuration, 0, 10), "5ms"),
        Key("max_buffered", inRange(parseInt, 1, 10_000_000), "10000"),
        Key("writers", inRange(parseInt, 1, 16), "2"),
        Key("max_unacked_per_connection", inRange(parseInt, 2, 1_000_000), "1000"),
    ),
    "auth": (
        Key("mode", oneOf("none", "token"), "none"),
        Key("max_failures", inRange(parseInt, 1, 1_000_000), "5"),
        Key("failure_window", inRange(parseDuration, 1, 86400), "60s"),
    ),
    "cluster": (
        Key("instance_ttl", inRange(parseDuration, 1, 3600), "30s"),
        Key("heartbeat_interval", inRange(parseDuration, 0.1, 600), "10s"),
        Key("reconcile_interval", inRange(parseDuration, 0.1, 3600), "15s"),
        Key("full_reconcile_interval", inRange(parseDuration, 1, 86400), "5m"),
        Key("flap_policy", oneOf("refuse", "log"), "refuse"),
        Key("flap_threshold", inRange(parseInt, 2, 1000), "6"),
        Key("flap_window", inRange(parseDuration, 1, 86400), "60s"),
        Key("flap_cooldown", inRange(parseDuration, 1, 86400), "2m"),
    ),
    "outbox": (
        Key("poll_interval", inRange(parseDuration, 0.01, 3600), "1s"),
        Key("max_inflight", inRange(parseInt, 1, 1000), "1"),
        Key("ack_timeout", inRange(parseDuration, 0.01, 3600), "10s"),
        Key("max_attempts", inRange(parseInt, 1, 100), "3"),
        Key("backoff", inRange(parseFloat, 1, 10), "2"),
        Key("claim_batch", inRange(parseInt, 1, 10_000), "500"),
        Key("default_ttl", inRange(parseDuration, 0.01, 30 * 86400), "30s"),
    ),
    "retention": (
        Key("events_days", inRange(parseInt, 1, 36500), "30"),
        Key("commands_days", inRange(parseInt, 1, 36500), "7"),
        Key("inbox_days", inRange(parseInt, 1, 36500), "30"),
        Key("prune_interval", inRange(parseDuration, 1, 86400), "1h"),
        Key("prune_batch", inRange(parseInt, 1, 1_000_000), "5000"),
        # Time partitions of inbox and events (docs/scaling.md).
        Key("partition_hours", partitionHours, "24"),
        Key("partitions_ahead", inRange(parseInt, 1, 366), "3"),
    ),
    # The application stream (docs/consuming.md).
    "stream": (
        Key("max_entries", inRange(parseInt, 1000, 1_000_000_000), "1000000"),
        Key("keep", inRange(parseDuration, 0, 30 * 86400), "1h"),
        Key("retain_interval", inRange(parseDuration, 0.1, 86400), "10s"),
        Key("lease", inRange(parseDuration, 0.1, 3600), "30s"),
        Key("heartbeat", inRange(parseDuration, 0.1, 3600), "15s"),
    ),
}

_LISTENER_PREFIX = "listener:"
_LISTENER_KEYS: tuple[Key, ...] = (
    Key("endpoint", parseText, ""),
    Key("dialect", parseText, "v1"),
    # A dialect that brings its own framing ignores the default.
    Key("framing", parseText, "lines"),
    # The gateway's own frames must always fit: an ack or error echoes an id of up to
    # 128 characters (512 bytes of UTF-8).
    Key("max_frame", inRange(parseInt, 1024, 16 * 1024 * 1024), "65536"),
    # 0: unlimited.  The default leaves 1000 descriptors of a 20000 ulimit -n for the rest.
    Key("max_connections", inRange(parseInt, 0, 1_000_000), "19000"),
    # Empty: [timestamps] max_age and max_future.
    Key("max_age", orInherit(inRange(parseDuration, 0.001, 3650 * 86400)), ""),
    Key("max_future", orInherit(inRange(parseDuration, 0, 3650 * 86400)), ""),
    # Empty: [auth] mode and [liveness] idle_timeout.
    Key("auth", orInherit(oneOf("none", "token", "registered")), ""),
    Key("idle_timeout", orInherit(inRange(parseDuration, 0.2, 86400)), ""),
)


def sectionKeys() -> Mapping[str, tuple[Key, ...]]:
    """
    Every fixed section and its keys, for documentation and tests; a listener's include
    the keys of every built-in dialect.
    """
    from ctrlgw.dialects import builtinDialects

    dialectKeys = tuple(key for dialect in builtinDialects() for key in dialect.keys)
    return dict(_SECTIONS, **{_LISTENER_PREFIX + "NAME": _LISTENER_KEYS + dialectKeys})


# --- the typed result ---


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    endpoint: str
    framing: str
    max_frame: int
    max_connections: int
    # None: the framing is the dialect's own business (it implies one).
    makeFraming: Callable[[], IFraming] | None = field(compare=False, repr=False)
    dialect: str = "v1"
    # None: as in [timestamps].
    max_age: float | None = None
    max_future: float | None = None
    # None: as in [auth] and [liveness].
    auth: str | None = None
    idle_timeout: float | None = None
    # The values of the dialect's own keys.
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def timestampPolicy(self, defaults: TimestampConfig) -> TimestampConfig:
        """
        This listener's timestamp policy: its own max_age and max_future where set.  One
        object per policy, which every connection under it shares: it was made anew for
        each (2% of the gateway's time in a connect storm, and one more object per
        connection).
        """
        return _timestampPolicy(defaults, self.max_age, self.max_future)

    def livenessPolicy(self, defaults: LivenessConfig) -> LivenessConfig:
        """
        This listener's liveness: its own idle_timeout where set.
        """
        if self.idle_timeout is None:
            return defaults
        return replace(defaults, idle_timeout=self.idle_timeout)


@dataclass(frozen=True)
class LivenessConfig:
    hello_timeout: float
    ping_interval: float
    idle_timeout: float
    close_grace: float
    keepalive: bool
    keepalive_idle: float
    keepalive_interval: float
    keepalive_count: int
    user_timeout: float
    nodelay: bool


@dataclass(frozen=True)
class TimestampConfig:
    max_age: float
    max_future: float
    max_instance_skew: float
    clock_check_interval: float


@lru_cache(maxsize=64)
def _timestampPolicy(
    defaults: TimestampConfig, maxAge: float | None, maxFuture: float | None
) -> TimestampConfig:
    return replace(
        defaults,
        max_age=defaults.max_age if maxAge is None else maxAge,
        max_future=defaults.max_future if maxFuture is None else maxFuture,
    )


@dataclass(frozen=True)
class HttpConfig:
    endpoint: str
    api_token: str


@dataclass(frozen=True)
class ShutdownConfig:
    bye_batch: int
    bye_interval: float
    drain_timeout: float


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str
    data_dir: str
    schema: str
    migrate: str
    pool_size: int
    connect_timeout: float
    statement_timeout: float
    idle_in_transaction_timeout: float
    reconnect_max_delay: float
    max_waiting: int


@dataclass(frozen=True)
class InboxConfig:
    batch_size: int
    flush_interval: float
    max_buffered: int
    writers: int
    max_unacked_per_connection: int


@dataclass(frozen=True)
class AuthConfig:
    mode: str
    max_failures: int
    failure_window: float


@dataclass(frozen=True)
class ClusterConfig:
    instance_ttl: float
    heartbeat_interval: float
    reconcile_interval: float
    full_reconcile_interval: float
    flap_policy: str
    flap_threshold: int
    flap_window: float
    flap_cooldown: float


@dataclass(frozen=True)
class OutboxConfig:
    poll_interval: float
    max_inflight: int
    ack_timeout: float
    max_attempts: int
    backoff: float
    claim_batch: int
    default_ttl: float


@dataclass(frozen=True)
class RetentionConfig:
    events_days: int
    commands_days: int
    inbox_days: int
    prune_interval: float
    prune_batch: int
    partition_hours: int
    partitions_ahead: int


@dataclass(frozen=True)
class StreamConfig:
    max_entries: int
    keep: float
    retain_interval: float
    lease: float
    heartbeat: float


@dataclass(frozen=True)
class GatewayConfig:
    source: str
    instance_id: str
    listeners: tuple[ListenerConfig, ...]
    liveness: LivenessConfig
    timestamps: TimestampConfig
    http: HttpConfig
    shutdown: ShutdownConfig
    database: DatabaseConfig
    inbox: InboxConfig
    auth: AuthConfig
    cluster: ClusterConfig
    outbox: OutboxConfig
    retention: RetentionConfig
    stream: StreamConfig
    # 0: CPython's own automatic collection.
    gc_full_interval: float = 600.0


@dataclass(frozen=True)
class Overrides:
    """
    Values given on the command line; they win over the file.
    """

    listen: tuple[str, ...] = ()
    instance_id: str | None = None
    http: str | None = None
    dsn: str | None = None


def _parseKeys(
    source: str, section: str, raw: Mapping[str, str], keys: Iterable[Key]
) -> dict[str, Any]:
    values = {}
    for key in keys:
        text = raw.get(key.name, key.default)
        try:
            values[key.name] = key.parse(text)
        except ValueError as e:
            raise ConfigError(source, section, key.name, str(e)) from None
    return values


def _applyListen(
    source: str, listeners: dict[str, dict[str, str]], listen: Iterable[str]
) -> None:
    for spec in listen:
        name, sep, endpoint = spec.partition("=")
        if not sep or ":" in name:
            # A bare endpoint: only unambiguous when there is one listener (or none yet).
            endpoint = spec
            if len(listeners) > 1:
                raise ConfigError(
                    "command line",
                    None,
                    "--listen",
                    "several listeners are configured; use --listen NAME=ENDPOINT",
                )
            name = next(iter(listeners), "main")
        listeners.setdefault(name, {})["endpoint"] = endpoint


def parseConfig(
    text: str, source: str = "<config>", overrides: Overrides = Overrides()
) -> GatewayConfig:
    """
    Parse the text of an ini file.

    @raise ConfigError: with a one-line message naming C{source}, section and key.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    # Keep keys' case: typeshed declares optionxform a method, so assigning str is flagged.
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=source)
    except configparser.Error as e:
        raise ConfigError(source, None, None, str(e).splitlines()[0]) from None

    raw: dict[str, dict[str, str]] = {}
    listenerRaw: dict[str, dict[str, str]] = {}
    for section in parser.sections():
        items = dict(parser.items(section))
        if section.startswith(_LISTENER_PREFIX):
            name = section[len(_LISTENER_PREFIX) :]
            if not _INSTANCE_ID.match(name) or not name:
                raise ConfigError(source, section, None, "listener names are [A-Za-z0-9._:-]+")
            listenerRaw[name] = items
            continue
        known = _SECTIONS.get(section)
        if known is None:
            raise ConfigError(
                source,
                section,
                None,
                "unknown section (known: "
                + ", ".join(sorted(_SECTIONS) + [_LISTENER_PREFIX + "NAME"])
                + ")",
            )
        names = {k.name for k in known}
        for key in items:
            if key not in names:
                raise ConfigError(
                    source, section, key, f"unknown key (known: {', '.join(sorted(names))})"
                )
        raw[section] = items

    if overrides.instance_id is not None:
        raw.setdefault("gateway", {})["instance_id"] = overrides.instance_id
    if overrides.http is not None:
        raw.setdefault("http", {})["endpoint"] = overrides.http
    if overrides.dsn is not None:
        raw.setdefault("database", {})["dsn"] = overrides.dsn
    _applyListen(source, listenerRaw, overrides.listen)

    sections = {
        name: _parseKeys(source, name, raw.get(name, {}), keys) for name, keys in _SECTIONS.items()
    }
    listeners = tuple(
        _parseListener(source, name, items) for name, items in sorted(listenerRaw.items())
    )
    if not listeners:
        raise ConfigError(source, None, None, "no [listener:NAME] section: nothing to listen on")

    liveness = LivenessConfig(**sections["liveness"])
    if liveness.idle_timeout <= liveness.ping_interval:
        raise ConfigError(
            source,
            "liveness",
            "idle_timeout",
            f"must be longer than ping_interval ({liveness.ping_interval:g}s), "
            f"or a live controller would be cut off between two pings",
        )

    cluster = sections["cluster"]
    if cluster["heartbeat_interval"] * 2 > cluster["instance_ttl"]:
        raise ConfigError(
            source,
            "cluster",
            "instance_ttl",
            "must be at least twice heartbeat_interval, or a live instance would look dead",
        )

    return GatewayConfig(
        source=source,
        instance_id=sections["gateway"]["instance_id"],
        gc_full_interval=sections["gateway"]["gc_full_interval"],
        listeners=listeners,
        liveness=liveness,
        timestamps=TimestampConfig(**sections["timestamps"]),
        http=HttpConfig(**sections["http"]),
        shutdown=ShutdownConfig(**sections["shutdown"]),
        database=DatabaseConfig(**sections["database"]),
        inbox=InboxConfig(**sections["inbox"]),
        auth=AuthConfig(**sections["auth"]),
        cluster=ClusterConfig(**sections["cluster"]),
        outbox=OutboxConfig(**sections["outbox"]),
        retention=RetentionConfig(**sections["retention"]),
        stream=StreamConfig(**sections["stream"]),
    )


def _parseListener(source: str, name: str, items: Mapping[str, str]) -> ListenerConfig:
    section = _LISTENER_PREFIX + name
    from ctrlgw.dialects import findDialect

    values = _parseKeys(source, section, items, _LISTENER_KEYS)
    if not values["endpoint"]:
        raise ConfigError(source, section, "endpoint", "required, e.g. tcp:7000")
    try:
        dialect = findDialect(values["dialect"])
    except KeyError as e:
        raise ConfigError(source, section, "dialect", str(e.args[0])) from None
    options = _parseKeys(source, section, items, dialect.keys)
    own = {k.name for k in _LISTENER_KEYS} | {k.name for k in dialect.keys}
    extra = {k: v for k, v in items.items() if k not in own}
    makeFraming: Callable[[], IFraming] | None = None
    if dialect.framing is not None:
        # The dialect brings its framing: the key may only name it.
        if items.get("framing", dialect.framing).strip() != dialect.framing:
            raise ConfigError(
                source, section, "framing",
                f"dialect {dialect.name} implies framing {dialect.framing}; leave it out",
            )
        values["framing"] = dialect.framing
        if extra:
            key = sorted(extra)[0]
            raise ConfigError(source, section, key, f"unknown key for dialect {dialect.name}")
    else:
        try:
            factory = findFraming(values["framing"])
        except KeyError as e:
            raise ConfigError(source, section, "framing", str(e.args[0])) from None
        try:
            makeFraming = factory.configure(values["max_frame"], extra)
        except FramingOptionError as e:
            raise ConfigError(source, section, e.key, e.reason) from None
    try:
        dialect.check(options)
    except ValueError as e:
        key, _, reason = str(e).partition(": ")
        raise ConfigError(source, section, key, reason) from None
    return ListenerConfig(name=name, makeFraming=makeFraming, options=options, **values)


def loadConfig(path: str, overrides: Overrides = Overrides()) -> GatewayConfig:
    """
    Read and parse the ini file at C{path}.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "not UTF-8 text") from None
    return parseConfig(text, path, overrides)
