"""`POST /v1/token` (RFC 8693 token exchange) and the STS's metadata (RFC 8414), on the
admin listener. OAuth clients read OAuth errors (RFC 6749 §5.2: `{"error", "error_description"}`),
not problem documents, so this endpoint answers in that shape, always with `no-store`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from agentproxy.errors import Unavailable
from agentproxy.identity.sts import OAuthError
from agentproxy.identity.verifier import read_at_most
from agentproxy.protocols.body import MediaTypeError, parse_media_type

# A token request is a few KiB (two JWTs of at most identity.max_token_bytes and a scope).
MAX_FORM_BYTES = 64 * 1024
# RFC 6749 §5.1: token responses must not be cached.
TOKEN_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class StsBackend(Protocol):
    async def exchange_token(self, form: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        """Raises OAuthError, Unavailable."""

    def sts_metadata(self) -> dict[str, Any] | None: ...


def add_sts_routes(app: web.Application, backend: StsBackend) -> None:
    async def token(request: web.Request) -> web.Response:
        try:
            form = await _read_form(request)
            return _json(await backend.exchange_token(form), 200)
        except OAuthError as exc:
            headers = (
                {"WWW-Authenticate": 'Bearer error="invalid_client"'} if exc.status == 401 else {}
            )
            return _json(exc.to_json(), exc.status, headers)
        except Unavailable as exc:
            return _json({"error": "temporarily_unavailable", "error_description": exc.detail}, 503)

    async def metadata(_: web.Request) -> web.Response:
        found = backend.sts_metadata()
        if found is None:
            raise web.HTTPNotFound()
        return web.json_response(found, headers={"Cache-Control": "max-age=300"})

    app.router.add_post("/v1/token", token)
    app.router.add_get("/.well-known/oauth-authorization-server", metadata)
    app.router.add_get("/.well-known/openid-configuration", metadata)


async def _read_form(request: web.Request) -> dict[str, list[str]]:
    """The request's form parameters. Raises OAuthError (`invalid_request`, or
    `invalid_client` for HTTP client authentication, which this STS does not take)."""
    if request.headers.get("Authorization") is not None:
        raise OAuthError(
            "invalid_client",
            "agents authenticate with actor_token or client_assertion (RFC 7523), not an"
            " Authorization header",
        )
    try:
        media, _ = parse_media_type(request.headers.get("Content-Type", ""))
    except MediaTypeError:
        media = ""
    if media != "application/x-www-form-urlencoded":
        raise OAuthError(
            "invalid_request", "send the parameters as application/x-www-form-urlencoded"
        )
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", f"the request is larger than {MAX_FORM_BYTES} bytes")
    # Read to its end: a form sent in pieces (chunked) is a form, not its first piece.
    body = await read_at_most(request.content, MAX_FORM_BYTES + 1)
    if len(body) > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", f"the request is larger than {MAX_FORM_BYTES} bytes")
    try:
        text = body.decode("ascii")
        return parse_qs(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            errors="strict",
            max_num_fields=32,
        )
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a well-formed form") from None


def _json(
    data: dict[str, Any], status: int, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data),
        content_type="application/json",
        headers={**TOKEN_HEADERS, **(headers or {})},
    )
