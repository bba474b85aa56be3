"""Server-sent events (WHATWG HTML §9.2.6), the one place their grammar lives.

MCP streams JSON-RPC messages and LLM APIs stream chunks as `text/event-stream`; both adapters
read events with these functions, so a stream is cut into lines, fields and events the same
way wherever the proxy reads one. Pure: text in, values out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = ["BOM", "LINE_END", "LINE_END_TEXT", "data_of", "field", "lines"]

# §9.2.6: a line ends at CRLF, LF or CR; the stream may start with one U+FEFF, which is
# skipped.
LINE_END: Final = re.compile(rb"\r\n|\r|\n")
LINE_END_TEXT: Final = re.compile(r"\r\n|\r|\n")
BOM: Final = "\ufeff"
# A line with its ending, or the unterminated last line of the text.
_LINE: Final = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def lines(text: str, start: int = 0) -> Iterator[str]:
    """The lines of `text` from `start`, each with its line ending (the last may have none)."""
    for match in _LINE.finditer(text, start):
        yield match.group()


def field(line: str) -> tuple[str, str]:
    """A line (without its ending) as (field name, value): one space after the colon is
    not part of the value; a line without a colon is a field with an empty value; a comment
    (a line starting with ":") has the empty name."""
    name, colon, value = line.partition(":")
    return name, value[1:] if colon and value.startswith(" ") else value


def data_of(event_lines: Iterable[str]) -> str:
    """The event's data: the values of its `data` fields joined by LF. Lines may carry their
    endings."""
    values = [value for name, value in map(field, _strip_ends(event_lines)) if name == "data"]
    return "\n".join(values)


def _strip_ends(event_lines: Iterable[str]) -> Iterator[str]:
    for line in event_lines:
        yield line.rstrip("\r\n")
