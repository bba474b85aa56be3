"""The Prometheus metrics, registered once per process and kept across reloads.

Names follow Prometheus conventions (base units, `_total` counters). The `action` label is the
matched rule's action *pattern* (`http:GET /v1/employees/{id}`), never the concrete path, so a
caller cannot mint label values; calls no rule matched are labelled `other`.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    gc_collector,
    platform_collector,
    process_collector,
)
from prometheus_client.multiprocess import MultiProcessCollector

# 100 µs to 60 s, roughly three buckets a decade.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# The decision stage is measured in microseconds.
DECISION_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
    0.1,
)


class _KnownChildren:
    """`labels()` answered from a dict for label values seen before.

    prometheus-client validates the values, turns each into a string and takes a lock on every
    `labels()` call; the proxy calls it about ten times per request with the same few values
    (upstream, action pattern, decision), so the child it returned is remembered under the
    exact values asked for. The cache never outlives a child: `remove` and `clear` empty it.
    """

    _known: dict[tuple[object, ...], Any]

    def labels(self, *values: object, **by_name: object) -> Any:
        if by_name:
            return super().labels(*values, **by_name)  # type: ignore[misc]
        try:
            return self._known[values]
        except AttributeError:
            self._known = {}
        except KeyError:
            pass
        child = super().labels(*values)  # type: ignore[misc]
        self._known[values] = child
        return child

    def remove(self, *values: object) -> None:
        self._known = {}
        super().remove(*values)  # type: ignore[misc]

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        self._known = {}
        super().remove_by_labels(labels)  # type: ignore[misc]

    def clear(self) -> None:
        self._known = {}
        super().clear()  # type: ignore[misc]


class Counter(_KnownChildren, prometheus_client.Counter):
    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        """prometheus-client's `inc`, with its common case (a child or a label-less counter,
        no exemplar, a non-negative amount) sent straight to the value: its checks on every
        call were a quarter of the pipeline's own time per call (in-process, profiled).
        Everything else (a parent, an exemplar, a negative amount) takes the library's path
        and its errors. tests/metering/test_metrics.py holds both to the same exposition."""
        value = getattr(self, "_value", None)  # only what can be observed has one
        if value is None or exemplar or not amount >= 0:
            super().inc(amount, exemplar)
            return
        value.inc(amount)


class Histogram(_KnownChildren, prometheus_client.Histogram):
    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """prometheus-client's `observe` with the bucket found by bisection instead of a
        Python loop over the bounds; the same fallbacks as `Counter.inc` (NaN included)."""
        buckets = getattr(self, "_buckets", None)
        if buckets is None or exemplar or amount != amount:
            super().observe(amount, exemplar)
            return
        self._sum.inc(amount)
        buckets[bisect_left(self._upper_bounds, amount)].inc(1)


class Metrics:
    """One registry per proxy process (tests run several proxies in one interpreter)."""

    def __init__(self, attribution: tuple[str, ...] = ()) -> None:
        """`attribution`: the extra labels (user, team, …) of the cost, token and call
        counters; fixed for the life of the process."""
        # `exposition` is what /metrics serves. With --workers N every worker writes its
        # values to PROMETHEUS_MULTIPROC_DIR and any worker's scrape sums them all.
        self.registry = CollectorRegistry()
        self.exposition = self.registry
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiproc_dir:
            self.exposition = CollectorRegistry()
            MultiProcessCollector(self.exposition, path=multiproc_dir)  # type: ignore[no-untyped-call]
        else:
            process_collector.ProcessCollector(registry=self.registry)
            platform_collector.PlatformCollector(registry=self.registry)
            gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "agentproxy_requests",
            "Calls seen, by upstream, matched action pattern and decision.",
            ["upstream", "action", "decision"],
            registry=r,
        )
        self.shadow_decisions = Counter(
            "agentproxy_shadow_decisions",
            "Decisions computed but not enforced (shadow mode): what would have happened.",
            ["action", "rule", "decision"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "agentproxy_decision_seconds",
            "Time to identify the caller and decide.",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "agentproxy_upstream_seconds",
            "Time from sending upstream to its last response byte.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "agentproxy_request_seconds",
            "Time from the request reaching the proxy to the end of the answer.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead_seconds = Histogram(
            "agentproxy_overhead_seconds",
            "Time spent in the proxy itself (request time minus upstream time).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_reloads = Counter(
            "agentproxy_policy_reloads",
            "Policy and config loads, by result.",
            ["result"],
            registry=r,
        )
        self.decision_cache = Counter(
            "agentproxy_decision_cache",
            "Memoized decision lookups, by result.",
            ["result"],
            registry=r,
        )
        self.store_errors = Counter(
            "agentproxy_store_errors",
            "Decision store operations that failed, by operation.",
            ["op"],
            registry=r,
        )
        usage_labels = ["agent", "upstream", "action", "model", *attribution]
        self.calls = Counter(
            "agentproxy_calls",
            "Calls forwarded upstream, by agent, upstream, action pattern, model and attribution.",
            usage_labels,
            registry=r,
        )
        self.cost = Counter(
            "agentproxy_cost",
            "What calls cost (rule cost plus LLM tokens at the price table), in `currency` units.",
            ["currency", *usage_labels],
            registry=r,
        )
        self.tokens = Counter(
            "agentproxy_tokens",
            "LLM tokens, by type: input, output, cached_input.",
            ["type", *usage_labels],
            registry=r,
        )
        self.unpriced_tokens = Counter(
            "agentproxy_unpriced_tokens",
            "LLM tokens of models the price table does not cover (counted, not costed).",
            ["model"],
            registry=r,
        )
        self.tool_changes = Counter(
            "agentproxy_tool_changes",
            "MCP tool definitions seen changed since they were pinned.",
            ["upstream", "tool"],
            registry=r,
        )
        self.connections = Gauge(
            "agentproxy_connections",
            "Open client connections, by listener.",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_refused = Counter(
            "agentproxy_connections_refused",
            "Client connections closed by the proxy's bounds, by reason (max_connections, "
            "header_timeout, body_timeout, malformed_request).",
            ["reason"],
            registry=r,
        )
        self.approvals_pending = Gauge(
            "agentproxy_approvals_pending",
            "Approvals waiting for a decision.",
            registry=r,
            multiprocess_mode="max",
        )
        self.approvals = Counter(
            "agentproxy_approvals", "Approval decisions, by outcome.", ["outcome"], registry=r
        )
        self.approval_wait_seconds = Histogram(
            "agentproxy_approval_wait_seconds",
            "Time a call was held waiting for approval.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.audit_dropped = Counter(
            "agentproxy_audit_dropped",
            "Audit records that did not reach every sink.",
            registry=r,
        )
        self.telemetry_dropped = Counter(
            "agentproxy_telemetry_dropped",
            "Spans not exported: the export queue was full, or the collector refused them.",
            registry=r,
        )
        self.sts_tokens = Counter(
            "agentproxy_sts_tokens",
            "Token exchanges (POST /v1/token): issued, or the OAuth error they were refused with.",
            ["outcome"],
            registry=r,
        )
        self.upstream_credentials = Counter(
            "agentproxy_upstream_credentials",
            "Per-call upstream credentials (credentials.token_exchange), by how each call got"
            " one: exchanged, cached, refused (by the authorization server) or failed.",
            ["upstream", "outcome"],
            registry=r,
        )
        # Pre-create the children users alert on, so they exist (at 0) from the first scrape.
        self.sts_tokens.labels("issued")
        for result in ("success", "failure"):
            self.policy_reloads.labels(result)
        for result in ("hit", "miss"):
            self.decision_cache.labels(result)
        for outcome in ("approved", "denied", "expired"):
            self.approvals.labels(outcome)
