"""RFC 9110 §5.6.2 `token`: the grammar of methods and field names, in one place."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["TOKEN", "is_token"]

# token = 1*tchar; tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" /
# "_" / "`" / "|" / "~" / DIGIT / ALPHA
TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_token(text: str) -> bool:
    return TOKEN.fullmatch(text) is not None
