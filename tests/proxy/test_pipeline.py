"""The pipeline on its own: the assembled stages driven with a recording exchange, the memory
store and a fake clock. No port is opened; each test takes milliseconds.

What the loop promises: every call ends forwarded or refused, never both; nothing is
forwarded once a refusal is set; the finishers (settle, record) run exactly once on every
path, a bug included; reservations are given back when the upstream never served the call;
a pipeline keeps the settings it was built with.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson
import pytest

from agentproxy.audit.decision_log import DecisionLog
from agentproxy.config import Config
from agentproxy.core import Action, Call
from agentproxy.errors import Refusal, UpstreamFailed, UpstreamTimeout
from agentproxy.metering.metrics import Metrics
from agentproxy.proxy import assemble
from agentproxy.proxy import runtime as runtime_module
from agentproxy.proxy.explain import explain
from agentproxy.proxy.pipeline import Pipeline, start_call
from agentproxy.store import MemoryStore, Revocation
from tests.conftest import Keys, write_config
from tests.harness.clock import FakeClock

Hook = Callable[[Call], Awaitable[None]]


@dataclass
class RecordingExchange:
    """An exchange that forwards nowhere: it records what the loop asked of it."""

    on_describe: Hook | None = None
    on_forward: Hook | None = None
    status: int = 200
    events: list[str] = field(default_factory=list)
    _responded: bool = False

    @property
    def responded(self) -> bool:
        return self._responded

    async def describe(self, call: Call) -> None:
        self.events.append("describe")
        if self.on_describe is not None:
            await self.on_describe(call)

    async def forward(self, call: Call) -> None:
        self.events.append("forward")
        if self.on_forward is not None:
            await self.on_forward(call)
        call.status = self.status
        self._responded = True

    async def refuse(self, call: Call) -> None:
        assert call.refusal is not None
        self.events.append(f"refuse {call.refusal.status}")
        call.status = call.refusal.status
        self._responded = True


@dataclass
class Harness:
    clock: FakeClock
    keys: Keys
    store: MemoryStore
    services: assemble.Services
    pipeline: Pipeline
    explainer: Pipeline
    log: io.BytesIO
    decision_log: DecisionLog

    def call(self, action: Action, token: str | None, task: str | None = None) -> Call:
        return start_call(
            action,
            "tool",
            started=self.clock.monotonic(),
            now=self.clock.now(),
            bearer=token,
            declared_task=task,
            refusal=None,
        )

    async def run(
        self, action: Action, token: str | None, exchange: RecordingExchange | None = None
    ) -> tuple[Call, RecordingExchange]:
        exchange = exchange or RecordingExchange()
        call = self.call(action, token)
        await self.pipeline.run(call, exchange)
        return call, exchange

    def requests(self, decision: str) -> float:
        value = self.services.metrics.exposition.get_sample_value(
            "agentproxy_requests_total",
            {"upstream": "tool", "action": _any_action(self, decision), "decision": decision},
        )
        return value or 0.0

    def token(self, agent: str) -> str:
        """A token valid at the fake clock's now."""
        now = int(self.clock.now())
        return self.keys.token(agent, iat=now, exp=now + 300)

    def log_lines(self) -> list[dict[str, object]]:
        self.decision_log.flush()
        return [orjson.loads(line) for line in self.log.getvalue().splitlines()]


def _any_action(harness: Harness, decision: str) -> str:
    """The action label the one sample with `decision` carries."""
    for metric in harness.services.metrics.exposition.collect():
        for sample in metric.samples:
            if sample.name == "agentproxy_requests_total" and sample.labels["decision"] == decision:
                return sample.labels["action"]
    return "other"


POLICY = """
default: deny
rules:
  - id: read
    agents: [hr-bot]
    actions: ["http:GET /v1/employees/{id}"]
    effect: allow
  - id: limited
    agents: [hr-bot]
    actions: ["http:POST /v1/notes"]
    effect: allow
    limits: [{name: notes, calls: 2, window: 1h, key: agent}]
  - id: transfers
    agents: [pay-bot]
    actions: ["http:POST /v1/transfers"]
    effect: require_approval
    approval: {approvers: ["role:finance"], timeout: 10m, hold: 0s}
"""


async def make_harness(
    tmp_path: Path, keys: Keys, policy: str = POLICY, *, mode: str = "enforce", extra: str = ""
) -> Harness:
    d = tmp_path / f"{mode}-{len(policy)}-{len(extra)}"
    d.mkdir(exist_ok=True)
    path = write_config(d, keys, "http://127.0.0.1:9", policy=policy, mode=mode, extra=extra)
    config = runtime_module.load_config(path)
    runtime = await runtime_module.build(config)
    clock = FakeClock()
    store = MemoryStore()
    metrics = Metrics(())
    services = assemble.services(config, store, clock, metrics=metrics, stopping=asyncio.Event())
    log = io.BytesIO()
    decision_log = DecisionLog("stdout", stream=log, clock=clock)
    return Harness(
        clock,
        keys,
        store,
        services,
        assemble.build(runtime, services, decision_log),
        assemble.build_explain(runtime, services),
        log,
        decision_log,
    )


def GET(path: str) -> Action:
    return Action("http", "GET", path)


def POST(path: str) -> Action:
    return Action("http", "POST", path)


async def test_an_allowed_call_is_forwarded_once_and_recorded_once(
    tmp_path: Path, keys: Keys
) -> None:
    h = await make_harness(tmp_path, keys)
    call, exchange = await h.run(GET("/v1/employees/42"), h.token("hr-bot"))
    assert exchange.events == ["describe", "forward"]
    assert call.refusal is None and call.forwarded and call.status == 200
    assert call.decision is not None and call.decision.rule_id == "read"
    assert h.requests("allow") == 1
    (line,) = h.log_lines()
    assert line["decision_id"] == call.id and line["effect"] == "allow"


async def test_a_denied_call_is_refused_never_forwarded_and_recorded_once(
    tmp_path: Path, keys: Keys
) -> None:
    h = await make_harness(tmp_path, keys)
    call, exchange = await h.run(GET("/v1/salaries"), h.token("hr-bot"))
    assert exchange.events == ["describe", "refuse 403"]
    assert not call.forwarded
    assert h.requests("deny") == 1
    assert len(h.log_lines()) == 1


async def test_no_token_is_refused_before_the_body_is_read(tmp_path: Path, keys: Keys) -> None:
    h = await make_harness(tmp_path, keys)
    _, exchange = await h.run(GET("/v1/employees/42"), None)
    assert exchange.events == ["refuse 401"]  # describe (the body) never ran
    assert h.requests("unauthenticated") == 1


async def test_a_bug_while_forwarding_is_a_closed_500_recorded_once(
    tmp_path: Path, keys: Keys
) -> None:
    async def broken(call: Call) -> None:
        raise KeyError("a bug")

    h = await make_harness(tmp_path, keys)
    exchange = RecordingExchange(on_forward=broken)
    call, _ = await h.run(GET("/v1/employees/42"), h.token("hr-bot"), exchange)
    assert exchange.events == ["describe", "forward", "refuse 500"]
    assert call.refusal is not None and "a bug" not in call.refusal.detail
    assert len(h.log_lines()) == 1


async def test_a_cancelled_call_is_still_recorded_once(tmp_path: Path, keys: Keys) -> None:
    started = asyncio.Event()

    async def hang(call: Call) -> None:
        started.set()
        await asyncio.Event().wait()

    h = await make_harness(tmp_path, keys)
    exchange = RecordingExchange(on_forward=hang)
    call = h.call(GET("/v1/employees/42"), h.token("hr-bot"))
    task = asyncio.ensure_future(h.pipeline.run(call, exchange))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert call.error == "cancelled"
    assert len(h.log_lines()) == 1


@pytest.mark.parametrize(
    ("failure", "kept"),
    [
        (UpstreamFailed("upstream unreachable"), False),  # it never saw the call
        (UpstreamTimeout("no answer"), True),  # it may have acted: the reservation stands
    ],
)
async def test_reservations_are_given_back_only_when_the_upstream_never_served_the_call(
    tmp_path: Path, keys: Keys, failure: Refusal, kept: bool
) -> None:
    async def fail(call: Call) -> None:
        raise failure

    h = await make_harness(tmp_path, keys)
    token = h.token("hr-bot")
    for _ in range(2):
        call, _ = await h.run(POST("/v1/notes"), token, RecordingExchange(on_forward=fail))
        assert call.refusal is failure
    # Both calls failed: with their reservations given back, two more fit the limit of 2.
    answered = [await h.run(POST("/v1/notes"), token) for _ in range(2)]
    statuses = [call.status for call, _ in answered]
    assert statuses == ([429, 429] if kept else [200, 200])


async def test_a_limited_call_is_refused_while_the_store_is_down_even_with_allow_cached(
    tmp_path: Path, keys: Keys
) -> None:
    """A memoized allow says nothing about what is left of a limit (30 calls passed a
    2-per-hour limit while Redis was down)."""
    h = await make_harness(tmp_path, keys, extra="store: {on_error: allow_cached}")
    token = h.token("hr-bot")
    first, _ = await h.run(POST("/v1/notes"), token)
    assert first.status == 200 and first.memo_hit is False

    async def store_down(call: Call) -> None:
        call.store_error = "connection refused"

    call, exchange = await h.run(
        POST("/v1/notes"), token, RecordingExchange(on_describe=store_down)
    )
    assert call.memo_hit and exchange.events == ["describe", "refuse 503"]
    assert call.refusal is not None and "connection refused" not in call.refusal.detail
    # An unlimited rule's memoized allow still passes, as allow_cached promises.
    call, exchange = await h.run(
        GET("/v1/employees/1"), token, RecordingExchange(on_describe=store_down)
    )
    call, exchange = await h.run(
        GET("/v1/employees/1"), token, RecordingExchange(on_describe=store_down)
    )
    assert exchange.events == ["describe", "forward"]


async def test_an_approval_that_expires_is_reported_expired_by_advancing_the_clock(
    tmp_path: Path, keys: Keys
) -> None:
    h = await make_harness(tmp_path, keys)
    token = h.token("pay-bot")
    call, _ = await h.run(POST("/v1/transfers"), token)
    assert call.refusal is not None and call.refusal.problem_type.endswith("/approval-pending")
    h.clock.advance(10 * 60 + 1)  # past the approval's 10m timeout; no sleep
    call, _ = await h.run(POST("/v1/transfers"), h.token("pay-bot"))
    assert call.refusal is not None and call.refusal.problem_type.endswith("/approval-expired")


async def test_explain_refuses_a_revoked_agent_as_the_data_plane_does(
    tmp_path: Path, keys: Keys
) -> None:
    h = await make_harness(tmp_path, keys)
    token = h.token("hr-bot")
    allowed = await explain(h.explainer, token, "GET /v1/employees/42")
    assert allowed["decision"]["effect"] == "allow"
    await h.store.revoke(Revocation("agent", "hr-bot", h.clock.now() + 60, "leaked key"))
    await h.services.revocations.refresh()
    call, _ = await h.run(GET("/v1/employees/42"), token)
    assert call.refusal is not None and call.refusal.status == 403
    with pytest.raises(Refusal) as refused:
        await explain(h.explainer, token, "GET /v1/employees/42")
    assert refused.value.detail == call.refusal.detail
    assert "leaked key" in refused.value.detail
    h.clock.advance(61)  # the revocation lapses
    assert (await explain(h.explainer, token, "GET /v1/employees/42"))["decision"][
        "effect"
    ] == "allow"


async def test_explain_forwards_nothing_and_records_nothing(tmp_path: Path, keys: Keys) -> None:
    h = await make_harness(tmp_path, keys)
    result = await explain(h.explainer, h.token("hr-bot"), "GET /v1/employees/42")
    assert [step["rule"] for step in result["trace"]] == ["read"]
    assert h.log_lines() == []
    assert h.requests("allow") == 0


async def test_a_pin_refusal_is_a_policy_deny(tmp_path: Path, keys: Keys) -> None:
    h = await make_harness(tmp_path, keys)
    pins = h.services.mcp.pins
    pins.observe("tool", "export", "first definition")
    pins.observe("tool", "export", "a changed definition")
    runtime = h.pipeline.runtime
    enforced = assemble.build(
        replace(runtime, config=_with_pinning(runtime.config)),
        h.services,
        DecisionLog("stdout", stream=h.log, clock=h.clock),
    )
    action = Action("mcp", "tools/call", "export", args={})
    call = h.call(action, h.token("hr-bot"))
    exchange = RecordingExchange()
    await enforced.run(call, exchange)
    assert exchange.events == ["describe", "refuse 403"]
    assert call.decision is not None and call.decision.rule_id == "pin-tools"
    assert call.refusal is not None and "changed since it was pinned" in call.refusal.detail
    samples = {
        s.labels["decision"]
        for m in h.services.metrics.exposition.collect()
        for s in m.samples
        if s.name == "agentproxy_requests_total"
    }
    assert samples == {"deny"}


def _with_pinning(config: Config) -> Config:
    (upstream,) = config.upstreams
    return replace(config, upstreams=(replace(upstream, protocol="mcp", pin_tools="enforce"),))


async def test_a_pipeline_keeps_the_settings_it_was_built_with(tmp_path: Path, keys: Keys) -> None:
    """A reload builds new stages: a call that started under `enforce` is decided under it,
    even if the snapshot that replaces its pipeline says `shadow`."""
    h = await make_harness(tmp_path, keys)
    described = asyncio.Event()
    go_on = asyncio.Event()

    async def wait(call: Call) -> None:
        described.set()
        await go_on.wait()

    exchange = RecordingExchange(on_describe=wait)
    call = h.call(GET("/v1/salaries"), h.token("hr-bot"))
    running = asyncio.ensure_future(h.pipeline.run(call, exchange))
    await described.wait()
    shadow = await make_harness(tmp_path, keys, mode="shadow")  # the reloaded snapshot
    go_on.set()
    await running
    assert exchange.events == ["describe", "refuse 403"]  # still enforced
    later, later_exchange = await shadow.run(GET("/v1/salaries"), h.token("hr-bot"))
    assert later_exchange.events == ["describe", "forward"] and not later.enforced
