"""The pure chain: canonical form, sealing, checkpoints, keyed hashing and redaction."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentproxy.audit.chain import (
    GENESIS,
    Chain,
    canonical,
    checkpoint,
    checkpoint_text,
    checkpoint_valid,
    hmac_value,
    redact,
)

KEY = b"audit-hmac-key-for-tests"


def test_canonical_sorts_keys_and_leaves_out_hash() -> None:
    record = {"b": 1, "a": {"d": [1, "é"], "c": None}, "hash": "x"}
    assert canonical(record) == b'{"a":{"c":null,"d":[1,"\xc3\xa9"]},"b":1}'
    assert canonical(record) == canonical({"a": {"c": None, "d": [1, "é"]}, "b": 1})


def test_seal_links_records_and_hashes_their_canonical_form() -> None:
    chain = Chain("r1")
    first = chain.seal({"kind": "decision", "n": 1})
    second = chain.seal({"kind": "decision", "n": 2})
    assert (first["chain"], first["seq"], first["prev"]) == ("r1", 0, GENESIS)
    assert (second["seq"], second["prev"]) == (1, first["hash"])
    assert first["hash"] == hashlib.sha256(canonical(first)).hexdigest()
    assert (chain.next_seq, chain.head) == (2, second["hash"])


def test_the_sealed_line_is_the_sealed_record() -> None:
    sealed = Chain("r1").seal_line({"kind": "decision", "args": {"z": 1, "a": [1.5, None]}})
    assert orjson.loads(sealed.line) == sealed.record
    assert b"\n" not in sealed.line
    assert sealed.line.endswith(b'"hash":"' + sealed.record["hash"].encode() + b'"}')


@pytest.mark.parametrize(
    "args",
    [
        {"prev": "x", "seq": 7, "chain": "forged"},  # sealed members' names, nested
        {"q": "\x00", "\x00": "\x00\x00"},  # NUL, in values and keys
        {"s": ',"prev":"' + GENESIS + '","seq":0,"x":"'},  # JSON that closes the string
        {"é": "\u2028", "a": [None, True, 1e300, -0.0]},
    ],
)
def test_what_a_caller_controls_cannot_move_the_sealed_members(args: dict[str, Any]) -> None:
    chain = Chain("r1")
    chain.seal_line({"kind": "decision"})
    sealed = chain.seal_line({"kind": "decision", "args": args, "zzz": args})
    record = orjson.loads(sealed.line)
    assert (record["chain"], record["seq"], record["args"], record["zzz"]) == ("r1", 1, args, args)
    assert record["hash"] == chain.head == hashlib.sha256(canonical(record)).hexdigest()


def test_a_chain_continues_from_its_state() -> None:
    chain = Chain("r1")
    for n in range(3):
        chain.seal({"n": n})
    resumed = Chain("r1", chain.next_seq, chain.head)
    assert resumed.seal({"n": 3}) == chain.seal({"n": 3})


@pytest.mark.parametrize("member", ["chain", "seq", "prev", "hash"])
def test_seal_refuses_a_record_with_sealed_members(member: str) -> None:
    chain = Chain("r1")
    with pytest.raises(ValueError, match=member):
        chain.seal({"kind": "decision", member: 1})
    assert chain.next_seq == 0


def test_seal_refuses_what_json_cannot_hold_and_does_not_advance() -> None:
    chain = Chain("r1")
    with pytest.raises(TypeError):
        chain.seal({"n": object()})
    assert (chain.next_seq, chain.head) == (0, GENESIS)


def test_chain_state_must_be_consistent() -> None:
    with pytest.raises(ValueError):
        Chain("")
    with pytest.raises(ValueError):
        Chain("r1", 5, GENESIS)
    with pytest.raises(ValueError):
        Chain("r1", 0, "ab" * 32)


def test_checkpoint_signs_chain_size_and_head(signing_key: Ed25519PrivateKey) -> None:
    chain = Chain("r1")
    last = chain.seal({"n": 0})
    sealed = chain.seal(checkpoint(chain, signing_key))
    assert sealed["kind"] == "checkpoint"
    assert (sealed["seq"], sealed["head"], sealed["prev"]) == (1, last["hash"], last["hash"])
    text = f"agentproxy-audit-checkpoint\nr1\n1\n{last['hash']}\n".encode()
    assert checkpoint_text("r1", 1, last["hash"]) == text
    signing_key.public_key().verify(base64.b64decode(sealed["signature"]), text)
    assert checkpoint_valid(sealed, signing_key.public_key())
    assert not checkpoint_valid(sealed, Ed25519PrivateKey.generate().public_key())
    assert not checkpoint_valid({**sealed, "seq": 2}, signing_key.public_key())
    assert not checkpoint_valid({**sealed, "closing": True}, signing_key.public_key())
    assert not checkpoint_valid({**sealed, "signature": "not base64!"}, signing_key.public_key())


def test_a_closing_checkpoint_says_so_in_the_signed_text(signing_key: Ed25519PrivateKey) -> None:
    chain = Chain("r1")
    chain.seal({"n": 0})
    sealed = chain.seal(checkpoint(chain, signing_key, closing=True))
    assert sealed["closing"] is True
    assert checkpoint_valid(sealed, signing_key.public_key())
    assert not checkpoint_valid({**sealed, "closing": False}, signing_key.public_key())


def test_a_checkpoint_must_be_sealed_right_away(signing_key: Ed25519PrivateKey) -> None:
    chain = Chain("r1")
    stale = checkpoint(chain, signing_key)
    chain.seal({"n": 0})
    with pytest.raises(ValueError, match="checkpoint"):
        chain.seal(stale)


@pytest.mark.parametrize("value", ["123-45-6789", 42, {"b": [1, 2], "a": None}, None])
def test_hmac_value_is_hmac_sha256_of_the_canonical_json(value: Any) -> None:
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    expected = hmac.new(KEY, encoded, hashlib.sha256).hexdigest()
    assert hmac_value(KEY, value) == "hmac-sha256:" + expected


def test_hmac_value_tells_types_and_keys_apart() -> None:
    assert hmac_value(KEY, "7") != hmac_value(KEY, 7)
    assert hmac_value(KEY, "7") != hmac_value(b"another key", "7")


def sample() -> dict[str, Any]:
    return {
        "kind": "decision",
        "args": {"ssn": "123-45-6789", "name": "Bob"},
        "resource": {"query": {"email": "bob@example.com"}},
        "principal": {"agent": "hr-bot", "claims": {"email": "alice@example.com", "dept": "hr"}},
        "items": [{"card": "4111"}, {"card": "5500"}, {"other": 1}],
    }


PATHS = ["args.ssn", "resource.query.email", "principal.claims.email", "items.card"]


def test_redact_with_a_key_replaces_values_by_their_hmac() -> None:
    original = sample()
    redacted = redact(original, PATHS, KEY)
    assert redacted["args"] == {"ssn": hmac_value(KEY, "123-45-6789"), "name": "Bob"}
    assert redacted["resource"]["query"]["email"] == hmac_value(KEY, "bob@example.com")
    assert redacted["principal"]["claims"] == {
        "email": hmac_value(KEY, "alice@example.com"),
        "dept": "hr",
    }
    assert redacted["items"] == [
        {"card": hmac_value(KEY, "4111")},
        {"card": hmac_value(KEY, "5500")},
        {"other": 1},
    ]
    assert original == sample()  # never modified


def test_redact_without_a_key_says_redacted() -> None:
    redacted = redact(sample(), PATHS, None)
    assert redacted["args"]["ssn"] == "redacted"
    assert redacted["principal"]["claims"]["email"] == "redacted"
    assert b"alice@example.com" not in orjson.dumps(redacted)
    assert b"123-45-6789" not in orjson.dumps(redacted)


def test_redact_a_whole_subtree() -> None:
    redacted = redact(sample(), ["principal.claims"], KEY)
    assert redacted["principal"]["claims"] == hmac_value(
        KEY, {"email": "alice@example.com", "dept": "hr"}
    )


def test_redact_leaves_absent_paths_alone() -> None:
    original = sample()
    redacted = redact(original, ["args.password", "nope.deeper", "args.name.first", "kind.x"], KEY)
    assert redacted == original
    assert redacted is original  # nothing to copy
