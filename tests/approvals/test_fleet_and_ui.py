"""Approvals across replicas sharing Redis, across a restart, through webhooks, and through
the approvals page in a real headless Chromium."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from agentproxy.approvals.notify import verify_signature
from tests.approvals.test_gate import decide, pending, policy, transfer
from tests.conftest import Keys, ProxyFactory, Upstream, start_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def redis_store(url: str) -> str:
    return f"store: {{redis: {{url: '{url}', timeout: 200ms}}}}"


async def test_approval_on_one_replica_releases_the_call_held_on_another(
    make_proxy: ProxyFactory, keys: Keys, redis_url: str, upstream: Upstream
) -> None:
    a = await make_proxy(policy=policy(hold="10s"), extra=redis_store(redis_url))
    b = await make_proxy(policy=policy(hold="10s"), extra=redis_store(redis_url))
    bot, carol = keys.token("pay-bot"), keys.token("carol")
    async with aiohttp.ClientSession() as s:
        held = asyncio.ensure_future(transfer(s, a, bot, 5000))
        deadline = time.monotonic() + 5
        while not (waiting := await pending(s, b, carol)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        approved_at = time.monotonic()
        assert await decide(s, b, carol, waiting[0]["id"], "approve") == 200
        status, _ = await asyncio.wait_for(held, 5)
        assert status == 200
        assert time.monotonic() - approved_at < 1.0


async def test_pending_approvals_survive_a_proxy_restart(
    make_proxy: ProxyFactory, keys: Keys, redis_url: str
) -> None:
    first = await make_proxy(policy=policy(), extra=redis_store(redis_url))
    bot, carol = keys.token("pay-bot"), keys.token("carol")
    async with aiohttp.ClientSession() as s:
        approval_id = (await transfer(s, first, bot, 4321))[1]["approval_id"]
        await first.server.stop()
        second = await make_proxy(policy=policy(), extra=redis_store(redis_url))
        assert [a["id"] for a in await pending(s, second, carol)] == [approval_id]
        assert await decide(s, second, carol, approval_id, "approve") == 200
        assert (await transfer(s, second, bot, 4321))[0] == 200


@pytest.fixture
async def receiver() -> Any:
    got: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, port = await start_app(app)
    try:
        yield f"http://127.0.0.1:{port}/hook", got
    finally:
        await runner.cleanup()


async def test_webhooks_announce_requests_and_decisions(
    make_proxy: ProxyFactory, keys: Keys, receiver: Any, tmp_path: Any
) -> None:
    url, got = receiver
    (tmp_path / "hook-secret").write_text("hook-secret-value\n")
    extra = (
        f"approvals:\n  webhooks: [{{url: '{url}', secret_file: '{tmp_path / 'hook-secret'}'}}]\n"
        "  ui_url: http://approvals.example/ui/approvals"
    )
    proxy = await make_proxy(policy=policy(), extra=extra)
    bot, carol = keys.token("pay-bot"), keys.token("carol")
    async with aiohttp.ClientSession() as s:
        approval_id = (await transfer(s, proxy, bot, 999))[1]["approval_id"]
        assert await decide(s, proxy, carol, approval_id, "deny", "no") == 200
        deadline = time.monotonic() + 5
        while len(got) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    events = []
    for headers, body in got:
        assert verify_signature(
            b"hook-secret-value", headers["X-Agentproxy-Signature"], body, now=time.time()
        )
        payload = orjson.loads(body)
        events.append(payload["event"])
        assert payload["approval"]["id"] == approval_id
        assert "text" in payload and "blocks" in payload
    assert events == ["requested", "denied"]
    assert f"#approval={approval_id}" in orjson.loads(got[0][1])["text"]


async def test_the_approvals_page_in_chromium(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    from playwright.async_api import async_playwright

    proxy = await make_proxy(policy=policy(hold="20s"))
    bot, carol = keys.token("pay-bot"), keys.token("carol")
    async with aiohttp.ClientSession() as s, async_playwright() as pw:
        held = asyncio.ensure_future(transfer(s, proxy, bot, 7777))
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            async with s.get(proxy.admin + "/ui/approvals") as r:
                csp = r.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            await page.goto(f"{proxy.admin}/ui/approvals#token={carol}")
            # the token left the address bar and sits in sessionStorage only
            assert "token=" not in page.url
            assert (
                await page.evaluate("sessionStorage.getItem('agentproxy.approverToken')") == carol
            )
            assert await page.context.cookies() == []
            row = page.locator("tbody tr", has_text="pay-bot")
            await row.wait_for(timeout=10_000)
            assert "big-transfers" in await row.inner_text()
            # A denial needs a reason: without one nothing is sent.
            await row.get_by_role("button", name="Deny").click()
            assert "needs a reason" in await page.locator("#status").inner_text()
            # Typed at human speed across several 2 s refreshes: nothing typed is lost, the
            # caret stays in the field.
            field = row.locator("input")
            await field.click()
            await field.press_sequentially("checked with the vendor, looks fine", delay=130)
            assert await field.input_value() == "checked with the vendor, looks fine"
            assert await page.evaluate("document.activeElement.dataset.id") is not None
            # Approving asks first, naming what is released.
            dialogs: list[str] = []

            async def accept(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.accept()

            page.on("dialog", lambda d: asyncio.ensure_future(accept(d)))
            await row.get_by_role("button", name="Approve").click()
            status, _ = await asyncio.wait_for(held, 10)
            assert dialogs and "http:POST /v1/transfers" in dialogs[0]
            assert status == 200
            await page.locator("#empty").wait_for(state="visible", timeout=10_000)
            assert errors == []
        finally:
            await browser.close()
    assert upstream.seen[-1].headers["X-Agentproxy-Approval"]


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def test_the_console_detail_view_history_and_signed_in_approver(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream
) -> None:
    from playwright.async_api import async_playwright, expect

    proxy = await make_proxy(policy=policy(hold="30s"))
    bot, carol = keys.token("pay-bot", task="t-77"), keys.token("carol")
    arguments = {"to": "DE89 3704 0044 0532 0130 00", "memo": "m" * 400, "lines": [{"sku": "a1"}]}

    async def send(amount: int) -> int:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{proxy.base}/v1/transfers?amount={amount}",
                json=arguments,
                headers={"Authorization": f"Bearer {bot}"},
            ) as r,
        ):
            await r.read()
            return r.status

    async with aiohttp.ClientSession() as s, async_playwright() as pw:
        held = asyncio.ensure_future(send(7777))
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(timezone_id="Asia/Tokyo", locale="en-US")
            page = await context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{proxy.admin}/ui/approvals#token={carol}")
            whoami = page.locator("#whoami")
            await expect(whoami).to_contain_text("carol")
            assert "Signed in as carol" in await whoami.inner_text()
            assert "Asia/Tokyo" in await whoami.inner_text()
            row = page.locator("#approvals tbody tr", has_text="pay-bot")
            await row.wait_for(timeout=10_000)
            assert "GMT+9" in await row.inner_text()  # the approver's zone, named
            # The detail view: everything the grant releases, whole.
            await row.locator("a.open").click()
            detail = page.locator("#detail")
            await detail.wait_for(state="visible")
            text = await detail.inner_text()
            approval_id = await page.locator("#d-id").inner_text()
            assert f"approval={approval_id}" in page.url
            for shown in ("t-77", "tool", "POST", "/v1/transfers?amount=7777", "big-transfers"):
                assert shown in text, shown
            pretty = await page.locator("#d-arguments").inner_text()
            assert '"memo": "' + "m" * 400 + '"' in pretty and '"sku": "a1"' in pretty
            await page.locator("#d-raw").click()
            raw = await page.locator("#d-arguments").inner_text()
            assert "\n" not in raw and orjson.loads(raw) == arguments
            # Reading and typing in the detail view across refreshes: nothing is disturbed.
            reason = page.locator("#d-reason")
            await reason.click()
            await reason.press_sequentially("vendor confirmed by phone", delay=120)
            assert await reason.input_value() == "vendor confirmed by phone"
            dialogs: list[str] = []

            async def accept(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.accept()

            page.on("dialog", lambda d: asyncio.ensure_future(accept(d)))
            await page.locator("#d-approve").click()
            assert await asyncio.wait_for(held, 10) == 200
            assert "DE89 3704" in dialogs[0] and "a1" in dialogs[0]
            await expect(page.locator("#d-state")).to_have_text("approved")
            assert await page.locator("#d-decision").is_hidden()
            # A second one, denied through the API, for the history.
            second = asyncio.ensure_future(send(8888))
            for _ in range(50):
                waiting = [a for a in await pending(s, proxy, carol) if a["id"] != approval_id]
                if waiting:
                    break
                await asyncio.sleep(0.1)
            assert await decide(s, proxy, carol, waiting[0]["id"], "deny", "no such vendor") == 200
            assert await asyncio.wait_for(second, 10) == 403
            await page.locator("#tab-history").click()
            decided = page.locator("#decided tbody tr")
            await expect(decided).to_have_count(2)
            texts = [await decided.nth(i).inner_text() for i in range(2)]
            assert "denied" in texts[0] and "no such vendor" in texts[0] and "carol" in texts[0]
            assert "approved" in texts[1] and "vendor confirmed by phone" in texts[1]
            await page.select_option("#f-state", "approved")
            await expect(decided).to_have_count(1)
            await page.select_option("#f-state", "")
            await page.locator("#f-agent").fill("someone-else")
            await page.locator("#history-empty").wait_for(state="visible")
            await page.locator("#f-agent").fill("pay")
            await expect(decided).to_have_count(2)
            assert errors == []
        finally:
            await browser.close()
