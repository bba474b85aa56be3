"""The audit trail of real calls through a real proxy: complete, verifiable, redacted, and
fail-closed when required."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import UPSTREAM_SECRET, Keys, ProxyFactory, Upstream
from tests.harness.redis import MakeRedisServer

HMAC_KEY = b"audit-hmac-key-for-tests"


def audit_extra(d: Path, **more: str) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "hmac").write_bytes(HMAC_KEY + b"\n")
    key = Ed25519PrivateKey.generate()
    (d / "signing.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    fields = {
        "file": str(d / "audit.jsonl"),
        "hmac_key_file": str(d / "hmac"),
        "signing_key_file": str(d / "signing.pem"),
        "checkpoint_every": "5",
        "redact": "[principal.claims.email, resource.query.ssn]",
        **more,
    }
    return "audit:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items())


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentproxy", *args], capture_output=True, text=True, check=False
    )


async def test_every_call_is_recorded_verifiably_and_without_secrets(
    make_proxy: ProxyFactory, keys: Keys, tmp_path: Path
) -> None:
    d = tmp_path / "audit"
    proxy = await make_proxy(extra=audit_extra(d))
    token = keys.token(email="alice@example.com", jti="tok-audit")
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/employees/42?ssn=123-45-6789", headers=auth) as r:
            assert r.status == 200
            allowed_id = r.headers.get("X-Agentproxy-Decision")
        async with s.get(proxy.base + "/v1/employees/13", headers=auth) as r:
            denied = orjson.loads(await r.read())
        async with s.get(proxy.base + "/v1/employees/42") as r:
            unauthenticated = orjson.loads(await r.read())
        for _ in range(6):
            async with s.get(proxy.base + "/v1/employees/7", headers=auth) as r:
                assert r.status == 200
    await proxy.server.stop()  # flushes the queue and writes a closing checkpoint

    text = (d / "audit.jsonl").read_text()
    assert token not in text and UPSTREAM_SECRET not in text
    assert "alice@example.com" not in text and "123-45-6789" not in text
    records = [orjson.loads(line) for line in text.splitlines()]
    by_id: dict[str, list[dict[str, object]]] = {}
    for record in records:
        by_id.setdefault(str(record.get("decision_id")), []).append(record)
    assert allowed_id is None  # the decision header goes upstream, not back to the agent
    deny = by_id[denied["decision_id"]]
    assert [r["kind"] for r in deny] == ["decision"]
    assert deny[0]["effect"] == "deny" and deny[0]["status"] == 403
    assert [r["kind"] for r in by_id[unauthenticated["decision_id"]]] == ["decision"]
    allowed = [r for r in records if r.get("kind") == "decision" and r.get("effect") == "allow"]
    assert len(allowed) == 7
    first = allowed[0]
    principal = first["principal"]
    assert isinstance(principal, dict)
    expected = (
        "hmac-sha256:" + hmac.new(HMAC_KEY, b'"alice@example.com"', hashlib.sha256).hexdigest()
    )
    assert principal["claims"]["email"] == expected
    assert principal["token_id"] == "tok-audit" and first["rule"] == "read-employees"
    outcomes = by_id[str(first["decision_id"])]
    assert [r["kind"] for r in outcomes] == ["decision", "outcome"]
    assert outcomes[1]["status"] == 200
    assert any(r.get("kind") == "checkpoint" for r in records)

    ok = cli("audit", "verify", str(d / "audit.jsonl"), "--key", str(d / "signing.pem"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok:")
    hashed = cli("audit", "hash", "--key", str(d / "hmac"), "alice@example.com")
    assert hashed.stdout.strip() == expected
    found = cli("audit", "query", str(d / "audit.jsonl"), "--agent", "hr-bot", "--effect", "deny")
    assert [orjson.loads(line)["decision_id"] for line in found.stdout.splitlines()] == [
        denied["decision_id"]
    ]

    lines = text.splitlines()
    lines[3], lines[4] = lines[4], lines[3]
    (d / "audit.jsonl").write_text("\n".join(lines) + "\n")
    bad = cli("audit", "verify", str(d / "audit.jsonl"), "--key", str(d / "signing.pem"))
    assert bad.returncode == 1
    assert "audit.jsonl:4" in bad.stderr


async def test_required_audit_fails_closed(
    make_proxy: ProxyFactory,
    keys: Keys,
    tmp_path: Path,
    make_redis_server: MakeRedisServer,
    upstream: Upstream,
) -> None:
    redis = make_redis_server()
    extra = (
        f"store: {{redis: {{url: '{redis.url}', timeout: 50ms}}}}\n"
        "audit: {redis_stream: 'agentproxy:audit', required: true}\n"
    )
    proxy = await make_proxy(extra=extra)
    auth = {"Authorization": f"Bearer {keys.token()}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/employees/42", headers=auth) as r:
            assert r.status == 200
        with redis.client() as client:
            assert client.xlen("agentproxy:audit") >= 1  # the decision, written before forwarding
        await asyncio.to_thread(redis.stop)
        seen = len(upstream.seen)
        async with s.get(proxy.base + "/v1/employees/42", headers=auth) as r:
            assert r.status == 503
            body = orjson.loads(await r.read())
        assert body["type"].endswith("/audit-unavailable")
        assert len(upstream.seen) == seen
        async with s.get(proxy.admin + "/metrics") as r:
            metrics = await r.text()
    dropped = [
        line for line in metrics.splitlines() if line.startswith("agentproxy_audit_dropped_total ")
    ]
    assert dropped and float(dropped[0].split()[-1]) >= 1


async def test_optional_audit_keeps_serving_and_counts_the_loss(
    make_proxy: ProxyFactory, keys: Keys, make_redis_server: MakeRedisServer
) -> None:
    redis = make_redis_server()
    extra = (
        f"store: {{redis: {{url: '{redis.url}', timeout: 50ms}}, on_error: allow_cached}}\n"
        "audit: {redis_stream: 'agentproxy:audit'}\n"
    )
    proxy = await make_proxy(extra=extra)
    auth = {"Authorization": f"Bearer {keys.token()}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base + "/v1/employees/42", headers=auth) as r:
            assert r.status == 200
        await asyncio.to_thread(redis.stop)
        async with s.get(proxy.base + "/v1/employees/42", headers=auth) as r:
            assert r.status == 200  # memoized allow, store down: allow_cached
        await asyncio.sleep(0.5)
        async with s.get(proxy.admin + "/metrics") as r:
            metrics = await r.text()
    dropped = [
        line for line in metrics.splitlines() if line.startswith("agentproxy_audit_dropped_total ")
    ]
    assert float(dropped[0].split()[-1]) >= 1


APPROVAL_POLICY = """
default: deny
rules:
  - id: big-transfers
    agents: [pay-bot]
    actions: ["http:POST /v1/transfers"]
    effect: require_approval
    reason: transfers need a human
    approval: {approvers: ["role:finance"], timeout: 10m, hold: 0s}
"""


async def test_every_approval_event_is_a_sealed_record_that_verifies(
    make_proxy: ProxyFactory, keys: Keys, tmp_path: Path
) -> None:
    """requested, approved, used, denied and expired, each in the chain with the calls, with
    approver and reason; the file verifies (before: every approval record was refused by the
    trail, since its delegation chain was named `chain`, and nothing said so)."""
    from agentproxy.approvals.lifecycle import Event
    from tests.harness.clock import FakeClock

    d = tmp_path / "audit"
    clock = FakeClock()
    proxy = await make_proxy(policy=APPROVAL_POLICY, extra=audit_extra(d), clock=clock)
    bot = {"Authorization": f"Bearer {keys.token('pay-bot', iat=int(clock.now()))}"}
    backend = proxy.server.backend
    finance = await backend.approver(keys.token("fin-1", roles=["finance"]))

    async def transfer(s: aiohttp.ClientSession, amount: int) -> dict[str, object]:
        async with s.post(f"{proxy.base}/v1/transfers?amount={amount}", headers=bot) as r:
            return (
                {"status": r.status, **orjson.loads(await r.read())}
                if r.status != 200
                else {"status": 200}
            )

    async with aiohttp.ClientSession() as s:
        approved = str((await transfer(s, 1))["approval_id"])
        denied = str((await transfer(s, 2))["approval_id"])
        expired = str((await transfer(s, 3))["approval_id"])
        await backend.decide_approval(approved, Event.APPROVE, finance, "looks right")
        await backend.decide_approval(denied, Event.DENY, finance, "not this one")
        assert (await transfer(s, 1))["status"] == 200  # the grant is used
        clock.advance(601)
        await proxy.server.services.approvals.check()  # the expiry round
    assert proxy.server.services.audit is not None
    assert proxy.server.services.audit.dropped == 0
    await proxy.server.stop()

    records = [orjson.loads(line) for line in (d / "audit.jsonl").read_text().splitlines()]
    events = [(r["event"], r["approval_id"]) for r in records if r.get("kind") == "approval"]
    assert ("requested", approved) in events and ("requested", denied) in events
    assert ("approved", approved) in events and ("used", approved) in events
    assert ("denied", denied) in events and ("expired", expired) in events
    by_event = {r["event"] + r["approval_id"]: r for r in records if r.get("kind") == "approval"}
    assert by_event["approved" + approved]["decided_by"] == "fin-1"
    assert by_event["denied" + denied]["approval"]["decided_reason"] == "not this one"
    assert by_event["requested" + approved]["approval"]["chain"] == []
    ok = cli("audit", "verify", str(d / "audit.jsonl"), "--key", str(d / "signing.pem"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
