"""``--batch-share``: which events move to the batch tier, and how the option is read."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendstream.errors import ConfigError
from spendstream.whatif import batch_selected, parse_batch_share

pytestmark = pytest.mark.unit

IDS = [f"evt-{i:06d}" for i in range(20_000)]


def test_the_selection_is_stable_nested_and_close_to_the_share() -> None:
    small = {e for e in IDS if batch_selected(e, Decimal("0.1"))}
    large = {e for e in IDS if batch_selected(e, Decimal("0.3"))}
    assert small <= large  # a larger share keeps every event a smaller one chose
    assert abs(len(large) / len(IDS) - 0.3) < 0.02
    assert abs(len(small) / len(IDS) - 0.1) < 0.02
    assert small == {e for e in IDS if batch_selected(e, Decimal("0.1"))}  # deterministic
    assert batch_selected("evt-000007", Decimal("0.3")) is ("evt-000007" in large)


def test_zero_and_one_choose_nothing_and_everything() -> None:
    assert not any(batch_selected(e, Decimal(0)) for e in IDS)
    assert all(batch_selected(e, Decimal(1)) for e in IDS)


def test_parse_batch_share() -> None:
    assert parse_batch_share(["pro=0.3", " team = 1 "]) == {
        "pro": Decimal("0.3"),
        "team": Decimal(1),
    }
    for bad in ("pro", "pro=1.5", "pro=-0.1", "=0.3", "pro=abc", "pro=NaN"):
        with pytest.raises(ConfigError):
            parse_batch_share([bad])
