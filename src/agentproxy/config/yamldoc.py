"""YAML with positions, and a reader that collects every problem before failing.

PyYAML's `compose` keeps the line and column of every node; we build plain values from the
nodes ourselves so that we can remember where each value was written, refuse duplicate keys
(which `safe_load` silently resolves to the last one) and point every error at its line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from agentproxy.config.model import Position

T = TypeVar("T")
# libyaml's parser keeps marks too and is ~10x faster on large policies.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True, order=True)
class Issue:
    """One problem in one file, sortable by place."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """Every problem found, sorted by file and line. `str()` is what the user should read."""

    def __init__(self, issues: Iterable[Issue]) -> None:
        self.issues = sorted(set(issues))
        super().__init__("\n".join(str(i) for i in self.issues))


class Document:
    """One YAML file: its values, where each was written, and the problems found in it."""

    def __init__(self, file: str, issues: list[Issue]) -> None:
        self.file = file
        self.issues = issues
        self.positions: dict[str, Position] = {}

    # -- parsing ---------------------------------------------------------------------------

    def parse(self, text: str) -> Any:
        """Returns the document's value, or None (with an issue recorded) if it is not YAML."""
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            return self._build(node, "$", loader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            self.issues.append(Issue(self.file, line, col, "", f"invalid YAML: {exc.problem}"))
            return None
        except yaml.YAMLError as exc:
            self.issues.append(Issue(self.file, 1, 1, "", f"invalid YAML: {exc}"))
            return None
        finally:
            loader.dispose()

    def _build(self, node: yaml.Node, path: str, loader: yaml.SafeLoader) -> Any:
        self.positions[path] = Position(
            self.file, node.start_mark.line + 1, node.start_mark.column + 1
        )
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # resolves `<<` merge keys
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)
                if not isinstance(key, str):
                    self._issue_at(key_node, path, f"keys must be strings, not {key!r}")
                    continue
                child = f"{path}.{key}"
                if key in out:
                    self._issue_at(key_node, child, "duplicate key")
                    continue
                # the key's position is the more useful one for "unknown key" errors
                self.positions[child + "#key"] = Position(
                    self.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1
                )
                out[key] = self._build(value_node, child, loader)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, f"{path}[{i}]", loader) for i, item in enumerate(node.value)]
        return loader.construct_object(node)

    def _issue_at(self, node: yaml.Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.issues.append(Issue(self.file, mark.line + 1, mark.column + 1, path, message))

    # -- reporting -------------------------------------------------------------------------

    def position(self, path: str) -> Position:
        probe = path
        while probe:
            if probe in self.positions:
                return self.positions[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return Position(self.file, 1, 1)

    def error(self, path: str, message: str) -> None:
        pos = self.positions.get(path + "#key") or self.position(path)
        self.issues.append(Issue(self.file, pos.line, pos.column, path, message))

    # -- typed reading ---------------------------------------------------------------------

    def mapping(self, value: Any, path: str, allowed: Iterable[str]) -> dict[str, Any]:
        """Checks `value` is a mapping with only `allowed` keys; returns it (or {})."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, not {_kind(value)}")
            return {}
        known = list(allowed)
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = (
                    f' (did you mean "{close[0]}"?)' if close else f" (allowed: {', '.join(known)})"
                )
                self.error(f"{path}.{key}", f"unknown key{hint}")
        return value

    def get(
        self,
        section: dict[str, Any],
        path: str,
        key: str,
        kind: type[T],
        default: T | None = None,
        *,
        required: bool = False,
    ) -> T | None:
        """One typed value; records an issue and returns `default` when it is wrong."""
        if key not in section or section[key] is None:
            if required:
                self.error(path, f'missing required key "{key}"')
            return default
        value = section[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.error(f"{path}.{key}", f"must be {kind.__name__}, not {_kind(value)}")
            return default
        return value

    def strings(
        self, section: dict[str, Any], path: str, key: str, *, required: bool = False
    ) -> tuple[str, ...]:
        """A list of strings (a single string is accepted as a one-item list)."""
        value = section.get(key)
        if value is None:
            if required:
                self.error(path, f'missing required key "{key}"')
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(f"{path}.{key}", "must be a list of strings")
            return ()
        return tuple(value)

    def duration(self, section: dict[str, Any], path: str, key: str, default: float) -> float:
        value = section.get(key)
        if value is None:
            return default
        seconds = parse_duration(value)
        if seconds is None:
            self.error(
                f"{path}.{key}",
                f'invalid duration {value!r} (write e.g. "50ms", "30s", "15m", "24h")',
            )
            return default
        return seconds

    def choice(
        self, section: dict[str, Any], path: str, key: str, options: Iterable[str], default: str
    ) -> str:
        value = section.get(key, default)
        allowed = list(options)
        if value not in allowed:
            self.error(f"{path}.{key}", f"must be one of {', '.join(allowed)}, not {value!r}")
            return default
        return str(value)

    def check(self, ok: bool, path: str, message: str) -> bool:
        if not ok:
            self.error(path, message)
        return ok

    def each(self, value: Any, path: str, read: Callable[[Any, str], T | None]) -> list[T]:
        """Reads every item of a list with `read(item, item_path)`, skipping failed ones."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"must be a list, not {_kind(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            got = read(item, f"{path}[{i}]")
            if got is not None:
                out.append(got)
        return out


def parse_duration(value: Any) -> float | None:
    """`"50ms"`, `"30s"`, `"1h30m"` → seconds; a bare number is seconds. None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    if not isinstance(value, str) or not value:
        return None
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if pos == len(value) else None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
