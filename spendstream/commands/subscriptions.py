"""``spendstream subscriptions``: load subscription files, show a user's record, top up credit."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

import typer

from spendstream.commands._common import console, fail, fail_on, settings_or_exit
from spendstream.commands._safe import safe_text
from spendstream.errors import SpendstreamError


def register(app: typer.Typer) -> None:
    """Add the ``subscriptions`` group."""
    subs_app = typer.Typer(
        help="Subscriptions (user -> plan schedule, prepaid credit) on the compacted topic.",
        no_args_is_help=True,
    )
    app.add_typer(subs_app, name="subscriptions")

    @subs_app.command("load")
    def load(
        path: Path | None = typer.Argument(
            None,
            help="YAML/JSON file: a list of subscriptions, or 'subscriptions: [...]' "
            "(default: SPENDSTREAM_SUBSCRIPTIONS_FILE).",
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Validate the file against the plans; publish nothing."
        ),
    ) -> None:
        """Validate a subscriptions file against the plans and publish every record."""
        from producers import load_subscriptions, publish_subscriptions
        from schemas.plans import SAMPLE_PLANS, load_plans

        settings = settings_or_exit()
        source = path or settings.subscriptions_file
        if source is None:
            fail("no file given and SPENDSTREAM_SUBSCRIPTIONS_FILE is not set", code=2)
        try:
            plans = load_plans(settings.plans_file or SAMPLE_PLANS)
            subs = load_subscriptions(source, plans=plans)
            if dry_run:
                console.print(f"{source}: {len(subs)} subscription(s) valid; nothing published")
                return
            sent = publish_subscriptions(settings, subs)
        except SpendstreamError as exc:
            fail_on(exc)
        console.print(f"published {sent} subscription(s) to {settings.topics.subscriptions}")

    @subs_app.command("show")
    def show(user_id: str = typer.Argument(..., help="The user.")) -> None:
        """Print a user's current subscription record (plan schedule and credit grants)."""
        from producers import read_subscription

        settings = settings_or_exit()
        try:
            sub = read_subscription(settings, user_id)
        except SpendstreamError as exc:
            fail_on(exc)
        if sub is None:
            fail(f"user {user_id!r} has no subscription on {settings.topics.subscriptions!r}")
        typer.echo(sub.model_dump_json(indent=2))

    @subs_app.command("top-up")
    def top_up(
        user_id: str = typer.Argument(..., help="The user."),
        amount: str = typer.Argument(..., help="USD of prepaid credit, e.g. 25 or 9.99."),
        credit_id: str | None = typer.Option(
            None,
            "--credit-id",
            help="Unique id of this purchase (e.g. the payment id); re-running with the same "
            "id changes nothing. Default: a new random id.",
        ),
    ) -> None:
        """Add prepaid credit to a user: drawn before overage billing; unblocks at the ceiling.

        The worker applies a new grant within about a second, even to a user who sends no
        requests (one blocked at the overage ceiling).
        """
        from pydantic import ValidationError

        from producers import grant_credit
        from schemas import CreditGrant

        settings = settings_or_exit()
        try:
            value = Decimal(amount)
        except InvalidOperation:
            fail(f"amount must be a decimal number of USD, got {amount!r}", code=2)
        try:
            grant = CreditGrant(
                credit_id=credit_id or f"cli-{uuid.uuid4().hex[:16]}",
                amount_usd=value,
                granted_at=datetime.now(UTC),
            )
        except ValidationError as exc:
            problems = "; ".join(e["msg"] for e in exc.errors(include_url=False))
            fail(f"invalid top-up: {problems}", code=2)
        try:
            sub = grant_credit(settings, user_id, grant)
        except SpendstreamError as exc:
            fail_on(exc)
        total = sum((c.amount_usd for c in sub.credits), Decimal(0))
        console.print(
            safe_text(
                f"{user_id}: credit {grant.credit_id} of {format(value, 'f')} USD recorded "
                f"({len(sub.credits)} grant(s), {format(total, 'f')} USD bought in all)"
            )
        )
