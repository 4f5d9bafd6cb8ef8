"""Subscriptions: loaded from files, published to the compacted topic, topped up with credit."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from producers._producer import UsageProducer
from schemas import CreditGrant, Subscription
from spendstream.errors import ConfigError
from spendstream.settings import Settings

if TYPE_CHECKING:
    from schemas.plans import PlanCatalog


def encode_subscription(sub: Subscription) -> bytes:
    """The wire form of a subscription record: compact JSON of its JSON-mode dump."""
    return orjson.dumps(sub.model_dump(mode="json"))


def publish_subscriptions(
    settings: Settings, subs: Iterable[Subscription], *, timeout_s: float = 60.0
) -> int:
    """Produce every subscription to ``settings.topics.subscriptions`` keyed by ``user_id``.

    Returns once all of them are acknowledged; raises :class:`DeliveryError` if any was not.
    The topic is compacted, so re-publishing a user's record replaces the previous one.
    """
    producer = UsageProducer(settings, topic=settings.topics.subscriptions)
    count = 0
    try:
        for sub in subs:
            producer.send_raw(sub.user_id, encode_subscription(sub))
            count += 1
    finally:
        producer.close(timeout_s)
    return count


def load_subscriptions(path: str | Path, *, plans: PlanCatalog | None = None) -> list[Subscription]:
    """Read and validate a subscriptions YAML/JSON file (``subscriptions:`` list, or a list).

    Every record is checked (the :class:`~schemas.Subscription` rules, one record per user,
    and, with ``plans``, that each plan id exists); one :class:`ConfigError` lists every
    problem with the record's index and user. Money is read exactly (YAML floats as decimals).
    """
    from pydantic import ValidationError

    from schemas.plans import exact_yaml

    path = Path(path)
    try:
        data = exact_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read subscriptions file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    items = data.get("subscriptions") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list of subscriptions (or 'subscriptions: [...]')")
    subs: list[Subscription] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        who = item.get("user_id", "?") if isinstance(item, dict) else "?"
        try:
            sub = Subscription.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                where = ".".join(str(p) for p in err["loc"]) or "record"
                problems.append(f"subscriptions[{i}] ({who}): {where}: {err['msg']}")
            continue
        if sub.user_id in seen:
            problems.append(
                f"subscriptions[{i}] ({who}): user already listed at [{seen[sub.user_id]}]"
            )
            continue
        seen[sub.user_id] = i
        if plans is not None:
            problems.extend(
                f"subscriptions[{i}] ({who}): unknown plan {p.plan_id!r}"
                for p in sub.plans
                if p.plan_id not in plans
            )
        subs.append(sub)
    if problems:
        count = len(problems)
        raise ConfigError(
            f"{path}: {count} problem{'s' if count != 1 else ''} in the subscriptions:\n"
            + "\n".join(f"  - {p}" for p in problems[:50])
            + (f"\n  ... and {count - 50} more" if count > 50 else "")
        )
    return subs


def read_subscription(
    settings: Settings, user_id: str, *, timeout_s: float = 30.0
) -> Subscription | None:
    """The user's current record on the subscriptions topic (``None``: no record)."""
    from producers._view import CompactedTopicView

    view = CompactedTopicView(
        settings.kafka.confluent_config(),
        settings.topics.subscriptions,
        Subscription.model_validate_json,
    )
    try:
        view.start(wait_s=timeout_s)
        return view.get(user_id)
    finally:
        view.close()


def grant_credit(settings: Settings, user_id: str, grant: CreditGrant) -> Subscription:
    """Append ``grant`` to the user's subscription record and publish it.

    The worker tops up the user's wallet once per ``credit_id`` (re-running with the same id
    changes nothing) and, if the user was blocked at the overage ceiling, unblocks them.
    Raises :class:`ConfigError` when the user has no subscription.
    """
    current = read_subscription(settings, user_id)
    if current is None:
        raise ConfigError(
            f"user {user_id!r} has no subscription on {settings.topics.subscriptions!r}"
        )
    updated = current.with_credit(grant)
    if updated is not current:
        publish_subscriptions(settings, [updated])
    return updated
