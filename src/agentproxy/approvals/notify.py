"""Webhook notifications for approval events (requested, approved, denied, expired).

`Notifier.notify()` never blocks the held call: it schedules one delivery per webhook as a
background task and returns. A delivery is a JSON POST whose body Slack's incoming webhooks
render as is (`text` + `blocks`) and which machines read through `event` and `approval`.

Signing follows Stripe and Slack: `X-Agentproxy-Signature: t=<unix seconds>,v1=<hex>` where
the MAC is HMAC-SHA256 over `f"{t}.{body}"`. Binding the time into the MAC lets a receiver
reject a replayed delivery by checking `t` (`verify_signature` does both). Each attempt is signed
afresh, so a retry after a long backoff still passes a receiver's tolerance, while
`X-Agentproxy-Delivery` stays the same on every retry so the receiver can deduplicate.

Logs and `on_failure` name a webhook by its host only: webhook URLs carry their token in the
path (Slack's `/services/T…/B…/<token>`) or the query string.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import aiohttp
import orjson
import yarl

from agentproxy.approvals.lifecycle import Approval
from agentproxy.clock import SYSTEM, Clock, rfc3339

log = logging.getLogger("agentproxy.approvals")

EVENTS = frozenset({"requested", "voted", "approved", "denied", "expired", "used"})

SIGNATURE_HEADER = "X-Agentproxy-Signature"
EVENT_HEADER = "X-Agentproxy-Event"
DELIVERY_HEADER = "X-Agentproxy-Delivery"

# Slack's limits for a section block: 3,000 characters of text, 10 fields of 2,000 each.
_SECTION_TEXT_MAX = 3000
_FIELD_TEXT_MAX = 2000


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where to POST approval events. `repr` shows neither the secret nor the URL's path or
    query, which may hold the receiver's token.

    Raises ValueError for a URL that is not http(s) with a host."""

    url: str
    secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parsed = yarl.URL(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            # The URL itself stays out of the message: its path may be the token.
            raise ValueError("a webhook URL must be http:// or https:// with a host")

    @property
    def host(self) -> str:
        """`host[:port]`: how logs and `on_failure` name this webhook."""
        return yarl.URL(self.url).host_port_subcomponent or "?"

    def __repr__(self) -> str:
        scheme = yarl.URL(self.url).scheme
        signed = "signed" if self.secret is not None else "unsigned"
        return f"Webhook({scheme}://{self.host}/…, {signed})"


def sign(secret: bytes, t: int, body: bytes) -> str:
    """The `X-Agentproxy-Signature` value for `body` sent at unix time `t`."""
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: bytes, header: str, body: bytes, *, now: float, tolerance: float = 300
) -> bool:
    """True when `header` is a valid signature of `body` made within `tolerance` seconds of
    `now`. Several `v1=` values are accepted (one per secret during a rotation); any match
    passes. A malformed header is False, never an exception."""
    t: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if t is not None or not value.isascii() or not value.isdigit():
                return False
            t = int(value)
        elif key == "v1":
            candidates.append(value)
    if t is None or not candidates or abs(now - t) > tolerance:
        return False
    expected = sign(secret, t, body).partition(",v1=")[2]
    # compare_digest on every candidate: the time taken must not say which one was close.
    matches = [
        hmac.compare_digest(expected.encode(), c.encode("utf-8", "surrogatepass"))
        for c in candidates
    ]
    return any(matches)


def slack_escape(text: str) -> str:
    """Text from the requester, made inert for Slack mrkdwn: `&`, `<` and `>` escaped as
    Slack's formatting reference asks, so an agent cannot name a tool `<!channel>` to page
    everyone or `<https://evil|approve here>` to plant a link; newlines and other control
    characters become spaces so the summary stays one line."""
    flat = "".join(" " if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text)
    return flat.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def payload(event: str, approval: Approval, *, ui_url: str | None = None) -> dict[str, Any]:
    """The JSON body for one event: Slack's `text` and `blocks`, plus `event` and `approval`.

    Raises ValueError for an event that is not requested, approved, denied, expired or used."""
    if event not in EVENTS:
        raise ValueError(f"unknown approval event {event!r}; expected one of {sorted(EVENTS)}")
    who = slack_escape(approval.agent)
    if approval.user is not None:
        who += f" (for {slack_escape(approval.user)})"
    rule = f"rule {slack_escape(approval.rule)}"
    if approval.reason:
        rule += f": {slack_escape(approval.reason)}"
    parts = [f"agentproxy: approval {event}", f"{who} wants {slack_escape(approval.action)}", rule]
    if approval.quorum > 1:
        voters = ", ".join(slack_escape(v.by) for v in approval.votes) or "none yet"
        parts.append(f"{len(approval.votes)} of {approval.quorum} approvals ({voters})")
    if approval.decided_by is not None:
        by = f"by {slack_escape(approval.decided_by)}"
        if approval.decided_reason:
            by += f": {slack_escape(approval.decided_reason)}"
        parts.append(by)
    if ui_url is not None:
        link = f"{ui_url}#approval={approval.id}"
        parts.append(f"approve at {link}" if event == "requested" else f"details at {link}")
    text = " — ".join(parts)

    query = "&".join(f"{k}={v}" for k, values in approval.query.items() for v in _listed(values))
    fields = [
        ("Agent", approval.agent),
        ("User", approval.user if approval.user is not None else "—"),
        ("Chain", " → ".join((*approval.chain, approval.agent)) if approval.chain else "—"),
        ("Action", approval.action + (f"?{query}" if query else "")),
        ("Upstream", approval.upstream or "—"),
        ("Task", approval.task or "—"),
        ("Rule", approval.rule),
        (
            "Arguments",
            f"{approval.arguments_bytes} bytes, SHA-256 {approval.arguments_sha256[:16]}…"
            if approval.arguments_sha256
            else "—",
        ),
        ("Expires", rfc3339(approval.expires)),
    ]
    if approval.decided_by is not None:
        fields.append(("Decided by", approval.decided_by))
    section = {
        "type": "section",
        "text": {"type": "mrkdwn", "text": _clip(text, _SECTION_TEXT_MAX)},
        "fields": [
            {"type": "mrkdwn", "text": _clip(f"*{label}*\n{slack_escape(value)}", _FIELD_TEXT_MAX)}
            for label, value in fields
        ],
    }
    return {"text": text, "blocks": [section], "event": event, "approval": approval.to_json()}


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 §10.2.3: delay-seconds or an
    HTTP-date), or None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 §5.6.7: an HTTP-date is always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


class _Retry(Exception):
    """One attempt failed in a way worth another (connection, timeout, 429, 5xx)."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


class _Final(Exception):
    """One attempt failed in a way another would not fix (4xx other than 429, 3xx)."""


class Notifier:
    """Delivers approval events to webhooks in the background, with retries.

    At most `max_in_flight` deliveries run at once; beyond that a delivery is dropped with an
    ERROR log and `on_failure(host)`, so a stuck receiver costs bounded memory."""

    def __init__(
        self,
        webhooks: Sequence[Webhook],
        *,
        ui_url: str | None = None,
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 5.0,
        max_retry_after: float = 60.0,
        max_in_flight: int = 1000,
        on_failure: Callable[[str], None] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        """Raises ValueError for attempts or max_in_flight below 1, or a negative delay."""
        if attempts < 1 or max_in_flight < 1:
            raise ValueError("attempts and max_in_flight must be at least 1")
        if backoff < 0 or timeout <= 0 or max_retry_after < 0:
            raise ValueError("backoff and max_retry_after must be >= 0 and timeout > 0")
        self.webhooks = tuple(webhooks)
        self._ui_url = ui_url
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_retry_after = max_retry_after
        self._max_in_flight = max_in_flight
        self._on_failure = on_failure
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        # Strong references: the event loop keeps only weak ones to tasks.
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # A webhook's cookies have no business in the next delivery.
                cookie_jar=aiohttp.DummyCookieJar(),
                # HTTP(S)_PROXY from the environment must not reroute signed approval events.
                trust_env=False,
                headers={"User-Agent": "agentproxy"},
            )

    async def close(self, *, grace: float = 5.0) -> None:
        """Waits up to `grace` seconds for deliveries in flight, then cancels the rest (each
        is logged and reported to `on_failure`). Later `notify()` calls are dropped."""
        self._closing = True
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def notify(self, event: str, approval: Approval) -> None:
        """Schedules delivery of `event` to every webhook and returns at once.

        Raises ValueError for an unknown event, RuntimeError before `start()` or outside a
        running event loop. Delivery failures are never raised: they are logged and reported
        to `on_failure`."""
        body = orjson.dumps(payload(event, approval, ui_url=self._ui_url))
        if not self.webhooks:
            return
        if self._session is None:
            if self._closing:
                for webhook in self.webhooks:
                    self._fail(webhook, f"{event} for {approval.id} dropped: notifier closed")
                return
            raise RuntimeError("Notifier.notify() called before start()")
        loop = asyncio.get_running_loop()
        for webhook in self.webhooks:
            if self._closing:
                self._fail(webhook, f"{event} for {approval.id} dropped: notifier closed")
                continue
            if len(self._in_flight) >= self._max_in_flight:
                self._fail(
                    webhook,
                    f"{event} for {approval.id} dropped: "
                    f"{self._max_in_flight} deliveries already in flight",
                )
                continue
            task = loop.create_task(self._deliver(webhook, event, approval.id, body))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _deliver(self, webhook: Webhook, event: str, approval_id: str, body: bytes) -> None:
        """Never raises except CancelledError: every outcome is logged here."""
        delivery = str(uuid.uuid4())
        what = f"{event} for {approval_id}"
        try:
            for attempt in range(1, self._attempts + 1):
                try:
                    await self._attempt(webhook, event, delivery, body)
                    return
                except _Retry as retry:
                    if attempt == self._attempts:
                        self._fail(webhook, f"{what} failed after {attempt} attempts: {retry}")
                        return
                    delay = self._backoff * 2 ** (attempt - 1)
                    if retry.wait is not None:
                        delay = max(delay, min(retry.wait, self._max_retry_after))
                    log.warning(
                        "approval webhook %s: %s, attempt %d of %d, retrying in %.2fs",
                        webhook.host,
                        retry.reason,
                        attempt,
                        self._attempts,
                        delay,
                    )
                    await asyncio.sleep(delay)
                except _Final as final:
                    self._fail(webhook, f"{what} refused: {final}")
                    return
        except asyncio.CancelledError:
            if self._closing:
                self._fail(webhook, f"{what} cancelled at shutdown")
            raise
        except Exception:
            log.exception("approval webhook %s: delivery of %s failed (bug)", webhook.host, what)
            self._report(webhook.host)

    async def _attempt(self, webhook: Webhook, event: str, delivery: str, body: bytes) -> None:
        """One POST. Raises _Retry for a failure worth retrying, _Final for one that is not."""
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: event,
            DELIVERY_HEADER: delivery,
        }
        if webhook.secret is not None:
            headers[SIGNATURE_HEADER] = sign(webhook.secret, int(self._clock.now()), body)
        try:
            async with self._session.post(
                webhook.url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                # A redirect would carry the signed body to a host nobody configured.
                allow_redirects=False,
            ) as response:
                status = response.status
                wait = retry_after(response.headers.get("Retry-After"), self._clock.now())
        except TimeoutError:
            raise _Retry("timed out") from None
        except aiohttp.ClientError as exc:
            # The class name only: aiohttp's messages can include the URL and its token.
            raise _Retry(type(exc).__name__) from None
        if 200 <= status < 300:
            return
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status}", wait)
        raise _Final(f"HTTP {status}")

    def _fail(self, webhook: Webhook, message: str) -> None:
        log.error("approval webhook %s: %s", webhook.host, message)
        self._report(webhook.host)

    def _report(self, host: str) -> None:
        if self._on_failure is None:
            return
        try:
            self._on_failure(host)
        except Exception:
            log.exception("approval webhook %s: on_failure callback raised", host)
