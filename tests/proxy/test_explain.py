"""`explain`, on the command line and on the admin API: the serving code's own answer."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import orjson

from tests.conftest import Keys, Proxy, ProxyFactory


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentproxy", *args], capture_output=True, text=True, check=False
    )


async def test_cli_explains_a_denial_with_the_values_conditions_read(
    proxy: Proxy, keys: Keys
) -> None:
    token = keys.token("hr-bot")
    out = await asyncio.to_thread(
        run_cli,
        "explain",
        "--config",
        str(proxy.config_path),
        "--token",
        token,
        "--request",
        "GET /v1/employees/13",
    )
    assert out.returncode == 0, out.stderr
    assert "rule read-employees [http:GET /v1/employees/{id}]: condition false" in out.stdout
    assert "resource.id = '13'" in out.stdout
    assert "effect:  deny (rule none: default deny)" in out.stdout
    assert token not in out.stdout + out.stderr

    out = await asyncio.to_thread(
        run_cli,
        "explain",
        "--config",
        str(proxy.config_path),
        "--json",
        "--token",
        token,
        "--request",
        "GET /v1/employees/7/salary",
    )
    result = orjson.loads(out.stdout)
    assert result["decision"]["effect"] == "deny" and result["decision"]["rule"] == "no-salaries"
    assert result["upstream"] == "tool"


async def test_cli_explain_reports_a_bad_token_and_exits_1(proxy: Proxy, keys: Keys) -> None:
    out = await asyncio.to_thread(
        run_cli,
        "explain",
        "--config",
        str(proxy.config_path),
        "--token",
        "not.a.jwt",
        "--request",
        "GET /v1/employees/1",
    )
    assert out.returncode == 1
    assert "401" in out.stderr


async def test_admin_explain_needs_an_operator(make_proxy: ProxyFactory, keys: Keys) -> None:
    proxy = await make_proxy(extra='admin: {operators: ["role:security"]}')
    operator = {"Authorization": f"Bearer {keys.token('sec', roles=['security'])}"}
    body = {"token": keys.token("hr-bot", dept="hr"), "request": "POST /v1/employees"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.admin + "/v1/explain", json=body) as r:
            assert r.status == 401
        async with s.post(
            proxy.admin + "/v1/explain",
            json=body,
            headers={"Authorization": f"Bearer {keys.token('hr-bot')}"},
        ) as r:
            assert r.status == 403
        async with s.post(proxy.admin + "/v1/explain", json=body, headers=operator) as r:
            assert r.status == 200
            result = await r.json()
        assert result["decision"]["effect"] == "allow" and result["decision"]["rule"] == "hr-writes"
        (step,) = [t for t in result["trace"] if t["rule"] == "hr-writes"]
        assert step["values"] == {"principal.claims.dept": "hr"}
        async with s.post(proxy.admin + "/v1/explain", json={"token": "x"}, headers=operator) as r:
            assert r.status == 400
