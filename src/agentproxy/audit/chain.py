"""The hash chain, its signed checkpoints, and keyed hashing of sensitive values. Pure: no I/O.

A record is a JSON object. Sealing adds three members and then a fourth:

- `chain`: the chain's id (one per replica, so concurrent replicas never interleave one chain);
- `seq`: its position, from 0 without holes;
- `prev`: the `hash` of the record at `seq - 1` (`GENESIS`, 64 zeros, for seq 0);
- `hash`: hex SHA-256 of `canonical(record)`, the record with every member but `hash`.

Editing a record changes its hash; removing, inserting or reordering records breaks `prev` or
`seq`. The chain has no secret, so whoever can rewrite the whole log after some point can
recompute it: the signed checkpoints are what pin it. A checkpoint is a record sealed into the
chain like any other whose signature (Ed25519) covers the chain id, its own `seq` (the number of
records before it) and `head` (the hash of the record before it, which is also its `prev`), in
the spirit of the C2SP tlog-checkpoint note: origin, tree size, root hash. A closing checkpoint,
written when the writer stops cleanly, says so in the signed text too, so that a cut-off log
cannot pass for a cleanly closed one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
SEALED_MEMBERS = ("chain", "seq", "prev", "hash")
HMAC_PREFIX = "hmac-sha256:"
REDACTED = "redacted"

_SORTED = orjson.OPT_SORT_KEYS
# orjson writes a dataclass's fields in declaration order even when sorting keys, which a
# verifier (re-serializing plain JSON) could not reproduce: sealing one is a TypeError.
_SEALING = _SORTED | orjson.OPT_PASSTHROUGH_DATACLASS


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers: compact JSON with sorted keys, without `hash`.

    Raises TypeError if the record is not JSON-serializable.
    """
    if "hash" in record:
        record = {k: v for k, v in record.items() if k != "hash"}
    return orjson.dumps(record, option=_SORTED)


class Sealed(NamedTuple):
    """A sealed record and the line that carries it (JSON, no newline). A tuple: two are
    built for every call, and a frozen dataclass costs several times more to build."""

    record: dict[str, Any]
    line: bytes

    @property
    def seq(self) -> int:
        seq: int = self.record["seq"]
        return seq


class Chain:
    """One chain's state: its id, the next sequence number and the hash of the last record."""

    __slots__ = ("head", "id", "next_seq")

    def __init__(self, chain_id: str, next_seq: int = 0, head: str = GENESIS) -> None:
        if not chain_id:
            raise ValueError("a chain needs a non-empty id")
        if next_seq < 0 or (next_seq == 0) != (head == GENESIS):
            raise ValueError(f"chain {chain_id!r}: seq {next_seq} and head {head!r} disagree")
        self.id = chain_id
        self.next_seq = next_seq
        self.head = head

    def seal(self, record: dict[str, Any]) -> dict[str, Any]:
        """Returns a copy of `record` with `chain`, `seq`, `prev` and `hash`, and advances.

        Raises ValueError if the record already has one of those members, TypeError if it is
        not JSON-serializable (the chain does not advance then).
        """
        return self.seal_line(record).record

    def seal_line(self, record: dict[str, Any]) -> Sealed:
        """Like `seal`, also giving the line to write. Raises ValueError, TypeError."""
        taken = [name for name in SEALED_MEMBERS if name in record]
        if taken:
            raise ValueError(f"a record to seal must not have {', '.join(taken)}")
        if record.get("kind") == "checkpoint" and record.get("head") != self.head:
            raise ValueError("a checkpoint must be sealed right after the record it covers")
        sealed = {**record, "chain": self.id, "seq": self.next_seq, "prev": self.head}
        body = orjson.dumps(sealed, option=_SEALING)
        digest = hashlib.sha256(body).hexdigest()
        sealed["hash"] = digest
        # The verifier re-serializes everything but `hash`, so where `hash` sits in the line is
        # free: last, where a reader's eye finds it, and without serializing the record twice.
        line = b'%s,"hash":"%s"}' % (body[:-1], digest.encode())
        self.next_seq += 1
        self.head = digest
        return Sealed(sealed, line)


def checkpoint_text(chain: str, seq: int, head: str, closing: bool = False) -> bytes:
    """What a checkpoint's signature covers: `seq` records of `chain` end with `head`."""
    text = f"agentproxy-audit-checkpoint\n{chain}\n{seq}\n{head}\n"
    if closing:
        text += "closing\n"
    return text.encode()


def checkpoint(
    chain: Chain, private_key: Ed25519PrivateKey, *, closing: bool = False
) -> dict[str, Any]:
    """The checkpoint of `chain` as it stands, to be sealed next (`chain.seal` checks that).

    Sealed, it carries `chain`, `seq` (= the number of records it covers) and `prev` (= `head`).
    """
    signature = private_key.sign(checkpoint_text(chain.id, chain.next_seq, chain.head, closing))
    record: dict[str, Any] = {
        "kind": "checkpoint",
        "head": chain.head,
        "signature": base64.b64encode(signature).decode(),
    }
    if closing:
        record["closing"] = True
    return record


def checkpoint_valid(record: dict[str, Any], public_key: Ed25519PublicKey) -> bool:
    """Whether a sealed checkpoint record's signature is good (False if malformed)."""
    try:
        signature = base64.b64decode(record["signature"], validate=True)
        text = checkpoint_text(
            record["chain"], record["seq"], record["head"], record.get("closing") is True
        )
        public_key.verify(signature, text)
    except (KeyError, TypeError, ValueError, InvalidSignature):
        return False
    return True


def hmac_value(key: bytes, value: Any) -> str:
    """`hmac-sha256:` + hex HMAC-SHA256 of the value's canonical JSON (so `"7"` and `7`
    differ). An auditor holding the key can check "was it this value?"; the log cannot tell.

    Raises TypeError if the value is not JSON-serializable.
    """
    mac = _keyed(key).copy()
    mac.update(orjson.dumps(value, option=_SORTED))
    return HMAC_PREFIX + mac.hexdigest()


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    # Copying a keyed HMAC skips the key schedule: half the cost of a fresh one per value.
    return hmac.new(key, digestmod=hashlib.sha256)


def redact(record: dict[str, Any], paths: Sequence[str], key: bytes | None) -> dict[str, Any]:
    """A copy of `record` whose values at the dotted `paths` are replaced by `hmac_value`
    (or `"redacted"` without a key). A path crossing a list applies to each of its items;
    absent paths are left alone. `record` is never modified: every dict and list on a
    redacted path is copied, the rest is shared.

    Raises TypeError if a value to redact is not JSON-serializable.
    """
    result: dict[str, Any] = record
    for path in paths:
        result = _redact(result, path.split("."), key)
    return result


def _redact(node: Any, parts: list[str], key: bytes | None) -> Any:
    if isinstance(node, list):
        changed = [_redact(item, parts, key) for item in node]
        return changed if any(a is not b for a, b in zip(changed, node, strict=True)) else node
    if not isinstance(node, dict) or parts[0] not in node:
        return node
    name, rest = parts[0], parts[1:]
    value = node[name]
    if rest:
        replaced = _redact(value, rest, key)
        if replaced is value:
            return node
    else:
        replaced = REDACTED if key is None else hmac_value(key, value)
    return {**node, name: replaced}
