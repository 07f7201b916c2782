"""Text that loraq prints, made safe for a terminal and a Markdown page.

Names, paths, messages and log lines can come from hostile files: a dataset name
with ``ESC ]0;`` retitles the terminal window, one with ``\\n`` forges a line
(``FAKE: PASS``), a right-to-left override reorders what a person reads. Every name
and message the command line prints goes through :func:`printable` (one line) or
:func:`printable_lines` (logs, where newlines are the content), and every value
quoted in an error through :func:`excerpt` (short as well as safe). The Markdown
report escapes its cells with :func:`md_cell`.

Control characters become visible escapes (``\\x1b``, ``\\n``, ``\\u202e``), so
nothing is lost and nothing acts on the terminal.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

#: C0 controls, DEL, C1 controls, the line and paragraph separators, the bidirectional
#: controls (Trojan Source) and lone surrogates (which cannot even be encoded).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_IN_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"
                              "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

#: What Markdown reads as markup in running text: code, emphasis, links, a table's cell border.
_MD_SPECIAL = re.compile(r"[`*_\[\]|]")

#: Characters of a value quoted in an error message.
EXCERPT_CHARS = 80


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: Any) -> str:
    """``text`` as one line with every control character escaped."""
    return _UNSAFE.sub(_escape, str(text))


def printable_lines(text: str) -> str:
    """``text`` with control characters escaped except newlines and tabs (a log, several lines)."""
    return _UNSAFE_IN_LINES.sub(_escape, text)


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, escaped ``repr`` of ``value`` for an error message: never the whole input."""
    # reprlib bounds the work as well as the text: a value can be an alias bomb's billion items.
    shorter = reprlib.Repr()
    shorter.maxlevel, shorter.maxlist, shorter.maxdict, shorter.maxtuple, shorter.maxset = 3, 8, 8, 8, 8
    shorter.maxstring = shorter.maxother = shorter.maxlong = limit
    try:
        text = shorter.repr(value)
    except (RecursionError, ValueError):  # nested past the interpreter's limit; an int too long to print
        text = f"<a {type(value).__name__}>"
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_cell(text: Any) -> str:
    """``text`` for a Markdown table cell or line: no raw HTML, no table break, no control characters."""
    escaped = printable(text).replace("\\", "\\\\")
    escaped = escaped.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(lambda match: "\\" + match.group(), escaped)
