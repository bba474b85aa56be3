"""`query`: the audit records that match some filters, streamed from JSONL files.

Filters read top-level members of the records the proxy writes: `agent`, `user`, `task`,
`action` (a glob, as in policy: `http:GET /v1/*`), `effect`, and `time` (RFC 3339 text or
epoch seconds). Control records (checkpoints, gaps, recoveries) have none of these, so any
filter but time leaves them out. Lines that are not JSON objects (an incomplete last line)
are skipped: checking the log is `verify`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import orjson

Moment = datetime | float | int


def query(
    files: Sequence[Path],
    *,
    agent: str | None = None,
    user: str | None = None,
    task: str | None = None,
    action: str | None = None,
    effect: str | None = None,
    since: Moment | None = None,
    until: Moment | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields the matching records file by file, in file order, one line at a time. The time
    range is `since <= time < until`; a naive datetime is UTC. Raises OSError if a file
    cannot be read."""
    exact = {k: v for k, v in (("agent", agent), ("user", user), ("task", task)) if v is not None}
    if effect is not None:
        exact["effect"] = effect
    start = None if since is None else _epoch(since)
    end = None if until is None else _epoch(until)
    for path in files:
        with Path(path).open("rb") as f:
            for line in f:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if any(_field(record, k) != v for k, v in exact.items()):
                    continue
                if action is not None:
                    name = record.get("action")
                    if not isinstance(name, str) or not fnmatchcase(name, action):
                        continue
                if start is not None or end is not None:
                    when = _record_time(record.get("time"))
                    if when is None:
                        continue
                    if (start is not None and when < start) or (end is not None and when >= end):
                        continue
                yield record


def _field(record: dict[str, Any], name: str) -> Any:
    """Decision records keep who asked under `principal` (`agent`, `user`); other facts, and
    records written by other tools, at the top level."""
    principal = record.get("principal")
    if name in ("agent", "user") and isinstance(principal, dict):
        return principal.get(name)
    return record.get(name)


def _epoch(moment: Moment) -> float:
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    return float(moment)


def _record_time(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return _epoch(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None
