"""The admin listener: metrics, health, readiness, the context-token keys, revocations,
explain, reload, tool pins and approvals (the API and its console)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from agentproxy.admin import authzen
from agentproxy.admin.sts import StsBackend, add_sts_routes
from agentproxy.approvals.authorize import is_listed
from agentproxy.approvals.lifecycle import Approval, Event, State
from agentproxy.audit import tree as tree_module
from agentproxy.audit.tree import records
from agentproxy.clock import SYSTEM, Clock, parse_rfc3339
from agentproxy.config.model import names_principal
from agentproxy.config.yamldoc import parse_duration
from agentproxy.core import Action, Call, Principal
from agentproxy.errors import (
    Denied,
    InternalError,
    NotFound,
    PayloadTooLarge,
    Refusal,
    Unauthenticated,
    Unavailable,
)
from agentproxy.protocols.http import bearer_token, render
from agentproxy.store import ApprovalPage, Revocation, StoreError
from agentproxy.store.base import PAGE_LIMIT, RevocationKind

log = logging.getLogger("agentproxy.admin")
DEFAULT_PAGE = 100  # approvals a list answers by default: one store call well within its bound
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApprovalsBackend(Protocol):
    """What both admin APIs (HTTP and agentproxy.v1 gRPC) decide approvals with."""

    async def approver(self, token: str) -> Principal:
        """The verified principal of an approver's token. Raises Unauthenticated."""

    def is_operator(self, principal: Principal) -> bool: ...

    async def list_approvals(self, state: str | None) -> list[Approval]: ...

    async def page_approvals(
        self, state: str | None, cursor: str | None, limit: int
    ) -> ApprovalPage:
        """Raises ValueError (a cursor no store gave), StoreError."""

    async def get_approval(self, approval_id: str) -> Approval | None: ...

    async def decide_approval(
        self, approval_id: str, event: Event, principal: Principal, reason: str
    ) -> Approval:
        """Raises Denied (not an approver, four-eyes), NotFound, Conflict (already decided),
        StoreError."""


def visible(backend: ApprovalsBackend, principal: Principal, approval: Approval) -> bool:
    """Operators see every approval; approvers those that name them."""
    return backend.is_operator(principal) or is_listed(principal, approval.approvers)


class AdminBackend(ApprovalsBackend, StsBackend, Protocol):
    @property
    def registry(self) -> CollectorRegistry: ...

    def is_ready(self) -> bool: ...

    def jwks(self) -> dict[str, Any]: ...

    async def operator(self, token: str) -> Principal:
        """The verified principal of an operator token. Raises Unauthenticated or Denied."""

    async def revoke(self, revocation: Revocation) -> None:
        """Raises StoreError."""

    async def explain(
        self,
        token: str,
        request: str,
        task: str | None,
        args: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        """Raises Refusal (the token, request or body would be refused) or StoreError."""

    async def check(
        self,
        *,
        token: str | None,
        describe: Action | Refusal,
        task: str | None,
        traceparent: str | None,
        upstream: str | None = None,
    ) -> tuple[Call, list[tuple[str, str]]]:
        """The finished call of an Authorizer.Check (AuthZEN too) and the context it would
        add. Never raises for the call itself: its refusal is on the call."""

    async def budgets(self) -> list[dict[str, Any]]:
        """Every spend limit and its live counters in their current windows. Raises
        StoreError."""

    async def gateway_check(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[bool, int, list[tuple[str, str]], list[str], bytes] | None:
        """Envoy's HTTP ext_authz: (allowed, status, headers to set or answer with, headers
        to remove, body) for a request a gateway holds; None when listen.ext_authz is not
        set (the mode is off)."""

    async def accept_tool(self, upstream: str, tool: str) -> str:
        """Pins a changed MCP tool's new definition; its fingerprint. Raises NotFound when the
        tool has no unaccepted change."""

    async def reload(self) -> bool:
        """Reloads config and policy; False when the new files were rejected."""

    def policy_version(self) -> str: ...

    def audit_files(self) -> list[Path]:
        """The audit trail's files, oldest first (rotated ones, then the current); empty when
        `audit.file` is not configured."""


def admin_app(backend: AdminBackend, clock: Clock = SYSTEM) -> web.Application:
    """Probes need no token (Kubernetes sends none); writes need an operator's bearer JWT.
    Every error is answered as problem+json by one middleware (`problems`)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if backend.is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def jwks_json(_: web.Request) -> web.Response:
        return web.json_response(backend.jwks(), headers={"Cache-Control": "max-age=60"})

    async def revocations(request: web.Request) -> web.Response:
        operator = await _operator(request)
        revocation = parse_revocation(await request.read(), clock.now())
        await backend.revoke(revocation)
        body = revocation_json(revocation) | {"by": operator.agent}
        return web.json_response(body, status=201)

    async def explain(request: web.Request) -> web.Response:
        await _operator(request)
        data = _json_object(
            await request.read(), {"token", "request", "task", "args", "body", "content_type"}
        )
        token, line, task = data.get("token"), data.get("request"), data.get("task")
        if not isinstance(token, str) or not isinstance(line, str):
            raise BadAdminRequest('send {"token": "…", "request": "GET /path"}')
        if task is not None and not isinstance(task, str):
            raise BadAdminRequest('"task" must be a string')
        args = data.get("args")
        if args is not None and not isinstance(args, dict):
            raise BadAdminRequest('"args" must be an object')
        body, content_type = data.get("body"), data.get("content_type")
        if body is not None and not isinstance(body, str):
            raise BadAdminRequest('"body" must be a string: the HTTP body as it is sent')
        if content_type is not None and not isinstance(content_type, str):
            raise BadAdminRequest('"content_type" must be a string')
        raw = None if body is None else body.encode("utf-8")
        return web.json_response(await backend.explain(token, line, task, args, raw, content_type))

    async def accept_tool(request: web.Request) -> web.Response:
        operator = await _operator(request)
        data = _json_object(await request.read(), {"upstream", "tool"})
        upstream, tool = data.get("upstream"), data.get("tool")
        if not isinstance(upstream, str) or not isinstance(tool, str):
            raise BadAdminRequest('send {"upstream": "…", "tool": "…"}')
        fingerprint = await backend.accept_tool(upstream, tool)
        return web.json_response(
            {"upstream": upstream, "tool": tool, "fingerprint": fingerprint, "by": operator.agent}
        )

    async def _approver(request: web.Request) -> Principal:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise Unauthenticated("an approver's bearer token is required")
        return await backend.approver(token)

    async def ext_authz_http(request: web.Request) -> web.Response:
        """Envoy's HTTP ext_authz mode: the request as Envoy received it, under
        /ext_authz (`http_service.path_prefix`). Allowed: 200, the headers to set (list them
        in `allowed_upstream_headers`) and `x-envoy-auth-headers-to-remove`; refused: the
        data plane's own answer."""
        body = await request.read() if request.body_exists else None
        path = request.raw_path.removeprefix("/ext_authz") or "/"
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = await backend.gateway_check(request.method, path, headers, body)
        if answer is None:
            raise NotFound("the ext_authz mode is off (set listen.ext_authz)")
        allowed, status, set_headers, remove, reply = answer
        if not allowed and status < 300:
            # Envoy's HTTP mode reads any 200 as "allowed": a refusal the data plane answers
            # 200 (an MCP JSON-RPC error) must not be, or the call would be forwarded.
            status = 403
        response = web.Response(status=200 if allowed else status, body=reply)
        for name, value in set_headers:
            response.headers.add(name, value)
        if allowed and remove:
            response.headers["x-envoy-auth-headers-to-remove"] = ",".join(remove)
        return response

    async def authzen_evaluation(request: web.Request) -> web.Response:
        """OpenID AuthZEN access evaluation, for operators (a gateway's identity)."""
        await _operator(request)
        data = _json_object(await request.read(), set(authzen.MEMBERS))
        asked = authzen.evaluation(data)
        call, _ = await backend.check(
            token=asked.token,
            describe=asked.describe,
            task=asked.task,
            traceparent=asked.traceparent,
        )
        return web.json_response(authzen.answer(call), headers=NO_STORE)

    async def authzen_evaluations(request: web.Request) -> web.Response:
        await _operator(request)
        data = _json_object(await request.read(), set(authzen.MEMBERS) | {"evaluations", "options"})
        try:
            asked = authzen.evaluations(data)
        except Refusal as exc:
            raise BadAdminRequest(exc.detail) from None
        results = []
        for one in asked:
            call, _ = await backend.check(
                token=one.token, describe=one.describe, task=one.task, traceparent=one.traceparent
            )
            results.append(authzen.answer(call))
        return web.json_response({"evaluations": results}, headers=NO_STORE)

    async def budgets(request: web.Request) -> web.Response:
        """Every budget (spend limit): its window, and per counter used and remaining."""
        await _operator(request)
        return web.json_response({"budgets": await backend.budgets()}, headers=NO_STORE)

    async def whoami(request: web.Request) -> web.Response:
        """Who the bearer token says the caller is (the approvals page shows it)."""
        principal = await _approver(request)
        return web.json_response(
            {
                "agent": principal.agent,
                "user": principal.acting_for,
                "chain": list(principal.chain),
                "roles": sorted(principal.roles),
                "issuer": principal.issuer,
                "operator": backend.is_operator(principal),
            },
            headers=NO_STORE,
        )

    async def approvals_list(request: web.Request) -> web.Response:
        """One page: `?state=&cursor=&limit=` (limit 1..1000, 100 by default); the answer's
        `next_cursor` (null on the last page) fetches the next."""
        state = request.query.get("state") or None
        if state is not None and state not in {s.value for s in State}:
            raise BadAdminRequest(f"state must be one of {', '.join(s.value for s in State)}")
        limit = _page_limit(request.query.get("limit"))
        principal = await _approver(request)
        try:
            page = await backend.page_approvals(state, request.query.get("cursor"), limit)
        except ValueError as exc:
            raise BadAdminRequest(str(exc)) from None
        # A list names the arguments by size and digest; the detail view has them whole.
        shown = [
            {**a.to_json(), "arguments": None}
            for a in page.approvals
            if visible(backend, principal, a)
        ]
        return web.json_response(
            {"approvals": shown, "next_cursor": page.next_cursor}, headers=NO_STORE
        )

    async def approvals_get(request: web.Request) -> web.Response:
        principal = await _approver(request)
        approval = await backend.get_approval(request.match_info["id"])
        if approval is None or not visible(backend, principal, approval):
            raise NotFound("no such approval")
        return web.json_response(approval.to_json(), headers=NO_STORE)

    async def approvals_decide(request: web.Request) -> web.Response:
        event = Event.APPROVE if request.match_info["verb"] == "approve" else Event.DENY
        principal = await _approver(request)
        data = _json_object(await request.read() or b"{}", {"reason"})
        reason = data.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 1000:
            raise BadAdminRequest('"reason" must be a string of at most 1000 characters')
        approval = await backend.decide_approval(request.match_info["id"], event, principal, reason)
        return web.json_response(approval.to_json(), headers=NO_STORE)

    async def tasks_page(_: web.Request) -> web.StreamResponse:
        path = UI_DIR / "tasks.html"
        return web.FileResponse(
            path, headers={**UI_HEADERS, "Content-Type": UI_FILES["tasks.html"]}
        )

    async def ui_page(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("file") or "approvals.html"
        if name not in UI_FILES:
            raise NotFound(f"no page {name!r}")
        path = UI_DIR / name
        return web.FileResponse(path, headers={**UI_HEADERS, "Content-Type": UI_FILES[name]})

    async def reload(request: web.Request) -> web.Response:
        operator = await _operator(request)
        reloaded = await backend.reload()
        body = {
            "reloaded": reloaded,
            "policy_version": backend.policy_version(),
            "by": operator.agent,
        }
        if not reloaded:
            body["error"] = "the new config or policy was rejected; see the proxy's log"
        return web.json_response(body, status=200 if reloaded else 422)

    async def task_tree(request: web.Request) -> web.Response:
        """A task's tree from the audit file (operators only: it names every agent, user and
        action of the task). `?format=text`: as `agentproxy audit trace` prints it."""
        await _operator(request)
        files = backend.audit_files()
        if not files:
            raise NotFound("no audit file to read task trees from (audit.file)")
        task = request.match_info["task"]
        try:
            tree = await asyncio.to_thread(lambda: tree_module.task_tree(task, records(files)))
        except OSError as exc:
            log.error("audit: cannot read the trail for a task tree: %s", exc)
            raise Unavailable("the audit trail cannot be read", component="audit") from None
        if tree is None:
            raise NotFound(f"no record names task {task!r}")
        if request.query.get("format") == "text":
            return web.Response(text=tree_module.render(tree), headers=NO_STORE)
        return web.json_response(tree.to_json(), headers=NO_STORE)

    async def favicon(_: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Cache-Control": "max-age=86400"})

    async def _operator(request: web.Request) -> Principal:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise Unauthenticated("an operator bearer token is required")
        return await backend.operator(token)

    app = web.Application(client_max_size=64 * 1024, middlewares=[problems])
    app.router.add_get("/metrics", make_aiohttp_handler(backend.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/.well-known/jwks.json", jwks_json)
    add_sts_routes(app, backend)
    app.router.add_post("/v1/revocations", revocations)
    app.router.add_post("/v1/explain", explain)
    app.router.add_post("/v1/tools/accept", accept_tool)
    app.router.add_post("/v1/reload", reload)
    app.router.add_get("/v1/whoami", whoami)
    app.router.add_get("/v1/budgets", budgets)
    app.router.add_post("/access/v1/evaluation", authzen_evaluation)
    app.router.add_route("*", "/ext_authz/{tail:.*}", ext_authz_http)
    app.router.add_post("/access/v1/evaluations", authzen_evaluations)
    app.router.add_get("/v1/approvals", approvals_list)
    app.router.add_get("/v1/approvals/{id}", approvals_get)
    app.router.add_post("/v1/approvals/{id}/{verb:approve|deny}", approvals_decide)
    app.router.add_get("/v1/tasks/{task}/tree", task_tree)
    app.router.add_get("/ui/approvals", ui_page)
    app.router.add_get("/ui/tasks", tasks_page)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/ui/{file}", ui_page)
    return app


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place the admin API turns faults into answers: a Refusal is rendered as
    problem+json; the store being down is a 503 (its error text goes to the log, never to
    the caller); aiohttp's own errors (unknown route, wrong method, body too large) keep their
    status but get a problem body; anything else is a bug, logged, and a closed 500."""
    try:
        return await handler(request)
    except Refusal as refusal:
        return _problem(refusal)
    except StoreError as exc:
        log.warning("admin %s %s: store error: %s", request.method, request.path, exc)
        return _problem(Unavailable("the decision store is unavailable", component="store"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _problem(_http_refusal(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("bug in admin %s %s", request.method, request.path)
        return _problem(InternalError("internal error"))


class MethodNotAllowed(Refusal):
    status = 405
    problem = "method-not-allowed"
    title = "Method not allowed"
    fault = "client"


def _http_refusal(exc: web.HTTPException) -> Refusal:
    """aiohttp's own error as the refusal it stands for."""
    if exc.status == 404:
        return NotFound("no such endpoint")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return MethodNotAllowed(
            f"use {allow or 'another method'}", headers={"Allow": allow} if allow else None
        )
    if exc.status == 413:
        return PayloadTooLarge(exc.text or "request body too large")
    return BadAdminRequest(exc.reason)


NO_STORE = {"Cache-Control": "no-store"}
UI_DIR = Path(__file__).parent / "ui"
UI_FILES = {
    "approvals.html": "text/html; charset=utf-8",
    "approvals.js": "text/javascript; charset=utf-8",
    "approvals.css": "text/css; charset=utf-8",
    "tasks.html": "text/html; charset=utf-8",
    "tasks.js": "text/javascript; charset=utf-8",
}
# A strict Content-Security-Policy: no inline script or style, nothing from elsewhere, no
# framing (clickjacking an Approve button), no forms posting anywhere.
UI_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _problem(refusal: Refusal) -> web.Response:
    reply = render(refusal, decision_id="admin")
    return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))


def _json_object(body: bytes, allowed: set[str]) -> dict[str, Any]:
    """Raises BadAdminRequest unless the body is a JSON object with only `allowed` members."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadAdminRequest("the body must be JSON") from None
    if not isinstance(data, dict):
        raise BadAdminRequest("the body must be a JSON object")
    unknown = set(data) - allowed
    if unknown:
        raise BadAdminRequest(f"unknown member(s): {', '.join(sorted(unknown))}")
    return data


class BadAdminRequest(Refusal):
    status = 400
    problem = "bad-request"
    title = "Bad request"
    fault = "client"


def parse_revocation(body: bytes, now: float) -> Revocation:
    """`{"agent" | "user" | "token_id", "until"?, "reason"?}`; `until` is RFC 3339 or a
    duration from now ("1h"). Raises BadAdminRequest saying what to change."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadAdminRequest("the body must be JSON") from None
    if not isinstance(data, dict) or set(data) - {"agent", "user", "token_id", "until", "reason"}:
        raise BadAdminRequest('send {"agent", "user" or "token_id", optional "until" and "reason"}')
    kinds = [k for k in ("agent", "user", "token_id") if k in data]
    if len(kinds) != 1 or not isinstance(data[kinds[0]], str):
        raise BadAdminRequest('name exactly one of "agent", "user" or "token_id" (a string)')
    reason = data.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        raise BadAdminRequest('"reason" must be a string of at most 500 characters')
    until = parse_until(data.get("until"), now)
    try:
        kind: RevocationKind = "token" if kinds[0] == "token_id" else kinds[0]  # type: ignore[assignment]
        return Revocation(kind, data[kinds[0]], until, reason)
    except ValueError as exc:
        raise BadAdminRequest(str(exc)) from None


def parse_until(value: object, now: float) -> float:
    """None → for good; "1h" → now + 1h; "2026-12-01T00:00:00Z" → that time.
    Raises BadAdminRequest."""
    if value is None:
        return math.inf
    if isinstance(value, str):
        seconds = parse_duration(value)
        if seconds is not None:
            return now + seconds
        try:
            return parse_rfc3339(value)
        except ValueError:
            pass
    raise BadAdminRequest('"until" must be an RFC 3339 time or a duration such as "24h"')


def revocation_json(revocation: Revocation) -> dict[str, Any]:
    until = None if revocation.until == math.inf else revocation.until
    return {
        "kind": revocation.kind,
        "subject": revocation.subject,
        "until": until,
        "reason": revocation.reason,
    }


def operator_allowed(principal: Principal, operators: tuple[str, ...]) -> None:
    """Raises Denied unless the principal is a configured operator (an id or `role:NAME`,
    each only from the issuer it is bound to, if bound: `config.model.PrincipalRef`).

    A token acting for a user is the agent's, not the operator's: delegated tokens are refused.
    """
    if principal.acting_for is not None or principal.chain:
        raise Denied("operator calls need the operator's own token, not a delegated one")
    if names_principal(operators, principal):
        return
    raise Denied(
        "not an operator (admin.operators)" if operators else "no admin.operators are configured"
    )


def _page_limit(text: str | None) -> int:
    """Raises BadAdminRequest for a limit that is not a number from 1 to PAGE_LIMIT."""
    if text is None:
        return DEFAULT_PAGE
    if not text.isdigit() or not 1 <= int(text) <= PAGE_LIMIT:
        raise BadAdminRequest(f"limit must be a number from 1 to {PAGE_LIMIT}")
    return int(text)
