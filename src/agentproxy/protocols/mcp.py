"""The MCP adapter (Streamable HTTP): an HTTP request in, one `Action` per JSON-RPC message out;
a `Refusal` in, a JSON-RPC answer out; a listing (`tools/list`, `prompts/list`,
`resources/list`, `resources/templates/list`) answer in, the permitted items out.

Pure functions, like h11 and the HTTP adapter: nothing here opens a socket or imports aiohttp
or the `mcp` SDK. Every message of a body is named on its own, so a batch cannot smuggle a
denied call beside an allowed one, and a body that could be read two ways (duplicate keys,
unknown encodings, lone surrogates) is refused rather than forwarded unchecked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from agentproxy.core import Action
from agentproxy.errors import (
    BadRequest,
    Denied,
    InsufficientScope,
    LimitRefused,
    PayloadTooLarge,
    Refusal,
    Unauthenticated,
)
from agentproxy.protocols import sse
from agentproxy.protocols.body import check_json_content_type, decode_content
from agentproxy.protocols.http import WireReply, normalize_uri
from agentproxy.protocols.http import render as render_http
from agentproxy.protocols.strict_json import (
    MAX_DEPTH,
    JsonError,
    check_value,
    parse_answer,
    parse_request,
)

__all__ = [
    "ACTION_PREFIX",
    "BASELINE_ACTIONS",
    "LISTINGS",
    "MAX_BATCH_MESSAGES",
    "MAX_JSON_DEPTH",
    "MAX_NAME_LENGTH",
    "McpRequest",
    "RequestId",
    "completion_reference",
    "describe",
    "filter_listing",
    "listed_action",
    "listed_items",
    "listing_ids",
    "render",
    "tool_fingerprint",
]

ACTION_PREFIX: Final = "mcp:"
MAX_NAME_LENGTH: Final = 512
# Every message is one policy decision; an unbounded batch is unbounded work per request.
MAX_BATCH_MESSAGES: Final = 100
MAX_JSON_DEPTH: Final = MAX_DEPTH

# Allowed to every authenticated agent unless a policy denies them: the handshake, keep-alive,
# discovery and the session's own plumbing. `*` stays within a "/" segment, `**` crosses them.
# `server/discover` is the 2026-07-28 handshake (the SDK's `mode="auto"` sends it first).
BASELINE_ACTIONS: Final[tuple[str, ...]] = (
    "mcp:initialize",
    "mcp:server/discover",
    "mcp:ping",
    "mcp:notifications/*",
    "mcp:notifications/**",
    "mcp:tools/list",
    "mcp:resources/list",
    "mcp:resources/templates/list",
    "mcp:prompts/list",
    "mcp:response",
    "mcp:session/stream",
    "mcp:session/delete",
    "mcp:logging/setLevel",
    "mcp:completion/complete",
)

RequestId = str | int

# JSON-RPC 2.0 §5.1 and MCP's own codes (CONTRACT.md "Refusals, by protocol").
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
INTERNAL_ERROR: Final = -32603
DENIED: Final = -32003
APPROVAL_PENDING: Final = -32004
LIMIT_EXCEEDED: Final = -32005

# The methods whose subject is also sent as `Mcp-Name` (2026-07-28), and the param naming it.
_NAMED_METHODS: Final[Mapping[str, str]] = {
    "tools/call": "name",
    "resources/read": "uri",
    "prompts/get": "name",
}


@dataclass(frozen=True, slots=True)
class McpRequest:
    """One HTTP request to an MCP endpoint, named message by message.

    `ids[i]` is message i's JSON-RPC id (None for notifications and client responses, and for
    GET/DELETE); `methods[i]` its method (None for responses, GET and DELETE). `body` is the
    decoded JSON text (after gzip): forward it, with Content-Encoding removed, so the upstream
    reads exactly the bytes that were authorized.
    """

    actions: tuple[Action, ...]
    ids: tuple[RequestId | None, ...]
    batch: bool
    methods: tuple[str | None, ...]
    body: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not self.actions or not len(self.actions) == len(self.ids) == len(self.methods):
            raise ValueError("an McpRequest needs one id and one method per action")


# --- describe --------------------------------------------------------------------------------


def describe(method: str, headers: Mapping[str, str], body: bytes, *, max_bytes: int) -> McpRequest:
    """Name every JSON-RPC message of an MCP Streamable HTTP request as an `Action`.

    `headers` has lower-case names; the shell must have refused a repeated `Mcp-Method` or
    `Mcp-Name` (first-copy and last-copy readers would disagree). GET is the server's SSE
    stream (`mcp:session/stream`), DELETE ends a session (`mcp:session/delete`); a POST body is
    one message or a batch.

    Raises:
        BadRequest: another HTTP method; a body on GET/DELETE; Content-Type not
            application/json (or a charset other than utf-8); a Content-Encoding other than
            identity or gzip, or a corrupt gzip stream; a body that is not UTF-8 JSON (detail
            "parse error: …": duplicate keys, keys of one object that collide under case
            folding or NFKC, NaN/Infinity, numbers out of 64-bit range, lone surrogates,
            nesting deeper than MAX_JSON_DEPTH, more than MAX_ELEMENTS values); an empty or
            oversized batch; a
            message that is not JSON-RPC 2.0 as MCP uses it (the detail names its index); a
            tool name, URI or prompt name that is empty, longer than MAX_NAME_LENGTH or holds
            a non-printable character; `Mcp-Method`/`Mcp-Name` headers that disagree with the
            body or come with a batch.
        PayloadTooLarge: the body, or its gzip-decoded form, exceeds `max_bytes`, or gzip
            inflates it past the ratio `body.decode_content` allows.
    """
    if method in ("GET", "DELETE"):
        if body:
            raise BadRequest(f"an MCP {method} request carries no body")
        if "mcp-method" in headers or "mcp-name" in headers:
            raise BadRequest(f"headers disagree with the body: Mcp-Method/Mcp-Name on a {method}")
        operation = "session/stream" if method == "GET" else "session/delete"
        action = Action("mcp", operation, "", args={}, name=ACTION_PREFIX + operation)
        return McpRequest((action,), (None,), False, (None,))
    if method != "POST":
        raise BadRequest("MCP Streamable HTTP uses only POST, GET and DELETE")
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body larger than {max_bytes} bytes")
    check_json_content_type(headers.get("content-type"))
    raw = decode_content(headers.get("content-encoding"), body, max_bytes)
    try:
        document = parse_request(raw)
    except JsonError as exc:
        raise BadRequest(f"parse error: {exc}") from None

    batch = isinstance(document, list)
    messages: list[Any] = document if isinstance(document, list) else [document]
    if batch and not messages:
        raise BadRequest("an empty batch is not a valid JSON-RPC request")
    if len(messages) > MAX_BATCH_MESSAGES:
        raise BadRequest(f"a batch holds at most {MAX_BATCH_MESSAGES} messages")

    actions: list[Action] = []
    ids: list[RequestId | None] = []
    methods: list[str | None] = []
    for index, message in enumerate(messages):
        action, message_id, message_method = _describe_message(index, message)
        actions.append(action)
        ids.append(message_id)
        methods.append(message_method)
    _check_routing_headers(headers, batch, methods[0], actions[0])
    return McpRequest(tuple(actions), tuple(ids), batch, tuple(methods), raw)


def _describe_message(index: int, message: Any) -> tuple[Action, RequestId | None, str | None]:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise BadRequest(f"{where}: a JSON-RPC message is a JSON object")
    if message.get("jsonrpc") != "2.0":
        raise BadRequest(f'{where}: "jsonrpc" must be "2.0"')
    if "method" not in message:
        _check_response(where, message)
        return Action("mcp", "response", "", args={}, name=ACTION_PREFIX + "response"), None, None

    method = message["method"]
    if not isinstance(method, str) or not _is_valid_name(method):
        raise BadRequest(f'{where}: "method" must be a non-empty printable string')
    if "result" in message or "error" in message:
        raise BadRequest(f'{where}: a request has no "result" or "error"')
    message_id: RequestId | None = None
    if "id" in message:
        message_id = message["id"]
        # JSON-RPC 2.0 §4 allows null and fractional ids; MCP does not, and `true` is 1 to
        # Python, so a bool would collide with an integer id.
        if isinstance(message_id, bool) or not isinstance(message_id, str | int):
            raise BadRequest(f'{where}: a request "id" must be a string or an integer')
    return _request_action(where, method, message.get("params", _ABSENT)), message_id, method


_ABSENT: Final = object()


def describe_call(method: str, name: str, arguments: Any) -> Action:
    """The action of an MCP request named outside JSON-RPC (Authorizer.Check): what its
    message would be described as. Raises BadRequest as `describe` would, also for
    arguments that `describe` would refuse as JSON (keys colliding under case folding)."""
    try:
        check_value(arguments)
    except JsonError as exc:
        raise BadRequest(f'mcp {method}: "arguments": {exc}') from None
    key = _NAMED_METHODS.get(method)
    params: dict[str, Any] = {key: name} if key is not None else {}
    if arguments is not None:
        params["arguments"] = arguments
    return _request_action(f"mcp {method}", method, params)


def _request_action(where: str, method: str, params: Any) -> Action:
    subject_key = _NAMED_METHODS.get(method)
    if subject_key is None:
        if params is _ABSENT:
            params = {}
        elif not isinstance(params, dict | list):
            raise BadRequest(f'{where}: "params" must be an object or an array')
        if method == "completion/complete":
            _check_completion_ref(where, params)
        return Action("mcp", method, "", args=params, name=ACTION_PREFIX + method)

    if not isinstance(params, dict):
        raise BadRequest(f'{where}: {method} needs "params" as an object')
    subject = params.get(subject_key)
    if not isinstance(subject, str) or not _is_valid_name(subject):
        raise BadRequest(
            f'{where}: {method} "{subject_key}" must be a non-empty string of at most '
            f"{MAX_NAME_LENGTH} printable characters"
        )
    if method == "resources/read":
        subject = _decided_uri(where, subject)
    args: Any = {}
    if method != "resources/read":
        # The SDK reads `"arguments": null` as absent; so do we.
        args = params.get("arguments")
        if args is None:
            args = {}
        elif not isinstance(args, dict):
            raise BadRequest(f'{where}: {method} "arguments" must be an object')
    return Action("mcp", method, subject, args=args)


# What a completion/complete `ref` names, and the member holding its name (MCP 2025-06-18
# "Completion": a prompt, or a resource template by its URI template).
_COMPLETION_REFS: Final[Mapping[str, tuple[str, str]]] = {
    "ref/prompt": ("name", "prompts/get/"),
    "ref/resource": ("uri", "resources/read/"),
}


def _check_completion_ref(where: str, params: Any) -> None:
    # Completions leak what a prompt or template offers (argument values, file names): the
    # shell allows one only for what the principal may get, so the ref must be read one way.
    ref = params.get("ref") if isinstance(params, dict) else None
    kind = ref.get("type") if isinstance(ref, dict) else None
    if not isinstance(ref, dict) or not isinstance(kind, str) or kind not in _COMPLETION_REFS:
        raise BadRequest(
            f'{where}: completion/complete needs "params.ref" with "type" "ref/prompt" or '
            '"ref/resource"'
        )
    key = _COMPLETION_REFS[kind][0]
    subject = ref.get(key)
    if not isinstance(subject, str) or not _is_valid_name(subject):
        raise BadRequest(
            f'{where}: completion/complete {kind} "{key}" must be a non-empty string of at '
            f"most {MAX_NAME_LENGTH} printable characters"
        )


def completion_reference(action: Action) -> str | None:
    """The action a `completion/complete` message completes arguments of: `mcp:prompts/get/
    <name>` for a `ref/prompt`, `mcp:resources/read/<uri template>` for a `ref/resource`;
    None for any other action. `action` comes from `describe`, which checked the ref."""
    if action.protocol != "mcp" or action.operation != "completion/complete":
        return None
    ref = action.args["ref"]
    key, prefix = _COMPLETION_REFS[ref["type"]]
    subject: str = ref[key]
    return ACTION_PREFIX + prefix + subject


def _decided_uri(where: str, uri: str) -> str:
    """The resource URI policy matches: its canonical form (`normalize_uri`), which must be
    what was sent, since the body is forwarded byte for byte and the server must read the URI
    that was decided. Raises BadRequest naming the canonical spelling to send instead."""
    try:
        canonical = normalize_uri(uri)
    except BadRequest as exc:
        raise BadRequest(
            f'{where}: resources/read "uri" cannot be read one way only: {exc.detail}'
        ) from None
    if canonical != uri:
        raise BadRequest(
            f'{where}: resources/read "uri" is not in canonical form (RFC 3986 §6); '
            f"send {canonical!r}"
        )
    return canonical


def _check_response(where: str, message: dict[str, Any]) -> None:
    if "id" not in message:
        raise BadRequest(f'{where}: neither a request (no "method") nor a response (no "id")')
    if ("result" in message) == ("error" in message):
        raise BadRequest(f'{where}: a response has exactly one of "result" and "error"')
    message_id = message["id"]
    # JSON-RPC 2.0 §5: null only on an error about a request whose id could not be read.
    id_ok = isinstance(message_id, str | int) and not isinstance(message_id, bool)
    if not (id_ok or (message_id is None and "error" in message)):
        raise BadRequest(f'{where}: a response "id" must be a string or an integer')
    if "error" in message:
        error = message["error"]
        if (
            not isinstance(error, dict)
            or not isinstance(error.get("code"), int)
            or isinstance(error.get("code"), bool)
            or not isinstance(error.get("message"), str)
        ):
            raise BadRequest(
                f'{where}: "error" must be an object with an integer "code" and a string "message"'
            )


def _is_valid_name(value: str) -> bool:
    # isprintable() refuses control, format (bidi overrides, zero-width), surrogate and
    # separator characters other than the space: the ones that hide in logs and approvals.
    return 0 < len(value) <= MAX_NAME_LENGTH and value.isprintable()


def _check_routing_headers(
    headers: Mapping[str, str], batch: bool, method: str | None, action: Action
) -> None:
    # Servers may route on Mcp-Method/Mcp-Name (2026-07-28) while we authorize the body: the
    # two must name the same thing, or a call allowed by its body runs as another.
    method_header = headers.get("mcp-method")
    name_header = headers.get("mcp-name")
    if method_header is None and name_header is None:
        return
    if batch:
        raise BadRequest("headers disagree with the body: Mcp-Method/Mcp-Name on a batch")
    if method_header is not None and method_header != method:
        raise BadRequest("headers disagree with the body: Mcp-Method is not the body's method")
    if name_header is not None and (
        method not in _NAMED_METHODS or _decode_header_value(name_header) != action.target
    ):
        raise BadRequest("headers disagree with the body: Mcp-Name is not the body's name")


_B64_SENTINEL = re.compile(r"=\?base64\?(?P<payload>.*)\?=")


def _decode_header_value(value: str) -> str | None:
    # 2026-07-28 clients send a name that is not plain printable ASCII as "=?base64?…?=" of its
    # UTF-8. Only the canonical base64 spelling is read (as the SDK's server does), so one
    # header cannot decode to two names.
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match["payload"]
    try:
        decoded = base64.b64decode(payload, validate=True)
    except binascii.Error:
        return None
    if base64.b64encode(decoded).decode("ascii") != payload:
        return None
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- render ----------------------------------------------------------------------------------


def render(
    refusal: Refusal,
    *,
    decision_id: str,
    request: McpRequest | None,
    tool_errors: Literal["jsonrpc", "result"] = "jsonrpc",
    refused_index: int = 0,
    resource_metadata: str | None = None,
    scope: tuple[str, ...] = (),
    scope_challenge: Literal["http403", "jsonrpc"] = "http403",
) -> WireReply:
    """Render a refusal the way an MCP client can read it.

    - `Unauthenticated`: the HTTP adapter's 401 with `WWW-Authenticate` (before any JSON-RPC),
      naming the protected resource metadata when the upstream publishes it.
    - `InsufficientScope` with `scope_challenge="http403"`: the spec's HTTP 403 with
      `WWW-Authenticate: Bearer error="insufficient_scope", scope=…` so the client steps up;
      with `"jsonrpc"` a JSON-RPC error like any denial (older clients drop a session on 4xx).
    - No `request` (the body could not be read): `BadRequest`/`PayloadTooLarge` answer HTTP
      400/413 with a JSON-RPC error of id null (-32700 when the detail is a parse error, else
      -32600); anything else is the HTTP adapter's problem+json.
    - A refused message with an id: HTTP 200 with a JSON-RPC error answering it (older SDK
      clients tear the session down on a 4xx): -32003 denied, -32004 approval pending,
      -32005 limit, -32600 bad request, -32603 for the proxy's or upstream's faults. In a batch
      every other request gets -32003 "not forwarded". With `tool_errors="result"` a denied or
      limited single `tools/call` gets a `CallToolResult` with `isError` the model can read.
    - A refused message without an id (notification, client response, GET, DELETE), or a
      `refused_index` outside the request: the HTTP adapter's problem+json.

    The refusal's headers (Retry-After) are kept. Never raises.
    """
    if isinstance(refusal, Unauthenticated) or (
        isinstance(refusal, InsufficientScope) and scope_challenge == "http403"
    ):
        return render_http(
            refusal, decision_id=decision_id, resource_metadata=resource_metadata, scope=scope
        )
    if request is None:
        if isinstance(refusal, BadRequest | PayloadTooLarge):
            code = PARSE_ERROR if "parse error" in refusal.detail else INVALID_REQUEST
            error = {"code": code, "message": refusal.detail, "data": {"decision_id": decision_id}}
            body = {"jsonrpc": "2.0", "id": None, "error": error}
            return _json_reply(refusal.status, refusal, decision_id, body)
        return render_http(refusal, decision_id=decision_id)
    if not 0 <= refused_index < len(request.ids) or request.ids[refused_index] is None:
        return render_http(refusal, decision_id=decision_id)

    refused_id = request.ids[refused_index]
    if (
        tool_errors == "result"
        and not request.batch
        and request.methods[0] == "tools/call"
        and isinstance(refusal, Denied | LimitRefused)
        and not _is_approval_pending(refusal)
    ):
        result = {
            "content": [{"type": "text", "text": _explain(refusal, decision_id)}],
            "isError": True,
        }
        reply = {"jsonrpc": "2.0", "id": refused_id, "result": result}
        return _json_reply(200, refusal, decision_id, reply)

    refused_error = {"jsonrpc": "2.0", "id": refused_id, "error": _error(refusal, decision_id)}
    if not request.batch:
        return _json_reply(200, refusal, decision_id, refused_error)
    not_forwarded = {
        "code": DENIED,
        "message": "not forwarded: another request in this batch was refused",
        "data": {"decision_id": decision_id},
    }
    answers = [
        refused_error
        if index == refused_index
        else {"jsonrpc": "2.0", "id": id_, "error": not_forwarded}
        for index, id_ in enumerate(request.ids)
        if id_ is not None
    ]
    return _json_reply(200, refusal, decision_id, answers)


def _is_approval_pending(refusal: Refusal) -> bool:
    return refusal.problem_type.endswith("/approval-pending")


def _retry_after(refusal: Refusal) -> int | None:
    value = refusal.headers.get("Retry-After", "")
    return int(value) if value.isascii() and value.isdigit() else None


def _error(refusal: Refusal, decision_id: str) -> dict[str, Any]:
    data: dict[str, Any] = {"decision_id": decision_id}
    if _is_approval_pending(refusal):
        code = APPROVAL_PENDING
        data["approval_id"] = refusal.members.get("approval_id")
        if refusal.rule is not None:
            data["rule"] = refusal.rule
    elif isinstance(refusal, LimitRefused) or refusal.status == 429:
        code = LIMIT_EXCEEDED
        data.update(
            rule=refusal.rule,
            limit=refusal.members.get("limit"),
            retry_after=_retry_after(refusal),
        )
    elif isinstance(refusal, Denied) or refusal.status == 403:
        code = DENIED
        data.update(rule=refusal.rule, reason=refusal.detail)
    elif isinstance(refusal, BadRequest | PayloadTooLarge):
        code = INVALID_REQUEST
    else:
        code = INTERNAL_ERROR
    for name, value in refusal.members.items():
        data.setdefault(name, value)
    return {"code": code, "message": refusal.detail, "data": data}


def _explain(refusal: Refusal, decision_id: str) -> str:
    rule = refusal.rule if refusal.rule is not None else "default deny"
    text = f"agentproxy refused this tool call: {refusal.detail} (rule: {rule}"
    if isinstance(refusal, LimitRefused):
        text += f"; limit: {refusal.limit}"
        seconds = _retry_after(refusal)
        if seconds is not None:
            text += f"; retry after {seconds} s"
    return text + f"; decision: {decision_id})"


def _json_reply(status: int, refusal: Refusal, decision_id: str, body: object) -> WireReply:
    # The HTTP adapter's reply carries Cache-Control and the refusal's own headers, already
    # checked for header injection; only the body and its type differ.
    problem = render_http(refusal, decision_id=decision_id)
    headers = [("Content-Type", "application/json")]
    headers.extend(
        (name, value)
        for name, value in problem.headers
        if name.lower() not in ("content-type", "www-authenticate")
    )
    return WireReply(status, tuple(headers), orjson.dumps(body))


# --- listings --------------------------------------------------------------------------------

# The listings a shell filters, and the member of their result that holds the items.
LISTINGS: Final[Mapping[str, str]] = {
    "tools/list": "tools",
    "prompts/list": "prompts",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
}


def listing_ids(request: McpRequest) -> tuple[tuple[RequestId, str], ...]:
    """The (id, method) of the listing requests in `request` (`LISTINGS`), a single one or
    every one of a batch, whose answers the shell filters; notifications, having no answer,
    are not."""
    found: list[tuple[RequestId, str]] = []
    for method, request_id in zip(request.methods, request.ids, strict=True):
        if method is not None and method in LISTINGS and request_id is not None:
            found.append((request_id, method))
    return tuple(found)


def listed_action(method: str, item: Mapping[str, Any]) -> str | None:
    """The action that uses a listed item, for the "could ever be allowed" check: a tool is
    `mcp:tools/call/<name>`, a prompt `mcp:prompts/get/<name>`, a resource
    `mcp:resources/read/<uri>`, a resource template `mcp:resources/read/<uriTemplate>` as
    written (its `{…}` expressions are text within a segment: `*`, `**` and `{name}` match
    them, a literal URI does not). None for an item that could never be used through the
    proxy (a name or URI `describe` would refuse, or a resource URI not in the canonical
    form it requires): it is hidden. Raises ValueError for a method not in `LISTINGS`."""
    if method == "tools/list" or method == "prompts/list":
        name = item.get("name")
        if not isinstance(name, str) or not _is_valid_name(name):
            return None
        return ACTION_PREFIX + ("tools/call/" if method == "tools/list" else "prompts/get/") + name
    if method == "resources/list":
        uri = item.get("uri")
        if not isinstance(uri, str) or not _is_valid_name(uri):
            return None
        try:
            if normalize_uri(uri) != uri:
                return None
        except BadRequest:
            return None
        return ACTION_PREFIX + "resources/read/" + uri
    if method == "resources/templates/list":
        template = item.get("uriTemplate")
        if not isinstance(template, str) or not _is_valid_name(template):
            return None
        return ACTION_PREFIX + "resources/read/" + template
    raise ValueError(f"{method} is not a listing")


def filter_listing(
    payload: bytes,
    content_type: str,
    request_id: RequestId,
    method: str,
    keep: Callable[[dict[str, Any]], bool],
) -> bytes:
    """Remove the items for which `keep(item)` is False from the upstream's answer to the
    listing `method` (a key of `LISTINGS`).

    `payload` is the whole (decoded) answer: application/json (a JSON-RPC response) or
    text/event-stream (RFC-less SSE as WHATWG defines it: events end at a blank line, "data:"
    lines join with "\n"). Only the answer to `request_id` is rewritten, and only when an item
    is removed; every other byte (other events, comments, `id:`/`event:`/`retry:` fields, line
    endings) is kept as is. No answer with this id (or an error answer): the payload unchanged.

    Raises:
        ValueError: an unknown content type; a payload that is not UTF-8 or holds a message
            that is not strict JSON; an answer with this id whose result has no list of
            objects under the listing's member.
    """
    return _rewrite(payload, content_type, request_id, _Listing(method, keep, []))


def listed_items(
    payload: bytes, content_type: str, request_id: RequestId, method: str
) -> list[dict[str, Any]]:
    """The items of the upstream's answer to the listing `method` with `request_id`, changing
    nothing.

    Raises:
        ValueError: as `filter_listing`.
    """
    listing = _Listing(method, lambda _item: True, [])
    _rewrite(payload, content_type, request_id, listing)
    return listing.seen


@dataclass(slots=True)
class _Listing:
    """What a rewrite looks for: the listing's method, which items stay, the items seen."""

    method: str
    keep: Callable[[dict[str, Any]], bool]
    seen: list[dict[str, Any]]

    @property
    def member(self) -> str:
        return LISTINGS[self.method]


_PINNED_FIELDS: Final = (
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
)


def tool_fingerprint(tool: Mapping[str, Any]) -> str:
    """Hex SHA-256 of a tool's identity: name, title, description, input and output schemas,
    annotations (absent ones as null), as JSON with sorted keys at every depth. A changed
    description (the "rug pull") changes it; key order and other fields (icons, _meta) do not.

    Raises:
        ValueError: the fields cannot be serialized (e.g. nested deeper than orjson allows).
    """
    pinned = {name: tool.get(name) for name in _PINNED_FIELDS}
    try:
        canonical = orjson.dumps(pinned, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"tool cannot be fingerprinted: {exc}") from None
    return hashlib.sha256(canonical).hexdigest()


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def _rewrite(payload: bytes, content_type: str, request_id: RequestId, listing: _Listing) -> bytes:
    media = _media_type(content_type)
    if media == "application/json":
        message = parse_answer(payload)
        changed = _filter_message(message, request_id, listing)
        return _dumps(message, listing) if changed else payload
    if media == "text/event-stream":
        return _rewrite_sse(payload, request_id, listing)
    raise ValueError(f"not a {listing.method} answer: Content-Type {media!r}")


def _same_id(value: Any, request_id: RequestId) -> bool:
    # 1, "1" and true are three different ids.
    return type(value) is type(request_id) and value == request_id


def _filter_message(message: Any, request_id: RequestId, listing: _Listing) -> bool:
    """Filter the items of every answer to `request_id` in `message` in place; True if any
    item was removed. A JSON array is a batch of messages (2025-03-26)."""
    if isinstance(message, list):
        results = [_filter_message(item, request_id, listing) for item in message]
        return any(results)
    if (
        not isinstance(message, dict)
        or "method" in message  # a server request, whose ids are the server's own
        or "result" not in message
        or not _same_id(message.get("id"), request_id)
    ):
        return False
    result = message["result"]
    member = listing.member
    items = result.get(member) if isinstance(result, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError(f'the {listing.method} answer has no list of objects in "{member}"')
    listing.seen.extend(items)
    kept = [item for item in items if listing.keep(item)]
    if len(kept) == len(items):
        return False
    result[member] = kept
    return True


def _dumps(message: Any, listing: _Listing) -> bytes:
    try:
        return orjson.dumps(message)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"{listing.method} answer cannot be re-encoded: {exc}") from None


def _rewrite_sse(payload: bytes, request_id: RequestId, listing: _Listing) -> bytes:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("event stream is not valid UTF-8") from None
    prefix = sse.BOM if text.startswith(sse.BOM) else ""
    out: list[str] = [prefix]
    block: list[str] = []
    changed = False
    for line in sse.lines(text, len(prefix)):
        block.append(line)
        if not line.rstrip("\r\n"):  # a blank line dispatches the event
            changed |= _rewrite_event(block, request_id, listing)
            out.extend(block)
            block = []
    if block:
        # An unterminated last event is never dispatched by a client; filter it all the same.
        changed |= _rewrite_event(block, request_id, listing)
        out.extend(block)
    return "".join(out).encode("utf-8") if changed else payload


def _rewrite_event(block: list[str], request_id: RequestId, listing: _Listing) -> bool:
    """Filter the event in `block` (its lines with their endings) in place; True if changed."""
    data_lines = [i for i, line in enumerate(block) if sse.field(line.rstrip("\r\n"))[0] == "data"]
    data = sse.data_of(block)
    if not data:
        # No data, or the empty "priming" event resumable servers send first.
        return False
    try:
        message = parse_answer(data.encode("utf-8"))
    except JsonError as exc:
        # Every MCP event is a JSON-RPC message; one we cannot read might be the answer.
        raise ValueError(f"event stream holds an unreadable message: {exc}") from None
    if not _filter_message(message, request_id, listing):
        return False
    first = data_lines[0]
    ending = block[first][len(block[first].rstrip("\r\n")) :]
    block[first] = "data: " + _dumps(message, listing).decode("utf-8") + ending
    for index in reversed(data_lines[1:]):
        del block[index]
    return True
