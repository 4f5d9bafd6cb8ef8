"""The event contract's fast paths, for producers and stream workers (public names).

A msgspec mirror of :class:`~schemas.UsageEvent` that only ever accepts: whatever it refuses
goes to the pydantic model, so the verdict and the error text are always the contract's
(docs/DESIGN.md, "The msgspec mirror; the pydantic model decides"). The implementation is in
``schemas/_wire.py``.
"""

from __future__ import annotations

from schemas._wire import (
    DecodedEvent,
    WireEvent,
    decode_dict,
    decode_usage,
    encode_dict,
    from_model,
    to_model,
)

__all__ = [
    "DecodedEvent",
    "WireEvent",
    "decode_dict",
    "decode_usage",
    "encode_dict",
    "from_model",
    "to_model",
]
