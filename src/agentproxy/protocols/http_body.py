"""Plain HTTP request bodies as policy's `args`: JSON and form bodies, read strictly.

A REST tool's body is what it acts on (`POST /v1/transfers {"amount": 5000000}`), so a rule
may read it. It is read only when something needs it (`needs_body` in the shell: a rule that
may match reads `args`, requires approval, or the audit redacts `args.*`), or when the
upstream says it always reads one kind (`body: json | form`); what is forwarded is then
exactly the bytes parsed. Parsers must agree with every upstream's: JSON goes through
`strict_json` (duplicate and case-colliding keys, NaN, depth, size), form fields are refused
where frameworks read one name differently (nested by PHP, Rails, qs and Spring, renamed by
PHP, matched case-insensitively by ASP.NET). Pure: bytes in, values out.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from agentproxy.errors import BadRequest, UnsupportedMediaType
from agentproxy.protocols.body import MediaTypeError, decode_content, parse_media_type
from agentproxy.protocols.strict_json import JsonError, check_keys, key_folds, parse_request

__all__ = [
    "MAX_FORM_FIELDS",
    "BodyKind",
    "BodyMode",
    "HttpBody",
    "body_kind",
    "check_method_override",
    "check_query_overlap",
    "check_spellings",
    "form_names",
    "is_json_media",
    "parse_body",
    "parse_form",
]

BodyMode = Literal["auto", "json", "form", "stream"]
BodyKind = Literal["json", "form"]

# A form is a flat list of fields; far more than any real one.
MAX_FORM_FIELDS: Final = 1000
FORM_MEDIA = "application/x-www-form-urlencoded"
_FORM = FORM_MEDIA
# Names a framework reads as something else: PHP turns "." and " " into "_" and "[...]" into
# arrays, Rails and qs nest on brackets, Spring binds "a.b" to a nested property.
_RENAMED = frozenset(".[] ")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class HttpBody:
    """A body read for policy: its arguments, and the bytes forwarded (content coding
    removed: `decoded` says whether one was, so the shell drops Content-Encoding)."""

    args: Any
    body: bytes
    kind: BodyKind
    decoded: bool


def _media(content_type: str) -> tuple[str, dict[str, str]]:
    """The media type and parameters (`body.parse_media_type`). Raises UnsupportedMediaType
    for a value outside RFC 9110's grammar or a parameter named twice."""
    try:
        return parse_media_type(content_type)
    except MediaTypeError as exc:
        raise UnsupportedMediaType(str(exc)) from None


def is_json_media(content_type: str | None) -> bool:
    """application/json or application/*+json (whatever its parameters)."""
    if content_type is None:
        return False
    try:
        media = _media(content_type)[0]
    except UnsupportedMediaType:
        return False  # a value outside the grammar is no media type at all
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def body_kind(mode: BodyMode, content_type: str | None, *, why: str) -> BodyKind:
    """How a body that must be read is read: by its declared media type (`auto`), or as the
    upstream says it always reads bodies (`json`, `form`; an undeclared type is read so too).

    Raises UnsupportedMediaType for a type the proxy does not read (`why`: what needs the
    body, for the message), or one other than the upstream's kind; BadRequest for a charset
    other than UTF-8.
    """
    if content_type is None or not content_type.strip():
        if mode in ("json", "form"):
            return mode
        raise UnsupportedMediaType(
            f"{why}, and the body has no Content-Type: send application/json or {_FORM}"
        )
    media, params = _media(content_type)
    kind: BodyKind | None = None
    if is_json_media(media):
        kind = "json"
    elif media == _FORM:
        kind = "form"
    if kind is None:
        raise UnsupportedMediaType(
            f"{why}: a {media} body cannot be read; send application/json or {_FORM}"
        )
    if mode in ("json", "form") and kind != mode:
        raise UnsupportedMediaType(f"this upstream reads {mode} bodies (body: {mode}), not {media}")
    charset = params.get("charset")
    if charset is not None and charset != "utf-8":
        raise BadRequest(f"Content-Type charset must be utf-8, not {charset[:32]!r}")
    return kind


def parse_body(
    kind: BodyKind,
    content_encoding: str | None,
    body: bytes,
    *,
    max_bytes: int,
    spellings: Mapping[str, frozenset[str]] | None = None,
) -> HttpBody:
    """The arguments of a body read as `kind`, with its content coding removed.

    Raises BadRequest ("JSON body: …", "form body: …") for a body that parsers could read
    differently or that is not the kind declared, or with a key that is one of `spellings`
    (policy's names of args members, by lower-case form) in another case
    (`check_spellings`); PayloadTooLarge when it decodes to more than `max_bytes` (or
    inflates past the ratio `decode_content` allows).
    """
    raw = decode_content(content_encoding, body, max_bytes)
    decoded = raw is not body
    if not raw.strip():
        # An empty body has no arguments (a POST with Content-Length 0 behaves alike).
        return HttpBody({}, raw, kind, decoded)
    if kind == "json":
        try:
            args = parse_request(raw)
        except JsonError as exc:
            raise BadRequest(f"JSON body: {exc}") from None
    else:
        args = parse_form(raw)
    if spellings:
        check_spellings(args, spellings)
    return HttpBody(args, raw, kind, decoded)


def check_spellings(document: Any, spellings: Mapping[str, frozenset[str]]) -> None:
    """Raises BadRequest for an object key, at any depth, that a case-insensitive parser
    reads as a name policy reads (`spellings`: those names by lower-case form) but that is
    spelled otherwise: {"Role": "admin"} is the field role to Go's encoding/json, ASP.NET
    and Jackson, and no key at all to has(args.role)."""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            for fold in key_folds(key):
                names = spellings.get(fold)
                if names is not None and key not in names:
                    raise BadRequest(
                        f"key {key[:64]!r} is {sorted(names)[0]!r} to a parser that ignores "
                        "case (Go's encoding/json, ASP.NET), which policy reads: spell it so"
                    )
            if isinstance(item, (dict, list)):
                stack.append(item)


def parse_form(raw: bytes) -> dict[str, str | list[str]]:
    """An application/x-www-form-urlencoded body as `args`: a name sent once maps to its
    value, a repeated one to the list of its values (so a rule written for one value fails,
    and denies, on parameter pollution).

    Raises BadRequest ("form body: …") for bytes outside visible ASCII, a malformed or
    non-UTF-8 escape, a raw ";", more than MAX_FORM_FIELDS fields, a name that frameworks read as
    nested or renamed (".", "[", "]", " ") or two names one to a case-insensitive reader.
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("form body: bytes outside ASCII (percent-encode them)") from None
    if any(not ("\x21" <= c <= "\x7e") for c in text.rstrip("\r\n")):
        raise BadRequest("form body: a space or control character (percent-encode it)")
    text = text.rstrip("\r\n")
    if text.startswith(("{", "[")):
        # Every byte of a JSON text is a legal form character and "&" may sit in its strings:
        # `{"z":"&amount=5&","amount":5000000}` has amount=5 as a form, and five million to
        # an upstream that reads JSON whatever the Content-Type (Starlette's request.json(),
        # Go's json.NewDecoder(r.Body)). No form encoder leaves "{" or "[" unescaped.
        raise BadRequest("form body: a JSON text sent as a form (send it as application/json)")
    if ";" in text:
        # Some parsers (older Rack, Python's cgi) split fields on ";" as well as "&".
        raise BadRequest("form body: a raw ';' (percent-encode it as %3B)")
    if "%" in text and any(
        len(part) < 2 or not all(c in "0123456789abcdefABCDEF" for c in part[:2])
        for part in text.split("%")[1:]
    ):
        raise BadRequest("form body: a malformed percent-escape")
    try:
        pairs = urllib.parse.parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=False,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
            separator="&",
        )
    except UnicodeDecodeError:
        raise BadRequest("form body: escapes that are not UTF-8") from None
    except ValueError:
        raise BadRequest(f"form body: more than {MAX_FORM_FIELDS} fields") from None
    values: dict[str, str | list[str]] = {}
    for name, value in pairs:
        if _CONTROL.search(name) or "\x00" in value:
            # PHP registers a name as a C string ("amount%00x" is $_POST["amount"]), and CEL
            # reads every string up to its first NUL: policy would see another field or value.
            raise BadRequest("form body: a NUL or control character in a field (refused)")
        if not name or _RENAMED.intersection(name):
            raise BadRequest(
                f"form body: field name {name[:64]!r} is read as nested or renamed by some "
                "frameworks (PHP, Rails, Spring); send structured data as JSON"
            )
        seen = values.get(name)
        if seen is None:
            values[name] = value
        elif isinstance(seen, list):
            seen.append(value)
        else:
            values[name] = [seen, value]
    try:
        check_keys(values)
    except JsonError as exc:
        raise BadRequest(f"form body: {exc}") from None
    return values


def check_query_overlap(args: Any, query: Mapping[str, Any]) -> None:
    """Raises BadRequest when a top-level field of the body is also named by the query.

    Rails' params (request_parameters.merge(query_parameters)), a servlet's getParameter and
    Flask's request.values read the query's value first; policy read the body's (`args`), so
    `?amount=5000000` with a body of amount=5 is five million to them. A query name is
    compared as those frameworks key it: up to its first "[" (Rails and PHP nest on it), with
    PHP's "." and " " as "_", in any case (ASP.NET binds either).
    """
    if not query or not isinstance(args, dict) or not args:
        return
    fields = {_param_key(name) for name in args}
    for name in query:
        if _param_key(name.partition("[")[0]) in fields:
            raise BadRequest(
                f"the query and the body both name {name[:64]!r}; frameworks that merge them "
                "read one or the other: send it once"
            )


def _param_key(name: str) -> str:
    return name.replace(".", "_").replace(" ", "_").lower()


# Rails (Rack::MethodOverride), Laravel and Symfony run a POST as the method this field names.
METHOD_OVERRIDE: Final = "_method"


def check_method_override(method: str, args: Any, query: Mapping[str, Any]) -> None:
    """Raises BadRequest for a POST that names another method in a `_method` field of its form
    body or its query: those frameworks would run, say, a DELETE that policy decided as a
    POST (the header overrides are dropped: `protocols.http`)."""
    if method != "POST":
        return
    names = [*query, *(args if isinstance(args, dict) else ())]
    if any(_param_key(name.partition("[")[0]) == METHOD_OVERRIDE for name in names):
        raise BadRequest(
            "a _method field makes Rails, Laravel and Symfony run the POST as another method; "
            "send that method instead"
        )


def form_names(raw: bytes) -> dict[str, None]:
    """The field names of a form body, read leniently (a body no rule reads is not held to
    `parse_form`'s strictness; only its names are looked at)."""
    text = raw.decode("latin-1")
    return {
        name: None
        for name, _ in urllib.parse.parse_qsl(
            text.replace(";", "&"), keep_blank_values=True, errors="replace"
        )
    }
