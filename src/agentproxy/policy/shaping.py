"""Obligations on an answer: fields removed from a JSON answer, list items kept by condition.

A rule that lets a call through may shape what comes back (`obligations: {redact_fields:
["salary", "items[].ssn"], keep_items: {path: items, when: 'item.manager ==
principal.user'}}`): the essay's "cannot read salary data" and "employee records for the
requesting user's direct reports" as policy. Paths are dotted member names; `[]` after a name
(or alone, first) stands for every item of a list; `.` alone names the answer itself (a list
to filter). Shaping is exact or refused: where the answer has another shape than the path
says (an object where a list should be), the answer is refused, never passed on half-shaped.
Pure: a parsed document in, the shaped document and what was removed out.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["EACH", "FieldPath", "ShapeError", "Shaped", "keep_items", "parse_path", "redact"]

# A path step: a member name, or EACH (every item of a list).
EACH: Final = None
_STEP = re.compile(r"([^.\[\]\s]+)?((?:\[\])*)")


class ShapeError(ValueError):
    """The answer does not have the shape a path says; the message names the path."""


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A parsed path: `steps` are member names and EACH, from the answer's root."""

    text: str
    steps: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Shaped:
    """What shaping removed: fields (members deleted) and items (list entries dropped)."""

    fields: int = 0
    items: int = 0


def parse_path(text: str, *, names_list: bool = False) -> FieldPath:
    """`salary`, `employee.salary`, `items[].ssn`, `[].ssn`; for a list to filter
    (`names_list`), also `items`, `groups[].members` and `.` (the answer itself).

    Raises ValueError naming what is wrong: an empty step, a character other than a member
    name's, or (for a field) a path that ends in `[]` instead of a member name.
    """
    if names_list and text == ".":
        return FieldPath(text, ())
    if not text or text.startswith(".") or text.endswith(".") or ".." in text:
        raise ValueError(f"path {text!r}: member names separated by '.', like items[].ssn")
    steps: list[str | None] = []
    for index, part in enumerate(text.split(".")):
        match = _STEP.fullmatch(part)
        if match is None or (match.group(1) is None and (index > 0 or not match.group(2))):
            raise ValueError(
                f"path {text!r}: {part!r} is not a member name (optionally followed by [])"
            )
        if match.group(1) is not None:
            steps.append(match.group(1))
        steps.extend(EACH for _ in range(len(match.group(2)) // 2))
    if not names_list and steps[-1] is EACH:
        raise ValueError(
            f"path {text!r}: ends in [], which names list items, not a field to remove"
        )
    return FieldPath(text, tuple(steps))


def redact(document: Any, path: FieldPath) -> int:
    """Removes the member `path` names wherever it is (in place); returns how many were.

    Raises ShapeError where the answer has another shape than the path says.
    """
    *way, last = path.steps
    removed = 0
    for holder in _walk(document, tuple(way), path):
        if holder is None:
            continue
        if not isinstance(holder, dict):
            raise ShapeError(f"{path.text}: expected an object, the answer has {_kind(holder)}")
        for key in _members(holder, last):
            del holder[key]
            removed += 1
    return removed


def _fold(name: str) -> str:
    return name.lower() if name.isascii() else unicodedata.normalize("NFKC", name).casefold()


def _members(holder: dict[str, Any], name: str | None) -> list[str]:
    """The keys of `holder` that are `name` to a client matching names case-insensitively
    (Go's encoding/json, System.Text.Json with PropertyNameCaseInsensitive, Jackson): an
    upstream answering {"Salary": 1} or {"Items": [...]} must not pass a rule written
    for salary or items unshaped."""
    if name is None:
        return []
    folded = _fold(name)
    return [key for key in holder if key == name or _fold(key) == folded]


def keep_items(document: Any, path: FieldPath, keep: Callable[[Any], bool]) -> int:
    """Keeps, of each list `path` names, the items `keep` admits (in place); returns how many
    were dropped. Raises ShapeError where the answer has another shape than the path says."""
    dropped = 0
    for found in _walk(document, path.steps, path):
        if found is None:
            continue
        if not isinstance(found, list):
            raise ShapeError(f"{path.text}: expected a list, the answer has {_kind(found)}")
        kept = [item for item in found if keep(item)]
        dropped += len(found) - len(kept)
        found[:] = kept
    return dropped


def _walk(value: Any, steps: tuple[str | None, ...], path: FieldPath) -> list[Any]:
    """The values `steps` reach from `value` (None where a member is absent or null)."""
    level = [value]
    for step in steps:
        following: list[Any] = []
        for current in level:
            if current is None:
                continue
            if step is EACH:
                if not isinstance(current, list):
                    raise ShapeError(
                        f"{path.text}: expected a list, the answer has {_kind(current)}"
                    )
                following.extend(current)
            elif isinstance(current, dict):
                found = _members(current, step)
                if found:
                    following.extend(current[key] for key in found)
                else:
                    following.append(None)
            else:
                raise ShapeError(
                    f"{path.text}: expected an object with {step!r}, the answer has "
                    f"{_kind(current)}"
                )
        level = following
    return level


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"
