"""The HTTP adapter: request line and headers in, `Action` out; `Refusal` in, bytes out.

Pure functions, like h11: nothing here opens a socket or imports aiohttp. The aiohttp shell
in `proxy/` calls them and forwards exactly what they return, so the path that policy matched
is the path the upstream receives; no encoding trick can make the two differ.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

import orjson

from agentproxy.core import Action, TraceContext
from agentproxy.errors import (
    BadRequest,
    InsufficientScope,
    MissingCredential,
    Refusal,
    Unauthenticated,
)
from agentproxy.protocols.http_token import TOKEN

__all__ = [
    "HOP_BY_HOP",
    "MAX_PATH_LENGTH",
    "REQUEST_DROP",
    "WireReply",
    "bearer_token",
    "decode_segment",
    "describe",
    "header_key",
    "header_value",
    "normalize_path",
    "normalize_uri",
    "parse_declared_task",
    "parse_query",
    "parse_traceparent",
    "read_as_upstream",
    "render",
    "request_headers_to_forward",
    "response_headers_to_return",
]

MAX_PATH_LENGTH: Final = 8192
MAX_QUERY_FIELDS: Final = 256

# --- request target ------------------------------------------------------------------------

# RFC 3986 §3.3 pchar without "%" (escapes need the slow path) and ";" (path parameters, the
# Tomcat "..;" trick). A segment may not start with "." so dot segments take the slow path,
# and may not be empty so "//" does too. Segments start with "/" and never contain one, so the
# pattern cannot backtrack.
_SEG_CHARS = r"A-Za-z0-9\-._~!$&'()*+,=:@"
_SEG_FIRST = r"A-Za-z0-9\-_~!$&'()*+,=:@"
_CLEAN_PATH = re.compile(
    rf"/(?:[{_SEG_FIRST}][{_SEG_CHARS}]*(?:/[{_SEG_FIRST}][{_SEG_CHARS}]*)*/?)?"
)

# RFC 9112 §3.2: no whitespace, control characters or raw non-ASCII in a request-target.
_NOT_VISIBLE_ASCII = re.compile(r"[^\x21-\x7e]")
# A "%" must start a complete escape; printable characters RFC 3986 §2 does not allow in a
# path (gen-delims "[" "]", and the unsafe '"<>^`{|}') are re-encoded so that raw and encoded
# spellings normalize to one string (§6.2.2) and no literal "{" meets a policy path template.
_ESCAPE_OR_UNSAFE = re.compile(r"%([0-9A-Fa-f]{2})?|[\"<>\[\]^`{|}]")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Encoded "/" and "\" are split as segments by some upstreams and not by others; NUL ends a
# string in C-based ones. The proxy cannot know which reading the upstream will take.
_AMBIGUOUS_BYTES = {0x00: "NUL", 0x2F: "'/'", 0x5C: "'\\'"}
# After our decoding, "%25" followed by the hex of "/", "\", NUL or "." is a double encoding:
# an upstream that decodes twice would see the byte the first round refused.
_DOUBLE_ENCODED = re.compile(r"%25(?:2[EeFf]|00|5[Cc])")
# The Tomcat/Jetty path-parameter trick: "..;x" is ".." to them. Also "%3B", which some
# frameworks decode before they strip parameters.
_PARAMS = re.compile(r";|%3B")


def normalize_path(raw: str) -> str:
    """Return the one canonical spelling of an origin-form path (RFC 9112 §3.2.1).

    `raw` is the path exactly as received (aiohttp's `raw_path` with the query split off).
    Unreserved escapes are decoded, other escapes kept with uppercase hex (RFC 3986 §6.2.2),
    runs of "/" collapsed, dot segments removed (§5.2.4); case and a trailing "/" are kept.

    Raises:
        BadRequest: not origin-form; longer than MAX_PATH_LENGTH; a space, control, non-ASCII,
            "\\" or "#" character; a malformed escape; an escaped "/", "\\" or NUL, or a
            double-encoded "/", "\\", NUL or "."; a dot segment carrying ";params"; escapes that
            do not decode to UTF-8.
    """
    if len(raw) > MAX_PATH_LENGTH:
        raise BadRequest(f"path longer than {MAX_PATH_LENGTH} bytes")
    if _CLEAN_PATH.fullmatch(raw):
        return raw
    return _normalize_slow(raw)


# RFC 3986 §3: scheme ":" ["//" authority] path ["?" query] ["#" fragment].
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(//([^/?#]*))?([^?#]*)(\?[^#]*)?(#.*)?", re.DOTALL)
_AUTHORITY = re.compile(
    r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]*@)?([A-Za-z0-9\-._~!$&'()*+,;=]*|\[[0-9A-Fa-f:.]+\])(:[0-9]*)?"
)


def normalize_uri(raw: str) -> str:
    """The one canonical spelling of an absolute URI (RFC 3986 §6.2.2): scheme and host in
    lower case, unreserved escapes decoded and others in upper-case hex, dot segments removed
    from the path (`normalize_path`'s rules, so `file:///tmp/../etc/passwd` is
    `file:///etc/passwd`). What policy matches a resource URI on.

    Raises:
        BadRequest: not an absolute URI; a fragment; a space, control or non-ASCII character;
            an authority that is not host[:port] (userinfo allowed); a path `normalize_path`
            refuses (encoded "/", "\\" or NUL, double encoding, malformed escapes); dot
            segments in a rootless path.
    """
    if len(raw) > MAX_PATH_LENGTH:
        raise BadRequest(f"URI longer than {MAX_PATH_LENGTH} bytes")
    match = _URI.fullmatch(raw)
    if match is None:
        raise BadRequest("not an absolute URI (scheme:…)")
    scheme, has_authority, authority, path, query, fragment = match.groups()
    if fragment is not None:
        raise BadRequest("a resource URI carries no fragment")
    bad = _NOT_VISIBLE_ASCII.search(raw)
    if bad is not None:
        raise BadRequest(f"URI contains a space, control or non-ASCII character at {bad.start()}")
    if "\\" in raw:
        raise BadRequest("URI contains a backslash")
    out = scheme.lower() + ":"
    if has_authority is not None:
        parts = _AUTHORITY.fullmatch(authority)
        if parts is None or "%" in authority:
            raise BadRequest("URI authority must be [userinfo@]host[:port], without escapes")
        host_start, host_end = parts.span(1)
        out += "//" + authority[:host_start] + parts.group(1).lower() + authority[host_end:]
        if path and not path.startswith("/"):
            raise BadRequest("URI path after an authority must start with '/'")
    if path.startswith("/"):
        out += normalize_path(path)
    elif path:
        if any(segment in (".", "..") for segment in path.split("/")):
            raise BadRequest("URI has dot segments in a path without a root")
        out += _ESCAPE_OR_UNSAFE.sub(_canonical_escape, path)
    if query is not None:
        out += _ESCAPE_OR_UNSAFE.sub(_canonical_escape, query)
    return out


def _normalize_slow(raw: str) -> str:
    if not raw.startswith("/"):
        # Absolute-form (RFC 9112 §3.2.2) is for forward proxies, authority-form (§3.2.3) for
        # CONNECT and asterisk-form (§3.2.4) for server-wide OPTIONS: none names a tool path.
        raise BadRequest("request-target must be an origin-form path starting with '/'")
    bad = _NOT_VISIBLE_ASCII.search(raw)
    if bad is not None:
        raise BadRequest(f"path contains a space, control or non-ASCII character at {bad.start()}")
    if "\\" in raw:
        # Windows servers and some frameworks read "\" as "/".
        raise BadRequest("path contains a backslash")
    if "#" in raw:
        # RFC 9110 §7.1: a fragment is never sent; one on the wire is a client or attack.
        raise BadRequest("path contains '#'")

    path = _ESCAPE_OR_UNSAFE.sub(_canonical_escape, raw)
    if _DOUBLE_ENCODED.search(path):
        raise BadRequest("path contains a double-encoded '/', '\\', NUL or '.'")

    segments = path.split("/")
    kept: list[str] = []
    trailing_slash = False
    for segment in segments[1:]:
        trailing_slash = segment in ("", ".", "..")
        if segment == "" or segment == ".":
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        if _PARAMS.search(segment):
            # Tomcat, Jetty and Spring drop ";params" before routing ("/admin;x" is "/admin",
            # "/public/..;/admin" is "/admin" to them), so the path we match would not be
            # the one they serve. Few tool APIs use path parameters; refuse them all.
            raise BadRequest("path parameters (';') are not allowed")
        kept.append(segment)

    result = "/" + "/".join(kept)
    if trailing_slash and kept:
        result += "/"
    if len(result) > MAX_PATH_LENGTH:
        raise BadRequest(f"path longer than {MAX_PATH_LENGTH} bytes")
    if "%" in result:
        try:
            urllib.parse.unquote_to_bytes(result).decode("utf-8")
        except UnicodeDecodeError:
            # RFC 3987 §3.2: escapes in a URI path are UTF-8; anything else (including overlong
            # forms such as %C0%AE for ".") is read differently by different decoders.
            raise BadRequest("path escapes are not valid UTF-8") from None
    return result


def _canonical_escape(match: re.Match[str]) -> str:
    text = match.group(0)
    if text[0] != "%":
        return f"%{ord(text):02X}"
    digits = match.group(1)
    if digits is None:
        raise BadRequest("path contains a malformed percent-escape")
    byte = int(digits, 16)
    if chr(byte) in _UNRESERVED:
        # RFC 3986 §2.3: escaped unreserved characters are equivalent to the characters, so
        # "%2e%2e" is ".." and must be removed as a dot segment, not passed on.
        return chr(byte)
    if byte in _AMBIGUOUS_BYTES:
        raise BadRequest(f"path contains an encoded {_AMBIGUOUS_BYTES[byte]}")
    return "%" + digits.upper()


def decode_segment(segment: str) -> str:
    """Percent-decode one segment of a normalized path to text (a path-template binding).

    Raises:
        BadRequest: the escapes are not UTF-8, or decode to "/" or NUL (impossible for a
            segment of a path `normalize_path` returned).
    """
    if "%" not in segment:
        return segment
    try:
        text = urllib.parse.unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("path segment is not valid UTF-8") from None
    if "/" in text or "\x00" in text:
        raise BadRequest("path segment decodes to '/' or NUL")
    return text


_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_EMPTY_QUERY: Final[Mapping[str, str | tuple[str, ...]]] = MappingProxyType({})


def parse_query(raw_query: str) -> Mapping[str, str | tuple[str, ...]]:
    """Parse an application/x-www-form-urlencoded query ("+" is a space) into a read-only map.

    A name seen once maps to its value; a repeated name maps to a tuple of its values in order,
    so a policy written for one value fails (and denies) on parameter pollution.

    Raises:
        BadRequest: a space, control, non-ASCII or "#" character; a malformed percent-escape;
            escapes that are not UTF-8 or are NUL; more than MAX_QUERY_FIELDS fields.
    """
    if not raw_query:
        return _EMPTY_QUERY
    # RFC 3986 §3.4: the query is forwarded unchanged, so it must be as unambiguous as the
    # path: raw bytes outside visible ASCII would be re-read differently upstream.
    if _NOT_VISIBLE_ASCII.search(raw_query) or "#" in raw_query:
        raise BadRequest("query contains a space, control, non-ASCII or '#' character")
    if _MALFORMED_ESCAPE.search(raw_query):
        # urllib keeps "%zz" literally where other parsers refuse or guess; refuse instead.
        raise BadRequest("query contains a malformed percent-escape")
    try:
        pairs = urllib.parse.parse_qsl(
            raw_query,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except UnicodeDecodeError:
        raise BadRequest("query escapes are not valid UTF-8") from None
    except ValueError:
        raise BadRequest(f"query has more than {MAX_QUERY_FIELDS} fields") from None
    values: dict[str, str | tuple[str, ...]] = {}
    for name, value in pairs:
        if "\x00" in name or "\x00" in value:
            # CEL reads a string up to its first NUL: `?to=alice%00mallory` would be "alice"
            # to resource.query.to, and the whole string to the upstream.
            raise BadRequest("query contains an encoded NUL")
        seen = values.get(name)
        if seen is None:
            values[name] = value
        elif isinstance(seen, tuple):
            values[name] = (*seen, value)
        else:
            values[name] = (seen, value)
    return MappingProxyType(values)


def describe(method: str, raw_target: str) -> tuple[Action, str]:
    """Name an HTTP request as an `Action` ("http:GET /v1/x") and return its raw query.

    Agents call the same few endpoints over and over: short request lines are described once
    and remembered (an `Action` is immutable, so sharing it is safe); a refusal is never
    remembered, so a bad request line is checked every time.

    The method is kept as sent: RFC 9110 §9.1 makes methods case-sensitive, so "get" is not
    "GET" and falls to the default deny. The raw query (without "?", "" if none) is what the
    shell forwards, unchanged.

    Raises:
        BadRequest: the method is not a token, or `normalize_path` / `parse_query` refuse.
    """
    if len(method) + len(raw_target) <= _REMEMBERED_LINE:
        return _describe_remembered(method, raw_target)
    return _describe(method, raw_target)


# A remembered request line costs its Action and the strings in it: 4,096 lines of at most
# 512 characters bound the cache to a few MiB, whatever the agents send.
_REMEMBERED_LINE = 512


def read_as_upstream(
    action: Action,
    *,
    fold_case: bool,
    canonical_integers: bool,
    ignore_trailing_slash: bool = False,
) -> Action:
    """`action` as an upstream that reads paths this way sees it (`upstreams[].paths`).

    `fold_case`: the upstream routes case-insensitively (Express, nginx `~*`), so patterns
    must match whatever the case. `ignore_trailing_slash`: it serves /x/ as /x (Express
    without strict routing): the action, and so the path forwarded, loses the final "/".
    `canonical_integers`: the upstream reads integer segments
    as numbers (Starlette's `{id:int}`, FastAPI's `id: int`), so `/01`, `/+1` or Arabic-Indic
    digits would be read as 1 past a `resource.id != "1"`: such spellings are refused.

    Raises:
        BadRequest: a segment some framework reads as an integer, not in canonical form.
    """
    if ignore_trailing_slash and len(action.target) > 1 and action.target.endswith("/"):
        # The upstream routes /x/ to /x: decided (and forwarded) as the route it reaches, so
        # a deny on /x is not passed by its other spelling.
        target = action.target.rstrip("/") or "/"
        action = replace(action, target=target, name=f"http:{action.operation} {target}")
    if canonical_integers:
        for segment in action.target.split("/"):
            _check_integer_segment(segment)
    if fold_case and not action.fold_case:
        action = replace(action, fold_case=True)
    return action


def _check_integer_segment(segment: str) -> None:
    if not segment:
        return
    text = urllib.parse.unquote(segment, errors="strict")
    try:
        number = int(text)  # as lenient as the frameworks: signs, spaces, "_", other digits
    except ValueError:
        return
    if str(number) != text:
        raise BadRequest(
            f"path segment {segment!r} reads as the integer {number}: send it as {number} "
            "(this upstream reads integer segments as numbers)"
        )


@functools.lru_cache(maxsize=4096)
def _describe_remembered(method: str, raw_target: str) -> tuple[Action, str]:
    return _describe(method, raw_target)


def _describe(method: str, raw_target: str) -> tuple[Action, str]:
    if not TOKEN.fullmatch(method):
        raise BadRequest("request method is not an RFC 9110 token")
    raw_path, _, raw_query = raw_target.partition("?")
    action = Action(
        protocol="http",
        operation=method,
        target=normalize_path(raw_path),
        query=parse_query(raw_query),
    )
    return action, raw_query


# --- request headers -------------------------------------------------------------------------

_DECLARED_TASK = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def parse_declared_task(value: str | None) -> str | None:
    """Validate the agent's own `X-Agentproxy-Task` declaration; None when absent.

    Raises:
        BadRequest: the value is not 1 to 128 characters of A-Z a-z 0-9 . _ : -
    """
    if value is None:
        return None
    if not _DECLARED_TASK.fullmatch(value):
        raise BadRequest(
            "X-Agentproxy-Task must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'"
        )
    return value


# W3C Trace Context level 1 §3.2.2: lowercase hex fields; §3.2.4: a higher version may append
# fields after a "-", and its first four fields are read as version 00's.
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-[\x20-\x7e]*)?"
)
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")


def parse_traceparent(
    traceparent: str | None,
    tracestate: str | None,
    new_trace_id: str,
    new_span_id: str,
) -> TraceContext:
    """Continue the caller's trace with our own span, or start a fresh sampled trace.

    The caller supplies the random ids (`new_trace_id` 32 hex, `new_span_id` 16 hex) so this
    stays pure. `tracestate` is kept only with a valid `traceparent` (§3.3: it is meaningless
    without one) and only when it is at most 512 printable ASCII characters. Never raises.
    """
    fresh = TraceContext(new_trace_id, new_span_id, "01")
    if traceparent is None:
        return fresh
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return fresh
    version = match["version"]
    if version == "ff" or (version == "00" and match["rest"] is not None):
        # §3.2.2.1: "ff" is never valid; version 00 has exactly four fields.
        return fresh
    if match["trace_id"] == "0" * 32 or match["parent_id"] == "0" * 16:
        # §3.2.2.3, §3.2.2.4: all-zero ids are invalid.
        return fresh
    state = tracestate if tracestate and _TRACESTATE.fullmatch(tracestate) else None
    return TraceContext(match["trace_id"], new_span_id, match["flags"], state, match["parent_id"])


# RFC 9110 §7.6.1 (and the obsolete but still sent Keep-Alive, Proxy-Connection), plus Host,
# which the shell sets for the upstream it chose.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


# Never forwarded upstream whatever Connection says: the agent's credential, and the proxy's
# own Forwarded (the shell sets X-Forwarded-* itself); headers that make a framework or a proxy
# behind us run another method or path than the one decided (method overrides, IIS/Symfony's
# original-URL headers); and client-address headers that upstreams trust from a proxy.
_REQUEST_DROP: Final = HOP_BY_HOP | {
    "authorization",
    "forwarded",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "x-original-url",
    "x-original-uri",
    "x-original-method",
    "x-rewrite-url",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-host",
}
_PROXY_SET_PREFIXES: Final = ("x-agentproxy-", "x-forwarded-")
REQUEST_DROP: Final = _REQUEST_DROP - HOP_BY_HOP  # what gRPC metadata drops too


@functools.lru_cache(maxsize=1024)  # the same few header names on every call
def header_key(name: str) -> str:
    """A header name as every server reads it: lower case, `_` as `-`. CGI and WSGI servers
    (wsgiref, gunicorn with header_map=dangerous, PHP) turn both `X-Api-Key` and `X_Api_Key`
    into HTTP_X_API_KEY, so whatever the proxy strips or reads, it matches by this key."""
    return name.lower().replace("_", "-")


def _connection_named(lowered: list[tuple[str, str, str]]) -> frozenset[str]:
    # RFC 9110 §7.6.1: a proxy removes every header the Connection header names.
    named: set[str] = set()
    for lower, _, value in lowered:
        if lower == "connection":
            named.update(_connection_tokens(value))
    return frozenset(named)


def _connection_tokens(value: str) -> set[str]:
    return {header_key(t.strip()) for t in value.split(",") if t.strip()}


@functools.lru_cache(maxsize=64)
def _request_drop(strip: frozenset[str]) -> frozenset[str]:
    return _REQUEST_DROP | {header_key(name) for name in strip}


def request_headers_to_forward(
    headers: Iterable[tuple[str, str]], *, strip: frozenset[str]
) -> list[tuple[str, str]]:
    """The agent's request headers the upstream may see, in order, duplicates kept.

    Drops hop-by-hop headers and those Connection names; `Authorization` (the agent's
    credential is never forwarded); `X-Agentproxy-*` (only the proxy sets those), `Forwarded`
    and `X-Forwarded-*` (the shell sets its own); method-override, original-URL and
    client-address headers (`_REQUEST_DROP`); and every name in `strip`, e.g. the upstream
    credential header so an agent cannot supply its own. Names are matched by `header_key`
    (`X_Agentproxy_User` is `X-Agentproxy-User` to a WSGI server, so it goes too). The shell
    adds its own headers after this filter, so Connection cannot name them away. Never raises.
    """
    # Each name is keyed once; this runs on every call.
    lowered = [(header_key(name), name, value) for name, value in headers]
    drop = _request_drop(strip)
    named = _connection_named(lowered)
    if named:
        drop = drop | named
    return [
        (name, value)
        for lower, name, value in lowered
        if lower not in drop and not lower.startswith(_PROXY_SET_PREFIXES)
    ]


def response_headers_to_return(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response headers the agent may see: all but hop-by-hop and those the
    Connection header names (RFC 9110 §7.6.1), in order, duplicates kept. Never raises."""
    # One pass; a second only when Connection names more than hop-by-hop headers (servers
    # mostly send `Connection: keep-alive`, whose token is dropped anyway). Runs on every call.
    kept: list[tuple[str, str, str]] = []
    named: set[str] = set()
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                named |= _connection_tokens(value)
            continue
        kept.append((lower, name, value))
    if named and not named <= HOP_BY_HOP:
        return [(name, value) for lower, name, value in kept if lower not in named]
    return [(name, value) for _, name, value in kept]


# Visible ASCII except "%" (the escape itself), "," (list separator, RFC 9110 §5.6.1), ";"
# (parameter separator), and '"' and "\" (quoted-string, §5.6.4).
_HEADER_SAFE: Final = "!#$&'()*+-./:<=>?@[]^_`{|}~"


@functools.lru_cache(maxsize=4096)  # the same few agent and user ids on every call
def header_value(text: str) -> str:
    """Percent-encode (RFC 3986 §2.1, UTF-8) `text` so it fits one item of a header list.

    "hr-bot" stays "hr-bot"; "a,b" becomes "a%2Cb".

    Raises:
        UnicodeEncodeError: `text` holds a lone surrogate (it is not encodable as UTF-8).
    """
    return urllib.parse.quote(text, safe=_HEADER_SAFE)


_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@functools.lru_cache(maxsize=1024)  # an agent sends the same token call after call
def bearer_token(authorization: str | None) -> str | None:
    """The bearer token of an `Authorization` header (RFC 6750 §2.1); None when absent.

    Raises:
        Unauthenticated: the scheme is not "Bearer" (case-insensitive, RFC 9110 §11.1), or
            what follows is not exactly one b64token.
    """
    if authorization is None:
        return None
    scheme, _, rest = authorization.partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthenticated("authorization is not a Bearer credential")
    token = rest.lstrip(" ")
    if not _B64TOKEN.fullmatch(token):
        raise Unauthenticated("malformed bearer token")
    return token


# --- refusals --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireReply:
    """A complete HTTP response for the shell to send as is."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


# RFC 6750 §3: error-description is %x20-21 / %x23-5B / %x5D-7E (no '"' or "\").
_NOT_ERROR_DESCRIPTION = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
# RFC 9110 §5.5: field-value characters (visible ASCII, SP, HTAB; obs-text refused).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
# What may stand inside a quoted-string of a challenge without escapes (RFC 9110 §5.6.4).
_QUOTABLE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_SET_BY_RENDER: Final = frozenset({"content-type", "cache-control", "www-authenticate"})


def bearer_challenge(
    refusal: Refusal, resource_metadata: str | None, scope: tuple[str, ...] = ()
) -> str | None:
    """The `WWW-Authenticate` of a refusal (RFC 6750 §3, RFC 9728 §5.1), None for refusals
    that are not about the token."""
    params: list[str] = []
    if isinstance(refusal, InsufficientScope):
        params += ['error="insufficient_scope"', f'scope="{" ".join(refusal.scopes)}"']
    elif isinstance(refusal, Unauthenticated):
        if not isinstance(refusal, MissingCredential):
            description = _NOT_ERROR_DESCRIPTION.sub("", refusal.detail)[:200]
            params += ['error="invalid_token"', f'error_description="{description}"']
        if scope and resource_metadata is not None:
            params.append(f'scope="{" ".join(scope)}"')
    else:
        return None
    if resource_metadata is not None and _QUOTABLE.fullmatch(resource_metadata):
        params.append(f'resource_metadata="{resource_metadata}"')
    return "Bearer " + ", ".join(params) if params else "Bearer"


def render(
    refusal: Refusal,
    *,
    decision_id: str,
    instance: str | None = None,
    resource_metadata: str | None = None,
    scope: tuple[str, ...] = (),
) -> WireReply:
    """Render a refusal as an RFC 9457 problem+json response.

    Members: type, title, status, detail, decision_id, and `rule`, the refusal's own members
    (e.g. `limit`) and `instance` when set.
    `Unauthenticated` adds `WWW-Authenticate` (RFC 6750 §3): bare `Bearer` for
    `MissingCredential`, else `error="invalid_token"` with the sanitized detail;
    `InsufficientScope` adds `error="insufficient_scope"` with the scopes to ask for. Where the
    upstream publishes protected resource metadata, `resource_metadata` names it (RFC 9728
    §5.1) and a 401 carries `scope`, the scopes the rules know for it. The refusal's
    own headers (e.g. Retry-After) are added unless invalid or one render sets itself. Details
    are shown verbatim: `InternalError`'s caller guarantees its detail is generic. Never raises.
    """
    problem: dict[str, object] = {
        "type": refusal.problem_type,
        "title": refusal.title,
        "status": refusal.status,
        "detail": refusal.detail,
        "decision_id": decision_id,
    }
    if refusal.rule is not None:
        problem["rule"] = refusal.rule
    for name, value in refusal.members.items():
        problem.setdefault(name, value)
    if instance is not None:
        problem["instance"] = instance

    headers: list[tuple[str, str]] = [
        ("Content-Type", "application/problem+json"),
        # RFC 9111 §5.2.2.5: a refusal is about this one call; no cache may replay it.
        ("Cache-Control", "no-store"),
    ]
    challenge = bearer_challenge(refusal, resource_metadata, scope)
    if challenge is not None:
        headers.append(("WWW-Authenticate", challenge))
    for name, value in refusal.headers.items():
        # A CR or LF here would split the response (header injection); drop rather than raise,
        # since rendering is the last step of an already failing call.
        if (
            TOKEN.fullmatch(name)
            and _FIELD_VALUE.fullmatch(value)
            and name.lower() not in _SET_BY_RENDER
        ):
            headers.append((name, value))
    return WireReply(refusal.status, tuple(headers), orjson.dumps(problem))
