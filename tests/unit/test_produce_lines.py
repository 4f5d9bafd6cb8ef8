"""How ``spendstream produce`` splits its input: a table of cases, and a torn file whose one
line runs for tens of megabytes read without holding it."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas import MAX_EVENT_BYTES
from spendstream.cli import app
from spendstream.commands.traffic import _LINE_LIMIT, _SKIP_CHUNK, _bounded_lines

LONG = MAX_EVENT_BYTES * 6
# A line whose CR ends one skipped chunk and whose LF starts the next.
SPLIT = _LINE_LIMIT + _SKIP_CHUNK


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", []),
        (b"a\nbb\r\n\nccc", [(b"a", 2, 1), (b"bb", 4, 2), (b"", 1, 0), (b"ccc", 3, 3)]),
        # The largest event with a CRLF end is kept whole.
        (
            b"x" * MAX_EVENT_BYTES + b"\r\n",
            [(b"x" * MAX_EVENT_BYTES, MAX_EVENT_BYTES + 2, MAX_EVENT_BYTES)],
        ),
        # Longer than any event: skipped, its size still counted, the next line read.
        (b"y" * LONG + b"\r\nok\n", [(None, LONG + 2, LONG), (b"ok", 3, 2)]),
        (b"y" * LONG + b"\nok", [(None, LONG + 1, LONG), (b"ok", 2, 2)]),
        (b"y" * LONG, [(None, LONG, LONG)]),  # the file ends inside the line
        (b"z" * SPLIT + b"\r\nok\n", [(None, SPLIT + 2, SPLIT), (b"ok", 3, 2)]),
    ],
    ids=["empty", "endings", "largest-event", "long-crlf", "long-lf", "long-at-eof", "crlf-split"],
)
def test_lines_are_split_and_overlong_ones_skipped(
    data: bytes, expected: list[tuple[bytes | None, int, int]]
) -> None:
    assert list(_bounded_lines(io.BytesIO(data))) == expected


def test_a_torn_file_is_reported_without_holding_its_long_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPENDSTREAM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")
    size = 40_000_000
    path = tmp_path / "torn.jsonl"
    path.write_bytes(b"{" + b"\x00" * (size - 1) + b"\nnot json\n")
    tracemalloc.start()
    try:
        result = CliRunner().invoke(app, ["produce", str(path)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 1, result.output
    assert f"line 1: event is {size} bytes, over the {MAX_EVENT_BYTES} limit" in result.stderr
    assert "line 2: not JSON" in result.stderr
    assert "sent 0 events" in result.stdout and "2 invalid lines" in result.stdout
    assert peak < 8_000_000, f"{peak} bytes allocated at the peak for a {size}-byte line"
