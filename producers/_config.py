"""librdkafka properties for spendstream producers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from spendstream.settings import Settings

PRODUCER_DEFAULTS: Mapping[str, Any] = {
    # Exactly-once per partition across broker restarts and retries: the broker drops a
    # retried batch it already has (sequence numbers), so a restart never duplicates.
    "enable.idempotence": True,
    "acks": "all",
    # Throughput: fill large compressed batches; 10 ms of extra latency is invisible to a
    # gateway that has already spent seconds on the model call.
    "linger.ms": 10,
    "batch.size": 1_000_000,
    "batch.num.messages": 100_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    # Give a restarting broker time to come back before a message is declared failed.
    "message.timeout.ms": 300_000,
    # Keys are user ids: murmur2 matches the Java client, so every client in every language
    # sends one user's events to the same partition.
    "partitioner": "murmur2_random",
}


class _TransientRetries(logging.Filter):
    """Demote librdkafka's "... retrying" lines to DEBUG.

    A producer on a broker that has just started logs warnings such as ``GETPID ... Coordinator
    load in progress: retrying`` for a second or two; librdkafka retries by itself and they
    mean nothing to a user (they were the first lines a newcomer saw in the demo). Failures
    that last still reach ``error_cb`` and the delivery reports.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "retrying" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self._floor(record)

    @staticmethod
    def _floor(record: logging.LogRecord) -> int:
        return logging.getLogger(record.name).getEffectiveLevel()


LIBRDKAFKA_LOG = logging.getLogger("spendstream.librdkafka")
"""Where librdkafka's own log lines go (instead of raw ``%4|...`` lines on stderr)."""
LIBRDKAFKA_LOG.addFilter(_TransientRetries())


def producer_config(
    settings: Settings | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults, then the cluster settings, then explicit ``config`` (which wins)."""
    conf: dict[str, Any] = dict(PRODUCER_DEFAULTS)
    if settings is not None:
        conf.update(settings.kafka.confluent_config())
    if config is not None:
        conf.update(config)
    if "bootstrap.servers" not in conf:
        conf.update(Settings().kafka.confluent_config())
    conf.setdefault("logger", LIBRDKAFKA_LOG)
    return conf
