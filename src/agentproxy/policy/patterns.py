"""Action patterns: globs and path templates over canonical action names.

`http:GET /v1/employees/{id}` matches `http:GET /v1/employees/42` and binds `id` to `42`.
In a pattern, `{name}` is one path segment, `{name...}` one or more segments, `*` any run
of characters within a segment, `**` anything (slashes included), and a pattern of a single
`*` matches every action. Everything else is literal and case-sensitive.

Matching is linear in the action's length, whatever the pattern: an action is the agent's to
choose, and a backtracking regex gave `*-*-*.csv` cubic time on a 3,000-character segment
(seconds of a frozen proxy, before the rule's agent was even looked at). A pattern with at most
one place where the split of the input is ambiguous (one wildcard besides an `http:*` method,
or one per segment with no `**` or `{name...}`) cannot backtrack more than once per
character, and runs on Python's `re` (~0.2 µs); any other runs on RE2 (google-re2: automata,
never backtracking; ~4 µs).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import re2

PROTOCOLS = ("http", "mcp", "grpc", "llm")
_TOKEN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}|\*\*|\*|[{}]")

T = TypeVar("T")


class PatternError(ValueError):
    pass


class _Matcher(Protocol):
    def fullmatch(self, string: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class ActionPattern:
    text: str
    regex: _Matcher  # re.Pattern, or an RE2 one where re could backtrack (see above)
    names: tuple[str, ...]
    literal_prefix: tuple[str, ...]
    source: str = ""  # the regex's source, for its case-insensitive twin

    def match(self, action: str, fold_case: bool = False) -> dict[str, str] | None:
        """The template bindings if `action` matches (still percent-encoded), else None.
        `fold_case`: whatever the case (the upstream reads paths so); bindings keep the case
        of `action`."""
        regex = _folded(self.source, is_linear_on_re(self)) if fold_case else self.regex
        m = regex.fullmatch(action)
        if m is None:
            return None
        return m.groupdict() if self.names else {}


def compile_pattern(text: str) -> ActionPattern:
    """Raises PatternError saying what is wrong with the pattern."""
    if text == "*":
        return ActionPattern(text, re.compile(r".*", re.DOTALL), (), (), ".*")
    protocol, sep, rest = text.partition(":")
    if not sep or protocol not in PROTOCOLS:
        raise PatternError(
            f'must start with one of {", ".join(p + ":" for p in PROTOCOLS)} or be "*"'
        )
    if protocol == "http":
        method, space, path = rest.partition(" ")
        if not space or not method or not path.startswith("/"):
            raise PatternError(
                'an http action is "http:METHOD /path" (METHOD may be *), or the operationId '
                "of an OpenAPI operation (http:createTransfer; named by the config's upstreams)"
            )
    parts: list[str] = []
    names: list[str] = []
    pos = 0
    wildcards = 0  # places where the input's split is not fixed by the literals around them
    per_segment: dict[int, int] = {}
    crosses = False  # a `**` or `{name...}`: a wildcard that may match '/'
    # `http:* /…`: the method's `*` cannot reach past the request line's " /" (a method
    # holds no space, a path starts with '/'), so its split is fixed: it is never ambiguous.
    method_star = len("http:*") if text.startswith("http:* ") else -1
    for m in _TOKEN.finditer(text):
        if m.group(0) not in "{}" and m.end() != method_star:
            wildcards += 1
            segment = text.count("/", 0, m.start())
            per_segment[segment] = per_segment.get(segment, 0) + 1
            crosses |= m.group(0) == "**" or bool(m.group(2))
        parts.append(re.escape(text[pos : m.start()]))
        piece = m.group(0)
        if piece in "{}":
            raise PatternError(f"unbalanced {piece!r} at column {m.start() + 1}")
        if m.group(1):
            name = m.group(1)
            if name == "query":
                raise PatternError("'query' is reserved: the query string is resource.query")
            if name in names:
                raise PatternError(f"template name {name!r} is used twice")
            names.append(name)
            parts.append(f"(?P<{name}>{'[^/]+(?:/[^/]+)*' if m.group(2) else '[^/]+'})")
        elif piece == "**":
            parts.append(".*")
        else:
            parts.append("[^/]*")
        pos = m.end()
    parts.append(re.escape(text[pos:]))
    source = "".join(parts)
    linear = wildcards <= 1 or (not crosses and max(per_segment.values()) <= 1)
    regex: _Matcher = re.compile(source, re.DOTALL) if linear else _re2(source)
    return ActionPattern(text, regex, tuple(names), _literal_prefix(text), source)


@functools.lru_cache(maxsize=4096)
def _folded(source: str, linear: bool) -> _Matcher:
    """The case-insensitive twin of a pattern's regex, compiled when first needed (only
    upstreams declared case-insensitive ask for it)."""
    if linear:
        return re.compile(source, re.DOTALL | re.IGNORECASE)
    return _re2(source, case_sensitive=False)


def is_linear_on_re(pattern: ActionPattern) -> bool:
    """Whether `pattern` runs on Python's `re` (see the module's docstring)."""
    return isinstance(pattern.regex, re.Pattern)


def _re2(source: str, *, case_sensitive: bool = True) -> _Matcher:
    options = re2.Options()
    options.dot_nl = True  # as re.DOTALL: an action may hold a newline (percent-decoded)
    options.case_sensitive = case_sensitive
    compiled: _Matcher = re2.compile(source, options)
    return compiled


def _literal_prefix(text: str) -> tuple[str, ...]:
    """The leading '/'-separated segments that hold no wildcard or template."""
    prefix: list[str] = []
    for segment in text.split("/"):
        if "*" in segment or "{" in segment:
            break
        prefix.append(segment)
    return tuple(prefix)


@dataclass(slots=True)
class _Node(Generic[T]):
    children: dict[str, _Node[T]] = field(default_factory=dict)
    entries: list[tuple[int, T]] = field(default_factory=list)
    # The candidates of a lookup that ends here (this node's and its ancestors' entries, in
    # insertion order), computed at the first such lookup after the last `add`.
    merged: tuple[T, ...] | None = None
    merged_at: int = -1


class PatternIndex(Generic[T]):
    """Finds the entries whose patterns could match an action without scanning them all.

    Entries sit in a trie under their pattern's literal leading segments; a lookup walks the
    action's segments and collects the entries met on the way, so a 10,000-rule policy costs
    what its few candidate rules cost. Candidates come back in insertion order.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._count = 0

    def add(self, pattern: ActionPattern, entry: T) -> None:
        node = self._root
        for segment in pattern.literal_prefix:
            node = node.children.setdefault(segment, _Node())
        node.entries.append((self._count, entry))
        self._count += 1

    def candidates(self, action: str, fold_case: bool = False) -> tuple[T, ...]:
        if fold_case:
            return self._folded_candidates(action)
        path = [self._root]
        node = self._root
        for segment in action.split("/"):
            child = node.children.get(segment)
            if child is None:
                break
            path.append(child)
            node = child
        if node.merged is None or node.merged_at != self._count:
            # Every lookup that ends at this node collects the same entries: sort them once.
            found = [pair for step in path for pair in step.entries]
            found.sort(key=_first)
            node.merged = tuple(entry for _, entry in found)
            node.merged_at = self._count
        return node.merged  # a tuple: shared by every lookup, and no copy per decision

    def _folded_candidates(self, action: str) -> tuple[T, ...]:
        """As `candidates`, with literal segments compared case-insensitively: every branch
        whose segment folds to the action's is walked (rare: case-insensitive upstreams)."""
        found: list[tuple[int, T]] = []
        level = [self._root]
        for segment in action.split("/"):
            for node in level:
                found.extend(node.entries)
            folded = segment.casefold()
            level = [
                child
                for node in level
                for key, child in node.children.items()
                if key.casefold() == folded
            ]
            if not level:
                break
        for node in level:
            found.extend(node.entries)
        found.sort(key=_first)
        return tuple(entry for _, entry in found)

    def __iter__(self) -> Iterator[T]:
        stack = [self._root]
        out: list[tuple[int, T]] = []
        while stack:
            node = stack.pop()
            out.extend(node.entries)
            stack.extend(node.children.values())
        out.sort(key=_first)
        return iter(entry for _, entry in out)


_first: Callable[[tuple[int, object]], int] = lambda pair: pair[0]  # noqa: E731
