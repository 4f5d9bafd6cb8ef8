"""Stored data made safe to show: on a terminal, through rich, and in CSV.

Ids, model names, org ids and reasons come from the events, so they may hold terminal escape
sequences, other control characters, bidirectional overrides or text that rich would read as
markup. Everything that prints such data goes through one of these helpers:

- :func:`printable`: control characters shown as escapes (``\\x1b``, ``\\u202e``), never sent;
- :func:`safe_text`: a rich :class:`~rich.text.Text` of :func:`printable` text (no markup and
  no emoji codes are parsed from it), for table cells, titles and whole messages;
- :func:`markup_safe`: :func:`printable` text with rich markup escaped, for data placed inside
  a markup string;
- :func:`csv_cell`: a cell a spreadsheet will not run as a formula.

JSON output needs none of this: :func:`json.dumps` escapes every control character.
"""

from __future__ import annotations

import re

from rich.markup import escape
from rich.text import Text

# C0 controls, DEL, C1 controls (0x9b alone is a CSI on some terminals), the bidi marks,
# embeddings, overrides and isolates that reorder what is shown (Trojan Source), and the
# line and paragraph separators that some terminals treat as a new line.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# A plain decimal number (``-1.5``, ``+3``, ``2e-05``): a spreadsheet reads it as a number,
# not as a formula, so it keeps its sign.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")

# Cell starts that make a spreadsheet evaluate a formula (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with every control or bidi character shown as an escape (``\\x1b``).

    Characters in ``keep`` (such as ``"\\n"`` for a multi-line message) pass unchanged.
    """
    return _UNSAFE.sub(lambda m: m[0] if m[0] in keep else _escaped(m[0]), text)


def markup_safe(text: str, *, keep: str = "") -> str:
    """:func:`printable` text with rich markup escaped: for data inside a markup string."""
    return escape(printable(text, keep=keep))


def safe_text(text: str, style: str = "", *, keep: str = "") -> Text:
    """A rich ``Text`` of :func:`printable` text: printed literally, markup and emoji codes too."""
    return Text(printable(text, keep=keep), style=style)


def csv_cell(text: str, *, number: bool = False) -> str:
    """``text`` as a CSV cell that a spreadsheet shows rather than evaluates.

    Text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
    ``'`` unless it is a number (``number=True``, or text such as ``-1.5``): negative amounts
    stay numbers.
    """
    if number or not text.startswith(_FORMULA_START) or _NUMBER.fullmatch(text):
        return text
    return "'" + text
