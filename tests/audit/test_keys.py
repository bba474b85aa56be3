"""Checkpoint keys: Ed25519 only, public or private PEM for verifying."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentproxy", *args], capture_output=True, text=True, check=False
    )


async def test_generated_deployment_keys_run_a_proxy_and_verify_its_trail(
    make_proxy: Any, keys: Any, tmp_path: Path
) -> None:
    import aiohttp

    directory = tmp_path / "keys"
    out = await asyncio.to_thread(cli, "keys", "generate", str(directory))
    assert out.returncode == 0, out.stderr
    assert {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()} == {
        "context-signing.pem": 0o600,
        "audit-signing.pem": 0o600,
        "audit-signing.pub.pem": 0o644,
        "audit-hmac": 0o600,
    }
    again = await asyncio.to_thread(cli, "keys", "generate", str(directory))
    assert again.returncode == 1 and "never overwritten" in again.stderr
    trail = tmp_path / "audit.jsonl"
    proxy = await make_proxy(
        extra=(
            f"context_token: {{signing_key_file: {directory / 'context-signing.pem'}}}\n"
            f"audit: {{file: {trail}, signing_key_file: {directory / 'audit-signing.pem'}, "
            f"hmac_key_file: {directory / 'audit-hmac'}, checkpoint_every: 1}}"
        )
    )
    headers = {"Authorization": f"Bearer {keys.token('hr-bot')}"}
    url = proxy.base + "/v1/employees/42"
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        assert r.status == 200
    await proxy.server.stop()
    public = str(directory / "audit-signing.pub.pem")
    verify = await asyncio.to_thread(cli, "audit", "verify", str(trail), "--key", public)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "checkpoint" in verify.stdout
