"""Keys one spelling apart (issue 20.2), against the upstream that reads them as one: a Go
server decoding into structs with `encoding/json`, built here with the machine's `go`.

Each attack is first sent to the Go server directly, to show that it acts on the spelling we
did not decide on; then through the proxy, where it must be refused (and recorded) before the
Go server sees anything. The last test holds our folding against Go's own: every pair of
runes Go matches case-insensitively is refused as a pair of keys."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agentproxy.protocols.strict_json import JsonError, parse_request
from tests.conftest import Keys, Proxy, ProxyFactory
from tests.harness import go_upstream
from tests.harness.go_upstream import GoUpstream
from tests.proxy.conftest import captured, log_records, record_for

pytestmark = pytest.mark.skipif(
    not go_upstream.go_available(),
    reason="needs Go for a real encoding/json upstream: apt-get install golang-go "
    "(make system-deps does)",
)

POLICY = """
default: deny
rules:
  - id: search
    agents: [agent]
    actions: ["mcp:tools/call/search"]
    effect: allow
  - id: small-low-risk-transfers
    agents: [agent]
    actions: ["mcp:tools/call/transfer"]
    when: 'args.amount <= 100 && args.risk == "low"'
    effect: allow
  - id: cheap-chat
    agents: [agent]
    actions: ["llm:chat/gpt-4o-mini"]
    when: 'has(args.max_tokens) && args.max_tokens <= 100'
    effect: allow
"""

MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-03-26",
}


def tools_call(params: str) -> bytes:
    return b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":' + params.encode() + b"}"


# What each attack body is to us, and what the Go server acts on instead.
MCP_ATTACKS: list[tuple[bytes, dict[str, Any]]] = [
    (tools_call('{"name":"search","Name":"delete_all"}'), {"tool": "delete_all"}),
    (
        tools_call('{"name":"transfer","arguments":{"amount":50,"risk":"low","AMOUNT":5000000}}'),
        {"tool": "transfer", "amount": 5000000},
    ),
    (
        # the long s (U+017F) is "s" to Go: "ri\\u017fk" sets the risk field
        tools_call('{"name":"transfer","arguments":{"amount":5,"risk":"low","ri\\u017fk":"high"}}'),
        {"tool": "transfer", "risk": "high"},
    ),
    (
        b'{"jsonrpc":"2.0","id":7,"method":"ping","METHOD":"tools/call",'
        b'"params":{"name":"delete_all"}}',
        {"method": "tools/call", "tool": "delete_all"},
    ),
]

LLM_ATTACKS: list[tuple[bytes, dict[str, Any]]] = [
    (b'{"model":"gpt-4o-mini","max_tokens":10,"MAX_TOKENS":100000}', {"max_tokens": 100000}),
    (b'{"model":"gpt-4o-mini","max_tokens":10,"Model":"o1-pro"}', {"model": "o1-pro"}),
]


@pytest.fixture(scope="session")
def go_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return go_upstream.build(tmp_path_factory.mktemp("go-upstream"))


@pytest.fixture
async def go_server(go_binary: Path) -> AsyncIterator[GoUpstream]:
    async with go_upstream.run(go_binary) as server:
        yield server


async def go_proxies(make_proxy: ProxyFactory, url: str) -> tuple[Proxy, Proxy]:
    mcp = await make_proxy(policy=POLICY, upstream_url=url, upstream_extra="    protocol: mcp")
    llm = await make_proxy(policy=POLICY, upstream_url=url, upstream_extra="    protocol: llm")
    return mcp, llm


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


def acted_on(seen: dict[str, Any], expected: dict[str, Any]) -> bool:
    return all(seen.get(key) == value for key, value in expected.items())


async def test_the_go_server_acts_on_the_other_spelling(go_server: GoUpstream) -> None:
    for body, _ in MCP_ATTACKS:
        await post(go_server.url + "/mcp", body, MCP_HEADERS)
    for body, _ in LLM_ATTACKS:
        await post(go_server.url + "/v1/chat/completions", body, MCP_HEADERS)
    seen = await go_server.seen()
    attacks = MCP_ATTACKS + LLM_ATTACKS
    assert len(seen) == len(attacks)
    for record, (_, expected) in zip(seen, attacks, strict=True):
        assert acted_on(record, expected), (record, expected)


async def test_mcp_bodies_with_folded_keys_never_reach_the_go_server(
    make_proxy: ProxyFactory,
    go_server: GoUpstream,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mcp, _ = await go_proxies(make_proxy, go_server.url)
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {keys.token('agent')}"}
    decision_ids = []
    for body, _ in MCP_ATTACKS:
        status, answer = await post(mcp.base + "/mcp", body, headers)
        # A JSON-RPC parse error (the id could not be trusted), as MCP clients read it.
        assert status == 400, answer
        assert answer["error"]["code"] == -32700
        assert "one key to a parser that ignores case" in answer["error"]["message"]
        decision_ids.append(answer["error"]["data"]["decision_id"])
    assert await go_server.seen() == []

    # The same calls, spelled once, are decided as usual and reach it.
    status, answer = await post(mcp.base + "/mcp", tools_call('{"name":"search"}'), headers)
    assert status == 200 and answer["result"]["content"][0]["text"] == "ok"
    assert [r["tool"] for r in await go_server.seen()] == ["search"]

    records = log_records(captured(capsys, mcp)[0])
    for decision_id in decision_ids:
        record = record_for(records, decision_id)
        assert record["status"] == 400
        assert record["refusal"]["type"].endswith("/bad-request")
        assert "ignores case" in record["refusal"]["detail"]


async def test_llm_bodies_with_folded_keys_never_reach_the_go_server(
    make_proxy: ProxyFactory, go_server: GoUpstream, keys: Keys
) -> None:
    _, llm = await go_proxies(make_proxy, go_server.url)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {keys.token('agent')}"}
    for body, _ in LLM_ATTACKS:
        status, answer = await post(llm.base + "/v1/chat/completions", body, headers)
        assert status == 400, answer
        assert (
            "one key to a parser that ignores case" in answer["error"]["message"]
        )  # OpenAI's error shape
    assert await go_server.seen() == []

    status, answer = await post(
        llm.base + "/v1/chat/completions", b'{"model":"gpt-4o-mini","max_tokens":10}', headers
    )
    assert status == 200, answer
    assert await go_server.seen() == [{"kind": "chat", "model": "gpt-4o-mini", "max_tokens": 10}]


GO_FOLDS = """
package main

import (
	"fmt"
	"unicode"
)

// Every rune with another that Go's encoding/json takes for it: ToUpper(ToLower(r)) (Go 1.21
// and later) and the SimpleFold orbit (bytes.EqualFold, used before).
func main() {
	for r := rune(0); r <= unicode.MaxRune; r++ {
		if r >= 0xd800 && r < 0xe000 {
			continue
		}
		if f := unicode.ToUpper(unicode.ToLower(r)); f != r {
			fmt.Printf("%d %d\\n", r, f)
		}
		if f := unicode.SimpleFold(r); f != r {
			fmt.Printf("%d %d\\n", r, f)
		}
	}
}
"""


def test_every_pair_of_runes_go_folds_together_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "folds.go"
    source.write_text(GO_FOLDS)
    binary = go_upstream.build(tmp_path, source)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    pairs = [tuple(map(int, line.split())) for line in output.splitlines()]
    assert len(pairs) > 2000  # the whole table, not an empty run
    missed = []
    for a, b in pairs:
        body = orjson.dumps({f"x{chr(a)}y": 1, f"x{chr(b)}y": 2})
        try:
            parse_request(body)
        except JsonError:
            continue
        missed.append((hex(a), hex(b)))
    assert missed == []
