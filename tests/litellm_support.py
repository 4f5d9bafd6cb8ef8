"""What the LiteLLM plug-in's tests share (unit and broker tiers), as a pytest plugin.

litellm is imported by the fixture, not here: every test session loads this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

# LiteLLM copies its callbacks into these lists on first use, one logger per class.
CALLBACK_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


@pytest.fixture
def callbacks() -> Iterator[list[Any]]:
    """``litellm.callbacks``, empty for one test; every callback list restored afterwards."""
    import litellm

    saved = {name: getattr(litellm, name) for name in CALLBACK_LISTS}
    for name in CALLBACK_LISTS:
        setattr(litellm, name, [])
    try:
        yield litellm.callbacks
    finally:
        for name, value in saved.items():
            setattr(litellm, name, value)
