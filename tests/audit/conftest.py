"""Keys and log builders for the audit tests. Logs are real files in tmp_path."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentproxy.audit.chain import Chain, checkpoint
from agentproxy.audit.settings import AuditSettings


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def key_file(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "audit-signing.pem"
    path.write_bytes(
        signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    directory = tmp_path / "log"
    directory.mkdir()
    return directory / "audit.jsonl"


@pytest.fixture
def settings(log_path: Path, key_file: Path) -> AuditSettings:
    """A file trail with a checkpoint every 10 records."""
    return AuditSettings(
        file=log_path, signing_key_file=key_file, checkpoint_every=10, replica="r1"
    )


def decision(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "decision",
        "time": f"2025-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "decision_id": f"d-{n}",
        "agent": "hr-bot",
        "user": "alice",
        "action": "http:GET /v1/employees/{id}",
        "effect": "allow",
        "n": n,
        **extra,
    }


def write_chain(
    path: Path,
    count: int,
    *,
    chain: Chain | None = None,
    key: Ed25519PrivateKey | None = None,
    every: int = 1000,
    closing: bool = True,
) -> Chain:
    """Appends `count` records of `chain` (new "r1" by default) to `path`, fast, with a
    checkpoint every `every` records and a closing one when a key is given."""
    chain = chain or Chain("r1")
    with path.open("ab") as f:
        for n in range(count):
            f.write(chain.seal_line(decision(n)).line + b"\n")
            if key is not None and (n + 1) % every == 0:
                f.write(chain.seal_line(checkpoint(chain, key)).line + b"\n")
        if key is not None and closing:
            f.write(chain.seal_line(checkpoint(chain, key, closing=True)).line + b"\n")
    return chain


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines(path)]


def rechain(raw: list[bytes], start: int) -> list[bytes]:
    """Recomputes `hash` and `prev` from line index `start` on, as an attacker who edited a
    record would, so that only signatures can tell."""
    out = raw[:start]
    prev = orjson.loads(raw[start - 1])["hash"] if start else "0" * 64
    for line in raw[start:]:
        record = orjson.loads(line)
        record.pop("hash")
        record["prev"] = prev
        if record.get("kind") == "checkpoint":
            record["head"] = prev
        body = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        prev = hashlib.sha256(body).hexdigest()
        out.append(orjson.dumps({**record, "hash": prev}) + b"\n")
    return out


# Small synchronous file edits on tmp_path, for the async tests: the event loop of a test has
# nothing else to serve meanwhile.


def read(path: Path) -> bytes:
    return path.read_bytes()


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def make_directory(path: Path) -> None:
    if path.exists():
        path.unlink()
    path.mkdir()
