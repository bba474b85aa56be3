"""TokenVerifier against a real JWKS server on a free port: fetching, rotation, outages."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest

from agentproxy.errors import Unauthenticated, Unavailable
from agentproxy.identity.verifier import TokenVerifier, discover_jwks_uri

from .conftest import NOW, URL_ISSUER, JwksServer, Keys, claims, jwk, sign, url_identity


def url_token(keys: Keys, kid: str = "key-1", **extra: Any) -> str:
    return sign(claims(URL_ISSUER, **extra), keys.rsa, "RS256", kid=kid)


async def started(server: JwksServer, cooldown: float = 30.0) -> TokenVerifier:
    verifier = TokenVerifier(url_identity(server.url), jwks_cooldown=cooldown)
    await verifier.start()
    return verifier


async def test_start_fetches_the_key_set_once(jwks_server: JwksServer, keys: Keys) -> None:
    verifier = await started(jwks_server)
    assert jwks_server.requests == 1
    principal = await verifier.verify(url_token(keys), NOW)
    assert (principal.agent, principal.issuer) == ("agent-1", URL_ISSUER)
    assert jwks_server.requests == 1


async def test_a_cached_token_needs_no_key_lookup(jwks_server: JwksServer, keys: Keys) -> None:
    verifier = await started(jwks_server)
    token = url_token(keys)
    first = await verifier.verify(token, NOW)
    assert await verifier.verify(token, NOW + 1) is first
    assert jwks_server.requests == 1


async def test_start_fails_when_the_jwks_url_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/jwks.json"
    with pytest.raises(Unavailable) as caught:
        await TokenVerifier(url_identity(url)).start()
    assert url in caught.value.detail
    assert caught.value.component == "identity"
    assert caught.value.status == 503


async def test_a_token_without_kid_is_refused(jwks_server: JwksServer, keys: Keys) -> None:
    verifier = await started(jwks_server)
    token = sign(claims(URL_ISSUER), keys.rsa, "RS256")
    with pytest.raises(Unauthenticated, match=r"token has no key id \(kid\)"):
        await verifier.verify(token, NOW)


async def test_a_flood_of_unknown_kids_refetches_at_most_once(
    jwks_server: JwksServer, keys: Keys
) -> None:
    verifier = await started(jwks_server, cooldown=1.0)
    await asyncio.sleep(1.1)  # past the cooldown that the fetch at start began
    flood = [url_token(keys, kid=f"forged-{n}") for n in range(50)]
    outcomes = await asyncio.gather(
        *(verifier.verify(token, NOW) for token in flood), return_exceptions=True
    )
    for outcome in outcomes:
        assert isinstance(outcome, Unauthenticated)
        assert outcome.detail == "unknown signing key (kid)"
    assert jwks_server.requests == 2  # the fetch at start and one refetch


async def test_unknown_kids_within_the_cooldown_fetch_nothing(
    jwks_server: JwksServer, keys: Keys
) -> None:
    verifier = await started(jwks_server)
    for n in range(50):
        with pytest.raises(Unauthenticated, match=r"unknown signing key \(kid\)"):
            await verifier.verify(url_token(keys, kid=f"forged-{n}"), NOW)
    assert jwks_server.requests == 1


async def test_a_rotated_key_verifies_after_one_refetch(
    jwks_server: JwksServer, keys: Keys
) -> None:
    verifier = await started(jwks_server, cooldown=0.3)
    jwks_server.keys = [jwk(keys.rsa_other, "key-2", "RS256")]
    await asyncio.sleep(0.35)
    rotated = sign(claims(URL_ISSUER), keys.rsa_other, "RS256", kid="key-2")
    assert (await verifier.verify(rotated, NOW)).agent == "agent-1"
    assert jwks_server.requests == 2
    another = sign(claims(URL_ISSUER, jti="t-2"), keys.rsa_other, "RS256", kid="key-2")
    assert (await verifier.verify(another, NOW)).agent == "agent-1"
    with pytest.raises(Unauthenticated, match=r"unknown signing key \(kid\)"):
        await verifier.verify(url_token(keys), NOW)
    assert jwks_server.requests == 2


async def test_an_outage_refuses_unknown_kids_with_503(jwks_server: JwksServer, keys: Keys) -> None:
    verifier = await started(jwks_server, cooldown=0.0)
    await jwks_server.stop()
    with pytest.raises(Unavailable) as caught:
        await verifier.verify(url_token(keys, kid="key-new"), NOW)
    assert caught.value.status == 503
    assert caught.value.component == "identity"
    assert caught.value.problem_type.endswith("/identity-unavailable")
    assert URL_ISSUER in caught.value.detail


async def test_an_outage_keeps_known_keys_usable(jwks_server: JwksServer, keys: Keys) -> None:
    verifier = await started(jwks_server)
    await jwks_server.stop()
    assert (await verifier.verify(url_token(keys), NOW)).issuer == URL_ISSUER


@pytest.mark.parametrize(("status", "body"), [(500, b"{}"), (200, b"<html>"), (200, b"[]")])
async def test_a_failing_jwks_endpoint_refuses_unknown_kids_with_503(
    jwks_server: JwksServer, keys: Keys, status: int, body: bytes
) -> None:
    verifier = await started(jwks_server, cooldown=0.0)
    jwks_server.status, jwks_server.body = status, body
    with pytest.raises(Unavailable):
        await verifier.verify(url_token(keys, kid="key-new"), NOW)
    assert jwks_server.requests == 2


async def test_a_discovery_document_sent_in_pieces_is_read_whole() -> None:
    # A provider's metadata is several KiB (Keycloak's ~6): over a real network it arrives
    # in several segments, which a single bounded read would cut at the first.
    from aiohttp import web

    async def discovery(request: web.Request) -> web.StreamResponse:
        issuer = f"http://127.0.0.1:{request.url.port}"
        body = orjson.dumps({"issuer": issuer, "jwks_uri": issuer + "/jwks"})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[:10])
        await asyncio.sleep(0.05)
        await response.write(body[10:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    issuer = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        assert await discover_jwks_uri(issuer) == issuer + "/jwks"
    finally:
        await runner.cleanup()
