"""Request bodies the proxy reads to authorize them: media type and content coding.

Shared by every adapter that reads a JSON body (MCP, LLM APIs). A body is read only as
declared: a charset other than UTF-8 or a content coding other than gzip is refused, never
forwarded unchecked. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import re
import zlib
from typing import Final

from agentproxy.errors import BadRequest, PayloadTooLarge
from agentproxy.protocols.http_token import TOKEN

__all__ = [
    "INFLATION_FLOOR",
    "MAX_INFLATION_RATIO",
    "MediaTypeError",
    "check_json_content_type",
    "decode_content",
    "parse_media_type",
]

# JSON compresses 5-20x as agents send it; a body inflating 100x more than it was sent is a
# bomb whoever pays for the inflating and parsing. Bodies decoding to INFLATION_FLOOR bytes or
# fewer may inflate any amount (a short repetitive body is cheap whatever its ratio).
MAX_INFLATION_RATIO: Final = 100
INFLATION_FLOOR: Final = 256 * 1024


# RFC 9110 §8.3.1 and §5.6.6: type "/" subtype *( OWS ";" OWS [ name "=" value ] ), a value
# a token or a quoted-string (which may hold ";" and "\"").
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
_PARAMETER = re.compile(rf"({TOKEN.pattern})=({TOKEN.pattern}|{_QUOTED})")
# One reading only: each ";" starts a parameter, OWS follows it (and a parameter) once.
_MEDIA_TYPE = re.compile(
    rf"[ \t]*({TOKEN.pattern}/{TOKEN.pattern})[ \t]*((?:;[ \t]*(?:{_PARAMETER.pattern}[ \t]*)?)*)"
)
_QUOTED_PAIR = re.compile(r"\\(.)")


class MediaTypeError(ValueError):
    """A Content-Type outside RFC 9110's grammar, or with a parameter named twice."""


def parse_media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """The media type and parameters (names and values lower-cased) of a Content-Type, read
    by RFC 9110's grammar: the one reading for every adapter.

    Raises MediaTypeError for a value outside the grammar or a parameter named twice:
    a split on ";" reads `charset=utf-7; x="; charset=utf-8"` as UTF-8, Express's
    content-type (and every parser that follows the grammar) as UTF-7, which turns a string
    of the body into JSON members policy never saw.
    """
    match = _MEDIA_TYPE.fullmatch(content_type)
    if match is None:
        raise MediaTypeError(
            f"Content-Type {content_type[:64]!r} is not type/subtype[; name=value]..."
        )
    values: dict[str, str] = {}
    for name, value in _PARAMETER.findall(match.group(2)):
        name = name.lower()
        if name in values:
            raise MediaTypeError(f"Content-Type names the parameter {name!r} twice")
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        values[name] = value.lower()
    return match.group(1).lower(), values


def check_json_content_type(value: str | None) -> None:
    """Raises BadRequest unless `value` is application/json, with no charset but utf-8."""
    # MCP Streamable HTTP: every client message is POSTed as application/json. RFC 8259 §8.1
    # makes JSON UTF-8, so any other declared charset means the client encoded it otherwise.
    if value is None:
        raise BadRequest("Content-Type must be application/json")
    try:
        media, params = parse_media_type(value)
    except MediaTypeError as exc:
        raise BadRequest(str(exc)) from None
    if media != "application/json":
        raise BadRequest("Content-Type must be application/json")
    if params.get("charset", "utf-8") != "utf-8":
        raise BadRequest("Content-Type charset must be utf-8")


def decode_content(encoding: str | None, body: bytes, max_bytes: int) -> bytes:
    """The body with its Content-Encoding (identity or gzip) removed.

    Raises BadRequest for another coding or a corrupt, truncated or multi-member gzip stream;
    PayloadTooLarge when the decoded body exceeds `max_bytes`, or INFLATION_FLOOR and
    MAX_INFLATION_RATIO times the bytes sent.
    """
    if encoding is None or encoding.strip().lower() == "identity":
        return body
    if encoding.strip().lower() != "gzip":
        raise BadRequest(
            "unsupported Content-Encoding (only identity and gzip are read); "
            "never forwarded unchecked"
        )
    # RFC 1952 with an output cap: a gzip bomb stops at cap + 1 bytes of output instead of
    # being inflated in full.
    ratio_cap = max(INFLATION_FLOOR, MAX_INFLATION_RATIO * len(body))
    cap = min(max_bytes, ratio_cap)
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        raw = inflater.decompress(body, cap + 1)
    except zlib.error:
        raise BadRequest("Content-Encoding gzip: corrupt gzip stream") from None
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"gzip-decoded request body larger than {max_bytes} bytes")
    if len(raw) > cap:
        raise PayloadTooLarge(
            f"gzip request body inflates more than {MAX_INFLATION_RATIO} times its "
            f"{len(body)} bytes; send it less compressed or uncompressed"
        )
    if not inflater.eof:
        raise BadRequest("Content-Encoding gzip: truncated gzip stream")
    if inflater.unused_data:
        # A second gzip member or trailing bytes: decoders differ on whether they are read.
        raise BadRequest("Content-Encoding gzip: data after the end of the gzip stream")
    return raw
