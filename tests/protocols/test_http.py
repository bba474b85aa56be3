"""The HTTP adapter: strings in, values out; no sockets.

Speed of the common case, measured on the development machine (Python 3.11):
`timeit normalize_path("/v1/employees/42")` takes about 0.5 µs (one regex, returned as is);
`describe("GET", "/v1/employees/42")` about 2 µs, most of it building the `Action`.
"""

from __future__ import annotations

import orjson
import pytest

from agentproxy.core import Action
from agentproxy.errors import (
    BadRequest,
    Denied,
    InternalError,
    MissingCredential,
    Unauthenticated,
    Unavailable,
)
from agentproxy.protocols.http import (
    HOP_BY_HOP,
    MAX_PATH_LENGTH,
    WireReply,
    bearer_token,
    decode_segment,
    describe,
    header_value,
    normalize_path,
    parse_declared_task,
    parse_query,
    parse_traceparent,
    render,
    request_headers_to_forward,
    response_headers_to_return,
)

# --- normalize_path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/v1/employees/42", "/v1/employees/42"),
        ("/v1/employees/", "/v1/employees/"),
        ("/file.json", "/file.json"),
        ("/.well-known/jwks.json", "/.well-known/jwks.json"),
        ("/a...b/...", "/a...b/..."),
        # dot segments, RFC 3986 §5.2.4
        ("/a/../admin", "/admin"),
        ("/a/./b", "/a/b"),
        ("/..", "/"),
        ("/../../etc", "/etc"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/..", "/"),
        # escaped dots are dots (§2.3) and are removed too
        ("/%2e%2e/admin", "/admin"),
        ("/a/%2E%2E/admin", "/admin"),
        ("/a/.%2e/admin", "/admin"),
        ("/a/%2e/b", "/a/b"),
        # slashes collapse
        ("//admin", "/admin"),
        ("/v1//employees///42", "/v1/employees/42"),
        ("/a//", "/a/"),
        # case is kept
        ("/V1/Employees", "/V1/Employees"),
        # unreserved escapes decoded, others kept with uppercase hex (§6.2.2.1)
        ("/%41%42", "/AB"),
        ("/a%2Db", "/a-b"),
        ("/%7e%5f", "/~_"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
        ("/100%25", "/100%25"),
        ("/%2525", "/%2525"),
        ("/a%3F", "/a%3F"),
        # characters RFC 3986 forbids in a path are encoded, so both spellings agree
        ("/x{id}", "/x%7Bid%7D"),
        ('/[a]|"b"^`<>', "/%5Ba%5D%7C%22b%22%5E%60%3C%3E"),
        ("/x%7Bid%7D", "/x%7Bid%7D"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        # not origin-form
        "",
        "*",
        "http://evil/x",
        "evil:443",
        "x/y",
        # characters that no request-target holds
        " /x",
        "/x y",
        "/x\x00",
        "/x\t",
        "/x\r\nHost: evil",
        "/x\x7f",
        "/café",
        "/a\\b",
        "/a\\..\\admin",
        "/a#b",
        # malformed escapes
        "/%",
        "/%4",
        "/%zz",
        "/a%2",
        "/a%g1",
        # ambiguous bytes, encoded
        "/%2Fadmin",
        "/a%2fb",
        "/a%00b",
        "/a%5cb",
        "/a%5Cb",
        # double encoding of those and of "."
        "/%252e%252e/admin",
        "/%252E",
        "/a%252Fb",
        "/a%252fb",
        "/a%2500b",
        "/a%255cb",
        "/a%25%32%46b",
        # the Tomcat "..;" trick, spelt several ways
        "/public/..;/admin",
        "/public/.;/x",
        "/public/..;x=1/admin",
        "/public/%2e%2e;/admin",
        "/public/..%3b/admin",
        "/public/..%3B/admin",
        # any path parameter: "/admin;x" is "/admin" to Tomcat and Spring
        "/admin;x",
        "/a;jsessionid=1/b",
        "/a%3bb",
        # escapes that are not UTF-8 (including an overlong ".")
        "/bad%C3",
        "/%FF",
        "/%C0%AE",
        "/%ED%A0%80",
    ],
)
def test_normalize_path_refuses(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


def test_normalize_path_length_cap() -> None:
    at_cap = "/" + "a" * (MAX_PATH_LENGTH - 1)
    assert normalize_path(at_cap) == at_cap
    with pytest.raises(BadRequest, match="longer"):
        normalize_path(at_cap + "a")
    # encoding forbidden characters can grow a path past the cap
    with pytest.raises(BadRequest, match="longer"):
        normalize_path("/" + "{" * (MAX_PATH_LENGTH // 2))


def test_normalize_path_is_idempotent() -> None:
    for raw in ["/a/../b/%2e/c%3a:x/", "/caf%c3%a9//x{y}", "/%41/./.."]:
        once = normalize_path(raw)
        assert normalize_path(once) == once


def test_normalize_path_returns_clean_path_itself() -> None:
    raw = "/v1/employees/42"
    assert normalize_path(raw) is raw


# --- decode_segment ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        ("42", "42"),
        ("caf%C3%A9", "café"),
        ("a%3Bb", "a;b"),
        ("a%20b", "a b"),
        ("100%25", "100%"),
        ("", ""),
    ],
)
def test_decode_segment(segment: str, expected: str) -> None:
    assert decode_segment(segment) == expected


def test_decode_segment_of_normalized_path() -> None:
    assert decode_segment(normalize_path("/caf%C3%A9").split("/")[1]) == "café"


@pytest.mark.parametrize("segment", ["%C3", "a%2Fb", "a%00"])
def test_decode_segment_refuses(segment: str) -> None:
    with pytest.raises(BadRequest):
        decode_segment(segment)


# --- parse_query -------------------------------------------------------------------------------


def test_parse_query_empty() -> None:
    assert dict(parse_query("")) == {}


def test_parse_query_single_and_repeated() -> None:
    query = parse_query("id=42&tag=a&tag=b&tag=c&q=a+b%2Bc&blank=&flag")
    assert dict(query) == {
        "id": "42",
        "tag": ("a", "b", "c"),
        "q": "a b+c",
        "blank": "",
        "flag": "",
    }


def test_parse_query_pollution_becomes_a_tuple() -> None:
    assert parse_query("user=alice&user=admin")["user"] == ("alice", "admin")


def test_parse_query_semicolon_is_not_a_separator() -> None:
    assert dict(parse_query("a=1;b=2")) == {"a": "1;b=2"}


def test_parse_query_utf8() -> None:
    assert parse_query("name=caf%C3%A9")["name"] == "café"


def test_parse_query_is_read_only() -> None:
    query = parse_query("a=1")
    with pytest.raises(TypeError):
        query["a"] = "2"  # type: ignore[index]


def test_parse_query_field_cap() -> None:
    assert len(parse_query("&".join(f"k{i}=v" for i in range(256)))) == 256
    with pytest.raises(BadRequest, match="256"):
        parse_query("&".join(f"k{i}=v" for i in range(257)))


@pytest.mark.parametrize(
    "raw", ["a=%C3", "a=%FF", "%C3=x", "a=b c", "a=\x00", "a=é", "a=1#frag", "a=%", "a=%zz"]
)
def test_parse_query_refuses(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_query(raw)


# --- describe ----------------------------------------------------------------------------------


def test_describe() -> None:
    action, raw_query = describe("GET", "/v1//employees/%34%32?fields=name&fields=email")
    assert action == Action(
        protocol="http",
        operation="GET",
        target="/v1/employees/42",
        query={"fields": ("name", "email")},
    )
    assert action.name == "http:GET /v1/employees/42"
    assert raw_query == "fields=name&fields=email"


def test_describe_without_query() -> None:
    action, raw_query = describe("POST", "/v1/employees")
    assert action.name == "http:POST /v1/employees"
    assert dict(action.query) == {}
    assert raw_query == ""


def test_describe_empty_query_and_question_marks() -> None:
    action, raw_query = describe("GET", "/x?")
    assert (action.target, raw_query) == ("/x", "")
    action, raw_query = describe("GET", "/x?next=/a?b")
    assert action.target == "/x"
    assert raw_query == "next=/a?b"
    assert action.query["next"] == "/a?b"


def test_describe_keeps_method_case() -> None:
    action, _ = describe("get", "/x")
    assert action.operation == "get"
    assert action.name == "http:get /x"


@pytest.mark.parametrize("method", ["", "GET /", "G\tET", "GÉT", "GET\n", "(GET)"])
def test_describe_refuses_method(method: str) -> None:
    with pytest.raises(BadRequest, match="method"):
        describe(method, "/x")


@pytest.mark.parametrize("target", ["/public/..;/admin?x=1", "*", "/x?a=%C3"])
def test_describe_refuses_target(target: str) -> None:
    with pytest.raises(BadRequest):
        describe("GET", target)


# --- parse_declared_task -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["t-1", "job:2024.11_x", "A" * 128])
def test_parse_declared_task(value: str) -> None:
    assert parse_declared_task(value) == value


def test_parse_declared_task_absent() -> None:
    assert parse_declared_task(None) is None


@pytest.mark.parametrize("value", ["", "A" * 129, "a b", "a/b", "a,b", "tâche", "a\n", "a\x00"])
def test_parse_declared_task_refuses(value: str) -> None:
    with pytest.raises(BadRequest, match=r"1 to 128 characters of A-Z, a-z, 0-9"):
        parse_declared_task(value)


# --- parse_traceparent -------------------------------------------------------------------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
NEW_TRACE = "11111111111111111111111111111111"
NEW_SPAN = "2222222222222222"


def test_traceparent_continued_with_our_span() -> None:
    ctx = parse_traceparent(f"00-{TRACE}-{PARENT}-00", "vendor=x", NEW_TRACE, NEW_SPAN)
    assert (ctx.trace_id, ctx.span_id, ctx.flags, ctx.state) == (TRACE, NEW_SPAN, "00", "vendor=x")
    assert ctx.traceparent == f"00-{TRACE}-{NEW_SPAN}-00"


def test_traceparent_future_version_reads_first_four_fields() -> None:
    for header in (f"cc-{TRACE}-{PARENT}-01", f"cc-{TRACE}-{PARENT}-01-what-the-future-holds"):
        ctx = parse_traceparent(header, None, NEW_TRACE, NEW_SPAN)
        assert (ctx.trace_id, ctx.span_id, ctx.flags) == (TRACE, NEW_SPAN, "01")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        f"00-{TRACE}-{PARENT}",
        f"00-{TRACE}-{PARENT}-01-extra",
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00-{TRACE}-{PARENT.upper()}-01",
        f"00-{TRACE}-{PARENT}-0A",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"ff-{TRACE}-{PARENT}-01",
        f"0-{TRACE}-{PARENT}-01",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00_{TRACE}_{PARENT}_01",
        f"cc-{TRACE}-{PARENT}-01extra",
        f" 00-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-01\n",
    ],
)
def test_traceparent_invalid_starts_fresh(header: str | None) -> None:
    ctx = parse_traceparent(header, "vendor=x", NEW_TRACE, NEW_SPAN)
    assert (ctx.trace_id, ctx.span_id, ctx.flags, ctx.state) == (NEW_TRACE, NEW_SPAN, "01", None)


@pytest.mark.parametrize(
    ("tracestate", "kept"),
    [
        ("a=1,b=2", True),
        ("a=1, b=2", True),
        ("x" * 512, True),
        (None, False),
        ("", False),
        ("x" * 513, False),
        ("a=1\nb=2", False),
        ("a=é", False),
    ],
)
def test_tracestate(tracestate: str | None, kept: bool) -> None:
    ctx = parse_traceparent(f"00-{TRACE}-{PARENT}-01", tracestate, NEW_TRACE, NEW_SPAN)
    assert ctx.state == (tracestate if kept else None)


# --- headers -----------------------------------------------------------------------------------


def test_hop_by_hop_is_lowercase_and_excludes_content_length() -> None:
    assert all(name == name.lower() for name in HOP_BY_HOP)
    assert "content-length" not in HOP_BY_HOP
    assert {"connection", "transfer-encoding", "upgrade", "host"} <= HOP_BY_HOP


def test_request_headers_to_forward() -> None:
    inbound = [
        ("Host", "proxy:8080"),
        ("Accept", "application/json"),
        ("Connection", "keep-alive, X-Custom"),
        ("X-Custom", "dropped because Connection names it"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Authorization", "Bearer agent-token"),
        ("X-AgentProxy-Agent", "admin-bot"),
        ("x-agentproxy-decision-id", "forged"),
        ("X-Agentproxy-Task", "t-1"),
        ("Forwarded", "for=1.2.3.4"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("x-forwarded-host", "evil"),
        ("X-Api-Key", "agent-supplied"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Content-Length", "12"),
        ("X-Request-Id", "r1"),
    ]
    forwarded = request_headers_to_forward(inbound, strip=frozenset({"x-api-key"}))
    assert forwarded == [
        ("Accept", "application/json"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Content-Length", "12"),
        ("X-Request-Id", "r1"),
    ]


def test_request_headers_connection_tokens_across_headers() -> None:
    inbound = [
        ("connection", "a"),
        ("CONNECTION", " B ,, "),
        ("A", "1"),
        ("b", "2"),
        ("c", "3"),
    ]
    assert request_headers_to_forward(iter(inbound), strip=frozenset()) == [("c", "3")]


def test_request_headers_strip_is_case_insensitive() -> None:
    inbound = [("x-API-key", "agent-supplied"), ("Accept", "*/*")]
    assert request_headers_to_forward(inbound, strip=frozenset({"X-Api-Key"})) == [
        ("Accept", "*/*")
    ]


def test_response_headers_to_return() -> None:
    upstream = [
        ("Content-Type", "application/json"),
        ("Content-Length", "2"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "secret-hop"),
        ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    assert response_headers_to_return(upstream) == [
        ("Content-Type", "application/json"),
        ("Content-Length", "2"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hr-bot", "hr-bot"),
        ("spiffe://corp/ns/hr/sa/bot", "spiffe://corp/ns/hr/sa/bot"),
        ("alice@corp.example", "alice@corp.example"),
        ("a,b", "a%2Cb"),
        ("100%", "100%25"),
        ('say "hi"; now', "say%20%22hi%22%3B%20now"),
        ("back\\slash", "back%5Cslash"),
        ("line\r\nX-Evil: 1", "line%0D%0AX-Evil:%201"),
        ("café", "caf%C3%A9"),
    ],
)
def test_header_value(text: str, expected: str) -> None:
    assert header_value(text) == expected


# --- bearer_token ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def-ghi_jkl~mno+p/q==", "abc.def-ghi_jkl~mno+p/q=="),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc", "abc"),
    ],
)
def test_bearer_token(header: str, token: str) -> None:
    assert bearer_token(header) == token


def test_bearer_token_absent() -> None:
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic YWxpY2U6cw==",
        "Bearer a b",
        "Bearer abc ",
        "Bearer a=b",
        "Bearer a,b",
        "Bearer\tabc",
        "Bearerabc",
        "Token abc",
        "Bearer abc\r\n",
        "Bearer é",
    ],
)
def test_bearer_token_refuses(header: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        bearer_token(header)
    token_part = header.partition(" ")[2].strip()
    if token_part:
        assert token_part not in caught.value.detail


# --- render ------------------------------------------------------------------------------------


def _problem(reply: WireReply) -> dict[str, object]:
    body = orjson.loads(reply.body)
    assert isinstance(body, dict)
    return body


def test_render_denied() -> None:
    reply = render(Denied("no rule allows this", rule="no-payroll"), decision_id="d-1")
    assert reply.status == 403
    assert ("Content-Type", "application/problem+json") in reply.headers
    assert ("Cache-Control", "no-store") in reply.headers
    assert _problem(reply) == {
        "type": "https://agentproxy.dev/problems/denied",
        "title": "Denied by policy",
        "status": 403,
        "detail": "no rule allows this",
        "decision_id": "d-1",
        "rule": "no-payroll",
    }


def test_render_default_deny_has_no_rule_and_instance_when_given() -> None:
    problem = _problem(render(Denied("default deny"), decision_id="d-2", instance="/v1/x"))
    assert "rule" not in problem
    assert problem["instance"] == "/v1/x"


def test_render_refusal_headers() -> None:
    refusal = Denied(
        "slow down",
        headers={
            "Retry-After": "30",
            "X-Evil": "a\r\nSet-Cookie: x=1",
            "Bad Name": "1",
            "Content-Type": "text/html",
        },
    )
    reply = render(refusal, decision_id="d-3")
    assert ("Retry-After", "30") in reply.headers
    names = [name.lower() for name, _ in reply.headers]
    assert "x-evil" not in names
    assert "bad name" not in names
    assert names.count("content-type") == 1


def test_render_unavailable_type() -> None:
    reply = render(Unavailable("store unreachable", component="store"), decision_id="d-4")
    assert reply.status == 503
    assert _problem(reply)["type"] == "https://agentproxy.dev/problems/store-unavailable"


def test_render_internal_error_verbatim() -> None:
    problem = _problem(render(InternalError("internal error"), decision_id="d-5"))
    assert (problem["status"], problem["detail"]) == (500, "internal error")


def test_render_bad_request() -> None:
    reply = render(BadRequest("path contains a backslash"), decision_id="d-6")
    assert reply.status == 400
    assert _problem(reply)["type"] == "https://agentproxy.dev/problems/bad-request"


def test_render_missing_credential_has_bare_challenge() -> None:
    reply = render(MissingCredential(), decision_id="d-7")
    assert reply.status == 401
    assert ("WWW-Authenticate", "Bearer") in reply.headers
    assert _problem(reply)["type"] == "https://agentproxy.dev/problems/unauthenticated"


def test_render_invalid_token_challenge_is_sanitized() -> None:
    reply = render(
        Unauthenticated('token "aud" is not \\ us\r\n; café'),
        decision_id="d-8",
    )
    challenges = [value for name, value in reply.headers if name == "WWW-Authenticate"]
    assert challenges == [
        'Bearer error="invalid_token", error_description="token aud is not  us; caf"'
    ]
    assert _problem(reply)["detail"] == 'token "aud" is not \\ us\r\n; café'


def test_request_lines_are_remembered_but_refusals_are_not() -> None:
    first = describe("GET", "/v1/employees/42?a=1")
    assert describe("GET", "/v1/employees/42?a=1") is first  # remembered: the same objects
    for _ in range(2):  # a refusal is checked anew every time, never served from memory
        with pytest.raises(BadRequest):
            describe("G ET", "/v1/employees/42")
    long_target = "/v1/" + "x" * 600
    action, _ = describe("GET", long_target)  # too long to remember, described all the same
    assert action.target == long_target and describe("GET", long_target) is not None


@pytest.mark.parametrize("segment", ["01", "001", "+1", "-0", "%2B1", "1_0", "%D9%A1", "%201"])
def test_integer_segments_not_in_canonical_form_are_refused(segment: str) -> None:
    from agentproxy.protocols.http import read_as_upstream

    action, _ = describe("GET", f"/v1/items/{segment}")
    with pytest.raises(BadRequest):
        read_as_upstream(action, fold_case=False, canonical_integers=True)
    assert read_as_upstream(action, fold_case=False, canonical_integers=False) == action


@pytest.mark.parametrize("segment", ["0", "1", "42", "-7", "abc", "1.5", "0x1", "1e3"])
def test_canonical_and_non_integer_segments_pass(segment: str) -> None:
    from agentproxy.protocols.http import read_as_upstream

    action, _ = describe("GET", f"/v1/items/{segment}")
    assert read_as_upstream(action, fold_case=True, canonical_integers=True).fold_case
