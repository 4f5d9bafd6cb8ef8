"""``gc_tuned``: the worker collects cycles less often, and everything is restored after."""

from __future__ import annotations

import gc

from spendstream.worker import GC_GEN0_THRESHOLD, gc_tuned


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_thresholds_and_freeze_are_restored() -> None:
    before = gc.get_threshold()
    with gc_tuned():
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_cycles_are_still_collected_inside() -> None:
    with gc_tuned():
        gc.collect()
        for _ in range(1000):
            _Cycle()
        assert any(type(o) is _Cycle for o in gc.get_objects())
        gc.collect()
        assert not any(type(o) is _Cycle for o in gc.get_objects())
