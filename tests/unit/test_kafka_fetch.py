"""fetch_ready: wait for the first message only, then drain without waiting."""

from __future__ import annotations

from typing import Any

import pytest

from spendstream.kafka_fetch import fetch_ready


class _Recorder:
    """Stands in for a confluent-kafka Consumer; records the waits it was asked for."""

    def __init__(self, queued: list[str]) -> None:
        self.queued = list(queued)
        self.calls: list[tuple[str, int, float]] = []

    def poll(self, timeout: float) -> Any:
        self.calls.append(("poll", 1, timeout))
        return self.queued.pop(0) if self.queued else None

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        self.calls.append(("consume", num_messages, timeout))
        taken, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return taken


@pytest.mark.parametrize(
    ("queued", "max_messages", "got", "calls"),
    [
        ([], 1000, [], [("poll", 1, 0.2)]),
        (["a"], 1000, ["a"], [("poll", 1, 0.2), ("consume", 999, 0)]),
        (["a", "b", "c"], 2, ["a", "b"], [("poll", 1, 0.2), ("consume", 1, 0)]),
        (["a", "b"], 1, ["a"], [("poll", 1, 0.2)]),
    ],
)
def test_only_the_first_message_is_waited_for(
    queued: list[str], max_messages: int, got: list[str], calls: list[tuple[str, int, float]]
) -> None:
    consumer = _Recorder(queued)
    assert fetch_ready(consumer, 0.2, max_messages) == got
    assert consumer.calls == calls


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        fetch_ready(_Recorder(["a"]), 0.2, 0)
