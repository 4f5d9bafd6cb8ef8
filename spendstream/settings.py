"""One settings object for every deployable (env prefix ``SPENDSTREAM_``, nesting with ``__``).

Examples::

    SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS=broker-1:9092,broker-2:9092
    SPENDSTREAM_KAFKA__SASL_PASSWORD=...            (a SecretStr: never printed)
    SPENDSTREAM_CLICKHOUSE__URL=http://clickhouse:8123
    SPENDSTREAM_TOPICS__EVENTS=prod.usage.events
    SPENDSTREAM_STATE_DIR=/var/lib/spendstream

Settings are validated once at start-up; :func:`load_settings` turns every problem into one
:class:`~spendstream.errors.ConfigError` that lists them all.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import MAX_PRICE_PER_TOKEN, topics
from spendstream.errors import ConfigError

DEFAULT_LOCAL_KAFKA_PORT = 19092


class LocalKafkaSettings(BaseModel):
    """The broker ``spendstream kafka up`` runs from the jars resolved by deploy/kafka/pom.xml."""

    port: int = Field(default=DEFAULT_LOCAL_KAFKA_PORT, ge=1024, le=65535)
    controller_port: int | None = Field(
        default=None, ge=1024, le=65535, description="Defaults to port + 1."
    )
    data_dir: Path | None = Field(default=None, description="Defaults to <state_dir>/kafka.")
    kafka_version: str = Field(default="4.1.1", pattern=r"^\d+\.\d+\.\d+$")
    heap: str = Field(default="512m", pattern=r"^\d+[mMgG]$")
    start_timeout_s: float = Field(default=90.0, gt=0)


class KafkaSettings(BaseModel):
    """How every client reaches the cluster."""

    bootstrap_servers: str = Field(default=f"127.0.0.1:{DEFAULT_LOCAL_KAFKA_PORT}", min_length=3)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    client_id: str = "spendstream"
    local: LocalKafkaSettings = LocalKafkaSettings()

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_"):
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"security_protocol {self.security_protocol} needs {', '.join(missing)}"
                )
        return self

    @property
    def is_local_default(self) -> bool:
        """True when the bootstrap points at the loopback broker ``kafka up`` manages."""
        return self.bootstrap_servers in {
            f"127.0.0.1:{self.local.port}",
            f"localhost:{self.local.port}",
        }

    def confluent_config(self) -> dict[str, Any]:
        """librdkafka properties for confluent-kafka clients (secrets revealed here only)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_cafile:
            conf["ssl.ca.location"] = str(self.ssl_cafile)
        if self.ssl_certfile:
            conf["ssl.certificate.location"] = str(self.ssl_certfile)
        if self.ssl_keyfile:
            conf["ssl.key.location"] = str(self.ssl_keyfile)
        if self.ssl_key_password is not None:
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return conf


class TopicSettings(BaseModel):
    """Topic names (defaults in :mod:`schemas.topics`) and partition counts."""

    events: str = topics.EVENTS
    priced: str = topics.PRICED
    rollups: str = topics.ROLLUPS
    dlq: str = topics.DLQ
    alerts: str = topics.ALERTS
    overages: str = topics.OVERAGES
    enforcement: str = topics.ENFORCEMENT
    subscriptions: str = topics.SUBSCRIPTIONS
    notify_dlq: str = topics.NOTIFY_DLQ
    admissions: str = topics.ADMISSIONS
    partitions: int = Field(default=6, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=16)

    @model_validator(mode="after")
    def _distinct(self) -> TopicSettings:
        names = self.names()
        if len(set(names.values())) != len(names):
            raise ValueError("topic names must be distinct")
        return self

    def names(self) -> dict[str, str]:
        """Role -> topic name."""
        return {
            role: getattr(self, role)
            for role in (
                "events",
                "priced",
                "rollups",
                "dlq",
                "alerts",
                "overages",
                "enforcement",
                "subscriptions",
                "notify_dlq",
                "admissions",
            )
        }

    def compacted(self) -> set[str]:
        """Topics that hold latest-state-per-key and are created with compaction."""
        return {self.enforcement, self.subscriptions}


class ClickHouseSettings(BaseModel):
    """A ClickHouse server (``url``) or, by default, the embedded chDB engine."""

    url: str | None = Field(
        default=None,
        description="http(s)://host:port of a ClickHouse server; unset = embedded chDB.",
        pattern=r"^https?://[^\s/]+(:\d+)?/?$",
    )
    username: str = "default"
    password: SecretStr = SecretStr("")
    database: str = Field(default="spendstream", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    embedded_path: Path | None = Field(default=None, description="Defaults to <state_dir>/chdb.")
    raw_ttl_days: int | None = Field(default=None, ge=1, description="TTL of raw priced events.")

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        if value is not None and "@" in value:
            raise ValueError(
                "credentials do not belong in the URL: use SPENDSTREAM_CLICKHOUSE__USERNAME "
                "and SPENDSTREAM_CLICKHOUSE__PASSWORD (kept secret)"
            )
        return value

    @property
    def embedded(self) -> bool:
        """True when no server URL is configured."""
        return self.url is None


class AdmissionSettings(BaseModel):
    """Admission (reservations): how long a hold lasts, when a gateway may decide alone.

    See docs/DESIGN.md, "Admission (reservations)".
    """

    reservation_ttl_s: int = Field(
        default=900,
        ge=1,
        le=7 * 86_400,
        description="How long (s after its request reached Kafka) an admission holds budget "
        "when no usage event settles it: longer than the longest call plus the pipeline's lag.",
    )
    pool: int = Field(
        default=8,
        ge=0,
        le=64,
        description="Gateways: reservations of the same shape asked for along with a request, "
        "handed out later without a network call (the local path); 0 = every admission asks.",
    )
    pool_zone: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="Workers: a pooled reservation is granted only while this many more "
        "estimates would still fit under every cap after it (far from every cap).",
    )
    timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="Gateways: how long one admission waits for its answer before asking "
        "again (same reservation id: the answer is the same).",
    )
    deadline_s: float = Field(
        default=90.0,
        gt=0,
        le=3600,
        description="Gateways: after this long without an answer, admit() raises "
        "AdmissionTimeout (a fail-over takes the session timeout plus the restore).",
    )


class ProcessorSettings(BaseModel):
    """The faust workers: dedupe, pricing, windows."""

    app_id: str = Field(default="spendstream", pattern=r"^[A-Za-z0-9_.-]+$")
    dedupe_horizon_s: int = Field(default=24 * 3600, ge=60)
    window_s: int = Field(default=60, ge=1, le=24 * 3600)
    grace_s: int = Field(default=300, ge=0)
    future_skew_s: int = Field(
        default=120,
        ge=0,
        le=3600,
        description="How far (s) an event's occurred_at may lie after the time its record "
        "reached Kafka; later ones go to the dead-letter topic and never move a watermark. "
        "Up to grace_s, such an event cannot make current events late.",
    )
    # Under a backlog the batch is what waits, up to this: 5,000 kept one worker up with 10k
    # events/s where 2,000 fell behind (per-user state is written once per batch); at low rates
    # batches stay small whatever this is (see BENCHMARKS.md).
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    # Events that arrived while the previous batch was processed go at once (up to
    # batch_size); on an idle worker a batch goes when full or this long after its first
    # event. 50 ms measured better than 200 ms at every rate tried (2k-10k events/s).
    batch_within_s: float = Field(default=0.05, gt=0, le=60)
    price_catalog: Path | None = Field(
        default=None, description="LiteLLM-format price map; defaults to the vendored copy."
    )
    price_overrides: Path | None = None
    fallback_input_cost_per_token: Decimal = Field(
        default=Decimal("0.00001"), ge=0, le=MAX_PRICE_PER_TOKEN
    )
    fallback_output_cost_per_token: Decimal = Field(
        default=Decimal("0.00003"), ge=0, le=MAX_PRICE_PER_TOKEN
    )
    web_port: int = Field(default=6066, ge=1024, le=65535)
    session_timeout_s: float = Field(
        default=30.0,
        ge=6,
        le=300,
        description="How long the group waits for a silent worker before reassigning its "
        "partitions (after a crash, the time to recovery).",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Prometheus /metrics and /health; 0 = off."
    )
    stall_after_s: float = Field(
        default=120.0,
        gt=0,
        le=86_400,
        description="/health reports the worker stalled (not ok) when its input has lag and "
        "no batch finished for this long; a state restore in progress does not count.",
    )
    state_memory_mib: int = Field(
        default=64,
        ge=16,
        le=65_536,
        description="Memory of the worker's local state store (RocksDB block cache, with its "
        "memtables counted in it), shared by every partition; the state itself is on disk.",
    )
    # 25 ms measured better than 100 ms at 10k events/s (alert p99 0.73/1.31 s against
    # 1.22/1.49 s, alternating runs) and the same at 2k/s; an idle worker then sends up to 40
    # fetch requests a second.
    commit_interval_s: float = Field(
        default=0.5,
        ge=0,
        le=60,
        description="How often the worker commits the input offsets of batches whose outputs "
        "and state are durable (0: after every batch). Each commit is a broker round trip "
        "on the batch path; a longer interval leaves more to replay after a crash, which "
        "still counts once.",
    )
    fetch_max_wait_ms: int = Field(
        default=25,
        ge=1,
        le=10_000,
        description="How long the broker may hold the worker's fetch request for data "
        "(faust fixes 1500 ms, which stalled the input for up to 1.5 s under load).",
    )


class SinkSettings(BaseModel):
    """The batching ClickHouse sink."""

    group_id: str = "spendstream-sink"
    batch_rows: int = Field(default=10_000, ge=1, le=1_000_000)
    batch_age_s: float = Field(default=1.0, gt=0, le=600)
    max_buffer_rows: int = Field(default=200_000, ge=1)
    retry_initial_s: float = Field(default=0.5, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Prometheus /metrics and /health; 0 = off."
    )


class ProducerSettings(BaseModel):
    """The durable local spool of :class:`~producers.UsageProducer` (see producers/_spool.py).

    With ``spool_enabled`` every event is appended to an on-disk segment log before it is
    handed to Kafka and removed once the broker acknowledged it, so a broker outage or a
    gateway restart loses nothing; ``spool_max_bytes`` bounds the unacknowledged backlog.
    """

    spool_enabled: bool = False
    spool_dir: Path | None = Field(default=None, description="Defaults to <state_dir>/spool.")
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=4096)
    full_policy: Literal["block", "reject"] = "block"
    fsync: Literal["always", "batch", "never"] = "batch"


NotifyKind = Literal["alert", "threshold", "break_even", "enforcement"]
"""What a notify route matches: ``alert`` is both alert kinds (``threshold``, ``break_even``)."""


class NotifyEndpoint(BaseModel):
    """One HTTP endpoint that receives notifications as signed webhooks (Standard Webhooks)."""

    # The URL may carry a token: an error names the field, never the value.
    model_config = {"extra": "forbid", "hide_input_in_errors": True}

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,62}$",
        description="Names its consumer group, metrics label and secret (lowercase, digits, _).",
    )
    url: SecretStr = Field(
        description="http(s) URL the notifications are POSTed to; kept secret because webhook "
        "URLs often carry a token."
    )
    timeout_s: float = Field(default=15.0, gt=0, le=300, description="Per request.")
    concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Requests in flight; 1 delivers in the order the records were published.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value.get_secret_value())
            port = parts.port  # raises on a port that is not a number in range
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        del port
        return value


class NotifyRoute(BaseModel):
    """Records of ``kinds`` of users on ``plans`` in ``orgs`` (empty: any) go to ``endpoints``."""

    model_config = {"extra": "forbid"}

    kinds: list[NotifyKind] = Field(default=["alert", "enforcement"], min_length=1)
    plans: list[str] = Field(default=[], description="Plan ids; empty: every plan.")
    orgs: list[str] = Field(default=[], description="Org ids; empty: every org.")
    endpoints: list[str] = Field(min_length=1, description="Names of endpoints.")


class NotifySettings(BaseModel):
    """``spendstream notify``: alerts and enforcement changes to HTTP endpoints.

    Endpoints and routes come from ``endpoints``/``routes`` (JSON in the environment) or from
    ``routes_file`` (YAML), not both; secrets only from here: ``signing_secret`` for every
    endpoint, ``endpoint_secrets.<name>`` for one. A secret is ``whsec_`` + base64 of 24 to 64
    random bytes; several separated by spaces sign with each (for rotation).
    """

    model_config = {"hide_input_in_errors": True}  # errors about secrets never echo them

    group_id: str = Field(
        default="spendstream-notify",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of the consumer groups: one per endpoint, <group_id>.<endpoint>.",
    )
    routes_file: Path | None = Field(default=None, description="YAML: endpoints and routes.")
    endpoints: list[NotifyEndpoint] = Field(default=[])
    routes: list[NotifyRoute] = Field(default=[])
    signing_secret: SecretStr | None = Field(default=None, description="whsec_...: default.")
    endpoint_secrets: dict[str, SecretStr] = Field(
        default={}, description="Endpoint name -> whsec_... (overrides signing_secret)."
    )
    max_attempts: int = Field(default=10, ge=1, le=100, description="Attempts per notification.")
    retry_initial_s: float = Field(default=5.0, gt=0, le=3600)
    retry_max_s: float = Field(
        default=900.0, gt=0, le=86_400, description="Longest wait between two attempts."
    )
    max_pending: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Notifications read but not yet delivered, per endpoint; at this many the "
        "endpoint's consumer pauses.",
    )
    commit_interval_s: float = Field(default=1.0, ge=0, le=60)
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="On SIGTERM, how long deliveries in progress may finish before the rest "
        "is left to the next start.",
    )
    start_from: Literal["earliest", "latest"] = Field(
        default="earliest",
        description="Where an endpoint's consumer group with no committed offset starts.",
    )
    session_timeout_s: float = Field(default=10.0, ge=6, le=300)
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Prometheus /metrics and /health; 0 = off."
    )

    @field_validator("signing_secret")
    @classmethod
    def _one_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            cls.check_secret(value)
        return value

    @field_validator("endpoint_secrets")
    @classmethod
    def _endpoint_secrets(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            try:
                cls.check_secret(secret)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @staticmethod
    def check_secret(value: SecretStr) -> None:
        """``ValueError`` unless ``value`` is one or more ``whsec_<base64 of 24-64 bytes>``."""
        import base64
        import binascii

        secrets = value.get_secret_value().split()
        if not secrets:
            raise ValueError("a signing secret is empty")
        for secret in secrets:
            if not secret.startswith("whsec_"):
                raise ValueError("a signing secret must start with whsec_")
            try:
                key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except binascii.Error:
                raise ValueError("a signing secret must be whsec_ + base64") from None
            if not 24 <= len(key) <= 64:
                raise ValueError(f"a signing secret must hold 24 to 64 bytes, not {len(key)}")

    @model_validator(mode="after")
    def _consistent(self) -> NotifySettings:
        if self.retry_initial_s > self.retry_max_s:
            raise ValueError("retry_initial_s must not exceed retry_max_s")
        if self.routes_file is not None and (self.endpoints or self.routes):
            raise ValueError("give endpoints and routes either inline or in routes_file, not both")
        return self


class Settings(BaseSettings):
    """Everything configurable, from the environment (``SPENDSTREAM_*``) or keyword arguments."""

    model_config = SettingsConfigDict(
        env_prefix="SPENDSTREAM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Field(default=Path(".spendstream"), description="Local state and data.")
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    processor: ProcessorSettings = ProcessorSettings()
    sink: SinkSettings = SinkSettings()
    producer: ProducerSettings = ProducerSettings()
    notify: NotifySettings = NotifySettings()
    admission: AdmissionSettings = AdmissionSettings()
    plans_file: Path | None = Field(default=None, description="Plans YAML; default: sample.")
    subscriptions_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def kafka_data_dir(self) -> Path:
        """Where the local broker keeps its log segments and metadata."""
        return self.kafka.local.data_dir or self.state_dir / "kafka"

    @property
    def chdb_path(self) -> Path:
        """The embedded ClickHouse data folder."""
        return self.clickhouse.embedded_path or self.state_dir / "chdb"

    def to_env(self) -> dict[str, str]:
        """These settings as ``SPENDSTREAM_*`` variables (secrets revealed) for a child process."""
        env: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, BaseModel):
                for name in type(value).model_fields:
                    walk(f"{prefix}{name.upper()}__", getattr(value, name))
                return
            key = prefix[:-2]
            if value is None:
                return
            if isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            elif isinstance(value, list | tuple | dict | set | frozenset | BaseModel):
                # Complex values travel as JSON, as pydantic-settings reads them back (str()
                # would write Python reprs, with secrets masked).
                env[key] = json.dumps(_revealed(value))
            else:
                env[key] = str(value)

        for name in type(self).model_fields:
            walk(f"SPENDSTREAM_{name.upper()}__", getattr(self, name))
        return env

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets shown as ``**********``."""
        return self.model_dump(mode="json")


def _revealed(value: Any) -> Any:
    """``value`` as JSON-ready data with every secret revealed (for :meth:`Settings.to_env`)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return {name: _revealed(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _revealed(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_revealed(v) for v in value]
    if isinstance(value, Path | Decimal):
        return str(value)
    return value


def describe_validation_error(exc: ValidationError, prefix: str = "SPENDSTREAM_") -> str:
    """One line per problem, naming the environment variable to fix."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        env = prefix + "__".join(loc).upper() if loc else prefix.rstrip("_")
        lines.append(f"  - {env}: {err['msg']}")
    return "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings; raise one :class:`ConfigError` listing every problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        count = exc.error_count()
        raise ConfigError(
            f"{count} invalid setting{'s' if count != 1 else ''}:\n"
            + describe_validation_error(exc)
        ) from exc
