"""`Authorizer.Check`: the decision for a call that is not proxied, from the one pipeline.

A gateway or SDK that forwards calls itself asks here; the call walks identify → decide →
gate → limits → audit exactly like a proxied one, and the exchange's "forward" only collects
the context the proxy would have added. So the answer is the data plane's, by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from agentproxy.core import Action, Call, Facts
from agentproxy.errors import Refusal, UnshapedAnswer
from agentproxy.policy.bodies import answer_shape
from agentproxy.protocols.http import parse_declared_task
from agentproxy.proxy.context import context_headers
from agentproxy.proxy.pipeline import Pipeline, start_call
from agentproxy.proxy.runtime import Runtime

UPSTREAM = "authorizer"  # the `upstream` of Check calls in metrics and logs


@dataclass(slots=True)
class CheckExchange:
    pipeline: Pipeline
    context: list[tuple[str, str]] = field(default_factory=list)
    _responded: bool = False

    @property
    def responded(self) -> bool:
        return self._responded

    async def describe(self, call: Call) -> None:
        """Check requests arrive described."""

    async def forward(self, call: Call) -> None:
        """Collects the context the proxy would add. Raises UnshapedAnswer when an allowing
        rule's obligations shape the answer: the gateway that asked forwards the call itself,
        so its answer never passes here to be shaped, and would reach the agent whole."""
        policy = self.pipeline.runtime.policy
        if policy.shapes and call.principal is not None:
            shape = answer_shape(
                policy, call.action, call.principal, call.facts or Facts(), call.now
            )
            if shape is not None:
                raise UnshapedAnswer(
                    f"rule {shape.rules[0]} shapes this call's answer (obligations), which only "
                    "the proxy can do: send the call through it, not through Check"
                )
        method, path = checked_request(call)
        self.context = [
            (name.lower(), value)
            for name, value in context_headers(
                call, self.pipeline.runtime.signer, method=method, path=path
            )
        ]
        call.status = 200
        self._responded = True

    async def refuse(self, call: Call) -> None:
        if call.refusal is None:
            raise ValueError("refuse() needs call.refusal")
        call.status = call.refusal.status
        self._responded = True


def routed(runtime: Runtime, action: Action) -> str:
    """The upstream the data plane would send `action` to ("" for MCP, which the endpoint
    the agent calls names, not the action). Raises NoRoute."""
    if action.protocol == "grpc":
        return runtime.route_grpc(action.operation).name
    if action.protocol == "http":
        return runtime.route(action.target).name
    return ""


def checked_request(call: Call) -> tuple[str | None, str | None]:
    """The method and path of the request a gateway will forward, as the action names them:
    what the signed context binds (an MCP action names no path of its own)."""
    action = call.action
    if action.protocol == "http":
        return action.operation, action.target
    if action.protocol == "grpc":
        return "POST", action.target
    return None, None


async def check(
    pipeline: Pipeline,
    *,
    token: str | None,
    describe: Action | Refusal,
    task: str | None = None,
    traceparent: str | None = None,
    upstream: str | None = None,
) -> tuple[Call, list[tuple[str, str]]]:
    """The finished call (decision, refusal, status) and, when allowed, the context metadata
    the proxy would add. `describe` is the call's action, or why it could not be described;
    `upstream` the upstream it goes to (None: routed as the data plane would)."""
    clock = pipeline.clock
    refusal: Refusal | None = describe if isinstance(describe, Refusal) else None
    action = describe if isinstance(describe, Action) else Action("http", "?", "<unparsed>")
    declared = None
    try:
        declared = parse_declared_task(task or None)
        if refusal is None:
            action = replace(action, upstream=upstream or routed(pipeline.runtime, action))
    except Refusal as exc:
        refusal = refusal or exc
    call = start_call(
        action,
        UPSTREAM,
        started=clock.monotonic(),
        now=clock.now(),
        bearer=token or None,
        declared_task=declared,
        refusal=refusal,
        traceparent=traceparent or None,
    )
    exchange = CheckExchange(pipeline)
    await pipeline.run(call, exchange)
    return call, exchange.context
