"""Strict JSON as an attacker feeds it: keys one spelling apart, documents too big to walk,
and gzip bodies that inflate far beyond what was sent. Bytes in, values or errors out."""

from __future__ import annotations

import gzip
import os
import sys
from types import MappingProxyType

import orjson
import pytest

from agentproxy.errors import PayloadTooLarge
from agentproxy.protocols.body import INFLATION_FLOOR, MAX_INFLATION_RATIO, decode_content
from agentproxy.protocols.strict_json import (
    MAX_ELEMENTS,
    YIELDING_ABOVE,
    JsonError,
    check_value,
    parse_answer,
    parse_request,
)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("name", "Name"),
        ("amount", "AMOUNT"),
        ("method", "METHOD"),
        ("userId", "userid"),
        # Go's encoding/json folds rune by rune with ToUpper(ToLower(r)): these meet ASCII
        # keys there, and under NFKC + case folding.
        ("\u212aey", "key"),  # Kelvin sign
        ("\u017ftatus", "status"),  # long s
        ("\u0131d", "id"),  # dotless i: Go only
        ("\u0130d", "id"),  # capital I with dot: Go only
        ("\uff4e\uff41\uff4d\uff45", "name"),  # fullwidth: NFKC
        ("\ufb01le", "file"),  # ligature: NFKC
        ("e\u0301", "\u00e9"),  # decomposed and composed e-acute
        ("\u00e9", "\u00c9"),
        ("stra\u00dfe", "STRASSE"),  # full folding
        ("\u03c3", "\u03c2"),  # sigma and final sigma
    ],
)
def test_keys_colliding_under_case_folding_or_nfkc_are_refused(first: str, second: str) -> None:
    for a, b in ((first, second), (second, first)):
        body = orjson.dumps({"jsonrpc": "2.0", a: "search", b: "delete_all"})
        with pytest.raises(JsonError, match="one key to a parser that ignores case"):
            parse_request(body)


def test_collisions_are_refused_at_any_depth_and_in_arrays() -> None:
    deep = {"a": [{"b": {"c": [1, {"amount": 50, "x": {"AMOUNT": 1}}]}}]}
    assert parse_request(orjson.dumps(deep)) == deep  # same spelling in different objects
    body = b'{"a":[{"b":{"c":[1,{"amount":50,"AMOUNT":5000000}]}}]}'
    with pytest.raises(JsonError, match="'amount' and 'AMOUNT'"):
        parse_request(body)


def test_distinct_keys_that_only_look_alike_are_read() -> None:
    document = {"e": 1, "\u00e9": 2, "i": 3, "j": 4, "\u00df": 5, "s": 6, "a_b": 7, "ab": 8}
    assert parse_request(orjson.dumps(document)) == document


def test_exact_duplicates_are_still_named() -> None:
    with pytest.raises(JsonError, match="duplicate key 'name'"):
        parse_request(b'{"name":"a","x":1,"name":"b"}')


def test_answers_keep_their_own_keys() -> None:
    # What an upstream sends is not decided on: only exact duplicates are refused there.
    assert parse_answer(b'{"name":"a","Name":"b"}') == {"name": "a", "Name": "b"}


def test_element_count_is_capped() -> None:
    at_cap = orjson.dumps({"a": [0] * (MAX_ELEMENTS - 2)})  # the object and its array count
    assert len(parse_request(at_cap)["a"]) == MAX_ELEMENTS - 2
    with pytest.raises(JsonError, match=f"more than {MAX_ELEMENTS} values"):
        parse_request(orjson.dumps({"a": [0] * (MAX_ELEMENTS - 1)}))
    with pytest.raises(JsonError, match="more than 10 values"):
        parse_request(orjson.dumps([{"k": [1, 2]}] * 4), max_elements=10)


def test_gzip_inflating_more_than_the_ratio_is_refused() -> None:
    plain = orjson.dumps({"a": "0" * (4 * INFLATION_FLOOR)})
    bomb = gzip.compress(plain, compresslevel=9)
    assert len(plain) > MAX_INFLATION_RATIO * len(bomb)
    with pytest.raises(PayloadTooLarge, match=f"inflates more than {MAX_INFLATION_RATIO} times"):
        decode_content("gzip", bomb, 64 * 1024 * 1024)


def test_gzip_below_the_floor_may_inflate_any_amount() -> None:
    plain = b"[" + b"0," * (INFLATION_FLOOR // 2 - 2) + b"0]"
    assert len(plain) <= INFLATION_FLOOR
    packed = gzip.compress(plain, compresslevel=9)
    assert len(plain) > MAX_INFLATION_RATIO * len(packed)
    assert decode_content("gzip", packed, 64 * 1024 * 1024) == plain


def test_gzip_within_the_ratio_is_read_past_the_floor() -> None:
    # Random bytes barely compress: a big body inflating a little is ordinary.
    plain = orjson.dumps({"blob": os.urandom(INFLATION_FLOOR).hex()})
    assert decode_content("gzip", gzip.compress(plain), 64 * 1024 * 1024) == plain


@pytest.mark.parametrize(
    "body",
    [
        b"1e400",
        b"18446744073709551616",
        b"[[1, [2, -1e999]]]",
        b'{"a": [0, {"b": [-9223372036854775809]}]}',
        b'{"a": [18446744073709551616]}',
    ],
)
def test_numbers_out_of_range_are_refused_wherever_they_sit(body: bytes) -> None:
    with pytest.raises(JsonError, match="out of range"):
        parse_request(body)


def test_the_64_bit_edges_are_read_in_arrays() -> None:
    values = [-(2**63), 2**64 - 1, 1.5e308, True, None, "s"]
    assert parse_request(orjson.dumps({"a": [values]})) == {"a": [values]}


def test_lone_surrogates_in_arrays_and_keys_are_refused() -> None:
    for body in (b'["ok", ["\\udc00"]]', b'[{"\\ud800x": 1}]', b'"\\ud800"'):
        with pytest.raises(JsonError, match="surrogate"):
            parse_request(body)


def test_long_integers_stay_cheap_where_python_lets_them_be_converted() -> None:
    # PYTHONINTMAXSTRDIGITS=0 lifts Python's own cap; a literal is then refused on its length.
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        with pytest.raises(JsonError, match="out of range"):
            parse_request(b'{"a": [' + b"7" * 200_000 + b"]}")
    finally:
        sys.set_int_max_str_digits(before)
    with pytest.raises(JsonError, match="out of range"):
        parse_request(b'{"a": [' + b"7" * 200_000 + b"]}")


def _large(inner: bytes, filler: str) -> bytes:
    # Past YIELDING_ABOVE, each way to the parser: brackets inside a string overcount the
    # containers past the cap (the Python scanner), empty arrays and numbers do not (the C
    # parser with a hook per number).
    size = YIELDING_ABOVE + 1
    pad = {
        "python": b'"' + b"[" * (MAX_ELEMENTS + 1) + b'",',
        "arrays": b"[]," * (size // 3),
        "numbers": b"1," * (size // 2),
    }[filler]
    return b'{"pad":[' + pad + b'0],"x":' + inner + b"}"


FILLERS = ["python", "arrays", "numbers"]


@pytest.mark.parametrize("filler", FILLERS)
@pytest.mark.parametrize(
    ("inner", "reason"),
    [
        (b'{"name":"a","name":"b"}', "duplicate key"),
        (b'{"name":"a","NAME":"b"}', "ignores case"),
        (b"NaN", "NaN"),
        (b"1e400", "out of range"),
        (b"18446744073709551616", "out of range"),
        (b"1" + b"0" * 5000, "out of range"),
        (b'"\\ud800"', "surrogate"),
        (b"[" * 100 + b"]" * 100, "nesting"),
    ],
)
def test_large_documents_are_as_strict_whichever_way_they_are_parsed(
    filler: str, inner: bytes, reason: str
) -> None:
    body = _large(inner, filler)
    assert len(body) > YIELDING_ABOVE
    with pytest.raises(JsonError, match=reason):
        parse_request(body)


@pytest.mark.parametrize("filler", FILLERS)
def test_large_documents_read_the_same_whichever_way_they_are_parsed(filler: str) -> None:
    inner = orjson.dumps({"a": [1, -2.5, "\u00e9\U0001f600", None, True, {"b": [[]]}]})
    body = _large(inner, filler)
    assert parse_request(body) == orjson.loads(body)


def _values(document: object) -> int:
    if isinstance(document, dict):
        return 1 + sum(_values(v) for v in document.values())
    if isinstance(document, list):
        return 1 + sum(_values(v) for v in document)
    return 1


@pytest.mark.parametrize("filler", FILLERS)
def test_the_value_cap_is_exact_however_early_the_parse_stops(filler: str) -> None:
    body = _large(orjson.dumps({"a": [1, 2.5, "s", None, {"b": []}]}), filler)
    count = _values(orjson.loads(body))
    assert parse_request(body, max_elements=count) == orjson.loads(body)
    with pytest.raises(JsonError, match=f"more than {count - 1} values"):
        parse_request(body, max_elements=count - 1)


def test_values_that_did_not_arrive_as_json_are_held_to_the_same_keys() -> None:
    check_value({"a": [{"x": 1}], "b": MappingProxyType({"k": (1, 2)})})
    for value in (
        {"amount": 50, "AMOUNT": 5000000},
        {"a": [MappingProxyType({"to": "x", "TO": "y"})]},
        {"a": ({"\u212aey": 1, "key": 2},)},
    ):
        with pytest.raises(JsonError, match="ignores case"):
            check_value(value)
    with pytest.raises(JsonError, match="more than 3 values"):
        check_value({"a": [1, 2, 3]}, max_elements=3)
