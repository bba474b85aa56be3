"""The metrics' remembered children: the same series as prometheus-client's own `labels()`."""

from __future__ import annotations

from prometheus_client import generate_latest

from agentproxy.metering.metrics import Metrics


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
