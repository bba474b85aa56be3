"""The Prometheus harness, against a tiny exporter that serves fixed metrics: a real scrape and
a PromQL answer read back over the HTTP API."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from tests.conftest import start_app
from tests.harness.prometheus import PrometheusError, find_prometheus, sample_value
from tests.metering.conftest import PrometheusFactory


def fixed_metrics() -> bytes:
    registry = CollectorRegistry()
    cost = Counter("demo_cost", "What calls cost.", ["agent", "currency"], registry=registry)
    cost.labels("hr-bot", "EUR").inc(0.0123)
    cost.labels("pay-bot", "EUR").inc(2.5)
    cost.labels("pay-bot", "USD").inc(1)
    return generate_latest(registry)


async def test_scrapes_and_answers_promql(make_prometheus: PrometheusFactory) -> None:
    body = fixed_metrics()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner, port = await start_app(app)
    try:
        prometheus = await make_prometheus(f"127.0.0.1:{port}")
        by_agent = await prometheus.wait_for(
            'sum by (agent) (demo_cost_total{currency="EUR"})', lambda r: len(r) == 2, timeout=15
        )
        values = {s["metric"]["agent"]: float(s["value"][1]) for s in by_agent}
        assert values == {"hr-bot": 0.0123, "pay-bot": 2.5}
        up = await prometheus.query('up{job="agentproxy"}')
        assert sample_value(up) == 1.0
        assert sample_value(await prometheus.query("scalar(vector(4))")) == 4.0
        with pytest.raises(PrometheusError, match="parse error"):
            await prometheus.query("sum by (agent (demo_cost_total)")
        with pytest.raises(AssertionError, match="did not satisfy"):
            await prometheus.wait_for("demo_cost_total", lambda r: len(r) == 99, timeout=0.3)
    finally:
        await runner.cleanup()


def test_missing_binary_fails_with_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="install Debian's prometheus"):
        find_prometheus()
