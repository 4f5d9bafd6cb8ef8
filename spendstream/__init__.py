"""spendstream: event-streaming usage metering for AI services.

The package holds the command line, the settings and the local-stack control. The pipeline
itself lives in the top-level packages ``schemas``, ``producers``, ``stream_processors`` and
``sinks``. Importing this package has no side effects and pulls in no Kafka or ClickHouse client.
"""

from spendstream.errors import (
    BackpressureError,
    ConfigError,
    DeliveryError,
    InvalidEventError,
    KafkaError,
    LocalKafkaError,
    ReadOnlyQueryError,
    SpendstreamError,
    StoreError,
    StoreLockedError,
)

__version__ = "0.1.0"

__all__ = [
    "BackpressureError",
    "ConfigError",
    "DeliveryError",
    "InvalidEventError",
    "KafkaError",
    "LocalKafkaError",
    "ReadOnlyQueryError",
    "SpendstreamError",
    "StoreError",
    "StoreLockedError",
    "__version__",
]
