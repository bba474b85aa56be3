"""Checkpoint keys: Ed25519 only, public or private PEM for verifying."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentproxy.audit.keys import load_signing_key
from agentproxy.audit.verify import load_public_key


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_load_public_key_from_a_public_or_a_private_pem(
    tmp_path: Path, key_file: Path, signing_key: Ed25519PrivateKey
) -> None:
    public = tmp_path / "audit.pub"
    public.write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for path in (public, key_file):
        loaded = load_public_key(path)
        assert loaded.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ) == public_bytes(signing_key)
    assert public_bytes(load_signing_key(key_file)) == public_bytes(signing_key)


def test_other_keys_and_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    rsa_file = tmp_path / "rsa.pem"
    rsa_file.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    for path in (rsa_file, garbage, tmp_path / "missing.pem"):
        with pytest.raises(ValueError, match=str(path)):
            load_public_key(path)
        with pytest.raises(ValueError, match=str(path)):
            load_signing_key(path)
