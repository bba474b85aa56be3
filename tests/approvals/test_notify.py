"""Approval webhooks against a real aiohttp receiver on a free port."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from agentproxy.approvals.lifecycle import Approval, State
from agentproxy.approvals.notify import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    Notifier,
    Webhook,
    payload,
    sign,
    verify_signature,
)

SECRET = b"whsec-7c1d"
EXPIRES = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_approval(**changes: Any) -> Approval:
    values: dict[str, Any] = {
        "id": "ap-1",
        "fingerprint": "f" * 64,
        "state": State.PENDING,
        "rule": "big-transfers",
        "reason": "transfers above 100 need a human",
        "agent": "pay-bot",
        "user": "alice",
        "chain": ("pay-bot",),
        "action": "mcp:tools/call/transfer",
        "summary": {"amount": 250, "to": "acme"},
        "approvers": ("role:finance-approver",),
        "created": EXPIRES - 900,
        "expires": EXPIRES,
    }
    values.update(changes)
    return Approval(**values)


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    abort: bool = False


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers from `script` in order, then 200; records every request it reads."""

    url: str = ""
    script: list[Reply] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    answered: int = 0

    def json(self, i: int = 0) -> Any:
        return orjson.loads(self.received[i].body)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()

    async def hook(request: web.Request) -> web.StreamResponse:
        state.received.append(
            Received(time.monotonic(), dict(request.headers), await request.read())
        )
        reply = state.script.pop(0) if state.script else Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.abort:
            assert request.transport is not None
            request.transport.abort()
        state.answered += 1
        return web.Response(status=reply.status, headers=reply.headers, text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/T01/B02/tok3n?token=q5ecret"
    try:
        yield state
    finally:
        await runner.cleanup()


async def started(*webhooks: Webhook, **kw: Any) -> Notifier:
    kw.setdefault("backoff", 0.001)
    notifier = Notifier(webhooks, **kw)
    await notifier.start()
    return notifier


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- payload -------------------------------------------------------------------------------


async def test_payload_is_slack_shaped_and_machine_readable(receiver: Receiver) -> None:
    approval = make_approval()
    notifier = await started(Webhook(receiver.url), ui_url="https://proxy.example/ui/approvals")
    notifier.notify("requested", approval)
    await notifier.close()

    [got] = receiver.received
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers[EVENT_HEADER] == "requested"
    assert got.headers[DELIVERY_HEADER]
    assert SIGNATURE_HEADER not in got.headers  # no secret, no signature
    body = receiver.json()
    assert body["text"] == (
        "agentproxy: approval requested — pay-bot (for alice) wants mcp:tools/call/transfer"
        " — rule big-transfers: transfers above 100 need a human"
        " — approve at https://proxy.example/ui/approvals#approval=ap-1"
    )
    assert body["event"] == "requested"
    assert body["approval"] == approval.to_json()
    [section] = body["blocks"]
    assert section["type"] == "section"
    assert section["text"] == {"type": "mrkdwn", "text": body["text"]}
    assert [f["type"] for f in section["fields"]] == ["mrkdwn"] * 9
    assert [f["text"] for f in section["fields"]] == [
        "*Agent*\npay-bot",
        "*User*\nalice",
        "*Chain*\npay-bot → pay-bot",
        "*Action*\nmcp:tools/call/transfer",
        "*Upstream*\n—",
        "*Task*\n—",
        "*Rule*\nbig-transfers",
        "*Arguments*\n—",
        "*Expires*\n2026-01-01T00:00:00Z",
    ]
    # An HTTP approval names its query, task and upstream too.
    http = make_approval(
        action="http:POST /v1/transfers",
        query={"amount": "7777", "tag": ("a", "b")},
        task="t-1",
        upstream="payments",
        arguments_bytes=12,
        arguments_sha256="ab" * 32,
    )
    fields = [f["text"] for f in payload("requested", http)["blocks"][0]["fields"]]
    assert (
        "*Action*\nhttp:POST /v1/transfers?amount=7777&amp;tag=a&amp;tag=b" in fields
    )  # Slack-escaped
    assert "*Task*\nt-1" in fields and "*Upstream*\npayments" in fields
    assert "*Arguments*\n12 bytes, SHA-256 abababababababab…" in fields


def test_decided_event_names_the_approver_and_links_details() -> None:
    approval = make_approval(
        state=State.DENIED, user=None, decided_by="carol", decided_reason="not this vendor"
    )
    body = payload("denied", approval, ui_url="https://p/ui")
    assert body["text"] == (
        "agentproxy: approval denied — pay-bot wants mcp:tools/call/transfer"
        " — rule big-transfers: transfers above 100 need a human"
        " — by carol: not this vendor — details at https://p/ui#approval=ap-1"
    )
    assert body["blocks"][0]["fields"][-1]["text"] == "*Decided by*\ncarol"


def test_requester_text_cannot_ping_or_plant_links_in_slack() -> None:
    approval = make_approval(action="mcp:tools/call/<!channel> <https://evil|approve>\nhi & bye")
    body = payload("requested", approval)
    assert "<" not in body["text"] and ">" not in body["text"] and "\n" not in body["text"]
    assert "&lt;!channel&gt; &lt;https://evil|approve&gt; hi &amp; bye" in body["text"]
    assert body["approval"]["action"] == approval.action  # the machine view is untouched


def test_unknown_event_is_a_fault() -> None:
    with pytest.raises(ValueError, match="unknown approval event"):
        payload("maybe", make_approval())


# -- signing -------------------------------------------------------------------------------


async def test_signature_verifies_and_binds_body_and_time(receiver: Receiver) -> None:
    notifier = await started(Webhook(receiver.url, SECRET))
    notifier.notify("approved", make_approval(state=State.APPROVED, decided_by="carol"))
    await notifier.close()

    [got] = receiver.received
    header = got.headers[SIGNATURE_HEADER]
    t = int(header.split(",")[0].removeprefix("t="))
    assert abs(t - time.time()) < 5
    assert verify_signature(SECRET, header, got.body, now=time.time())
    assert not verify_signature(SECRET, header, got.body + b" ", now=time.time())
    assert not verify_signature(SECRET, header, got.body.replace(b"carol", b"carl"), now=t)
    assert not verify_signature(b"other-secret", header, got.body, now=time.time())
    # A captured delivery replayed later than the tolerance is refused.
    assert verify_signature(SECRET, header, got.body, now=t + 300)
    assert not verify_signature(SECRET, header, got.body, now=t + 301)
    assert not verify_signature(SECRET, header, got.body, now=t - 301)


@pytest.mark.parametrize(
    "header",
    ["", "garbage", "t=abc,v1=00", "v1=00", "t=1700000000", "t=1700000000,t=1700000000,v1=0"],
)
def test_malformed_signature_is_false(header: str) -> None:
    assert not verify_signature(SECRET, header, b"{}", now=1_700_000_000)


def test_any_v1_may_match_during_secret_rotation() -> None:
    old = sign(b"old", 1_700_000_000, b"{}")
    new = sign(SECRET, 1_700_000_000, b"{}")
    both = f"{new},{old.partition(',')[2]}"
    assert verify_signature(SECRET, both, b"{}", now=1_700_000_000)
    assert verify_signature(b"old", both, b"{}", now=1_700_000_000)


def test_webhook_repr_hides_secret_path_and_query() -> None:
    hook = Webhook("https://hooks.example:8443/services/T0/B0/tok3n?token=q5ecret", SECRET)
    shown = repr(hook)
    assert shown == "Webhook(https://hooks.example:8443/…, signed)"
    assert hook.host == "hooks.example:8443"
    with pytest.raises(ValueError, match="http"):
        Webhook("ftp://hooks.example/x")


# -- retries -------------------------------------------------------------------------------


async def test_retries_5xx_with_one_delivery_id_then_succeeds(receiver: Receiver) -> None:
    receiver.script = [Reply(500), Reply(503)]
    failures: list[str] = []
    notifier = await started(Webhook(receiver.url, SECRET), attempts=4, on_failure=failures.append)
    notifier.notify("requested", make_approval())
    await notifier.close()

    assert len(receiver.received) == 3
    assert len({r.headers[DELIVERY_HEADER] for r in receiver.received}) == 1
    assert all(
        verify_signature(SECRET, r.headers[SIGNATURE_HEADER], r.body, now=time.time())
        for r in receiver.received
    )
    assert failures == []


async def test_400_is_not_retried(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.script = [Reply(400)]
    failures: list[str] = []
    notifier = await started(Webhook(receiver.url), on_failure=failures.append)
    notifier.notify("requested", make_approval())
    await notifier.close()

    assert len(receiver.received) == 1
    assert failures == [receiver.url.split("/")[2]]
    assert "HTTP 400" in caplog.text


async def test_redirect_is_not_followed(receiver: Receiver) -> None:
    receiver.script = [Reply(307, {"Location": "http://127.0.0.1:1/elsewhere"})]
    failures: list[str] = []
    notifier = await started(Webhook(receiver.url, SECRET), on_failure=failures.append)
    notifier.notify("requested", make_approval())
    await notifier.close()
    assert len(receiver.received) == 1
    assert len(failures) == 1


async def test_retry_after_is_honoured(receiver: Receiver) -> None:
    receiver.script = [Reply(429, {"Retry-After": "1"})]
    notifier = await started(Webhook(receiver.url))
    notifier.notify("requested", make_approval())
    await notifier.close()

    first, second = receiver.received
    assert second.at - first.at >= 0.95  # not the 1 ms backoff


async def test_retry_after_is_capped(receiver: Receiver) -> None:
    receiver.script = [Reply(503, {"Retry-After": "3600"})]
    notifier = await started(Webhook(receiver.url), max_retry_after=0.05)
    started_at = time.monotonic()
    notifier.notify("requested", make_approval())
    await notifier.close()
    assert len(receiver.received) == 2
    assert time.monotonic() - started_at < 1


async def test_timeouts_and_dropped_connections_are_retried(receiver: Receiver) -> None:
    receiver.script = [Reply(delay=1.0), Reply(abort=True)]
    failures: list[str] = []
    notifier = await started(Webhook(receiver.url), timeout=0.1, on_failure=failures.append)
    notifier.notify("expired", make_approval(state=State.EXPIRED))
    await notifier.close()
    assert len(receiver.received) == 3
    assert failures == []


async def test_connection_refused_reports_host_after_all_attempts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/services/T0/B0/tok3n?token=q5ecret"
    failures: list[str] = []
    notifier = await started(Webhook(url, SECRET), attempts=3, on_failure=failures.append)
    with caplog.at_level(logging.WARNING, logger="agentproxy.approvals"):
        notifier.notify("requested", make_approval())
        await notifier.close()

    assert failures == [f"127.0.0.1:{port}"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"127.0.0.1:{port}" in errors[0].getMessage()
    assert "after 3 attempts" in errors[0].getMessage()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2  # the retries
    for secret in ("q5ecret", "tok3n", SECRET.decode()):
        assert secret not in caplog.text


# -- never blocking, bounded, drained ------------------------------------------------------


async def test_notify_returns_at_once_while_the_receiver_is_slow(receiver: Receiver) -> None:
    receiver.script = [Reply(delay=0.5)]
    notifier = await started(Webhook(receiver.url), Webhook(receiver.url, SECRET))
    started_at = time.perf_counter()
    notifier.notify("requested", make_approval())
    assert time.perf_counter() - started_at < 0.05
    assert notifier.in_flight == 2
    await notifier.close()
    assert receiver.answered == 2
    deliveries = {r.headers[DELIVERY_HEADER] for r in receiver.received}
    assert len(deliveries) == 2  # one id per webhook


async def test_close_drains_deliveries_in_flight(receiver: Receiver) -> None:
    receiver.script = [Reply(delay=0.2)]
    failures: list[str] = []
    notifier = await started(Webhook(receiver.url), on_failure=failures.append)
    notifier.notify("requested", make_approval())
    await asyncio.sleep(0)
    await notifier.close()
    assert notifier.in_flight == 0
    assert receiver.answered == 1
    assert failures == []


async def test_close_cancels_what_outlives_the_grace(receiver: Receiver) -> None:
    receiver.script = [Reply(delay=30)]
    failures: list[str] = []
    notifier = await started(Webhook(receiver.url), on_failure=failures.append)
    notifier.notify("requested", make_approval())
    started_at = time.monotonic()
    await notifier.close(grace=0.1)
    assert time.monotonic() - started_at < 1
    assert notifier.in_flight == 0
    assert len(failures) == 1
    notifier.notify("approved", make_approval())  # after close: dropped, reported
    assert len(failures) == 2


async def test_deliveries_in_flight_are_bounded(receiver: Receiver) -> None:
    receiver.script = [Reply(delay=0.2), Reply(delay=0.2)]
    failures: list[str] = []
    notifier = await started(Webhook(receiver.url), max_in_flight=2, on_failure=failures.append)
    for _ in range(3):
        notifier.notify("requested", make_approval())
    assert notifier.in_flight == 2
    assert len(failures) == 1
    await notifier.close()
    assert receiver.answered == 2


async def test_notify_before_start_is_a_fault() -> None:
    notifier = Notifier([Webhook("http://127.0.0.1:1/")])
    with pytest.raises(RuntimeError, match="start"):
        notifier.notify("requested", make_approval())
    await notifier.close()
