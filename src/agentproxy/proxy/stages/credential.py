"""credential: the upstream's credential for this call, when it is one per call
(`credentials.token_exchange`): the caller's token exchanged at the upstream's own
authorization server, just before forwarding, so only calls that will be forwarded ask."""

from __future__ import annotations

from collections.abc import Mapping

from agentproxy.config.model import TokenExchange
from agentproxy.core import Call
from agentproxy.errors import CredentialRefused, CredentialUnavailable, MissingCredential
from agentproxy.identity.upstream_tokens import ExchangeError, UpstreamTokens
from agentproxy.proxy.pipeline import Exchange


class UpstreamCredential:
    """Sets `call.upstream_credential` for upstreams with `credentials.token_exchange`.

    Fails closed: a call whose credential cannot be had is refused, 403 when the
    authorization server refused this caller, 502 when it could not be asked; it is never
    forwarded without one, nor with the caller's own token.
    """

    __slots__ = ("_exchanges", "_tokens")

    def __init__(self, tokens: UpstreamTokens, exchanges: Mapping[str, TokenExchange]) -> None:
        """`exchanges`: upstream name → its settings, for the upstreams that have them."""
        self._tokens = tokens
        self._exchanges = exchanges

    async def __call__(self, call: Call, exchange: Exchange) -> None:
        """Raises CredentialRefused or CredentialUnavailable."""
        settings = self._exchanges.get(call.upstream)
        if settings is None:
            return
        principal = call.principal
        if principal is None or call.bearer is None:
            raise MissingCredential()
        try:
            call.upstream_credential = await self._tokens.credential(
                call.upstream, settings, call.bearer, principal.expires_at
            )
        except ExchangeError as error:
            if error.refused:
                raise CredentialRefused(
                    f"the authorization server of upstream {call.upstream} refused a "
                    f"credential for this caller: {error.detail}"
                ) from None
            raise CredentialUnavailable(
                f"no credential for upstream {call.upstream}: {error.detail}"
            ) from None
