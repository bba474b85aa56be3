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

import urllib.parse
from dataclasses import dataclass
from typing import Any, Final, Literal

from agentproxy.errors import BadRequest, UnsupportedMediaType
from agentproxy.protocols.body import decode_content
from agentproxy.protocols.strict_json import JsonError, check_keys, parse_request

__all__ = [
    "MAX_FORM_FIELDS",
    "BodyKind",
    "BodyMode",
    "HttpBody",
    "body_kind",
    "is_json_media",
    "parse_body",
    "parse_form",
]

BodyMode = Literal["auto", "json", "form", "stream"]
BodyKind = Literal["json", "form"]

# A form is a flat list of fields; far more than any real one.
MAX_FORM_FIELDS: Final = 1000
_FORM = "application/x-www-form-urlencoded"
# Names a framework reads as something else: PHP turns "." and " " into "_" and "[...]" into
# arrays, Rails and qs nest on brackets, Spring binds "a.b" to a nested property.
_RENAMED = frozenset(".[] ")


@dataclass(frozen=True, slots=True)
class HttpBody:
    """A body read for policy: its arguments, and the bytes forwarded (content coding
    removed: `decoded` says whether one was, so the shell drops Content-Encoding)."""

    args: Any
    body: bytes
    kind: BodyKind
    decoded: bool


def _media(content_type: str) -> tuple[str, dict[str, str]]:
    media, *params = content_type.split(";")
    values: dict[str, str] = {}
    for param in params:
        name, _, value = param.partition("=")
        values[name.strip().lower()] = value.strip().strip('"').lower()
    return media.strip().lower(), values


def is_json_media(content_type: str | None) -> bool:
    """application/json or application/*+json (whatever its parameters)."""
    if content_type is None:
        return False
    media = _media(content_type)[0]
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
    kind: BodyKind, content_encoding: str | None, body: bytes, *, max_bytes: int
) -> HttpBody:
    """The arguments of a body read as `kind`, with its content coding removed.

    Raises BadRequest ("JSON body: …", "form body: …") for a body that parsers could read
    differently or that is not the kind declared; PayloadTooLarge when it decodes to more
    than `max_bytes` (or inflates past the ratio `decode_content` allows).
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
    return HttpBody(args, raw, kind, decoded)


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
