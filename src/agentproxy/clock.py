"""The one clock: every stage, store operation and service reads the time from a `Clock`.

`now()` is wall time (seconds since the epoch): what is stored, compared with token
lifetimes and approval expiries, and shown. `monotonic()` never goes back: what durations
(latencies, refresh intervals, staleness) are measured with. Passing the clock in, instead of
calling `time.time()` wherever the time is needed, lets a test advance time instead of
sleeping through it (Cerbos injects `NowFunc` into evaluation the same way).

One RFC 3339 formatter and one parser live here too, so every record, log line and message
writes and reads times the same way.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["SYSTEM", "Clock", "SystemClock", "parse_rfc3339", "rfc3339"]


class Clock(Protocol):
    def now(self) -> float:
        """Wall time, in seconds since the epoch."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes back."""


class SystemClock:
    """The machine's clocks. `monotonic` is `perf_counter`: monotonic, and fine-grained
    enough for the microsecond stages of the pipeline."""

    __slots__ = ()

    now = staticmethod(time.time)
    monotonic = staticmethod(time.perf_counter)


SYSTEM: Clock = SystemClock()


class _SecondCache:
    """The last whole second formatted: strftime costs more than the rest of a log line's
    fields together, and a busy proxy formats the same second thousands of times."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = ""

    def format(self, second: int) -> str:
        if self.second != second:
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        return self.text


_SECONDS = _SecondCache()
_SCALE = {0: 1, 3: 1_000, 6: 1_000_000}


def rfc3339(epoch: float, digits: int = 0) -> str:
    """`epoch` as RFC 3339 UTC text with `digits` (0, 3 or 6) fraction digits:
    `2026-12-07T02:36:11Z`, `…11.123Z`, `…11.123456Z`. Fractions are truncated, never
    rounded up into the next second. Raises ValueError for other `digits`."""
    scale = _SCALE.get(digits)
    if scale is None:
        raise ValueError("digits must be 0, 3 or 6")
    second = int(epoch // 1)
    text = _SECONDS.format(second)
    if not digits:
        return text + "Z"
    fraction = min(int((epoch - second) * scale), scale - 1)
    return f"{text}.{fraction:0{digits}d}Z"


def parse_rfc3339(text: str) -> float:
    """RFC 3339 text (`Z` or a numeric offset; a date alone means its midnight UTC) as
    seconds since the epoch. Raises ValueError saying what is wrong; a time without an
    offset is refused, since it names no instant."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an RFC 3339 time (write e.g. 2026-01-01T00:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        if len(value) == 10:  # a date alone
            moment = moment.replace(tzinfo=UTC)
        else:
            raise ValueError(f"{text!r} has no UTC offset (end it with Z or +HH:MM)")
    return moment.timestamp()
