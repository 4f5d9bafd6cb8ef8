"""The worker's commit protocol (stream_processors._checkpoint.Checkpointer) on fakes.

What matters is the order: a batch's outputs are acknowledged before the state that says they
were produced is written, states before watermarks, and an offset is committed only once its
batch's state is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from spendstream.errors import ConfigError
from stream_processors._checkpoint import Checkpointer
from stream_processors.faust_patches import require_tested_faust

pytestmark = pytest.mark.unit


class Log:
    def __init__(self) -> None:
        self.steps: list[str] = []
        self.committed: list[dict[Any, int]] = []


class FakeOutput:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def flush(self) -> None:
        self.log.steps.append("flush")


class FakeState:
    """Each flush_changelog sends one change; apply_acked stores what a flush acknowledged."""

    def __init__(self, name: str, log: Log) -> None:
        self.name, self.log = name, log
        self.sent = 0

    def flush_changelog(self, out: Any, *, previous: bool = False) -> int:
        self.log.steps.append(f"{self.name}{'(held)' if previous else ''}")
        self.sent += 1
        return 1

    def hold(self) -> None:
        self.log.steps.append(f"{self.name}.hold")

    def sent_mark(self) -> int:
        return self.sent

    def apply_acked(self, upto: int) -> int:
        if upto:
            self.log.steps.append(f"{self.name}.store({upto})")
            self.sent -= upto
        return upto


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(interval_s: float = 0.5) -> tuple[Checkpointer, Log, Clock]:
    log, clock = Log(), Clock()

    async def commit(offsets: Mapping[Any, int]) -> None:
        log.committed.append(dict(offsets))
        log.steps.append("commit")

    cp = Checkpointer(
        [FakeState("seen", log), FakeState("caps", log)],
        FakeState("marks", log),
        commit,
        interval_s=interval_s,
        clock=clock,
    )
    cp.output = FakeOutput(log)  # type: ignore[assignment]
    return cp, log, clock


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_batch_acknowledges_outputs_then_writes_states_then_holds_watermarks() -> None:
    cp, log, _ = make()
    assert run(cp.batch_done({"p0": 10})) == {}  # nothing was durable before
    assert log.steps == ["flush", "marks(held)", "seen", "caps", "marks.hold"]
    assert cp.pending == {"p0": 10}


def test_offsets_become_committable_only_after_the_next_flush() -> None:
    cp, _, _ = make()
    run(cp.batch_done({"p0": 10, "p1": 4}))
    ready = run(cp.batch_done({"p0": 20}))
    assert ready == {"p0": 10, "p1": 4}  # the flush of batch 2 made batch 1's state durable
    assert cp.pending == {"p0": 20}


def test_commits_at_most_every_interval_and_never_lower() -> None:
    cp, log, clock = make(interval_s=0.5)
    run(cp.commit_due({"p0": 10}))
    assert log.committed == [{"p0": 10}]
    clock.now += 0.1
    run(cp.commit_due({"p0": 15}))
    run(cp.commit_due({"p0": 12, "p1": 3}))
    assert log.committed == [{"p0": 10}]  # within the interval: kept for later
    assert cp.committable == {"p0": 15, "p1": 3}
    clock.now += 0.5
    run(cp.commit_due({}))
    assert log.committed[-1] == {"p0": 15, "p1": 3}


def test_idle_makes_the_last_batch_durable_and_commits_it_now() -> None:
    cp, log, _ = make(interval_s=60)
    run(cp.batch_done({"p0": 10}))
    log.steps.clear()
    run(cp.idle())
    assert log.steps == [
        "flush",
        "seen.store(1)",
        "caps.store(1)",
        "marks.store(1)",  # the previous batch's watermarks, sent by batch_done
        "marks(held)",
        "flush",
        "marks.store(1)",
        "commit",
    ]
    assert log.committed == [{"p0": 10}] and not cp.pending and not cp.committable


def test_only_changes_sent_before_a_flush_are_stored_locally() -> None:
    # The local store follows the changelog: a change sent while a flush waits (by a task
    # that does not hold the lock) is not acknowledged by that flush.
    cp, log, _ = make()
    run(cp.batch_done({"p0": 10}))
    seen = cp._states[0]

    class SendsDuringFlush(FakeOutput):
        async def flush(self) -> None:
            seen.flush_changelog(None)  # sent while this flush waits
            await super().flush()

    cp.output = SendsDuringFlush(log)  # type: ignore[assignment]
    log.steps.clear()
    run(cp.flush())
    assert "seen.store(1)" in log.steps
    assert seen.sent_mark() == 1  # the change sent during the flush waits for the next one


def test_a_rebalance_forgets_what_was_not_committed() -> None:
    cp, log, _ = make(interval_s=60)
    run(cp.batch_done({"p0": 10}))
    run(cp.batch_done({"p0": 20}))
    run(cp.commit_due({"p9": 1}))  # first commit goes; then within the interval
    run(cp.commit_due({"p0": 10}))
    cp.rebalanced()
    assert not cp.pending and not cp.committable
    run(cp.idle())
    assert log.committed == [{"p9": 1}]  # nothing of before the rebalance


def test_without_an_output_producer_nothing_is_pending_or_committed() -> None:
    cp, log, _ = make()
    cp.output = None
    assert run(cp.batch_done({"p0": 10})) == {}
    assert not cp.pending
    run(cp.idle())
    assert log.committed == []


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.15.3", True), ("0.15.99", True), ("0.16.0", False), ("0.11.3", False), ("x", False)],
)
def test_untested_faust_versions_are_refused(version: str, ok: bool) -> None:
    if ok:
        require_tested_faust(version)
    else:
        with pytest.raises(ConfigError, match="faust-streaming"):
            require_tested_faust(version)
