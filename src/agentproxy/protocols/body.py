"""Request bodies the proxy reads to authorize them: media type and content coding.

Shared by every adapter that reads a JSON body (MCP, LLM APIs). A body is read only as
declared: a charset other than UTF-8 or a content coding other than gzip is refused, never
forwarded unchecked. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import zlib
from typing import Final

from agentproxy.errors import BadRequest, PayloadTooLarge

__all__ = ["INFLATION_FLOOR", "MAX_INFLATION_RATIO", "check_json_content_type", "decode_content"]

# JSON compresses 5-20x as agents send it; a body inflating 100x more than it was sent is a
# bomb whoever pays for the inflating and parsing. Bodies decoding to INFLATION_FLOOR bytes or
# fewer may inflate any amount (a short repetitive body is cheap whatever its ratio).
MAX_INFLATION_RATIO: Final = 100
INFLATION_FLOOR: Final = 256 * 1024


def check_json_content_type(value: str | None) -> None:
    """Raises BadRequest unless `value` is application/json, with no charset but utf-8."""
    # MCP Streamable HTTP: every client message is POSTed as application/json. RFC 8259 §8.1
    # makes JSON UTF-8, so any other declared charset means the client encoded it otherwise.
    if value is None:
        raise BadRequest("Content-Type must be application/json")
    media, *params = value.split(";")
    if media.strip().lower() != "application/json":
        raise BadRequest("Content-Type must be application/json")
    for param in params:
        name, _, param_value = param.partition("=")
        if name.strip().lower() == "charset" and param_value.strip().strip('"').lower() != "utf-8":
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
