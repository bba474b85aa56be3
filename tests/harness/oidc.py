"""A real OpenID provider for the identity tests: `oidc-provider` from npm (OpenID Certified),
run by node from `tests/harness/oidc_provider.mjs` on a free port (`make node-deps` installs
it). `OpenIdProvider.client_credentials` and `.exchange` are what an agent or the proxy
sends to it; `.stats()` counts the tokens it issued."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import orjson
from yarl import URL

from tests.harness import node
from tests.harness.processes import free_port

SCRIPT = Path(__file__).with_name("oidc_provider.mjs")
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"


@dataclass(frozen=True)
class Client:
    client_id: str
    client_secret: str
    grant_types: tuple[str, ...] = ("client_credentials",)
    scope: str = ""
    redirect_uris: tuple[str, ...] = ()


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

    async def sign_in(self, client: Client, user: str, resource: str, scope: str) -> str:
        """A person's access token, the way a web app gets one: the authorization code flow
        with PKCE through the provider's own sign-in and consent pages (`user` signs in),
        then the code redeemed at /token. The token's `sub` is the user."""
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        redirect = client.redirect_uris[0]
        query = {
            "client_id": client.client_id,
            "response_type": "code",
            "redirect_uri": redirect,
            "scope": f"openid {scope}",
            "resource": resource,
            "state": secrets.token_urlsafe(8),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        # The provider's cookies are for 127.0.0.1: an IP host needs the jar's `unsafe`.
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as s:
            location = await _redirected(
                s.get(self.issuer + "/auth", params=query, allow_redirects=False)
            )
            for prompt in ("login", "consent"):
                assert "/interaction/" in location, location
                form = {"prompt": prompt, "login": user, "password": "any"}
                resume = await _redirected(s.post(location, data=form, allow_redirects=False))
                location = await _redirected(s.get(resume, allow_redirects=False))
            assert location.startswith(redirect), location
            code = parse_qs(urlsplit(location).query)["code"][0]
        status, body = await self.token(
            client,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect,
                "code_verifier": verifier,
                "resource": resource,
            },
        )
        assert status == 200, body
        token: str = body["access_token"]
        return token

    async def stats(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as s, s.get(self.issuer + "/_test/stats") as r:
            result: dict[str, int] = await r.json()
            return result


async def _redirected(request: Any) -> str:
    """Where a response redirects to (followed by hand: each step is the flow's, not the
    client library's)."""
    async with request as response:
        assert response.status in (302, 303), (response.status, await response.text())
        location: str = response.headers["Location"]
    return location if "://" in location else str(response.url.join(URL(location)))


def available() -> bool:
    return node.available("oidc-provider")


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
    script = node.prepare(directory, SCRIPT)
    settings = {
        "port": free_port(),
        "clients": [
            {
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "grant_types": list(c.grant_types),
                "scope": c.scope,
                "redirect_uris": list(c.redirect_uris),
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
