"""The one exception root of spendstream.

Third-party errors (librdkafka, aiokafka, chDB, clickhouse-connect, pydantic) are translated
into these at the adapter boundary with ``raise X(...) from exc`` so that callers handle one
family of errors and every message is a sentence a user can act on.
"""

from __future__ import annotations


class SpendstreamError(Exception):
    """Root of every error spendstream raises on purpose."""


class ConfigError(SpendstreamError):
    """Settings, plan files or price files are invalid."""


class InvalidEventError(SpendstreamError):
    """A usage event breaks the contract (docs/DESIGN.md, "The event contract")."""


class KafkaError(SpendstreamError):
    """The Kafka cluster could not be reached or refused an operation."""


class LocalKafkaError(KafkaError):
    """The local KRaft broker could not be resolved, started or stopped."""


class DeliveryError(KafkaError):
    """A produced message could not be delivered."""


class StoreError(SpendstreamError):
    """ClickHouse (server or embedded chDB) failed or refused a statement."""


class ReadOnlyQueryError(StoreError):
    """A statement refused on a read-only path (``spendstream query``, the read endpoint):
    not one read-only statement, or one that would touch files, the network or settings."""


class StoreLockedError(StoreError):
    """The embedded chDB folder is owned by another process."""


class BackpressureError(SpendstreamError):
    """A bounded buffer is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
