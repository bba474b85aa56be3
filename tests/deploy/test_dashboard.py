"""The Grafana dashboard (helm/agentproxy/dashboards/agentproxy-cost.json).

It must import (valid JSON, a current schema, one `${DS_PROMETHEUS}` datasource input), every
panel's PromQL must parse by Prometheus's own parser (`promtool check rules`, from Debian's
prometheus package: these tests fail without it, never skip), and it may only query metrics
agentproxy exports, grouped or filtered by labels those metrics have: a renamed metric or a
label that does not exist gives an empty panel, not an error, so only a test catches it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "agentproxy" / "dashboards" / "agentproxy-cost.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# Labels every counter of calls, cost and tokens has, plus the attribution labels the
# dashboard groups by (configured in metering.attribution.labels).
USAGE_LABELS = {"agent", "upstream", "action", "model", "user", "team"}
# Every series Prometheus stores also has its target's labels.
TARGET_LABELS = {"job", "instance"}
METRICS: dict[str, set[str]] = {
    "agentproxy_cost_total": {"currency", *USAGE_LABELS},
    "agentproxy_tokens_total": {"type", *USAGE_LABELS},
    "agentproxy_calls_total": USAGE_LABELS,
    "agentproxy_requests_total": {"upstream", "action", "decision"},
    "agentproxy_overhead_seconds_bucket": {"le"},
    "agentproxy_unpriced_tokens_total": {"model"},
    "agentproxy_decision_seconds_bucket": {"le"},
    "agentproxy_upstream_seconds_bucket": {"le", "upstream"},
}
# What the dashboard has to show (issue 5): a metric, and the labels it must be grouped by.
REQUIRED = [
    ("agentproxy_cost_total", {"agent"}),
    ("agentproxy_cost_total", {"user"}),
    ("agentproxy_calls_total", {"upstream", "action"}),
    ("agentproxy_requests_total", {"action"}),
    ("agentproxy_tokens_total", {"model", "type"}),
    ("agentproxy_overhead_seconds_bucket", {"le"}),
    ("agentproxy_unpriced_tokens_total", {"model"}),
]


@dataclass(frozen=True)
class Query:
    panel: str
    ref_id: str
    expr: str  # with Grafana's $__range replaced by a duration promtool accepts


def load() -> dict[str, Any]:
    loaded = orjson.loads(DASHBOARD.read_bytes())
    assert isinstance(loaded, dict), "the dashboard must be a JSON object"
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(panel["title"], target["refId"], target["expr"].replace("$__range", "1h"))
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


# -- a small PromQL lexer: enough to find metric names and label names ------------------------

TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>\d[\d.]*(?:[eE][+-]?\d+)?[a-zA-Z]*)       # 0.99, 1e3, and durations such as 5m
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){}\[\],@])
    """,
    re.VERBOSE,
)
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}


def tokens(expr: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            found.append((kind, match.group()))
        pos = match.end()
    return found


def names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names (in matchers and groupings) `expr` uses."""
    metrics: set[str] = set()
    labels: set[str] = set()
    toks = tokens(expr)
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "[":  # a range or subquery: durations only
            i = next(j for j in range(i, len(toks)) if toks[j][1] == "]")
        elif text == "{":  # label matchers
            end = next(j for j in range(i, len(toks)) if toks[j][1] == "}")
            labels.update(
                toks[j][1]
                for j in range(i + 1, end)
                if toks[j][0] == "name" and toks[j + 1][1] in ("=", "!=", "=~", "!~")
            )
            i = end
        elif kind == "name" and text in GROUPING:
            end = next(j for j in range(i, len(toks)) if toks[j][1] == ")")
            labels.update(t for k, t in toks[i + 1 : end] if k == "name")
            i = end
        elif kind == "name" and following != "(" and text not in AGGREGATIONS | KEYWORDS:
            metrics.add(text)
        i += 1
    return metrics, labels


def grouping(expr: str) -> set[str]:
    """The labels of every `by (…)` clause in `expr`."""
    return {
        label.strip()
        for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
        if label.strip()
    }


def test_lexer_reads_what_the_dashboard_needs() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, upstream) (rate(a_bucket{decision="deny",'
        " x!~'y'}[5m] offset 1h))) / on (job) group_left (z) sum(b_total) > bool 2"
    )
    assert names(expr) == ({"a_bucket", "b_total"}, {"le", "upstream", "decision", "x", "job", "z"})
    assert grouping(expr) == {"le", "upstream"}


# -- the dashboard ------------------------------------------------------------------------------


def test_is_an_importable_grafana_dashboard() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and dashboard["title"]
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        where = panel["title"]
        assert panel["datasource"] == DATASOURCE, where
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
        assert panel["targets"], f"{where}: no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: refIds repeat"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, where
            assert target["expr"].strip(), where


def test_shows_what_finance_asked_for() -> None:
    used = [(names(q.expr)[0], grouping(q.expr)) for q in queries(load())]
    for metric, by in REQUIRED:
        assert any(metric in metrics and by <= group for metrics, group in used), (
            f"no panel shows {metric} by {sorted(by)}"
        )
    denials = [q.expr for q in queries(load()) if "agentproxy_requests_total" in q.expr]
    assert any('decision="deny"' in expr for expr in denials)
    overhead = [q.expr for q in queries(load()) if "agentproxy_overhead_seconds_bucket" in q.expr]
    assert any("histogram_quantile(0.5," in expr for expr in overhead)
    assert any("histogram_quantile(0.99," in expr for expr in overhead)


def test_queries_only_exported_metrics_and_their_labels() -> None:
    for query in queries(load()):
        where = f"{query.panel} ({query.ref_id}): {query.expr}"
        assert "$" not in query.expr, f"{where}: a Grafana variable promtool cannot parse"
        metrics, labels = names(query.expr)
        assert metrics, f"{where}: queries no metric"
        assert metrics <= METRICS.keys(), f"{where}: unknown metrics {metrics - METRICS.keys()}"
        known = TARGET_LABELS.union(*(METRICS[m] for m in metrics))
        assert labels <= known, f"{where}: labels {sorted(labels - known)} do not exist"


def find_promtool() -> Path:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: install Debian's prometheus package "
            "(apt-get install prometheus, or `make system-deps`)",
            pytrace=False,
        )
    return Path(found)


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    promtool = find_promtool()
    rules = [
        {"record": f"dashboard:query_{n}", "expr": query.expr}
        for n, query in enumerate(queries(load()))
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    index = "\n".join(
        f"dashboard:query_{n}: {q.panel} {q.ref_id}" for n, q in enumerate(queries(load()))
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{index}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
