"""Credentials per call (`upstreams[].credentials.token_exchange`): the caller's verified
token is exchanged (RFC 8693) at the upstream's own authorization server for a token naming
the same user and agent, cached until it expires, so an upstream never shares one static key
among every agent.

The pure half builds the form and reads the answer; `UpstreamTokens` is the thin shell: one
request per (settings, caller token) at a time however many calls wait for it, a bounded
cache, and a short memory of refusals so that one agent's refused token does not make every
one of its calls ask again. Neither half logs, records or repeats a token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson

from agentproxy.clock import Clock
from agentproxy.config.model import TokenExchange
from agentproxy.identity.sts import ACCESS_TOKEN, GRANT_TYPE, JWT_TOKEN
from agentproxy.identity.verifier import read_at_most

# RFC 6750 §2.1 b64token: what may follow "Bearer " in a header. Anything else (a CR/LF above
# all) would let the authorization server's answer write headers of its own.
_TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_TOKEN: Final = 16 * 1024
_MAX_ANSWER: Final = 64 * 1024
# An answer without `expires_in` (RFC 6749 §5.1 only recommends it) is kept this long.
_DEFAULT_LIFETIME: Final = 60.0
# A refused exchange is answered from memory this long: the same token will be refused again.
_REFUSAL_MEMORY: Final = 5.0
_MAX_ENTRIES: Final = 10_000
_ERROR: Final = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}")  # RFC 6749 §5.2
_ABOUT_THE_CALLER: Final = frozenset(
    {"invalid_grant", "invalid_target", "invalid_scope", "access_denied"}
)


class ExchangeError(Exception):
    """The exchange gave no credential. `refused`: the authorization server said no (an OAuth
    error, RFC 6749 §5.2); otherwise it could not be asked or answered nothing usable.
    `detail` never holds a token or a secret."""

    def __init__(self, detail: str, *, refused: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.refused = refused


@dataclass(frozen=True, slots=True)
class _Issued:
    """What is cached: the token alone. Its header and prefix are not part of the cache key
    and come from the settings of each call's own snapshot, so that a reload moving the
    credential to another header never sends a cached token in the old one, beside the
    agent's own value of it, which is no longer stripped."""

    token: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Refused:
    """A refusal, remembered for a moment: the same token would be refused again."""

    detail: str
    expires_at: float


def exchange_form(settings: TokenExchange, subject_token: str) -> dict[str, str]:
    """The token request (RFC 8693 §2.1): the caller's token as the subject, for the
    upstream's audience or resource. With client_secret_post the client's credentials go in
    the form (RFC 6749 §2.3.1); otherwise in the Authorization header (`basic_auth`)."""
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN,
        "requested_token_type": ACCESS_TOKEN,
    }
    if settings.audience is not None:
        form["audience"] = settings.audience
    if settings.resource is not None:
        form["resource"] = settings.resource
    if settings.scope is not None:
        form["scope"] = settings.scope
    if settings.auth_method == "client_secret_post":
        form["client_id"] = settings.client_id
        form["client_secret"] = settings.client_secret.value.decode()
    return form


def basic_auth(settings: TokenExchange) -> str:
    """RFC 6749 §2.3.1: client id and secret are form-urlencoded before they are joined and
    base64-encoded (a secret with ':' or '%' is not sent as raw bytes)."""
    secret = settings.client_secret.value.decode()
    pair = f"{quote(settings.client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def read_answer(status: int, body: bytes) -> tuple[str, float]:
    """The issued token and its lifetime in seconds from the token endpoint's answer.

    Raises ExchangeError: refused for an OAuth error answer (400/401 with `error`); not
    refused for anything else that is not a usable bearer token (a 5xx, HTML, a token that
    is not a b64token, `N_A` tokens, RFC 8693 §2.2.1)."""
    try:
        answer: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        if status in (400, 401) and isinstance(error, str) and _ERROR.fullmatch(error):
            # Only errors about the caller's token refuse the caller; the rest
            # (invalid_client, unsupported_grant_type…) are the proxy's setup, a 502.
            refused = error in _ABOUT_THE_CALLER
            raise ExchangeError(f"the authorization server answered {error}", refused=refused)
        raise ExchangeError(f"the authorization server answered HTTP {status}", refused=False)
    if not isinstance(answer, dict):
        raise ExchangeError("the authorization server's answer is not a JSON object", refused=False)
    token = answer.get("access_token")
    if not isinstance(token, str) or len(token) > _MAX_TOKEN or not _TOKEN.fullmatch(token):
        raise ExchangeError(
            "the authorization server's access_token is not a bearer token (RFC 6750 §2.1)",
            refused=False,
        )
    token_type = answer.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ExchangeError(
            f"the authorization server issued a {token_type!r} token, not a Bearer token",
            refused=False,
        )
    issued = answer.get("issued_token_type", ACCESS_TOKEN)
    if issued not in (ACCESS_TOKEN, JWT_TOKEN):
        raise ExchangeError(
            f"the authorization server issued a token of type {issued!r}", refused=False
        )
    lifetime = answer.get("expires_in", _DEFAULT_LIFETIME)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        raise ExchangeError("the authorization server's expires_in is not positive", refused=False)
    return token, float(lifetime)


def cached_until(now: float, lifetime: float, subject_expires_at: float) -> float:
    """Until when an issued credential is used: a little before it expires (a tenth of its
    life, at most 30 s, so no call carries one that dies on the way), and never past the
    caller's own token."""
    return min(now + lifetime - min(30.0, lifetime / 10), subject_expires_at)


Outcome = Callable[[str, str], None]


class UpstreamTokens:
    """The exchanged credentials of every upstream, shared by every pipeline a reload builds
    (the cache is keyed by the settings, so changed settings ask anew).

    `on_outcome(upstream, outcome)`: `exchanged`, `cached`, `refused` or `failed`, per call.
    """

    __slots__ = ("_cache", "_clock", "_flights", "_on_outcome")

    def __init__(self, clock: Clock, on_outcome: Outcome | None = None) -> None:
        self._clock = clock
        self._on_outcome = on_outcome or (lambda upstream, outcome: None)
        # key → the credential, or the refusal remembered for a moment; oldest first.
        self._cache: OrderedDict[tuple[str, ...], _Issued | _Refused] = OrderedDict()
        self._flights: dict[tuple[str, ...], asyncio.Task[_Issued]] = {}

    async def credential(
        self, upstream: str, settings: TokenExchange, subject_token: str, subject_expires_at: float
    ) -> tuple[str, str]:
        """(header, value) of the credential for a call by the holder of `subject_token`
        (already verified). Raises ExchangeError."""
        digest = hashlib.sha256(subject_token.encode()).hexdigest()
        key = (*settings.key, digest)
        now = self._clock.now()
        cached = self._cache.get(key)
        if cached is not None:
            if cached.expires_at > now:
                self._cache.move_to_end(key)
                if isinstance(cached, _Refused):
                    self._on_outcome(upstream, "refused")
                    raise ExchangeError(cached.detail, refused=True)
                self._on_outcome(upstream, "cached")
                return _credential(settings, cached)
            del self._cache[key]
        flight = self._flights.get(key)
        if flight is None:
            # Its own task: a caller that goes away does not cancel the exchange the other
            # callers with the same token wait for.
            flight = asyncio.ensure_future(
                self._exchange(key, settings, subject_token, subject_expires_at)
            )
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        try:
            issued = await asyncio.shield(flight)
        except ExchangeError as error:
            self._on_outcome(upstream, "refused" if error.refused else "failed")
            raise
        self._on_outcome(upstream, "exchanged")
        return _credential(settings, issued)

    async def _exchange(
        self,
        key: tuple[str, ...],
        settings: TokenExchange,
        subject_token: str,
        subject_expires_at: float,
    ) -> _Issued:
        try:
            token, lifetime = await _ask(settings, subject_token)
        except ExchangeError as error:
            if error.refused:
                until = min(self._clock.now() + _REFUSAL_MEMORY, subject_expires_at)
                self._remember(key, _Refused(error.detail, until))
            raise
        until = cached_until(self._clock.now(), lifetime, subject_expires_at)
        issued = _Issued(token, until)
        self._remember(key, issued)
        return issued

    def _landed(self, key: tuple[str, ...], flight: asyncio.Task[_Issued]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: every caller may have gone away meanwhile

    def _remember(self, key: tuple[str, ...], entry: _Issued | _Refused) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > _MAX_ENTRIES:
            self._cache.popitem(last=False)


def _credential(settings: TokenExchange, issued: _Issued) -> tuple[str, str]:
    return settings.header, settings.prefix + issued.token


async def _ask(settings: TokenExchange, subject_token: str) -> tuple[str, float]:
    headers = {"Accept": "application/json"}
    if settings.auth_method == "client_secret_basic":
        headers["Authorization"] = basic_auth(settings)
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                settings.token_url,
                data=exchange_form(settings, subject_token),
                headers=headers,
                allow_redirects=False,  # the secret goes to token_url and nowhere else
            ) as response,
        ):
            body = await read_at_most(response.content, _MAX_ANSWER + 1)
            if len(body) > _MAX_ANSWER:
                raise ExchangeError(
                    "the authorization server's answer is larger than 64 KiB", refused=False
                )
            return read_answer(response.status, body)
    except TimeoutError:
        raise ExchangeError(
            f"the authorization server did not answer within {settings.timeout:g}s",
            refused=False,
        ) from None
    except aiohttp.ClientError as exc:
        raise ExchangeError(
            f"the authorization server cannot be reached ({type(exc).__name__})", refused=False
        ) from None
