"""The producer's msgspec fast path accepts only what the pydantic contract accepts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producers._wire import WireEvent, encode_dict
from schemas import UsageEvent, decode_event, event_from_obj
from spendstream.errors import InvalidEventError
from tests.unit.test_contract import BASE, event_dicts

pytestmark = pytest.mark.unit

_SCHEMA_NOISE = {"title", "description"}


def _norm(node: Any) -> Any:
    """A JSON Schema node without titles and descriptions, enums as sets."""
    if isinstance(node, list):
        return [_norm(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _norm(v) for k, v in node.items() if k not in _SCHEMA_NOISE}
    if "enum" in out:
        out["enum"] = sorted(out["enum"])
        out.pop("type", None)  # pydantic adds "type": "string" to a string enum
    return out


def test_wire_struct_has_the_models_fields_and_rules() -> None:
    ours = msgspec.json.schema(WireEvent)["$defs"]["WireEvent"]
    model = UsageEvent.model_json_schema()
    assert list(ours["properties"]) == list(model["properties"])  # same fields, same order
    assert ours["required"] == model["required"]
    for name, spec in model["properties"].items():
        assert _norm(ours["properties"][name]) == _norm(spec), name


def test_a_valid_event_takes_the_fast_path() -> None:
    fast = encode_dict(dict(BASE))
    assert fast is not None
    key, wire = fast
    assert key == BASE["user_id"]
    assert decode_event(wire) == event_from_obj(BASE)
    assert b'"schema_version"' not in wire  # defaults are left out


@settings(max_examples=300, deadline=None)
@given(event_dicts())
def test_every_valid_event_takes_the_fast_path(obj: dict[str, Any]) -> None:
    fast = encode_dict(obj)
    assert fast is not None, "the fast path refused a valid event"
    assert decode_event(fast[1]) == event_from_obj(obj)


_FIELDS = list(UsageEvent.model_fields)
_HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 5.0, 1.5, 10**12, 10**12 + 1, 2**64, -(2**63), float("nan"),
    "", " ", "x", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 256, "x" * 257, "é" * 128,
    "é" * 129, "\ud800", "\x00", "ok", "OK", "error", "1", "true", b"bytes", [], ["x"], {},
    {"k": "v"}, {"": "v"}, {"k": 1}, {1: "v"}, {"k": None}, {"k" * 65: "v"},
    {f"k{i}": "v" for i in range(33)}, {"k": "v" * 257},
    "2025-06-02T10:00:00+02:00", "2025-06-02T10:00:00Z", "2025-06-02T10:00:00z",
    "2025-06-02t10:00:00Z", "2025-06-02 10:00:00+02:00", "2025-06-02T10:00:00",
    "2025-06-02", "2025-06-02T10:00Z", "2025-06-02T10:00:00.1234567Z", "2025-06-02T23:59:60Z",
    "2025-06-02T10:00:00+24:00", "2025-06-02T10:00:00-00:00", "2025-06-02T10:00:00+0200",
    "20250602T100000Z", "2025-13-01T00:00:00Z", "0000-01-01T00:00:00Z", "1700000000",
    1_700_000_000, datetime(2025, 6, 2, 10, 0), datetime(2025, 6, 2, 10, 0, tzinfo=UTC),
    datetime(2025, 6, 2, 10, 0, tzinfo=timezone(timedelta(hours=-3))),
]  # fmt: skip


@st.composite
def broken_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event with one to three fields replaced, dropped, or an unknown one added."""
    obj = draw(event_dicts())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*_FIELDS, "unknown_field"]))
        if draw(st.integers(0, 5)) == 0:
            obj.pop(name, None)
        else:
            obj[name] = draw(st.sampled_from(_HOSTILE))
    return obj


def _model_verdict(obj: dict[str, Any]) -> UsageEvent | None:
    try:
        return event_from_obj(obj)
    except InvalidEventError:
        return None


@settings(max_examples=1500, deadline=None)
@given(broken_events())
def test_the_fast_path_accepts_nothing_the_contract_refuses(obj: dict[str, Any]) -> None:
    fast = encode_dict(obj)
    if fast is None:
        return  # refused: the producer asks the model, whose verdict stands
    model = _model_verdict(obj)
    assert model is not None, f"fast path accepted what the contract refuses: {obj!r}"
    assert fast[0] == model.user_id
    assert decode_event(fast[1]) == model


@pytest.mark.parametrize("field", _FIELDS)
def test_each_hostile_value_in_each_field(field: str) -> None:
    # The table behind the property above, exhaustively: every hostile value in this field.
    wrong = []
    for value in _HOSTILE:
        obj = {**BASE, field: value}
        fast = encode_dict(obj)
        if fast is not None and (
            (model := _model_verdict(obj)) is None or decode_event(fast[1]) != model
        ):
            wrong.append(value)
    assert not wrong, f"fast path disagrees with the contract on {field} = {wrong!r}"
