"""The metrics' remembered children: the same series as prometheus-client's own `labels()`."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agentproxy.metering.metrics import Counter, Histogram, Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_children_are_remembered_and_count_as_before() -> None:
    metrics = Metrics()
    first = metrics.requests.labels("hr", "http:GET /v1/x", "allow")
    assert metrics.requests.labels("hr", "http:GET /v1/x", "allow") is first
    first.inc()
    metrics.requests.labels("hr", "http:GET /v1/x", "allow").inc(2)
    metrics.requests.labels(upstream="hr", action="http:GET /v1/x", decision="allow").inc()
    labels = {"upstream": "hr", "action": "http:GET /v1/x", "decision": "allow"}
    assert sample(metrics, "agentproxy_requests_total", **labels) == 4.0
    metrics.request_seconds.labels("hr").observe(0.0003)
    metrics.request_seconds.labels("hr").observe(0.2)
    assert sample(metrics, "agentproxy_request_seconds_count", upstream="hr") == 2.0
    assert sample(metrics, "agentproxy_request_seconds_bucket", upstream="hr", le="0.0005") == 1.0


def test_non_string_values_are_the_same_series_as_their_text() -> None:
    metrics = Metrics()
    metrics.store_errors.labels(404).inc()
    metrics.store_errors.labels("404").inc()
    assert sample(metrics, "agentproxy_store_errors_total", op="404") == 2.0


def test_removed_children_are_forgotten() -> None:
    metrics = Metrics()
    metrics.tool_changes.labels("tools", "echo").inc()
    metrics.tool_changes.remove("tools", "echo")
    assert b'tool="echo"' not in generate_latest(metrics.registry)
    metrics.tool_changes.labels("tools", "echo").inc()
    assert sample(metrics, "agentproxy_tool_changes_total", upstream="tools", tool="echo") == 1.0
    metrics.tool_changes.clear()
    metrics.tool_changes.labels("tools", "echo").inc(5)
    assert sample(metrics, "agentproxy_tool_changes_total", upstream="tools", tool="echo") == 5.0


def _exposition(registry: CollectorRegistry) -> list[bytes]:
    # `_created` lines carry each series' creation time: never equal between two registries.
    return [line for line in generate_latest(registry).splitlines() if b"_created" not in line]


def test_the_fast_paths_expose_what_prometheus_clients_own_methods_do() -> None:
    """`Counter.inc` and `Histogram.observe` skip the library's per-call checks: on the same
    values (bucket bounds themselves, both ends, +Inf, fractions) the exposition is the same."""
    ours, stock = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    pairs = [
        (
            Histogram("h", "h", ["u"], buckets=buckets, registry=ours),
            prometheus_client.Histogram("h", "h", ["u"], buckets=buckets, registry=stock),
        ),
        (
            Histogram("plain", "p", buckets=buckets, registry=ours),
            prometheus_client.Histogram("plain", "p", buckets=buckets, registry=stock),
        ),
    ]
    values = [0.0, 0.0005, 0.001, 0.0010001, 0.01, 0.05, 0.1, 1.0, 1.5, 1e9, float("inf")]
    for fast, slow in pairs:
        for v in values:
            (fast.labels("a") if fast._labelnames else fast).observe(v)
            (slow.labels("a") if slow._labelnames else slow).observe(v)
    counters = (
        Counter("c", "c", ["u"], registry=ours),
        prometheus_client.Counter("c", "c", ["u"], registry=stock),
    )
    for counter in counters:
        counter.labels("a").inc()
        counter.labels("a").inc(2.5)
        counter.labels("b").inc(0)
    assert _exposition(ours) == _exposition(stock)


def test_the_fast_paths_keep_the_librarys_errors() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["u"], registry=registry)
    histogram = Histogram("h", "h", ["u"], registry=registry)
    with pytest.raises(ValueError, match="missing label values"):
        counter.inc()
    with pytest.raises(ValueError, match="missing label values"):
        histogram.observe(1.0)
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("a").inc(-1)
    histogram.labels("a").observe(float("nan"))  # the library's path: no bucket, NaN sum
    assert registry.get_sample_value("h_count", {"u": "a"}) == 0.0
