"""The propagated authorization context: the headers a tool receives with every call.

Only the proxy sets these: every inbound `X-Agentproxy-*` header was stripped before. The
same facts travel signed in `X-Agentproxy-Context` (a short-lived JWT), so a tool that must
not trust the network can verify them against the proxy's `/.well-known/jwks.json`.
"""

from __future__ import annotations

from agentproxy.config.model import Upstream
from agentproxy.core import Call
from agentproxy.identity.context import ContextSigner
from agentproxy.protocols.http import header_value


def context_headers(
    call: Call, signer: ContextSigner, *, method: str | None, path: str | None
) -> list[tuple[str, str]]:
    """Header values are percent-encoded UTF-8 (RFC 3986) so any identifier fits a header and
    a comma-separated list; absent facts are absent headers (inbound ones never survive).
    `method` and `path` (no query) are what the upstream receives; the signed context names
    them."""
    principal = call.principal
    if principal is None:
        raise ValueError("context headers need a verified principal")
    decision = call.decision
    headers = [("X-Agentproxy-Agent", header_value(principal.agent))]
    if principal.acting_for is not None:
        headers.append(("X-Agentproxy-User", header_value(principal.acting_for)))
    if principal.chain:
        headers.append(("X-Agentproxy-Chain", ",".join(header_value(a) for a in principal.chain)))
    if call.task is not None:
        headers.append(("X-Agentproxy-Task", call.task))
    headers.append(("X-Agentproxy-Decision", call.id))
    if call.approval is not None:
        headers.append(("X-Agentproxy-Approval", call.approval))
    headers.append(("traceparent", call.trace.traceparent))
    if call.trace.state is not None:
        headers.append(("tracestate", call.trace.state))
    token = signer.sign(
        principal=principal,
        task=call.task,
        rule=decision.rule_id if decision else None,
        upstream=call.upstream,
        now=call.now,
        decision_id=call.id,
        action=call.action.name,
        method=method,
        path=path,
        approval=call.approval,
    )
    headers.append(("X-Agentproxy-Context", token))
    return headers


def credential_header(upstream: Upstream) -> str | None:
    """The header the upstream's credential travels in, static or exchanged per call: the
    agent's own value of it is never forwarded."""
    if upstream.token_exchange is not None:
        return upstream.token_exchange.header
    return upstream.credentials.header if upstream.credentials is not None else None


def upstream_credential(call: Call, upstream: Upstream) -> tuple[str, str] | None:
    """(header, value) of the upstream's credential for this call: the one exchanged for it
    (the credential stage set it), else the static one; None without either."""
    if upstream.token_exchange is not None:
        # Set by the credential stage before forwarding; a call without it is not forwarded.
        return call.upstream_credential
    creds = upstream.credentials
    if creds is None:
        return None
    return creds.header, creds.header_value
