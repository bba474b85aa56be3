"""A clock a test moves by hand: waiting for a TTL or an expiry is `advance()`, not a sleep."""

from __future__ import annotations

import time


class FakeClock:
    """Both readings start where told (wall time: now, by default, so that tokens minted by
    the test verify) and move only when `advance` is called."""

    def __init__(self, start: float | None = None) -> None:
        # A second ahead of the wall clock by default: a token the test mints later (its
        # `iat` the whole second it was minted in) is never "not yet valid" to the proxy.
        self._now = time.time() + 1.0 if start is None else start
        self._monotonic = 1_000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        self._monotonic += seconds

    def set(self, now: float) -> None:
        """Wall time only (a stepped clock); monotonic time moves by the same amount when
        the step is forward."""
        if now > self._now:
            self._monotonic += now - self._now
        self._now = now
