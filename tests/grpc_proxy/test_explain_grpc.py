"""`explain` of gRPC and MCP calls: the action, args and trace the data plane would use."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.conftest import Keys
from tests.grpc_proxy.conftest import GrpcProxyFactory
from tests.proxy.test_explain import run_cli


async def test_cli_explains_a_grpc_call_with_args_read_as_the_data_plane_reads_them(
    make_grpc_proxy: GrpcProxyFactory, keys: Keys
) -> None:
    proxy = await make_grpc_proxy()
    config = str(proxy.dir / "agentproxy.yaml")
    token = keys.token()
    request = "grpc /hrtest.v1.Employees/Get"

    def explain(*extra: str) -> tuple[int, str, str]:
        out = run_cli("explain", "--config", config, "--token", token, "--request", request, *extra)
        return out.returncode, out.stdout, out.stderr

    code, out, err = await asyncio.to_thread(explain, "--args", '{"id": "13"}', "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["action"] == "grpc:/hrtest.v1.Employees/Get"
    assert result["upstream"] == "hr"
    assert result["decision"]["effect"] == "deny"
    (step,) = [t for t in result["trace"] if t["rule"] == "grpc-reads"]
    assert step["values"] == {"args.id": "13"}
    # amount is unset: read as 0 from the descriptor set (as on the wire), so no error
    code, out, err = await asyncio.to_thread(explain, "--args", '{"id": "7"}', "--json")
    assert json.loads(out)["decision"]["effect"] == "allow", err
    code, out, err = await asyncio.to_thread(explain, "--args", '{"nope": 1}')
    assert code == 1 and "args do not fit hrtest.v1.GetRequest" in err
    code, out, err = await asyncio.to_thread(explain, "--args", "[1]")
    assert code == 2 and "JSON object" in err


async def test_admin_explain_of_grpc_and_mcp(make_grpc_proxy: GrpcProxyFactory, keys: Keys) -> None:
    proxy = await make_grpc_proxy(extra='admin: {operators: ["role:security"]}')
    operator = {"Authorization": f"Bearer {keys.token('sec', roles=['security'])}"}
    url = f"http://127.0.0.1:{proxy.server.admin_port}/v1/explain"
    async with aiohttp.ClientSession(headers=operator) as s:
        body = {
            "token": keys.token(),
            "request": "grpc /hrtest.v1.Employees/Get",
            "args": {"id": "7", "amount": "5000"},
        }
        async with s.post(url, json=body) as r:
            result = await r.json()
        assert result["decision"]["rule"] == "big-amounts"  # int64 "5000" read as 5000
        body = {"token": keys.token(), "request": "mcp tools/call lookup", "args": {"q": 1}}
        async with s.post(url, json=body) as r:
            result = await r.json()
        assert result["action"] == "mcp:tools/call/lookup"
        assert result["decision"]["effect"] == "deny"
        body = {"token": keys.token(), "request": "grpc /no/such/../path"}
        async with s.post(url, json=body) as r:
            assert r.status == 400
        bad_args: dict[str, object] = {"token": keys.token(), "request": "grpc /x.Y/Z", "args": [1]}
        async with s.post(url, json=bad_args) as r:
            assert r.status == 400
