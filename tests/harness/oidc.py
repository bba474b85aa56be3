"""A real OpenID provider for the identity tests: `oidc-provider` from npm (OpenID Certified),
run by node from `tests/harness/oidc_provider.mjs` on a free port (`make node-deps` installs
it). `OpenIdProvider.client_credentials` and `.exchange` are what an agent or the proxy
sends to it; `.stats()` counts the tokens it issued."""

from __future__ import annotations

import asyncio
import base64
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from tests.harness.processes import free_port

NODE_MODULES = Path(__file__).resolve().parents[2] / ".cache" / "node" / "node_modules"
SCRIPT = Path(__file__).with_name("oidc_provider.mjs")
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"


@dataclass(frozen=True)
class Client:
    client_id: str
    client_secret: str
    grant_types: tuple[str, ...] = ("client_credentials",)
    scope: str = ""


@dataclass
class OpenIdProvider:
    issuer: str

    @property
    def token_url(self) -> str:
        return self.issuer + "/token"

    async def token(self, client: Client, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """POST /token as `client` (client_secret_basic): (status, JSON answer)."""
        # RFC 6749 §2.3.1: each part form-urlencoded, then joined and base64-encoded.
        pair = f"{quote(client.client_id, safe='')}:{quote(client.client_secret, safe='')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.token_url, data=dict(form), headers={"Authorization": auth}) as r,
        ):
            return r.status, orjson.loads(await r.read())

    async def client_credentials(self, client: Client, resource: str, scope: str = "") -> str:
        form = {"grant_type": "client_credentials", "resource": resource}
        if scope:
            form["scope"] = scope
        status, body = await self.token(client, form)
        assert status == 200, body
        token: str = body["access_token"]
        return token

    async def stats(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as s, s.get(self.issuer + "/_test/stats") as r:
            result: dict[str, int] = await r.json()
            return result


def available() -> bool:
    return shutil.which("node") is not None and (NODE_MODULES / "oidc-provider").is_dir()


@asynccontextmanager
async def run_provider(
    directory: Path,
    clients: Sequence[Client],
    resources: Mapping[str, Mapping[str, Any]],
    *,
    default_resource: str | None = None,
) -> AsyncIterator[OpenIdProvider]:
    """oidc-provider on a free port. `resources`: resource indicator → {scope, ttl}."""
    assert available(), "oidc-provider is missing: run `make node-deps`"
    # ESM resolves packages from the script's own directory, never NODE_PATH.
    script = directory / "oidc_provider.mjs"
    shutil.copyfile(SCRIPT, script)
    link = directory / "node_modules"
    if not link.exists():
        link.symlink_to(NODE_MODULES, target_is_directory=True)
    settings = {
        "port": free_port(),
        "clients": [
            {
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "grant_types": list(c.grant_types),
                "scope": c.scope,
            }
            for c in clients
        ],
        "resources": {uri: dict(info) for uri, info in resources.items()},
        "default_resource": default_resource or next(iter(resources)),
    }
    process = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        orjson.dumps(settings).decode(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line:
            raise AssertionError((await process.stderr.read()).decode(errors="replace"))
        yield OpenIdProvider(orjson.loads(line)["issuer"])
    finally:
        process.terminate()
        await process.wait()
