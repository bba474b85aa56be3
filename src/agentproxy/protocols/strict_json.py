"""Strict JSON: the one parser for request bodies the proxy authorizes.

A body is decided on what it means to us, and executed on what it means to the upstream's
parser. Wherever parsers could disagree, the body is refused instead of guessed at: duplicate
keys (first wins in some parsers, last in others), keys that are one key to a parser matching
names case-insensitively (Go's `encoding/json`, ASP.NET, Jackson) or after NFKC, NaN and
Infinity, numbers outside 64 bits, lone surrogates, a byte order mark. A request is also
bounded in what reading it costs whoever reads it next (policy, audit): nesting deeper than
`MAX_DEPTH`, more than `MAX_ELEMENTS` values. Pure: bytes in, values out. `parse_answer` reads
what an upstream sent (to filter it), with the same parser but without the request-only
checks.
"""

from __future__ import annotations

import functools
import json
import json.scanner
import math
import re
import sys
import unicodedata
from collections.abc import Callable
from typing import Any, Final

from agentproxy.core import plain

__all__ = [
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "YIELDING_ABOVE",
    "JsonError",
    "check_keys",
    "check_value",
    "key_folds",
    "parse_answer",
    "parse_request",
]

# orjson (the audit log, our replies) refuses to serialize deeper than 254 levels; a request we
# authorized must never fail later when it is recorded.
MAX_DEPTH: Final = 64
# Every value of a request is walked again after parsing (policy's `args`, the audit record),
# on the event loop that serves every agent: ~1 us per value there, so 100,000 values bound a
# call's share to ~0.1 s. Real requests hold far fewer (a 2,000-message conversation is ~10,000).
MAX_ELEMENTS: Final = 100_000


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


def _unique_folded_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"name": "search", "Name": "delete_all"}: we read "name", a Go upstream decoding into a
    # struct reads whichever spelling comes last. Two keys that any parser may take for one
    # are refused, at every depth: we cannot know which of them is an upstream's field.
    result: dict[str, Any] = {}
    lowered: set[str] = set()
    for key, value in pairs:
        folded = key.lower()
        if folded in lowered or not key.isascii():
            # A repeat (exact or in another case) or a key needing Unicode folding: rare.
            result = _unique_keys(pairs)
            _check_folded(result)
            break
        lowered.add(folded)
        result[key] = value
    if "__proto__" in result:
        # JSON.parse keeps it as a member; Object.assign(record, body), the way Node handlers
        # apply a PATCH, sets it as the record's prototype: {"__proto__": {"role": "admin"}}
        # gives the record a role that has(args.role) never saw.
        raise JsonError("a __proto__ key (JavaScript reads it as the object's prototype)")
    return result


def check_keys(keys: dict[str, Any]) -> None:
    """Raises JsonError when two of `keys` are one key to a parser that ignores case or
    normalizes Unicode (the check every JSON object of a request passes; form fields too)."""
    _check_folded(keys)


def key_folds(key: str) -> tuple[str, ...]:
    """The lower-case spellings a parser that ignores case or normalizes Unicode may match
    `key` as (`Kelvin` with the Kelvin sign is "kelvin")."""
    return (key.lower(),) if key.isascii() else _unicode_folds(key)


def _check_folded(keys: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    for key in keys:
        folds = (key.lower(),) if key.isascii() else _unicode_folds(key)
        for fold in folds:
            other = seen.setdefault(fold, key)
            if other != key:
                raise JsonError(
                    f"keys {other[:64]!r} and {key[:64]!r} are one key to a parser that "
                    "ignores case or normalizes Unicode (Go's encoding/json, ASP.NET): send one"
                )


@functools.lru_cache(maxsize=4096)
def _unicode_folds(key: str) -> tuple[str, ...]:
    """The spellings `key` may be matched as, lower-cased so that an ASCII key's only fold
    (`key.lower()`) compares with them. Two keys collide when any fold of one is a fold of the
    other; folding coarser than a real parser only refuses more."""
    # Unicode §3.13 D146, compatibility caseless match: NFKC and full case folding, twice
    # (one can undo the other). The "fi" ligature (U+FB01), fullwidth letters (U+FF41...),
    # the Kelvin sign (U+212A) and the long s (U+017F) meet their ASCII keys.
    compat = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", key).casefold())
    compat = compat.casefold()
    # Go's encoding/json matches a name rune by rune as unicode.ToUpper(unicode.ToLower(r))
    # (simple mappings, no normalization): dotless i (U+0131) and U+0130 meet "i" there, not
    # under full folding.
    go = "".join(_go_fold(c) for c in key).lower()
    return (compat,) if go == compat else (compat, go)


def _go_fold(char: str) -> str:
    # Python has only the full case mappings. The one multi-character lower-case mapping
    # (U+0130) starts with its simple mapping; where upper case is several characters, the
    # simple mapping is the title case when that is one character (Greek with ypogegrammeni),
    # else there is none and the character stays itself ("\u00df").
    lower = char.lower()[0]
    upper = lower.upper()
    if len(upper) == 1:
        return upper
    title = lower.title()
    return title if len(title) == 1 else lower


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
# Small documents: numbers are checked by the walk that follows (`_check_tree`) rather than a
# Python hook per number, which costs twice the parse of a body of numbers.
_REQUEST_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_unique_folded_keys, parse_constant=_no_constant
)
# Large documents are parsed on a worker thread while the event loop serves other agents. The
# C parser never lets go of the GIL by itself: the interpreter can hand it to the loop only
# when the parser calls back into Python. So a large document gets a decoder of its own
# (`_counting_decoder`) with a hook per number and object, and one with more containers and
# strings than MAX_ELEMENTS (which nothing calls back for: 8 MiB of "[]," held the GIL 0.5 s)
# is parsed by the pure-Python scanner, every step of which can yield. The hooks also check
# integer lengths: converting a decimal literal costs time quadratic in its digits, and
# Python's own 4,300-digit cap can be lifted (PYTHONINTMAXSTRDIGITS=0), in which case small
# documents take this decoder.
_REQUEST_DECODER_YIELDING: Final = json.JSONDecoder(
    object_pairs_hook=_unique_folded_keys,
    parse_constant=_no_constant,
    parse_float=_finite_float,
    parse_int=_int64,
)
_MAX_INT_DIGITS: Final = 4300
# The size above which a request is parsed so that it yields (the shells read bodies this
# large on a worker thread: proxy/offload.py).
YIELDING_ABOVE: Final = 16 * 1024
_INT_LOW: Final = -(2**63)
_INT_HIGH: Final = 2**64
# A lone surrogate is read as U+FFFD, an error or the raw code unit, parser by parser; a NUL
# ends the string CEL reads (cel-expr-python converts at the first NUL: "alice\u0000mallory"
# is "alice" to a condition, and a key "title\u0000role" is "title").
_SURROGATE: Final = re.compile(r"[\ud800-\udfff\x00]")


def parse_answer(raw: bytes) -> Any:
    """UTF-8 JSON without a byte order mark, duplicate keys, NaN or out-of-range numbers.
    Raises JsonError."""
    if len(raw) <= YIELDING_ABOVE:
        return _parse(raw, _DECODER)
    # A large answer is parsed on the worker thread too (an answer an obligation shapes), and
    # the C scanner calls back for none of its lists and strings: 14 MiB of "[]," held the
    # GIL, and so every agent's calls, for 0.9 s. It is parsed so that it yields, uncapped
    # (max_response_bytes bounds it), with the answer's own key check.
    return _parse(raw, _counting_decoder(raw, sys.maxsize, object_pairs=_unique_keys))


def _parse(raw: bytes, decoder: json.JSONDecoder) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonError("not valid UTF-8") from None
    if text.startswith("\ufeff"):
        # RFC 8259 §8.1: senders must not add one; receivers may skip it or fail.
        raise JsonError("byte order mark before the JSON text")
    try:
        return decoder.decode(text)
    except RecursionError:
        raise JsonError("nesting too deep") from None
    except JsonError:
        raise
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise JsonError("integer out of range") from None
        raise JsonError(str(exc)) from None


def parse_request(raw: bytes, *, max_elements: int = MAX_ELEMENTS) -> Any:
    """`parse_answer`, and no keys of one object that collide under case folding or NFKC (at
    any depth), no lone surrogate or NUL, no nesting deeper than MAX_DEPTH and at most
    `max_elements` values (objects, arrays and scalars, the document included).
    Raises JsonError."""
    document = _parse(raw, _request_decoder(raw, max_elements))
    # Strict UTF-8 decoding leaves no surrogates in the text, so only a "\u" escape can make a
    # lone one: those are read as U+FFFD, an error or the raw code unit, parser by parser.
    _check_tree(document, check_surrogates=b"\\u" in raw, max_elements=max_elements)
    return document


def _request_decoder(raw: bytes, max_elements: int) -> json.JSONDecoder:
    if len(raw) <= YIELDING_ABOVE and 0 < sys.get_int_max_str_digits() <= _MAX_INT_DIGITS:
        return _REQUEST_DECODER
    if len(raw) <= YIELDING_ABOVE:
        return _REQUEST_DECODER_YIELDING
    return _counting_decoder(raw, max_elements)


def _counting_decoder(
    raw: bytes,
    max_elements: int,
    *,
    object_pairs: Callable[[list[tuple[str, Any]]], dict[str, Any]] = _unique_folded_keys,
) -> json.JSONDecoder:
    """A decoder for one large document whose hooks also count the values they see, and
    stop the parse once they pass `max_elements`: a flood of values costs the worker a
    fraction of its parse. They see fewer values than there are (never true, false or null;
    strings and arrays only in the Python scanner), so they never refuse what the walk after
    the parse would accept."""
    left = max_elements

    def spend(count: int) -> None:
        nonlocal left
        left -= count
        if left < 0:
            raise JsonError(f"more than {max_elements} values")

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        spend(1)
        return object_pairs(members)

    def integer(text: str) -> int:
        spend(1)
        return _int64(text)

    def number(text: str) -> float:
        spend(1)
        return _finite_float(text)

    decoder = json.JSONDecoder(
        object_pairs_hook=pairs, parse_constant=_no_constant, parse_float=number, parse_int=integer
    )
    # Counted in C at memory speed; brackets and quotes inside strings only overcount.
    # Past MAX_ELEMENTS of them (or the cap, if lower) the C scanner would hold the GIL long.
    if raw.count(b"[") + raw.count(b'"') // 2 > min(max_elements, MAX_ELEMENTS):
        # The Python scanner's steps, read off the decoder when it is made (json/scanner.py).
        scanner: Any = decoder
        array, string = scanner.parse_array, scanner.parse_string

        def counted_array(*args: Any) -> Any:
            spend(1)
            return array(*args)

        def counted_string(*args: Any) -> Any:
            spend(1)
            return string(*args)

        scanner.parse_array, scanner.parse_string = counted_array, counted_string
        scanner.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder


def check_value(document: Any, *, max_elements: int = MAX_ELEMENTS) -> None:
    """What `parse_request` checks, for a value that did not arrive as JSON text (the
    arguments an Authorizer.Check caller sends as a protobuf Struct, and will forward as
    JSON): no keys of one object that collide, no lone surrogate or NUL, no nesting deeper than
    MAX_DEPTH, at most `max_elements` values. Raises JsonError."""
    # As plain dicts and lists: the walk does not look inside other mappings and sequences.
    tree = plain(document)
    _check_tree(tree, check_surrogates=True, max_elements=max_elements, check_keys=True)


def _check_tree(
    document: Any, *, check_surrogates: bool, max_elements: int, check_keys: bool = False
) -> None:
    # Containers are walked; scalars are checked where they sit, without a stack entry each:
    # a body of numbers is the parser's worst case and this walk's most common.
    budget = max_elements - 1
    stack: list[tuple[Any, int]] = [([document], 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JsonError(f"nesting deeper than {MAX_DEPTH}")
        items: Any = value
        if type(value) is dict:
            if check_keys:
                _unique_folded_keys(list(value.items()))
            if check_surrogates and any(_SURROGATE.search(key) for key in value):
                raise JsonError("lone surrogate or NUL in a string")
            items = value.values()
        if depth:
            budget -= len(items)
            if budget < 0:
                raise JsonError(f"more than {max_elements} values")
        for item in items:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif kind is int:
                # orjson (and most upstream parsers) hold integers in 64 bits; beyond that
                # they round, overflow or refuse. (Python refuses literals past 4,300 digits.)
                if not _INT_LOW <= item < _INT_HIGH:
                    raise JsonError("integer out of range")
            elif kind is float:
                if not math.isfinite(item):
                    # "1e400" is infinity to Python and an error or another number elsewhere.
                    raise JsonError("number out of range")
            elif check_surrogates and kind is str and _SURROGATE.search(item):
                raise JsonError("lone surrogate or NUL in a string")
