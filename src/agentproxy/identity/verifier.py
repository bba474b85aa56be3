"""Verify bearer tokens against the configured issuers and cache the principals they name.

Verifying an RS256 signature costs ~42 µs, a third of what a whole call may spend, so a
verified token is remembered by its exact bytes until it expires; a cache hit costs ~1 µs.
The cache is keyed by the token and never by a claim: two tokens with the same `sub` may
differ in audience, roles or actor chain.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options

from agentproxy.config.model import ClaimNames, Identity, Issuer
from agentproxy.core import Principal
from agentproxy.errors import Unauthenticated, Unavailable
from agentproxy.identity.principal import principal_from_claims

# The claims the proxy's own STS writes, whatever `identity.claims` says of other issuers.
OWN_CLAIMS = ClaimNames()

# The PyJWKClient settings: the fetched set is reused for five minutes, and a token with an
# unknown `kid` triggers at most one refetch per cooldown, so a flood of forged key ids
# cannot turn into a flood of requests to the identity provider.
JWKS_LIFESPAN = 300.0
JWKS_TIMEOUT = 5.0
JWKS_COOLDOWN = 30.0

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

# RFC 7515 §7.1 compact serialization; RFC 7515 §2 base64url has no padding. Every allowed
# algorithm signs, so the signature segment is never empty (an unsecured JWT, RFC 7519 §6,
# has an empty one).
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

# The lifetime claims are checked against the injected `now` (below), not PyJWT's own clock.
_DECODE_OPTIONS: Options = {
    "require": ["exp", "iss", "aud", "sub"],
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
}

# Checked in order: InvalidSignatureError is a DecodeError.
_PYJWT_DETAILS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidAlgorithmError, "algorithm not allowed for this issuer"),
    (jwt.InvalidSignatureError, "signature does not verify"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (InvalidSubjectError, "claim 'sub' is not a string"),
    (InvalidJTIError, "claim 'jti' is not a string"),
    (jwt.InvalidKeyError, "token algorithm does not fit the issuer's key"),
    (jwt.DecodeError, "malformed token"),
)

VerificationKey = (
    jwt.PyJWK | rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | bytes
)


class TokenVerifier:
    """Verifies bearer JWTs from the configured issuers; `start` must run before `verify`.

    Until `start` has run no issuer is trusted, so every token is refused.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        own: tuple[Issuer, VerificationKey] | None = None,
        resources: tuple[str, ...] = (),
        cache_size: int = 10_000,
        jwks_cooldown: float = JWKS_COOLDOWN,
    ) -> None:
        """`own`: the proxy's own STS issuer and its public key, trusted besides the
        configured issuers, with the claim names the STS writes. `resources`: the upstreams'
        resource URIs (RFC 8707), audiences of every issuer besides its own; which upstream
        a token naming one may be used on is the identify stage's to check."""
        self._identity = identity
        self._own = own
        self._resources = resources
        self._cache_size = cache_size
        self._jwks_cooldown = jwks_cooldown
        self._issuers: dict[str, _TrustedIssuer] = {}
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def start(self) -> None:
        """Load every issuer's keys, fetching remote key sets once, so ready means verifiable.

        Raises ValueError naming the file or issuer when a key file cannot be used or an
        issuer's algorithms do not fit its key, and `Unavailable` naming the URL when a
        JWKS URL cannot be fetched.
        """
        issuers: dict[str, _TrustedIssuer] = {}
        for config in self._identity.issuers:
            _check_algorithms(config)
            jwks_url = config.jwks_url
            if config.discovery:
                jwks_url = await discover_jwks_uri(config.issuer)
            if jwks_url is not None:
                keys: _KeySource = await _RemoteKeys.fetch(
                    jwks_url, config.issuer, self._jwks_cooldown
                )
            elif config.jwks_file is not None:
                keys = _KeyFile.load(config.jwks_file)
            elif config.public_key_file is not None:
                keys = _StaticKey(_load_public_key(config.public_key_file))
            elif config.hs256_secret is not None:
                keys = _StaticKey(config.hs256_secret.value)
            else:
                raise ValueError(f"issuer {config.issuer!r} has no key source")
            if self._resources:
                audiences = (*config.audiences, *self._resources)
                config = dataclasses.replace(config, audiences=tuple(dict.fromkeys(audiences)))
            issuers[config.issuer] = _TrustedIssuer(config, keys, self._identity.claims)
        if self._own is not None:
            config, key = self._own
            issuers[config.issuer] = _TrustedIssuer(config, _StaticKey(key), OWN_CLAIMS)
        self._issuers = issuers

    async def verify(self, token: str, now: float) -> Principal:
        """The principal `token` names, if it verifies at `now`.

        Raises `Unauthenticated` (401) when the token is malformed, too large, from an unknown
        issuer, signed with an unknown key or a disallowed algorithm, does not verify, is
        expired or not yet valid, or names a malformed identity; the detail never holds the
        token. Raises `Unavailable` (503) when the issuer's key set cannot be fetched.
        """
        cached = self._cache.get(token)
        if cached is not None:
            principal, valid_until = cached
            if now < valid_until:
                self._cache.move_to_end(token)
                return principal
            del self._cache[token]
            raise Unauthenticated("token expired")
        principal, valid_until = await self._verify_uncached(token, now)
        self._cache[token] = (principal, valid_until)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    async def _verify_uncached(self, token: str, now: float) -> tuple[Principal, float]:
        if len(token) > self._identity.max_token_bytes:
            raise Unauthenticated("token too large")
        if not _COMPACT_JWS.fullmatch(token):
            raise Unauthenticated("token is not a JWT (three base64url segments)")
        # Read without verifying only to choose the issuer's configuration: its key and its
        # algorithms, never the token's own `alg` (RFC 8725 §2.1, §3.1). PyJWT then checks
        # `iss` again, so a payload that parses differently here cannot pick another issuer.
        header, payload = _unverified_segments(token)
        issuer_name = payload.get("iss")
        if not isinstance(issuer_name, str):
            raise Unauthenticated("token has no 'iss' claim")
        issuer = self._issuers.get(issuer_name)
        if issuer is None:
            raise Unauthenticated("token issuer is not trusted")
        config = issuer.config
        kid = header.get("kid")
        key = await issuer.keys.key_for(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(config.algorithms),
                audience=list(config.audiences),
                issuer=config.issuer,
                options=_DECODE_OPTIONS,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(_describe(exc)) from None
        expires_at = _check_lifetime(claims, now, config.leeway)
        principal = principal_from_claims(claims, issuer.claims, config.issuer, expires_at)
        return principal, expires_at + config.leeway


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """A response body, whole, or its first `limit` bytes: `read(n)` returns what has arrived
    so far, so a body sent in pieces (chunked, several segments) is read until it ends."""
    body = bytearray()
    while len(body) < limit:
        chunk = await content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def discover_jwks_uri(issuer: str) -> str:
    """The `jwks_uri` of an issuer's OpenID Provider Metadata (OIDC Discovery 1.0 §4), read
    from `{issuer}/.well-known/openid-configuration` once at start.

    Raises `Unavailable` naming the URL when it cannot be read, and ValueError when it
    names another issuer (§4.3: a metadata document for another issuer must not be used,
    or a look-alike could substitute its keys) or no http(s) `jwks_uri`.
    """
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise Unavailable(
                    f"OIDC discovery: {url} answered {response.status}", component="identity"
                )
            metadata = orjson.loads(await read_at_most(response.content, 1024 * 1024))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise Unavailable(
            f"OIDC discovery: cannot read {url}: {exc}", component="identity"
        ) from exc
    if not isinstance(metadata, dict) or metadata.get("issuer") != issuer:
        named = metadata.get("issuer") if isinstance(metadata, dict) else None
        raise ValueError(
            f"issuer {issuer!r}: its discovery document names issuer {named!r};"
            " configure the issuer exactly as the identity provider writes it in `iss`"
        )
    jwks_uri = metadata.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
        raise ValueError(f"issuer {issuer!r}: its discovery document has no http(s) jwks_uri")
    return jwks_uri


def _unverified_segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, unverified; raises `Unauthenticated`.

    Parsed here with orjson: PyJWT's unverified decoding costs ~55 µs for both, this ~3 µs.
    """
    header_segment, payload_segment, _ = token.split(".")
    try:
        header = orjson.loads(_base64url_decode(header_segment))
        payload = orjson.loads(_base64url_decode(payload_segment))
    except (ValueError, binascii.Error):
        raise Unauthenticated("malformed token") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise Unauthenticated("malformed token")
    return header, payload


def _base64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _describe(exc: jwt.PyJWTError) -> str:
    for kind, detail in _PYJWT_DETAILS:
        if isinstance(exc, kind):
            return detail
    return "token does not verify"


def _check_lifetime(claims: Mapping[str, Any], now: float, leeway: float) -> float:
    """The token's expiry; raises `Unauthenticated` unless `now` is within its lifetime.

    RFC 7519 §4.1.4 and §4.1.5, with the issuer's leeway for clock skew. A token issued in
    the future is refused as well: its issuer's clock is off by more than the leeway.
    """
    expires_at = _numeric_date(claims, "exp")
    if expires_at <= now - leeway:
        raise Unauthenticated("token expired")
    for name in ("nbf", "iat"):
        if name in claims and _numeric_date(claims, name) > now + leeway:
            raise Unauthenticated("token not yet valid")
    return expires_at


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    # RFC 7519 §2: a NumericDate is a JSON number (PyJWT would also take "1700000000").
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthenticated(f"claim {name!r} is not a NumericDate")
    return float(value)


def _check_algorithms(config: Issuer) -> None:
    """Raises ValueError if the issuer's algorithms do not fit its key source.

    RFC 8725 §3.1: an HMAC algorithm next to a public key lets whoever holds the public key
    forge tokens, and `none` is never acceptable. The config loader refuses both; this
    guards an `Identity` built any other way.
    """
    allowed = HMAC_ALGORITHMS if config.hs256_secret is not None else ASYMMETRIC_ALGORITHMS
    wrong = sorted(set(config.algorithms) - allowed)
    if wrong or not config.algorithms:
        raise ValueError(
            f"issuer {config.issuer!r}: algorithms {', '.join(wrong) or '(none)'} do not fit"
            " its key (HS* need hs256_secret; public keys take RS*, PS*, ES*, EdDSA)"
        )


class _KeySource(Protocol):
    async def key_for(self, kid: str | None) -> VerificationKey:
        """Raises `Unauthenticated` for an unknown key, `Unavailable` if keys cannot be had."""
        ...


@dataclass(frozen=True, slots=True)
class _TrustedIssuer:
    config: Issuer
    keys: _KeySource
    claims: ClaimNames


class _StaticKey:
    """One public key or HMAC secret: the token's `kid`, if any, is not needed."""

    __slots__ = ("_key",)

    def __init__(self, key: VerificationKey) -> None:
        self._key = key

    async def key_for(self, kid: str | None) -> VerificationKey:
        return self._key


class _KeyFile:
    """A JWKS file (RFC 7517 §5): keys are chosen by `kid`."""

    __slots__ = ("_by_id", "_only")

    def __init__(self, keys: list[jwt.PyJWK]) -> None:
        self._by_id = {key.key_id: key for key in keys if key.key_id is not None}
        self._only = keys[0] if len(keys) == 1 else None

    @classmethod
    def load(cls, path: Path) -> _KeyFile:
        """Raises ValueError naming the file if it cannot be read or holds no signing key."""
        try:
            key_set = jwt.PyJWKSet.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise ValueError(f"{path}: not a usable JWKS file: {exc}") from exc
        # RFC 7517 §4.2: a key published for encryption must not verify signatures.
        keys = [key for key in key_set.keys if key.public_key_use in ("sig", None)]
        if not keys:
            raise ValueError(f"{path}: the JWKS holds no signing key")
        return cls(keys)

    async def key_for(self, kid: str | None) -> VerificationKey:
        if kid is None:
            if self._only is None:
                raise Unauthenticated("token has no key id (kid)")
            return self._only
        key = self._by_id.get(kid)
        if key is None:
            raise Unauthenticated("unknown signing key (kid)")
        return key


class _JwksClient(jwt.PyJWKClient):
    """PyJWKClient, with every failure to fetch a usable key set as a connection error.

    PyJWKClient raises the same PyJWKClientError for an endpoint serving something other
    than a JSON object as for a `kid` it does not know, and lets a body that is not JSON
    escape as a ValueError. Here the endpoint's failures (503) are all connection errors,
    so a remaining PyJWKClientError means the token's `kid` is unknown (401).
    """

    def fetch_data(self) -> Any:
        try:
            return super().fetch_data()
        except jwt.PyJWKClientConnectionError:
            raise
        except (jwt.PyJWTError, ValueError, OSError) as exc:
            raise jwt.PyJWKClientConnectionError(f"no usable JWKS at {self.uri}: {exc}") from exc


class _RemoteKeys:
    """A JWKS URL, through PyJWKClient: it caches the set and rate-limits refetches."""

    __slots__ = ("_client", "_issuer")

    def __init__(self, client: jwt.PyJWKClient, issuer: str) -> None:
        self._client = client
        self._issuer = issuer

    @classmethod
    async def fetch(cls, url: str, issuer: str, cooldown: float) -> _RemoteKeys:
        """Raises `Unavailable` naming the URL if no usable key set can be fetched from it."""
        client = _JwksClient(
            url, lifespan=JWKS_LIFESPAN, timeout=JWKS_TIMEOUT, cooldown_duration=cooldown
        )
        try:
            # PyJWKClient uses blocking urllib: keep it off the event loop.
            await asyncio.to_thread(client.get_signing_keys)
        except jwt.PyJWTError as exc:
            raise Unavailable(
                f"cannot fetch signing keys from {url}: {exc}", component="identity"
            ) from exc
        return cls(client, issuer)

    async def key_for(self, kid: str | None) -> VerificationKey:
        if kid is None:
            raise Unauthenticated("token has no key id (kid)")
        try:
            return await asyncio.to_thread(self._client.get_signing_key, kid)
        except jwt.PyJWKClientConnectionError:
            raise Unavailable(
                f"cannot fetch the signing keys of issuer {self._issuer!r}", component="identity"
            ) from None
        except jwt.PyJWKClientError:
            raise Unauthenticated("unknown signing key (kid)") from None


def _load_public_key(path: Path) -> VerificationKey:
    """Raises ValueError naming the file if it is not a PEM RSA, EC or Ed25519 public key."""
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a PEM public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"{path}: {type(key).__name__} cannot verify JWTs (use RSA, EC, Ed25519)")
    return key
