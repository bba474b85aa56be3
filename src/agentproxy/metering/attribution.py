"""Label values that cannot blow up Prometheus: at most `max_values` distinct values per
label; the rest are folded into `other`, so one noisy caller costs one series."""

from __future__ import annotations

OTHER = "other"


class CardinalityGuard:
    def __init__(self, max_values: int) -> None:
        self._max = max_values
        self._seen: dict[str, set[str]] = {}

    def value(self, label: str, value: str | None) -> str:
        text = "" if value is None else value
        seen = self._seen.setdefault(label, set())
        if text in seen:
            return text
        if len(seen) < self._max:
            seen.add(text)
            return text
        return OTHER
