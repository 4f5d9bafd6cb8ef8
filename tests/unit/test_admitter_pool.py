"""The gateway's local path: pooled reservations handed out without a network call (no broker).

The strict path needs the broker and a worker (tests/integration/test_admission_stream.py);
what is pure here is the pool: filled from an answer, popped per call of the same shape, each
one carrying the cost it holds, and gone when empty.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from producers import Admitter
from schemas import MAX_RELEASE, AdmissionAnswer, AdmissionRequest, decode_request, pool_ids
from spendstream.errors import KafkaError
from spendstream.settings import Settings

pytestmark = pytest.mark.unit


def _answer(admitter: Admitter, pool: int) -> None:
    request = AdmissionRequest(
        org_id="o",
        user_id="u",
        reservation_id="r",
        gateway=admitter.gateway,
        model="gpt-4o",
        input_tokens=100,
        output_tokens=10,
        pool=pool,
    )
    answer = AdmissionAnswer(
        reservation_id="r",
        gateway=admitter.gateway,
        user_id="u",
        action="allow",
        reason="ok",
        model="gpt-4o",
        cost="0.00035",
        pooled=pool_ids("r", pool),
    )
    ticket = admitter._ticket(request, answer)
    assert (ticket.local, ticket.cost) == (False, Decimal("0.00035"))


def test_pooled_reservations_are_handed_out_locally_once_each() -> None:
    admitter = Admitter(Settings(), gateway="gw")
    _answer(admitter, 3)
    assert admitter.pooled("u", "gpt-4o", 100, 10) == 3
    tickets = [
        admitter.admit("u", "o", "gpt-4o", input_tokens=100, output_tokens=10) for _ in range(3)
    ]
    assert [t.reservation_id for t in tickets] == ["r.1", "r.2", "r.3"]
    assert all(t.local and t.allowed and t.cost == Decimal("0.00035") for t in tickets)
    assert admitter.local_decisions == 3
    assert admitter._pools == {}  # an emptied pool leaves nothing behind
    # The next call of that shape must ask the worker: not started here, so it says so.
    with pytest.raises(KafkaError, match="not started"):
        admitter.admit("u", "o", "gpt-4o", input_tokens=100, output_tokens=10)


def test_a_pool_serves_only_its_own_shape() -> None:
    admitter = Admitter(Settings(), gateway="gw")
    _answer(admitter, 2)
    for model, inp, out in (("gpt-4o", 101, 10), ("gpt-4o", 100, 11), ("gpt-4o-mini", 100, 10)):
        with pytest.raises(KafkaError):
            admitter.admit("u", "o", model, input_tokens=inp, output_tokens=out)
    assert admitter.pooled("u", "gpt-4o", 100, 10) == 2


def test_expired_pool_entries_are_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    admitter = Admitter(Settings(), gateway="gw")
    _answer(admitter, 2)
    import producers._admit as admit_module

    later = admit_module.time.monotonic() + admitter._pool_life_s + 1
    monkeypatch.setattr(admit_module.time, "monotonic", lambda: later)
    with pytest.raises(KafkaError):
        admitter.admit("u", "o", "gpt-4o", input_tokens=100, output_tokens=10)
    assert admitter._pools == {}


def test_the_answers_end_offset_is_asked_again_while_the_topic_is_young() -> None:
    from confluent_kafka import KafkaError as CKafkaError
    from confluent_kafka import KafkaException, TopicPartition

    class YoungTopic:
        """Answers "not leader" twice, as a topic created a moment ago does, then its end."""

        def __init__(self, code: int) -> None:
            self.calls = 0
            self.code = code

        def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
            self.calls += 1
            if self.calls <= 2:
                raise KafkaException(CKafkaError(self.code))
            return 0, 42

    admitter = Admitter(Settings(), gateway="gw")
    young = YoungTopic(CKafkaError.NOT_LEADER_FOR_PARTITION)
    assert admitter._end_offset(young, TopicPartition("t", 0)) == 42
    assert young.calls == 3
    denied = YoungTopic(CKafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        admitter._end_offset(denied, TopicPartition("t", 0))
    assert denied.calls == 1  # not transient: said at once


class _Recorder:
    """A confluent-kafka Producer's surface the Admitter uses, recording what it sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any = None) -> None:
        self.sent.append((topic, key, value))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


def _recording(admitter: Admitter) -> _Recorder:
    recorder = _Recorder()
    admitter._producer = recorder
    return recorder


def test_close_gives_back_the_unused_pool_in_one_release_per_user() -> None:
    admitter = Admitter(Settings(), gateway="gw")
    _answer(admitter, 5)
    admitter.admit("u", "o", "gpt-4o", input_tokens=100, output_tokens=10)  # r.1 used
    sent = _recording(admitter)
    admitter.close()
    assert len(sent.sent) == 1
    topic, key, value = sent.sent[0]
    release = decode_request(value)
    assert (topic, key) == (Settings().topics.events, b"u")
    assert (release.org_id, release.user_id, release.gateway) == ("o", "u", "gw")
    assert getattr(release, "reservation_ids", None) == ["r.2", "r.3", "r.4", "r.5"]
    assert admitter.released == 4 and admitter._pools == {}


def test_expired_pool_entries_are_given_back_when_met(monkeypatch: pytest.MonkeyPatch) -> None:
    admitter = Admitter(Settings(), gateway="gw")
    _answer(admitter, 3)
    sent = _recording(admitter)
    import producers._admit as admit_module

    later = admit_module.time.monotonic() + admitter._pool_life_s + 1
    monkeypatch.setattr(admit_module.time, "monotonic", lambda: later)
    assert admitter._local("u", "gpt-4o", 100, 10) is None
    assert [getattr(decode_request(v), "reservation_ids", None) for _, _, v in sent.sent] == [
        ["r.1", "r.2", "r.3"]
    ]
    admitter.close()  # nothing left to give back
    assert len(sent.sent) == 1 and admitter.released == 3


def test_a_release_of_many_ids_is_cut_to_the_contract_limit() -> None:
    admitter = Admitter(Settings(), gateway="gw")
    sent = _recording(admitter)
    admitter._release("u", "o", [f"x.{i}" for i in range(2 * MAX_RELEASE + 1)])
    sizes = [len(getattr(decode_request(v), "reservation_ids", [])) for _, _, v in sent.sent]
    assert sizes == [MAX_RELEASE, MAX_RELEASE, 1]
