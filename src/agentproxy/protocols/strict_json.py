"""Strict JSON: the one parser for request bodies the proxy authorizes.

A body is decided on what it means to us, and executed on what it means to the upstream's
parser. Wherever parsers could disagree, the body is refused instead of guessed at: duplicate
keys (first wins in some parsers, last in others), NaN and Infinity, numbers outside 64 bits,
lone surrogates, a byte order mark, nesting deeper than `MAX_DEPTH`. Pure: bytes in, values
out. `parse_answer` reads what an upstream sent (to filter it), with the same parser but
without the request-only checks.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

__all__ = ["MAX_DEPTH", "JsonError", "parse_answer", "parse_request"]

# orjson (the audit log, our replies) refuses to serialize deeper than 254 levels; a request we
# authorized must never fail later when it is recorded.
MAX_DEPTH: Final = 64


class JsonError(ValueError):
    """The text is not JSON that every parser reads the same way; the message says why."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys parse two ways (first wins in some parsers, last in others), so the
    # tool we authorize might not be the tool the upstream calls.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise JsonError(f"duplicate key {key[:64]!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise JsonError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # "1e400" is infinity to Python and an error or a different number elsewhere.
        raise JsonError("number out of range")
    return value


def _int64(text: str) -> int:
    # orjson (and most upstream parsers) hold integers in 64 bits; beyond that they round,
    # overflow or refuse. The length check comes first so a huge literal costs nothing.
    if len(text) > 21:
        raise JsonError("integer out of range")
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise JsonError("integer out of range")
    return value


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_unique_keys,
    parse_constant=_no_constant,
    parse_float=_finite_float,
    parse_int=_int64,
)
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")


def parse_answer(raw: bytes) -> Any:
    """UTF-8 JSON without a byte order mark, duplicate keys, NaN or out-of-range numbers.
    Raises JsonError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonError("not valid UTF-8") from None
    if text.startswith("\ufeff"):
        # RFC 8259 §8.1: senders must not add one; receivers may skip it or fail.
        raise JsonError("byte order mark before the JSON text")
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise JsonError("nesting too deep") from None
    except JsonError:
        raise
    except ValueError as exc:
        raise JsonError(str(exc)) from None


def parse_request(raw: bytes) -> Any:
    """`parse_answer`, and no lone surrogate or nesting deeper than MAX_DEPTH.
    Raises JsonError."""
    document = parse_answer(raw)
    # Strict UTF-8 decoding leaves no surrogates in the text, so only a "\u" escape can make a
    # lone one: those are read as U+FFFD, an error or the raw code unit, parser by parser.
    _check_tree(document, check_surrogates=b"\\u" in raw)
    return document


def _check_tree(document: Any, *, check_surrogates: bool) -> None:
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise JsonError(f"nesting deeper than {MAX_DEPTH}")
            for key, item in value.items():
                if check_surrogates and _SURROGATE.search(key):
                    raise JsonError("lone surrogate in a string")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise JsonError(f"nesting deeper than {MAX_DEPTH}")
            stack.extend((item, depth + 1) for item in value)
        elif check_surrogates and isinstance(value, str) and _SURROGATE.search(value):
            raise JsonError("lone surrogate in a string")
