"""Topic administration with confluent-kafka's AdminClient (docs/DESIGN.md, "Data flow").

Every confluent-kafka :class:`~confluent_kafka.KafkaException` leaving this module is translated
into :class:`spendstream.errors.KafkaError` with a sentence that names the topic or broker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError as _RdKafkaError
from confluent_kafka import KafkaException

# The documented import path; the package re-exports these without listing them in __all__.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
)

from spendstream.errors import KafkaError
from spendstream.settings import Settings

# librdkafka logs every refused connection at ERROR level; while probing a broker that is still
# starting those lines are expected, so probes log to a logger nobody listens to.
_quiet = logging.getLogger("spendstream.kafka_admin.probe")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class TopicInfo:
    """One spendstream topic as found (or created) on the cluster."""

    role: str
    """Key in :meth:`~spendstream.settings.TopicSettings.names` (``events``, ``priced`` ...)."""
    name: str
    partitions: int
    compacted: bool
    created: bool
    """True when :func:`ensure_topics` created it just now."""


def admin_client(conf: Mapping[str, Any], *, quiet: bool = False) -> AdminClient:
    """An AdminClient for librdkafka properties (see ``KafkaSettings.confluent_config``)."""
    full = dict(conf)
    if quiet:
        full["logger"] = _quiet
    return AdminClient(full)


def broker_answers(conf: Mapping[str, Any], timeout: float = 2.0) -> bool:
    """True if the cluster answers a metadata request within ``timeout`` seconds."""
    try:
        md = admin_client(conf, quiet=True).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return bool(md.brokers)


def wait_for_broker(conf: Mapping[str, Any], timeout: float = 30.0) -> None:
    """Block until the cluster answers metadata requests; :class:`KafkaError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not broker_answers(conf, timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            raise KafkaError(
                f"the Kafka cluster at {conf.get('bootstrap.servers')} did not answer within "
                f"{timeout:g} s; is it running (`spendstream kafka up`) and reachable?"
            )
        time.sleep(0.2)


def topic_partitions(conf: Mapping[str, Any], timeout: float = 10.0) -> dict[str, int]:
    """Every topic on the cluster (internal ones excluded) -> its partition count."""
    try:
        md = admin_client(conf).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaError(
            f"cannot list topics on {conf.get('bootstrap.servers')}: {_reason(exc)}"
        ) from exc
    return {
        name: len(t.partitions)
        for name, t in md.topics.items()
        if not name.startswith("__") and t.error is None
    }


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[TopicInfo]:
    """Create every topic of ``settings.topics`` that is missing; idempotent.

    New topics get ``settings.topics.partitions`` partitions and its replication factor, and
    ``cleanup.policy=compact`` for :meth:`~spendstream.settings.TopicSettings.compacted`.
    Raises :class:`KafkaError` naming every existing topic with fewer partitions than
    configured, or a compacted topic whose cleanup policy is not ``compact``: events of one
    user are routed by key, so the counts must agree everywhere.
    """
    conf = settings.kafka.confluent_config()
    cfg = settings.topics
    wanted = cfg.names()
    compacted = cfg.compacted()
    existing = topic_partitions(conf, timeout=timeout)
    admin = admin_client(conf)

    missing = [name for name in wanted.values() if name not in existing]
    if missing:
        new = [
            NewTopic(
                name,
                num_partitions=cfg.partitions,
                replication_factor=cfg.replication_factor,
                config={"cleanup.policy": "compact"} if name in compacted else {},
            )
            for name in missing
        ]
        futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout)
            except KafkaException as exc:
                if _code(exc) == _RdKafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # created concurrently by another worker: fine
                raise KafkaError(f"cannot create topic {name}: {_reason(exc)}") from exc
        _wait_visible(conf, missing, cfg.partitions, timeout)

    problems = [
        f"topic {name} has {existing[name]} partitions but {cfg.partitions} are configured"
        for name in wanted.values()
        if name in existing and existing[name] < cfg.partitions
    ]
    problems += [
        f"topic {name} should be compacted but has cleanup.policy={policy}"
        for name, policy in _cleanup_policies(
            admin, [n for n in compacted if n in existing], timeout
        ).items()
        if "compact" not in policy
    ]
    if problems:
        raise KafkaError(
            "existing topics do not match the settings: "
            + "; ".join(problems)
            + " (add partitions with kafka-topics --alter, or set SPENDSTREAM_TOPICS__PARTITIONS)."
        )
    return [
        TopicInfo(
            role=role,
            name=name,
            partitions=existing.get(name, cfg.partitions),
            compacted=name in compacted,
            created=name in missing,
        )
        for role, name in wanted.items()
    ]


def ensure_answer_topic(settings: Settings, timeout: float = 30.0) -> None:
    """Make sure the admissions topic exists with the configured partitions (workers call it).

    A worker answers each admission request on this topic, on a partition computed from the
    configured count. A deployment set up before admission existed lacks the topic, and the
    first request would then stop the worker (an undeliverable answer exits it, and the replay
    meets the same request): so a worker creates the topic at start, and refuses to start when
    the topic has fewer partitions than the gateways will read.
    """
    conf = settings.kafka.confluent_config()
    cfg = settings.topics
    name = cfg.admissions
    existing = topic_partitions(conf, timeout=timeout).get(name)
    if existing is None:
        create_topics(conf, [name], cfg.partitions, cfg.replication_factor, timeout)
    elif existing < cfg.partitions:
        raise KafkaError(
            f"topic {name} has {existing} partitions but {cfg.partitions} are configured "
            "(add partitions with kafka-topics --alter, or set SPENDSTREAM_TOPICS__PARTITIONS)"
        )


def create_topics(
    conf: Mapping[str, Any],
    names: Iterable[str],
    partitions: int,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> None:
    """Create plain (delete-policy) topics ``names``; existing ones are left as they are."""
    names = sorted(set(names))
    admin = admin_client(conf)
    futures = admin.create_topics(
        [NewTopic(n, partitions, replication_factor) for n in names],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout)
        except KafkaException as exc:
            if _code(exc) == _RdKafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise KafkaError(f"cannot create topic {name}: {_reason(exc)}") from exc
    _wait_visible(conf, names, partitions, timeout)


def delete_topics(conf: Mapping[str, Any], names: Iterable[str], timeout: float = 30.0) -> None:
    """Delete ``names`` (missing ones are ignored) and wait until the deletion is done."""
    names = sorted(set(names))
    if not names:
        return
    # Keep the client referenced until the futures resolve: a collected client fails them all.
    admin = admin_client(conf)
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout)
        except KafkaException as exc:
            if _code(exc) == _RdKafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise KafkaError(f"cannot delete topic {name}: {_reason(exc)}") from exc


def _wait_visible(
    conf: Mapping[str, Any], names: list[str], partitions: int, timeout: float
) -> None:
    """Wait until metadata shows every new topic with a leader on each partition.

    CreateTopics returns before every broker's metadata cache knows the topic; a producer
    started right after could see UNKNOWN_TOPIC_OR_PART.
    """
    deadline = time.monotonic() + timeout
    admin = admin_client(conf)
    pending = set(names)
    while pending:
        try:
            md = admin.list_topics(timeout=max(0.5, deadline - time.monotonic()))
        except KafkaException as exc:
            raise KafkaError(f"cannot read metadata after creating topics: {_reason(exc)}") from exc
        for name in list(pending):
            t = md.topics.get(name)
            if (
                t is not None
                and t.error is None
                and len(t.partitions) >= partitions
                and all(p.leader >= 0 for p in t.partitions.values())
            ):
                pending.discard(name)
        if pending and time.monotonic() > deadline:
            raise KafkaError(
                f"topics {', '.join(sorted(pending))} were created but have no leader after "
                f"{timeout:g} s."
            )
        if pending:
            time.sleep(0.1)


def _cleanup_policies(admin: AdminClient, names: list[str], timeout: float) -> dict[str, str]:
    if not names:
        return {}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    result: dict[str, str] = {}
    for res, fut in admin.describe_configs(resources, request_timeout=timeout).items():
        try:
            entries = fut.result(timeout=timeout)
        except KafkaException as exc:
            raise KafkaError(f"cannot read the config of topic {res.name}: {_reason(exc)}") from exc
        entry = entries.get("cleanup.policy")
        result[str(res.name)] = str(entry.value) if entry is not None else "delete"
    return result


def _code(exc: KafkaException) -> int | None:
    err = exc.args[0] if exc.args else None
    return int(err.code()) if isinstance(err, _RdKafkaError) else None


def _reason(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    if isinstance(err, _RdKafkaError):
        return str(err.str())
    return str(exc)
