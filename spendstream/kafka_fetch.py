"""Read what a confluent-kafka consumer has ready, waiting only for the first message.

``Consumer.consume(n, timeout)`` returns once it holds ``n`` messages or once the whole timeout
has passed, so on a quiet topic every record it returns has waited out the timeout (measured on
the local broker: one record, ``consume(1000, 0.05)`` returned after 50 ms; ``poll(0.05)`` after
1-2 ms). Views that gateways read, state restores and latency probes must not add that wait.
"""

from __future__ import annotations

from typing import Any


def fetch_ready(consumer: Any, wait_s: float, max_messages: int = 1000) -> list[Any]:
    """Up to ``max_messages`` messages (errors and EOF events included, as ``consume`` gives).

    Blocks up to ``wait_s`` for the first one, then takes what is already fetched without
    waiting. An empty list means nothing arrived within ``wait_s``.
    """
    if max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, not {max_messages}")
    first = consumer.poll(wait_s)
    if first is None:
        return []
    if max_messages == 1:
        return [first]
    return [first, *consumer.consume(num_messages=max_messages - 1, timeout=0)]
