"""The approver sees exactly what an approval releases: the task, the query, and the tool's
arguments whole (nested, untruncated), in the detail view, the gRPC Approvals service and the
audit trail (redacted as the call's own arguments are); a list names them by size and digest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import Keys, ProxyFactory
from tests.mcp.conftest import McpUpstream
from tests.mcp.test_mcp_wire import HEADERS

POLICY = """
default: deny
rules:
  - id: transfers-need-finance
    agents: [mcp-agent]
    actions: ["mcp:tools/call/transfer"]
    effect: require_approval
    reason: money moves only with a human
    approval: {approvers: ["role:finance"], timeout: 10m, hold: 0s}
"""

ARGUMENTS: dict[str, Any] = {
    "amount": 5000,
    "to": "acct-" + "9" * 1000,  # far past the old 200-character cut
    "meta": {"memo": {"line": "rent", "ssn": "123-45-6789"}, "tags": ["a", "b"]},
}


async def test_the_approver_sees_the_whole_call_and_the_audit_redacts_it(
    make_proxy: ProxyFactory, mcp_upstream: McpUpstream, keys: Keys, tmp_path: Path
) -> None:
    (tmp_path / "hmac").write_bytes(b"k" * 32 + b"\n")
    trail = tmp_path / "audit.jsonl"
    extra = (
        f"audit:\n  file: {trail}\n  hmac_key_file: {tmp_path / 'hmac'}\n"
        "  redact: [args.meta.memo.ssn]\n"
    )
    proxy = await make_proxy(
        policy=POLICY,
        upstream_url=mcp_upstream.url,
        upstream_extra="    protocol: mcp",
        extra=extra,
    )
    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "transfer", "arguments": ARGUMENTS},
    }
    headers = {
        **HEADERS,
        "Authorization": f"Bearer {keys.token('mcp-agent')}",
        "X-Agentproxy-Task": "month-end",
    }
    finance = {"Authorization": f"Bearer {keys.token('fin-1', roles=['finance'])}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base + "/mcp", data=orjson.dumps(message), headers=headers) as r:
            answer = orjson.loads(await r.read())
        assert answer["error"]["code"] == -32004, answer  # pending
        approval_id = answer["error"]["data"]["approval_id"]
        async with s.get(f"{proxy.admin}/v1/approvals/{approval_id}", headers=finance) as r:
            detail = await r.json()
        async with s.get(f"{proxy.admin}/v1/approvals?state=pending", headers=finance) as r:
            (listed,) = (await r.json())["approvals"]
    canonical = orjson.dumps(ARGUMENTS, option=orjson.OPT_SORT_KEYS)
    assert detail["arguments"] == ARGUMENTS  # whole, nested, untruncated
    assert detail["arguments_bytes"] == len(canonical)
    assert detail["arguments_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert detail["task"] == "month-end" and detail["query"] == {}
    assert detail["action"] == "mcp:tools/call/transfer" and detail["upstream"] == "tool"
    assert listed["arguments"] is None and listed["arguments_sha256"] == detail["arguments_sha256"]
    await proxy.server.stop()
    text = trail.read_text()
    assert "123-45-6789" not in text  # redacted in the approval's arguments and summary
    (requested,) = [
        orjson.loads(line)
        for line in text.splitlines()
        if '"kind":"approval"' in line and '"event":"requested"' in line
    ]
    memo = requested["approval"]["arguments"]["meta"]["memo"]
    assert memo["line"] == "rent" and str(memo["ssn"]).startswith("hmac-sha256:")
    assert mcp_upstream.calls == []
