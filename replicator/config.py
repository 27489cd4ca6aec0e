"""Typed configuration: one TOML file, plus the environment for secrets.

Every model is frozen and rejects unknown keys, so a typo is an error naming the key, not a
silently ignored setting. Secrets never live in the file: the source password comes from
`REPLICATOR_SOURCE_PASSWORD` (or the file named by `REPLICATOR_SOURCE_PASSWORD_FILE`) and is
held as a `SecretStr`, which prints as `**********`.

Example: `examples/local.toml`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from replicator.archive.merge import ConflictPolicy
from replicator.errors import OperatorError
from replicator.events import Tier, join_qualified, split_qualified


class ConfigError(OperatorError, ValueError):
    """The configuration cannot be used; the message names the file and the key."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _qualified(name: str) -> str:
    """`guests` -> `public.guests`, `public."v1.2"` -> `"public"."v1.2"`: the one text form
    of a table's name (`events.join_qualified`); exact names, any characters."""
    return join_qualified(*split_qualified(name, "public"))


class SourceConfig(_Model):
    dsn: str = Field(description="libpq connection string of the WedSync database")
    password: SecretStr | None = Field(default=None, exclude=True)
    slot: str = "wedsync_replicator"
    publication: str = "wedsync_replicator"
    tables: tuple[str, ...] = Field(
        default=(), description="tables to capture; empty means the publication's tables, or "
        "every table when the publication must be created")
    protocol_version: Literal["auto", 1, 2, 3, 4] = "auto"
    streaming: bool = True
    two_phase: bool = False
    snapshot: Literal["initial", "never"] = "initial"
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    status_interval_s: float = Field(default=1.0, gt=0)
    reconnect_max_backoff_s: float = Field(default=30.0, gt=0)
    spill_threshold_mb: int = Field(
        default=64, ge=1, description="a transaction whose decoded changes outgrow this many "
        "MiB sends the rest to a temporary file until its commit")
    spill_dir: str | None = Field(
        default=None, description="where those files go (default: TMPDIR or /tmp)")
    # Changes PostgreSQL itself replicated into the source (a logical-replication subscriber's
    # apply worker, any session bound to a replication origin): "tag" captures them with
    # their origin's name; "skip" leaves them out (a two-way setup then does not echo).
    replicated_changes: Literal["tag", "skip"] = "tag"

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(value)
        except Error:  # its message quotes the text, which may hold a password: not shown
            raise ValueError("not a libpq connection string: use key=value pairs "
                             "('host=db port=5432 dbname=wedsync') or a postgresql:// URI"
                             ) from None
        return value

    @field_validator("slot", "publication")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", value):
            raise ValueError("use 1-63 lower-case letters, digits or underscores")
        return value

    @field_validator("tables")
    @classmethod
    def _tables(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_qualified(t) for t in value)


class WeddingLink(_Model):
    """How one table's rows lead to their wedding.

    Either directly, `column` holding the wedding id; or through a parent table:
    `column` holds the parent's key, and the parent's `parent_wedding_column` the wedding id.
    """

    column: str
    parent: str | None = None
    parent_key: str = "id"
    parent_wedding_column: str = "wedding_id"

    @field_validator("parent")
    @classmethod
    def _parent(cls, value: str | None) -> str | None:
        return _qualified(value) if value is not None else None


class PriorityConfig(_Model):
    """The wedding calendar that sets each change's tier. Without one (no `[priority]`
    section in the file, or `weddings_table = ""`), every change gets `default_tier`."""

    weddings_table: str = "public.weddings"
    wedding_id_column: str = "id"
    wedding_date_column: str = "wedding_date"
    tables: dict[str, WeddingLink] = Field(default_factory=dict)
    critical_days: int = Field(default=7, ge=0)
    high_days: int = Field(default=30, ge=0)
    normal_days: int = Field(default=90, ge=0)
    default_tier: Tier = Tier.LOW
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as 'UTC' or "
                             "'Europe/London'") from None
        return value

    @field_validator("weddings_table")
    @classmethod
    def _weddings(cls, value: str) -> str:
        return _qualified(value) if value else ""

    @property
    def calendar(self) -> bool:
        """Whether a wedding calendar is configured (see the class docstring)."""
        return bool(self.weddings_table)

    @field_validator("tables")
    @classmethod
    def _links(cls, value: dict[str, WeddingLink]) -> dict[str, WeddingLink]:
        return {_qualified(k): v for k, v in value.items()}

    @model_validator(mode="after")
    def _ordered(self) -> PriorityConfig:
        if not self.critical_days <= self.high_days <= self.normal_days:
            raise ValueError("need critical_days <= high_days <= normal_days")
        return self


class VendorLink(_Model):
    """Where a wedding's vendors are, for `replicator impact`: the distinct values of
    `column` among the rows of `table` whose `wedding_column` holds the wedding's id (e.g.
    `{ table = "public.bookings", column = "vendor", wedding_column = "wedding_id" }`)."""

    table: str
    column: str
    wedding_column: str = "wedding_id"

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name the table (schema.table)")
        return _qualified(value)

    @field_validator("column", "wedding_column")
    @classmethod
    def _column(cls, value: str) -> str:
        if not value:
            raise ValueError("name a column")
        return value


class ImpactConfig(_Model):
    """`replicator impact`'s settings (`[impact]`). Without `vendors` (the default), the
    report lists no vendors."""

    vendors: VendorLink | None = None


class KafkaConfig(_Model):
    bootstrap_servers: str = "127.0.0.1:19092"
    topic_prefix: str = "wedsync"
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    compression: Literal["zstd", "lz4", "gzip", "none"] = "zstd"
    linger_ms: int = Field(default=5, ge=0)
    max_batch_bytes: int = Field(default=1_048_576, ge=1024)
    schema_registry_url: str | None = None
    # The claim check: the producer's `message.max.bytes`, and the `max.message.bytes` of the
    # topics it creates; a change whose message would be larger than `claim_check_bytes`
    # goes to the claims store (`claims_url`, default the first destination's store), and
    # the topic gets a reference to it (docs/EVENTS.md).
    max_message_bytes: int = Field(default=1_048_576, ge=65_536)
    claim_check_bytes: int = Field(default=786_432, ge=1024)
    claims_url: str | None = None

    @field_validator("claims_url")
    @classmethod
    def _claims_url(cls, value: str | None) -> str | None:
        return None if value is None else _store_url(value)

    @model_validator(mode="after")
    def _claims_fit(self) -> KafkaConfig:
        room = self.max_message_bytes - CLAIM_HEADROOM
        if self.claim_check_bytes > room:
            raise ValueError(f"claim_check_bytes must be at most max_message_bytes - "
                             f"{CLAIM_HEADROOM} ({room}): the key, headers and framing need room")
        return self

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", value):
            raise ValueError("Kafka topic names allow letters, digits, '.', '_' and '-'")
        return value


STORE_SCHEMES = ("s3", "az", "gs", "file", "mem")
#: What a message may need beyond `claim_check_bytes`: its key, headers and batch framing.
CLAIM_HEADROOM = 16_384


def _store_url(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in STORE_SCHEMES or not rest:
        raise ValueError(f"{value!r} is not a store URL; use one of "
                         + ", ".join(f"{s}://..." for s in STORE_SCHEMES))
    return value


class FlushConfig(_Model):
    """When a sink writes what it has buffered: per tier interval, or a size bound."""

    critical_s: float = Field(default=5.0, gt=0)
    high_s: float = Field(default=30.0, gt=0)
    normal_s: float = Field(default=60.0, gt=0)
    low_s: float = Field(default=300.0, gt=0)
    max_rows: int = Field(default=50_000, ge=1)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    def interval(self, tier: Tier) -> float:
        return float(getattr(self, f"{tier.value}_s"))


class CompactionConfig(_Model):
    """When the service folds a destination's changes into new snapshots
    (`replicator.replay.compact`): every `check_every_s` it compacts, at its latest point,
    each table with at least `min_changes` changes and `min_changes_ratio` of the table's rows
    since its last compaction snapshot (a table without one gets its first at the first
    check). A burst does not wait for the next check: once the destination has written
    `min_changes` rows since the last check, one runs at once, though no sooner than
    `min_interval_s` after the last. A restore reads a snapshot plus at most about that many
    changes, or what `min_interval_s` brings in a burst; each compaction costs a restore of
    the table, in a separate, lower-priority process, so at a sustained 3,000 changes/s a
    60 s interval keeps about one compaction running per destination all the time (300 s:
    a fifth of that, and a restore reads at most 5 minutes of changes past a snapshot)."""

    enabled: bool = True
    check_every_s: float = Field(default=600.0, gt=0)
    min_interval_s: float = Field(default=300.0, ge=0)
    min_changes: int = Field(default=10_000, ge=0)
    min_changes_ratio: float = Field(default=0.02, ge=0)


_DURATION = re.compile(r"[1-9][0-9]*[smhdw]")


class RetentionConfig(_Model):
    """Retention (`replicator.replay.retention`): after each compaction check, delete what no
    point inside the last `keep` needs, once it has been unneeded for `grace`; skipped on a
    wedding day. Off while `keep` is unset. Durations: `35d`, `12h`, `90m`, `2w`."""

    keep: str | None = None
    grace: str = "1h"

    @field_validator("keep", "grace")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None and not _DURATION.fullmatch(value.strip().lower()):
            raise ValueError(f"{value!r} is not a duration like 35d, 12h, 90m or 2w")
        return value if value is None else value.strip().lower()


class SpoolConfig(_Model):
    """A local spool for an outage of the destination's store (`replicator.sink.spool`): once
    the store has failed for `after_s`, the sink writes its segments, encrypted as usual,
    into `dir/<destination>/` and commits its Kafka offsets against them, so an outage longer
    than Kafka's retention loses nothing; they are shipped, in order, when the store answers.
    Off while `dir` is unset."""

    dir: Path | None = None
    after_s: float = Field(default=60.0, ge=0)


class DestinationConfig(_Model):
    name: str
    url: str
    compression: Literal["zstd", "deflate"] = "zstd"
    bandwidth_bytes_per_s: int = Field(default=0, ge=0, description="0 means no limit")
    flush: FlushConfig = Field(default_factory=FlushConfig)
    compaction: CompactionConfig = Field(default_factory=CompactionConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", value):
            raise ValueError("use 1-63 lower-case letters, digits, '-' or '_'")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in STORE_SCHEMES or not rest:
            raise ValueError(f"{value!r} is not a store URL; use one of "
                             + ", ".join(f"{s}://..." for s in STORE_SCHEMES))
        return value


class EncryptionConfig(_Model):
    """Key-encryption keys: from `keyring_file` (one `name base64` per line) or, when unset,
    from `REPLICATOR_KEK_<NAME>` variables; `REPLICATOR_KEK_ACTIVE` names the key new
    objects use."""

    keyring_file: Path | None = None


class MetricsConfig(_Model):
    """`listen` is `host:port`, an IPv6 address in brackets (`[::1]:9187`); port 0 picks a
    free one."""

    listen: str = "127.0.0.1:9187"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        listen_address(value)
        return value


def listen_address(text: str) -> tuple[str, int]:
    """`(host, port)` of `host:port` or `[IPv6 address]:port` (an empty host is 127.0.0.1);
    `ValueError` saying what to write."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. '[::1]:9187'")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not host:port; give the port too, e.g. "
                         "'127.0.0.1:9187' or '[::1]:9187'")
    return host or "127.0.0.1", int(port)


class EveConfig(_Model):
    """Eve snapshots (`replicator.eve`): `hours_before` each wedding of the calendar, an
    on-demand snapshot of its rows, once; checked every `check_every_s`."""

    enabled: bool = True
    hours_before: float = Field(default=24.0, gt=0)
    check_every_s: float = Field(default=300.0, gt=0)


class IncidentsConfig(_Model):
    """Incident detection (`replicator.ops.incidents`): a critical or high wedding whose
    distinct rows deleted or rewritten within `window_s`, by transactions each touching at
    least `bulk_rows` of them, reach `share` of its rows (and at least `min_rows`) raises an
    incident, at most once per `cooldown_s`."""

    enabled: bool = True
    share: float = Field(default=0.2, gt=0, le=1)
    window_s: float = Field(default=60.0, gt=0)
    min_rows: int = Field(default=10, ge=1)
    bulk_rows: int = Field(default=5, ge=1)  # a transaction touching this many rows of a wedding
    cooldown_s: float = Field(default=600.0, ge=0)
    impact_wait_s: float = Field(default=120.0, ge=0)


class NotifyConfig(_Model):
    """A webhook: each incident is POSTed to `url` as JSON."""

    url: str
    timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"{cls._display(value)!r} is not an http(s) URL")
        return value

    @staticmethod
    def _display(url: str) -> str:
        """*url* without credentials, path or query (they may hold a token)."""
        match = re.match(r"(https?://)(?:[^@/]*@)?([^/?#]*)", url)
        return f"{match[1]}{match[2]}/..." if match else "(not a URL)"

    @property
    def display(self) -> str:
        return self._display(self.url)


class ConflictRule(_Model):
    """One table's conflict rule, `[conflicts."schema.table"]` (`archive.merge`, whose rules
    it configures). Versions of one key from different origins within `window_s` of the
    latest compete: the writer's role (the value of `role_column` in the version's row, the
    `before` image for a delete) ranks by `precedence`, strongest first; then the later
    commit, then the greater origin name. Outside the window the latest commit wins. With
    `column_groups`, the competition is held again for each group of columns, with
    `group_precedence[group]` in place of `precedence` where given. A table without a rule:
    the latest commit wins."""

    role_column: str = ""
    precedence: tuple[str, ...] = ()
    window_s: float = Field(default=0.0, ge=0, le=7 * 86_400)
    column_groups: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    group_precedence: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid(self) -> ConflictRule:
        if self.precedence and not self.role_column:
            raise ValueError("precedence needs role_column: the column of each row that names "
                             "its writer's role")
        if self.group_precedence and not self.role_column:
            raise ValueError("group_precedence needs role_column")
        self.policy()  # the merge module's own checks (a column in two groups, ...)
        return self

    def policy(self) -> ConflictPolicy:
        return ConflictPolicy(
            window_us=round(self.window_s * 1_000_000), precedence=self.precedence,
            role_column=self.role_column,
            column_groups=dict(self.column_groups) or None,
            group_precedence=dict(self.group_precedence) or None)


def _conflict_tables(value: dict[str, ConflictRule]) -> dict[str, ConflictRule]:
    out: dict[str, ConflictRule] = {}
    for name, rule in value.items():
        table = _qualified(name)
        if table in out:
            raise ValueError(f"two conflict rules for {table}")
        out[table] = rule
    return out


def conflict_policies(section: object) -> dict[str, ConflictPolicy]:
    """A `[conflicts]` section (as TOML read it, or already validated) as the merge module's
    policies, by qualified table name; `ConfigError` naming the key when it is not valid."""
    if not section:
        return {}
    try:
        rules = _CONFLICTS.validate_python(section)
        tables = _conflict_tables(rules)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "conflicts")) from None
    except ValueError as exc:
        raise ConfigError(f"conflicts: {exc}") from None
    return {table: rule.policy() for table, rule in tables.items()}


_CONFLICTS = TypeAdapter(dict[str, ConflictRule])


class Config(_Model):
    source: SourceConfig
    priority: PriorityConfig = Field(default_factory=PriorityConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    encryption: EncryptionConfig = Field(default_factory=EncryptionConfig)
    impact: ImpactConfig = Field(default_factory=ImpactConfig)
    eve: EveConfig = Field(default_factory=EveConfig)
    incidents: IncidentsConfig = Field(default_factory=IncidentsConfig)
    notify: tuple[NotifyConfig, ...] = ()
    conflicts: dict[str, ConflictRule] = Field(default_factory=dict)
    shutdown_deadline_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="before")
    @classmethod
    def _no_priority_no_calendar(cls, data: object) -> object:
        # No [priority] section: no wedding calendar (PriorityConfig's docstring).
        if isinstance(data, dict) and "priority" not in data:
            return {**data, "priority": {"weddings_table": ""}}
        return data

    @property
    def policies(self) -> dict[str, ConflictPolicy]:
        """`[conflicts]` as the merge module's policies, by qualified table name."""
        return {table: rule.policy() for table, rule in self.conflicts.items()}

    @property
    def claims_url(self) -> str | None:
        """The store of claimed (too large) changes: `kafka.claims_url`, else the first
        destination's store; None when neither is configured."""
        if self.kafka.claims_url is not None:
            return self.kafka.claims_url
        return self.destinations[0].url if self.destinations else None

    @field_validator("conflicts")
    @classmethod
    def _conflicts(cls, value: dict[str, ConflictRule]) -> dict[str, ConflictRule]:
        return _conflict_tables(value)

    @field_validator("destinations")
    @classmethod
    def _unique(cls, value: tuple[DestinationConfig, ...]) -> tuple[DestinationConfig, ...]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: "
                             f"{', '.join(duplicates)}")
        return value


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate *path*; secrets come from *environ* (default: the process's)."""
    env = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a configuration file "
                          "is TOML in UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})"
                          ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    source = raw.get("source")
    if isinstance(source, dict):
        if "password" in source:
            raise ConfigError(f"{path}: source.password must not be in the file; set "
                              "REPLICATOR_SOURCE_PASSWORD or REPLICATOR_SOURCE_PASSWORD_FILE")
        secret = _secret(env, "REPLICATOR_SOURCE_PASSWORD")
        if secret is not None:
            source = {**source, "password": secret}
            raw = {**raw, "source": source}
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None


def _secret(env: Mapping[str, str], name: str) -> str | None:
    if env.get(name):
        return env[name]
    file = env.get(f"{name}_FILE")
    if file:
        try:
            return Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={file}: cannot read it ({exc.strerror})") from None
    return None


def _describe(exc: ValidationError, within: str = "") -> str:
    """One line per problem, each naming the dotted key (below *within*); input values are
    left out because they may hold secrets."""
    lines = []
    for err in exc.errors():
        key = ".".join([within] * bool(within) + [str(p) for p in err["loc"]]) or "(top level)"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{key}: {message}")
    return "; ".join(lines)
